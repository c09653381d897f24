"""Op names are global: every protocol module can be imported together."""

from __future__ import annotations

import importlib
import pkgutil

import ipc.protocol
from ipc.protocol.base import Message


def test_every_protocol_module_imports_without_a_name_clash() -> None:
    names = [m.name for m in pkgutil.iter_modules(ipc.protocol.__path__)]
    for name in names:
        importlib.import_module(f"ipc.protocol.{name}")  # a clash raises TypeError here
    tags = [cls.__name__ for cls in Message._registry.values()]
    assert len(tags) == len(set(tags))
    assert {"Echo", "Execute", "Ready"} <= set(tags)
