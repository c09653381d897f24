"""Socket activation, as systemd does it: the kernel binds a child's
listening address once and hands the socket to every instance (`pass_fds`
and LLMOS_LISTEN_FD), keeping it open for its own lifetime.

All instances then accept from one accept queue that the kernel owns: a
killed instance loses only the connections it had accepted, never queued
ones (with SO_REUSEPORT each listener has its own queue, and connections
queued on a dying one are reset), and while every instance restarts new
connections wait in the queue instead of being refused.
"""

from __future__ import annotations

import os
import socket

from ipc.errors import BadRequest

LISTEN_FD_ENV = "LLMOS_LISTEN_FD"
BACKLOG = 2048  # uvicorn's default: connections that may wait while no instance accepts


def parse_listen(listen: str) -> tuple[str, int]:
    """"HOST:PORT" or ":PORT" (host 127.0.0.1); "[::1]:PORT" for IPv6."""
    host, _, port = listen.rpartition(":")
    try:
        number = int(port)
    except ValueError:
        raise BadRequest(f"a listening address is HOST:PORT or :PORT, got {listen!r}") from None
    if not 0 <= number <= 65535:
        raise BadRequest(f"port {number} of {listen!r} is not in [0, 65535]")
    return host.strip("[]") or "127.0.0.1", number


def bind_listener(listen: str) -> socket.socket:
    """A socket listening on `listen`; `OSError` naming the address when it
    cannot be bound (in use, not an address of this host, no permission)."""
    host, port = parse_listen(listen)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=BACKLOG)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot listen on {listen}: {exc.strerror or exc}") from None


def inherited_listener() -> socket.socket | None:
    """The listening socket handed down by the kernel, if any."""
    fd = os.environ.get(LISTEN_FD_ENV)
    if not fd:
        return None
    return socket.socket(fileno=int(fd))
