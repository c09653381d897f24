"""Boot: bind the kernel's sockets, start the supervised children, serve until
told to stop, then stop the children in reverse order and clean up. The
caller holds the home's `KernelLock` throughout (kernel/__main__.py `boot`)."""

from __future__ import annotations

import os
import secrets
import signal
import sys
from functools import partial
from pathlib import Path

import anyio

from common.curvekeys import ensure_keys
from ipc.curve import KeyRing
from ipc.errors import LlmosError, Unavailable
from common.home import admin_key_path, back_endpoint, front_endpoint, logs_dir, pid_file, run_dir
from ipc.sockets import prepare_ipc_path
from kernel.config import Config
from kernel.console import Console
from kernel.guard import Guard
from kernel.launcher import Launcher, LocalLauncher
from kernel.router import Kernel
from kernel.supervisor import Supervisor
from common.logs import get_logger

log = get_logger()

REAP_TIMEOUT_S = 5.0


async def run_kernel(config: Config, home: Path, launcher: Launcher | None = None,
                     config_path: Path | None = None, console: Console | None = None) -> int:
    """Run until shutdown. Returns the process exit status: 0 after a requested
    shutdown, 1 after an escalation (the reason is logged and printed).
    Returns only once every child it started has exited and its sockets are gone."""
    console = console or Console(None)
    rd = run_dir(home)
    rd.mkdir(parents=True, exist_ok=True)
    os.chmod(rd, 0o700)
    front = config.kernel.front or front_endpoint(home)
    back = config.kernel.back or back_endpoint(home)
    for ep in (front, back):
        try:
            prepare_ipc_path(ep)  # before anything starts: a live path is another process's
        except Unavailable as exc:
            log.error("kernel.endpoint_in_use", endpoint=ep)
            print(f"llmos: {exc.message}", file=sys.stderr)
            return 1
    secret = secrets.token_hex(32)
    kernel = Kernel(config.kernel, front, back, secret)
    if config.kernel.auth:
        try:
            kernel.router.guard = await anyio.to_thread.run_sync(Guard.load, home,
                                                                  kernel.router.registry.service_of_instance)
        except (OSError, ValueError, LlmosError) as exc:
            log.error("kernel.auth_failed", error=str(exc))
            print(f"llmos: cannot enable auth: {exc}", file=sys.stderr)
            return 2
    if front.startswith("tcp://") or back.startswith("tcp://"):
        kernel.curve = await anyio.to_thread.run_sync(ensure_keys, home)
        # The keys admitted on each socket, and a keypair issued to each child incarnation.
        kernel.router.keyring = await anyio.to_thread.run_sync(KeyRing, kernel.curve)
    supervisor = Supervisor(
        config.supervisor, config.children, launcher or LocalLauncher(),
        env={"LLMOS_HOME": str(home), "LLMOS_BACK": back, "LLMOS_FRONT": front, "LLMOS_BOOT_SECRET": secret,
             **({"LLMOS_CONFIG": str(config_path.resolve())} if config_path else {}),
             **config.child_env(config_path.resolve() if config_path else None)},
        on_exit=partial(_on_exit, kernel, console),
        on_escalate=lambda reason: kernel.request_shutdown(f"escalation: {reason}"),
        keyring=kernel.router.keyring if back.startswith("tcp://") else None)
    kernel.router.children = supervisor
    kernel.router.registry.known.update(supervisor.service_names)
    kernel.router.registry.instance_names.update(c.instance for c in supervisor.children)
    pf = pid_file(home)
    pf.write_text(str(os.getpid()))
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(kernel.serve)
            console.banner(home, front, logs_dir(home), admin_key_path(home) if config.kernel.auth else None,
                           os.getpid())
            tg.start_soon(_on_signals, kernel)
            tg.start_soon(_start_children, supervisor)
            if console.out is not None:
                tg.start_soon(console.watch, supervisor, kernel.router.registry)
            await kernel.shutdown_requested.wait()
            log.info("kernel.stopping", reason=kernel.shutdown_reason)
            console.stopping(kernel.shutdown_reason or "requested")
            with anyio.CancelScope(shield=True):
                await supervisor.stop_all()
            tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            await _reap(supervisor)
        pf.unlink(missing_ok=True)
    if supervisor.escalation:
        log.error("kernel.escalated", reason=supervisor.escalation)
        console.stopped(1, supervisor.escalation)
        return 1
    log.info("kernel.stopped")
    console.stopped(0, "")
    return 0


def _on_exit(kernel: Kernel, console: Console, instance: str, reason: str) -> None:
    kernel.router.instance_down(instance, reason)
    console.exited(instance, reason)


async def _reap(supervisor: Supervisor) -> None:
    """Kill and wait for any child still running: one spawned while the
    children were being stopped, or a stop that failed. The kernel must not
    exit (and free its home) with a child of its own still alive."""
    for child in supervisor.children:
        proc = child.process
        if proc is None or proc.returncode is not None:
            continue
        log.warning("kernel.reaping", instance=child.instance, pid=proc.pid)
        try:
            proc.kill()
        except ProcessLookupError:
            pass
        with anyio.move_on_after(REAP_TIMEOUT_S):
            await proc.wait()


async def _start_children(supervisor: Supervisor) -> None:
    await supervisor.run()


async def _on_signals(kernel: Kernel) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for sig in signals:
            kernel.request_shutdown(f"signal {signal.Signals(sig).name}")
