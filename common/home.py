"""Where a running llmos keeps its files: `LLMOS_HOME` (default ``~/.llmos``)."""

from __future__ import annotations

import os
from pathlib import Path


def llmos_home(home: str | os.PathLike[str] | None = None) -> Path:
    if home is not None:
        return Path(home).expanduser().resolve()
    env = os.environ.get("LLMOS_HOME")
    return Path(env).expanduser().resolve() if env else Path.home() / ".llmos"


def run_dir(home: Path) -> Path:
    return home / "run"


def front_endpoint(home: Path) -> str:
    """The clients' endpoint; overridden by `LLMOS_FRONT` for tcp:// set-ups."""
    return os.environ.get("LLMOS_FRONT") or f"ipc://{run_dir(home) / 'front.sock'}"


def back_endpoint(home: Path) -> str:
    return os.environ.get("LLMOS_BACK") or f"ipc://{run_dir(home) / 'back.sock'}"


def pid_file(home: Path) -> Path:
    return run_dir(home) / "kernel.pid"


def lock_file(home: Path) -> Path:
    """Locked (flock) by the one kernel serving this home, for its whole life;
    it holds that kernel's pid (kernel/homelock.py)."""
    return run_dir(home) / "kernel.lock"


def logs_dir(home: Path) -> Path:
    return home / "logs"


def child_output_path(home: Path, instance: str) -> Path:
    """A child's own stdout and stderr when `llmos up` shows its console
    (what never went through the JSON logger: a traceback before it started)."""
    return logs_dir(home) / f"{instance}.out"


def security_dir(home: Path) -> Path:
    """Key material and security state (0700; every file in it 0600)."""
    return home / "security"


def root_key_path(home: Path) -> Path:
    """The HMAC root key capability tokens are minted and verified with."""
    return security_dir(home) / "root.key"


def revocations_path(home: Path) -> Path:
    return security_dir(home) / "revoked.json"


def admin_key_path(home: Path) -> Path:
    """The first admin's API key, written once at first boot (0600)."""
    return home / "admin.key"
