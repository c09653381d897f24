"""The abusive clients of `llmos chaos --abuse` that speak through the SDK
or HTTP, and `AttackStats`, which every attack fills (tools/chaos/abuse.py
runs them beside the honest load and the faults; the raw-socket attacks are
in tools/chaos/raw_attacks.py). Each counts what it sent and how it was
answered: a refusal (an error code that says "no"), an answer a fault can
explain (the target was down), or a breach — an answer meaning the attack
worked. Breaches fail the run.
"""

from __future__ import annotations

import itertools
import json
import secrets
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anyio
import msgspec

from ipc.errors import LlmosError
from ipc.protocol import scheduler as sp
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

def filler(n_bytes: int) -> str:
    word = "lorem ipsum "
    return (word * (n_bytes // len(word) + 1))[:n_bytes]


async def oversized_sdk(client: AsyncClient, stats: AttackStats, stop: anyio.Event, *, prompt_bytes: int,
                        period_s: float) -> None:
    """Submits of `prompt_bytes` of text, and of as many prompt ids, through the SDK."""
    text = filler(prompt_bytes)
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


HTTP_REFUSALS = frozenset({400, 401, 403, 408, 413, 429, 431})


async def oversized_http(base_url: str, api_key: str, stats: AttackStats, stop: anyio.Event, *,
                         body_bytes: int, period_s: float) -> None:
    """A `body_bytes` JSON body to the gateway: with a key and a declared
    length, without a key, and chunked (no length to check up front). 4xx
    refusals are counted by status; 2xx and 5xx (but 503) are breaches. A raw
    socket, so an answer the gateway sends before reading the body is read
    (an HTTP client still writing the body sees only the connection close)."""
    url = urlsplit(base_url)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    body = json.dumps({"prompt": filler(body_bytes), "max_tokens": 4}).encode()
    variants = [("with a key", f"Bearer {api_key}", False), ("no key", "", False),
                ("with a key, chunked", f"Bearer {api_key}", True)]
    for k in itertools.count():
        if stop.is_set():
            return
        label, auth, chunked = variants[k % len(variants)]
        what = f"a {len(body) >> 20} MiB HTTP body ({label})"
        stats.sent += 1
        try:
            status = await _raw_post(host, port, auth, body, chunked)
        except OSError as exc:
            stats.other[f"http_{type(exc).__name__}"] += 1  # the gateway was down (a fault)
            status = None
        if status is None:
            pass
        elif status == 0:
            stats.other["http_closed_without_answer"] += 1
        elif status in HTTP_REFUSALS:
            stats.refused[f"http_{status}"] += 1
        elif status == 503:
            stats.other["http_503"] += 1
        else:
            stats.breach(f"{what}: HTTP {status}")
        with anyio.move_on_after(period_s):
            await stop.wait()


async def _raw_post(host: str, port: int, auth: str, body: bytes, chunked: bool, timeout_s: float = 60.0) -> int:
    """POST /v1/completions; the answer's status, or 0 when the connection closed without one."""
    head = ["POST /v1/completions HTTP/1.1", f"Host: {host}:{port}", "Content-Type: application/json",
            "Connection: close", *([f"Authorization: {auth}"] if auth else []),
            "Transfer-Encoding: chunked" if chunked else f"Content-Length: {len(body)}"]
    answer = bytearray()
    with anyio.move_on_after(timeout_s):
        async with await anyio.connect_tcp(host, port) as conn:
            done = anyio.Event()

            async def read() -> None:
                try:
                    while len(answer) < 64 * 1024:
                        answer.extend(await conn.receive())
                except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                    pass
                finally:
                    done.set()

            async with anyio.create_task_group() as tg:
                tg.start_soon(read)
                try:
                    await conn.send(("\r\n".join(head) + "\r\n\r\n").encode())
                    step = 256 * 1024
                    for i in range(0, len(body), step):
                        if done.is_set():
                            break  # answered (or closed) before the whole body went out
                        piece = body[i:i + step]
                        await conn.send(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
                    if chunked and not done.is_set():
                        await conn.send(b"0\r\n\r\n")
                except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                    pass  # the gateway closed while the body was going out: its answer, if any, is read
                await done.wait()
    line = bytes(answer).split(b"\r\n", 1)[0].split()
    return int(line[1]) if len(line) >= 2 and line[0].startswith(b"HTTP/") and line[1].isdigit() else 0


# -- quota bypass ------------------------------------------------------------------------------

QUOTA_MAX_TOKENS = 48  # long enough that every stream of a round overlaps the first


async def _quota_in_force(client: AsyncClient, timeout_s: float = 30.0) -> bool:
    """Two plain Submits at once, until one is refused `overloaded`: the
    scheduler knows the quota (the policy reaches it asynchronously)."""
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
        if "overloaded" in codes:  # one was refused while the other held the quota's one slot
            return True
        await anyio.sleep(0.5)  # a retry's pacing while the policy propagates
    return False


async def quota_bypass(client: AsyncClient, stats: AttackStats, stop: anyio.Event, *, streams: int,
                       period_s: float) -> None:
    """A tenant limited to 1 concurrent request sends `streams` Submits at
    once: one plain, the others claiming to be re-submissions (attempt > 0,
    or resume_ids with a fresh request id). All are sent together and an
    admitted one runs for QUOTA_MAX_TOKENS steps, so two admitted in a round
    ran at once: a bypass. The plain one tells which kind: admitted beside
    another, the quota was not in force at all."""
    stats.figures["quota_in_force"] = float(await _quota_in_force(client))
    worst = 0
    for r in itertools.count():
        if stop.is_set():
            break
        admitted = 0
        plain_admitted = False
        began = time.monotonic()

        async def one(k: int) -> None:
            nonlocal admitted, plain_admitted
            rid = f"qb-{r}-{k}-{secrets.token_hex(3)}"
            submit = sp.Submit(prompt="Once upon a time", max_tokens=QUOTA_MAX_TOKENS, ignore_eos=True,
                               request_id=rid, attempt=0 if k == 0 else 1 + k % 2)
            if k % 3 == 2:
                submit = msgspec.structs.replace(submit, resume_from=1, resume_ids=[5])
            stats.sent += 1
            counted = False
            try:
                async for _ in client.stream(sp.SCHEDULER, submit, timeout=120):
                    if not counted:
                        admitted += 1
                        plain_admitted |= k == 0
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
            stats.breach(f"round {r} (sent at {began - stats.t0:.1f}s): {admitted} of {streams} Submits admitted at "
                         "once (quota 1)" + (", the plain one too: the quota was not in force" if plain_admitted
                                             else ": re-submission claims skipped admission"))
        with anyio.move_on_after(period_s):
            await stop.wait()
    stats.figures["max_admitted_at_once"] = worst
