"""``python -m ssam.compare``: the same command, error handling and exit codes as ``ssam compare``."""

import sys

from ..cli import main

sys.exit(main(["compare", *sys.argv[1:]]))
