"""Reading the one TOML config file; every process that has a table in it
uses this, so a missing or broken file, or a bad value, reads the same
everywhere: `ConfigError` naming the file, the table and the field.

The kernel decodes the whole file once, before anything starts, and hands
each child the tables it decoded (with `llmos up`'s flags applied) as JSON in
`$LLMOS_CONFIG_TABLES`; a child decodes its own table from there with the
same struct (or from `--config FILE` when run by hand).
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from enum import Enum
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from ipc.errors import BadRequest, ConfigError

TABLES_ENV = "LLMOS_CONFIG_TABLES"
T = TypeVar("T")
_AT = re.compile(r"^(.*?)(?: - at `\$(.*)`)?$", re.S)


def read_toml(path: str | Path) -> dict[str, Any]:
    """The parsed file; `ConfigError` naming the file when it is missing or not TOML."""
    p = Path(path)
    try:
        return tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {p}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {p} cannot be read: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {p} is not valid TOML: {exc}") from None


def where(source: str | Path | None, table: str) -> str:
    """How an error names its place: 'config file F: [table]' (a Path),
    'SOURCE: [table]' (flags), or 'table config:' (no source)."""
    if isinstance(source, Path):
        return f"config file {source}: [{table}]"
    return f"{source}: [{table}]" if source else f"{table} config:"


def decode_table(raw: object, cls: type[T], table: str, source: str | Path | None = None) -> T:
    """`raw` (one table's mapping) as a `cls`, then `cls.validate()` if it has
    one; every failure is a `ConfigError` naming source, table and field."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where(source, table)} must be a table, got {type(raw).__name__}")
    try:
        value = msgspec.convert(raw, cls)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{where(source, table)} {field_error(exc)}") from None
    validate = getattr(value, "validate", None)
    if validate is not None:
        try:
            value = validate()
        except BadRequest as exc:
            raise ConfigError(f"{where(source, table)} {exc.message}") from None
    return value


def field_error(exc: msgspec.ValidationError) -> str:
    """msgspec's "Expected `int`, got `str` - at `$.policy.quantum`" as
    "policy.quantum: Expected `int`, got `str`" (the field first)."""
    path, why = split_error(exc)
    return f"{path}: {why}" if path else why


def split_error(exc: msgspec.ValidationError) -> tuple[str, str]:
    """(the field's path without "$.", what was wrong with it)."""
    m = _AT.match(str(exc))
    assert m is not None  # the pattern matches any text
    return (m.group(2) or "").lstrip("."), m.group(1)


def child_tables(tables: dict[str, Any], source: str | Path | None) -> str:
    """The value of `$LLMOS_CONFIG_TABLES` for the kernel's children."""
    return json.dumps({"source": str(source) if source else "", "tables": tables})


def load_table(path: str | Path | None, table: str, cls: type[T], overrides: dict[str, Any] | None = None) -> T:
    """One service's table: from the TOML file at `path` when given, else
    from the tables the kernel handed down (or its `$LLMOS_CONFIG` file),
    else all defaults; `overrides`
    (command-line flags, None = not given) applied on top."""
    raw: object = {}
    source: str | Path | None = None
    if path is not None:
        source = Path(path)
        raw = read_toml(source).get(table, {})
    elif os.environ.get(TABLES_ENV):
        try:
            handed = json.loads(os.environ[TABLES_ENV])
            source, raw = handed["source"] or None, handed["tables"].get(table, {})
            source = Path(source) if source else None
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ConfigError(f"${TABLES_ENV} is not what the kernel writes") from None
    elif os.environ.get("LLMOS_CONFIG"):  # the file the kernel was started with
        source = Path(os.environ["LLMOS_CONFIG"])
        raw = read_toml(source).get(table, {})
    if overrides and isinstance(raw, dict):
        raw = with_overrides(raw, overrides)
    return decode_table(raw, cls, table, source)


def with_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """`raw` with each override that is not None set; a dotted key
    ("policy.name") reaches into a nested table."""
    out = dict(raw)
    for key, value in overrides.items():
        if value is None:
            continue
        head, _, rest = key.partition(".")
        if rest:
            sub = out.get(head)
            out[head] = with_overrides(sub if isinstance(sub, dict) else {}, {rest: value})
        else:
            out[key] = value
    return out


_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def toml_key(k: str) -> str:
    return k if _BARE_KEY.match(k) else json.dumps(k)


def toml_value(v: Any) -> str:
    """A value as TOML (the example config, the test harness's config files)."""
    if isinstance(v, Enum):
        v = v.value
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{toml_key(str(k))} = {toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"no TOML form for {type(v).__name__}")
