"""Routing as a state machine: frames in, what the fake ports received out."""

from __future__ import annotations

from ipc.envelope import MAX_NAME, PROTOCOL_VERSION, Header, Kind, encode_header
from ipc.errors import ErrorCode
from kernel.config import KernelConfig
from tests.helpers.router_rig import CLIENT, WALL_NS, Rig


def test_a_request_reaches_the_ready_instance_under_a_routing_id_and_the_reply_returns_under_the_callers() -> None:
    rig = Rig()
    echo = rig.ready("echo")
    assert [s.header.op for s in rig.back.take()] == ["Registered"]
    rig.request("echo", 7, token=b"client-set", attempt=5, src="forged")
    [out] = rig.back.take()
    rid = out.header.msg_id
    assert out.ident == echo and out.header.kind == Kind.REQUEST and rid in rig.router.pending
    # stamped by the kernel: its own source name, attempt 0, no token passed on
    assert (out.header.src, out.header.attempt, out.header.token) == (f"front:{CLIENT.hex()}", 0, b"")
    rig.from_service(echo, rid, Kind.EVENT, b"part")
    rig.from_service(echo, rid, Kind.REPLY, b"whole")
    assert [(s.ident, s.header.kind, s.header.msg_id, s.body) for s in rig.front.take()] == [
        (CLIENT, Kind.EVENT, 7, [b"part"]), (CLIENT, Kind.REPLY, 7, [b"whole"])]
    c = rig.router.counters
    assert (c.routed, c.replies, c.dropped) == (1, 1, 0)
    assert not rig.router.pending and rig.router.clients.in_flight(CLIENT) == 0


def test_requests_wait_while_a_service_has_no_instance_then_go_to_the_first_that_registers() -> None:
    rig = Rig()
    rig.request("echo", 1)
    rig.request("echo", 2)
    assert rig.front.take() == [] and rig.back.take() == []
    assert rig.router.counters.queued == 2 and len(rig.router.waiting) == 2
    rig.ready("echo")
    assert [s.header.op for s in rig.back.take()] == ["Registered", "Echo", "Echo"]
    assert len(rig.router.waiting) == 0 and len(rig.router.pending) == 2


def test_a_full_wait_queue_refuses_overloaded_and_says_which_bound() -> None:
    rig = Rig(KernelConfig(auth=False, wait_queue_limit=2))
    for msg_id in (1, 2, 3):
        rig.request("echo", msg_id)
    [(msg_id, code, message)] = rig.front.errors()
    assert (msg_id, code) == (3, ErrorCode.OVERLOADED)
    assert message == "'echo' is down and its wait queue holds 2 requests"
    assert rig.router.clients.in_flight(CLIENT) == 2  # the refused one is not counted


def test_waiters_past_the_wait_timeout_or_their_deadline_are_answered() -> None:
    rig = Rig(KernelConfig(auth=False, wait_timeout_s=30.0))
    rig.request("echo", 1)
    rig.request("echo", 2, deadline_ns=WALL_NS + 5 * 10**9)
    rig.wall_ns += 6 * 10**9
    rig.router.expire_waiting(rig.now)
    assert rig.front.errors() == [(2, ErrorCode.DEADLINE_EXCEEDED, "'echo' did not come back before the deadline")]
    rig.router.expire_waiting(rig.now + 31)
    assert rig.front.errors() == [(1, ErrorCode.UNAVAILABLE, "'echo' has no live instance (waited 30s)")]
    assert rig.router.clients.in_flight(CLIENT) == 0


