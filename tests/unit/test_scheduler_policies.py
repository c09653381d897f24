"""Policies and the step planner, with in-memory sequences (no sockets, no memory server)."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest

from ipc.errors import BadRequest
from services.scheduler._request import Seq
from common.config.scheduler import PolicyConfig, PolicyName, load_scheduler_config
from services.scheduler.planner import BlockLedger, Limits, PoolShape, StepPlan, plan
from services.scheduler.policies import Fair, Mlfq, Policy, Priority, RoundRobin, make_policy

BS = 4
_nos = itertools.count(1)


def seq(prompt: int = 4, *, tenant: str = "t", priority: int = 0, arrival: float = 0.0,
        pool: str | None = None) -> Seq:
    return Seq(next(_nos), [1] * prompt, prompt, tenant=tenant, priority=priority, arrival=arrival, pool=pool)


class Sim:
    """Runs plans the way the engine does: scheduled tokens get KV (fake
    blocks), a finished prefill samples a token, preempted ones start over."""

    def __init__(self, policy: Policy, limits: Limits, pools: dict[str, int] | None = None):
        self.policy = policy
        self.limits = limits
        self.pools = {p: PoolShape(n, BS) for p, n in (pools or {"p": 1000}).items()}
        self.running: list[Seq] = []
        self.waiting: list[Seq] = []
        self.blocks = itertools.count()
        self.generated: Counter[int] = Counter()
        self.now = 0.0

    def add(self, s: Seq) -> Seq:
        self.policy.on_arrival(s, self.now)
        self.waiting.append(s)
        return s

    def step(self, dt: float = 0.01) -> StepPlan:
        ledger = BlockLedger(self.pools, self.running)
        p = plan(self.running, self.waiting, self.policy, ledger, self.limits, self.now)
        for s in p.preempted:
            s.reset(keep_pool=True)
            self.running.remove(s)
            self.waiting.append(s)
        for s, n in p.scheduled:
            s.num_computed += n
            while len(s.block_table) * BS < s.num_computed:
                s.block_table.append(next(self.blocks))
            if s.num_computed == len(s.tokens):
                s.tokens.append(7)
                self.generated[s.seq_id] += 1
            if s in self.waiting:
                self.waiting.remove(s)
                self.running.append(s)
        self.now += dt
        return p


def test_fcfs_runs_in_arrival_order_within_max_num_seqs() -> None:
    sim = Sim(make_policy(PolicyConfig(name=PolicyName.FCFS)), Limits(100, 2, 100))
    seqs = [sim.add(seq(arrival=t)) for t in (3.0, 1.0, 2.0)]
    p = sim.step()
    assert [s for s, _ in p.scheduled] == [seqs[1], seqs[2]]
    for _ in range(5):
        assert seqs[0] not in [s for s, _ in sim.step().scheduled]  # fcfs never preempts for a waiter


def test_budget_and_chunked_prefill_are_respected() -> None:
    sim = Sim(make_policy(PolicyConfig()), Limits(20, 8, 16))
    decoders = [sim.add(seq(3)) for _ in range(3)]
    sim.step()  # prefill the three short prompts
    long = sim.add(seq(100))
    p = sim.step()
    assert dict((s.seq_id, n) for s, n in p.scheduled) == {**{d.seq_id: 1 for d in decoders}, long.seq_id: 16}
    steps = 0
    while long.num_computed < 100:
        p = sim.step()
        assert p.num_tokens <= 20 and all(n <= 16 for _, n in p.scheduled)
        steps += 1
    assert steps == 6  # 84 remaining tokens in chunks of at most 16 (17 left by the 3 decoders)


def test_priority_orders_by_level_and_aging_lets_an_old_request_win() -> None:
    # One level per 10 s: a request that waited 4 levels' worth beats any later
    # arrival up to 4 levels more important, so a stream of them cannot starve it.
    pol = Priority(aging_s=10.0)
    old_low = seq(priority=5, arrival=0.0)
    soon_high = seq(priority=1, arrival=35.0)
    late_high = seq(priority=1, arrival=45.0)
    assert pol.key(soon_high, 50.0) < pol.key(old_low, 50.0)
    assert pol.key(old_low, 50.0) < pol.key(late_high, 50.0)
    sim = Sim(pol, Limits(100, 1, 100))
    sim.now = 50.0
    sim.add(late_high)
    sim.add(old_low)
    assert sim.step().scheduled[0][0] is old_low


def test_priority_waiting_request_displaces_a_lower_priority_one_when_the_batch_is_full() -> None:
    sim = Sim(Priority(aging_s=1e9), Limits(100, 2, 100))
    low = [sim.add(seq(priority=9)) for _ in range(2)]
    sim.step()
    assert sim.running == low
    high = sim.add(seq(priority=0))
    p = sim.step()
    assert len(p.preempted) == 1 and p.preempted[0] in low
    assert high in [s for s, _ in p.scheduled]
    same = sim.add(seq(priority=0))
    p = sim.step()
    # equal priority never displaces (no thrash); the remaining low one does yield
    assert p.preempted and all(v.priority == 9 for v in p.preempted) and same in [s for s, _ in p.scheduled]


def test_priority_a_more_important_request_starts_in_a_step_the_lower_ones_sit_out() -> None:
    sim = Sim(Priority(aging_s=1e9), Limits(100, 8, 100))
    low = [sim.add(seq(priority=9)) for _ in range(3)]
    sim.step()
    high = sim.add(seq(6, priority=0))
    p = sim.step()
    # Its first token comes from a step of its own; the others keep their KV.
    assert [s for s, _ in p.scheduled] == [high] and not p.preempted
    assert all(x.num_computed == 4 and x in sim.running for x in low)
    p = sim.step()
    assert {s for s, _ in p.scheduled} == {high, *low}  # then they decode together
    peer = sim.add(seq(priority=9))
    p = sim.step()
    assert {s for s, _ in p.scheduled} == {high, *low, peer}  # an equal never makes others wait


def test_priority_short_of_blocks_the_least_important_is_displaced_and_the_next_sits_out() -> None:
    # 4 blocks of 4: two low sequences hold one block each; the head needs 3.
    sim = Sim(Priority(aging_s=1e9), Limits(100, 8, 100), pools={"p": 4})
    low = [sim.add(seq(3, priority=9, arrival=float(i))) for i in range(2)]
    sim.step()
    high = sim.add(seq(12, priority=0))
    p = sim.step()
    assert p.preempted == [low[1]]  # its block makes room (recompute later)
    assert [s for s, _ in p.scheduled] == [high]
    assert low[0] in sim.running and low[0].num_computed == 3 and low[0].block_table == [0]  # kept, idle


def test_round_robin_yields_after_the_quantum_and_shares_the_batch() -> None:
    sim = Sim(RoundRobin(quantum=8), Limits(100, 2, 100))
    seqs = [sim.add(seq(2)) for _ in range(3)]
    first = sim.step()
    assert {s.seq_id for s, _ in first.scheduled} == {seqs[0].seq_id, seqs[1].seq_id}
    yields = 0
    for _ in range(60):
        p = sim.step()
        yields += len(p.preempted)
        # a yielding sequence used its quantum and goes to the back of the line
        assert all(v.quantum_used == 0 and v.ticket > s.ticket for v in p.preempted for s in sim.running)
    assert yields >= 5
    counts = [sim.generated[s.seq_id] for s in seqs]
    assert min(counts) > 0 and max(counts) - min(counts) <= 12  # turns of about a quantum each


def test_mlfq_demotes_after_the_quantum_boosts_periodically_and_favours_new_arrivals() -> None:
    pol = Mlfq(quantum=4, levels=3, boost_s=100.0)
    sim = Sim(pol, Limits(100, 1, 100))
    hog = sim.add(seq(2))
    for _ in range(6):
        sim.step()
    assert pol.level(hog, sim.now) == 1  # used its level-0 quantum (prompt 2 + decode)
    fresh = sim.add(seq(2))
    p = sim.step()
    assert p.preempted == [hog] and p.scheduled[0][0] is fresh  # a top-level arrival displaces it
    for _ in range(30):
        sim.step()
    assert pol.level(hog, sim.now) >= 1 and pol.level(fresh, sim.now) >= 1
    assert pol.level(hog, 100.0) == 0 and pol.level(fresh, 100.0) == 0  # the boost


def test_fair_share_follows_the_weights_within_tolerance() -> None:
    pol = Fair({"a": 1.0, "b": 3.0}, 1.0, quantum=16)
    sim = Sim(pol, Limits(8, 4, 8))
    for _ in range(6):
        sim.add(seq(4, tenant="a"))
        sim.add(seq(4, tenant="b"))
    for _ in range(3000):
        sim.step()
    served = Counter[str]()
    for s in [*sim.running, *sim.waiting]:
        served[s.tenant] += s.served
    ratio = served["b"] / served["a"]
    assert 2.7 <= ratio <= 3.3, served


def test_fair_share_gives_no_credit_for_idle_time() -> None:
    pol = Fair({}, 1.0, quantum=16)
    busy = seq(tenant="busy")
    pol.on_arrival(busy, 0)
    pol.charge(busy, 1000, 0)
    late = seq(tenant="late")
    pol.on_arrival(late, 0)
    assert pol.vtokens["late"] == pol.vtokens["busy"]


@pytest.mark.parametrize("name", [PolicyName.FCFS, PolicyName.PRIORITY])
def test_out_of_blocks_preempts_the_least_important_running_sequence(name: PolicyName) -> None:
    pol = make_policy(PolicyConfig(name=name, aging_s=1e9))
    # 6 blocks of 4 slots; three sequences each holding 2 full blocks.
    sim = Sim(pol, Limits(100, 8, 100), pools={"p": 6})
    a = sim.add(seq(8, priority=0, arrival=0.0))
    b = sim.add(seq(8, priority=5, arrival=1.0))
    c = sim.add(seq(8, priority=1, arrival=2.0))
    sim.step()
    assert set(sim.running) == {a, b, c} and all(len(s.block_table) == 2 for s in (a, b, c))
    p = sim.step()  # each decode step needs a third block: one must go
    victim = c if name == PolicyName.FCFS else b
    assert p.preempted == [victim]
    assert {s for s, _ in p.scheduled} == {a, b, c} - {victim}
    assert victim.num_computed == 0 and victim.block_table == [] and victim.preemptions == 1


def test_a_sequence_that_cannot_fit_alone_preempts_itself() -> None:
    sim = Sim(make_policy(PolicyConfig()), Limits(100, 8, 100), pools={"p": 2})
    s = sim.add(seq(8))
    sim.step()
    p = sim.step()
    assert p.preempted == [s] and not p.scheduled


def test_new_sequences_go_to_the_pool_with_most_free_blocks_per_sequence_and_stay() -> None:
    sim = Sim(make_policy(PolicyConfig()), Limits(100, 8, 100), pools={"x": 10, "y": 30})
    first = sim.add(seq(40))  # 10 blocks
    sim.step()
    assert first.pool == "y"
    second = sim.add(seq(4))
    sim.step()
    assert second.pool == "x"  # 10 free for it alone there; 19 on y shared with `first` (one taken to decode)
    third = sim.add(seq(4))
    sim.step()
    assert third.pool == "y"  # 18 free for two there; 9 for two on x
    sim.pools["x"] = PoolShape(100, BS)
    for _ in range(3):
        sim.step()
    assert (first.pool, second.pool, third.pool) == ("y", "x", "y")


def test_config_errors_name_the_field(tmp_path: object) -> None:
    with pytest.raises(BadRequest, match="token_budget"):
        load_scheduler_config(None, token_budget=0)
    with pytest.raises(BadRequest, match="scheduler config"):
        load_scheduler_config(None, policy="lottery")
    assert load_scheduler_config(None, policy="mlfq").policy.name == PolicyName.MLFQ


def test_the_tuners_late_requests_start_after_the_rest_and_still_start_when_there_is_room() -> None:
    # Limits.late (the tuner's choice on overload: requests past their
    # first-token objective) moves them behind the line, in its order.
    sim = Sim(make_policy(PolicyConfig(name=PolicyName.FCFS)), Limits(100, 2, 100))
    a, b, c = sim.add(seq(arrival=0.0)), sim.add(seq(arrival=0.1)), sim.add(seq(arrival=0.2))
    sim.limits = Limits(100, 2, 100, frozenset({a.seq_id}))
    assert [s for s, _ in sim.step().scheduled] == [b, c]
    sim.limits = Limits(100, 3, 100, frozenset({a.seq_id}))
    assert [s for s, _ in sim.step().scheduled] == [b, c, a]  # room for it: it starts
