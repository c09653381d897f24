"""Fuzz a running llmos: a random-bytes flooder on the kernel's client socket
and on its service socket (registered with the real boot secret, then wrong
payloads), and a hypothesis fuzzer on the gateway's HTTP endpoints — while a
prober keeps sending well-formed traffic that must keep succeeding.

    python -m tools.chaos.fuzz [--frames N] [--http-examples N] [--seed N] [--home DIR]

attaches to the llmos under LLMOS_HOME (start one with `llmos up --http :8000`).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import msgspec
import zmq

from ipc.envelope import PROTOCOL_VERSION, Header, Kind, decode_header, encode_header
from ipc.errors import Error, LlmosError
from common.home import back_endpoint, front_endpoint, llmos_home, logs_dir
from ipc.protocol import kernel as kp
from ipc.protocol import security as sec
from ipc.protocol.echo import Echo, EchoReply
from sdk.client import AsyncClient
from tools.chaos.frames import malformed

# Codes a malformed frame may be answered with; `internal` means something broke.
ANSWER_CODES = {"bad_request", "unauthorized", "forbidden", "not_found", "deadline_exceeded", "unavailable",
                "overloaded"}


@dataclass
class FloodStats:
    socket: str
    sent: int = 0
    answers: Counter[str] = field(default_factory=Counter)  # by kind, and error code
    unexpected: list[str] = field(default_factory=list)
    seconds: float = 0.0


def flood(endpoint: str, socket_name: str, frames: int, seed: int, *, token: bytes = b"",
          secret: str = "", rate: float = 0.0) -> FloodStats:
    """Send `frames` malformed messages on a fresh DEALER (blocking; run it in
    a worker thread) and classify every answer. With `secret`, register as
    service `fuzz` first (and again whenever a fuzzed frame unregistered it),
    so the payloads get past the registration check. `rate`: frames per
    second at most (0: as fast as the kernel takes them)."""
    stats = FloodStats(socket_name)
    rng = random.Random(seed)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, 100_000)
    sock.connect(endpoint)
    began = time.monotonic()
    try:
        if secret:
            _register(sock, secret)
        registered_at = time.monotonic()
        for k in range(frames):
            if rate and (ahead := began + k / rate - time.monotonic()) > 0:
                time.sleep(ahead)  # pacing a load generator (a worker thread), not waiting for a condition
            sock.send_multipart(malformed(rng, token=token))
            stats.sent += 1
            while sock.poll(0):
                if (_classify(sock, stats, service=bool(secret)) == Kind.DISCONNECT and secret
                        and time.monotonic() > registered_at + 0.5):
                    # A fuzzed frame unregistered us (each refused frame since says so too: once is enough).
                    _send_ready(sock, secret)
                    registered_at = time.monotonic()
                    stats.answers["re-registered"] += 1
        # The last answers; a registered fuzzer goes on hearing heartbeats, so bounded.
        end = time.monotonic() + 10.0
        while time.monotonic() < end and sock.poll(500):
            if _classify(sock, stats) == Kind.HEARTBEAT:
                break
    finally:
        sock.close()
        ctx.term()
    stats.seconds = time.monotonic() - began
    return stats


def _send_ready(sock: zmq.Socket[bytes], secret: str) -> None:
    ready = kp.Ready("fuzz", f"fuzz-{os.getpid()}", os.getpid(), secret)
    sock.send_multipart([b"", encode_header(Header(PROTOCOL_VERSION, Kind.READY, 1, op="Ready")),
                         msgspec.msgpack.encode(ready)])


def _register(sock: zmq.Socket[bytes], secret: str) -> None:
    _send_ready(sock, secret)
    if not sock.poll(10_000):
        raise TimeoutError("the kernel did not answer READY")
    frames = sock.recv_multipart()
    if decode_header(frames[1]).kind != Kind.REPLY:
        raise RuntimeError(f"registration refused: {frames}")


def _classify(sock: zmq.Socket[bytes], stats: FloodStats, *, service: bool = False) -> Kind | None:
    """Read one answer, count it, and return its kind. As a `service`, answer
    the kernel's heartbeats (a client must not: the kernel echoes a client's
    heartbeat, and answering that echo would ping-pong forever)."""
    frames = sock.recv_multipart()
    try:
        header = decode_header(frames[1])
    except (LlmosError, IndexError) as exc:
        stats.unexpected.append(f"undecodable answer: {exc}")
        return None
    kind = Kind(header.kind)
    if kind == Kind.HEARTBEAT and service:
        sock.send_multipart([b"", encode_header(Header(PROTOCOL_VERSION, Kind.HEARTBEAT, 0))])
    if kind != Kind.ERROR:
        stats.answers[kind.name.lower()] += 1
        return kind
    try:
        err = msgspec.msgpack.decode(frames[2], type=Error)
    except (msgspec.DecodeError, IndexError) as exc:
        stats.unexpected.append(f"undecodable error: {exc}")
        return kind
    stats.answers[str(err.code)] += 1
    if str(err.code) not in ANSWER_CODES or not err.message:
        stats.unexpected.append(f"{err.code}: {err.message}")
    return kind


def boot_secret(pid: int) -> str:
    """A supervised child's boot secret, from its environment (same user only)."""
    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    for kv in env:
        if kv.startswith(b"LLMOS_BOOT_SECRET="):
            return kv.split(b"=", 1)[1].decode()
    raise LookupError(f"process {pid} has no LLMOS_BOOT_SECRET")


