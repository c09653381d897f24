"""Load: hundreds of concurrent streaming clients, each its own connection
and login. Past the scheduler's admission limits the only error allowed is
`overloaded`; afterwards every process has as many file descriptors as
before (connections are given back), and each one's peak RSS is reported.

    python -m tools.chaos.load [--streams N] [--max-tokens N] [--home DIR] [--json PATH]

attaches to the llmos under LLMOS_HOME.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import anyio

from ipc.errors import LlmosError
from common.home import llmos_home
from ipc.protocol import security as sec
from sdk.client import AsyncClient
from tools.bench.common import percentile
from tools.chaos.procs import open_fds, peak_rss_mb

PROMPTS = ["Once upon a time", "The kernel routes messages", "Paged attention", "Hello, llmos!"]
FD_SETTLE_S = 20.0  # how long closed connections may take to be reaped (zmq closes them asynchronously)
FD_SLACK = 2  # the kernel's own sockets may open or close a few (e.g. a restarted monitor)


async def _fds(client: AsyncClient) -> dict[str, int]:
    st = await client.status()
    out = {i.instance: n for i in st.instances if i.pid and (n := open_fds(i.pid)) is not None}
    if (n := open_fds(st.pid)) is not None:
        out["kernel"] = n
    return out


async def run_load(home: Path, *, streams: int = 200, max_tokens: int = 16, tenants: int = 4,
                   tag: str = "load") -> dict[str, Any]:
    async with await AsyncClient.connect(home=home) as admin:
        keys = [(await admin.call(sec.SECURITY, sec.CreateKey(f"{tag}{t}", ["generate"], note="load"))).api_key
                for t in range(tenants)]
        before = await _fds(admin)
        outcomes: Counter[str] = Counter()
        messages: dict[str, str] = {}
        ttft: list[float] = []
        tokens = 0
        clients: list[AsyncClient] = []
        try:
            async def connect(i: int) -> None:
                clients.append(await AsyncClient.connect(home=home, api_key=keys[i % tenants], timeout=60))

            async with anyio.create_task_group() as tg:
                for i in range(streams):
                    tg.start_soon(connect, i)
            go = anyio.Event()
            began = time.monotonic()

            async def stream(i: int, client: AsyncClient) -> None:
                nonlocal tokens
                await go.wait()
                t0 = time.monotonic()
                first = True
                try:
                    async for ch in client.stream_generate(PROMPTS[i % len(PROMPTS)], max_tokens=max_tokens,
                                                           temperature=0.8, seed=i, priority=i % 3,
                                                           ignore_eos=True):
                        if first and ch.token_ids:
                            ttft.append(time.monotonic() - t0)
                            first = False
                        tokens += len(ch.token_ids)
                        if ch.finish_reason is not None:
                            outcomes[f"finished:{ch.finish_reason}"] += 1
                except LlmosError as exc:
                    outcomes[str(exc.code)] += 1
                    messages.setdefault(str(exc.code), exc.message)

            async with anyio.create_task_group() as tg:
                for i, c in enumerate(clients):
                    tg.start_soon(stream, i, c)
                began = time.monotonic()
                go.set()
            elapsed = time.monotonic() - began
        finally:
            for c in clients:
                await c.aclose()
        st = await admin.status()
        peak = {i.instance: round(r, 1) for i in st.instances if i.pid and (r := peak_rss_mb(i.pid)) is not None}
        if (r := peak_rss_mb(st.pid)) is not None:
            peak["kernel"] = round(r, 1)
        after = await _fds(admin)
        end = time.monotonic() + FD_SETTLE_S
        while _grown(before, after) and time.monotonic() < end:
            await anyio.sleep(0.2)  # a condition polled with a deadline
            after = await _fds(admin)
    return {
        "streams": streams,
        "max_tokens": max_tokens,
        "outcomes": dict(outcomes),
        "error_messages": messages,
        "tokens": tokens,
        "seconds": round(elapsed, 2),
        "tokens_per_s": round(tokens / elapsed, 1) if elapsed else None,
        "ttft_p50_s": round(percentile(ttft, 50), 3) if ttft else None,
        "ttft_p99_s": round(percentile(ttft, 99), 3) if ttft else None,
        "peak_rss_mb": peak,
        "fds_before": before,
        "fds_after": after,
        "fd_growth": _grown(before, after),
    }


def _grown(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in before if k in after and after[k] > before[k] + FD_SLACK}


def load_held(out: dict[str, Any]) -> bool:
    errors = {k for k in out["outcomes"] if not k.startswith("finished:")}
    return errors <= {"overloaded"} and not out["fd_growth"] and "finished:error" not in out["outcomes"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="hundreds of concurrent streams against a running llmos")
    ap.add_argument("--home")
    ap.add_argument("--streams", type=int, default=200)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    out = anyio.run(lambda: run_load(llmos_home(args.home), streams=args.streams, max_tokens=args.max_tokens),
                    backend="asyncio", backend_options={"use_uvloop": True})
    text = json.dumps(out, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0 if load_held(out) else 1


if __name__ == "__main__":
    raise SystemExit(main())
