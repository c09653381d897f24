"""Tokens/s streamed through the HTTP gateway versus through the SDK.

    python -m tools.bench.gateway [--quick] [--json PATH] [--model demo|DIR]

One llmos (security, memory, CPU driver, scheduler, gateway; auth on), one
workload — C concurrent streaming greedy requests of T tokens each, in
rounds that alternate SDK and HTTP so machine noise hits both alike. The
figure is http_tps / sdk_tps (target ≥ 0.9): what the HTTP layer (uvicorn,
JSON, SSE, the gateway's extra hop through the kernel) costs on top of the SDK.
"""

from __future__ import annotations

import json
import socket
import sys
import tempfile
import time
from pathlib import Path

import anyio
import httpx

from ipc.protocol import security as sec
from kernel.config import default_children
from sdk.client import AsyncClient
from tools.testing import running_llmos
from tools.bench.common import parser, print_table, write_result

PROMPT = "The operating system schedules"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _sdk_round(client: AsyncClient, concurrency: int, tokens: int) -> tuple[int, float]:
    got = 0

    async def one() -> None:
        nonlocal got
        async for chunk in client.stream_generate(PROMPT, max_tokens=tokens, temperature=0.0, ignore_eos=True):
            got += len(chunk.token_ids)
    t = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for _ in range(concurrency):
            tg.start_soon(one)
    return got, time.perf_counter() - t


async def _http_round(http: httpx.AsyncClient, key: str, concurrency: int, tokens: int) -> tuple[int, float]:
    got = 0

    async def one() -> None:
        nonlocal got
        body = {"prompt": PROMPT, "max_tokens": tokens, "temperature": 0, "stream": True, "ignore_eos": True,
                "stream_options": {"include_usage": True}}
        async with http.stream("POST", "/v1/completions", json=body,
                               headers={"Authorization": f"Bearer {key}"}) as r:
            if r.status_code != 200:
                raise RuntimeError(f"HTTP {r.status_code}: {await r.aread()!r}")
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    usage = json.loads(line[6:]).get("usage")
                    if usage:
                        got += usage["completion_tokens"]
    t = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for _ in range(concurrency):
            tg.start_soon(one)
    return got, time.perf_counter() - t


async def run(model: str, quick: bool) -> dict[str, float]:
    concurrency, tokens, rounds = (8, 32, 2) if quick else (16, 64, 4)
    home = Path(tempfile.mkdtemp(prefix="llmos-bench-gw-", dir="/tmp"))
    port = _free_port()
    children = default_children(model, {"cpu": 1}, f"127.0.0.1:{port}", kv_cache_mb=128)
    sdk_tok = http_tok = 0
    sdk_s = http_s = 0.0
    async with running_llmos(home, children, auth=True, ready_timeout=900) as llmos:
        key = (await llmos.client.call(sec.SECURITY, sec.CreateKey("bench", ["generate"]))).api_key
        async with await AsyncClient.connect(home=home, api_key=key) as client, \
                httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=600) as http:
            await _sdk_round(client, 2, 4)  # warm both paths (first step, tokenizer, connections)
            await _http_round(http, key, 2, 4)
            for i in range(rounds):
                for which in (("sdk", "http") if i % 2 == 0 else ("http", "sdk")):
                    if which == "sdk":
                        n, s = await _sdk_round(client, concurrency, tokens)
                        sdk_tok, sdk_s = sdk_tok + n, sdk_s + s
                    else:
                        n, s = await _http_round(http, key, concurrency, tokens)
                        http_tok, http_s = http_tok + n, http_s + s
    expected = rounds * concurrency * tokens
    if sdk_tok != expected or http_tok != expected:
        raise RuntimeError(f"token counts differ from the workload: sdk {sdk_tok}, http {http_tok}, want {expected}")
    sdk_tps, http_tps = sdk_tok / sdk_s, http_tok / http_s
    return {"sdk_tps": round(sdk_tps, 1), "http_tps": round(http_tps, 1),
            "http_vs_sdk_ratio": round(http_tps / sdk_tps, 3), "concurrency": concurrency, "tokens": tokens}


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__.splitlines()[1])
    ap.add_argument("--model", default="demo")
    args = ap.parse_args(argv)
    f = anyio.run(run, args.model, args.quick, backend="asyncio", backend_options={"use_uvloop": True})
    print_table(f"gateway: {f['concurrency']:.0f} concurrent streams × {f['tokens']:.0f} tokens, model {args.model}",
                [("path", "tokens/s"), ("SDK", f"{f['sdk_tps']:,.1f}"), ("HTTP gateway (SSE)", f"{f['http_tps']:,.1f}")])
    print(f"\n  http_vs_sdk_ratio: {f['http_vs_sdk_ratio']:.2f}  (target ≥ 0.9)")
    write_result(args.json, "gateway", {"http_vs_sdk_ratio": f["http_vs_sdk_ratio"], "sdk_tps": f["sdk_tps"],
                                        "http_tps": f["http_tps"]}, {"quick": args.quick, "model": args.model})
    return 0


if __name__ == "__main__":
    sys.exit(main())
