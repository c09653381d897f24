"""The keyed, anchored audit log: tampering of every kind is named with the
check it failed (no sockets)."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest

from services.security.audit import (
    MAX_FIELD,
    AuditLog,
    AuditRecord,
    audit_key,
    read_head,
    record_mac,
)
from services.security.verify import Checkpoint, read_lines, verify_file, verify_lines

KEY = audit_key(b"r" * 32)


def paths(tmp_path: Path) -> tuple[Path, Path]:
    return tmp_path / "audit" / "audit.jsonl", tmp_path / "security" / "audit.head"


def write_log(tmp_path: Path, n: int = 6, **kw: int) -> AuditLog:
    path, head = paths(tmp_path)
    log = AuditLog(path, KEY, head, **kw)
    log.open()
    for i in range(n):
        log.append(f"p{i}", "login", f"key k{i}", "ok", {"i": i})
    log.close()
    return log


def verify(tmp_path: Path, logged: list[Checkpoint] | None = None, key: bytes = KEY):  # type: ignore[no-untyped-def]
    path, head = paths(tmp_path)
    return verify_file(path, key, head, logged)


def lines(path: Path) -> list[dict]:  # type: ignore[type-arg]
    return [json.loads(x) for x in read_lines(path)]


def rewrite(path: Path, recs: list[dict]) -> None:  # type: ignore[type-arg]
    path.write_text("".join(json.dumps(r, separators=(",", ":"), ensure_ascii=False) + "\n" for r in recs))


def remac(rec: dict, key: bytes = KEY) -> dict:  # type: ignore[type-arg]
    rec["mac"] = record_mac(key, msgspec.convert(rec, AuditRecord))
    return rec


def test_an_untouched_log_verifies_and_files_are_private(tmp_path: Path) -> None:
    log = write_log(tmp_path)
    v = verify(tmp_path)
    assert v.ok and v.records == 6, v.message
    assert log.path.stat().st_mode & 0o777 == 0o600 and log.head.stat().st_mode & 0o777 == 0o600
    assert log.path.parent != log.head.parent  # the anchor is not beside the log
    recs = lines(log.path)
    assert [r["seq"] for r in recs] == list(range(6))
    assert all(b["prev"] == a["mac"] for a, b in zip(recs, recs[1:]))


def test_reopening_continues_the_chain(tmp_path: Path) -> None:
    write_log(tmp_path, 3)
    path, head = paths(tmp_path)
    log = AuditLog(path, KEY, head)
    log.open()
    assert not log.warning
    log.append("admin", "revoke", "key k1", "ok")
    log.close()
    assert verify(tmp_path).ok and lines(path)[-1]["seq"] == 3


def test_an_edited_record_is_named(tmp_path: Path) -> None:
    path = write_log(tmp_path).path
    recs = lines(path)
    recs[2]["result"] = "denied"
    rewrite(path, recs)
    v = verify(tmp_path)
    assert not v.ok and v.line == 3 and v.check == "mac" and "seq 2 fails its MAC" in v.message


def test_an_edited_record_with_the_suffix_rehashed_fails_without_the_key(tmp_path: Path) -> None:
    """The attack that passed the unkeyed chain: edit a record, recompute every
    hash after it. Without the audit key the attacker's MACs are wrong."""
    path = write_log(tmp_path).path
    recs = lines(path)
    recs[2]["principal"] = "mallory"
    wrong_key = audit_key(b"guess" * 8)
    for i in range(2, len(recs)):
        recs[i]["prev"] = recs[i - 1]["mac"]
        remac(recs[i], wrong_key)
    rewrite(path, recs)
    v = verify(tmp_path)
    assert not v.ok and v.line == 3 and v.check == "mac"


def test_a_deleted_record_is_named(tmp_path: Path) -> None:
    path = write_log(tmp_path).path
    recs = lines(path)
    del recs[3]
    rewrite(path, recs)
    v = verify(tmp_path)
    assert not v.ok and v.line == 4 and v.check == "seq" and "missing: seq 3 absent" in v.message


