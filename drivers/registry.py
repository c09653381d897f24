"""Find a driver class by name through the ``llmos.drivers`` entry-point group.

llmos's own `cpu` and `cuda` are registered in its pyproject.toml; a
third-party package adds its own device the same way (docs/drivers.md).
Importing this module does not import torch; loading a model driver's class
(cpu, cuda) does, the null driver's does not.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import TYPE_CHECKING

from ipc.errors import NotFound

if TYPE_CHECKING:
    from drivers.service import DriverService

GROUP = "llmos.drivers"


def available() -> list[str]:
    return sorted(ep.name for ep in entry_points(group=GROUP))


def driver_class(name: str) -> "type[DriverService]":
    for ep in entry_points(group=GROUP):
        if ep.name == name:
            cls = ep.load()
            from drivers.service import DriverService

            if not (isinstance(cls, type) and issubclass(cls, DriverService)):
                raise NotFound(f"entry point {GROUP}:{name} is {ep.value}, which is not a Driver subclass")
            return cls
    raise NotFound(f"no driver named {name!r} (installed: {', '.join(available()) or 'none'})")
