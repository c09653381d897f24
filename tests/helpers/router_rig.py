"""The kernel's routing without sockets: a `Router` and its `Inbox` with two
recording ports, a fake supervisor and a clock the test moves."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from ipc import codec
from ipc.envelope import PROTOCOL_VERSION, Header, Kind, decode_header, encode_header
from ipc.errors import Error, ErrorCode
from ipc.protocol import kernel as kp
from ipc.protocol.echo import Echo
from kernel.config import KernelConfig
from kernel.inbox import Inbox
from kernel.liveness import Liveness
from kernel.procstat import ProcSample
from kernel.routing import Router

SECRET = "boot-secret"
CLIENT = b"client-1"
WALL_NS = 1_700_000_000 * 10**9


@dataclass
class Sent:
    ident: bytes
    header: Header
    body: list[bytes]

    def error(self) -> Error:
        assert self.header.kind == Kind.ERROR, self.header
        err: Error = codec.error_decoder.decode(self.body[0])
        return err


class FakePort:
    """Records what the router sends; `refuse` makes sends fail, as a full
    queue (`full=True`) or an unknown peer."""

    def __init__(self) -> None:
        self.sent: list[Sent] = []
        self.full = False
        self.refuse: bool | None = None  # None: accept; True: refuse as full; False: as gone

    def send(self, frames: Sequence[Any]) -> bool:
        if self.refuse is not None:
            self.full = self.refuse
            return False
        self.full = False
        assert bytes(frames[1]) == b""
        self.sent.append(Sent(bytes(frames[0]), decode_header(frames[2]), [bytes(f) for f in frames[3:]]))
        return True

    def take(self) -> list[Sent]:
        out, self.sent = self.sent, []
        return out

    def errors(self) -> list[tuple[int, ErrorCode, str]]:
        """(msg_id, code, message) of every error sent since the last take."""
        return [(s.header.msg_id, s.error().code, s.error().message) for s in self.take()]


class FakeChildren:
    def __init__(self) -> None:
        self.ready: list[tuple[str, int]] = []
        self.killed: list[tuple[str, int]] = []
        self.procs: dict[str, ProcSample] = {}

    def on_ready(self, instance: str, pid: int) -> None:
        self.ready.append((instance, pid))

    def kill_quietly(self, instance: str, pid: int) -> None:
        self.killed.append((instance, pid))

    def sample(self, instance: str, pid: int) -> ProcSample | None:
        """What the host says of the instance's process: tests set `procs[instance]`."""
        return self.procs.get(instance)

    def kill(self, target: str, sig_name: str = "SIGKILL") -> list[str]:
        return [target]

    def describe(self) -> list[kp.InstanceInfo]:
        return []

    def admits(self, instance: str, secret: str) -> bool:
        return False  # the rig's services register with the kernel's own secret


class Rig:
    def __init__(self, config: KernelConfig | None = None, services: Sequence[str] = ("echo",)):
        self.now = 1000.0
        self.wall_ns = WALL_NS
        self.shutdowns: list[str] = []
        self.router = Router(config or KernelConfig(auth=False), SECRET, on_shutdown=self.shutdowns.append,
                             clock=lambda: self.now, wall_ns=lambda: self.wall_ns)
        self.front, self.back = FakePort(), FakePort()
        self.router.attach(self.front, self.back)
        self.router.registry.known.update(services)  # what a supervisor would declare
        self.children = FakeChildren()
        self.router.children = self.children
        self.inbox = Inbox(self.router)
        self.liveness = Liveness(self.router, trim=lambda: None)

    def ready(self, instance: str, service: str = "echo", idempotent: Sequence[str] = ("Echo",),
              ident: bytes | None = None, secret: str = SECRET) -> bytes:
        """Register an instance (identity: its name); the Registered reply is
        left on the back port."""
        ident = ident or instance.encode()
        body = codec.encode(kp.Ready(service, instance, 100, secret, ops=["Echo", "EchoOnce"],
                                     idempotent_ops=list(idempotent)))
        self.inbox.on_back([ident, b"", encode_header(Header(PROTOCOL_VERSION, Kind.READY, 1, op="Ready")), body])
        return ident

    def request(self, dst: str, msg_id: int, client: bytes = CLIENT, op: str = "Echo",
                body: bytes | None = None, **header: Any) -> None:
        frames = [client, b"", encode_header(Header(PROTOCOL_VERSION, Kind.REQUEST, msg_id, dst=dst, op=op,
                                                    **header))]
        self.inbox.on_front(frames + [codec.encode(Echo(b"x")) if body is None else body])

    def from_service(self, ident: bytes, msg_id: int, kind: Kind = Kind.REPLY, body: bytes = b"reply") -> None:
        self.inbox.on_back([ident, b"", encode_header(Header(PROTOCOL_VERSION, kind, msg_id, op="EchoReply")), body])

    def control(self, ident: bytes, kind: Kind, front: bool = True) -> None:
        frames = [ident, b"", encode_header(Header(PROTOCOL_VERSION, kind))]
        (self.inbox.on_front if front else self.inbox.on_back)(frames)
