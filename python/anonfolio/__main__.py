"""``python -m anonfolio``: the same command line as ``anonfolio``."""

import sys

from .cli import main

sys.exit(main())
