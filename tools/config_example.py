"""`llmos config example`: every setting of `Config` with its default, as a
commented TOML file. Generated from the structs themselves (fields, defaults,
enum choices, and the `#` comments above each field in their source), so it
cannot drift from what `load_config` accepts; tests/unit/test_config.py
decodes it back into `Config()`.
"""

from __future__ import annotations

import inspect
import re
from enum import Enum
from typing import Any, Sequence

import msgspec

from common.configfile import toml_key, toml_value
from kernel.config import Config

_FIELD = re.compile(r"^\s+(\w+)\s*:")

HEADER = """\
# llmos configuration: every setting, set to its default (`llmos config example`).
# Use with `llmos up --config FILE`; delete what you do not change. The kernel
# decodes the whole file before anything starts and refuses a bad value,
# naming the file, the table and the field. Flags of `llmos up` (--model,
# --drivers, --http, --policy, --kv-cache-mb, --dtype, --autotune, ...) win
# over the file; --drivers or --http also replace [[children]].
"""


def example_toml() -> str:
    out = [HEADER]
    cfg = Config()
    for f in msgspec.structs.fields(Config):
        value = getattr(cfg, f.name)
        if f.name == "children":
            out.append(_children(value))
        else:
            _table(out, f.name, value)
    return "\n".join(out).rstrip() + "\n"


def _comments(cls: type) -> dict[str, list[str]]:
    """Each field's comment lines: the `#` lines just above it and the one
    after it on its own line."""
    try:
        src = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    found: dict[str, list[str]] = {}
    pending: list[str] = []
    for line in src.splitlines()[1:]:
        stripped = line.strip()
        if stripped.startswith("#"):
            pending.append(stripped.lstrip("#").strip())
            continue
        m = _FIELD.match(line)
        if m and "(" not in line.split(":", 1)[0]:
            name = m.group(1)
            tail = line.split("#", 1)[1].strip() if "#" in line and '"#' not in line else ""
            found[name] = pending + ([tail] if tail else [])
        pending = []
    return found


def _table(out: list[str], name: str, value: msgspec.Struct, lead: Sequence[str] = ()) -> None:
    cls = type(value)
    notes = _comments(cls)
    out.append("")
    out.extend(f"# {line}" if line else "#" for line in lead)
    out.append(f"[{name}]")
    nested = []
    for f in msgspec.structs.fields(cls):
        v = getattr(value, f.name)
        if isinstance(v, msgspec.Struct):
            nested.append((f.name, v))
            continue
        for line in notes.get(f.name, []):
            out.append(f"# {line}" if line else "#")
        choices = f"  # one of: {', '.join(e.value for e in type(v))}" if isinstance(v, Enum) else ""
        out.append(f"{toml_key(f.name)} = {toml_value(v)}{choices}")
    for sub, v in nested:
        _table(out, f"{name}.{sub}", v, notes.get(sub, []))


def _children(children: list[Any]) -> str:
    from kernel.config import ChildSpec

    notes = _comments(ChildSpec)
    lines = ["", "# The supervised children, in start order (the default boot). A child is a",
             "# subtree of its own: significant ones escalate (stop everything) past their",
             "# restart intensity or on a failure restarting cannot fix; optional ones",
             "# (significant = false) stop alone."]
    for i, child in enumerate(children):
        lines.append("[[children]]")
        for f in msgspec.structs.fields(ChildSpec):
            if i == 0:
                lines.extend(f"# {n}" for n in notes.get(f.name, []))
            v = getattr(child, f.name)
            choices = f"  # one of: {', '.join(e.value for e in type(v))}" if isinstance(v, Enum) and i == 0 else ""
            lines.append(f"{toml_key(f.name)} = {toml_value(v)}{choices}")
    return "\n".join(lines)


