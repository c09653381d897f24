"""Scheduling policies behind one interface.

A policy orders sequences (`key`: smaller runs first, for both the running
and the waiting ones), names the preemption victim, says when a running
sequence must yield to a waiting one while the batch is full, and accounts
for the tokens each sequence was given. It never touches blocks or sockets:
the planner (planner.py) applies it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import Any

from services.scheduler._request import Seq, next_ticket
from common.config.scheduler import PolicyConfig, PolicyName


class Policy(ABC):
    name: PolicyName

    @abstractmethod
    def key(self, seq: Seq, now: float) -> tuple[Any, ...]:
        """Sort key: smaller is more important."""

    def victim(self, candidates: Iterable[Seq], now: float) -> Seq | None:
        """The sequence to preempt among `candidates` (the least important)."""
        return max(candidates, key=lambda s: self.key(s, now), default=None)

    def yields_to(self, running: Seq, waiting: Seq, now: float) -> bool:
        """With the batch full, should `running` be preempted so `waiting` runs?"""
        return False

    def defers(self, running: Seq, waiting: Seq, now: float) -> bool:
        """Should `running` sit out the step in which `waiting` starts, so that
        step (and `waiting`'s first token) is not slowed by it? It keeps its
        blocks and runs again the step after."""
        return False

    def charge(self, seq: Seq, tokens: int, now: float) -> None:
        """`seq` is given `tokens` tokens of this step."""
        seq.served += tokens
        seq.high_water = max(seq.high_water, seq.num_computed + tokens)

    def on_arrival(self, seq: Seq, now: float) -> None:
        """A new sequence enters the waiting queue."""

    def on_preempted(self, seq: Seq, now: float) -> None:
        """`seq` was preempted; it keeps its place in line unless the policy
        says otherwise."""

    def on_finished(self, seq: Seq) -> None:
        """`seq` left the scheduler for good."""


class Fcfs(Policy):
    name = PolicyName.FCFS

    def key(self, seq: Seq, now: float) -> tuple[Any, ...]:
        return (seq.arrival, seq.seq_id)


class Priority(Policy):
    """Lower `priority` first. Aging: a request gains one level per `aging_s`
    seconds since it arrived, so a low-priority request never starves. A
    waiting request preempts a running one (batch full) when it is at least
    one whole level more important."""

    name = PolicyName.PRIORITY

    def __init__(self, aging_s: float):
        self.aging_s = aging_s

    def effective(self, seq: Seq, now: float) -> float:
        return seq.priority - (now - seq.arrival) / self.aging_s

    def key(self, seq: Seq, now: float) -> tuple[Any, ...]:
        return (self.effective(seq, now), seq.arrival, seq.seq_id)

    def yields_to(self, running: Seq, waiting: Seq, now: float) -> bool:
        return self.effective(waiting, now) <= self.effective(running, now) - 1.0

    # A whole level more important starts in a step of its own peers: on a
    # device whose step time grows with the batch, a high-priority request's
    # first token then costs about what it costs on an idle system.
    defers = yields_to


class RoundRobin(Policy):
    """One line; a sequence that computed `quantum` tokens since its turn
    began yields to a waiting one when the batch is full, and goes to the
    back of the line."""

    name = PolicyName.ROUND_ROBIN

    def __init__(self, quantum: int):
        self.quantum = quantum

    def key(self, seq: Seq, now: float) -> tuple[Any, ...]:
        return (seq.ticket,)

    def yields_to(self, running: Seq, waiting: Seq, now: float) -> bool:
        return running.quantum_used >= self.quantum

    def charge(self, seq: Seq, tokens: int, now: float) -> None:
        seq.quantum_used += new_work(seq, tokens)
        super().charge(seq, tokens, now)

    def on_preempted(self, seq: Seq, now: float) -> None:
        if seq.quantum_used >= self.quantum:
            seq.ticket = next_ticket()
        seq.quantum_used = 0


class Mlfq(Policy):
    """Multilevel feedback queue: new sequences enter level 0; a sequence
    that used its level's quantum (``quantum * 2**level`` tokens) drops one
    level; every `boost_s` seconds everything returns to level 0 (so long
    jobs are not starved). Round robin within a level."""

    name = PolicyName.MLFQ

    def __init__(self, quantum: int, levels: int, boost_s: float):
        self.quantum = quantum
        self.levels = levels
        self.boost_s = boost_s

    def _epoch(self, now: float) -> int:
        return int(now // self.boost_s)

    def level(self, seq: Seq, now: float) -> int:
        # Boosts are lazy: a level set before the current epoch has expired.
        if seq.boost_epoch != self._epoch(now):
            seq.boost_epoch = self._epoch(now)
            seq.level = 0
            seq.quantum_used = 0
        return seq.level

    def key(self, seq: Seq, now: float) -> tuple[Any, ...]:
        return (self.level(seq, now), seq.ticket)

    def yields_to(self, running: Seq, waiting: Seq, now: float) -> bool:
        return self.level(waiting, now) < self.level(running, now)

    def charge(self, seq: Seq, tokens: int, now: float) -> None:
        level = self.level(seq, now)
        seq.quantum_used += new_work(seq, tokens)
        super().charge(seq, tokens, now)
        if seq.quantum_used >= self.quantum << level and level < self.levels - 1:
            seq.level = level + 1
            seq.quantum_used = 0
            seq.ticket = next_ticket()

    def on_arrival(self, seq: Seq, now: float) -> None:
        seq.boost_epoch = self._epoch(now)
        seq.level = 0


class Fair(Policy):
    """Weighted fair share of computed tokens across tenants (start-time fair
    queueing): each tenant has a virtual token count advanced by tokens /
    weight; the tenant furthest behind goes first. A tenant that becomes
    active starts at the smallest active count, so idle time is no credit.
    A running sequence yields when its tenant is more than `quantum` virtual
    tokens ahead of a waiting one's (the margin stops two tenants trading
    places every step)."""

    name = PolicyName.FAIR

    def __init__(self, weights: dict[str, float], default_weight: float, quantum: int):
        self.weights = weights
        self.default_weight = default_weight
        self.quantum = quantum
        self.vtokens: dict[str, float] = {}
        self.active: dict[str, int] = {}

    def weight(self, tenant: str) -> float:
        return self.weights.get(tenant, self.default_weight)

    def key(self, seq: Seq, now: float) -> tuple[Any, ...]:
        return (self.vtokens.get(seq.tenant, 0.0), seq.arrival, seq.seq_id)

    def yields_to(self, running: Seq, waiting: Seq, now: float) -> bool:
        return self.vtokens.get(waiting.tenant, 0.0) + self.quantum < self.vtokens.get(running.tenant, 0.0)

    def charge(self, seq: Seq, tokens: int, now: float) -> None:
        super().charge(seq, tokens, now)
        self.vtokens[seq.tenant] = self.vtokens.get(seq.tenant, 0.0) + tokens / self.weight(seq.tenant)

    def on_arrival(self, seq: Seq, now: float) -> None:
        t = seq.tenant
        if not self.active.get(t):
            floor = min((self.vtokens.get(a, 0.0) for a, n in self.active.items() if n), default=0.0)
            self.vtokens[t] = max(self.vtokens.get(t, 0.0), floor)
        self.active[t] = self.active.get(t, 0) + 1

    def on_finished(self, seq: Seq) -> None:
        n = self.active.get(seq.tenant, 0) - 1
        if n > 0:
            self.active[seq.tenant] = n
        else:
            self.active.pop(seq.tenant, None)


def make_policy(config: PolicyConfig) -> Policy:
    match config.name:
        case PolicyName.FCFS:
            return Fcfs()
        case PolicyName.PRIORITY:
            return Priority(config.aging_s)
        case PolicyName.ROUND_ROBIN:
            return RoundRobin(config.quantum)
        case PolicyName.MLFQ:
            return Mlfq(config.quantum, config.mlfq_levels, config.boost_s)
        case PolicyName.FAIR:
            return Fair(dict(config.weights), config.default_weight, config.quantum)
    raise ValueError(f"unknown policy {config.name!r}")  # pragma: no cover - PolicyName is closed


def new_work(seq: Seq, tokens: int) -> int:
    """Of `tokens` about to be computed, those never computed before: a
    quantum counts progress, not the recompute a preemption forced on it.
    (Call before `Policy.charge` moves the high-water mark.)"""
    return max(0, seq.num_computed + tokens - seq.high_water)
