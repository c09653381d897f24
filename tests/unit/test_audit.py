"""The hash-chained audit log: tampering of every kind is named (no sockets)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.security.audit import AuditLog, head_path, read_lines, record_hash, verify_file, verify_lines
from services.security.audit import AuditRecord  # noqa: F401 - the record type the lines hold


def write_log(tmp_path: Path, n: int = 6) -> Path:
    log = AuditLog(tmp_path / "audit.jsonl")
    log.open()
    for i in range(n):
        log.append(f"p{i}", "login", f"key k{i}", "ok", {"i": i})
    log.close()
    return log.path


def lines(path: Path) -> list[dict]:  # type: ignore[type-arg]
    return [json.loads(x) for x in read_lines(path)]


def rewrite(path: Path, recs: list[dict]) -> None:  # type: ignore[type-arg]
    path.write_text("".join(json.dumps(r, separators=(",", ":")) + "\n" for r in recs))


def rehash(rec: dict) -> dict:  # type: ignore[type-arg]
    import msgspec

    rec["hash"] = record_hash(msgspec.convert(rec, AuditRecord))
    return rec


def test_an_untouched_log_verifies_and_files_are_private(tmp_path: Path) -> None:
    path = write_log(tmp_path)
    v = verify_file(path)
    assert v.ok and v.records == 6, v.message
    assert path.stat().st_mode & 0o777 == 0o600 and head_path(path).stat().st_mode & 0o777 == 0o600
    recs = lines(path)
    assert [r["seq"] for r in recs] == list(range(6))
    assert all(b["prev"] == a["hash"] for a, b in zip(recs, recs[1:]))


def test_reopening_continues_the_chain(tmp_path: Path) -> None:
    path = write_log(tmp_path, 3)
    log = AuditLog(path)
    log.open()
    assert not log.warning
    log.append("admin", "revoke", "key k1", "ok")
    log.close()
    assert verify_file(path).ok and lines(path)[-1]["seq"] == 3


def test_an_edited_record_is_named(tmp_path: Path) -> None:
    path = write_log(tmp_path)
    recs = lines(path)
    recs[2]["result"] = "denied"
    rewrite(path, recs)
    v = verify_file(path)
    assert not v.ok and v.line == 3 and "seq 2 was edited" in v.message


def test_an_edited_record_with_a_recomputed_hash_breaks_the_next_link(tmp_path: Path) -> None:
    path = write_log(tmp_path)
    recs = lines(path)
    recs[2]["principal"] = "mallory"
    rehash(recs[2])
    rewrite(path, recs)
    v = verify_file(path)
    assert not v.ok and v.line == 4 and "does not chain" in v.message


def test_a_deleted_record_is_named(tmp_path: Path) -> None:
    path = write_log(tmp_path)
    recs = lines(path)
    del recs[3]
    rewrite(path, recs)
    v = verify_file(path)
    assert not v.ok and v.line == 4 and "missing: seq 3 absent" in v.message


def test_reordered_records_are_named(tmp_path: Path) -> None:
    path = write_log(tmp_path)
    recs = lines(path)
    recs[1], recs[2] = recs[2], recs[1]
    rewrite(path, recs)
    v = verify_file(path)
    assert not v.ok and v.line == 2 and "out of order: seq 2 where seq 1 belongs" in v.message


def test_records_cut_from_the_end_are_caught_by_the_head(tmp_path: Path) -> None:
    path = write_log(tmp_path)
    recs = lines(path)
    rewrite(path, recs[:-2])
    v = verify_file(path)
    assert not v.ok and "missing at the end" in v.message and "head records seq 5" in v.message


def test_a_replaced_last_record_is_caught_by_the_head(tmp_path: Path) -> None:
    path = write_log(tmp_path)
    recs = lines(path)
    recs[-1]["result"] = "forbidden"
    rehash(recs[-1])
    rewrite(path, recs)
    v = verify_file(path)
    assert not v.ok and "last record (seq 5) was replaced" in v.message


def test_a_truncated_line_is_named(tmp_path: Path) -> None:
    path = write_log(tmp_path)
    raw = path.read_bytes().splitlines()
    raw[1] = raw[1][:40]
    v = verify_lines(raw)
    assert not v.ok and v.line == 2 and "not a valid audit record" in v.message


def test_a_crash_between_record_and_head_is_repaired_at_open(tmp_path: Path) -> None:
    path = write_log(tmp_path, 4)
    recs = lines(path)
    head_path(path).write_text(f"{2:020d} {recs[2]['hash']}\n")  # the head lags by one record
    assert not verify_file(path).ok
    log = AuditLog(path)
    log.open()
    log.close()
    assert not log.warning and verify_file(path).ok


@pytest.mark.parametrize("missing", ["log", "head"])
def test_missing_files(tmp_path: Path, missing: str) -> None:
    path = write_log(tmp_path, 2)
    if missing == "log":
        path.unlink()
        v = verify_file(path)
        assert not v.ok and "no audit log" in v.message
    else:
        head_path(path).unlink()
        assert verify_file(path).ok  # without a head only the chain itself is checked
