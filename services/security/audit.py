"""The audit log: append-only JSONL, each record hash-chained to the previous.

    {"seq": 7, "time": ..., "principal": "alice", "action": "login", "target": "key 3fa9…",
     "result": "ok", "detail": {...}, "prev": "<hash of record 6>", "hash": "<hash of this record>"}

`hash` is SHA-256 over the record's canonical JSON with `hash` empty; `prev`
is the previous record's `hash` (64 zeros for the first). A side file,
``audit.head``, holds the last record's seq and hash, so deleting records at
the end is detected too. `verify` reports the first record that is edited,
missing or out of order.

What this does not stop: someone who can write `$LLMOS_HOME` can rewrite the
whole chain and the head consistently. Shipping head hashes off the host is
the defence against that (see docs/security.md).
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, TextIO

import msgspec

from ipc.home import security_dir

GENESIS = "0" * 64
_HEAD_LEN = 20 + 1 + 64 + 1

Scalar = str | int | float | bool


class AuditRecord(msgspec.Struct, forbid_unknown_fields=True):
    seq: int
    time: float
    principal: str
    action: str
    target: str
    result: str
    detail: dict[str, Scalar]
    prev: str
    hash: str = ""


_decoder = msgspec.json.Decoder(AuditRecord)


def record_hash(rec: AuditRecord) -> str:
    return hashlib.sha256(msgspec.json.encode(msgspec.structs.replace(rec, hash=""))).hexdigest()


def audit_path(home: Path) -> Path:
    return security_dir(home) / "audit.jsonl"


def head_path(log: Path) -> Path:
    return log.with_name(log.name.replace(".jsonl", "") + ".head")


def read_head(path: Path) -> tuple[int, str] | None:
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    if not text:
        return None  # created, never written (a crash right after the first open)
    seq, _, digest = text.partition(" ")
    if not seq.isdigit() or len(digest) != 64:
        raise ValueError(f"{path} is not an audit head (want '<seq> <sha256>')")
    return int(seq), digest


def _last_line(path: Path, chunk: int = 65536) -> bytes | None:
    """The last non-empty line, reading backwards (the log may be large)."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        end = f.tell()
        buf = b""
        pos = end
        while pos > 0:
            step = min(chunk, pos)
            pos -= step
            f.seek(pos)
            buf = f.read(step) + buf
            lines = buf.rstrip(b"\n").split(b"\n")
            if len(lines) > 1 or pos == 0:
                last = lines[-1]
                return last or None
    return None


class AuditLog:
    """The writer. `open` runs once at start (in a worker thread: it reads the
    tail); `append` is one line-buffered write plus an in-place head update."""

    def __init__(self, path: Path):
        self.path = path
        self.head = head_path(path)
        self.seq = -1
        self.prev = GENESIS
        self.warning = ""
        self._f: TextIO | None = None
        self._head_fd = -1

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(self.path.parent, 0o700)
        if self.path.exists():
            last = _last_line(self.path)
            if last is not None:
                try:
                    rec = _decoder.decode(last)
                    self.seq, self.prev = rec.seq, rec.hash
                except (msgspec.DecodeError, msgspec.ValidationError):
                    # Chain on from the damaged line as it is: verification will
                    # still name it as the first bad record.
                    self.warning = "the last audit record is damaged"
                    self.prev = hashlib.sha256(last).hexdigest()
                    head = read_head(self.head)
                    self.seq = head[0] + 1 if head else 0
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._f = os.fdopen(fd, "a", buffering=1)
        self._head_fd = os.open(self.head, os.O_RDWR | os.O_CREAT, 0o600)
        head = read_head(self.head)
        if head is not None and head[0] == self.seq - 1 and self.seq >= 0:
            # A crash between writing the last record and updating the head.
            self._write_head()
        elif head is not None and head[0] != self.seq:
            self.warning = f"audit head says seq {head[0]}, log ends at seq {self.seq}"
        elif head is None and self.seq >= 0:
            self._write_head()

    def _write_head(self) -> None:
        os.pwrite(self._head_fd, f"{self.seq:020d} {self.prev}\n".encode(), 0)

    def append(self, principal: str, action: str, target: str, result: str,
               detail: dict[str, Scalar] | None = None) -> AuditRecord:
        rec = AuditRecord(self.seq + 1, time.time(), principal or "-", action, target, result,
                          detail or {}, self.prev)
        rec.hash = record_hash(rec)
        assert self._f is not None, "AuditLog.open() first"
        self._f.write(msgspec.json.encode(rec).decode() + "\n")
        self.seq, self.prev = rec.seq, rec.hash
        self._write_head()
        return rec

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
        if self._head_fd >= 0:
            os.close(self._head_fd)
            self._head_fd = -1


@dataclass(frozen=True)
class Verdict:
    ok: bool
    records: int
    message: str
    line: int = 0  # 1-based line of the first bad record (0: none, or at the end)
    seq: int = -1


def verify_lines(lines: list[bytes], head: tuple[int, str] | None = None) -> Verdict:
    """Check the chain; the verdict names the first edited, missing or out-of-order record."""
    records: list[AuditRecord | None] = []
    for raw in lines:
        try:
            records.append(_decoder.decode(raw))
        except (msgspec.DecodeError, msgspec.ValidationError):
            records.append(None)
    where: dict[int, int] = {}
    for i, r in enumerate(records):
        if r is not None:
            where.setdefault(r.seq, i)
    prev, expect = GENESIS, 0
    for i, rec in enumerate(records):
        n = i + 1
        if rec is None:
            return Verdict(False, i, f"line {n}: not a valid audit record (edited or truncated)", n, expect)
        if record_hash(rec) != rec.hash:
            return Verdict(False, i, f"line {n}: record seq {rec.seq} was edited (its hash does not match "
                                     f"its content)", n, rec.seq)
        if rec.seq != expect:
            if rec.seq < expect or where.get(expect, -1) > i:
                what = f"out of order: seq {rec.seq} where seq {expect} belongs"
            else:
                what = f"record(s) missing: seq {expect}" + (f"..{rec.seq - 1}" if rec.seq - 1 > expect else "")
                what += f" absent before seq {rec.seq}"
            return Verdict(False, i, f"line {n}: {what}", n, expect)
        if rec.prev != prev:
            return Verdict(False, i, f"line {n}: seq {rec.seq} does not chain to the record before it "
                                     f"(that record was replaced)", n, rec.seq)
        prev, expect = rec.hash, expect + 1
    if head is not None:
        hseq, hhash = head
        if hseq >= expect:
            return Verdict(False, len(records), f"record(s) missing at the end: the log ends at seq {expect - 1}, "
                                                f"the head records seq {hseq}", 0, expect)
        if hseq == expect - 1 and hhash != prev:
            return Verdict(False, len(records), f"the last record (seq {hseq}) was replaced: its hash differs "
                                                f"from the head's", len(records), hseq)
        if hseq < expect - 1:
            return Verdict(False, len(records), f"records after seq {hseq} were appended without the writer "
                                                f"(the head records seq {hseq})", hseq + 2, hseq + 1)
    return Verdict(True, len(records), f"ok: {len(records)} records, chain intact")


def read_lines(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        for raw in f:
            line = raw.rstrip(b"\n")
            if line:
                yield line


def verify_file(path: Path) -> Verdict:
    if not path.exists():
        return Verdict(False, 0, f"no audit log at {path}")
    try:
        head = read_head(head_path(path))
    except ValueError as exc:
        return Verdict(False, 0, str(exc))
    return verify_lines(list(read_lines(path)), head)
