"""How children are spawned. The supervisor decides *when* (policy); a
`Launcher` decides *how and where* (mechanism): local subprocesses now, a
cluster launcher later, behind the same interface."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Protocol, cast

import anyio

from common.home import child_output_path
from common.listen import LISTEN_FD_ENV, bind_listener
from kernel.config import ChildSpec

OUTPUT_MAX_BYTES = 4 * 1024 * 1024


class ChildProcess(Protocol):
    @property
    def pid(self) -> int: ...

    async def wait(self) -> int: ...

    def send_signal(self, sig: int) -> None: ...

    def kill(self) -> None: ...

    @property
    def returncode(self) -> int | None: ...


class Launcher(ABC):
    # Its children are processes of this host (their pids are /proc's). Off
    # unless a launcher says so: a pid from another host read in this one's
    # /proc is some other process, whose state could spare a hung instance.
    local = False

    @abstractmethod
    async def spawn(self, spec: ChildSpec, instance: str, env: dict[str, str]) -> ChildProcess:
        """Start one instance of `spec`; `env` carries the boot secret and endpoints."""


class LocalLauncher(Launcher):
    """Each child is `python -m MODULE ARGS...` on this machine (spawn, never fork).

    With no `output_home`, children share the kernel's stderr, so their JSON
    log lines show in its terminal (`--log-format json`, `python -m kernel`).
    With one, the terminal is the console's: a child's JSON lines go only to
    its log file (LLMOS_LOG_STDERR=0) and whatever else it writes (a traceback
    before its logger started) to LLMOS_HOME/logs/<instance>.out."""

    local = True

    def __init__(self, python: str = sys.executable, output_home: Path | None = None):
        self.python = python
        self.output_home = output_home
        # spec.listen → its listening socket, bound at the spec's first start
        # and held for the kernel's lifetime (common/listen.py).
        self.listeners: dict[str, socket.socket] = {}

    def listener(self, address: str) -> socket.socket:
        sock = self.listeners.get(address)
        if sock is None:
            sock = self.listeners[address] = bind_listener(address)  # OSError names the address
        return sock

    async def spawn(self, spec: ChildSpec, instance: str, env: dict[str, str]) -> ChildProcess:
        full_env = {**os.environ, **spec.env, **env}
        fds: tuple[int, ...] = ()
        if spec.listen:
            fds = (self.listener(spec.listen).fileno(),)
            full_env[LISTEN_FD_ENV] = str(fds[0])
        out: int | None = None
        if self.output_home is not None:
            full_env["LLMOS_LOG_STDERR"] = "0"
            out = await anyio.to_thread.run_sync(_open_output, child_output_path(self.output_home, instance))
        try:
            proc = await anyio.open_process(
                [self.python, "-m", spec.module, *spec.args],
                env=full_env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,  # a ^C to the kernel's terminal reaches the kernel only
                pass_fds=fds,
            )
        finally:
            if out is not None:
                os.close(out)  # the child has its own copy
        return cast(ChildProcess, proc)


def _open_output(path: Path) -> int:
    """Append to `path`, first moved to `path.1` once past OUTPUT_MAX_BYTES
    (so a crash-looping child's output stays bounded: two files per instance)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        if path.stat().st_size > OUTPUT_MAX_BYTES:
            os.replace(path, path.with_name(path.name + ".1"))
    except FileNotFoundError:
        pass
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
