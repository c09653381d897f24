"""Reading the one TOML config file; every process that has a table in it
uses this, so a missing or broken file reads the same everywhere."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from ipc.errors import BadRequest


def read_toml(path: str | Path) -> dict[str, Any]:
    """The parsed file; `BadRequest` naming the file when it is missing or not TOML."""
    p = Path(path)
    try:
        return tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise BadRequest(f"config file not found: {p}") from None
    except tomllib.TOMLDecodeError as exc:
        raise BadRequest(f"config file {p} is not valid TOML: {exc}") from None
