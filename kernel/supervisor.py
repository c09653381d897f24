"""The supervisor: starts children in order, restarts them by policy, escalates.

Erlang/OTP semantics: restart types permanent / transient / temporary,
strategies one_for_one / rest_for_one, restart intensity per child. The tree
(docs/architecture.md): the kernel is the root; each child is a subtree of
its own with its own intensity. Past it, a significant child (the core:
security, memory, drivers, scheduler) escalates: every child is stopped in
reverse start order and the kernel exits non-zero with the reason; an
optional one (`significant = false`: the gateway, test services) is given up
alone ("failed") and the rest keep serving. A child that exits EX_CONFIG
failed for a reason restarting cannot fix: it is not retried, and its
one-line reason is what escalates. Restarts back off exponentially up to a
cap (MINIX 3's reincarnation server).
"""

from __future__ import annotations

import hmac
import secrets
import signal
import time
from collections import deque
from dataclasses import dataclass, field
from enum import StrEnum
from functools import partial
from pathlib import Path
from typing import Callable

import anyio

from ipc.curve import CURVE_PUBLIC_ENV, CURVE_SECRET_ENV, CURVE_SERVER_ENV, KeyRing
from ipc.errors import EX_CONFIG, BadRequest, NotFound
from common.home import run_dir
from ipc.protocol import kernel as kp
from ipc.protocol.kernel import ChildState
from kernel.config import ChildSpec, Restart, Strategy, SupervisorConfig
from kernel import procstat
from kernel.launcher import ChildProcess, Launcher
from kernel.procstat import ProcSample
from common.logs import get_logger

log = get_logger()


@dataclass(eq=False)
class Child:
    spec: ChildSpec
    instance: str
    index: int  # position in start order
    process: ChildProcess | None = None
    state: ChildState = ChildState.STOPPED
    restarts: int = 0
    started_at: float = 0.0
    last_exit: str = ""  # str(Exit), or the reason it escalated with
    restart_times: deque[float] = field(default_factory=deque)
    # Set when a sibling's death (rest_for_one) or an operator stop, not a
    # fault of this child, ends the current process.
    sibling_restart: bool = False
    stopping: bool = False
    # The boot secret of the running incarnation (its READY must carry it):
    # a fresh one per start, "" once it exited, so a replaced or dead
    # incarnation's secret registers nothing.
    secret: str = ""


class ExitKind(StrEnum):
    NORMAL = "normal"  # exit 0
    CRASHED = "crashed"  # another exit status
    CONFIG = "config"  # EX_CONFIG: a setting restarting cannot fix
    SIGNALLED = "signalled"
    STARTUP_TIMEOUT = "startup_timeout"  # killed for not being READY in time
    SPAWN_FAILED = "spawn_failed"


@dataclass(frozen=True)
class Exit:
    """Why a child's process ended: the kind decides what the supervisor
    does; `str()` is the line `llmos ps` and the logs show."""

    kind: ExitKind
    code: int = 0  # the exit status, or the signal number
    detail: str = ""  # the startup timeout, the spawn error, the child's own reason

    @classmethod
    def of_returncode(cls, rc: int) -> Exit:
        if rc < 0:
            return cls(ExitKind.SIGNALLED, -rc)
        if rc == EX_CONFIG:
            return cls(ExitKind.CONFIG, rc)
        return cls(ExitKind.NORMAL if rc == 0 else ExitKind.CRASHED, rc)

    def __str__(self) -> str:
        match self.kind:
            case ExitKind.SIGNALLED:
                try:
                    return f"killed by {signal.Signals(self.code).name}"
                except ValueError:
                    return f"killed by signal {self.code}"
            case ExitKind.STARTUP_TIMEOUT:
                return f"not ready within {self.detail}s"
            case ExitKind.SPAWN_FAILED:
                return f"spawn failed: {self.detail}"
            case ExitKind.CONFIG if self.detail:
                return self.detail
            case _:
                return f"exit {self.code}"


# A child that stays down: "dead" escalated, "failed" was given up alone.
TERMINAL = (ChildState.STOPPED, ChildState.DEAD, ChildState.FAILED)
ALIVE = (ChildState.STARTING, ChildState.READY)


def exit_reason_path(env: dict[str, str], instance: str) -> Path | None:
    """Where a child writes the one-line reason of a permanent failure
    (sdk/service.py `EXIT_REASON_ENV`)."""
    home = env.get("LLMOS_HOME")
    return run_dir(Path(home)) / "exits" / f"{instance}.reason" if home else None


def read_exit_reason(path: Path | None) -> str:
    try:
        text = path.read_text(errors="replace") if path is not None else ""
    except OSError:
        text = ""
    line = " ".join(text.split())[:1000]
    return line or f"exit {EX_CONFIG}: a setting restarting cannot fix (see its log)"


