"""Batched events (Kind.EVENTS, issue 15) through the kernel's routing: each
event reaches its own requester exactly once, in order, one frame per
requester; a forged or malformed batch is refused while the honest events
of others still flow."""

from __future__ import annotations

import msgspec

from ipc.envelope import (MAX_BATCH, PROTOCOL_VERSION, BatchedEvent, Header, Kind, decode_event_batch,
                          encode_event_batch, encode_header)
from ipc.errors import ErrorCode
from tests.helpers.router_rig import CLIENT, Rig, Sent

OTHER = b"client-2"


def events_sent(rig: Rig, ident: bytes, events: list[tuple[int, str, bytes]]) -> None:
    body = encode_event_batch([BatchedEvent(*e) for e in events])
    rig.inbox.on_back([ident, b"", encode_header(Header(PROTOCOL_VERSION, Kind.EVENTS, 0)), body])


def received(sent: list[Sent]) -> dict[bytes, list[tuple[int, str, bytes]]]:
    """Per client, the events it got (batched or alone), in order."""
    out: dict[bytes, list[tuple[int, str, bytes]]] = {}
    for s in sent:
        got = out.setdefault(s.ident, [])
        if s.header.kind == Kind.EVENTS:
            got += [(e.msg_id, e.op, e.body) for e in decode_event_batch(s.body).events]
        else:
            assert s.header.kind == Kind.EVENT, s.header
            got.append((s.header.msg_id, s.header.op, s.body[0]))
    return out


def routed(rig: Rig) -> list[int]:
    return [s.header.msg_id for s in rig.back.take() if s.header.kind == Kind.REQUEST]


def test_one_batch_reaches_each_client_once_in_order_and_one_frame_per_client() -> None:
    rig = Rig()
    echo = rig.ready("echo")
    rig.back.take()
    rig.request("echo", 11)
    rig.request("echo", 12)
    rig.request("echo", 21, client=OTHER)
    a, b, c = routed(rig)
    rounds = 3
    for step in range(rounds):  # interleaved, as a scheduler step emits them
        events_sent(rig, echo, [(a, "TokenDelta", b"a%d" % step), (c, "TokenDelta", b"c%d" % step),
                                (b, "TokenDelta", b"b%d" % step)])
    sent = rig.front.take()
    assert [(s.ident, s.header.kind) for s in sent] == [(CLIENT, Kind.EVENTS), (OTHER, Kind.EVENT)] * rounds
    got = received(sent)
    assert got[CLIENT] == [e for step in range(rounds) for e in ((11, "TokenDelta", b"a%d" % step),
                                                                  (12, "TokenDelta", b"b%d" % step))]
    assert got[OTHER] == [(21, "TokenDelta", b"c%d" % step) for step in range(rounds)]
    for rid in (a, b, c):
        rig.from_service(echo, rid)
    assert sorted(s.header.msg_id for s in rig.front.take()) == [11, 12, 21]
    assert not rig.router.pending and rig.router.counters.dropped == 0


def test_events_for_a_call_another_instance_serves_are_refused_and_the_honest_ones_delivered() -> None:
    rig = Rig(services=("echo", "rogue"))
    honest = rig.ready("echo")
    rogue = rig.ready("rogue", service="rogue")
    rig.back.take()
    rig.request("echo", 1)
    victim_rid = routed(rig)[0]
    rig.request("rogue", 2, client=OTHER)
    rogue_rid = routed(rig)[0]
    events_sent(rig, rogue, [(rogue_rid, "TokenDelta", b"mine"), (victim_rid, "TokenDelta", b"forged"),
                             (rogue_rid, "TokenDelta", b"mine too")])
    assert received(rig.front.take()) == {OTHER: [(2, "TokenDelta", b"mine"), (2, "TokenDelta", b"mine too")]}
    [refusal] = rig.back.take()
    assert refusal.ident == rogue and refusal.header.kind == Kind.ERROR
    err = refusal.error()
    assert err.code == ErrorCode.UNAUTHORIZED and "1 event(s) for requests it does not serve" in err.message
    # the victim's stream goes on, and ends with its own instance's reply
    events_sent(rig, honest, [(victim_rid, "TokenDelta", b"real")])
    rig.from_service(honest, victim_rid)
    assert [(s.header.kind, s.header.msg_id, s.body) for s in rig.front.take()] == [
        (Kind.EVENT, 1, [b"real"]), (Kind.REPLY, 1, [b"reply"])]


def test_a_malformed_batch_is_refused_whole_with_the_field_named() -> None:
    rig = Rig()
    echo = rig.ready("echo")
    rig.back.take()
    rig.request("echo", 5)
    rid = routed(rig)[0]
    header = encode_header(Header(PROTOCOL_VERSION, Kind.EVENTS, 0))
    enc = msgspec.msgpack.encode
    cases = [
        ([], "exactly one body frame, got 0"),
        ([enc([[[rid, "TokenDelta", b"x"]]]), b"extra"], "exactly one body frame, got 2"),
        ([b"\xc1"], "undecodable event batch"),
        ([enc([[]])], "at `events`"),
        ([enc([[[rid, "TokenDelta", b"x"], [0, "TokenDelta", b"x"]]])], "at `events[1].msg_id`"),
        ([enc([[[rid, "", b"x"]]])], "at `events[0].op`"),
        ([enc([[[rid, "T" * 65, b"x"]]])], "at `events[0].op`"),
        ([enc([[[rid, "TokenDelta", "not bytes"]]])], "at `events[0].body`"),
        ([enc([[[rid, "TokenDelta", b"x"]] * (MAX_BATCH + 1)])], "at `events`"),
        ([enc({"events": []})], "malformed event batch"),
    ]
    for body, why in cases:
        rig.inbox.on_back([echo, b"", header, *body])
        [refusal] = rig.back.take()
        err = refusal.error()
        assert err.code == ErrorCode.BAD_REQUEST and why in err.message, (why, err.message)
    assert rig.front.take() == []  # nothing of a refused batch reached the client
    events_sent(rig, echo, [(rid, "TokenDelta", b"ok")])
    assert received(rig.front.take()) == {CLIENT: [(5, "TokenDelta", b"ok")]}


def test_late_events_are_dropped_and_counted_and_clients_may_not_send_batches() -> None:
    rig = Rig()
    echo = rig.ready("echo")
    rig.back.take()
    rig.request("echo", 3)
    rid = routed(rig)[0]
    rig.from_service(echo, rid)  # answered: its request is gone
    rig.front.take()
    events_sent(rig, echo, [(rid, "TokenDelta", b"late"), (rid, "TokenDelta", b"later")])
    assert rig.front.take() == [] and rig.back.take() == []
    assert rig.router.counters.dropped == 2
    body = encode_event_batch([BatchedEvent(1, "TokenDelta", b"x")])
    rig.inbox.on_front([CLIENT, b"", encode_header(Header(PROTOCOL_VERSION, Kind.EVENTS, 0)), body])
    [(_, code, message)] = rig.front.errors()
    assert code == ErrorCode.BAD_REQUEST and message == "a client may not send EVENTS"
    assert rig.back.take() == []
