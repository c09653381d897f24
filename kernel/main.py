"""Boot: bind the kernel's sockets, start the supervised children, serve until
told to stop, then stop the children in reverse order and clean up."""

from __future__ import annotations

import os
import secrets
import signal
import sys
from pathlib import Path

import anyio

from ipc.curve import ensure_keys
from ipc.errors import LlmosError
from ipc.home import back_endpoint, front_endpoint, pid_file, run_dir
from kernel.config import Config
from kernel.guard import Guard
from kernel.launcher import Launcher, LocalLauncher
from kernel.router import Kernel
from kernel.supervisor import Supervisor
from sdk.logs import get_logger

log = get_logger()


async def run_kernel(config: Config, home: Path, launcher: Launcher | None = None,
                     config_path: Path | None = None) -> int:
    """Run until shutdown. Returns the process exit status: 0 after a requested
    shutdown, 1 after an escalation (the reason is logged and printed)."""
    rd = run_dir(home)
    rd.mkdir(parents=True, exist_ok=True)
    os.chmod(rd, 0o700)
    front = config.kernel.front or front_endpoint(home)
    back = config.kernel.back or back_endpoint(home)
    secret = secrets.token_hex(32)
    kernel = Kernel(config.kernel, front, back, secret)
    if config.kernel.auth:
        try:
            kernel.guard = await anyio.to_thread.run_sync(Guard.load, home, kernel.registry.service_of_instance)
        except (OSError, ValueError, LlmosError) as exc:
            log.error("kernel.auth_failed", error=str(exc))
            print(f"llmos: cannot enable auth: {exc}", file=sys.stderr)
            return 2
    if front.startswith("tcp://") or back.startswith("tcp://"):
        kernel.curve = await anyio.to_thread.run_sync(ensure_keys, home)
    supervisor = Supervisor(
        config.supervisor, config.children, launcher or LocalLauncher(),
        env={"LLMOS_HOME": str(home), "LLMOS_BACK": back, "LLMOS_FRONT": front, "LLMOS_BOOT_SECRET": secret,
             **({"LLMOS_CONFIG": str(config_path.resolve())} if config_path else {})},
        on_exit=kernel.instance_down, on_escalate=lambda reason: kernel.request_shutdown(f"escalation: {reason}"))
    kernel.supervisor = supervisor
    kernel.registry.known.update(supervisor.service_names)
    kernel.registry.instance_names.update(c.instance for c in supervisor.children)
    pf = pid_file(home)
    pf.write_text(str(os.getpid()))
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(kernel.serve)
            tg.start_soon(_on_signals, kernel)
            tg.start_soon(_start_children, supervisor)
            await kernel.shutdown_requested.wait()
            log.info("kernel.stopping", reason=kernel.shutdown_reason)
            with anyio.CancelScope(shield=True):
                await supervisor.stop_all()
            tg.cancel_scope.cancel()
    finally:
        pf.unlink(missing_ok=True)
    if supervisor.escalation:
        log.error("kernel.escalated", reason=supervisor.escalation)
        return 1
    log.info("kernel.stopped")
    return 0


async def _start_children(supervisor: Supervisor) -> None:
    await supervisor.run()


async def _on_signals(kernel: Kernel) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for sig in signals:
            kernel.request_shutdown(f"signal {signal.Signals(sig).name}")
