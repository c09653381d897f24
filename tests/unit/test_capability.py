"""Capability tokens: minting, verification, attenuation, tampering (no sockets)."""

from __future__ import annotations

import os
from pathlib import Path

import msgspec
import pytest

from common import capability as cap
from ipc.errors import BadRequest, Unauthorized
from common.keyfile import create_private, load_or_create_key, write_private

ROOT = b"k" * 32
NOW = 1_700_000_000.0


def token(rights: tuple[str, ...] = ("generate", "echo"), ttl: float = 600) -> bytes:
    return cap.mint(ROOT, "alice", "key1", rights, ttl, now=NOW)


def test_a_minted_token_verifies_to_its_grant() -> None:
    c = cap.verify(ROOT, token(), now=NOW + 1)
    assert (c.principal, c.key_id, c.rights) == ("alice", "key1", frozenset({"generate", "echo"}))
    assert c.expires_at == int(NOW) + 600 and not c.attenuated
    assert c.restrictions == cap.Restrictions() and c.restrictions_raw == b""
    assert len(token()) < 200


def test_rights_cover_only_their_table_entries() -> None:
    c = cap.verify(ROOT, token(), now=NOW)
    assert c.covers("scheduler", "Submit") and c.covers("echo", "Count")
    assert not c.covers("kernel", "Status") and not c.covers("kernel", "Shutdown")
    assert not c.covers("security", "CreateKey")
    assert c.covers("security", "RefreshToken")  # any valid token may refresh
    admin = cap.verify(ROOT, token(("admin",)), now=NOW)
    assert admin.covers("kernel", "Shutdown") and admin.covers("security", "Revoke")
    status = cap.verify(ROOT, token(("status",)), now=NOW)
    assert status.covers("kernel", "Status") and not status.covers("kernel", "Kill")
    sess = cap.verify(ROOT, token(("session",)), now=NOW)
    assert sess.covers("scheduler", "OpenSession") and not sess.covers("scheduler", "Submit")


def test_expired_and_wrong_key_tokens_are_unauthorized() -> None:
    with pytest.raises(Unauthorized, match="expired"):
        cap.verify(ROOT, token(ttl=10), now=NOW + 11)
    with pytest.raises(Unauthorized, match="signature"):
        cap.verify(b"j" * 32, token(), now=NOW)


@pytest.mark.parametrize("mask", [0x01, 0x80, 0xFF])
def test_flipping_any_byte_is_refused(mask: int) -> None:
    raw = cap.attenuate(token(), max_tokens=10, session="s1")
    cap.verify(ROOT, raw, now=NOW)
    for i in range(len(raw)):
        bad = raw[:i] + bytes([raw[i] ^ mask]) + raw[i + 1:]
        with pytest.raises(Unauthorized):
            cap.verify(ROOT, bad, now=NOW)


def test_truncated_extended_and_garbage_tokens_are_refused() -> None:
    raw = token()
    for bad in (raw[:-1], raw + b"\x00", b"", b"\x00" * 10, os.urandom(150), b"x" * 5000):
        with pytest.raises(Unauthorized):
            cap.verify(ROOT, bad, now=NOW)


def test_attenuation_narrows_without_the_root_key() -> None:
    parent = token()
    raw = cap.attenuate(parent, rights=["echo"], expires_at=NOW + 60, max_tokens=32, session="chat-1")
    c = cap.verify(ROOT, raw, now=NOW)
    assert c.rights == frozenset({"echo"}) and c.expires_at == int(NOW) + 60 and c.attenuated
    assert c.restrictions == cap.Restrictions(max_tokens=32, session="chat-1")
    assert cap.Restrictions.decode(c.restrictions_raw) == c.restrictions
    # a derived token keeps its parent's id: revoking the parent revokes it too
    assert c.token_id == cap.verify(ROOT, parent, now=NOW).token_id != cap.verify(ROOT, token(), now=NOW).token_id
    assert not c.covers("scheduler", "Submit")
    with pytest.raises(Unauthorized, match="expired"):
        cap.verify(ROOT, raw, now=NOW + 61)
    # attenuating again keeps narrowing
    tighter = cap.attenuate(raw, max_tokens=8)
    assert cap.verify(ROOT, tighter, now=NOW).restrictions.max_tokens == 8


def test_attenuate_refuses_to_widen() -> None:
    raw = cap.attenuate(token(), rights=["echo"], max_tokens=10, session="a")
    with pytest.raises(BadRequest, match="widen"):
        cap.attenuate(raw, rights=["echo", "admin"])
    with pytest.raises(BadRequest, match="extend"):
        cap.attenuate(raw, expires_at=NOW + 10_000)
    with pytest.raises(BadRequest, match="max_tokens"):
        cap.attenuate(raw, max_tokens=11)
    with pytest.raises(BadRequest, match="session"):
        cap.attenuate(raw, session="b")


def _append(raw: bytes, caveat: object) -> bytes:
    """What an attacker without the root key can do: chain a caveat of their choosing."""
    import hashlib
    import hmac

    tok = msgspec.msgpack.decode(raw, type=cap.Token)
    c = msgspec.msgpack.encode(caveat)
    sig = hmac.new(tok.sig, c, hashlib.sha256).digest()
    return msgspec.msgpack.encode(cap.Token(tok.version, tok.id, tok.caveats + (c,), sig))


