"""A modelled device for the engine's clock: each Execute advances it by a
step time computed from what the step carries, so tuning tests see
deterministic step times without a real clock."""

from __future__ import annotations

from ipc.protocol import driver as dp
from services.scheduler.engine import Engine
from tests.helpers.scheduler_fakes import InProcessBackend


def modelled(engine: Engine, backend: InProcessBackend, fixed_s: float, per_token_s: float) -> list[float]:
    """The engine's clock advances by `fixed_s` + `per_token_s` per token a
    step computes (new sequences' and deltas' alike); returns the clock's cell."""
    now = [0.0]
    engine.clock = lambda: now[0]
    execute = backend.execute

    async def timed(instance: str, req: dp.Execute) -> dp.Executed:
        computed = sum(len(s.token_ids) for s in req.steps) + sum(len(d.token_ids) for d in req.deltas)
        now[0] += fixed_s + per_token_s * computed
        return await execute(instance, req)

    backend.execute = timed  # type: ignore[method-assign]
    return now
