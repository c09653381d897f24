"""How children are spawned. The supervisor decides *when* (policy); a
`Launcher` decides *how and where* (mechanism): local subprocesses now, a
cluster launcher later, behind the same interface."""

from __future__ import annotations

import os
import subprocess
import sys
from abc import ABC, abstractmethod
from typing import Protocol, cast

import anyio

from kernel.config import ChildSpec


class ChildProcess(Protocol):
    @property
    def pid(self) -> int: ...

    async def wait(self) -> int: ...

    def send_signal(self, sig: int) -> None: ...

    def kill(self) -> None: ...


class Launcher(ABC):
    @abstractmethod
    async def spawn(self, spec: ChildSpec, instance: str, env: dict[str, str]) -> ChildProcess:
        """Start one instance of `spec`; `env` carries the boot secret and endpoints."""


class LocalLauncher(Launcher):
    """Each child is `python -m MODULE ARGS...` on this machine (spawn, never fork),
    sharing the kernel's stderr so its log lines show in the terminal."""

    def __init__(self, python: str = sys.executable):
        self.python = python

    async def spawn(self, spec: ChildSpec, instance: str, env: dict[str, str]) -> ChildProcess:
        full_env = {**os.environ, **spec.env, **env}
        proc = await anyio.open_process(
            [self.python, "-m", spec.module, *spec.args],
            env=full_env,
            stdin=subprocess.DEVNULL,
            stdout=None,
            stderr=None,
            start_new_session=True,  # a ^C to the kernel's terminal reaches the kernel only
        )
        return cast(ChildProcess, proc)