def test_reordered_records_are_named(tmp_path: Path) -> None:
    path = write_log(tmp_path).path
    recs = lines(path)
    recs[1], recs[2] = recs[2], recs[1]
    rewrite(path, recs)
    v = verify(tmp_path)
    assert not v.ok and v.line == 2 and "out of order: seq 2 where seq 1 belongs" in v.message


def test_records_cut_from_the_end_are_caught_by_the_head(tmp_path: Path) -> None:
    path = write_log(tmp_path).path
    rewrite(path, lines(path)[:-2])
    v = verify(tmp_path)
    assert not v.ok and v.check == "head" and "missing at the end" in v.message and "head records seq 5" in v.message


@pytest.mark.parametrize("how", ["emptied", "deleted"])
def test_an_emptied_or_deleted_log_is_caught_by_the_head(tmp_path: Path, how: str) -> None:
    path = write_log(tmp_path).path
    if how == "emptied":
        path.write_text("")
    else:
        path.unlink()
    v = verify(tmp_path)
    assert not v.ok and v.check == "head", v.message


def test_a_missing_head_is_a_failure(tmp_path: Path) -> None:
    """Deleting the head used to make a truncated log verify 'ok'."""
    log = write_log(tmp_path)
    rewrite(log.path, lines(log.path)[:-2])
    log.head.unlink()
    v = verify(tmp_path)
    assert not v.ok and v.check == "head" and "head is missing" in v.message


def test_a_rewritten_head_needs_the_key(tmp_path: Path) -> None:
    """Delete the last record and point the head at the new last one: the
    head's MAC is the attacker's guess, so verification names the head."""
    log = write_log(tmp_path)
    recs = lines(log.path)[:-1]
    rewrite(log.path, recs)
    log.head.write_text(f"{recs[-1]['seq']:020d} {recs[-1]['mac']} {'0' * 64}\n")
    v = verify(tmp_path)
    assert not v.ok and v.check == "head" and "not written under this audit key" in v.message


def test_a_replaced_last_record_is_caught(tmp_path: Path) -> None:
    path = write_log(tmp_path).path
    recs = lines(path)
    recs[-1]["result"] = "forbidden"
    rewrite(path, recs)
    v = verify(tmp_path)
    assert not v.ok and v.check == "mac" and v.line == 6


def test_another_root_key_verifies_nothing(tmp_path: Path) -> None:
    write_log(tmp_path)
    v = verify(tmp_path, key=audit_key(b"x" * 32))
    assert not v.ok and v.check == "head"


def test_a_truncated_line_is_named(tmp_path: Path) -> None:
    path = write_log(tmp_path).path
    raw = path.read_bytes().splitlines()
    raw[1] = raw[1][:40]
    v = verify_lines(raw, KEY, None, head_required=False)
    assert not v.ok and v.line == 2 and v.check == "format" and "not a valid audit record" in v.message


def test_a_crash_between_record_and_head_is_repaired_at_open(tmp_path: Path) -> None:
    log = write_log(tmp_path, 4)
    recs = lines(log.path)
    # the head lags by one record: MAC-valid records past the head are the writer's own
    from services.security.audit import _head_mac

    log.head.write_text(f"{2:020d} {recs[2]['mac']} {_head_mac(KEY, 2, recs[2]['mac'])}\n")
    v = verify(tmp_path)
    assert v.ok and "1 record(s) after the head" in v.message
    again = AuditLog(log.path, KEY, log.head)
    again.open()
    again.close()
    assert not again.warning and read_head(log.head, KEY) == (3, recs[3]["mac"])


def test_the_writer_chains_on_from_the_head_so_a_cut_stays_visible(tmp_path: Path) -> None:
    log = write_log(tmp_path, 6)
    rewrite(log.path, lines(log.path)[:3])  # seq 3..5 cut while the server was down
    again = AuditLog(log.path, KEY, log.head)
    again.open()
    assert "records 3..5 are missing" in again.warning
    again.append("security", "audit.open", "x", "warning", {"warning": again.warning})
    again.close()
    v = verify(tmp_path)  # the new records do not paper over the gap
    assert not v.ok and v.check == "seq" and "seq 3..5 absent before seq 6" in v.message


