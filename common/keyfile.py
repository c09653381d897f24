"""Owner-only files for key material and security state.

Writes are atomic (a 0600 temporary file renamed over the target), so a
reader never sees half a key and a crash never leaves one.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

ROOT_KEY_BYTES = 32


def private_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def write_private(path: Path, data: bytes) -> None:
    """Replace `path` atomically with `data`, mode 0600."""
    private_dir(path.parent)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def create_private(path: Path, data: bytes) -> bool:
    """Create `path` (0600) with `data` unless it exists; True when this call created it.
    Safe when two processes race: exactly one wins (link is atomic and never
    replaces), and no reader ever sees the file half-written."""
    private_dir(path.parent)
    if path.exists():
        return False
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, path)
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)
    return True


def load_or_create_key(path: Path, nbytes: int = ROOT_KEY_BYTES) -> bytes:
    """The random key at `path`, created on first use. A file that is readable by
    others, or too short, is refused: a leaked root key mints any capability."""
    create_private(path, secrets.token_bytes(nbytes).hex().encode())
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise PermissionError(f"{path} is readable by others (mode {mode:o}); chmod 600 it")
    try:
        key = bytes.fromhex(path.read_text().strip())
    except ValueError:
        raise ValueError(f"{path} does not hold a hex key") from None
    if len(key) < 16:
        raise ValueError(f"{path} holds a key of {len(key)} bytes; at least 16 are needed")
    return key