@dataclass
class Prober:
    """Well-formed traffic during the fuzz: echo calls as the admin and short
    generations as a tenant. Every one must succeed."""

    ok: int = 0
    generations: int = 0
    failures: list[str] = field(default_factory=list)

    async def run(self, admin: AsyncClient, tenant: AsyncClient | None, stop: anyio.Event) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            try:
                reply = await admin.call("echo", Echo(b"probe %d" % n), timeout=10)
                if not isinstance(reply, EchoReply) or reply.payload != b"probe %d" % n:
                    self.failures.append(f"echo answered {reply!r}")
                self.ok += 1
                if tenant is not None and n % 10 == 0:
                    done = await tenant.generate("probe", max_tokens=4, temperature=0.0, timeout=60)
                    if done.usage.completion_tokens < 1:
                        self.failures.append(f"generation produced nothing: {done}")
                    self.generations += 1
            except LlmosError as exc:
                self.failures.append(f"{exc.code}: {exc.message}")
            await anyio.sleep(0.01)  # a steady trickle, not a flood of its own


def kernel_exceptions(home: Path) -> int:
    """How many messages the kernel's last-resort handler caught (each one a
    bug: malformed input must be answered `bad_request` or dropped on purpose)."""
    log = logs_dir(home) / "kernel.log"
    if not log.exists():
        return 0
    with open(log, "rb") as f:
        return sum(1 for line in f if b'"kernel.message_failed"' in line)


def kernel_verdicts(home: Path, instances: list[str]) -> list[str]:
    """Why the kernel took these instances down or spared them, from its log."""
    log = logs_dir(home) / "kernel.log"
    if not instances or not log.exists():
        return []
    found = []
    with open(log, "rb") as f:
        for line in f:
            if b'"kernel.instance_down"' in line or b'"kernel.instance_starved"' in line:
                ev = json.loads(line)
                if ev.get("instance") in instances:
                    found.append(f"{ev['instance']}: {ev.get('reason') or 'starved, kept'} at {ev.get('timestamp')}")
    return found


async def run_fuzz(home: Path, *, frames: int, http_examples: int, seed: int = 0,
                   rate: float = 0.0) -> dict[str, Any]:
    """Fuzz the llmos running under `home`; return the figures and findings."""
    from tools.chaos.http_fuzz import fuzz_http

    exceptions_before = kernel_exceptions(home)
    async with await AsyncClient.connect(home=home) as admin:
        before = await admin.status()
        key = (await admin.call(sec.SECURITY, sec.CreateKey(f"fuzz{seed}", ["generate"], note="fuzz"))).api_key
        async with await AsyncClient.connect(home=home, api_key=key) as tenant:
            token = tenant.connection.token
            secret = boot_secret(next(i.pid for i in before.instances if i.pid))
            gateway = next((i for i in before.instances if i.service == "gateway"), None)
            prober = Prober()
            stop = anyio.Event()
            results: dict[str, Any] = {}

            async def job(name: str, fn: Any, *args: Any) -> None:
                results[name] = await anyio.to_thread.run_sync(fn, *args)

            async with anyio.create_task_group() as tg:
                tg.start_soon(prober.run, admin, tenant, stop)
                async with anyio.create_task_group() as jobs:
                    jobs.start_soon(job, "front", lambda: flood(front_endpoint(home), "front", frames, seed,
                                                                token=token, rate=rate))
                    jobs.start_soon(job, "back", lambda: flood(back_endpoint(home), "back", frames, seed + 1,
                                                               secret=secret, rate=rate))
                    if gateway is not None and http_examples:
                        jobs.start_soon(job, "http", lambda: fuzz_http(str(gateway.meta["http"]), key,
                                                                       http_examples, seed))
                stop.set()
            after = await admin.status()
    pids = {i.instance: i.pid for i in after.instances}
    restarted = sorted(i.instance for i in before.instances if pids.get(i.instance) != i.pid)
    return {
        "seed": seed,
        "rate_per_socket": rate or None,
        "kernel_alive": after.pid == before.pid,
        "kernel_exceptions": kernel_exceptions(home) - exceptions_before,
        "no_service_restarted": not restarted and len(pids) == len(before.instances),
        "restarted": restarted,
        "why": kernel_verdicts(home, restarted),
        "restarts": {i.instance: i.restarts for i in after.instances},
        "probe": {"ok": prober.ok, "generations": prober.generations, "failures": prober.failures},
        "front": _flood_json(results["front"]),
        "back": _flood_json(results["back"]),
        "http": msgspec.to_builtins(results["http"]) if "http" in results else None,
    }


def _flood_json(s: FloodStats) -> dict[str, Any]:
    return {"sent": s.sent, "answers": dict(s.answers), "unexpected": s.unexpected[:20],
            "unexpected_count": len(s.unexpected), "seconds": round(s.seconds, 2),
            "frames_per_s": round(s.sent / s.seconds) if s.seconds else None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--home")
    ap.add_argument("--frames", type=int, default=100_000, help="malformed messages per socket")
    ap.add_argument("--http-examples", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rate", type=float, default=0.0, help="frames per second per socket (0: unpaced)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    out = anyio.run(lambda: run_fuzz(llmos_home(args.home), frames=args.frames, http_examples=args.http_examples,
                                     seed=args.seed, rate=args.rate), backend="asyncio", backend_options={"use_uvloop": True})
    text = json.dumps(out, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0 if fuzz_held(out) else 1


def fuzz_held(out: dict[str, Any]) -> bool:
    http_ok = out["http"] is None or not out["http"]["unexpected"]
    return bool(out["kernel_alive"] and out["no_service_restarted"] and not out["kernel_exceptions"] and not out["probe"]["failures"]
                and not out["front"]["unexpected_count"] and not out["back"]["unexpected_count"] and http_ok)


if __name__ == "__main__":
    raise SystemExit(main())
