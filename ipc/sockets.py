"""ZeroMQ sockets tuned for llmos, and `Channel`: batch-draining async I/O.

A `Channel` wraps a plain (non-asyncio) zmq socket. The event loop watches the
socket's FD; readers drain with NOBLOCK until EAGAIN, so one wake-up moves a
whole batch. ZeroMQ's FD is edge-triggered and any socket operation (a send
included) may consume the edge, so every send re-checks `EVENTS` and wakes the
reader itself when input is pending — otherwise a message could sit unread.
"""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path
from typing import Callable, Sequence

import msgspec
import zmq

from ipc.curve import CurveClient, CurveServer, apply_client, apply_server
from ipc.envelope import FrameLike
from ipc.errors import Unavailable

SEND_HWM = 100_000
RECV_HWM = 100_000
MAX_MESSAGE_BYTES = 256 * 1024 * 1024
# What a client may send the kernel (its front socket): requests, not swap images.
FRONT_MAX_MESSAGE_BYTES = 8 * 1024 * 1024
DRAIN_BATCH = 512
DRAIN_BYTES = 32 * 1024 * 1024
# Flags as plain ints: pyzmq's enum arithmetic (and its send_multipart /
# recv_multipart sugar) cost more than the sends and receives themselves —
# about half of a hop's I/O time in the kernel.
_NOBLOCK = int(zmq.NOBLOCK)
_NOBLOCK_MORE = int(zmq.NOBLOCK | zmq.SNDMORE)
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)


class SocketLimits(msgspec.Struct, frozen=True):
    send_hwm: int = SEND_HWM
    recv_hwm: int = RECV_HWM
    max_message_bytes: int = MAX_MESSAGE_BYTES


def _apply_limits(sock: zmq.Socket[bytes], limits: SocketLimits) -> None:
    sock.setsockopt(zmq.SNDHWM, limits.send_hwm)
    sock.setsockopt(zmq.RCVHWM, limits.recv_hwm)
    sock.setsockopt(zmq.MAXMSGSIZE, limits.max_message_bytes)
    sock.setsockopt(zmq.LINGER, 0)


def prepare_ipc_path(endpoint: str) -> None:
    """Make the directory of an ipc:// endpoint owner-only, and clear a stale
    socket file: one no process listens on (its kernel was killed). A live one
    is another process's: ZeroMQ's bind would unlink it and cut that process
    off from its clients (issue 13 #1), so that is refused."""
    if not endpoint.startswith("ipc://"):
        return
    path = Path(endpoint[len("ipc://"):])
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    if path.is_symlink() or path.exists():
        if _listened_on(path):
            raise Unavailable(f"{endpoint} is in use by another process (another llmos kernel?)")
        path.unlink()


def _listened_on(path: Path) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.setblocking(False)
    try:
        s.connect(str(path))
    except BlockingIOError:
        return True  # a listener with a full backlog: alive
    except OSError:
        return False  # refused (nobody listens), not a socket, gone
    finally:
        s.close()
    return True


def ipc_path_id(endpoint: str) -> tuple[int, int, int] | None:
    """Which file an ipc:// endpoint's path is now (device, inode, ctime: an
    inode number is reused at once after an unlink); None when not ipc:// or
    absent. Taken right after bind, it names the file we made."""
    if not endpoint.startswith("ipc://"):
        return None
    try:
        st = os.lstat(endpoint[len("ipc://"):])
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_ctime_ns


def remove_ipc_path(endpoint: str, made: tuple[int, int, int] | None) -> None:
    """Remove the socket file of an ipc:// endpoint if it is still the one
    `made` names (`ipc_path_id` after our bind): a file someone else bound at
    that path since is theirs and stays."""
    if made is not None and ipc_path_id(endpoint) == made:
        Path(endpoint[len("ipc://"):]).unlink(missing_ok=True)


def bind_router(ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str,
                limits: SocketLimits = SocketLimits(), curve: CurveServer | None = None,
                zap_domain: str = "") -> zmq.Socket[bytes]:
    """A ROUTER that never drops silently (ROUTER_MANDATORY) and never lets a
    second peer take over a connected peer's identity (no ROUTER_HANDOVER:
    with it, a peer that guessed or chose an identity got that peer's replies;
    issue 12 #2); a CURVE server on tcp:// when given keys, in ZAP domain
    `zap_domain` (a ZAP handler must run on `ctx`: `ipc.curve.start_zap`).
    A restarted peer therefore connects under a fresh identity."""
    sock = ctx.socket(zmq.ROUTER)
    _apply_limits(sock, limits)
    if curve is not None and endpoint.startswith("tcp://"):
        if not zap_domain:
            raise ValueError("a CURVE ROUTER needs its ZAP domain")
        apply_server(sock, curve, zap_domain)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    prepare_ipc_path(endpoint)
    sock.bind(endpoint)
    if endpoint.startswith("ipc://"):
        os.chmod(endpoint[len("ipc://"):], 0o600)
    return sock


