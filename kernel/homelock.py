"""One kernel per home: an exclusive flock on ``run/kernel.lock``, held for the
kernel's whole life.

The lock, not the socket files, says who serves a home. Without it a second
kernel took over the socket paths and deleted them when it exited, leaving the
first one running and unreachable (issue 13 #1). The file is never deleted:
unlinking a locked file lets a third kernel lock a fresh file at the same path
while the second still holds the old one. It is emptied instead. Its
descriptor is close-on-exec, so the lock goes when the kernel process goes,
whatever its children do.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from types import TracebackType

from ipc.errors import Unavailable
from common.home import lock_file, run_dir

_PID_BYTES = 32


class HomeLocked(Unavailable):
    """Another kernel serves this home (its pid in ``detail["pid"]``, 0 if unknown)."""


def _read_pid(fd: int) -> int:
    raw = os.pread(fd, _PID_BYTES, 0).strip()
    return int(raw) if raw.isdigit() and len(raw) < 16 else 0


def holder_pid(home: Path) -> int:
    """The pid the lock file names (0: none, or unreadable). A hint only: the
    file is emptied when its kernel stops, but a killed kernel leaves its pid."""
    try:
        fd = os.open(lock_file(home), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return 0
    try:
        return _read_pid(fd)
    finally:
        os.close(fd)


class KernelLock:
    def __init__(self, path: Path, fd: int):
        self.path = path
        self._fd = fd

    @classmethod
    def acquire(cls, home: Path) -> "KernelLock":
        """Take the home or raise `HomeLocked` at once (never waits)."""
        rd = run_dir(home)
        rd.mkdir(parents=True, exist_ok=True)
        os.chmod(rd, 0o700)
        path = lock_file(home)
        # O_NOFOLLOW: a symlink planted in run/ must not make us truncate its target.
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _read_pid(fd)
            os.close(fd)
            who = f"pid {pid}" if pid else "starting, pid not yet written"
            raise HomeLocked(f"another llmos kernel ({who}) is running on {home}; "
                             f"stop it with `llmos down --home {home}` first", detail={"pid": pid}) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return cls(path, fd)

    def release(self) -> None:
        """Empty the file, then unlock (closing drops the flock). Idempotent."""
        if self._fd < 0:
            return
        fd, self._fd = self._fd, -1
        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass  # a full or read-only disk must not keep the lock held
        finally:
            os.close(fd)

    def __enter__(self) -> "KernelLock":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()
