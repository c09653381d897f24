"""Batched events (`Kind.EVENTS`, issue 15): one frame from a service
carries the events of many calls (a scheduler step's token deltas, one per
running request); the kernel forwards one frame per requester.

Each event is checked as a lone EVENT is (`Router.answer`): its routing id
must name a request pending on this very instance. An event for a request
that is gone (finished, failed, its client left) is dropped as a late answer;
one for a request another instance holds is the sender's forgery, dropped
and refused (audited with the sender), while the batch's honest events still
reach their requesters. A batch that does not parse is refused whole. The
bodies pass through untouched, as a lone event's do.
"""

from __future__ import annotations

from typing import Any

from ipc.envelope import BatchedEvent, Header, decode_event_batch, encode_header, events_message
from ipc.errors import BadRequest, LlmosError, Unauthorized
from kernel.ports import Port
from kernel.registry import Instance
from kernel.routing import Router

_EMPTY = b""


def answer_events(router: Router, inst: Instance, header: Header, payload: list[Any]) -> LlmosError | None:
    """Forward an EVENTS frame's events from `inst` to their requesters;
    returns the refusal for the inbox to answer and audit, if any."""
    try:
        batch = decode_event_batch(payload[1:])
    except BadRequest as exc:
        return exc
    pending = router.pending
    # requester (port, identity) -> its events, in the batch's order
    out: dict[tuple[int, bytes], tuple[Port, bytes, list[BatchedEvent]]] = {}
    foreign: list[int] = []
    late = 0
    for ev in batch.events:
        p = pending.get(ev.msg_id)
        if p is None:
            late += 1
            continue
        if p.instance is not inst:
            foreign.append(ev.msg_id)
            continue
        key = (id(p.origin), p.origin_id)
        to = out.get(key)
        if to is None:
            to = out[key] = (p.origin, p.origin_id, [])
        to[2].append(BatchedEvent(p.origin_msg_id, ev.op, ev.body))
    counters = router.counters
    counters.dropped += late
    src = inst.name
    for port, ident, events in out.values():
        header, body = events_message(events, src)
        if not port.send([ident, _EMPTY, encode_header(header), body]):
            counters.dropped += len(events)
    if foreign:
        counters.dropped += len(foreign)
        return Unauthorized(f"{src} emitted {len(foreign)} event(s) for requests it does not serve "
                            f"(routing ids {foreign[:8]}); they were dropped",
                            detail={"events_refused": len(foreign)})
    return None


__all__ = ["answer_events"]
