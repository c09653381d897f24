"""Auto-tuning of the step size against a per-token latency target.

A decoding sequence gets one token per step, so its per-token latency is the
step time. Step time grows with the tokens a step computes (decodes plus
prefill chunks): over a window of recent steps the tuner fits
``step_s ~ a + b * tokens`` and picks the token budget that fits the target,
``(target - a) / b``. The batch cap follows it (every sequence in a step
costs at least one token). The configured token budget and batch cap are the
ceilings; changes are smoothed and made every few steps, so one slow step
(a GC pause, a busy machine) does not swing the limits.

Pure Python with no clock of its own: the engine reports each step's size
and measured duration.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Tuned:
    token_budget: int
    max_num_seqs: int


class AutoTuner:
    def __init__(self, target_s: float, max_budget: int, max_seqs: int, *, min_budget: int = 16,
                 window: int = 32, every: int = 8):
        self.target_s = target_s
        self.max_budget = max_budget
        self.max_seqs = max_seqs
        self.min_budget = min(min_budget, max_budget)
        self.every = every
        self.samples: deque[tuple[int, float]] = deque(maxlen=window)
        self.budget = float(max_budget)
        self.step_s = 0.0  # smoothed step time, for Stats
        self._since = 0

    def observe(self, tokens: int, step_s: float) -> Tuned | None:
        """A step computed `tokens` tokens in `step_s` seconds; returns new
        limits when it is time to change them."""
        if tokens <= 0 or step_s <= 0:
            return None
        self.samples.append((tokens, step_s))
        self.step_s = step_s if not self.step_s else 0.8 * self.step_s + 0.2 * step_s
        self._since += 1
        if self._since < self.every or len(self.samples) < 4:
            return None
        self._since = 0
        a, b = self._fit()
        wanted = (self.target_s - a) / b if self.target_s > a else self.min_budget
        # Half way each time: converges in a few updates without oscillating.
        self.budget = max(self.min_budget, min(self.max_budget, 0.5 * self.budget + 0.5 * wanted))
        budget = int(self.budget)
        return Tuned(budget, max(1, min(self.max_seqs, budget)))

    def _fit(self) -> tuple[float, float]:
        """Least squares of step time on tokens; proportional (a = 0) when the
        steps were too alike in size to tell a slope from noise."""
        n = len(self.samples)
        mt = sum(t for t, _ in self.samples) / n
        ms = sum(s for _, s in self.samples) / n
        var = sum((t - mt) ** 2 for t, _ in self.samples)
        if var > n * (0.1 * mt) ** 2:
            b = sum((t - mt) * (s - ms) for t, s in self.samples) / var
            a = ms - b * mt
            if b > 0 and a >= 0:
                return a, b
        return 0.0, ms / mt


__all__ = ["AutoTuner", "Tuned"]
