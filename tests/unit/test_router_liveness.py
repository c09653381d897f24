"""The kernel's clock (heartbeats, hung instances, silent clients) and its own
ops, driven through the routing state machine with fake ports."""

from __future__ import annotations

import pytest

from ipc import codec
from ipc.envelope import Kind
from ipc.errors import ErrorCode
from ipc.heartbeat import HEARTBEAT_EXPIRY_S, HEARTBEAT_INTERVAL_S
from ipc.protocol import kernel as kp
from kernel.liveness import OVERDUE_S, STARVED_LIMIT_S, TICK_S
from kernel.procstat import ProcSample
from tests.helpers.router_rig import CLIENT, Rig

_events = codec.decoder([kp.Subscribed, kp.ServiceUp, kp.ServiceDown])
_replies = codec.decoder([kp.StatusReply, kp.Killed, kp.ShuttingDown])


def _subscribe(rig: Rig, topic: str, client: bytes = b"watcher") -> None:
    rig.request(kp.KERNEL, 50, client=client, op="Subscribe", body=codec.encode(kp.Subscribe(topic)))


def test_live_instances_get_heartbeats_and_a_silent_one_is_declared_hung_and_killed() -> None:
    rig = Rig()
    quiet = rig.ready("echo")
    chatty = rig.ready("echo-2")
    _subscribe(rig, kp.SERVICES_TOPIC)
    rig.request("echo", 3, op="EchoOnce")
    rig.back.take()
    rig.front.take()
    rig.now += HEARTBEAT_INTERVAL_S
    rig.liveness.tick(rig.now)
    assert sorted(s.ident for s in rig.back.take() if s.header.kind == Kind.HEARTBEAT) == [quiet, chatty]
    rig.now += HEARTBEAT_EXPIRY_S
    rig.control(chatty, Kind.HEARTBEAT, front=False)
    rig.liveness.tick(rig.now + 0.1)
    assert rig.children.killed == [("echo", 100)]
    assert "echo" not in rig.router.registry.by_name and "echo-2" in rig.router.registry.by_name
    sent = rig.front.take()
    assert [_events.decode(s.body[0]) for s in sent if s.ident == b"watcher"] == [
        kp.ServiceDown("echo", "echo", "missed heartbeats")]
    assert [s.error().code for s in sent if s.ident == CLIENT] == [ErrorCode.UNAVAILABLE]


def test_a_client_silent_past_the_expiry_is_gone_and_its_requests_cancelled() -> None:
    rig = Rig()
    echo = rig.ready("echo")
    rig.request("echo", 1)
    rig.request("echo", 1, client=b"pinging")
    rig.back.take()
    rig.now += HEARTBEAT_EXPIRY_S / 2
    rig.control(b"pinging", Kind.HEARTBEAT)
    rig.control(echo, Kind.HEARTBEAT, front=False)
    rig.now += HEARTBEAT_EXPIRY_S / 2 + 1
    rig.liveness.tick(rig.now)
    [cancel] = [s for s in rig.back.take() if s.header.kind == Kind.DISCONNECT]
    assert cancel.ident == echo and rig.router.counters.cancelled == 1
    assert rig.router.clients.in_flight(CLIENT) == 0 and rig.router.clients.in_flight(b"pinging") == 1
    assert CLIENT not in rig.router.clients_seen


def test_waiters_expire_on_the_tick() -> None:
    rig = Rig()
    rig.request("echo", 8)
    rig.liveness.tick(rig.now + rig.router.waiting.timeout_s + 1)
    assert [e[:2] for e in rig.front.errors()] == [(8, ErrorCode.UNAVAILABLE)]


def test_subscribers_see_services_come_up() -> None:
    rig = Rig()
    _subscribe(rig, kp.SERVICES_TOPIC)
    rig.ready("echo")
    assert [_events.decode(s.body[0]) for s in rig.front.take()] == [
        kp.Subscribed(kp.SERVICES_TOPIC), kp.ServiceUp("echo", "echo", 100, {})]
    assert rig.children.ready == [("echo", 100)]


def test_kernel_ops_act_through_the_host_and_answer_the_caller() -> None:
    rig = Rig()
    rig.ready("echo")
    rig.request(kp.KERNEL, 1, op="Status", body=codec.encode(kp.Status()))
    rig.request(kp.KERNEL, 2, op="Kill", body=codec.encode(kp.Kill("echo", "SIGTERM")))
    rig.request(kp.KERNEL, 3, op="Shutdown", body=codec.encode(kp.Shutdown("drill")))
    status, killed, bye = [_replies.decode(s.body[0]) for s in rig.front.take()]
    assert isinstance(status, kp.StatusReply) and [i.instance for i in status.instances] == ["echo"]
    assert status.instances[0].state == kp.ChildState.READY
    assert killed == kp.Killed(["echo"]) and bye == kp.ShuttingDown() and rig.shutdowns == ["drill"]


def test_a_kernel_op_whose_body_is_not_the_op_its_header_names_is_refused() -> None:
    rig = Rig()
    rig.request(kp.KERNEL, 4, op="Status", body=codec.encode(kp.Shutdown("sneaky")))
    [(msg_id, code, message)] = rig.front.errors()
    assert (msg_id, code) == (4, ErrorCode.BAD_REQUEST) and "header names 'Status'" in message
    assert rig.shutdowns == []


def test_without_a_supervisor_kill_is_unavailable() -> None:
    rig = Rig()
    rig.router.children = None
    rig.request(kp.KERNEL, 5, op="Kill", body=codec.encode(kp.Kill("echo", "SIGKILL")))
    assert rig.front.errors() == [(5, ErrorCode.UNAVAILABLE, "this kernel runs without a supervisor")]


