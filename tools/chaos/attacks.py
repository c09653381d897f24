"""The abusive clients of `llmos chaos --abuse` (tools/chaos/abuse.py runs
them beside the honest load and the faults). Each counts what it sent and
how it was answered in its `AttackStats`: a refusal (an error code that says
"no"), an answer a fault can explain (the target was down), or a breach — an
answer meaning the attack worked. Breaches fail the run.

Raw-socket attacks are blocking code for a worker thread (like
tools/chaos/fuzz.py): a bare DEALER lets them send what the SDK never would
(an op that does not match its body, a 1 MiB `dst`) and leave replies unread.
Each stops when its `halt` event is set.
"""

from __future__ import annotations

import itertools
import json
import random
import secrets
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx
import msgspec
import zmq

from ipc.envelope import PROTOCOL_VERSION, Header, Kind, decode_header, encode_header
from ipc.errors import BadRequest, Error, LlmosError
from ipc.home import front_endpoint
from ipc.protocol import kernel as kp
from ipc.protocol import scheduler as sp
from ipc.protocol import security as sec
from ipc.protocol.base import Message
from ipc.sockets import SocketLimits, connect_dealer
from sdk.auth import tcp_keys
from sdk.client import AsyncClient

# "No", said clearly: what an abusive request must be answered with.
REFUSALS = frozenset({"bad_request", "unauthorized", "forbidden", "not_found", "overloaded"})
# What a fault injected at the same time explains (the target was killed or paused).
FAULT_CODES = frozenset({"unavailable", "deadline_exceeded", "cancelled"})
MAX_EXAMPLES = 20


@dataclass
class AttackStats:
    sent: int = 0
    refused: Counter[str] = field(default_factory=Counter)  # by error code (or HTTP status)
    other: Counter[str] = field(default_factory=Counter)  # fault-explained answers, unanswered, send blocked
    breaches: int = 0
    examples: list[str] = field(default_factory=list)  # the first breaches, described
    figures: dict[str, float] = field(default_factory=dict)  # attack-specific measurements
    t0: float = field(default_factory=time.monotonic)  # the run's clock (History.t0): breaches say when

    def answered(self, code: str, what: str) -> None:
        if code in REFUSALS:
            self.refused[code] += 1
        elif code in FAULT_CODES:
            self.other[code] += 1
        else:
            self.breach(f"{what}: answered {code}")

    def breach(self, what: str) -> None:
        self.breaches += 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(f"at {time.monotonic() - self.t0:.1f}s: {what}")

    def to_json(self) -> dict[str, Any]:
        return {"sent": self.sent, "refused": dict(self.refused), "other": dict(self.other),
                "breaches": self.breaches, "breach_examples": self.examples, **self.figures}


def _dealer(home: Path, limits: SocketLimits) -> tuple[zmq.Context[zmq.Socket[bytes]], zmq.Socket[bytes]]:
    ep = front_endpoint(home)
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sock = connect_dealer(ctx, ep, limits=limits, curve=tcp_keys(ep, home))
    sock.setsockopt(zmq.SNDTIMEO, 2000)  # a blocked send gives up (counted), never hangs the thread
    return ctx, sock


class RawDealer:
    """A bare DEALER on the kernel's front socket: headers written by hand."""

    def __init__(self, home: Path, *, recv_hwm: int = 1000, max_message_bytes: int = -1):
        # Our own MAXMSGSIZE stays off (-1): an answer is never refused here.
        self._ctx, self.sock = _dealer(home, SocketLimits(send_hwm=1000, recv_hwm=recv_hwm,
                                                          max_message_bytes=max_message_bytes))
        self._ids = itertools.count(1)

    def send(self, dst: str, op: str, body: bytes, *, token: bytes = b"") -> bool:
        # encode_header does not check the bounds decode_header enforces: a 1 MiB dst goes out as is.
        header = Header(PROTOCOL_VERSION, Kind.REQUEST, next(self._ids), src="abuse", dst=dst, op=op, token=token)
        try:
            self.sock.send_multipart([b"", encode_header(header), body], copy=False)
            return True
        except zmq.Again:
            return False

    def answer(self, timeout_s: float) -> tuple[str, str] | None:
        """(kind, code or op) of the next answer, heartbeats skipped; None when none came."""
        end = time.monotonic() + timeout_s
        while (left := end - time.monotonic()) > 0:
            if not self.sock.poll(int(left * 1000) + 1):
                return None
            frames = self.sock.recv_multipart()
            try:
                header = decode_header(frames[1])
            except (BadRequest, IndexError):
                return "undecodable", ""
            if header.kind in (Kind.HEARTBEAT, Kind.DISCONNECT):
                continue
            if header.kind == Kind.ERROR:
                try:
                    return "error", str(msgspec.msgpack.decode(frames[2], type=Error).code)
                except (msgspec.DecodeError, IndexError):
                    return "undecodable", "error"
            return Kind(header.kind).name.lower(), header.op
        return None

    def close(self) -> None:
        self.sock.close(linger=0)
        self._ctx.term()


