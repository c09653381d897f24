"""The engine's one door to objectives and tuning: `admit` (judge a new
request when it ends, or refuse it early), `after_step` (feed the step to
the tuner, return the limits to plan the next one with) and `stats` (the
fields SchedulerStatsReply carries about them).

The tuner plans every step (autotune.py); a change is logged
(`scheduler.tuner_changed`, with the old and new values and why) when the
tuner's state changes or a knob moves by more than a quarter from the
values last logged — and counted in `tuner_changes` — as are model resets (`scheduler.tuner_reset`:
steps ran that much slower or faster than predicted) and, at most once per
`LOG_EVERY_S`, early rejections (`scheduler.slo_rejected`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable

import msgspec

from common.config.scheduler import PolicyName, SchedulerConfig
from common.logs import get_logger
from ipc.errors import Overloaded
from ipc.protocol import scheduler as sp
from services.scheduler._execute import Work
from services.scheduler._request import Request, Seq
from services.scheduler._slo import SloBook, predict_ttft
from services.scheduler._state import EngineState
from services.scheduler.autotune import AutoTuner, Decision, Demand, Knobs, StepShape, View
from services.scheduler.planner import Limits

log = get_logger()

LOG_EVERY_S = 5.0


def step_shape(work: Iterable[Work]) -> StepShape:
    """Decodes, prefill tokens, and the KV positions the decodes read."""
    decodes = prefill = context = 0
    for w in work:
        n = w.end - w.start
        if n == 1:  # a decode (a one-token prefill chunk is rare enough to count as one)
            decodes += 1
            context += w.end
        else:
            prefill += n
    return StepShape(decodes, prefill, context)


class Tuning:
    def __init__(self, config: SchedulerConfig, clock: Callable[[], float] = time.monotonic):
        self.cfg = config.objectives
        self.ceiling = Limits(config.token_budget, config.max_num_seqs, config.prefill_chunk)
        self.slo = SloBook(self.cfg)
        self.tuner = AutoTuner(Knobs(config.token_budget, config.max_num_seqs, config.prefill_chunk),
                               headroom=self.cfg.headroom, window=self.cfg.window, every=self.cfg.every,
                               min_budget=self.cfg.min_token_budget, min_chunk=self.cfg.min_prefill_chunk) \
            if self.cfg.enabled else None
        self._logged_reject = -math.inf
        self.clock = clock
        self._last_end = 0.0
        self.changes = 0
        self.held_steps = 0  # steps planned with budget left idle to protect a stream
        self._logged: Decision | None = None
        # Live sequence id -> [arrived, first decode seen, tokens then] on
        # the engine's clock (the time its TPOT slack is counted on).
        self._times: dict[int, list[float]] = {}
        self._arrival = (0.0, 0.0)  # arrivals' prompt tokens and max_tokens, smoothed

    def admit(self, req: Request, state: EngineState, limits: Limits) -> None:
        """Track `req`'s objectives, or raise Overloaded when the tuner's model
        predicts its first token past `reject_factor` times its objective."""
        o = self.slo.objective(req)
        factor = self.cfg.reject_factor
        # Only on a model it plans with: not while learning or unsure, nor
        # when no setting meets the objective (everyone misses it; refusing
        # would only turn slow answers into none).
        planning = self.tuner is not None and self.tuner.model.sure and self.tuner.state in ("configured", "tuned")
        if self.tuner is not None and factor > 0 and planning:
            est = predict_ttft(self.tuner.model, req.seq, state.running, state.waiting, limits,
                               state.policy.name)
            if est is not None and est * 1e3 > factor * o.ttft_ms:
                self.slo.rejected += 1
                retry = min(30.0, max(0.5, est - o.ttft_ms / 1e3))
                now = time.monotonic()
                if now - self._logged_reject >= LOG_EVERY_S:
                    self._logged_reject = now
                    log.info("scheduler.slo_rejected", rejected=self.slo.rejected, estimated_ttft_s=round(est, 2),
                             ttft_objective_ms=o.ttft_ms, waiting=len(state.waiting), running=len(state.running))
                raise Overloaded(f"at the current load this request's first token is predicted in {est:.1f} s; "
                                 f"its objective is {o.ttft_ms / 1e3:g} s",
                                 detail={"retry_after_s": round(retry, 2), "estimated_ttft_s": round(est, 2),
                                         "ttft_objective_s": o.ttft_ms / 1e3})
        self.slo.track(req)
        self._times[req.seq.seq_id] = [self.clock(), 0.0, 0.0]
        prompt, reply = self._arrival
        n, out = float(req.seq.remaining), float(_left(req.seq))
        self._arrival = (n, out) if not reply else (0.9 * prompt + 0.1 * n, 0.9 * reply + 0.1 * out)
        req.on_finish.append(lambda: self._forget(req.seq.seq_id))

    def estimate_ttft(self, seq: Seq, state: EngineState, limits: Limits) -> float:
        """Seconds until waiting `seq` gets its first token, at the current
        load and limits, from the model the tuner plans with; -1 when there
        is none (tuner off, learning or unsure)."""
        if self.tuner is None or not self.tuner.model.sure:
            return -1.0
        now = time.monotonic()
        line = sorted(state.waiting, key=lambda s: state.policy.key(s, now))  # as EngineState.position orders it
        ahead = line[:line.index(seq)] if seq in line else line
        est = predict_ttft(self.tuner.model, seq, state.running, ahead, limits, state.policy.name)
        return round(est or 0.0, 3)

    def after_step(self, work: list[Work], step_s: float, state: EngineState, limits: Limits) -> Limits:
        """Feed the step to the model; the limits to plan the next step with."""
        if self.tuner is None:
            return limits
        shift = self.tuner.observe(step_shape(work), self._cycle(step_s))
        if shift is not None:
            log.info("scheduler.tuner_reset", ratio=round(shift, 2),
                     why=f"the last steps ran {shift:.2f}x the time the model predicted: refitted on them")
        decision = self.tuner.plan(self.view(state, limits))
        self._log(decision)
        self.held_steps += decision.held
        k = decision.knobs
        late = self._late(state) if k.late_last else frozenset()
        return Limits(k.token_budget, k.max_num_seqs, k.prefill_chunk, late)

    def view(self, state: EngineState, limits: Limits) -> View:
        """The load: each decoding request's allowance (the step time that
        spends its TPOT slack evenly over the tokens it may still generate),
        each prompt's first-token deadline, on the engine's clock."""
        now = self.clock()
        decodes = context = 0
        allowances: list[float] = []
        lefts: list[int] = []
        demands: list[Demand] = []
        default = self.cfg.objective
        for s in state.running:
            t = self._times.get(s.seq_id)
            tpot = self.slo.tpot_s.get(s.seq_id, default.tpot_ms / 1e3)
            if s.remaining > 1 or not s.num_generated:
                demands.append(Demand(self._deadline(s, t, now), s.remaining, True, _left(s), tpot))
                continue
            decodes += 1
            context += len(s.tokens)
            if t is None:
                continue
            if not t[1]:
                t[1], t[2] = now, s.num_generated
            left = _left(s)
            done = s.num_generated - t[2]
            allowances.append((tpot * (done + left) - (now - t[1])) / left)
            lefts.append(left)
        for s in state.waiting:
            demands.append(Demand(self._deadline(s, self._times.get(s.seq_id), now), s.remaining, False, _left(s),
                                  self.slo.tpot_s.get(s.seq_id, default.tpot_ms / 1e3)))
        return View(decodes, context, tuple(allowances), tuple(demands), len(state.running), len(state.waiting),
                    min(self.slo.tpot_s.values(), default=default.tpot_ms / 1e3), tuple(lefts), self._arrival)

    def _late(self, state: EngineState) -> frozenset[int]:
        """Waiting requests past their first-token objective, to start after
        the rest — under first-come-first-served and fair share only (fair
        share charges a tenant for what runs, so one whose request waits is
        first later; a priority order is the operator's), and never a
        preempted one (it had its first token)."""
        if state.policy.name not in (PolicyName.FCFS, PolicyName.FAIR):
            return frozenset()
        now = self.clock()
        return frozenset(s.seq_id for s in state.waiting if not s.num_generated and s.seq_id in self._times
                         and self._deadline(s, self._times[s.seq_id], now) <= 0)

    def _forget(self, seq_id: int) -> None:
        self._times.pop(seq_id, None)

    def _deadline(self, s: Seq, t: list[float] | None, now: float) -> float:
        if t is None or s.num_generated:
            return 0.0  # unknown, or it had its first token (a recompute): no deadline to plan for
        return t[0] + self.slo.ttft_s.get(s.seq_id, self.cfg.objective.ttft_ms / 1e3) - now

    def _log(self, d: Decision) -> None:
        """Log (and count) a change of state, or of a knob by over a quarter."""
        last = self._logged
        if last is not None and last.state == d.state and all(
                abs(new - old) <= 0.25 * old for new, old in zip(_values(d.knobs), _values(last.knobs))):
            return
        if last is None and d.state == "learning":
            self._logged = d
            return
        old = last.knobs if last is not None else self.tuner.ceiling if self.tuner else d.knobs
        self._logged = d
        self.changes += 1
        log.info("scheduler.tuner_changed", state=d.state, why=d.why,
                 token_budget=[old.token_budget, d.knobs.token_budget],
                 max_num_seqs=[old.max_num_seqs, d.knobs.max_num_seqs],
                 prefill_chunk=[old.prefill_chunk, d.knobs.prefill_chunk])

    def _cycle(self, step_s: float) -> float:
        """The time a streaming client sees between tokens: from the last
        step's end to this one's, when the loop went straight on (its own
        work between steps counts); the step alone after an idle pause."""
        now = self.clock()
        gap, self._last_end = now - self._last_end, now
        return gap if step_s <= gap <= 1.5 * step_s + 0.02 else step_s

    def stats(self, reply: sp.SchedulerStatsReply, limits: Limits) -> sp.SchedulerStatsReply:
        t = self.tuner
        o = self.cfg.objective
        return msgspec.structs.replace(
            reply, tpot_target_ms=o.tpot_ms if t else 0.0, step_ms=t.step_s * 1e3 if t else 0.0,
            slo_met=self.slo.met, slo_missed=self.slo.missed, slo_rejected=self.slo.rejected,
            goodput_rps=self.slo.goodput(), ttft_objective_ms=o.ttft_ms, tpot_objective_ms=o.tpot_ms,
            prefill_chunk=limits.prefill_chunk, tuner=t.state if t else "off", tuner_changes=self.changes,
            tuner_resets=t.model.resets if t else 0, tuner_held_steps=self.held_steps)


def _values(k: Knobs) -> tuple[int, int, int]:
    return k.token_budget, k.max_num_seqs, k.prefill_chunk


def _left(s: Seq) -> int:
    """The tokens `s` may still generate (to its max_tokens; 1 when unknown)."""
    return max(1, s.max_len - len(s.tokens)) if s.max_len else 1


__all__ = ["Tuning", "step_shape"]