def test_checkpoints_every_n_records_are_signed_and_checked(tmp_path: Path) -> None:
    log = write_log(tmp_path, 10, checkpoint_records=4)
    recs = lines(log.path)
    cps = [r for r in recs if r["action"] == "checkpoint"]
    assert [c["detail"]["records"] for c in cps] == [c["seq"] for c in cps] and len(cps) == 2
    v = verify(tmp_path)
    assert v.ok and v.checkpoints == 2
    # the checkpoints as the logs hold them confirm the log
    logged = [Checkpoint(c["seq"], c["detail"]["head"], c["detail"]["sig"]) for c in cps]
    assert verify(tmp_path, logged).ok


def test_truncation_past_a_logged_checkpoint_is_caught_even_with_a_forged_head(tmp_path: Path) -> None:
    """The head can be rebuilt by someone holding the key; a checkpoint that
    went to the logs (and off the host) still names the cut."""
    log = write_log(tmp_path, 10, checkpoint_records=4)
    recs = lines(log.path)
    last_cp = [r for r in recs if r["action"] == "checkpoint"][-1]
    logged = [Checkpoint(last_cp["seq"], last_cp["detail"]["head"], last_cp["detail"]["sig"])]
    kept = recs[:last_cp["seq"]]
    rewrite(log.path, kept)
    from services.security.audit import _head_mac

    log.head.write_text(f"{kept[-1]['seq']:020d} {kept[-1]['mac']} {_head_mac(KEY, kept[-1]['seq'], kept[-1]['mac'])}\n")
    v = verify(tmp_path, logged)
    assert not v.ok and v.check == "logs" and f"checkpoint at seq {last_cp['seq']}" in v.message
    # a checkpoint line not signed with the key proves nothing either way
    assert verify(tmp_path, [Checkpoint(10_000, "0" * 64, "f" * 64)]).ok


def test_a_forged_checkpoint_signature_is_named(tmp_path: Path) -> None:
    log = write_log(tmp_path, 6, checkpoint_records=3)
    recs = lines(log.path)
    i = next(i for i, r in enumerate(recs) if r["action"] == "checkpoint")
    recs[i]["detail"]["sig"] = "0" * 64
    remac(recs[i])  # even with a valid record MAC (a key holder's edit), the signature is checked
    for j in range(i + 1, len(recs)):
        recs[j]["prev"] = recs[j - 1]["mac"]
        remac(recs[j])
    rewrite(log.path, recs)
    from services.security.audit import _head_mac

    log.head.write_text(f"{recs[-1]['seq']:020d} {recs[-1]['mac']} {_head_mac(KEY, recs[-1]['seq'], recs[-1]['mac'])}\n")
    v = verify(tmp_path)
    assert not v.ok and v.check == "checkpoint" and v.line == i + 1


def test_attacker_sized_strings_are_capped(tmp_path: Path) -> None:
    path, head = paths(tmp_path)
    log = AuditLog(path, KEY, head)
    log.open()
    huge = "x" * 1_000_000
    rec = log.append(huge, huge, huge, huge, {huge: huge, **{f"k{i}": i for i in range(100)}})
    log.close()
    assert len(path.read_bytes()) < 10_000
    for s in (rec.principal, rec.action, rec.target, rec.result):
        assert len(s) < MAX_FIELD + 32 and s.endswith(f"[+{1_000_000 - MAX_FIELD} chars]")
    assert len(rec.detail) == 33 and rec.detail["truncated_items"] == 69
    assert verify(tmp_path).ok


@pytest.mark.parametrize("missing", ["log", "head"])
def test_missing_files(tmp_path: Path, missing: str) -> None:
    log = write_log(tmp_path, 2)
    if missing == "log":
        log.path.unlink()
        log.head.unlink()
        v = verify(tmp_path)
        assert not v.ok and "no audit log" in v.message
    else:
        log.head.unlink()
        v = verify(tmp_path)
        assert not v.ok and v.check == "head"
