"""Per-principal admission quotas, with an explicit clock."""

from __future__ import annotations

import pytest

from ipc.errors import Overloaded
from ipc.protocol.security import Quota, QuotaPolicy
from services.scheduler._request import Seq
from common.config.scheduler import PolicyConfig
from services.scheduler.planner import BlockLedger, Limits, PoolShape, plan
from services.scheduler.policies import make_policy
from services.scheduler.quotas import QuotaGate, kv_quota_refusal


def gate(**q: int) -> QuotaGate:
    g = QuotaGate()
    g.apply(QuotaPolicy(1, {"alice": Quota(**q)}))
    return g


def test_concurrent_requests() -> None:
    g = gate(concurrent_requests=2)
    g.admit("alice", 10, now=0)
    g.admit("alice", 10, now=0)
    with pytest.raises(Overloaded, match="already runs 2") as ei:
        g.admit("alice", 10, now=0)
    assert ei.value.detail["retry_after_s"] == 1.0
    g.done("alice")
    g.admit("alice", 10, now=0)
    g.admit("bob", 10, now=0)  # no quota: unlimited


def test_requests_per_minute_window_slides() -> None:
    g = gate(requests_per_min=2)
    g.admit("alice", 1, now=0)
    g.done("alice")
    g.admit("alice", 1, now=10)
    g.done("alice")
    with pytest.raises(Overloaded) as ei:
        g.admit("alice", 1, now=30)
    assert ei.value.detail["retry_after_s"] == 30.0  # the first charge leaves the window at t=60
    g.admit("alice", 1, now=60)


def test_tokens_per_minute_counts_the_most_a_request_may_spend() -> None:
    g = gate(tokens_per_min=100)
    g.admit("alice", 60, now=0)
    with pytest.raises(Overloaded, match="would use 120 tokens"):
        g.admit("alice", 60, now=1)
    g.admit("alice", 40, now=1)
    g.admit("alice", 60, now=60)  # the first 60 expired


def test_a_new_policy_replaces_the_old() -> None:
    g = gate(concurrent_requests=1)
    g.admit("alice", 1, now=0)
    with pytest.raises(Overloaded):
        g.admit("alice", 1, now=0)
    g.apply(QuotaPolicy(2, {}))
    assert g.version == 2
    g.admit("alice", 1, now=0)  # unlimited now: no Overloaded


def test_kv_blocks_are_the_policys_nonzero_ones() -> None:
    g = QuotaGate()
    g.apply(QuotaPolicy(1, {"alice": Quota(kv_blocks=2), "bob": Quota(requests_per_min=3)}))
    assert g.kv_blocks() == {"alice": 2}
    g.admit("alice", 10**6, now=0)  # kv_blocks limits blocks, not tokens: the engine plans by it
    g.apply(QuotaPolicy(2, {}))
    assert g.kv_blocks() == {}


def test_kv_quota_refusal_names_the_quota_and_what_would_fit() -> None:
    e = kv_quota_refusal("alice", 2, 63, 16, 8, 1000)
    assert "'alice' has a KV-block quota (kv_blocks) of 2; this request needs 63 blocks of 16 tokens" in e.message
    assert "prompt (8 tokens) and max_tokens (1000)" in e.message and "max_tokens 25 or less would fit" in e.message
    assert e.detail["limit"] == 2 and e.detail["needed"] == 63 and e.code == "bad_request"
    assert "its prompt alone needs 3 blocks" in kv_quota_refusal("alice", 2, 3, 16, 33, 1).message


def test_the_planner_holds_back_only_the_tenant_short_of_its_kv_quota() -> None:
    # alice's running sequence holds all 4 of her blocks; her waiting ones wait
    # (in order) while bob's goes ahead; one that could never fit is handed back.
    policy = make_policy(PolicyConfig())
    a = Seq(1, [1] * 14, 13, tenant="alice", max_len=16, pool="p", num_computed=13, mem_known=14,
            block_table=[0, 1, 2, 3])
    b = Seq(2, [1] * 4, 4, tenant="alice", arrival=1.0, max_len=6)
    c = Seq(3, [1] * 2, 2, tenant="alice", arrival=2.0, max_len=3)
    d = Seq(4, [1] * 4, 4, tenant="bob", arrival=3.0, max_len=8)
    e = Seq(5, [1] * 4, 4, tenant="alice", arrival=4.0, max_len=40)  # 39 positions: 10 blocks of 4
    for s in (b, c, d, e):
        policy.on_arrival(s, 0.0)
    ledger = BlockLedger({"p": PoolShape(64, 4)}, [a], {"alice": 4})
    assert ledger.held["alice"] == 4 and ledger.room("alice") == 0
    p = plan([a], [b, c, d, e], policy, ledger, Limits(64, 8, 64), 5.0)
    assert [s.seq_id for s, _ in p.scheduled] == [1, 4]
    assert p.quota_waits == [b, c] and p.never_fit == [e] and p.preempted == []


def test_the_planner_preempts_within_the_tenant_short_of_its_quota() -> None:
    # two alice sequences each need a fifth block under a quota of 8 (both hold
    # 4): the less important one (the later) gives way, not bob's.
    policy = make_policy(PolicyConfig())
    first = Seq(1, [1] * 17, 16, tenant="alice", max_len=40, pool="p", num_computed=16, mem_known=17,
                block_table=[0, 1, 2, 3], arrival=0.0)
    second = Seq(2, [1] * 17, 16, tenant="alice", max_len=40, pool="p", num_computed=16, mem_known=17,
                 block_table=[4, 5, 6, 7], arrival=1.0)
    bob = Seq(3, [1] * 17, 16, tenant="bob", max_len=40, pool="p", num_computed=16, mem_known=17,
              block_table=[8, 9, 10, 11], arrival=2.0)
    for s in (first, second, bob):
        policy.on_arrival(s, 0.0)
    ledger = BlockLedger({"p": PoolShape(64, 4)}, [first, second, bob], {"alice": 8})
    p = plan([first, second, bob], [], policy, ledger, Limits(64, 8, 64), 5.0)
    assert p.preempted == [second]
    assert [s.seq_id for s, _ in p.scheduled] == [1, 3]