def _body(msg: Message) -> bytes:
    return msgspec.msgpack.encode(msg)


def _pace(halt: threading.Event, seconds: float) -> bool:
    """Wait between rounds (a load generator's pacing); False once halted."""
    return not halt.wait(seconds)


# -- disguised kernel ops ----------------------------------------------------------------------

# Bodies of privileged kernel ops sent under the op a `status` token may call.
# Kill sends SIGCONT: obeyed, it harms nothing, and the `Killed` reply proves
# the breach all the same. Shutdown goes last in a round: obeyed, it ends the run.
DISGUISED: tuple[Message, ...] = (kp.Subscribe(kp.DENIALS_TOPIC), kp.Subscribe(sec.POLICY_TOPIC),
                                  kp.Kill("memory", "SIGCONT"), kp.SetRevocations(), kp.Shutdown("abuse"))


def disguised_ops(home: Path, token: bytes, stats: AttackStats, halt: threading.Event, period_s: float) -> None:
    """A tenant holding only `status` sends `op="Status"` to the kernel with
    each privileged body; anything but a refusal is a breach."""
    raw = RawDealer(home)
    try:
        while True:
            for body in DISGUISED:
                what = f"{type(body).__name__} body sent as op Status"
                if not raw.send(kp.KERNEL, "Status", _body(body), token=token):
                    stats.other["send_blocked"] += 1
                    continue
                stats.sent += 1
                got = raw.answer(10.0)
                if got is None:
                    stats.other["no_answer"] += 1
                elif got[0] == "error":
                    stats.answered(got[1], what)
                else:
                    stats.breach(f"{what}: answered {got[0]} {got[1]}")
                # Events a breached Subscribe delivers would read as answers to the next send.
                while raw.answer(0.05) is not None:
                    pass
            if not _pace(halt, period_s):
                return
    finally:
        raw.close()


# -- unread replies ----------------------------------------------------------------------------

def unread_replies(home: Path, stats: AttackStats, halt: threading.Event, *, requests: int, body_bytes: int,
                   dst_bytes: int) -> None:
    """A client with no API key sends `requests` requests it never reads the
    answers of — Logins to instance-like names that do not exist (each parked
    or refused), Logins with a `dst` of `dst_bytes` (an echoing error reply
    would copy it), Submits with `body_bytes` of prompt — then holds the
    socket unread until the run stops. Only then are the answers drained and
    counted; what never came back the kernel dropped (it may: the client does
    not read)."""
    raw = RawDealer(home, recv_hwm=1)  # a queue of one: everything else waits in the kernel
    pad = "x" * body_bytes
    login = _body(sec.Login(api_key="llmos.abuse." + pad))
    big_dst = "security-" + "7" * dst_bytes
    try:
        for k in range(requests):
            if halt.is_set():
                break
            variant = k % 3
            if variant == 0:
                ok = raw.send(f"security-{k + 7}", "Login", login)
            elif variant == 1:
                ok = raw.send(big_dst, "Login", _body(sec.Login(api_key="llmos.abuse.x")))
            else:
                ok = raw.send(f"scheduler-{k + 7}", "Submit", _body(sp.Submit(prompt=pad, max_tokens=1)))
            if ok:
                stats.sent += 1
            else:
                stats.other["send_blocked"] += 1
        halt.wait()
        answered = 0
        while (got := raw.answer(3.0)) is not None:
            answered += 1
            if got[0] == "error":
                stats.answered(got[1], "an unread request")
            else:
                stats.breach(f"an unread request: answered {got[0]} {got[1]}")
        stats.other["unanswered"] += max(stats.sent - answered, 0)
    finally:
        raw.close()


# -- login flood -------------------------------------------------------------------------------