def test_an_idempotent_request_is_resent_after_its_instance_dies_until_max_attempts() -> None:
    rig = Rig(KernelConfig(auth=False, max_attempts=3))
    rig.request("echo", 9)
    attempts = []
    for name in ("echo-a", "echo-b", "echo-c"):
        rig.ready(name)
        [_, req] = rig.back.take()
        attempts.append(req.header.attempt)
        assert rig.router.instance_down(name, "killed by SIGKILL")
    assert attempts == [0, 1, 2]
    assert rig.router.counters.resent == 2
    assert rig.front.errors() == [(9, ErrorCode.UNAVAILABLE, "echo-c died while handling Echo (killed by SIGKILL)")]
    assert not rig.router.pending and len(rig.router.waiting) == 0 and rig.router.clients.in_flight(CLIENT) == 0


def test_a_request_that_is_not_idempotent_fails_when_its_instance_dies() -> None:
    rig = Rig()
    rig.ready("echo")
    rig.ready("echo-2")
    rig.request("echo", 4, op="EchoOnce")
    rig.router.instance_down("echo", "exit 1")
    assert rig.front.errors() == [(4, ErrorCode.UNAVAILABLE, "echo died while handling EchoOnce (exit 1)")]
    assert rig.router.counters.resent == 0


def test_a_late_answer_from_a_dead_instance_is_not_delivered_after_the_resend() -> None:
    rig = Rig()
    first = rig.ready("echo-a")
    rig.request("echo", 5)
    [_, to_first] = rig.back.take()
    rig.router.instance_down("echo-a", "unreachable")
    second = rig.ready("echo-b")
    [_, to_second] = rig.back.take()
    assert to_second.header.attempt == 1
    # echo-a comes back under its old identity, a new incarnation: its answer
    # to the request it held before is late and goes nowhere
    rig.ready("echo-a", ident=first)
    rig.back.take()
    rig.from_service(first, to_first.header.msg_id, body=b"late")
    assert rig.front.take() == [] and rig.router.counters.dropped == 1
    rig.from_service(second, to_second.header.msg_id, body=b"on time")
    [reply] = rig.front.take()
    assert (reply.header.msg_id, reply.body) == (5, [b"on time"])


def test_an_answer_from_an_unregistered_peer_is_refused_and_the_peer_told_to_stop() -> None:
    rig = Rig()
    rig.from_service(b"stale", 3)
    assert [(s.ident, s.header.kind) for s in rig.back.sent] == [(b"stale", Kind.ERROR), (b"stale", Kind.DISCONNECT)]
    assert rig.back.sent[0].error().code == ErrorCode.UNAUTHORIZED


def test_a_reply_for_an_unknown_routing_id_is_dropped() -> None:
    rig = Rig()
    echo = rig.ready("echo")
    rig.back.take()
    rig.from_service(echo, 424242)
    assert rig.front.take() == [] and rig.back.take() == [] and rig.router.counters.dropped == 1


def test_a_disconnecting_client_cancels_its_requests_at_the_service_and_frees_them() -> None:
    rig = Rig(services=("echo", "later"))
    echo = rig.ready("echo")
    rig.back.take()
    rig.request("echo", 1)
    rig.request("echo", 2)
    rig.request("later", 3)  # waiting: no instance of "later"
    rig.request("echo", 1, client=b"other")
    routed = {s.header.msg_id for s in rig.back.take()}
    rig.control(CLIENT, Kind.DISCONNECT)
    cancels = rig.back.take()
    assert all(s.ident == echo and s.header.kind == Kind.DISCONNECT for s in cancels)
    assert len(cancels) == 2 and {s.header.msg_id for s in cancels} < routed
    assert rig.router.counters.cancelled == 2 and len(rig.router.waiting) == 0
    assert rig.router.clients.in_flight(CLIENT) == 0 and rig.router.clients.in_flight(b"other") == 1
    assert len(rig.router.pending) == 1 and len(rig.router.registry.by_name["echo"].outstanding) == 1


