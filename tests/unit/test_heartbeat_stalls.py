"""A process judges a silent peer on the time its own loop ran
(`ipc.heartbeat.Stalls`): its stalls are forgiven, since what the peer sent
meanwhile may still wait unread, but only the stalls, so one whose loop is
late on every wake-up still finds a dead peer (the kernel's side is in
test_router_liveness.py)."""

from __future__ import annotations

import time
from types import SimpleNamespace

import anyio
import pytest

from ipc.envelope import Kind
from ipc.heartbeat import HEARTBEAT_EXPIRY_S, HEARTBEAT_INTERVAL_S, Stalls
from sdk import service as service_module
from sdk.service import Service


def test_a_stall_is_not_the_peers_silence_but_the_time_around_it_is() -> None:
    s = Stalls()
    s.note(101.0, 110.0)  # heard at 100, then the loop did not run for 9 s
    assert s.silence(110.0, 100.0) == pytest.approx(1.0)
    assert s.silence(112.5, 100.0) == pytest.approx(3.5)
    assert s.silence(112.5, 111.0) == pytest.approx(1.5)  # heard after the stall: none of it forgiven


def test_one_stall_seen_by_two_timers_is_forgiven_once() -> None:
    s = Stalls()
    s.note(101.0, 105.0)
    s.note(102.0, 105.5)  # a second call's timer woke a little later
    assert s.silence(106.0, 100.0) == pytest.approx(1.5)


def test_a_loop_late_on_every_wake_up_still_finds_a_dead_peer() -> None:
    s = Stalls()
    now, heard, rounds = 0.0, 0.0, 0
    while s.silence(now, heard) <= HEARTBEAT_EXPIRY_S:
        s.note(now + HEARTBEAT_INTERVAL_S, now + HEARTBEAT_INTERVAL_S + 5)  # every round 5 s late
        now += HEARTBEAT_INTERVAL_S + 5
        rounds += 1
        assert rounds <= HEARTBEAT_EXPIRY_S / HEARTBEAT_INTERVAL_S + 1, "the dead peer is never found"


class _Quiet(Service):
    name = "quiet"


class _DeadKernel:
    """A connection whose kernel said nothing since the start."""

    def __init__(self) -> None:
        self.last_heard = 0.0
        self.heartbeats = 0

    def send_control(self, kind: Kind) -> None:
        self.heartbeats += kind == Kind.HEARTBEAT


async def test_a_service_whose_loop_is_always_late_still_stops_when_the_kernel_is_gone(
        monkeypatch: pytest.MonkeyPatch, tmp_path: object) -> None:
    clock = SimpleNamespace(now=0.0)

    async def late_sleep(seconds: float) -> None:
        clock.now += seconds + 2.0  # the host never runs this loop on time
        await anyio.lowlevel.checkpoint()
        if clock.now > 100 * HEARTBEAT_EXPIRY_S:
            raise AssertionError("the service never noticed its kernel was gone")

    svc = _Quiet(home=str(tmp_path), back="ipc:///nonexistent", secret="s")
    conn = _DeadKernel()
    svc._conn = conn  # type: ignore[assignment]
    monkeypatch.setattr(service_module, "time", SimpleNamespace(monotonic=lambda: clock.now,
                                                                thread_time=time.thread_time))
    monkeypatch.setattr(service_module, "anyio", SimpleNamespace(sleep=late_sleep))
    await svc._heartbeat()
    assert svc.stop_reason.startswith("kernel silent")
    assert conn.heartbeats <= HEARTBEAT_EXPIRY_S / HEARTBEAT_INTERVAL_S + 1  # its own running time
