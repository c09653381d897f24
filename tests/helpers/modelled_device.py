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


async def prompts_into_streams(engine: Engine, backend: InProcessBackend, *, streams: int = 8, prompts: int = 8,
                               stream_principal: str = "", prompt_principal: str = "") -> tuple[list[int], bool]:
    """`streams` long replies decode; once the tuner's model is sure,
    `prompts` prompts of about 136 tokens land among them. Returns the
    tokens each step computed from their arrival until the streams ended,
    and whether every reply came out as the reference says."""
    import anyio

    from tests.helpers.scheduler_fakes import Stream, expected

    longs = [Stream(engine, prompt=f"stream {i}", max_tokens=200, ignore_eos=True, principal=stream_principal)
             for i in range(streams)]
    tuner = engine.tuning.tuner
    assert tuner is not None
    with anyio.fail_after(10):
        while not tuner.model.sure:
            await anyio.sleep(0.001)
    sizes = backend.drivers["cpu"].tokens_per_step
    seen = len(sizes)
    texts = [f"{i} " + "long prompt text " * 8 for i in range(prompts)]
    late = [Stream(engine, prompt=p, max_tokens=5, principal=prompt_principal) for p in texts]
    finals = [await s.result() for s in late]
    during = sizes[seen:]
    done = [await s.result() for s in longs]
    ok = [s.tokens(f) for s, f in zip(late, finals)] == [expected(p, 5) for p in texts] and all(
        len(s.tokens(f)) == 200 for s, f in zip(longs, done))
    return during, ok
