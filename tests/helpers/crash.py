"""A child that exits with status 3 at once (restart-intensity tests)."""

import sys

sys.exit(3)
