"""The kernel's capability check in memory: no sockets, no processes."""

from __future__ import annotations

import time
from pathlib import Path

import msgspec
import pytest

from common import capability as cap
from ipc.envelope import PROTOCOL_VERSION, Header, Kind
from ipc.errors import BadRequest, Forbidden, Unauthorized
from common.home import revocations_path, root_key_path
from common.keyfile import write_private
from kernel import guard as guard_mod
from kernel.guard import Guard
from kernel.registry import Registry

ROOT = b"r" * 32


def req(dst: str, op: str, token: bytes = b"", principal: str = "") -> Header:
    return Header(PROTOCOL_VERSION, Kind.REQUEST, 1, dst=dst, op=op, token=token, principal=principal)


def guard() -> Guard:
    reg = Registry()
    reg.known.update({"echo", "security", "kernel"})
    return Guard(ROOT, cap.RevocationList(), reg.service_of_instance)


def tok(rights: tuple[str, ...] = ("echo",), principal: str = "alice", ttl: float = 600) -> bytes:
    return cap.mint(ROOT, principal, "k1", rights, ttl)


def test_admit_stamps_the_verified_principal_over_a_claimed_one() -> None:
    g = guard()
    h = g.admit(req("echo", "Echo", cap.attenuate(tok(), max_tokens=7), principal="root"))
    assert h.principal == "alice" and cap.Restrictions.decode(h.restrictions).max_tokens == 7
    assert g.admit(req("echo-1", "Echo", tok())).principal == "alice"  # an instance of a known service
    assert not g.denials


def test_login_is_the_only_op_without_a_token() -> None:
    g = guard()
    assert g.admit(req("security", "Login", principal="admin")).principal == ""
    for dst, op in [("echo", "Echo"), ("kernel", "Status"), ("security", "RefreshToken")]:
        with pytest.raises(Unauthorized, match="needs a capability token"):
            g.admit(req(dst, op))
    assert [d.op for d in g.take_denials()] == ["Echo", "Status", "RefreshToken"]
    # a client logs in again *because* its token expired, was revoked or is junk
    expired = cap.mint(ROOT, "alice", "k1", ["echo"], 10, now=time.time() - 100)
    g.set_revocations(cap.RevocationList(principals=frozenset({"bob"})))
    for t in (expired, tok(principal="bob"), b"junk"):
        assert g.admit(req("security", "Login", t, principal="alice")).principal == ""
    assert not g.take_denials()


def test_forbidden_carries_the_principal_for_the_audit() -> None:
    g = guard()
    with pytest.raises(Forbidden, match="rights: echo"):
        g.admit(req("kernel", "Shutdown", tok()))
    (d,) = g.take_denials()
    assert (d.code, d.principal, d.dst, d.op) == ("forbidden", "alice", "kernel", "Shutdown") and d.token_id


def test_a_cached_token_still_expires_and_can_be_revoked() -> None:
    g = guard()
    raw = tok(ttl=600)
    g.admit(req("echo", "Echo", raw))
    c = g._cache[raw]
    c.expires_at = int(time.time()) - 1  # as if its time had come while cached
    with pytest.raises(Unauthorized, match="expired"):
        g.admit(req("echo", "Echo", raw))
    assert raw not in g._cache
    raw2 = tok()
    g.admit(req("echo", "Echo", raw2))
    g.set_revocations(cap.RevocationList(principals=frozenset({"alice"})))
    with pytest.raises(Unauthorized, match="principal 'alice' is revoked"):
        g.admit(req("echo", "Echo", raw2))


def test_the_cache_and_the_denial_backlog_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(guard_mod, "CACHE_SIZE", 4)
    monkeypatch.setattr(guard_mod, "BACKLOG", 3)
    g = guard()
    for _ in range(10):
        g.admit(req("echo", "Echo", tok()))
    assert len(g._cache) == 4
    for i in range(5):
        with pytest.raises(Unauthorized):
            g.admit(req("echo", f"Op{i}"))
    out = g.take_denials()
    assert [d.op for d in out] == ["Op2", "Op3", "Op4"] and out[0].dropped == 2 and not g.take_denials()


def test_load_reads_the_persisted_revocations_and_refuses_a_damaged_file(tmp_path: Path) -> None:
    reg = Registry()
    g = Guard.load(tmp_path, reg.service_of_instance)
    assert root_key_path(tmp_path).stat().st_mode & 0o777 == 0o600 and g.revoked == cap.RevocationList()
    write_private(revocations_path(tmp_path), msgspec.json.encode(cap.RevocationList(keys=frozenset({"k1"}))))
    assert Guard.load(tmp_path, reg.service_of_instance).revoked.keys == {"k1"}
    revocations_path(tmp_path).write_text("{broken")
    with pytest.raises(BadRequest, match="revoked.json is damaged"):
        Guard.load(tmp_path, reg.service_of_instance)


def test_admit_stamps_the_source_and_attempt_over_the_clients() -> None:
    """A client's claimed `src` and `attempt` never reach a service: a
    client-set attempt once bought re-admission without quota (issue 12 #3)."""
    g = guard()
    claimed = msgspec.structs.replace(req("echo", "Echo", tok()), src="scheduler", attempt=3)
    h = g.admit(claimed, "front:0a0b")
    assert (h.src, h.attempt, h.principal) == ("front:0a0b", 0, "alice")
    login = msgspec.structs.replace(req("security", "Login", principal="admin"), src="security", attempt=1)
    h = g.admit(login, "front:0a0c")
    assert (h.src, h.attempt, h.principal) == ("front:0a0c", 0, "")