def _silent_for(rig: Rig, seconds: float, step: float = TICK_S) -> None:
    """Tick the kernel's clock through `seconds` of silence, a tick at a time."""
    end = rig.now + seconds
    while rig.now < end:
        rig.now = min(rig.now + step, end)
        rig.liveness.tick(rig.now)


def test_a_runnable_instance_that_was_not_run_is_starved_not_hung_until_the_limit() -> None:
    rig = Rig()
    rig.ready("echo")
    rig.children.procs["echo"] = ProcSample("R", 5.0)  # runnable, and the host gives it no CPU
    _silent_for(rig, HEARTBEAT_EXPIRY_S + 1)
    assert rig.children.killed == [] and "echo" in rig.router.registry.by_name
    _silent_for(rig, STARVED_LIMIT_S - HEARTBEAT_EXPIRY_S)
    assert rig.children.killed == [("echo", 100)] and "echo" not in rig.router.registry.by_name


@pytest.mark.parametrize("then, now", [
    (ProcSample("S", 5.0), ProcSample("S", 5.0)),  # blocked: a deadlock, a call that never returns
    (ProcSample("T", 5.0), ProcSample("T", 5.0)),  # stopped (SIGSTOP)
    (ProcSample("R", 5.0), ProcSample("R", 7.0)),  # spinning: it had the CPU and did not answer
    (ProcSample("R", 5.0), ProcSample("D", 5.0)),  # in an uninterruptible wait
])
def test_a_blocked_stopped_or_spinning_instance_is_hung_at_the_expiry(then: ProcSample, now: ProcSample) -> None:
    rig = Rig()
    rig.ready("echo")
    rig.children.procs["echo"] = then
    _silent_for(rig, OVERDUE_S + TICK_S)
    rig.children.procs["echo"] = now
    _silent_for(rig, HEARTBEAT_EXPIRY_S - OVERDUE_S)
    assert rig.children.killed == [("echo", 100)]


def test_an_instance_the_host_cannot_describe_is_hung_at_the_expiry() -> None:
    rig = Rig()  # no /proc sample: a remote (Ray) instance, or not this kernel's child
    rig.ready("echo")
    _silent_for(rig, HEARTBEAT_EXPIRY_S + TICK_S)
    assert rig.children.killed == [("echo", 100)]


def test_a_starved_instance_that_answers_again_is_judged_afresh_next_time() -> None:
    rig = Rig()
    echo = rig.ready("echo")
    rig.children.procs["echo"] = ProcSample("R", 5.0)
    _silent_for(rig, HEARTBEAT_EXPIRY_S + 1)
    rig.control(echo, Kind.HEARTBEAT, front=False)  # it got the CPU back
    rig.liveness.tick(rig.now)
    rig.children.procs["echo"] = ProcSample("R", 6.0)
    _silent_for(rig, OVERDUE_S + TICK_S)
    rig.children.procs["echo"] = ProcSample("R", 9.0)  # and now spins without answering
    _silent_for(rig, HEARTBEAT_EXPIRY_S - OVERDUE_S)
    assert rig.children.killed == [("echo", 100)]


def test_silence_while_the_kernel_itself_was_not_running_does_not_count() -> None:
    rig = Rig()
    rig.ready("echo")
    rig.request("echo", 1, client=b"caller")
    stalled_from = rig.now + TICK_S
    rig.now += HEARTBEAT_EXPIRY_S + 2  # the kernel's clock fell behind: heartbeats wait unread
    rig.liveness.stalls.note(stalled_from, rig.now)
    rig.liveness.tick(rig.now)
    assert rig.children.killed == [] and rig.router.clients.in_flight(b"caller") == 1
    _silent_for(rig, HEARTBEAT_EXPIRY_S + TICK_S)  # silent after the kernel ran again: hung, and gone
    assert rig.children.killed == [("echo", 100)] and b"caller" not in rig.router.clients_seen


def test_a_kernel_late_on_every_tick_still_finds_a_hung_instance_and_a_gone_client() -> None:
    """Only the kernel's stalls are forgiven, not the time it ran between
    them: a kernel always behind (a flood, a starved host) must not keep a
    hung instance, or a vanished client's requests, forever."""
    rig = Rig()
    rig.ready("echo")
    rig.request("echo", 1, client=b"caller")
    ticks = 0
    while not rig.children.killed and ticks < 4 * HEARTBEAT_EXPIRY_S / TICK_S:
        stalled_from = rig.now + TICK_S
        rig.now += TICK_S + HEARTBEAT_INTERVAL_S  # every tick a second late
        rig.liveness.stalls.note(stalled_from, rig.now)
        rig.liveness.tick(rig.now)
        ticks += 1
    assert rig.children.killed == [("echo", 100)] and b"caller" not in rig.router.clients_seen
    assert ticks <= HEARTBEAT_EXPIRY_S / TICK_S + 1  # after 3 s of the kernel's own running time


def test_a_live_instance_is_kept_through_the_kernels_stalls() -> None:
    rig = Rig()
    echo = rig.ready("echo")
    for _ in range(int(4 * HEARTBEAT_EXPIRY_S / TICK_S)):
        stalled_from = rig.now + TICK_S
        rig.now += TICK_S + HEARTBEAT_EXPIRY_S  # longer than the expiry each time
        rig.liveness.stalls.note(stalled_from, rig.now)
        rig.liveness.tick(rig.now)  # before the pump: the heartbeat sent meanwhile is unread
        rig.control(echo, Kind.HEARTBEAT, front=False)
    assert rig.children.killed == [] and "echo" in rig.router.registry.by_name
