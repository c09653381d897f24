"""Verifying an audit log (`llmos audit verify`): the chain, the keyed head,
and the checkpoints found in the service logs; the verdict names the first
bad record and the check it failed. The format is services/security/audit.py's."""

from __future__ import annotations

import glob
import hmac
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import msgspec

from common.home import logs_dir, root_key_path
from services.security.audit import (CHECKPOINT, GENESIS, RECORD_DECODER, AuditRecord, audit_key, audit_path,
                                     HeadError, checkpoint_sig, head_path, read_head, record_mac)


@dataclass(frozen=True)
class Verdict:
    ok: bool
    records: int
    message: str
    line: int = 0  # 1-based line of the first bad record (0: none, or at the end)
    seq: int = -1
    check: str = ""  # which check failed: format, mac, seq, chain, checkpoint, head, logs
    checkpoints: int = 0


class Checkpoint(msgspec.Struct):
    """A checkpoint as found in a log line (`audit.checkpoint`)."""

    seq: int
    head: str
    sig: str


def _fail(records: int, message: str, check: str, line: int = 0, seq: int = -1) -> Verdict:
    return Verdict(False, records, message, line, seq, check)


def verify_lines(lines: list[bytes], key: bytes, head: tuple[int, str] | None,
                 logged: list[Checkpoint] | None = None, *, head_required: bool = True) -> Verdict:
    """Check the chain; the verdict names the first bad record and the check it failed."""
    records: list[AuditRecord | None] = []
    for raw in lines:
        try:
            records.append(RECORD_DECODER.decode(raw))
        except (msgspec.DecodeError, msgspec.ValidationError):
            records.append(None)
    where: dict[int, int] = {}
    for i, r in enumerate(records):
        if r is not None:
            where.setdefault(r.seq, i)
    prev, expect = GENESIS, 0
    checkpoints: dict[int, str] = {}
    macs: dict[int, str] = {}
    for i, rec in enumerate(records):
        n = i + 1
        if rec is None:
            return _fail(i, f"line {n}: not a valid audit record (edited or truncated)", "format", n, expect)
        if not hmac.compare_digest(record_mac(key, rec), rec.mac):
            return _fail(i, f"line {n}: record seq {rec.seq} fails its MAC (edited, forged, or written under "
                            f"another root key)", "mac", n, rec.seq)
        if rec.seq != expect:
            if rec.seq < expect or where.get(expect, -1) > i:
                what = f"out of order: seq {rec.seq} where seq {expect} belongs"
            else:
                what = f"record(s) missing: seq {expect}" + (f"..{rec.seq - 1}" if rec.seq - 1 > expect else "")
                what += f" absent before seq {rec.seq}"
            return _fail(i, f"line {n}: {what}", "seq", n, expect)
        if rec.prev != prev:
            return _fail(i, f"line {n}: seq {rec.seq} does not chain to the record before it "
                            f"(that record was replaced)", "chain", n, rec.seq)
        if rec.action == CHECKPOINT:
            d = rec.detail
            if (d.get("records") != rec.seq or d.get("head") != prev
                    or not hmac.compare_digest(str(d.get("sig", "")), checkpoint_sig(key, rec.seq, prev))):
                return _fail(i, f"line {n}: checkpoint seq {rec.seq} has a bad signature", "checkpoint", n, rec.seq)
            checkpoints[rec.seq] = prev
        macs[rec.seq] = rec.mac
        prev, expect = rec.mac, expect + 1
    last = expect - 1
    note = ""
    if head is None:
        if head_required:
            return _fail(len(records), "the audit head is missing: records cut from the end cannot be ruled out",
                         "head", 0, last)
    else:
        hseq, hmac_ = head
        if hseq > last:
            return _fail(len(records), f"records missing at the end: the log ends at seq {last}, the head "
                                       f"records seq {hseq}", "head", 0, last + 1)
        if hmac_ != macs.get(hseq):
            return _fail(len(records), f"seq {hseq}: the record differs from the one the head records "
                                       f"(replaced)", "head", where.get(hseq, -1) + 1, hseq)
        if hseq < last:
            # Past the head but MAC-valid: only the key holder can write those
            # (a record written while verifying, or a crash before the head update).
            note = f"; {last - hseq} record(s) after the head"
    for cp in logged or ():
        if not hmac.compare_digest(cp.sig, checkpoint_sig(key, cp.seq, cp.head)):
            continue  # not ours (another root key, or a forged line): proves nothing
        if cp.seq > last:
            return _fail(len(records), f"records missing at the end: the logs hold a checkpoint at seq {cp.seq}, "
                                       f"the audit log ends at seq {last}", "logs", 0, last + 1)
        if checkpoints.get(cp.seq) != cp.head:
            return _fail(len(records), f"seq {cp.seq}: the checkpoint in the logs does not match the audit log's "
                                       f"(records before it were rewritten)", "logs", where.get(cp.seq, -1) + 1,
                         cp.seq)
    return Verdict(True, len(records), f"ok: {len(records)} records, chain intact, "
                                       f"{len(checkpoints)} checkpoint(s){note}", checkpoints=len(checkpoints))


def read_lines(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        for raw in f:
            line = raw.rstrip(b"\n")
            if line:
                yield line


def logged_checkpoints(home: Path, service: str = "security") -> list[Checkpoint]:
    """Checkpoints the security server wrote to its log files (rotated ones too)."""
    out: list[Checkpoint] = []
    # <instance>.log and its rotations (.log.1 ...): security, security-2 ...
    for name in glob.glob(str(logs_dir(home) / f"{glob.escape(service)}*.log*")):
        try:
            f = open(name, "rb")  # noqa: SIM115 - closed below
        except OSError:
            continue
        with f:
            for raw in f:
                if b'"audit.checkpoint"' not in raw:
                    continue
                try:
                    out.append(msgspec.json.decode(raw, type=Checkpoint))
                except (msgspec.DecodeError, msgspec.ValidationError):
                    continue  # a line cut by a kill, or not ours
    return out


def verify_file(path: Path, key: bytes, head: Path, logged: list[Checkpoint] | None = None) -> Verdict:
    try:
        h = read_head(head, key)
    except HeadError as exc:
        return _fail(0, str(exc), "head")
    if not path.exists():
        if h is not None:
            return _fail(0, f"no audit log at {path}, but the head records seq {h[0]}: the log was deleted",
                         "head", 0, 0)
        return _fail(0, f"no audit log at {path}", "format")
    return verify_lines(list(read_lines(path)), key, h, logged)


def verify_home(home: Path) -> Verdict:
    """`verify_file` for a llmos home: the key from its root key, the head
    beside it, the checkpoints from its logs. Raises `OSError`/`ValueError`
    when the root key cannot be read."""
    root = bytes.fromhex(root_key_path(home).read_text().strip())
    return verify_file(audit_path(home), audit_key(root), head_path(home), logged_checkpoints(home))
