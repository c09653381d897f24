"""Boot a real llmos for tests: a kernel process with the given children.

    async with running_llmos(tmp_path, children=[ChildSpec("echo", "services.echo")]) as sys:
        reply = await sys.client.call("echo", Echo(b"hi"))

On exit it asks the kernel to shut down and checks that the kernel exited and
removed its sockets; `sys.kernel` is the kernel's `subprocess.Popen`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import anyio
import msgspec

from common.config.launcher import LauncherConfig
from common.config.scheduler import SchedulerConfig, TunerConfig
from common.configfile import toml_value
from ipc.errors import LlmosError
from common.home import admin_key_path, front_endpoint, run_dir
from ipc.protocol import kernel as kp
from kernel.config import ChildSpec, Config, KernelConfig, SupervisorConfig
from sdk.client import AsyncClient

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class RunningLlmos:
    home: Path
    kernel: subprocess.Popen[bytes]
    client: AsyncClient
    config_path: Path

    async def status(self) -> kp.StatusReply:
        return await self.client.status()

    async def wait_for(self, pred: Callable[[kp.StatusReply], bool], timeout: float = 30.0,
                       what: str = "condition") -> kp.StatusReply:
        """Poll status until `pred` holds (a deadline, not a sleep-paced assertion)."""
        end = time.monotonic() + timeout
        while True:
            st = await self.client.status()
            if pred(st):
                return st
            if time.monotonic() > end:
                raise TimeoutError(f"waited {timeout:g}s for {what}; last status: {st}")
            await anyio.sleep(0.05)

    def instance(self, st: kp.StatusReply, name: str) -> kp.InstanceInfo:
        for i in st.instances:
            if i.instance == name:
                return i
        raise KeyError(name)


def write_config(path: Path, config: Config) -> Path:
    raw = msgspec.to_builtins(config)
    path.write_text(_to_toml(raw))
    return path


def _to_toml(raw: dict[str, Any]) -> str:
    val = toml_value

    lines: list[str] = []

    def table(name: str, items: dict[str, Any]) -> None:
        lines.append(f"[{name}]")
        for k, v in items.items():
            if not isinstance(v, dict):
                lines.append(f"{k} = {val(v)}")
        for k, v in items.items():
            if isinstance(v, dict):
                table(f"{name}.{k}", v)

    for section in ("kernel", "supervisor", "launcher", "scheduler"):
        table(section, raw.get(section, {}))
    for child in raw.get("children", []):
        lines.append("[[children]]")
        for k, v in child.items():
            lines.append(f"{k} = {val(v)}")
    return "\n".join(lines) + "\n"


# The configured limits always (the tuner off): for tests whose point is what
# those limits do, which the tuner would move with the machine's speed.
FIXED_LIMITS = SchedulerConfig(tuner=TunerConfig(enabled=False))


@asynccontextmanager
async def running_llmos(home: Path, children: list[ChildSpec] | None = None,
                        supervisor: SupervisorConfig | None = None, kernel: KernelConfig | None = None,
                        ready_timeout: float = 60.0, expect_exit: bool = False,
                        auth: bool = False, launcher: LauncherConfig | None = None,
                        scheduler: SchedulerConfig | None = None) -> AsyncIterator[RunningLlmos]:
    """`auth` turns the kernel's capability check on (off by default here, on in
    `llmos up`); with it the default children are security and echo, and
    `client` is the local admin (logged in with admin.key). `scheduler` is the
    [scheduler] table (`FIXED_LIMITS`: the tuner off, for tests whose point is
    what the configured limits do)."""
    home.mkdir(parents=True, exist_ok=True)
    if children is None:
        children = [ChildSpec("echo", "services.echo")]
        if auth:
            children.insert(0, ChildSpec("security", "services.security"))
    config = Config(kernel=msgspec.structs.replace(kernel or KernelConfig(), auth=auth),
                    supervisor=supervisor or SupervisorConfig(), children=children,
                    launcher=launcher or LauncherConfig(), scheduler=scheduler or SchedulerConfig())
    cfg = write_config(home / "llmos.toml", config)
    log = open(home / "kernel.stderr", "ab")  # noqa: SIM115 - closed below
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    env.pop("LLMOS_FRONT", None)
    env.pop("LLMOS_BACK", None)
    proc = subprocess.Popen([sys.executable, "-m", "kernel", "--home", str(home), "--config", str(cfg)],
                            cwd=REPO_ROOT, env=env, stdout=log, stderr=log)
    client: AsyncClient | None = None
    try:
        sock = Path(front_endpoint(home)[len("ipc://"):])
        end = time.monotonic() + ready_timeout
        # With auth, the security server writes admin.key on first boot: the client logs in with it.
        while not sock.exists() or (auth and not admin_key_path(home).exists()):
            if proc.poll() is not None:
                raise RuntimeError(f"kernel exited with {proc.returncode}; see {home / 'kernel.stderr'}")
            if time.monotonic() > end:
                raise TimeoutError("kernel did not bind its socket")
            await anyio.sleep(0.02)
        client = await AsyncClient.connect(home=home)
        running = RunningLlmos(home, proc, client, cfg)
        if not expect_exit:
            await running.wait_for(lambda st: all(i.state == kp.ChildState.READY for i in st.instances), ready_timeout,
                                   "every child READY")
        yield running
    finally:
        if client is not None:
            if proc.poll() is None:
                try:
                    await client.shutdown("test finished")
                except LlmosError:
                    pass
            await client.aclose()
        try:
            await anyio.to_thread.run_sync(proc.wait, 30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
        finally:
            log.close()


def leftover_sockets(home: Path) -> list[str]:
    rd = run_dir(home)
    return sorted(p.name for p in rd.glob("*.sock")) if rd.exists() else []
