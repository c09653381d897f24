"""Resumable HTTP requests: which scheduler request an HTTP request is, and
where its stream resumes.

Every SSE event carries `id: <request id>:<token offset>` (the tokens the
client holds after it); the event that carries the finish reason ends in
`:end`. A client whose stream was cut sends the same request again (same
URL, same body) with `Last-Event-ID: <that id>` (or `?last_event_id=`) and
gets the rest, exactly once: the request lives in the scheduler, not in the
gateway instance that died. `Idempotency-Key: <key>` names a request from
its first byte, so even one cut before its first event can be sent again and
re-attaches instead of running twice.

The scheduler scopes request ids to the principal, so no tenant can attach
to another's request whatever id it sends. The gateway also refuses, with a
clear answer, an id this caller could not have been given: the request id
is the body's `request_id`, else one derived from (principal, key), else a
fresh one tagged with a digest of (principal, id).
"""

from __future__ import annotations

import hashlib
import re
import uuid
from dataclasses import dataclass

from ipc.errors import BadRequest, Forbidden
from ipc.protocol.scheduler import MAX_REQUEST_ID_LEN, MAX_TOKENS_LIMIT

MAX_KEY_LEN = 128
_KEY = re.compile(r"[A-Za-z0-9._~-]+")
# The printable ASCII a request id in an event id may hold (a body's
# request_id may hold anything else, and is then not resumable by header).
_RID = re.compile(r"[\x21-\x7e]+")
_OFFSET_DIGITS = len(str(MAX_TOKENS_LIMIT))
END = "end"


@dataclass(frozen=True, slots=True)
class Resume:
    """Where a re-sent request picks up: tokens the client holds, and whether
    it already has the event with the finish reason."""

    request_id: str
    offset: int
    ended: bool = False


def event_id(request_id: str, offset: int, *, end: bool = False) -> bytes:
    return f"{request_id}:{offset}{':' + END if end else ''}".encode()


def parse_last_event_id(value: str) -> Resume:
    """`<request id>:<offset>[:end]`; `BadRequest` naming what is wrong."""
    if len(value) > MAX_REQUEST_ID_LEN + _OFFSET_DIGITS + len(END) + 2:
        raise BadRequest(f"Last-Event-ID is longer than any event id this gateway sends ({len(value)} characters)",
                         detail={"field": "last-event-id"})
    head, ended = (value[:-len(END) - 1], True) if value.endswith(":" + END) else (value, False)
    rid, sep, offset = head.rpartition(":")
    if not sep or not rid or not _RID.fullmatch(rid) or not offset.isascii() or not offset.isdigit() \
            or len(offset) > _OFFSET_DIGITS:
        raise BadRequest("Last-Event-ID must be an event id this gateway sent: '<request id>:<token offset>'",
                         detail={"field": "last-event-id"})
    return Resume(rid, int(offset), ended)


def check_key(key: str) -> str:
    if not 1 <= len(key) <= MAX_KEY_LEN or not _KEY.fullmatch(key):
        raise BadRequest(f"Idempotency-Key must be 1 to {MAX_KEY_LEN} characters of A-Z a-z 0-9 . _ ~ -",
                         detail={"field": "idempotency-key"})
    return key


def _digest(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def keyed_id(principal: str, key: str) -> str:
    """The request id of `key` for this principal: the same on every gateway
    instance, different for every other principal."""
    return "k" + _digest("idempotency", principal, key)[:32]


def _tag(principal: str, base: str) -> str:
    return _digest("stream", principal, base)[:12]


def fresh_id(principal: str) -> str:
    base = uuid.uuid4().hex[:20]
    return f"g{base}.{_tag(principal, base)}"


def request_id(principal: str, *, body_id: str, key: str | None, resume: Resume | None) -> str:
    """The scheduler request id of an HTTP request, and a refusal for a
    Last-Event-ID that names a request this caller's request cannot be."""
    if body_id and key is not None:
        raise BadRequest("give one of the body's request_id and the Idempotency-Key header",
                         detail={"field": "idempotency-key"})
    want = body_id or (keyed_id(principal, key) if key is not None else "")
    if resume is None:
        return want or fresh_id(principal)
    if want:
        if resume.request_id != want:
            raise BadRequest(f"Last-Event-ID names request {resume.request_id[:40]!r}; this request is "
                             f"{want[:40]!r} (resend the same body, with the same Idempotency-Key)",
                             detail={"field": "last-event-id"})
        return want
    base, dot, tag = resume.request_id[1:].partition(".")
    if not resume.request_id.startswith("g") or not dot or tag != _tag(principal, base):
        raise Forbidden("Last-Event-ID names a stream this caller did not start", detail={"field": "last-event-id"})
    return resume.request_id