class Supervisor:
    def __init__(self, config: SupervisorConfig, children: list[ChildSpec], launcher: Launcher,
                 env: dict[str, str], on_exit: Callable[[str, str], None],
                 on_escalate: Callable[[str], None], keyring: KeyRing | None = None):
        """`keyring`: with a tcp:// back socket, each incarnation is issued a
        CURVE keypair of its own (ipc/curve.py), in its environment with its
        boot secret, and its key is revoked when it exits."""
        self.config = config
        self.keyring = keyring
        self.launcher = launcher
        self.env = env
        self.on_exit = on_exit  # (instance, reason): the kernel forgets it at once
        self.on_escalate = on_escalate
        self.children: list[Child] = []
        for spec in children:
            for i in range(spec.instances):
                name = spec.name if spec.instances == 1 else f"{spec.name}-{i}"
                self.children.append(Child(spec, name, len(self.children)))
        self.escalation: str | None = None
        self._changed = anyio.Event()
        self.sleep = anyio.sleep  # the backoff clock (tests observe it)

    @property
    def service_names(self) -> set[str]:
        return {c.spec.service_name for c in self.children}

    def _bump(self) -> None:
        """Wake everyone waiting for a child's state to change."""
        ev, self._changed = self._changed, anyio.Event()
        ev.set()

    async def _until(self, cond: Callable[[], bool]) -> None:
        while not cond():
            await self._changed.wait()

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Start every child in order, each READY before the next starts, then
        keep them alive until cancelled. Reports `started` once all are up."""
        async with anyio.create_task_group() as tg:
            for child in self.children:
                tg.start_soon(self._keep_alive, child)
                await self._until(partial(self._ready_or_escalated, child))
                if self.escalation:
                    break
            task_status.started()

    def _ready_or_escalated(self, child: Child) -> bool:
        # "stopped" is also where a child starts: it counts once it has run.
        done = child.state in (ChildState.DEAD, ChildState.FAILED) or (
            child.state == ChildState.STOPPED and bool(child.last_exit))
        return child.state == ChildState.READY or done or self.escalation is not None

    def on_ready(self, instance: str, pid: int) -> None:
        for c in self.children:
            if c.instance == instance and c.process is not None and c.process.pid == pid:
                c.state = ChildState.READY
                self._bump()

    async def _keep_alive(self, child: Child) -> None:
        spec = child.spec
        while True:
            if self.config.strategy == Strategy.REST_FOR_ONE:
                earlier = self.children[:child.index]
                await self._until(lambda: all(e.state == ChildState.READY for e in earlier) or child.stopping)
            if child.stopping:
                return
            child.state = ChildState.STARTING
            self._bump()
            child.secret = secrets.token_hex(32)
            env = {**self.env, "LLMOS_SERVICE": spec.name, "LLMOS_INSTANCE": child.instance,
                   "LLMOS_BOOT_SECRET": child.secret}
            key = b""
            if self.keyring is not None:
                key, key_secret = self.keyring.issue(child.instance)
                env |= {CURVE_PUBLIC_ENV: key.decode(), CURVE_SECRET_ENV: key_secret.decode(),
                        CURVE_SERVER_ENV: self.keyring.server_public.decode()}
            reason_file = exit_reason_path(self.env, child.instance)
            if reason_file is not None:
                await anyio.to_thread.run_sync(_fresh, reason_file)
                env["LLMOS_EXIT_REASON"] = str(reason_file)
            try:
                child.process = await self.launcher.spawn(spec, child.instance, env)
            except OSError as exc:
                exit = Exit(ExitKind.SPAWN_FAILED, detail=str(exc))
            else:
                child.started_at = time.monotonic()
                log.info("supervisor.started", instance=child.instance, pid=child.process.pid)
                exit = await self._wait_exit(child, child.process)
                if exit.kind == ExitKind.CONFIG and not child.stopping:
                    exit = Exit(ExitKind.CONFIG, exit.code,
                                await anyio.to_thread.run_sync(read_exit_reason, reason_file))
            reason = str(exit)
            child.secret = ""
            if self.keyring is not None:
                self.keyring.revoke(child.instance, key)
            child.last_exit = reason
            self.on_exit(child.instance, reason)
            if child.stopping:
                child.state = ChildState.STOPPED
                self._bump()
                return
            if child.sibling_restart:
                child.sibling_restart = False
                continue
            log.warning("supervisor.exited", instance=child.instance, reason=reason)
            if spec.restart == Restart.TEMPORARY or (spec.restart == Restart.TRANSIENT
                                                     and exit.kind == ExitKind.NORMAL):
                child.state = ChildState.STOPPED
                self._bump()
                return
            if exit.kind == ExitKind.CONFIG:
                self._give_up(child, f"{child.instance} failed and will not be restarted: {reason}")
                return
            if self.config.strategy == Strategy.REST_FOR_ONE:
                self._restart_later_siblings(child)
            now = time.monotonic()
            child.restart_times.append(now)
            while child.restart_times and now - child.restart_times[0] > spec.period_s:
                child.restart_times.popleft()
            if len(child.restart_times) > spec.intensity:
                self._give_up(child, f"{child.instance} restarted more than {spec.intensity} times in "
                                     f"{spec.period_s:g}s (last: {reason})")
                return
            child.restarts += 1
            child.state = ChildState.BACKOFF
            self._bump()
            await self.sleep(min(self.config.backoff_initial_s * 2 ** (len(child.restart_times) - 1),
                                  self.config.backoff_max_s))

    async def _wait_exit(self, child: Child, proc: ChildProcess) -> Exit:
        """Wait for the process to exit; kill it if it is not READY in time."""
        timed_out = False
        async with anyio.create_task_group() as tg:
            async def watchdog() -> None:
                nonlocal timed_out
                with anyio.move_on_after(child.spec.startup_timeout_s):
                    await self._until(lambda: child.state != ChildState.STARTING)
                    return
                timed_out = True
                log.error("supervisor.startup_timeout", instance=child.instance)
                _signal(proc, signal.SIGKILL)
            tg.start_soon(watchdog)
            rc = await proc.wait()
            tg.cancel_scope.cancel()
        if timed_out:
            return Exit(ExitKind.STARTUP_TIMEOUT, signal.SIGKILL, f"{child.spec.startup_timeout_s:g}")
        return Exit.of_returncode(rc)

    def _give_up(self, child: Child, reason: str) -> None:
        """Past its intensity, or failed permanently: a significant child
        takes the system down with it, an optional one stops alone."""
        if child.spec.significant:
            child.state = ChildState.DEAD
            self.escalate(reason)
            return
        child.state = ChildState.FAILED
        log.error("supervisor.gave_up", instance=child.instance, reason=reason)
        self._bump()

    def _restart_later_siblings(self, child: Child) -> None:
        for sib in self.children[child.index + 1:]:
            if sib.process is not None and sib.state in ALIVE:
                sib.sibling_restart = True
                _signal(sib.process, signal.SIGTERM)

    def escalate(self, reason: str) -> None:
        log.error("supervisor.escalating", reason=reason)
        self.escalation = self.escalation or reason
        self._bump()
        self.on_escalate(reason)

    def admits(self, instance: str, secret: str) -> bool:
        """Whether a READY for `instance` with `secret` comes from a current
        incarnation: a supervised instance's own, any other name's from some
        running child (a service a child started itself)."""
        mine = [c.secret for c in self.children if c.instance == instance]
        live = mine or [c.secret for c in self.children]
        return any(s and hmac.compare_digest(s.encode(), secret.encode()) for s in live)

    def kill(self, target: str, sig_name: str = "SIGKILL") -> list[str]:
        try:
            sig = signal.Signals[sig_name]
        except KeyError:
            raise BadRequest(f"unknown signal {sig_name!r}") from None
        hits = [c for c in self.children if target in (c.instance, c.spec.name, c.spec.service_name)]
        if not hits:
            raise NotFound(f"no supervised service or instance named {target!r}")
        killed = []
        for c in hits:
            if c.process is not None and c.state in ALIVE:
                _signal(c.process, sig)
                killed.append(c.instance)
        return killed

    def sample(self, instance: str, pid: int) -> ProcSample | None:
        """/proc's view of a child this supervisor runs on this host with `pid`
        (none once it exited: the pid may be another process's by then)."""
        if not self.launcher.local:
            return None
        for c in self.children:
            p = c.process
            if c.instance == instance and p is not None and p.pid == pid and p.returncode is None:
                return procstat.sample(pid)
        return None

    def kill_quietly(self, instance: str, pid: int) -> None:
        """SIGKILL one instance if it is still the process with `pid`."""
        for c in self.children:
            if c.instance == instance and c.process is not None and c.process.pid == pid:
                _signal(c.process, signal.SIGKILL)

    async def stop_all(self) -> None:
        """Stop children in reverse start order: SIGTERM, then SIGKILL after the timeout."""
        for child in self.children:
            child.stopping = True
        self._bump()
        for child in reversed(self.children):
            proc = child.process
            if proc is None or child.state in TERMINAL:
                continue
            _signal(proc, signal.SIGTERM)
            with anyio.move_on_after(child.spec.shutdown_timeout_s) as scope:
                await proc.wait()
            if scope.cancelled_caught:
                log.warning("supervisor.kill_after_timeout", instance=child.instance)
                _signal(proc, signal.SIGKILL)
                with anyio.CancelScope(shield=True):
                    await proc.wait()
            child.state = ChildState.STOPPED
        self._bump()

    def describe(self) -> list[kp.InstanceInfo]:
        now = time.monotonic()
        out = []
        for c in self.children:
            alive = c.state in ALIVE
            out.append(kp.InstanceInfo(
                c.spec.service_name, c.instance, c.process.pid if c.process and alive else 0, c.state,
                restarts=c.restarts, uptime_s=now - c.started_at if alive else 0.0, last_exit=c.last_exit))
        return out


def _fresh(path: Path) -> None:
    """No reason left over from an earlier incarnation."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.unlink(missing_ok=True)


def _signal(proc: ChildProcess, sig: int) -> None:
    try:
        proc.send_signal(sig)
    except ProcessLookupError:
        pass
