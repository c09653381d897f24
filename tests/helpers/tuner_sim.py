"""A synthetic serving loop for the tuner's tests: a device whose step time
is a known function of the step's shape (times noise), requests that
arrive, prefill in chunks and decode one token a step, planned the way the
scheduler's planner does (the batch first, then the line in arrival order,
each within the token budget, the prefill chunk and the batch cap), and
judged on their objectives. With a tuner, every step is fed to it and the
next one planned with its limits (the engine's `Tuning`, without the
engine); without one, the configured limits throughout."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from services.scheduler.autotune import AutoTuner, Decision, Demand, Knobs, StepShape, View


@dataclass
class Device:
    """step_s = speed * (fixed + per decode + per prefill token + per 1,000
    positions the decodes read), times noise: about the demo model on two
    CPU cores (a 512-token chunk ~200 ms, eight decodes ~30 ms)."""

    speed: float = 1.0
    noise: float = 0.05
    fixed: float = 0.006
    per_decode: float = 0.003
    per_prefill: float = 0.00038
    per_kpos: float = 0.002

    def step_s(self, s: StepShape, rng: random.Random) -> float:
        base = (self.fixed + self.per_decode * s.decodes + self.per_prefill * s.prefill
                + self.per_kpos * s.context / 1000)
        return self.speed * base * rng.uniform(1 - self.noise, 1 + self.noise)


@dataclass
class Req:
    at: float
    prompt: int
    output: int
    ttft_s: float = 1.0
    tpot_s: float = 0.1
    computed: int = 0
    generated: int = 0
    first: float = 0.0  # when its first token came
    first_decode: float = 0.0  # the tuner's clock for its slack (as Tuning keeps it)
    base: int = 0  # tokens it had then
    done_at: float = 0.0

    @property
    def remaining(self) -> int:
        return self.prompt - self.computed if self.computed < self.prompt else 1

    @property
    def met(self) -> bool:
        if not self.done_at:
            return False
        tpot = (self.done_at - self.first) / (self.generated - 1) if self.generated > 1 else 0.0
        return self.first - self.at <= self.ttft_s and tpot <= self.tpot_s


@dataclass
class Sim:
    ceiling: Knobs
    tuner: AutoTuner | None = None
    device: Device = field(default_factory=Device)
    rng: random.Random = field(default_factory=lambda: random.Random(0))
    now: float = 0.0
    trace: list[Knobs] = field(default_factory=list)  # the limits each step ran with
    steps: list[tuple[StepShape, Knobs]] = field(default_factory=list)
    running: list[Req] = field(default_factory=list)
    line: list[Req] = field(default_factory=list)
    waiting: list[Req] = field(default_factory=list)
    knobs: Knobs | None = None
    stalled: int = 0  # running requests a step left out (a cap or budget under the batch)
    # Steps with token budget left, nothing prefilling, and a request waiting
    # that the configured limits would admit: `held` where the tuner's model
    # predicted that one more would make a running request miss its per-token
    # objective, `blocked` otherwise.
    blocked: int = 0
    held: int = 0
    decision: Decision | None = None
    arrival: tuple[float, float] = (0.0, 0.0)  # arrivals' mean prompt and output, smoothed (as Tuning keeps it)

    def run(self, reqs: list[Req], until: float = math.inf) -> list[Req]:
        """Serve `reqs` (with those still in the line or waiting from an
        earlier call) until all are done or the clock passes `until`."""
        self.line = line = sorted([*self.line, *reqs], key=lambda r: r.at)
        waiting = self.waiting
        knobs = self.knobs or self.ceiling
        while (line or waiting or self.running) and self.now < until:
            while line and line[0].at <= self.now:
                r = line.pop(0)
                waiting.append(r)
                p, o = self.arrival
                self.arrival = (r.prompt, r.output) if not o else (0.9 * p + 0.1 * r.prompt, 0.9 * o + 0.1 * r.output)
            if not waiting and not self.running:
                self.now = line[0].at
                continue
            sched = self._plan(knobs, waiting)
            idle = sum(n for _, n in sched) < knobs.token_budget and all(r.computed >= r.prompt for r, _ in sched)
            if idle and waiting and len(self.running) < self.ceiling.max_num_seqs:
                if self.decision is not None and self.decision.held:
                    self.held += 1
                else:
                    self.blocked += 1
            decodes = [r for r, _ in sched if r.computed >= r.prompt]
            shape = StepShape(len(decodes), sum(n for r, n in sched if r.computed < r.prompt),
                              sum(r.prompt + r.generated for r in decodes))
            step = self.device.step_s(shape, self.rng)
            self.now += step
            self.trace.append(knobs)
            self.steps.append((shape, knobs))
            for r, n in sched:
                if r.computed < r.prompt:
                    r.computed += n
                    if r.computed < r.prompt:
                        continue
                r.generated += 1
                if r.generated == 1:
                    r.first = self.now
                if r.generated >= r.output:
                    r.done_at = self.now
            self.running = [r for r in self.running if not r.done_at]
            if self.tuner is not None:
                self.tuner.observe(shape, step)
                self.decision = self.tuner.plan(self.view(waiting))
                knobs = self.decision.knobs
            self.knobs = knobs
        return reqs

    def _plan(self, k: Knobs, waiting: list[Req]) -> list[tuple[Req, int]]:
        budget, out = k.token_budget, list[tuple[Req, int]]()
        for r in self.running:
            if budget <= 0 or len(out) >= k.max_num_seqs:
                break
            n = min(r.remaining, k.prefill_chunk, budget)
            out.append((r, n))
            budget -= n
        self.stalled += len(self.running) - len(out)
        if k.late_last:  # those past their first-token objective start last
            waiting.sort(key=lambda r: r.at + r.ttft_s <= self.now)
        while waiting and budget > 0 and len(self.running) < k.max_num_seqs:
            r = waiting.pop(0)
            self.running.append(r)
            n = min(r.remaining, k.prefill_chunk, budget)
            out.append((r, n))
            budget -= n
        return out

    def view(self, waiting: list[Req]) -> View:
        decodes = context = 0
        allowances, demands, lefts = [], [], []
        for r in self.running:
            if r.computed < r.prompt or not r.generated:
                demands.append(Demand(r.at + r.ttft_s - self.now, r.remaining, True, r.output - r.generated,
                                      r.tpot_s))
                continue
            decodes += 1
            context += r.prompt + r.generated
            if not r.first_decode:
                r.first_decode, r.base = self.now, r.generated
            left = max(1, r.output - r.generated)
            done = r.generated - r.base
            allowances.append((r.tpot_s * (done + left) - (self.now - r.first_decode)) / left)
            lefts.append(left)
        for r in waiting:
            demands.append(Demand(r.at + r.ttft_s - self.now, r.remaining, False, r.output, r.tpot_s))
        return View(decodes, context, tuple(allowances), tuple(demands), len(self.running), len(waiting),
                    min((r.tpot_s for r in [*self.running, *waiting]), default=0.1), tuple(lefts), self.arrival)


def chats(rng: random.Random, seconds: float, rate: float, prompt: tuple[int, int] = (32, 128),
          output: tuple[int, int] = (48, 128), start: float = 0.0) -> list[Req]:
    out, at = [], start
    while at < start + seconds:
        out.append(Req(at, rng.randint(*prompt), rng.randint(*output)))
        at += rng.expovariate(rate)
    return out


def documents(rng: random.Random, seconds: float, every_s: float, size: int,
              prompt: tuple[int, int] = (2000, 3000)) -> list[Req]:
    return [Req(every_s / 2 + i * every_s + 0.05 * k, rng.randint(*prompt), rng.randint(8, 16), ttft_s=10.0)
            for i in range(int(seconds / every_s)) for k in range(size)]


def goodput(reqs: list[Req]) -> int:
    return sum(r.met for r in reqs)


def fresh(reqs: list[Req]) -> list[Req]:
    """The same workload, not yet served (to replay it under other limits)."""
    return [Req(r.at, r.prompt, r.output, r.ttft_s, r.tpot_s) for r in reqs]


def bench_chat(seed: int, rate: tuple[float, float], output: tuple[int, int]) -> list[Req]:
    """tools.bench.tuning's chat workloads: 12 s of Poisson arrivals whose
    rate climbs linearly from rate[0] to rate[1], prompts of 32-192 tokens."""
    rng = random.Random(seed)
    out, at = [], 0.0
    while at < 12.0:
        out.append(Req(at, rng.randint(32, 192), rng.randint(*output)))
        at += rng.expovariate(rate[0] + (rate[1] - rate[0]) * at / 12.0)
    return out


def median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]
