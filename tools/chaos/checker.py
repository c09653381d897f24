"""The checker: reads a chaos history and says whether the recovery contract
(DESIGN.md §6) held.

Per request: it ended exactly once (an accepted request that never finished,
or failed after it was accepted, is lost; two endings are a duplicate);
streamed tokens are contiguous (each chunk starts where the last ended, so no
token was repeated or retracted); the text is what the tokens say, and the
usage counts them; a greedy request equals a fault-free reference run —
required when no fault overlapped it, reported when one did. Whole run: no
process outlived the run, the kernel never restarted.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from tools.chaos.history import Fault, History, Op, OpKind, Via

GATEWAY = "gateway"
# An HTTP stream cut this long after a gateway fault is that fault's doing.
GATEWAY_CUT_GRACE_S = 2.0


@dataclass(frozen=True)
class Reference:
    """Fault-free greedy answers by prompt index: SDK requests run with
    ignore_eos (token ids, cut to max_tokens); HTTP requests without it (text)."""

    sdk_ids: dict[int, list[int]]
    http_text: dict[int, str]


@dataclass
class Verdict:
    requests: int = 0
    ok: int = 0
    failed: Counter[str] = field(default_factory=Counter)  # by code, requests never accepted or ended in error
    unknown: Counter[str] = field(default_factory=Counter)  # by cause: cut HTTP streams (the contract allows it)
    lost: list[str] = field(default_factory=list)
    duplicated: list[str] = field(default_factory=list)
    offset_errors: list[str] = field(default_factory=list)
    text_errors: list[str] = field(default_factory=list)
    greedy_unfaulted: int = 0
    greedy_unfaulted_equal: int = 0
    greedy_faulted: int = 0
    greedy_faulted_equal: int = 0
    greedy_mismatch: list[str] = field(default_factory=list)  # unfaulted only: those break the contract
    leaked_pids: list[int] = field(default_factory=list)
    kernel_restarted: bool = False

    @property
    def holds(self) -> bool:
        return not (self.lost or self.duplicated or self.offset_errors or self.text_errors or self.greedy_mismatch
                    or self.leaked_pids or self.kernel_restarted)

    def violations(self) -> list[str]:
        out = []
        for name in ("lost", "duplicated", "offset_errors", "text_errors", "greedy_mismatch", "leaked_pids"):
            items = getattr(self, name)
            if items:
                out.append(f"{name}: {len(items)} ({', '.join(map(str, items[:5]))}{', …' if len(items) > 5 else ''})")
        if self.kernel_restarted:
            out.append("the kernel restarted")
        return out


def fault_windows(faults: Sequence[Fault]) -> list[tuple[float, float, Fault]]:
    """[signal sent, recovered] per fired fault: recovered = READY again, or SIGCONT."""
    out = []
    for f in faults:
        if f.t < 0:
            continue
        end = max(f.t, f.ready_t, f.cont_t)
        out.append((f.t, end, f))
    return out


def check(history: History, reference: Reference | None, text_of: Callable[[int, list[int]], str] | None,
          *, leaked_pids: Sequence[int] = (), kernel_restarted: bool = False) -> Verdict:
    v = Verdict(leaked_pids=list(leaked_pids), kernel_restarted=kernel_restarted)
    windows = fault_windows(history.faults)
    gateway_faults = [f.t for f in history.faults if f.t >= 0 and f.service == GATEWAY]
    by_req: dict[str, list[Op]] = defaultdict(list)
    for op in history.ops:
        by_req[op.req].append(op)
    for rid, ops in by_req.items():
        v.requests += 1
        _check_one(v, rid, ops, windows, gateway_faults, reference, text_of)
    return v


def _check_one(v: Verdict, rid: str, ops: list[Op], windows: list[tuple[float, float, Fault]],
               gateway_faults: list[float], reference: Reference | None,
               text_of: Callable[[int, list[int]], str] | None) -> None:
    invoke, rest = ops[0], ops[1:]
    if invoke.kind != OpKind.INVOKE or any(op.kind == OpKind.INVOKE for op in rest):
        v.duplicated.append(rid)
        return
    ends = [op for op in rest if op.kind in (OpKind.OK, OpKind.FAIL, OpKind.UNKNOWN)]
    if len(ends) != 1 or rest[-1] is not ends[0]:
        (v.lost if not ends else v.duplicated).append(rid)  # never ended / ended twice or went on after
        return
    end = ends[0]
    chunks = [op for op in rest if op.kind in (OpKind.CHUNK, OpKind.OK)]
    accepted = any(op.kind == OpKind.CHUNK for op in rest) or end.kind == OpKind.OK
    if end.kind == OpKind.FAIL:
        if "a gap or a repeat" in end.message:
            v.offset_errors.append(rid)  # the SDK caught a repeated or missing token
        elif accepted:
            v.lost.append(rid)
        v.failed[end.code] += 1
        return
    if end.kind == OpKind.UNKNOWN:
        cut_by_gateway = invoke.via == Via.HTTP and end.code == "stream_cut" and any(
            invoke.t <= t <= end.t + GATEWAY_CUT_GRACE_S for t in gateway_faults)
        if not cut_by_gateway:
            v.lost.append(rid)
        v.unknown[end.code] += 1
        return
    # OK: exactly one ending, and it is a completion.
    text = "".join(op.text for op in chunks)
    ids: list[int] = []
    if invoke.via == Via.SDK:
        for op in chunks:
            if op.offset != len(ids):
                v.offset_errors.append(rid)
                break
            ids.extend(op.token_ids)
        if end.completion_tokens >= 0 and end.completion_tokens != len(ids):
            v.offset_errors.append(rid)
        if text_of is not None and text_of(invoke.prompt, ids) != text:
            v.text_errors.append(rid)
    if end.finish_reason == "error":
        v.failed["finish_error"] += 1
        return
    v.ok += 1
    if invoke.greedy and reference is not None:
        if invoke.via == Via.SDK:
            equal = reference.sdk_ids[invoke.prompt][:invoke.max_tokens] == ids
        else:
            equal = reference.http_text[invoke.prompt] == text
        faulted = any(a <= end.t and invoke.t <= b for a, b, _ in windows)
        if faulted:
            v.greedy_faulted += 1
            v.greedy_faulted_equal += equal
        else:
            v.greedy_unfaulted += 1
            v.greedy_unfaulted_equal += equal
            if not equal:
                v.greedy_mismatch.append(rid)
