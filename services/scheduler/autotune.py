"""Online tuning of each step toward goodput.

A decoding sequence gets one token per step, so its time per output token
is the step time; `LatencyModel` (_latency.py) fits a step's time to what
it computes, and resets when the machine's speed changes.

`AutoTuner.plan` chooses the next step's limits from the model and a
`View` of the load. It starts from the configured limits and departs from
them only where the model predicts that the configured step would make a
request miss an objective it can still meet:

  - token budget: a running request's per-token objective is a mean over
    its reply, so one that ran ahead of it can absorb a slower step; its
    allowance is the step time that spends its slack evenly over the
    tokens it has left. When the configured step (the decodes plus as much
    prefill as the budget takes) is predicted over `headroom` times the
    tightest allowance, the prefill is cut to what fits it — but never
    below what the waiting prompts need to make their first-token
    deadlines (earliest deadline first: the prefill rate that finishes
    each prefix of them in time), nor below `min_budget`;
  - prefill chunk: when a waiting request's first-token deadline comes
    before a running prompt's prefill would leave it room, one
    sequence's chunk is cut so the urgent prompts fit beside it;
  - batch cap: when admitting the waiting requests would make the step
    (at the decodes it would then run) miss the tightest allowance, the
    cap stops at the most decodes that fit it — never below the requests
    already running (a cap under them would stall their streams).

A request already past saving (its allowance under a step of decodes
alone) is not planned for: cutting the others' steps would not save it.
While the model is unsure (too few steps, a large error, a machine whose
speed keeps changing) or a cost it needs never varied, the configured
limits stand. Each plan is a function of the load and the model alone: a
steady load gets the same limits step after step (no oscillation), and a
model reset follows a change of machine speed within `drift_steps`.

Pure Python with no clock of its own: the engine reports each step's shape
and measured duration.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

from services.scheduler._latency import LatencyModel, StepShape, features


@dataclass(frozen=True, slots=True)
class Knobs:
    token_budget: int
    max_num_seqs: int
    prefill_chunk: int
    # Admit the waiting requests whose first-token objective has passed
    # after those that can still meet theirs (the line's order otherwise).
    late_last: bool = False


@dataclass(frozen=True, slots=True)
class Decision:
    knobs: Knobs
    state: str  # "learning", "fallback", "configured" or "tuned"
    why: str
    # Admissions stop at the batch because the model predicts that one more
    # makes a running request that can still meet its per-token objective miss it.
    held: bool = False


def _ewma(avg: float, x: float) -> float:
    """Smoothed over about ten steps; the first value stands alone."""
    return x if not avg else 0.9 * avg + 0.1 * x


@dataclass(frozen=True, slots=True)
class Demand:
    """Prefill a sequence still needs before its first token."""

    deadline_s: float  # until its first-token objective passes (<= 0: passed)
    tokens: int
    running: bool  # in the batch (its prompt part-computed), else waiting
    output: int = 1  # tokens it may generate (its max_tokens)
    tpot_s: float = math.inf  # its per-token objective


@dataclass(frozen=True, slots=True)
class View:
    """The load the next step is planned for."""

    decodes: int  # running sequences that decode next step
    context: int  # their context lengths, summed
    allowances: tuple[float, ...]  # per decode: the step time its TPOT objective allows (slack spread)
    demands: tuple[Demand, ...]  # prefill wanted, running and waiting
    running: int  # sequences in the batch
    waiting: int
    tpot_s: float = math.inf  # the tightest per-token objective, running or waiting
    left: tuple[int, ...] = ()  # per allowance: the tokens that decode may still generate (its max_tokens)
    arrival: tuple[float, float] = (0.0, 0.0)  # recent arrivals' mean prompt tokens and max_tokens (0: none yet)


class AutoTuner:
    def __init__(self, ceiling: Knobs, *, headroom: float = 0.85, window: int = 64, every: int = 8,
                 min_budget: int = 64, min_chunk: int = 32, warmup: int = 4, late_last: bool = True):
        self.ceiling = ceiling
        self.late_last = late_last
        self.headroom = headroom
        self.every = every
        self.min_budget = min(min_budget, ceiling.token_budget)
        self.min_chunk = min(min_chunk, ceiling.prefill_chunk)
        self.model = LatencyModel(window)
        self.state = "learning"
        self.step_s = 0.0  # smoothed, for Stats
        self.context = 0.0  # smoothed context per decode
        self._since = 0
        self._warmup = warmup
        self._cap_why = ""  # what set _admits' answer: "running" (a running request's objective) or "own"

    def observe(self, shape: StepShape, step_s: float) -> float | None:
        """A step of `shape` took `step_s`: returns measured / predicted
        when the model was reset (the machine's speed changed)."""
        if step_s <= 0 or shape.decodes + shape.prefill <= 0:
            return None
        if self._warmup > 0:  # a process's first steps pay one-off costs (allocations, caches)
            self._warmup -= 1
            return None
        self.step_s = step_s if not self.step_s else 0.8 * self.step_s + 0.2 * step_s
        if shape.decodes:
            self.context = _ewma(self.context, shape.context / shape.decodes)
        shift = self.model.add(shape, step_s)
        self._since += 1
        if self._since >= self.every:
            self._since = 0
            self.model.fit()
        return shift

    def plan(self, view: View) -> Decision:
        c, m = self.ceiling, self.model
        if m.coef is None or len(m.samples) < m.min_samples:
            state = "learning" if not m.resets else "fallback"
            return self._to(c, state, "learning the step time; the configured limits")
        if not m.sure:
            why = (f"model unsure: the machine's speed changed twice within {m.samples.maxlen} steps"
                   if m.unsteady else f"model unsure: its error is {m.rel_error:.0%} over {len(m.samples)} steps")
            return self._to(c, "fallback", why + "; the configured limits")
        a, bd, bp, bc = m.coef
        d = view.decodes
        base = a + bd * d + bc * view.context / 1000.0
        # The requests still able to meet their objective at steps of decodes alone.
        live = [x for x in view.allowances if x >= base]
        allow = self.headroom * min(live, default=math.inf)
        budget, seqs, chunk, late_last = c.token_budget, c.max_num_seqs, c.prefill_chunk, False
        reasons: list[str] = []
        wanted = sum(x.tokens for x in view.demands)
        room = max(0, c.token_budget - d)
        static_p = min(room, wanted)
        cost_known = m.prefill_known and bp > 0
        # Only a step predicted over the allowance by more than the model's
        # own error: within it, the prediction does not say a request misses.
        # The cut and the cap bind only on a model the last steps bear out
        # (its fit's residual does not show a machine that just sped up).
        trusted = m.trusted
        if static_p and cost_known and trusted and (base + bp * static_p) / (1 + m.rel_error) > allow:
            need = self._needed(view.demands, base, bp)
            # Short waiting prompts (chats) start in this step all the same: a
            # one-off cost, where waiting behind the cut would cost their first token.
            short = min(room, sum(x.tokens for x in view.demands if not x.running and x.tokens <= room // 2))
            p = max(int((allow - base) / bp) + short, need, self.min_budget - d, self.min_chunk)
            if p < static_p:
                budget = max(1, d + p)
                reasons.append(f"a step of {d} decodes + {static_p} prefill tokens is predicted at "
                               f"{(base + bp * static_p) * 1e3:.0f} ms, over the {allow * 1e3:.0f} ms the running "
                               f"requests' objectives allow (their slack spread; a {view.tpot_s * 1e3:.0f} ms "
                               f"per-token objective at the tightest): {p} prefill tokens"
                               + (" (what the prompts' first-token deadlines need)" if need >= p else ""))
        if cost_known:
            cut = self._chunk_for_deadlines(view.demands, base, bp, budget - d, budget < c.token_budget)
            if cut is not None and cut < chunk:
                chunk = cut
                reasons.append(f"a prefill chunk of {cut}: a waiting prompt's first-token deadline comes first")
        # The batch cap binds on admissions only (never below the batch), and
        # is set only as the load nears it.
        held = False
        if bd + bc > 0 and trusted:
            most = self._admits(view, a, bd + bc * self.context / 1000.0, bp if cost_known else 0.0, base,
                                max(1, budget - d))
            if most is not None and most >= 4 * m.max_decodes + 16:
                most = None  # a miss predicted only far beyond the batches it saw: an extrapolation
            if most is not None and most <= view.running < c.max_num_seqs and not any(x.running for x in view.demands):
                # Nothing would prefill and the budget would go unused: the
                # batch is held only for a running request's objective; a
                # newcomer held for its own (a smaller batch later) starts.
                if self._cap_why == "running":
                    held = True
                else:
                    most = view.running + 1
            if most is not None and max(view.running, most) < c.max_num_seqs:
                seqs = max(view.running, most)
                reasons.append(f"a batch over {seqs} is predicted to make a request miss its per-token "
                               "objective (projected until the replies end): admissions stop there")
        # Those whose first-token objective passed start after those that can
        # still meet theirs, while not all of them start this step.
        late = sum(1 for x in view.demands if not x.running and x.deadline_s <= 0)
        if self.late_last and 0 < late < view.waiting and view.running + view.waiting > seqs:
            late_last = True
            reasons.append(f"{late} waiting requests past their first-token objective start after the "
                           f"{view.waiting - late} that can still meet theirs")
        # Each running prompt's chunk within the prefill share, so that prompts
        # ordered before the decodes never take their tokens (a stalled stream).
        prefilling = sum(1 for x in view.demands if x.running)
        if prefilling and d and budget - d < sum(min(x.tokens, chunk) for x in view.demands if x.running):
            fair = max(self.min_chunk, (budget - d) // prefilling)
            if d + fair * prefilling > budget:  # a cut budget takes the chunks' floor, else the chunks shrink
                if d + fair * prefilling <= c.token_budget:
                    budget = d + fair * prefilling
                else:
                    fair = max(1, (budget - d) // prefilling)
            if fair < chunk:
                chunk = fair
                reasons.append(f"a prefill chunk of {fair}: {prefilling} prompts ordered before {d} decodes "
                                   "would take their tokens (a stalled stream)")
        knobs = Knobs(budget, seqs, min(chunk, budget), late_last)
        if knobs == c:
            r = m.recent_ratio
            why = ("no objective at risk at the configured limits" if trusted else
                   "model unchecked since its last fit from scratch" if r is None else
                   f"model off: the last steps ran {r:.2f}x the time it predicted")
            return self._to(c, "configured" if trusted else "fallback", why)
        return self._to(knobs, "tuned", "; ".join(reasons), held)

    def _admits(self, view: View, a: float, per_decode: float, bp: float, base: float,
                room: int) -> int | None:
        """The batch size at which admitting the next waiting request (in the
        line's order) is predicted to make a request miss its per-token
        objective, or None when admitting them all is not — then, as the load
        nears it, arrivals like the recent ones.

        The batch is projected over each request's remaining tokens, the
        replies ending at their max_tokens: over its next r steps a request
        sees r * a + per_decode * sum(min(left_i, r)), plus bp times the
        prompts admitted after it (the running prompts' own prefill is the
        token budget's to spread, by their deadlines: a document's is not
        all in a chat's next steps; nor is a newcomer's beyond the `room`
        tokens of prefill a step takes, times its r steps: the token budget
        spreads it), which must stay within (1 + headroom) / 2 of
        its slack (its allowance times r; a newcomer's objective times its
        reply). A request already predicted to miss before any admission is
        not protected (holding others back would not save it), nor is a
        newcomer's own objective when no batch at all would meet it."""
        margin = (1 + self.headroom) / 2  # half the headroom: a wrong "no" costs a first token
        # Members: [steps left, slack left in seconds, time projected so far,
        # 1 if decoding (a newcomer's prompt slows its steps, at most `room`
        # tokens a step; a prompt still in prefill gets its first token after
        # it), newcomers' prompt tokens charged to it so far].
        members: list[list[float]] = []
        lefts: list[int] = []
        for i, allow in enumerate(view.allowances):
            r = view.left[i] if i < len(view.left) else 1
            lefts.append(r)
            if allow >= base:
                members.append([r, margin * allow * r, 0.0, 1.0, 0.0])
        for x in view.demands:
            if x.running:
                lefts.append(x.output)
                if math.isfinite(x.tpot_s):
                    members.append([x.output, margin * x.tpot_s * x.output, 0.0, 0.0, 0.0])
        lefts.sort()
        prefix = [0]
        for n in lefts:
            prefix.append(prefix[-1] + n)

        def project(r: float) -> float:  # over the next r steps, the batch as it is
            k = bisect.bisect_left(lefts, r)
            return r * a + per_decode * (prefix[k] + r * (len(lefts) - k))

        for m in members:
            m[2] = project(m[0])
        members = [m for m in members if m[2] <= m[1]]  # predicted to meet it now: protected
        batch = view.running
        added: list[Demand] = []  # admitted in the projection so far

        def own(x: Demand) -> float:  # a newcomer's projection: the batch, those admitted before it, itself
            r = x.output
            return (project(r) + per_decode * (sum(min(y.output, r) for y in added) + r)
                    + bp * min(sum(y.tokens for y in added), r * room))

        def prompt(m: list[float], p: int) -> float:  # what a newcomer's p prompt tokens add to member m
            cap = m[0] * room
            return bp * m[3] * (min(m[4] + p, cap) - min(m[4], cap))

        # In the order they would start: those past their first-token objective last.
        for x in sorted((x for x in view.demands if not x.running), key=lambda x: x.deadline_s <= 0):
            if batch >= self.ceiling.max_num_seqs:
                return None
            r, p = x.output, x.tokens
            if any(m[2] + per_decode * min(r, m[0]) + prompt(m, p) > m[1] for m in members):
                self._cap_why = "running"
                return batch
            new: list[float] | None = None
            if math.isfinite(x.tpot_s):
                new = [r, margin * x.tpot_s * r, own(x), 0.0, 0.0]
                if new[2] > new[1] and r * (a + per_decode) <= new[1]:
                    self._cap_why = "own"
                    return batch  # it would miss now, and meets in a smaller batch: it waits for one
            for m in members:
                m[2] += per_decode * min(r, m[0]) + prompt(m, p)
                m[4] += p * m[3]
            if new is not None and new[2] <= new[1]:
                members.append(new)
            added.append(x)
            batch += 1
        # Then arrivals like the recent ones, as many as may come before the
        # next plans (a margin over the load): each adds the same to every
        # projection, so the most that fit is a bound per member.
        near = view.running + view.waiting + max(2, (view.running + view.waiting) // 3)
        if view.arrival[1] < 1 or not math.isfinite(view.tpot_s) or batch >= min(near, self.ceiling.max_num_seqs):
            return None
        r, p = max(1, round(view.arrival[1])), round(view.arrival[0])
        typical = Demand(math.inf, p, False, r, view.tpot_s)
        most = near - batch
        self._cap_why = "running"
        for m in members:
            inc = per_decode * min(r, m[0]) + bp * p  # arrivals to come: every member decodes by then
            if inc > 0:
                fit = int((m[1] - m[2]) / inc)
                # Their prompts reach it at most `room` tokens a step.
                rest = m[1] - m[2] - bp * max(0.0, m[0] * room - m[4])
                if per_decode > 0 and rest > 0:
                    fit = max(fit, int(rest / (per_decode * min(r, m[0]))))
                most = min(most, fit)
        slack = margin * view.tpot_s * r
        first, inc = own(typical), per_decode * r + bp * p  # the j-th of them ends at first + (j - 1) * inc
        mine = most
        if first > slack and r * (a + per_decode) <= slack:
            mine = 0
        elif first <= slack:
            mine = min(most, 1 + int((slack - first) / inc) if inc > 0 else most)
        if mine < most:
            self._cap_why, most = "own", mine
        return None if batch + most >= near else batch + max(0, most)

    def _needed(self, demands: tuple[Demand, ...], base: float, bp: float) -> int:
        """The least prefill per step that brings every waiting or running
        prompt whose first-token deadline can still be met to its first
        token in time, earliest deadline first: over `t` seconds, steps of
        `p` prefill tokens compute `p * t / (base + bp * p)` tokens."""
        need, total = 0, 0
        for x in sorted(demands, key=lambda x: x.deadline_s):
            total += x.tokens
            usable = self.headroom * x.deadline_s - base  # its first token comes a step after its prefill
            if usable <= total * bp:
                continue  # not even one step of all of it meets this deadline: not planned for
            need = max(need, math.ceil(total * base / (usable - total * bp)))
        return need

    def _chunk_for_deadlines(self, demands: tuple[Demand, ...], base: float, bp: float, room: int,
                             cut: bool) -> int | None:
        """A chunk that leaves short prompts room beside the long ones (over
        half the room) when the long ones, taking the whole room, would keep
        a short one past its first-token deadline: the room less the urgent
        prompts' tokens, shared by the long ones (each step still computes
        about the room's worth of prefill)."""
        short = room // 2
        long = [x for x in demands if x.tokens > short]
        if not long or room <= self.min_chunk:
            return None
        done_s = math.ceil(sum(x.tokens for x in long) / room) * (base + bp * room)
        urgent = sum(x.tokens for x in demands if x.tokens <= short and (
            0 < x.deadline_s * self.headroom < done_s or (cut and not x.running)))
        if not urgent:
            return None
        # Never under an even share of the room: the step still fills it.
        return max(self.min_chunk, room // len(demands), (room - urgent) // len(long))

    def _to(self, knobs: Knobs, state: str, why: str, held: bool = False) -> Decision:
        self.state = state
        return Decision(knobs, state, why, held)


__all__ = ["AutoTuner", "Decision", "Demand", "Knobs", "LatencyModel", "StepShape", "View", "features"]
