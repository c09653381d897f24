"""Echo round trips through the kernel versus a direct DEALER↔ROUTER pair.

    python -m tools.bench.routing [--quick] [--json PATH]

Both paths use the same client (a plain blocking zmq DEALER) and an equally
bare echo server that drains its socket in batches, so the difference between
them is the kernel hop: header decode, routing-id rewrite, pending table,
re-encode, twice per round trip. A third row runs the real SDK and `Service`
base (AsyncClient → kernel → services.echo) for context; it is not a figure.

Figures: kernel_rps, direct_rps, throughput_ratio_vs_direct (64 in flight),
hop_latency_p50_us / hop_latency_p99_us (round-trip latency the kernel adds,
one in flight: kernel p50 − direct p50, and likewise p99), and
auth_throughput_ratio: a second kernel with the capability check on (every
request carries a token; kernel/guard.py) against the first, rounds interleaved.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import secrets
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import zmq

from ipc import codec
from common.capability import mint
from ipc.envelope import PROTOCOL_VERSION, Header, Kind, decode_header, encode_header
from common.home import root_key_path
from common.keyfile import load_or_create_key
from ipc.protocol import kernel as kp
from ipc.protocol.echo import Echo
from tools.bench.common import parser, percentile, print_table, write_result

PAYLOAD = b"x" * 64


def _direct_server(endpoint: str) -> None:
    """A bare ROUTER echo server: answers [id, b"", header, body] with a REPLY header."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.bind(endpoint)
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    while True:
        poller.poll()
        try:
            while True:
                frames = sock.recv_multipart(zmq.NOBLOCK)
                h = decode_header(frames[2])
                reply = encode_header(Header(PROTOCOL_VERSION, Kind.REPLY, h.msg_id, op="EchoReply"))
                sock.send_multipart([frames[0], b"", reply, frames[3]])
        except zmq.Again:
            pass


def _kernel_proc(front: str, back: str, secret: str, auth_home: str = "") -> None:
    import anyio

    from kernel.config import KernelConfig
    from kernel.guard import Guard
    from kernel.router import Kernel
    from common.logs import configure

    configure("kernel", None, stderr=False)
    kernel = Kernel(KernelConfig(), front, back, secret)
    if auth_home:
        kernel.router.guard = Guard.load(Path(auth_home), kernel.router.registry.service_of_instance)
    anyio.run(kernel.serve, backend="asyncio", backend_options={"use_uvloop": True})


