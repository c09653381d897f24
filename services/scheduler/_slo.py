"""Service-level objectives: each request's, its verdict when it ends, the
goodput (requests that met both objectives, per second), and the
prediction early rejection is made from.

A request meets its objectives when its first token came within `ttft_ms`
of its arrival and the tokens after it came at `tpot_ms` each or faster on
average (Usage.slo says "met" or "missed"). A cancelled request is not
judged (its client stopped waiting); one that ended in an error missed.
"""

from __future__ import annotations

import math
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable

from common.config.scheduler import Objective, PolicyName, TunerConfig
from ipc.protocol.scheduler import FinishReason
from services.scheduler._request import Request, Seq
from services.scheduler.autotune import LatencyModel, StepShape
from services.scheduler.planner import Limits

# Goodput is counted over this many recent seconds.
GOODPUT_WINDOW_S = 60.0


class SloBook:
    def __init__(self, cfg: TunerConfig, clock: Callable[[], float] = time.monotonic):
        self.cfg = cfg
        self.clock = clock
        self.met = 0
        self.missed = 0
        self.rejected = 0
        self._met_at: deque[float] = deque()
        self._since = clock()
        self.tpot_s: dict[int, float] = {}  # live sequence id -> its per-token objective
        self.ttft_s: dict[int, float] = {}  # and its first-token one

    def objective(self, req: Request) -> Objective:
        return self.cfg.objective_for(req.key[0], req.submit.priority)

    def track(self, req: Request) -> None:
        """Judge `req` when it ends; until then its objective counts toward
        the tightest one the tuner plans steps for."""
        o = self.objective(req)
        self.tpot_s[req.seq.seq_id] = o.tpot_ms / 1e3
        self.ttft_s[req.seq.seq_id] = o.ttft_ms / 1e3
        req.on_finish.append(lambda: self.judge(req))

    def judge(self, req: Request) -> None:
        self.tpot_s.pop(req.seq.seq_id, None)
        self.ttft_s.pop(req.seq.seq_id, None)
        if req.finish_reason == FinishReason.CANCELLED or req.finish_reason is None:
            return
        met = verdict(req, self.objective(req))
        req.slo = "met" if met else "missed"
        if met:
            self.met += 1
            self._met_at.append(self.clock())
        else:
            self.missed += 1

    def goodput(self) -> float:
        """Requests that met their objectives per second, over the last minute."""
        now = self.clock()
        while self._met_at and self._met_at[0] < now - GOODPUT_WINDOW_S:
            self._met_at.popleft()
        span = min(GOODPUT_WINDOW_S, now - self._since)
        return len(self._met_at) / span if span > 0 else 0.0


def verdict(req: Request, o: Objective) -> bool:
    if req.error is not None or req.finish_reason in (FinishReason.ERROR, FinishReason.DEADLINE):
        return False
    if not req.first_token:
        return False
    ttft = req.first_token - req.arrived
    n = len(req.generated)
    tpot = (req.finished_at - req.first_token) / (n - 1) if n > 1 else 0.0
    return ttft * 1e3 <= o.ttft_ms and tpot * 1e3 <= o.tpot_ms


def predict_ttft(model: LatencyModel, seq: Seq, running: list[Seq], waiting: Iterable[Seq], limits: Limits,
                 policy: PolicyName) -> float | None:
    """Seconds until `seq` (arriving now) gets its first token at the
    current load and limits; None when it would start at once (nothing
    waits and the batch has room: no estimate can refuse it).

    The prefill ahead of it (the waiting line's, in policy order, and the
    running prompts' rest) at what the token budget leaves beside the
    running decodes, or — when the batch is full — until enough running
    sequences reach their max_tokens to seat it, whichever is longer (an
    upper bound: a reply may end sooner)."""
    ahead = _ahead(seq, list(waiting), policy)
    if not ahead and len(running) < limits.max_num_seqs:
        return None
    decodes = sum(1 for s in running if s.remaining <= 1)
    context = sum(len(s.tokens) for s in running)
    room = max(1, limits.token_budget - decodes)
    prefill = sum(s.remaining for s in ahead) + sum(s.remaining for s in running if s.remaining > 1) + seq.remaining
    step_s = model.predict(StepShape(decodes, min(room, prefill), context))
    steps = math.ceil(prefill / room)
    over = len(running) + len(ahead) + 1 - limits.max_num_seqs
    if over > 0 and running:
        left = sorted(max(1, s.max_len - len(s.tokens)) for s in running)
        rounds, i = divmod(over - 1, len(left))
        steps = max(steps, left[i] + rounds * left[-1])
    return (steps + 1) * step_s


def _ahead(seq: Seq, waiting: list[Seq], policy: PolicyName) -> list[Seq]:
    """The waiting sequences that would start before `seq`: under fair
    share, each tenant's first few (as many as `seq`'s own tenant has
    waiting, plus one); under priority, those at its priority or better;
    otherwise all of them."""
    if policy == PolicyName.FAIR:
        mine = sum(1 for s in waiting if s.tenant == seq.tenant)
        taken: Counter[str] = Counter()
        out = []
        for s in waiting:
            taken[s.tenant] += 1
            if s.tenant == seq.tenant or taken[s.tenant] <= mine + 1:
                out.append(s)
        return out
    if policy == PolicyName.PRIORITY:
        return [s for s in waiting if s.priority <= seq.priority]
    return waiting


__all__ = ["GOODPUT_WINDOW_S", "SloBook", "predict_ttft", "verdict"]
