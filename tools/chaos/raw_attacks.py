"""The raw-socket abusive clients of `llmos chaos --abuse`: a bare DEALER
on the kernel's front socket sends what the SDK never would (an op that does
not match its body, a 1 MiB `dst`, a frame at the size limit) and can leave
its replies unread. Blocking code for a worker thread (like
tools/chaos/fuzz.py); each attack stops when its `halt` event is set.
"""

from __future__ import annotations

import itertools
import random
import threading
import time
from pathlib import Path

import msgspec
import zmq

from ipc.envelope import PROTOCOL_VERSION, Header, Kind, decode_header, encode_header
from ipc.errors import BadRequest, Error
from common.home import front_endpoint
from ipc.protocol import kernel as kp
from ipc.protocol import scheduler as sp
from ipc.protocol import security as sec
from ipc.protocol.base import Message
from ipc.sockets import SocketLimits, connect_dealer
from sdk.auth import tcp_keys
from tools.chaos.attacks import AttackStats, filler


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
# Kill ends the echo service (no honest client uses it) with a signal the
# kernel does allow, so only the op/body check can refuse it; obeyed, the
# `Killed` reply and a down with no fault both report it. Shutdown goes last
# in a round: obeyed, it ends the run.
DISGUISED: tuple[Message, ...] = (kp.Subscribe(kp.DENIALS_TOPIC), kp.Subscribe(sec.POLICY_TOPIC),
                                  kp.Kill("echo", "SIGKILL"), kp.SetRevocations(), kp.Shutdown("abuse"))


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
                _judge(stats, raw.answer(10.0), what)
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


def oversized_frames(home: Path, token: bytes, stats: AttackStats, halt: threading.Event, *, limit: int,
                     period_s: float) -> None:
    """Raw Submits a little under the kernel's front message limit (they reach
    the scheduler: it must refuse them), and one a little over (the kernel's
    socket drops the connection: no answer is the refusal)."""
    header_room = 64 * 1024
    near = _body(sp.Submit(prompt=filler(max(limit - header_room, 1)), max_tokens=4))
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
                _judge(stats, raw.answer(60.0), f"a {len(near) >> 20} MiB Submit frame (just under the limit)")
            else:
                stats.other["send_blocked"] += 1
            if not _pace(halt, period_s):
                return
    finally:
        raw.close()


def _judge(stats: AttackStats, got: tuple[str, str] | None, what: str) -> None:
    """An attack's answer: none, a refusal (counted by code), or a breach."""
    if got is None:
        stats.other["no_answer"] += 1
    elif got[0] == "error":
        stats.answered(got[1], what)
    else:
        stats.breach(f"{what}: answered {got[0]} {got[1]}")