def test_hand_made_widening_caveats_grant_nothing() -> None:
    narrowed = cap.attenuate(token(("echo", "generate")), rights=["echo"])
    widened = _append(narrowed, cap.OnlyRights(("admin", "echo", "generate")))
    c = cap.verify(ROOT, widened, now=NOW)  # the chain is valid: caveats only intersect
    assert c.rights == frozenset({"echo"}) and not c.covers("kernel", "Status")
    later = _append(cap.attenuate(token(), expires_at=NOW + 5), cap.ExpiresBy(int(NOW) + 10_000))
    with pytest.raises(Unauthorized, match="expired"):
        cap.verify(ROOT, later, now=NOW + 6)
    regrant = _append(token(("echo",)), cap.Grant("root", "k", ("admin",), int(NOW) + 999, int(NOW)))
    with pytest.raises(Unauthorized, match="grant"):
        cap.verify(ROOT, regrant, now=NOW)
    with pytest.raises(Unauthorized, match="two different sessions"):
        cap.verify(ROOT, _append(cap.attenuate(token(), session="a"), cap.InSession("b")), now=NOW)


def test_editing_a_caveat_breaks_the_chain() -> None:
    tok = msgspec.msgpack.decode(token(("echo",)), type=cap.Token)
    forged = cap.Grant("alice", "key1", ("admin",), int(NOW) + 600, int(NOW))
    bad = msgspec.msgpack.encode(cap.Token(tok.version, tok.id, (msgspec.msgpack.encode(forged),), tok.sig))
    with pytest.raises(Unauthorized, match="signature"):
        cap.verify(ROOT, bad, now=NOW)


def test_revocation_list_names_the_reason() -> None:
    c = cap.verify(ROOT, token(), now=NOW)
    assert cap.RevocationList().reason(c) is None
    assert "token" in (cap.RevocationList(tokens=frozenset({c.token_id})).reason(c) or "")
    assert "API key key1" in (cap.RevocationList(keys=frozenset({"key1"})).reason(c) or "")
    assert "alice" in (cap.RevocationList(principals=frozenset({"alice"})).reason(c) or "")
    rl = cap.RevocationList(tokens=frozenset({"ab"}), keys=frozenset({"k"}))
    assert msgspec.json.decode(msgspec.json.encode(rl), type=cap.RevocationList) == rl


def test_unknown_rights_are_named() -> None:
    with pytest.raises(BadRequest, match="'root'"):
        cap.mint(ROOT, "p", "k", ["generate", "root"], 60)
    with pytest.raises(BadRequest, match="at least one"):
        cap.mint(ROOT, "p", "k", [], 60)


def test_text_form_round_trips_and_rejects_junk() -> None:
    raw = token()
    assert cap.from_text(cap.to_text(raw)) == raw
    with pytest.raises(Unauthorized, match="prefix"):
        cap.from_text("Bearer xyz")


def test_key_files_are_private_and_created_once(tmp_path: Path) -> None:
    p = tmp_path / "sec" / "root.key"
    k1 = load_or_create_key(p)
    assert load_or_create_key(p) == k1 and len(k1) == 32
    assert p.stat().st_mode & 0o777 == 0o600 and p.parent.stat().st_mode & 0o777 == 0o700
    assert not create_private(p, b"other")
    os.chmod(p, 0o644)
    with pytest.raises(PermissionError, match="chmod 600"):
        load_or_create_key(p)
    q = tmp_path / "state.json"
    write_private(q, b"{}")
    write_private(q, b"[1]")
    assert q.read_bytes() == b"[1]" and q.stat().st_mode & 0o777 == 0o600
    assert [f.name for f in tmp_path.iterdir() if f.name.endswith(".tmp")] == []


def test_a_refresh_family_shares_its_id_and_revocation() -> None:
    """Issue 12 #9: a refreshed token keeps the login's id and time, so
    revoking that id refuses every member and every attenuation of one."""
    first = cap.verify(ROOT, token(), now=NOW)
    later = cap.mint(ROOT, "alice", "key1", ["generate"], 600, now=NOW + 300,
                     token_id=bytes.fromhex(first.token_id), login_at=first.login_at)
    c = cap.verify(ROOT, later, now=NOW + 301)
    assert (c.token_id, c.login_at) == (first.token_id, first.issued_at) and c.issued_at == int(NOW + 300)
    rl = cap.RevocationList(tokens=frozenset({first.token_id}))
    assert rl.reason(c) == f"token {first.token_id} is revoked"
    assert rl.reason(cap.verify(ROOT, cap.attenuate(later, max_tokens=3), now=NOW + 301))


def test_a_grant_minted_before_families_decodes_with_its_issue_time_as_login() -> None:
    tid = b"\x01" * cap.ID_BYTES
    old_grant = msgspec.msgpack.encode(["g", "bob", "k", ["generate"], int(NOW) + 60, int(NOW)])  # 5 fields
    raw = msgspec.msgpack.encode(cap.Token(cap.VERSION, tid, (old_grant,), cap._chain(ROOT, tid, (old_grant,))))
    c = cap.verify(ROOT, raw, now=NOW)
    assert c.principal == "bob" and c.login_at == int(NOW)
