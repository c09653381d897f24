"""Per-principal admission quotas, with an explicit clock."""

from __future__ import annotations

import pytest

from ipc.errors import Overloaded
from ipc.protocol.security import Quota, QuotaPolicy
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
