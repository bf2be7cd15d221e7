"""`python -m edgeprune_fast ...`: the `edgeprune` command line (cli.py)."""

import sys

from .cli import main

sys.exit(main())