def _bare_service(back: str, secret: str) -> None:
    """The same bare echo, registered with the kernel as service `echo`."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, b"echo-bare")
    sock.connect(back)
    ready = kp.Ready("echo", "echo-bare", os.getpid(), secret, ops=["Echo"])
    sock.send_multipart([b"", encode_header(Header(PROTOCOL_VERSION, Kind.READY, 1, op="Ready")), codec.encode(ready)])
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    last_beat = time.monotonic()
    beat = encode_header(Header(PROTOCOL_VERSION, Kind.HEARTBEAT))
    while True:
        poller.poll(250)
        now = time.monotonic()
        if now - last_beat > 0.5:
            sock.send_multipart([b"", beat])
            last_beat = now
        try:
            while True:
                frames = sock.recv_multipart(zmq.NOBLOCK)
                h = decode_header(frames[1])
                if h.kind != Kind.REQUEST:
                    continue
                reply = encode_header(Header(PROTOCOL_VERSION, Kind.REPLY, h.msg_id, op="EchoReply"))
                sock.send_multipart([b"", reply, frames[2]])
        except zmq.Again:
            pass


class Probe:
    """The client: a blocking DEALER sending pre-encoded Echo requests."""

    def __init__(self, endpoint: str, dst: str, token: bytes = b""):
        self.token = token
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.dst = dst
        self.body = codec.encode(Echo(PAYLOAD))
        self._id = 0

    def _send(self) -> None:
        self._id += 1
        h = encode_header(Header(PROTOCOL_VERSION, Kind.REQUEST, self._id, dst=self.dst, op="Echo", token=self.token))
        self.sock.send_multipart([b"", h, self.body])

    def _recv(self) -> None:
        frames = self.sock.recv_multipart()
        if decode_header(frames[1]).kind != Kind.REPLY:
            raise RuntimeError(f"unexpected answer: {decode_header(frames[1])}")

    def wait_ready(self, timeout: float = 30.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            self._send()
            if self.sock.poll(200):
                frames = self.sock.recv_multipart()
                if decode_header(frames[1]).kind == Kind.REPLY:
                    while self.sock.poll(50):
                        self.sock.recv_multipart()
                    return
        raise TimeoutError(f"{self.dst} never answered")

    def latency_us(self, n: int) -> list[float]:
        out = []
        for _ in range(n):
            t = time.perf_counter_ns()
            self._send()
            self._recv()
            out.append((time.perf_counter_ns() - t) / 1000)
        return out

    def throughput(self, n: int, in_flight: int = 64) -> float:
        t = time.perf_counter()
        for _ in range(in_flight):
            self._send()
        for i in range(n):
            self._recv()
            if i + in_flight < n:
                self._send()
        return n / (time.perf_counter() - t)

    def close(self) -> None:
        self.sock.close()
        self.ctx.term()


def _sdk_row(front: str, back: str, secret: str, home: Path, n_lat: int, n_tp: int) -> tuple[float, float]:
    """Round trips through the real SDK and Service base (context, not a figure)."""
    import anyio

    from sdk.client import AsyncClient

    env = {"LLMOS_BOOT_SECRET": secret, "LLMOS_BACK": back, "LLMOS_INSTANCE": "echo-sdk", "LLMOS_HOME": str(home)}
    proc = mp.get_context("spawn").Process(target=_run_echo_service, args=(env,), daemon=True)
    proc.start()

    async def run() -> tuple[float, float]:
        async with await AsyncClient.connect(front) as c:
            end = time.monotonic() + 30
            while "echo-sdk" not in {i.instance for i in await c.services()}:
                if time.monotonic() > end:
                    raise TimeoutError("echo-sdk never registered")
                await anyio.sleep(0.05)
            lat = []
            for _ in range(n_lat):
                t = time.perf_counter_ns()
                await c.call("echo-sdk", Echo(PAYLOAD))
                lat.append((time.perf_counter_ns() - t) / 1000)
            t0 = time.perf_counter()
            sem = anyio.Semaphore(64)

            async def one() -> None:
                async with sem:
                    await c.call("echo-sdk", Echo(PAYLOAD))
            async with anyio.create_task_group() as tg:
                for _ in range(n_tp):
                    tg.start_soon(one)
            return percentile(lat, 50), n_tp / (time.perf_counter() - t0)

    try:
        return anyio.run(run, backend="asyncio", backend_options={"use_uvloop": True})
    finally:
        proc.kill()
        proc.join()


def _run_echo_service(env: dict[str, str]) -> None:
    os.environ.update(env)
    import anyio

    from common.logs import configure
    from services.echo.service import EchoService

    configure("echo-sdk", None, stderr=False)
    anyio.run(EchoService().run, backend="asyncio", backend_options={"use_uvloop": True})


def main(argv: list[str] | None = None) -> int:
    args = parser(__doc__.splitlines()[1]).parse_args(argv)
    n_lat, n_tp, rounds = (2000, 20000, 1) if args.quick else (10000, 100000, 3)
    tmp = Path(tempfile.mkdtemp(prefix="llmos-bench-", dir="/tmp"))
    front, back, direct = (f"ipc://{tmp}/front.sock", f"ipc://{tmp}/back.sock", f"ipc://{tmp}/direct.sock")
    secret = secrets.token_hex(16)
    auth_home = tmp / "auth"
    a_front, a_back = f"ipc://{tmp}/a-front.sock", f"ipc://{tmp}/a-back.sock"
    token = mint(load_or_create_key(root_key_path(auth_home)), "bench", "bench", ["echo"], 3600)
    spawn = mp.get_context("spawn")
    procs = [spawn.Process(target=_direct_server, args=(direct,), daemon=True),
             spawn.Process(target=_kernel_proc, args=(front, back, secret), daemon=True),
             spawn.Process(target=_kernel_proc, args=(a_front, a_back, secret, str(auth_home)), daemon=True)]
    for p in procs:
        p.start()
    time.sleep(0.5)
    procs += [spawn.Process(target=_bare_service, args=(back, secret), daemon=True),
              spawn.Process(target=_bare_service, args=(a_back, secret), daemon=True)]
    procs[-2].start()
    procs[-1].start()
    try:
        d, k, a = Probe(direct, "echo"), Probe(front, "echo"), Probe(a_front, "echo", token)
        d.wait_ready()
        k.wait_ready()
        a.wait_ready()
        # Interleave the two paths round by round so machine noise hits both alike.
        d_lat: list[float] = []
        k_lat: list[float] = []
        d_tp: list[float] = []
        k_tp: list[float] = []
        for _ in range(rounds):
            d_lat += d.latency_us(n_lat)
            k_lat += k.latency_us(n_lat)
            d_tp.append(d.throughput(n_tp))
            k_tp.append(k.throughput(n_tp))
        # Auth on vs off: short rounds, alternating which goes first, best of each
        # (the two kernels differ only in the guard, so noise is the enemy here).
        a_tp: list[float] = []
        ka_tp: list[float] = []
        for i in range(8):
            pair = [(a, a_tp), (k, ka_tp)]
            for probe, out in (pair if i % 2 else pair[::-1]):
                out.append(probe.throughput(n_tp // 4))
        d.close()
        k.close()
        a.close()
        sdk_p50, sdk_rps = _sdk_row(front, back, secret, tmp, n_lat // 4, n_tp // 10)
    finally:
        for p in procs:
            p.kill()
            p.join()
    direct_rps, kernel_rps, auth_rps = max(d_tp), max(k_tp), max(a_tp)
    figures = {
        "kernel_rps": round(kernel_rps),
        "direct_rps": round(direct_rps),
        "throughput_ratio_vs_direct": round(kernel_rps / direct_rps, 3),
        "hop_latency_p50_us": round(percentile(k_lat, 50) - percentile(d_lat, 50), 1),
        "hop_latency_p99_us": round(percentile(k_lat, 99) - percentile(d_lat, 99), 1),
        "auth_throughput_ratio": round(auth_rps / max(ka_tp), 3),
    }
    rows = [("path", "rps (64 in flight)", "p50 µs (1 in flight)", "p99 µs")]
    rows.append(("direct DEALER↔ROUTER", f"{direct_rps:,.0f}", f"{percentile(d_lat, 50):.1f}",
                 f"{percentile(d_lat, 99):.1f}"))
    rows.append(("through the kernel", f"{kernel_rps:,.0f}", f"{percentile(k_lat, 50):.1f}",
                 f"{percentile(k_lat, 99):.1f}"))
    rows.append(("through the kernel, auth on", f"{auth_rps:,.0f}", "", ""))
    rows.append(("  (auth off, same rounds)", f"{max(ka_tp):,.0f}", "", ""))
    rows.append(("SDK + Service base (context)", f"{sdk_rps:,.0f}", f"{sdk_p50:.1f}", ""))
    print_table(f"routing: echo round trips ({'quick' if args.quick else 'full'}; best of {rounds} for rps)", rows)
    print(f"\n  throughput ratio vs direct: {figures['throughput_ratio_vs_direct']:.2f}  (target ≥ 0.6)")
    print(f"  round trip added by the kernel: p50 {figures['hop_latency_p50_us']:.1f} µs (target ≤ 100), "
          f"p99 {figures['hop_latency_p99_us']:.1f} µs")
    print(f"  throughput with token verification vs without: {figures['auth_throughput_ratio']:.2f}  (target ≥ 0.9)")
    write_result(args.json, "routing", figures, {
        "quick": args.quick, "sdk_context": {"rps": round(sdk_rps), "p50_us": round(sdk_p50, 1)}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
