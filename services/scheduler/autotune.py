"""Online tuning of a step's size toward goodput.

A decoding sequence gets one token per step, so its time per output token
is the step time; a step's time grows with what it computes. `LatencyModel`
fits, over a sliding window of recent steps,

    step_s ~ a + b_d * decodes + b_p * prefill_tokens + b_c * context / 1000

(`context`: the KV positions the step's decodes read — their context
lengths; a prefill chunk's attention is small beside its other work at
these sizes and left in `b_p`), with every coefficient kept >= 0, and
watches its own error:
when the last steps all run slower (or faster) than it predicts by a wide
margin — a slower machine, a second tenant's process, a restarted driver —
it rescales the older steps by that ratio and refits (a reset), rather than
averaging the old machine with the new one for a whole window.

`AutoTuner` turns the model into the three knobs the planner obeys. With a
per-token objective `tpot_s` (the tightest among the running requests) and
`headroom`, a step may take `T = headroom * tpot_s`:

  - batch cap: the most decodes that fit T beside a minimal prefill chunk,
    `(T - a - p * min_chunk) / k`, with `k = b_d + b_c * ctx` (a decode at
    the context per decode) and `p = b_p` (a prefill token);
  - token budget: the decodes the batch runs plus the prefill tokens that
    still fit T, `d + (T - a - k * d) / p`;
  - prefill chunk: what the budget leaves the prefill beside those decodes.

Neither goes below what the window's steps were measured to do within T
(a group of at least 3 steps of that many decodes, or tokens, with a median
time within T): a fit extrapolated from noisy steps does not overrule what
the machine was seen to do.

The configured limits are the ceilings, and the fallback whenever the model
is unsure (too few steps, or a relative error over `max_rel_error`); a
cost it never saw vary (no prefill in the window) leaves its knob at the
ceiling. Decisions are made every `every` steps, move half way to the
target, ignore targets within a dead band of the current value, and a move
against the knob's last direction needs a wider band: together they keep
the limits from oscillating (tests count the reversals).

Pure Python with no clock of its own: the engine reports each step's shape
and measured duration.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

Vec = tuple[float, float, float, float]


@dataclass(frozen=True, slots=True)
class StepShape:
    decodes: int  # sequences computing one token
    prefill: int  # tokens of prompt (or recompute) chunks
    context: int  # KV positions the decodes read (their context lengths, summed)


@dataclass(frozen=True, slots=True)
class Knobs:
    token_budget: int
    max_num_seqs: int
    prefill_chunk: int


@dataclass(frozen=True, slots=True)
class Decision:
    knobs: Knobs
    state: str  # "tuned", "fallback" or "infeasible"
    why: str


def _ewma(avg: float, x: float) -> float:
    """Smoothed over about ten steps; the first value stands alone."""
    return x if not avg else 0.9 * avg + 0.1 * x


def features(s: StepShape) -> Vec:
    return (1.0, float(s.decodes), float(s.prefill), s.context / 1000.0)


class LatencyModel:
    def __init__(self, window: int = 64, *, min_samples: int = 12, max_rel_error: float = 0.35,
                 drift_steps: int = 12, drift_ratio: float = 1.4):
        self.samples: deque[tuple[Vec, float]] = deque(maxlen=window)
        self.min_samples = min_samples
        self.max_rel_error = max_rel_error
        self.coef: Vec | None = None
        self.rel_error = math.inf
        self.resets = 0
        self._sure = False
        self._steps = 0
        self._reset_at: deque[int] = deque(maxlen=2)
        self._drift: deque[float] = deque(maxlen=drift_steps)
        self._drift_log = math.log(drift_ratio)

    @property
    def sure(self) -> bool:
        """Enough steps and a small error; once sure, it stays so until the
        error passes 1.5x `max_rel_error` (no flapping at the threshold). A
        machine whose speed needed two resets within one window is not
        steady enough to plan on: unsure until the older reset leaves it."""
        return self.coef is not None and len(self.samples) >= self.min_samples and self._sure and not self.unsteady

    @property
    def unsteady(self) -> bool:
        return len(self._reset_at) == 2 and self._steps - self._reset_at[0] < (self.samples.maxlen or 0)

    @property
    def prefill_known(self) -> bool:
        """Whether a step in the window computed prefill (else b_p is a guess)."""
        return any(x[2] > 0 for x, _ in self.samples)

    def small_step_s(self) -> float | None:
        """The median time of the window's steps of one or two decodes and
        no prefill (None: fewer than 4 such steps)."""
        small = sorted(y for x, y in self.samples if x[1] <= 2 and x[2] == 0)
        return small[len(small) // 2] if len(small) >= 4 else None

    @property
    def decodes_varied(self) -> bool:
        """Whether the window's decode counts span 4 or more (else the fixed
        cost and a decode's cannot be told apart)."""
        counts = [x[1] for x, _ in self.samples]
        return bool(counts) and max(counts) - min(counts) >= 4

    def measured_floor(self, t: float, key: Callable[[Vec], int]) -> int:
        """The largest `key` (decodes, or tokens in buckets of 16) among
        groups of at least 3 window steps whose median time was within `t`
        (0: none): what the machine was seen to do, which no fit overrules."""
        groups: dict[int, list[float]] = {}
        for x, y in self.samples:
            groups.setdefault(key(x), []).append(y)
        return max((k for k, ys in groups.items() if len(ys) >= 3 and sorted(ys)[len(ys) // 2] <= t), default=0)

    def predict(self, shape: StepShape) -> float:
        return self._predict(features(shape))

    def _predict(self, x: Vec) -> float:
        c = self.coef or (0.0, 0.0, 0.0, 0.0)
        return sum(ci * xi for ci, xi in zip(c, x))

    def add(self, shape: StepShape, step_s: float) -> float | None:
        """Record a step; returns measured / predicted when the recent steps
        all ran slower (or all faster) than predicted by `drift_ratio` or
        more: the machine's speed changed, so the older steps are rescaled
        by that ratio (their shape still tells the costs apart) and the
        model refitted."""
        x = features(shape)
        self.samples.append((x, step_s))
        self._steps += 1
        pred = self._predict(x)
        if self.coef is None or pred <= 0:
            return None
        self._drift.append(math.log(step_s / pred))
        if len(self._drift) < (self._drift.maxlen or 0):
            return None
        mean = sum(self._drift) / len(self._drift)
        if abs(mean) < self._drift_log or not all((d > 0) == (mean > 0) for d in self._drift):
            return None
        ratio = math.exp(mean)
        n_old = len(self.samples) - len(self._drift)
        rescaled = [(x, y * ratio if i < n_old else y) for i, (x, y) in enumerate(self.samples)]
        self.samples.clear()
        self.samples.extend(rescaled)
        self._drift.clear()
        self.resets += 1
        self._reset_at.append(self._steps)
        self.fit()
        return ratio

    def fit(self) -> None:
        """Least squares with the coefficients kept >= 0: a feature whose
        coefficient comes out negative (noise, or a feature that did not
        vary) is dropped and the rest refitted."""
        if len(self.samples) < 4:
            return
        active = [0, 1, 2, 3]
        while active:
            coef = _solve(self.samples, active)
            if coef is None:
                return
            worst = min(active, key=lambda i: coef[i])
            if coef[worst] >= 0:
                break
            active.remove(worst)
        self.coef = coef
        ys = [y for _, y in self.samples]
        sq = sum((y - self._predict(x)) ** 2 for x, y in self.samples)
        mean = sum(ys) / len(ys)
        self.rel_error = math.sqrt(sq / len(ys)) / mean if mean > 0 else math.inf
        if self.rel_error <= self.max_rel_error:
            self._sure = True
        elif self.rel_error > 1.5 * self.max_rel_error:
            self._sure = False


def _solve(samples: deque[tuple[Vec, float]], active: list[int]) -> Vec | None:
    """Ridge-stabilised normal equations over the `active` features
    (columns scaled to unit RMS, so a feature that never varies is split
    evenly with the intercept instead of blowing up)."""
    n = len(active)
    scale = [math.sqrt(sum(x[i] ** 2 for x, _ in samples) / len(samples)) or 1.0 for i in active]
    a = [[0.0] * (n + 1) for _ in range(n)]
    for x, y in samples:
        z = [x[i] / s for i, s in zip(active, scale)]
        for r in range(n):
            for c in range(n):
                a[r][c] += z[r] * z[c]
            a[r][n] += z[r] * y
    ridge = 1e-6 * max(1.0, max(a[r][r] for r in range(n)))
    for r in range(n):
        a[r][r] += ridge
    for col in range(n):  # Gauss-Jordan with partial pivoting
        piv = max(range(col, n), key=lambda r: abs(a[r][col]))
        if abs(a[piv][col]) < 1e-15:
            return None
        a[col], a[piv] = a[piv], a[col]
        for r in range(n):
            if r != col:
                f = a[r][col] / a[col][col]
                a[r] = [v - f * w for v, w in zip(a[r], a[col])]
    out = [0.0, 0.0, 0.0, 0.0]
    for r, i in enumerate(active):
        out[i] = a[r][n] / a[r][r] / scale[r]
    return (out[0], out[1], out[2], out[3])


class AutoTuner:
    def __init__(self, ceiling: Knobs, *, headroom: float = 0.85, window: int = 64, every: int = 8,
                 min_budget: int = 16, min_chunk: int = 32, warmup: int = 4):
        self.ceiling = ceiling
        self.headroom = headroom
        self.every = every
        self.min_budget = min(min_budget, ceiling.token_budget)
        self.min_chunk = min(min_chunk, ceiling.prefill_chunk)
        self.model = LatencyModel(window)
        self.knobs = ceiling
        self.state = "learning"
        self.step_s = 0.0  # smoothed, for Stats
        self.decodes = 0.0  # smoothed: decodes per step, context per decode
        self.context = 0.0
        self.changes = 0
        self.reversals = 0
        self._values = {"token_budget": float(ceiling.token_budget), "max_num_seqs": float(ceiling.max_num_seqs)}
        self._last_move: dict[str, tuple[int, int]] = {}  # knob -> (direction, decision number)
        self._decisions = 0
        self._since = 0
        self._warmup = warmup

    def observe(self, shape: StepShape, step_s: float, tpot_s: float) -> tuple[Decision | None, float | None]:
        """A step of `shape` took `step_s`; `tpot_s`: the tightest per-token
        objective of the running requests. Returns new knobs when they
        change, and measured / predicted when the model was reset."""
        if step_s <= 0 or shape.decodes + shape.prefill <= 0:
            return None, None
        if self._warmup > 0:  # a process's first steps pay one-off costs (allocations, caches)
            self._warmup -= 1
            return None, None
        self.step_s = step_s if not self.step_s else 0.8 * self.step_s + 0.2 * step_s
        self.decodes = _ewma(self.decodes, shape.decodes)
        if shape.decodes:
            self.context = _ewma(self.context, shape.context / shape.decodes)
        shift = self.model.add(shape, step_s)
        self._since += 1
        if self._since < self.every:
            return None, shift
        self._since = 0
        self.model.fit()
        return self._decide(tpot_s), shift

    def _decide(self, tpot_s: float) -> Decision | None:
        self._decisions += 1
        m = self.model
        if m.coef is None or len(m.samples) < m.min_samples:
            return None  # learning (or just reset): hold the current limits
        if not m.sure:
            self.state = "fallback"
            why = (f"model unsure: the machine's speed changed twice within {m.samples.maxlen} steps"
                   if m.unsteady else f"model unsure: its error is {m.rel_error:.0%} over {len(m.samples)} steps")
            why += "; the configured limits"
            return self._set(self.ceiling, "fallback", why, jump=True)
        a, bd, bp, bc = m.coef
        t = self.headroom * tpot_s
        per_decode = bd + bc * self.context / 1000.0
        per_prefill = bp
        c = self.ceiling
        # An objective no setting meets (steps of one or two decodes took
        # longer — measured; or predicted, where the window's decode counts
        # varied enough to tell the fixed cost from a decode's): shrinking
        # the batch would only cost throughput, so the configured limits
        # serve best effort, until such a step fits 90% of it.
        one, how = m.small_step_s(), "took"
        if one is None and m.decodes_varied:
            one, how = a + per_decode, "are predicted at"
        if one is not None and (one > t or (self.state == "infeasible" and one > 0.9 * t)):
            self.state = "infeasible"
            why = (f"steps of one decode {how} {one * 1e3:.0f} ms, over the {t * 1e3:.0f} ms target: "
                   f"no setting meets a {tpot_s * 1e3:.0f} ms per-token objective; the configured limits")
            return self._set(c, "infeasible", why, jump=True)
        seqs = c.max_num_seqs if per_decode <= 0 else int((t - a - per_prefill * self.min_chunk) / per_decode)
        # Never lowered past what steps of the window were measured to do
        # within T (the floor only stops a fall: it never raises a knob, or
        # groups entering and leaving the window would swing it).
        cur = self.knobs
        seqs = max(seqs, min(cur.max_num_seqs, m.measured_floor(t, lambda x: int(x[1]))))
        seqs = max(1, min(c.max_num_seqs, seqs))
        d = min(max(1.0, self.decodes), seqs)
        if not m.prefill_known or per_prefill <= 0:
            budget = c.token_budget
        else:
            budget = int(d + (t - a - per_decode * d) / per_prefill)
        budget = max(budget, min(cur.token_budget, m.measured_floor(t, lambda x: int(x[1] + x[2]) // 16 * 16)))
        budget = max(self.min_budget, math.ceil(d), min(c.token_budget, budget))
        target = Knobs(min(budget, c.token_budget), seqs, c.prefill_chunk)
        old = self.knobs
        p = max(0, old.token_budget - round(d))
        pred = m.predict(StepShape(round(d), p, round(self.context * d)))
        why = (f"a full step ({round(d)} decodes + {max(0, old.token_budget - round(d))} prefill tokens) is "
               f"predicted at {pred * 1e3:.0f} ms; the target is {t * 1e3:.0f} ms "
               f"({self.headroom:.0%} of a {tpot_s * 1e3:.0f} ms per-token objective)")
        self.state = "tuned"
        return self._set(target, "tuned", why)

    def _set(self, target: Knobs, state: str, why: str, jump: bool = False) -> Decision | None:
        new = {}
        for name, want in (("token_budget", target.token_budget), ("max_num_seqs", target.max_num_seqs)):
            v = self._values[name]
            direction = (want > v) - (want < v)
            last = self._last_move.get(name)
            # Down (toward meeting the objective) on a small band, up on a
            # wider one, and against the knob's last move a wider one still.
            band = 0.3 if last and last[0] == -direction and self._decisions - last[1] <= 16 else \
                0.05 if direction < 0 else 0.15
            if direction and (jump or abs(want - v) > max(1.0, band * v)):
                nv = v + 0.5 * (want - v)
                v = float(want) if jump or abs(want - nv) < 1.0 else nv
                if last and last[0] == -direction:
                    self.reversals += 1
                self._last_move[name] = (direction, self._decisions)
                self._values[name] = v
            new[name] = max(1, round(v))
        # The chunk follows the two: what a budget below its ceiling leaves
        # beside a full batch of decodes (at the ceiling, the configured chunk).
        budget, seqs = new["token_budget"], new["max_num_seqs"]
        c = self.ceiling
        chunk = c.prefill_chunk if budget >= c.token_budget else \
            max(self.min_chunk, min(c.prefill_chunk, budget - seqs))
        knobs = Knobs(budget, seqs, chunk)
        if knobs == self.knobs:
            return None
        self.knobs = knobs
        self.changes += 1
        return Decision(knobs, state, why)


__all__ = ["AutoTuner", "Decision", "Knobs", "LatencyModel", "StepShape", "features"]
