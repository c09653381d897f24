"""The security server's state: API keys stored hashed, revocation, quotas (no sockets)."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from ipc.errors import BadRequest, NotFound, Unauthorized
from ipc.protocol.security import Quota, RevokeKind
from services.security.store import Store, split_api_key


def store() -> Store:
    return Store.load(Path("/nonexistent/state.json"), max_token_ttl_s=60)


def test_keys_are_shown_once_and_stored_only_as_salted_hashes() -> None:
    s = store()
    rec, key = s.create_key("alice", ["generate", "echo"])
    assert key.startswith(f"llmos.{rec.key_id}.") and split_api_key(key)[0] == rec.key_id
    secret = split_api_key(key)[1]
    snap = s.snapshot()
    assert secret.encode() not in snap and rec.digest.encode() in snap
    _, key2 = s.create_key("alice", ["echo"])
    r1, r2 = s.state.keys.values()
    assert r1.salt != r2.salt and key2 != key
    assert s.authenticate(key).key_id == rec.key_id
    assert rec.rights == ["echo", "generate"]


@pytest.mark.parametrize("mangle, cause", [
    (lambda k, s: k[:-2] + ("AA" if not k.endswith("AA") else "BB"), "wrong secret"),
    (lambda k, s: "llmos.000000000000.xyz", "unknown key id"),
    (lambda k, s: (s.revoke(RevokeKind.KEY, k.split(".")[1]), k)[1], "key revoked"),
    (lambda k, s: (s.revoke(RevokeKind.PRINCIPAL, "alice"), k)[1], "principal revoked"),
])
def test_every_bad_key_is_the_same_unauthorized_with_the_cause_for_the_audit(mangle, cause) -> None:  # type: ignore[no-untyped-def]
    s = store()
    _, key = s.create_key("alice", ["echo"])
    with pytest.raises(Unauthorized, match="invalid API key") as ei:
        s.authenticate(mangle(key, s))
    assert ei.value.detail["cause"] == cause


@pytest.mark.parametrize("bad", ["", "llmos", "llmos.12.x", "sk-123", "llmos.abcdefabcdef."])
def test_malformed_keys_are_unauthorized(bad: str) -> None:
    with pytest.raises(Unauthorized, match="invalid API key"):
        store().authenticate(bad)


def test_bad_tenants_and_rights_are_named() -> None:
    s = store()
    with pytest.raises(BadRequest, match="bad tenant name"):
        s.create_key("a b", ["echo"])
    with pytest.raises(BadRequest, match="unknown rights \\['root'\\]"):
        s.create_key("bob", ["root"])
    s.revoke(RevokeKind.PRINCIPAL, s.create_key("carol", ["echo"])[0].tenant)
    with pytest.raises(BadRequest, match="revoked"):
        s.create_key("carol", ["echo"])


def test_revocations_are_listed_idempotent_and_pruned() -> None:
    s = store()
    rec, _ = s.create_key("alice", ["echo"])
    tid = "ab" * 16
    assert s.revoke(RevokeKind.KEY, rec.key_id) and not s.revoke(RevokeKind.KEY, rec.key_id)
    assert s.revoke(RevokeKind.TOKEN, tid) and not s.revoke(RevokeKind.TOKEN, tid)
    assert s.revoke(RevokeKind.PRINCIPAL, "alice")
    rl = s.revocations()
    assert rl.keys == {rec.key_id} and rl.tokens == {tid} and rl.principals == {"alice"}
    with pytest.raises(NotFound):
        s.revoke(RevokeKind.KEY, "ffffffffffff")
    with pytest.raises(BadRequest, match="32 hex digits"):
        s.revoke(RevokeKind.TOKEN, "nope")
    import time

    assert not s.prune(time.time()) and s.prune(time.time() + 61)
    assert s.revocations().tokens == frozenset()


def test_quotas_are_validated_and_published_only_when_set() -> None:
    s = store()
    s.create_key("alice", ["generate"])
    s.create_key("bob", ["generate"])
    s.set_quota("alice", Quota(requests_per_min=60, kv_blocks=128))
    assert s.quotas() == {"alice": Quota(requests_per_min=60, kv_blocks=128)} and s.state.policy_version == 1
    with pytest.raises(BadRequest, match="tokens_per_min must be >= 0"):
        s.set_quota("bob", Quota(tokens_per_min=-1))
    with pytest.raises(NotFound):
        s.set_quota("nobody", Quota())


def test_state_round_trips_and_a_corrupt_file_is_named(tmp_path: Path) -> None:
    s = store()
    _, key = s.create_key("alice", ["echo"])
    p = tmp_path / "state.json"
    p.write_bytes(s.snapshot())
    again = Store.load(p, 60)
    assert again.authenticate(key).tenant == "alice"
    p.write_text("{not json")
    with pytest.raises(BadRequest, match="state.json is corrupt"):
        Store.load(p, 60)
    assert msgspec.json.decode(s.snapshot())["format"] == 1


def test_revoking_a_principal_changes_the_policy_it_is_published_in() -> None:
    """Issue 12 #10: the policy lists revoked principals and its version moves."""
    s = store()
    s.create_key("alice", ["generate"])
    s.create_key("bob", ["generate"])
    v0 = s.state.policy_version
    assert s.revoke(RevokeKind.PRINCIPAL, "bob") and s.revoked_principals() == ["bob"]
    assert s.state.policy_version == v0 + 1
    assert not s.revoke(RevokeKind.PRINCIPAL, "bob") and s.state.policy_version == v0 + 1
