"""The step-time model the tuner plans from.

A decoding sequence gets one token per step, so its time per output token
is the step time; a step's time grows with what it computes. `LatencyModel`
fits, over a sliding window of recent steps,

    step_s ~ a + b_d * decodes + b_p * prefill_tokens + b_c * context / 1000

(`context`: the KV positions the step's decodes read — their context
lengths; a prefill chunk's attention is small beside its other work at
these sizes and left in `b_p`), with every coefficient kept >= 0 and
the fixed cost `a` at least `FLOOR` times what near-idle steps took beyond their decodes' share (a
window of decode-only steps whose decodes and context rise together does
not tell the fixed cost from the per-decode one: unconstrained, a noisy
fit slid to a ~0 ms fixed cost and a ~6 ms decode where the steps said
~35 and ~2), and
watches its own error: when the last steps all run slower (or faster) than
it predicts by a wide margin — a slower machine, a second tenant's process,
a restarted driver — it rescales the older steps by that ratio and refits
(a reset), rather than averaging the old machine with the new one for a
whole window.

Pure Python with no clock of its own: the engine reports each step's shape
and measured duration.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

Vec = tuple[float, float, float, float]
FLOOR = 0.8  # the fixed cost's least share of a near-idle step's (less its decodes')


@dataclass(frozen=True, slots=True)
class StepShape:
    decodes: int  # sequences computing one token
    prefill: int  # tokens of prompt (or recompute) chunks
    context: int  # KV positions the decodes read (their context lengths, summed)


def features(s: StepShape) -> Vec:
    return (1.0, float(s.decodes), float(s.prefill), s.context / 1000.0)


class LatencyModel:
    def __init__(self, window: int = 64, *, min_samples: int = 12, max_rel_error: float = 0.35,
                 drift_steps: int = 12, drift_ratio: float = 1.4, trust_steps: int = 8, trust_ratio: float = 1.25,
                 trust_again_ratio: float = 1.15):
        self.idle_s = 0.0  # smoothed, a near-idle step's time less its decodes' share (the fixed cost's floor)
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
        self._trust_steps = trust_steps
        self._trust_log = math.log(trust_ratio)
        # Trust once lost comes back only within this tighter band (hysteresis):
        # a ratio hovering at `trust_ratio` flipped it, and the tuner's cap with
        # it, every second on a machine whose speed wandered (stolen CPU).
        self._trust_again_log = math.log(trust_again_ratio)
        self._trusting = False

    @property
    def sure(self) -> bool:
        """Enough steps and a small error; once sure, it stays so until the
        error passes 1.5x `max_rel_error` (no flapping at the threshold). A
        machine whose speed needed two resets within one window is not
        steady enough to plan on: unsure until the older reset leaves it."""
        return self.coef is not None and len(self.samples) >= self.min_samples and self._sure and not self.unsteady

    @property
    def recent_ratio(self) -> float | None:
        """Measured / predicted over the last `trust_steps` steps (geometric
        mean), or None until that many were predicted since the last fit
        from scratch or reset."""
        n = self._trust_steps
        if self.coef is None or len(self._drift) < n:
            return None
        recent = list(self.samples)[-n:]
        if any(self._predict(x) <= 0 for x, _ in recent):
            return None
        return math.exp(sum(math.log(y / self._predict(x)) for x, y in recent) / n)

    @property
    def trusted(self) -> bool:
        """Sure, and the last steps ran within `trust_ratio` of what it
        predicted: an error its fit's residual does not show (a model
        rescaled by a reset, a machine that just sped up) keeps it from
        binding anything until it holds again, within `trust_again_ratio`.
        (Idempotent for one step: it only moves with the recent ratio.)"""
        r = self.recent_ratio
        if r is None:
            self._trusting = False
        else:
            off = abs(math.log(r))
            if off <= self._trust_again_log or (self._trusting and off <= self._trust_log):
                self._trusting = True
            else:
                self._trusting = False
        return self.sure and self._trusting

    @property
    def max_decodes(self) -> int:
        """The largest batch of decodes a step in the window ran."""
        return int(max((x[1] for x, _ in self.samples), default=0.0))

    @property
    def unsteady(self) -> bool:
        return len(self._reset_at) == 2 and self._steps - self._reset_at[0] < (self.samples.maxlen or 0)

    @property
    def prefill_known(self) -> bool:
        """Whether a step in the window computed prefill (else b_p is a guess)."""
        return any(x[2] > 0 for x, _ in self.samples)

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
        if self.coef is not None and shape.decodes <= 2 and not shape.prefill:
            fixed = max(0.0, step_s - (pred - self.coef[0]))
            self.idle_s = fixed if not self.idle_s else 0.9 * self.idle_s + 0.1 * fixed
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
        self.idle_s *= ratio
        self.fit()
        return ratio

    def fit(self) -> None:
        """Least squares with the coefficients kept >= 0: a feature whose
        coefficient comes out negative (noise, or a feature that did not
        vary) is dropped and the rest refitted. The fixed cost is kept at
        least `FLOOR` times what near-idle steps (two decodes or fewer, no
        prefill) took beyond their decodes' share: a fit under it is
        refitted with the fixed cost held there."""
        if len(self.samples) < 4:
            return
        coef = self._fit(self.samples, [0, 1, 2, 3])
        floor = FLOOR * self.idle_s
        if coef is not None and coef[0] < floor:
            rest = deque((x, y - floor) for x, y in self.samples)
            held = self._fit(rest, [1, 2, 3])
            coef = None if held is None else (floor, held[1], held[2], held[3])
        if coef is None:
            return
        self.coef = coef
        ys = [y for _, y in self.samples]
        sq = sum((y - self._predict(x)) ** 2 for x, y in self.samples)
        mean = sum(ys) / len(ys)
        self.rel_error = math.sqrt(sq / len(ys)) / mean if mean > 0 else math.inf
        if self.rel_error <= self.max_rel_error:
            self._sure = True
        elif self.rel_error > 1.5 * self.max_rel_error:
            self._sure = False

    def _fit(self, samples: deque[tuple[Vec, float]], active: list[int]) -> Vec | None:
        active = list(active)
        while active:
            coef = _solve(samples, active)
            if coef is None:
                return None
            worst = min(active, key=lambda i: coef[i])
            if coef[worst] >= 0:
                return coef
            active.remove(worst)
        return None


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


__all__ = ["LatencyModel", "StepShape", "Vec", "features"]
