"""Figures from a chaos history: fault counts, recovery times (kill → READY,
kill → next token at an affected client), throughput over time."""

from __future__ import annotations

import bisect
import math
from collections import Counter, defaultdict
from collections.abc import Sequence

from tools.bench.common import percentile
from tools.chaos.checker import GATEWAY
from tools.chaos.history import Fault, FaultKind, History, Op, OpKind, Via


def quantiles(values: Sequence[float]) -> dict[str, float | int | None]:
    return {"n": len(values), "p50": _r(percentile(values, 50)), "p95": _r(percentile(values, 95)),
            "p99": _r(percentile(values, 99)), "max": _r(max(values)) if values else None}


def _r(x: float) -> float | None:
    return None if math.isnan(x) else round(x, 4)


def fault_counts(faults: Sequence[Fault]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = defaultdict(dict)
    for f in faults:
        if f.t >= 0:
            out[f.service][f.kind] = out[f.service].get(f.kind, 0) + 1
    return dict(out)


def ready_times(faults: Sequence[Fault]) -> dict[str, dict[str, list[float]]]:
    """kind → service → seconds from the signal (or the node's removal) to the
    replacement's READY (a hang's include the kernel's heartbeat expiry)."""
    out: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for f in faults:
        if f.t >= 0 and f.ready_t >= 0 and f.kind in (FaultKind.KILL, FaultKind.HANG, FaultKind.NODE):
            out[f.kind][f.service].append(f.ready_t - f.t)
    return out


def next_token_times(history: History) -> dict[str, list[float]]:
    """service → for each fault and each client on its path (every client;
    for the gateway, the HTTP clients) that was mid-stream when it fired (it had tokens of a request not yet finished): seconds until that
    client received its next token (from the same request, or — an HTTP
    stream the fault cut — from its retry)."""
    per_client: dict[str, list[Op]] = defaultdict(list)
    for op in history.ops:
        per_client[op.client].append(op)
    times = {c: [op.t for op in ops] for c, ops in per_client.items()}
    via = {op.client: op.via for op in history.ops if op.kind == OpKind.INVOKE}
    out: dict[str, list[float]] = defaultdict(list)
    for f in history.faults:
        if f.t < 0:
            continue
        for c, ops in per_client.items():
            if f.service == GATEWAY and via[c] != Via.HTTP:
                continue  # SDK clients do not go through the gateway
            i = bisect.bisect_right(times[c], f.t) - 1
            if i < 0 or ops[i].kind != OpKind.CHUNK:
                continue  # idle, or still waiting for its first token (queueing, not recovery)
            nxt = next((op for op in ops[i + 1:] if op.kind == OpKind.OK or (op.kind == OpKind.CHUNK)), None)
            if nxt is not None:
                out[f.service].append(nxt.t - f.t)
    return dict(out)


def throughput(history: History, bin_s: float = 1.0) -> dict[str, list[float]]:
    """Per bin: tokens received by SDK clients, SSE text events received by
    HTTP clients, requests completed."""
    end = max((op.t for op in history.ops), default=0.0)
    n = int(end / bin_s) + 1
    tokens, events, done = [0.0] * n, [0.0] * n, [0.0] * n
    via = {op.req: op.via for op in history.ops if op.kind == OpKind.INVOKE}
    for op in history.ops:
        b = int(op.t / bin_s)
        if op.kind in (OpKind.CHUNK, OpKind.OK):
            if via.get(op.req) == Via.SDK:
                tokens[b] += len(op.token_ids) / bin_s
            elif op.text:
                events[b] += 1 / bin_s
        if op.kind == OpKind.OK:
            done[b] += 1
    return {"t_s": [round(i * bin_s, 3) for i in range(n)], "sdk_tokens_per_s": tokens,
            "http_events_per_s": events, "completed": done}


def summarize(history: History) -> dict[str, object]:
    ready = ready_times(history.faults)
    nxt = next_token_times(history)
    all_next = [x for xs in nxt.values() for x in xs]
    return {
        "faults_by_service": fault_counts(history.faults),
        "faults_by_kind": dict(Counter(f.kind for f in history.faults if f.t >= 0)),
        "faults_skipped": sum(1 for f in history.faults if f.t < 0),
        "recovery_ready_s": {k: {s: quantiles(v) for s, v in by.items()} for k, by in ready.items()},
        "recovery_ready_p99_s": {s: quantiles(v)["p99"] for s, v in ready.get(FaultKind.KILL, {}).items()},
        "next_token_s": {s: quantiles(v) for s, v in nxt.items()},
        "next_token_p99_s": quantiles(all_next)["p99"],
        "next_token_p50_s": quantiles(all_next)["p50"],
        "http": http_figures(history),
    }


def http_figures(history: History) -> dict[str, int]:
    """What HTTP clients saw, following the reconnect rule: connection
    attempts that failed (`connect_errors`), requests that ended refused at
    connect after every retry (`refused_at_connect`) or cut
    (`incomplete_streams`), re-sent requests (`reconnections`), and requests
    that finished after a retry: from an offset (`resumed_streams`) or from
    their start (`retried_from_start`)."""
    http = {op.req for op in history.ops if op.kind == OpKind.INVOKE and op.via == Via.HTTP}
    retries: dict[str, list[Op]] = defaultdict(list)
    ends: dict[str, Op] = {}
    for op in history.ops:
        if op.req not in http:
            continue
        if op.kind == OpKind.RETRY:
            retries[op.req].append(op)
        elif op.kind in (OpKind.OK, OpKind.FAIL, OpKind.UNKNOWN):
            ends[op.req] = op
    finished_after_retry = [r for r in retries if r in ends and ends[r].kind == OpKind.OK]
    return {
        "requests": len(http),
        "connect_errors": sum(1 for ops in retries.values() for op in ops if op.code == "connect"),
        "refused_at_connect": sum(1 for e in ends.values() if e.kind == OpKind.FAIL and e.code == "connect"),
        "incomplete_streams": sum(1 for e in ends.values() if e.kind == OpKind.UNKNOWN and e.code == "stream_cut"),
        "reconnections": sum(len(ops) for ops in retries.values()),
        "resumed_streams": sum(1 for r in finished_after_retry if any(op.offset > 0 for op in retries[r])),
        "retried_from_start": sum(1 for r in finished_after_retry if all(op.offset == 0 for op in retries[r])),
    }
