"""The router's ports to the outside, injected so that routing runs without
sockets, processes or an event loop (unit tests pass recording fakes).

`Port` is one of the kernel's two sockets as the router sees it: something
frames are sent through, never read from (`ipc.sockets.Channel` is one).
`Children` is the supervisor's side: told when an instance registered, asked
to kill a hung one (after asking the host whether it was starved of CPU rather
than hung) or to send an operator's signal, and to describe its
children for a status reply.
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence

from ipc.protocol import kernel as kp
from kernel.procstat import ProcSample


class Port(Protocol):
    # Why the last refused send was refused: True for a full queue (the peer
    # is there and behind), False for an unknown peer (gone).
    full: bool

    def send(self, frames: Sequence[Any]) -> bool:
        """Send one message without blocking; False when it was refused."""
        ...


class ClosedPort:
    """The port of a kernel that is not serving: every send is refused."""

    full = False

    def send(self, frames: Sequence[Any]) -> bool:
        return False


class Children(Protocol):
    def on_ready(self, instance: str, pid: int) -> None: ...

    def kill_quietly(self, instance: str, pid: int) -> None: ...

    def sample(self, instance: str, pid: int) -> ProcSample | None:
        """The host's view of a local instance's process (None: not ours, remote, gone)."""
        ...

    def kill(self, target: str, sig_name: str = "SIGKILL") -> list[str]: ...

    def describe(self) -> list[kp.InstanceInfo]: ...

    def admits(self, instance: str, secret: str) -> bool: ...


__all__ = ["Children", "ClosedPort", "Port"]
