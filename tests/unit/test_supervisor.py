"""Supervisor policy with an in-memory launcher: no processes, no sockets."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
from pathlib import Path
from typing import Callable

import anyio
import pytest

from ipc.errors import EX_CONFIG, NotFound
from kernel.config import ChildSpec, Restart, Strategy, SupervisorConfig
from kernel.supervisor import Exit, ExitKind, Supervisor

_pids = itertools.count(1000)


class FakeProcess:
    def __init__(self, instance: str):
        self.instance = instance
        self.pid = next(_pids)
        self.rc: int | None = None
        self._done = anyio.Event()
        self.signals: list[int] = []

    def exit(self, rc: int) -> None:
        if self.rc is None:
            self.rc = rc
            self._done.set()

    async def wait(self) -> int:
        await self._done.wait()
        assert self.rc is not None
        return self.rc

    def send_signal(self, sig: int) -> None:
        self.signals.append(sig)
        self.exit(-sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    @property
    def returncode(self) -> int | None:
        return self.rc


class FakeLauncher:
    """Spawns FakeProcesses; `behaviour[instance]` says what a new one does."""

    local = False  # its pids are not this host's

    def __init__(self) -> None:
        self.spawned: list[FakeProcess] = []
        self.supervisor: Supervisor | None = None
        self.behaviour: dict[str, str] = {}  # "ready" (default) | "crash" | "hang" | "config"
        self.log: list[str] = []

    async def spawn(self, spec: ChildSpec, instance: str, env: dict[str, str]) -> FakeProcess:
        p = FakeProcess(instance)
        self.spawned.append(p)
        self.log.append(f"start {instance}")
        assert env["LLMOS_INSTANCE"] == instance and "LLMOS_BOOT_SECRET" in env
        what = self.behaviour.get(instance, "ready")
        sup = self.supervisor
        assert sup is not None
        if what == "ready":
            # READY arrives over the socket after spawn returns, never during it
            asyncio.get_running_loop().call_soon(sup.on_ready, instance, p.pid)
        elif what == "crash":
            p.exit(1)
        elif what == "config":  # sdk/service.py: a ConfigError's reason, then EX_CONFIG
            Path(env["LLMOS_EXIT_REASON"]).write_text("no CUDA here\n")
            p.exit(EX_CONFIG)
        return p

    def live(self, instance: str) -> FakeProcess:
        return [p for p in self.spawned if p.instance == instance and p.rc is None][-1]

    def starts(self, instance: str) -> int:
        return sum(1 for p in self.spawned if p.instance == instance)


def make(children: list[ChildSpec], strategy: Strategy = Strategy.ONE_FOR_ONE,
         backoff: float = 0.001) -> tuple[Supervisor, FakeLauncher, list[str], list[str]]:
    launcher = FakeLauncher()
    exits: list[str] = []
    escalations: list[str] = []
    sup = Supervisor(SupervisorConfig(strategy=strategy, backoff_initial_s=backoff, backoff_max_s=backoff * 8),
                     children, launcher,  # type: ignore[arg-type]
                     env={"LLMOS_BOOT_SECRET": "s"}, on_exit=lambda i, r: exits.append(f"{i}: {r}"),
                     on_escalate=escalations.append)
    launcher.supervisor = sup
    return sup, launcher, exits, escalations


async def until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    with anyio.fail_after(timeout):
        while not cond():
            await anyio.sleep(0.001)


def state(sup: Supervisor, instance: str) -> str:
    return next(c.state for c in sup.children if c.instance == instance)


async def test_children_start_in_order_each_ready_first() -> None:
    sup, launcher, _, _ = make([ChildSpec("a", "m"), ChildSpec("b", "m", instances=2), ChildSpec("c", "m")])
    async with anyio.create_task_group() as tg:
        await tg.start(sup.run)
        assert launcher.log == ["start a", "start b-0", "start b-1", "start c"]
        await sup.stop_all()
        tg.cancel_scope.cancel()
    assert all(p.signals == [signal.SIGTERM] for p in launcher.spawned)
    assert [c.state for c in sup.children] == ["stopped"] * 4


async def test_stop_all_terminates_in_reverse_start_order() -> None:
    sup, launcher, exits, _ = make([ChildSpec("a", "m"), ChildSpec("b", "m"), ChildSpec("c", "m")])
    async with anyio.create_task_group() as tg:
        await tg.start(sup.run)
        await sup.stop_all()
        tg.cancel_scope.cancel()
    assert [e.split(":")[0] for e in exits] == ["c", "b", "a"]


async def test_permanent_child_is_restarted_and_counted() -> None:
    sup, launcher, exits, escalations = make([ChildSpec("a", "m")])
    async with anyio.create_task_group() as tg:
        await tg.start(sup.run)
        first = launcher.live("a")
        assert sup.kill("a") == ["a"]
        await until(lambda: launcher.starts("a") == 2 and state(sup, "a") == "ready")
        assert first.signals == [signal.SIGKILL]
        info = sup.describe()[0]
        assert info.restarts == 1 and info.last_exit == "killed by SIGKILL" and info.pid != first.pid
        await sup.stop_all()
        tg.cancel_scope.cancel()
    assert escalations == []


@pytest.mark.parametrize("restart, rc, restarted", [
    (Restart.TRANSIENT, 0, False), (Restart.TRANSIENT, 3, True),
    (Restart.TEMPORARY, 3, False), (Restart.PERMANENT, 0, True),
])
async def test_restart_types(restart: Restart, rc: int, restarted: bool) -> None:
    sup, launcher, _, _ = make([ChildSpec("a", "m", restart=restart)])
    async with anyio.create_task_group() as tg:
        await tg.start(sup.run)
        launcher.live("a").exit(rc)
        if restarted:
            await until(lambda: launcher.starts("a") == 2 and state(sup, "a") == "ready")
        else:
            await until(lambda: state(sup, "a") == "stopped")
            assert launcher.starts("a") == 1
        await sup.stop_all()
        tg.cancel_scope.cancel()


async def test_restart_intensity_escalates_with_the_reason() -> None:
    sup, launcher, _, escalations = make([ChildSpec("ok", "m"), ChildSpec("bad", "m", intensity=3, period_s=60)])
    async with anyio.create_task_group() as tg:
        await tg.start(sup.run)
        launcher.behaviour["bad"] = "crash"
        launcher.live("bad").exit(1)
        await until(lambda: bool(escalations))
        # the first exit plus 3 restarts that crash again: the 4th exit exceeds intensity 3
        assert launcher.starts("bad") == 4
        assert "bad restarted more than 3 times in 60s" in escalations[0]
        assert state(sup, "bad") == "dead"
        await sup.stop_all()
        tg.cancel_scope.cancel()


async def test_restart_backoff_grows_exponentially_and_is_capped() -> None:
    sup, launcher, _, escalations = make([ChildSpec("bad", "m", intensity=50, period_s=60)], backoff=0.01)
    launcher.behaviour["bad"] = "crash"
    delays: list[float] = []
    real_sleep = anyio.sleep

    async def recording_sleep(d: float) -> None:
        delays.append(d)
        await real_sleep(0)

    sup.sleep = recording_sleep  # type: ignore[method-assign]
    async with anyio.create_task_group() as tg:
        tg.start_soon(sup.run)
        await until(lambda: len(delays) >= 6)
        await sup.stop_all()
        tg.cancel_scope.cancel()
    assert delays[:6] == [0.01, 0.02, 0.04, 0.08, 0.08, 0.08]
    assert escalations == []


async def test_rest_for_one_restarts_later_siblings_only() -> None:
    sup, launcher, _, _ = make([ChildSpec("a", "m"), ChildSpec("b", "m"), ChildSpec("c", "m")],
                               strategy=Strategy.REST_FOR_ONE)
    async with anyio.create_task_group() as tg:
        await tg.start(sup.run)
        launcher.live("b").exit(1)
        await until(lambda: launcher.starts("b") == 2 and launcher.starts("c") == 2
                    and all(c.state == "ready" for c in sup.children))
        assert launcher.starts("a") == 1
        # c's restart was caused by b, so only b's counts
        assert [c.restarts for c in sup.children] == [0, 1, 0]
        await sup.stop_all()
        tg.cancel_scope.cancel()


async def test_one_for_one_leaves_siblings_alone() -> None:
    sup, launcher, _, _ = make([ChildSpec("a", "m"), ChildSpec("b", "m"), ChildSpec("c", "m")])
    async with anyio.create_task_group() as tg:
        await tg.start(sup.run)
        launcher.live("b").exit(1)
        await until(lambda: launcher.starts("b") == 2 and state(sup, "b") == "ready")
        assert launcher.starts("a") == 1 and launcher.starts("c") == 1
        await sup.stop_all()
        tg.cancel_scope.cancel()


async def test_a_child_that_never_gets_ready_is_killed_and_counted() -> None:
    sup, launcher, exits, escalations = make([ChildSpec("slow", "m", startup_timeout_s=0.05, intensity=1)])
    launcher.behaviour["slow"] = "hang"
    async with anyio.create_task_group() as tg:
        tg.start_soon(sup.run)
        await until(lambda: bool(escalations))
        await sup.stop_all()
        tg.cancel_scope.cancel()
    assert exits[0] == "slow: not ready within 0.05s"
    assert launcher.spawned[0].signals == [signal.SIGKILL]


async def test_kill_of_unknown_service_is_not_found() -> None:
    sup, _, _, _ = make([ChildSpec("a", "m")])
    with pytest.raises(NotFound, match="nope"):
        sup.kill("nope")


async def test_a_permanent_failure_is_not_retried_and_escalates_with_its_reason(tmp_path: Path) -> None:
    """A core child that exits EX_CONFIG (bad config, no CUDA) stops the system
    at once, with the child's own one-line reason, instead of six restarts."""
    sup, launcher, _, escalations = make([ChildSpec("a", "m"), ChildSpec("cuda", "m")])
    sup.env["LLMOS_HOME"] = str(tmp_path)
    launcher.behaviour["cuda"] = "config"
    async with anyio.create_task_group() as tg:
        await tg.start(sup.run)
        await until(lambda: bool(escalations))
        tg.cancel_scope.cancel()
    assert launcher.starts("cuda") == 1
    assert escalations == ["cuda failed and will not be restarted: no CUDA here"]
    assert state(sup, "cuda") == "dead"


