"""What the engine answers about itself (RequestInfo, SchedulerStats),
read from its state; kept out of engine.py, which holds the loop."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

from ipc.errors import NotFound
from ipc.protocol import scheduler as sp
from services.scheduler._request import State
from services.scheduler._sessions import seq_blocks
from services.scheduler.planner import BlockLedger

if TYPE_CHECKING:
    from services.scheduler.engine import Engine


def request_info(engine: Engine, principal: str, request_id: str) -> sp.RequestInfo:
    """A live or remembered request's state (RequestInfo); NotFound otherwise."""
    key = (principal, request_id)
    req = engine.requests.get(key) or engine.finished.get(key)
    if req is None:
        raise NotFound(f"no request {request_id!r} (unknown, or finished long ago)",
                       detail={"request_id": request_id})
    waiting = req.state == State.WAITING
    position = engine.state.position(req.seq) if waiting else -1
    estimate = engine.tuning.estimate_ttft(req.seq, engine.state, engine.limits) if waiting else -1.0
    return sp.RequestInfo(request_id, req.state.value, len(req.generated), len(req.prompt_ids), position,
                          req.seq.pool or "", req.finish_reason.value if req.finish_reason else "",
                          req.waiting_on if waiting else "", estimate)


def engine_stats(engine: Engine) -> sp.SchedulerStatsReply:
    """The engine's counters and lines (SchedulerStats)."""
    st = engine.state
    pinned = engine.sessions.pinned()
    quotas = engine.kv_quotas
    ledger = BlockLedger(st.shapes(), [*st.running, *pinned], quotas)
    on_quota = Counter(s.tenant for s in st.waiting if s.request.waiting_on == sp.WAITING_ON_KV_QUOTA)
    quota_waits = [sp.QuotaWait(t, n, ledger.held[t], quotas.get(t, -1)) for t, n in sorted(on_quota.items())]
    loads = [sp.DriverLoad(i, d.shape.num_blocks, ledger.free[i], sum(1 for s in st.running if s.pool == i))
             for i, d in sorted(st.drivers.items())]
    return engine.tuning.stats(sp.SchedulerStatsReply(st.policy.name.value, len(st.waiting), len(st.running),
                                  engine.limits.token_budget, engine.limits.max_num_seqs, engine.steps,
                                  engine.tokens_generated, engine.preemptions, engine.num_finished, loads,
                                  engine.last_step_s, len(engine.sessions), engine.sessions.suspended(),
                                  seq_blocks(pinned), 0.0, 0.0,  # tpot_target_ms, step_ms: tuning's
                                  engine.config.preemption.value, st.swapped_out, st.swapped_in,
                                  quota_waits, engine.kv.refused, st.critical_rpcs, st.execute_bytes,
                                  steps_ahead=st.steps_ahead), engine.limits)


__all__ = ["engine_stats", "request_info"]
