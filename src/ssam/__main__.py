"""`python -m ssam …` is the `ssam` command."""

import sys

from .cli import main

sys.exit(main())
