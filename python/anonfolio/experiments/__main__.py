"""``python -m anonfolio.experiments``: race-policies with its defaults."""

import sys

from . import race_policies

race_policies(log=sys.stderr)