def connect_dealer(ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str, identity: bytes | None = None,
                   limits: SocketLimits = SocketLimits(), curve: CurveClient | None = None) -> zmq.Socket[bytes]:
    sock = ctx.socket(zmq.DEALER)
    _apply_limits(sock, limits)
    if curve is not None and endpoint.startswith("tcp://"):
        apply_client(sock, curve)
    if identity:
        sock.setsockopt(zmq.IDENTITY, identity)
    sock.connect(endpoint)
    return sock


class _Reading:
    """`Channel.reading`'s context: a class, not a @contextmanager generator
    (the kernel's pump enters two on every wake-up; a generator's context
    was about eight Python calls, a tenth of the pump's own)."""

    __slots__ = ("_ch",)

    def __init__(self, ch: Channel):
        self._ch = ch

    def __enter__(self) -> None:
        self._ch._reading = True

    def __exit__(self, *exc: object) -> None:
        self._ch._reading = False


class Channel:
    """Async batch I/O over one zmq socket, on the running asyncio loop."""

    def __init__(self, sock: zmq.Socket[bytes], on_readable: Callable[[], None], *,
                 reader_reschedules: bool = False):
        """`on_readable` is called on the loop when input is pending, and drains
        synchronously. A callback that drains one batch is called again by the
        channel while input is pending; one that keeps itself scheduled until
        the socket is empty (`reader_reschedules`, the kernel's pump) is not —
        two mechanisms re-arming the same reader multiply it, turn after turn."""
        self.sock = sock
        self._on_readable = on_readable
        self._loop = asyncio.get_running_loop()
        self._fd: int = int(sock.getsockopt(zmq.FD))
        self._loop.add_reader(self._fd, self._on_fd)
        self._closed = False
        self._read_scheduled = False
        self._rearm = not reader_reschedules
        # True while the reader drains and answers (see `reading`).
        self._reading = False
        # Why the last send failed: True for a full queue, False for an unknown peer.
        self.full = False

    def pending_input(self) -> bool:
        return bool(self.sock.getsockopt(_EVENTS) & _POLLIN)  # type: ignore[operator]

    def drain(self, limit: int = DRAIN_BATCH, max_bytes: int = DRAIN_BYTES) -> list[list[zmq.Frame]]:
        """Everything readable now, up to `limit` messages or about `max_bytes`
        (a batch of large frames is held at once), without blocking."""
        out: list[list[zmq.Frame]] = []
        recv = self.sock.recv
        nbytes = 0
        try:
            while len(out) < limit and nbytes < max_bytes:
                frame = recv(_NOBLOCK, copy=False)
                parts = [frame]
                while frame.more:  # the rest of a multipart message is already here
                    frame = recv(_NOBLOCK, copy=False)
                    parts.append(frame)
                    nbytes += len(frame)
                out.append(parts)
        except zmq.Again:
            pass
        return out

    def send(self, frames: Sequence[FrameLike | zmq.Frame]) -> bool:
        """Send without blocking. False when the peer is unknown or its queue is
        full (ROUTER_MANDATORY): the caller decides what a drop means."""
        send = self.sock.send
        last = len(frames) - 1
        self.full = False
        try:
            # Atomic like send_multipart: a refused message is refused at its
            # first part (HWM, or an unknown peer under ROUTER_MANDATORY).
            # copy=True: a small bytes frame is cheaper copied than wrapped
            # in a zmq.Frame; a received Frame passed on is never copied.
            for i, frame in enumerate(frames):
                send(frame, _NOBLOCK_MORE if i < last else _NOBLOCK, copy=True)
        except zmq.Again:
            self.full = True  # the peer is there, its queue is not (HWM)
            return False
        except zmq.error.ZMQError:
            return False
        finally:
            if not self._reading and not self._closed and not self._read_scheduled and self.pending_input():
                # One deferred read at a time: a callback per send would
                # pile up thousands under a flood and starve the timers
                # (the kernel's heartbeats) behind them.
                self._read_scheduled = True
                self._loop.call_soon(self._scheduled_read)
        return True

    def reading(self) -> _Reading:
        """For a reader that, before it returns, drains until no input is
        pending (the kernel's pump): sends inside need not check for input
        their send may have hidden — a getsockopt per send, a tenth of a
        kernel hop."""
        return _Reading(self)

    def _on_fd(self) -> None:
        """The FD fired: read, and come back while more than a batch waits
        (the edge that fired will not fire again for what is already queued)."""
        if self._closed:
            return
        self._on_readable()
        if self._rearm and not self._closed and not self._read_scheduled and self.pending_input():
            self._read_scheduled = True
            self._loop.call_soon(self._scheduled_read)

    def _scheduled_read(self) -> None:
        self._read_scheduled = False
        if not self._closed:
            self._on_readable()
            # A reader drains a bounded batch: while more is queued, come back
            # (one callback per turn of the loop, so timers still run).
            if self._rearm and not self._closed and not self._read_scheduled and self.pending_input():
                self._read_scheduled = True
                self._loop.call_soon(self._scheduled_read)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._loop.remove_reader(self._fd)
        self.sock.close(linger=0)