def test_unknown_destinations_are_not_found_and_a_down_instance_is_unavailable() -> None:
    rig = Rig()
    rig.router.registry.instance_names.add("echo-0")  # supervised, down now
    rig.request("nope", 1)
    rig.request("echo-7", 2)  # made up: never parked
    rig.request("echo-0", 3)
    assert rig.front.errors() == [
        (1, ErrorCode.NOT_FOUND, "no service named 'nope'"),
        (2, ErrorCode.NOT_FOUND, "no service named 'echo-7'"),
        (3, ErrorCode.UNAVAILABLE, "instance 'echo-0' is not running (address the service to wait for any instance)")]
    assert len(rig.router.waiting) == 0 and rig.router.clients.in_flight(CLIENT) == 0


def test_malformed_and_oversized_headers_are_refused_naming_the_fault() -> None:
    rig = Rig()
    long_dst = encode_header(Header(PROTOCOL_VERSION, Kind.REQUEST, 11, dst="x" * (MAX_NAME + 1), op="Echo"))
    rig.inbox.on_front([CLIENT, b"", long_dst, b"body"])
    rig.inbox.on_front([CLIENT, b"not empty", b"header"])
    rig.inbox.on_front([CLIENT, b"", b"\xc1garbage"])
    rig.inbox.on_front([CLIENT, b""])
    errors = rig.front.errors()
    assert [e[:2] for e in errors] == [(11, ErrorCode.BAD_REQUEST), (0, ErrorCode.BAD_REQUEST),
                                       (0, ErrorCode.BAD_REQUEST), (0, ErrorCode.BAD_REQUEST)]
    assert "`dst`" in errors[0][2] and "delimiter" in errors[1][2]
    assert errors[2][2].startswith("undecodable header") and errors[3][2] == "missing header frame"
    assert rig.router.counters.rejected == 4 and rig.back.take() == []


def test_a_client_may_send_only_requests_heartbeats_and_disconnects() -> None:
    rig = Rig()
    rig.control(CLIENT, Kind.READY)
    rig.control(CLIENT, Kind.REPLY)
    assert [e[1:] for e in rig.front.errors()] == [
        (ErrorCode.UNAUTHORIZED, "clients cannot register as services"),
        (ErrorCode.BAD_REQUEST, "a client may not send REPLY")]
    rig.control(CLIENT, Kind.HEARTBEAT)
    assert [s.header.kind for s in rig.front.take()] == [Kind.HEARTBEAT]


def test_a_service_needs_the_boot_secret_to_register() -> None:
    rig = Rig()
    rig.ready("echo", secret="guessed")
    assert rig.back.errors() == [(1, ErrorCode.UNAUTHORIZED, "wrong boot secret")]
    assert "echo" not in rig.router.registry.by_name and rig.children.ready == []


def test_a_client_past_its_in_flight_limit_is_refused_overloaded() -> None:
    rig = Rig(KernelConfig(auth=False, client_inflight_limit=2))
    for msg_id in (1, 2, 3):
        rig.request("echo", msg_id)
    [(msg_id, code, message)] = rig.front.errors()
    assert (msg_id, code) == (3, ErrorCode.OVERLOADED) and "this client has 2 requests in flight" in message


def test_a_full_service_queue_is_overload_and_a_vanished_instance_is_down() -> None:
    rig = Rig()
    rig.ready("echo")
    rig.back.take()
    rig.back.refuse = True  # full
    rig.request("echo", 1)
    assert rig.front.errors()[0][1] == ErrorCode.OVERLOADED and "echo" in rig.router.registry.by_name
    rig.back.refuse = False  # gone
    rig.request("echo", 2)
    assert "echo" not in rig.router.registry.by_name and len(rig.router.waiting) == 1
    assert rig.front.take() == []


def test_a_request_whose_deadline_passed_is_not_routed() -> None:
    rig = Rig()
    rig.ready("echo")
    rig.back.take()
    rig.request("echo", 1, deadline_ns=WALL_NS - 1)
    assert rig.front.errors() == [(1, ErrorCode.DEADLINE_EXCEEDED, "deadline passed before routing to 'echo'")]
    assert rig.back.take() == []
