"""`python -m ssam.bench`: the same error handling and exit codes as `ssam bench` (the CLI imports the benchmark
only when asked for it, and the benchmark's library modules never import the CLI)."""

import sys

from ..cli import main

sys.exit(main(["bench", *sys.argv[1:]]))