def _bad_key(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.6:  # well-formed, unknown
        return f"llmos.{rng.randbytes(8).hex()}.{rng.randbytes(24).hex()}"
    if r < 0.9:
        return "llmos." + rng.randbytes(rng.randrange(64)).hex()
    return rng.randbytes(rng.randrange(200)).hex()


def login_flood(home: Path, stats: AttackStats, halt: threading.Event, *, window: int, seed: int) -> None:
    """Bad API keys in a tight loop, `window` in flight at a time."""
    rng = random.Random(seed)
    raw = RawDealer(home)
    outstanding = 0
    try:
        while not halt.is_set():
            while outstanding < window:
                if not raw.send(sec.SECURITY, "Login", _body(sec.Login(api_key=_bad_key(rng)))):
                    stats.other["send_blocked"] += 1
                    break
                stats.sent += 1
                outstanding += 1
            got = raw.answer(1.0)
            if got is None:
                continue
            outstanding -= 1
            if got[0] == "error":
                stats.answered(got[1], "a bad API key")
            else:
                stats.breach(f"a bad API key: answered {got[0]} {got[1]}")
        while outstanding > 0 and (got := raw.answer(5.0)) is not None:
            outstanding -= 1
            if got[0] == "error":
                stats.answered(got[1], "a bad API key")
            else:
                stats.breach(f"a bad API key: answered {got[0]} {got[1]}")
        stats.other["unanswered"] += outstanding
    finally:
        raw.close()


async def honest_logins(home: Path, api_key: str, stats: AttackStats, stop: anyio.Event, period_s: float) -> None:
    """During the flood, an honest tenant logs in now and then from its own
    connection: refused, it is locked out (a breach); the slowest is reported."""
    worst = 0.0
    n = 0
    while not stop.is_set():
        t0 = time.monotonic()
        try:
            client = await AsyncClient.connect(home=home, api_key=api_key, timeout=30)
            await client.aclose()
            n += 1
            worst = max(worst, time.monotonic() - t0)
        except LlmosError as exc:
            if str(exc.code) in FAULT_CODES:
                stats.other[f"honest_login_{exc.code}"] += 1  # the security server was down
            else:
                stats.breach(f"an honest login during the flood: {exc.code}: {exc.message}")
        with anyio.move_on_after(period_s):
            await stop.wait()
    stats.figures["honest_logins"] = n
    stats.figures["honest_login_max_s"] = round(worst, 3)


# -- oversized prompts -------------------------------------------------------------------------

def _filler(n_bytes: int) -> str:
    word = "lorem ipsum "
    return (word * (n_bytes // len(word) + 1))[:n_bytes]


async def oversized_sdk(client: AsyncClient, stats: AttackStats, stop: anyio.Event, *, prompt_bytes: int,
                        period_s: float) -> None:
    """Submits of `prompt_bytes` of text, and of as many prompt ids, through the SDK."""
    text = _filler(prompt_bytes)
    ids = [5] * (prompt_bytes // 2)  # two msgpack bytes or so each: about the same frame size
    variants: list[tuple[str, sp.Submit]] = [
        (f"a {prompt_bytes >> 20} MiB text prompt", sp.Submit(prompt=text, max_tokens=4)),
        (f"{len(ids)} prompt ids", sp.Submit(prompt_ids=ids, max_tokens=4))]
    for k in itertools.count():
        if stop.is_set():
            return
        what, submit = variants[k % len(variants)]
        stats.sent += 1
        try:
            await client.call(sp.SCHEDULER, submit, timeout=60)
            stats.breach(f"{what}: completed")
        except LlmosError as exc:
            stats.answered(str(exc.code), what)
        with anyio.move_on_after(period_s):
            await stop.wait()


def oversized_frames(home: Path, token: bytes, stats: AttackStats, halt: threading.Event, *, limit: int,
                     period_s: float) -> None:
    """Raw Submits a little under the kernel's front message limit (they reach
    the scheduler: it must refuse them), and one a little over (the kernel's
    socket drops the connection: no answer is the refusal)."""
    header_room = 64 * 1024
    near = _body(sp.Submit(prompt=_filler(max(limit - header_room, 1)), max_tokens=4))
    raw = RawDealer(home)
    try:
        over = near + b"\0" * (header_room * 2)  # trailing bytes: over the limit whatever they say
        if raw.send(sp.SCHEDULER, "Submit", over, token=token):
            stats.sent += 1
            got = raw.answer(10.0)
            if got is None:
                stats.refused["connection_dropped"] += 1
            elif got[0] == "error":
                stats.answered(got[1], f"a {len(over) >> 20} MiB frame (over the limit)")
            else:
                stats.breach(f"a {len(over) >> 20} MiB frame (over the limit): answered {got[0]} {got[1]}")
        del over
        while True:
            if raw.send(sp.SCHEDULER, "Submit", near, token=token):
                stats.sent += 1
                got = raw.answer(60.0)
                what = f"a {len(near) >> 20} MiB Submit frame (just under the limit)"
                if got is None:
                    stats.other["no_answer"] += 1
                elif got[0] == "error":
                    stats.answered(got[1], what)
                else:
                    stats.breach(f"{what}: answered {got[0]} {got[1]}")
            else:
                stats.other["send_blocked"] += 1
            if not _pace(halt, period_s):
                return
    finally:
        raw.close()


async def oversized_http(base_url: str, api_key: str, stats: AttackStats, stop: anyio.Event, *,
                         body_bytes: int, period_s: float) -> None:
    """A `body_bytes` JSON body to the gateway, with and without a key: 413,
    401 or 400 are refusals; 2xx and 5xx (but 503) are breaches."""
    body = json.dumps({"prompt": _filler(body_bytes), "max_tokens": 4}).encode()
    auths: list[dict[str, str]] = [{"Authorization": f"Bearer {api_key}"}, {}]
    async with httpx.AsyncClient(base_url=base_url, timeout=httpx.Timeout(60.0, connect=5.0)) as http:
        for k in itertools.count():
            if stop.is_set():
                return
            headers = {"Content-Type": "application/json", **auths[k % 2]}
            what = f"a {len(body) >> 20} MiB HTTP body ({'with' if headers.get('Authorization') else 'no'} key)"
            stats.sent += 1
            try:
                resp = await http.post("/v1/completions", content=body, headers=headers)
                code = resp.status_code
                if code in (400, 401, 403, 413, 429):
                    stats.refused[f"http_{code}"] += 1
                elif code == 503:
                    stats.other["http_503"] += 1
                else:
                    stats.breach(f"{what}: HTTP {code}")
            except httpx.HTTPError as exc:
                # A server may answer 413 and close before the body is sent: the client sees the close.
                stats.other[f"http_{type(exc).__name__}"] += 1
            with anyio.move_on_after(period_s):
                await stop.wait()


# -- quota bypass ------------------------------------------------------------------------------

QUOTA_MAX_TOKENS = 48  # long enough that every stream of a round overlaps the first


async def _quota_in_force(client: AsyncClient, timeout_s: float = 30.0) -> bool:
    """Two plain Submits at once, until the second is refused `overloaded`:
    the scheduler knows the quota (the policy reaches it asynchronously)."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        codes: list[str] = []

        async def one() -> None:
            try:
                await client.call(sp.SCHEDULER, sp.Submit(prompt="Hello", max_tokens=QUOTA_MAX_TOKENS,
                                                          ignore_eos=True), timeout=120)
                codes.append("ok")
            except LlmosError as exc:
                codes.append(str(exc.code))

        async with anyio.create_task_group() as tg:
            tg.start_soon(one)
            tg.start_soon(one)
        if "overloaded" in codes and "ok" in codes:
            return True
        await anyio.sleep(0.5)  # a retry's pacing while the policy propagates
    return False


async def quota_bypass(client: AsyncClient, stats: AttackStats, stop: anyio.Event, *, streams: int,
                       period_s: float) -> None:
    """A tenant limited to 1 concurrent request sends `streams` Submits at
    once, each claiming to be a re-submission (attempt > 0, or resume_ids
    with a fresh request id). All are sent together and an admitted one runs
    for QUOTA_MAX_TOKENS steps, so two admitted in a round ran at once: a bypass."""
    stats.figures["quota_in_force"] = float(await _quota_in_force(client))
    worst = 0
    for r in itertools.count():
        if stop.is_set():
            break
        admitted = 0
        began = time.monotonic()

        async def one(k: int) -> None:
            nonlocal admitted
            rid = f"qb-{r}-{k}-{secrets.token_hex(3)}"
            submit = sp.Submit(prompt="Once upon a time", max_tokens=QUOTA_MAX_TOKENS, ignore_eos=True,
                               request_id=rid, attempt=1 + k % 2)
            if k % 3 == 2:
                submit = msgspec.structs.replace(submit, resume_from=1, resume_ids=[5])
            stats.sent += 1
            counted = False
            try:
                async for _ in client.stream(sp.SCHEDULER, submit, timeout=120):
                    if not counted:
                        admitted += 1
                        counted = True
            except LlmosError as exc:
                if not counted:
                    stats.answered(str(exc.code), "a Submit claiming attempt > 0")
                else:
                    stats.other[f"admitted_then_{exc.code}"] += 1

        async with anyio.create_task_group() as tg:
            for k in range(streams):
                tg.start_soon(one, k)
        worst = max(worst, admitted)
        if admitted > 1:
            stats.breach(f"round {r} (sent at {began - stats.t0:.1f}s): {admitted} of {streams} Submits with attempt > 0 admitted at once (quota 1)")
        with anyio.move_on_after(period_s):
            await stop.wait()
    stats.figures["max_admitted_at_once"] = worst
