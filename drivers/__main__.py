"""`python -m drivers NAME [driver args]`: run the driver registered as NAME
in the ``llmos.drivers`` entry-point group (cpu, cuda, or a third party's)."""

from __future__ import annotations

import sys

from drivers.registry import available, driver_class
from ipc.errors import NotFound

if len(sys.argv) < 2 or sys.argv[1].startswith("-"):
    sys.exit(f"usage: python -m drivers NAME [--model ...]; installed drivers: {', '.join(available())}")
name = sys.argv.pop(1)
try:
    cls = driver_class(name)
except NotFound as exc:
    sys.exit(f"llmos: {exc.message}")
cls.main()
