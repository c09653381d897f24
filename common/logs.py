"""structlog JSON lines, one per event, with service and pid bound.

Every process calls `configure()` once at start. Lines go to stderr and, when
a home is given, to ``$LLMOS_HOME/logs/<service>.log``.

Bounded on both axes (issue 12 #6):

* every string value in an event is cut to `MAX_VALUE` characters (marked
  ``…[+N chars]``), so a client-chosen name or trace id cannot make each log
  line megabytes long;
* the file rotates by size: past ``LLMOS_LOG_MAX_BYTES`` (default 16 MiB) it
  becomes ``<service>.log.1`` (older ones shift up to ``.LLMOS_LOG_BACKUPS``,
  default 3, the oldest is deleted), so one service's logs take at most
  16 MiB x 4 on disk. ``LLMOS_LOG_MAX_BYTES=0`` turns rotation off.

Each line reaches the file in one ``write(2)`` on an O_APPEND descriptor, so
a killed process loses at most the line being written; a half line left by a
kill is ended with a newline when the file is next opened, so the next
process's first line is not glued to it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, MutableMapping, TextIO

import structlog

from common.home import logs_dir

MAX_VALUE = 256
MAX_EXCEPTION = 8192  # our own tracebacks: longer, still bounded
MAX_ITEMS = 16
DEFAULT_MAX_BYTES = 16 * 1024 * 1024
DEFAULT_BACKUPS = 3


def _cut(v: Any, limit: int, depth: int = 0) -> Any:
    if isinstance(v, str):
        return v if len(v) <= limit else f"{v[:limit]}…[+{len(v) - limit} chars]"
    if isinstance(v, (bytes, bytearray)):
        return v if len(v) <= limit else f"{bytes(v[:limit])!r}…[+{len(v) - limit} bytes]"
    if depth < 3 and isinstance(v, (list, tuple)):
        return [_cut(x, limit, depth + 1) for x in v[:MAX_ITEMS]] + (
            [f"…[+{len(v) - MAX_ITEMS} items]"] if len(v) > MAX_ITEMS else [])
    if depth < 3 and isinstance(v, dict):
        items = list(v.items())
        out = {str(_cut(str(k), 64)): _cut(x, limit, depth + 1) for k, x in items[:MAX_ITEMS]}
        if len(items) > MAX_ITEMS:
            out["…"] = f"+{len(items) - MAX_ITEMS} items"
        return out
    return v


def truncate_strings(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """A structlog processor: long strings (also inside lists and dicts) cut,
    saying how much was cut."""
    for k, v in event.items():
        event[k] = _cut(v, MAX_EXCEPTION if k == "exception" else MAX_VALUE)
    return event


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "")
    try:
        value = int(raw) if raw else default
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


class RotatingFile:
    """An append-only log file rotated by size, written a whole line at a time."""

    def __init__(self, path: Path, max_bytes: int = DEFAULT_MAX_BYTES, backups: int = DEFAULT_BACKUPS):
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self._pending = ""
        self._fd = -1
        self._size = 0
        self._open()

    def _open(self) -> None:
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._size = os.fstat(self._fd).st_size
        if self._size and not self._ends_with_newline():
            self._size += os.write(self._fd, b"\n")

    def _ends_with_newline(self) -> bool:
        fd = os.open(self.path, os.O_RDONLY)
        try:
            return os.pread(fd, 1, self._size - 1) == b"\n"
        finally:
            os.close(fd)

    def _rotate(self) -> None:
        os.close(self._fd)
        self._fd = -1
        if self.backups == 0:
            self.path.unlink(missing_ok=True)
        else:
            for i in range(self.backups - 1, 0, -1):
                src = self.path.with_name(f"{self.path.name}.{i}")
                if src.exists():
                    os.replace(src, self.path.with_name(f"{self.path.name}.{i + 1}"))
            os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        self._open()

    def write(self, s: str) -> None:
        self._pending += s
        if "\n" not in self._pending:
            return
        lines, _, self._pending = self._pending.rpartition("\n")
        data = (lines + "\n").encode()
        if self.max_bytes and self._size and self._size + len(data) > self.max_bytes:
            self._rotate()
        self._size += os.write(self._fd, data)

    def flush(self) -> None:
        pass  # every complete line is already written

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class _Tee:
    def __init__(self, *streams: TextIO | RotatingFile):
        self._streams = streams

    def write(self, s: str) -> None:
        for st in self._streams:
            try:
                st.write(s)
            except (OSError, ValueError):
                pass  # a closed stderr or a full disk must never take the service down

    def flush(self) -> None:
        for st in self._streams:
            try:
                st.flush()
            except (OSError, ValueError):
                pass


def configure(service: str, home: Path | None = None, *, stderr: bool = True) -> None:
    # LLMOS_LOG_STDERR=0: the kernel shows a human console in its terminal and
    # sent this child's stderr to a file; the JSON lines are in the log file.
    stderr = stderr and os.environ.get("LLMOS_LOG_STDERR", "1") != "0"
    streams: list[TextIO | RotatingFile] = [sys.stderr] if stderr else []
    if home is not None:
        d = logs_dir(home)
        d.mkdir(parents=True, exist_ok=True)
        streams.append(RotatingFile(d / f"{service}.log", _env_int("LLMOS_LOG_MAX_BYTES", DEFAULT_MAX_BYTES),
                                    _env_int("LLMOS_LOG_BACKUPS", DEFAULT_BACKUPS)))
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            truncate_strings,
            structlog.processors.JSONRenderer(),
        ],
        logger_factory=structlog.PrintLoggerFactory(_Tee(*streams)),  # type: ignore[arg-type]
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.bind_contextvars(service=service, pid=os.getpid())


def get_logger(**bind: Any) -> Any:
    """A lazy logger: safe at module level, picks up `configure()` when first used."""
    return structlog.get_logger(**bind)
