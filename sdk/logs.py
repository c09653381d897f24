"""structlog JSON lines, one per event, with service and pid bound.

Every process calls `configure()` once at start. Lines go to stderr and, when
a home is given, to ``$LLMOS_HOME/logs/<service>.log`` (line-buffered, so a
killed process loses at most the line being written).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, TextIO

import structlog

from ipc.home import logs_dir


class _Tee:
    def __init__(self, *streams: TextIO):
        self._streams = streams

    def write(self, s: str) -> None:
        for st in self._streams:
            try:
                st.write(s)
            except (OSError, ValueError):
                pass  # a closed stderr must never take the service down

    def flush(self) -> None:
        for st in self._streams:
            try:
                st.flush()
            except (OSError, ValueError):
                pass


def configure(service: str, home: Path | None = None, *, stderr: bool = True) -> None:
    streams: list[TextIO] = [sys.stderr] if stderr else []
    if home is not None:
        d = logs_dir(home)
        d.mkdir(parents=True, exist_ok=True)
        streams.append(open(d / f"{service}.log", "a", buffering=1))  # noqa: SIM115 - lives as long as the process
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        logger_factory=structlog.PrintLoggerFactory(_Tee(*streams)),  # type: ignore[arg-type]
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.bind_contextvars(service=service, pid=os.getpid())


def get_logger(**bind: Any) -> Any:
    """A lazy logger: safe at module level, picks up `configure()` when first used."""
    return structlog.get_logger(**bind)