async def test_an_optional_child_past_its_intensity_stops_alone() -> None:
    sup, launcher, _, escalations = make([ChildSpec("a", "m"),
                                          ChildSpec("flaky", "m", intensity=2, significant=False),
                                          ChildSpec("c", "m")])
    launcher.behaviour["flaky"] = "crash"
    async with anyio.create_task_group() as tg:
        await tg.start(sup.run)  # the boot goes on past the optional child
        await until(lambda: state(sup, "flaky") == "failed")
        assert launcher.starts("flaky") == 3 and not escalations
        assert state(sup, "a") == "ready" and state(sup, "c") == "ready"
        await sup.stop_all()
        tg.cancel_scope.cancel()


@pytest.mark.parametrize(("rc", "kind", "text"), [
    (0, ExitKind.NORMAL, "exit 0"),
    (3, ExitKind.CRASHED, "exit 3"),
    (EX_CONFIG, ExitKind.CONFIG, f"exit {EX_CONFIG}"),
    (-signal.SIGKILL, ExitKind.SIGNALLED, "killed by SIGKILL"),
    (-77, ExitKind.SIGNALLED, "killed by signal 77"),
])
def test_an_exit_status_is_classified_and_shown_as_before(rc: int, kind: ExitKind, text: str) -> None:
    exit = Exit.of_returncode(rc)
    assert exit.kind == kind and str(exit) == text
    # the child's own reason replaces the status where it wrote one
    assert str(Exit(ExitKind.CONFIG, EX_CONFIG, "no CUDA device")) == "no CUDA device"
    assert str(Exit(ExitKind.STARTUP_TIMEOUT, signal.SIGKILL, "2.5")) == "not ready within 2.5s"


async def test_the_host_is_asked_only_about_a_live_local_child_with_that_pid() -> None:
    """What spares a silent instance as starved (kernel/liveness.py) is read
    from /proc only for this supervisor's own live child on this host: never
    for another instance's pid, a remote launcher's pid, or one that exited
    (its pid may be another process's by then)."""
    sup, launcher, _, _ = make([ChildSpec("a", "m"), ChildSpec("b", "m")])
    async with anyio.create_task_group() as tg:
        await tg.start(sup.run)
        a = launcher.live("a")
        a.pid = os.getpid()  # a process /proc can describe
        assert sup.sample("a", a.pid) is None  # a remote launcher's pid means nothing here
        launcher.local = True
        assert sup.sample("a", a.pid) is not None
        assert sup.sample("b", a.pid) is None and sup.sample("a", a.pid + 1) is None
        await sup.stop_all()
        assert a.rc is not None and sup.sample("a", a.pid) is None
        tg.cancel_scope.cancel()
