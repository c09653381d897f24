"""The audit log: append-only JSONL, each record HMAC-chained to the previous.

    {"seq": 7, "time": ..., "principal": "alice", "action": "login", "target": "key 3fa9…",
     "result": "ok", "detail": {...}, "prev": "<mac of record 6>", "mac": "<mac of this record>"}

`mac` is HMAC-SHA256 under the *audit key* over the record's canonical JSON
with `mac` empty; `prev` is the previous record's `mac` (64 zeros first).
The audit key is derived from the root key (`audit_key`) and is never
written anywhere; the root key lives in the security directory, the log in
the audit directory (``$LLMOS_HOME/audit``, or ``$LLMOS_AUDIT_DIR``).

Anchors, so that cutting records off the end is caught:

* the head, ``security/audit.head`` — beside the key, not beside the log —
  holds the last seq and mac with its own MAC; a missing head is a failure;
* every `CHECKPOINT_RECORDS` records or `CHECKPOINT_S` seconds (and at a clean
  stop) a ``checkpoint`` record whose detail carries a standalone signature
  over (seq, chain head); the security server also writes it as a log line
  (``audit.checkpoint``), which a log shipper can take off the host.
  `verify_file` cross-checks every checkpoint it finds in the logs.

Someone who can write the audit directory but not read the root key can
delete, truncate, edit, reorder or append lines, and every such change is
named by `verify`; they can make the log unwritable or fill the disk (the
service then fails loudly) and read the records (no secrets are written).
Someone holding the root key can rewrite the chain and the head; against
them only checkpoints shipped off the host help.

Every string in a record is capped (`MAX_FIELD` characters, detail to
`MAX_DETAIL_ITEMS` entries), so an attacker-sized name cannot inflate the log.
"""

from __future__ import annotations

import glob
import hashlib
import hmac
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, TextIO

import msgspec

from common.home import logs_dir, root_key_path, security_dir

GENESIS = "0" * 64
MAX_FIELD = 256
MAX_DETAIL_ITEMS = 32
MAX_DETAIL_KEY = 64
CHECKPOINT_RECORDS = 1000
CHECKPOINT_S = 300.0
CHECKPOINT = "checkpoint"
_KEY_LABEL = b"llmos audit log v2\x00"

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
    mac: str = ""


_decoder = msgspec.json.Decoder(AuditRecord)


class HeadError(ValueError):
    """The head file exists but is not a head this key wrote."""


def audit_key(root_key: bytes) -> bytes:
    """The audit MAC key: a one-way function of the root key, never stored."""
    return hmac.new(root_key, _KEY_LABEL, hashlib.sha256).digest()


def audit_dir(home: Path) -> Path:
    env = os.environ.get("LLMOS_AUDIT_DIR")
    return Path(env).expanduser().resolve() if env else home / "audit"


def audit_path(home: Path) -> Path:
    return audit_dir(home) / "audit.jsonl"


def head_path(home: Path) -> Path:
    """The anchor, kept with the key material, away from the log."""
    return security_dir(home) / "audit.head"


def cap(text: str, limit: int = MAX_FIELD) -> str:
    """`text` cut to `limit` characters, saying how much was cut."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}…[+{len(text) - limit} chars]"


def cap_detail(detail: dict[str, Scalar]) -> dict[str, Scalar]:
    out: dict[str, Scalar] = {}
    for i, (k, v) in enumerate(detail.items()):
        if i == MAX_DETAIL_ITEMS:
            out["truncated_items"] = len(detail) - MAX_DETAIL_ITEMS
            break
        out[cap(str(k), MAX_DETAIL_KEY)] = cap(v) if isinstance(v, str) else v
    return out


def record_mac(key: bytes, rec: AuditRecord) -> str:
    body = msgspec.json.encode(msgspec.structs.replace(rec, mac=""))
    return hmac.new(key, body, hashlib.sha256).hexdigest()


def checkpoint_sig(key: bytes, seq: int, head: str) -> str:
    """The checkpoint's own signature: (its seq = records before it, chain head)."""
    return hmac.new(key, f"checkpoint\x00{seq}\x00{head}".encode(), hashlib.sha256).hexdigest()


def _head_mac(key: bytes, seq: int, mac: str) -> str:
    return hmac.new(key, f"head\x00{seq}\x00{mac}".encode(), hashlib.sha256).hexdigest()


def read_head(path: Path, key: bytes) -> tuple[int, str] | None:
    """(seq, mac) of the last record as the writer left it; None when absent."""
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    if not text:
        return None
    parts = text.split(" ")
    if len(parts) != 3 or not parts[0].isdigit() or len(parts[1]) != 64:
        raise HeadError(f"{path} is not an audit head (want '<seq> <mac> <head mac>')")
    seq, mac, sig = int(parts[0]), parts[1], parts[2]
    if not hmac.compare_digest(_head_mac(key, seq, mac), sig):
        raise HeadError(f"{path} was not written under this audit key (edited, or another root key)")
    return seq, mac


def _last_line(path: Path, chunk: int = 65536) -> bytes | None:
    """The last non-empty line, reading backwards (the log may be large)."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        buf = b""
        pos = f.tell()
        while pos > 0:
            step = min(chunk, pos)
            pos -= step
            f.seek(pos)
            buf = f.read(step) + buf
            lines = buf.rstrip(b"\n").split(b"\n")
            if len(lines) > 1 or pos == 0:
                return lines[-1] or None
    return None


class AuditLog:
    """The writer. `open` runs once at start (in a worker thread: it reads the
    tail); `append` is one line-buffered write plus an in-place head update.
    The head is the writer's truth: a log shorter than the head is continued
    from the head's seq, so the cut stays visible as a gap in the chain."""

    def __init__(self, path: Path, key: bytes, head: Path, *, checkpoint_records: int = CHECKPOINT_RECORDS):
        self.path = path
        self.key = key
        self.head = head
        self.checkpoint_records = checkpoint_records
        self.seq = -1
        self.prev = GENESIS
        self.warnings: list[str] = []
        self.since_checkpoint = 0
        self.last_checkpoint = time.monotonic()
        self._f: TextIO | None = None
        self._head_fd = -1
        self.on_checkpoint: Callable[[AuditRecord], None] | None = None

    @property
    def warning(self) -> str:
        return "; ".join(self.warnings)

    def open(self) -> None:
        for d in (self.path.parent, self.head.parent):
            d.mkdir(parents=True, exist_ok=True)
            os.chmod(d, 0o700)
        log_seq, log_prev = -1, GENESIS
        if self.path.exists():
            last = _last_line(self.path)
            if last is not None:
                try:
                    rec = _decoder.decode(last)
                    log_seq, log_prev = rec.seq, rec.mac
                except (msgspec.DecodeError, msgspec.ValidationError):
                    self.warnings.append("the last audit record is damaged")
                    log_prev = hashlib.sha256(last).hexdigest()
        try:
            head = read_head(self.head, self.key)
        except HeadError as exc:
            self.warnings.append(str(exc))
            head = None
        self.seq, self.prev = log_seq, log_prev
        if head is not None:
            hseq, hmac_ = head
            if hseq > log_seq:
                # Records after the log's end were cut (or the whole log went):
                # chain on from the head so verification shows the gap forever.
                self.warnings.append(f"the audit head records seq {hseq}, the log ends at seq {log_seq}: "
                                     f"records {log_seq + 1}..{hseq} are missing")
                self.seq, self.prev = hseq, hmac_
            elif hseq < log_seq - 1:
                self.warnings.append(f"the audit log has records past the head (head seq {hseq}, "
                                     f"log ends at seq {log_seq})")
        elif log_seq >= 0:
            self.warnings.append(f"the audit head {self.head} is missing; the log ends at seq {log_seq}")
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._f = os.fdopen(fd, "a", buffering=1)
        self._head_fd = os.open(self.head, os.O_RDWR | os.O_CREAT, 0o600)
        if self.seq >= 0:
            self._write_head()

    def _write_head(self) -> None:
        # Fixed length, written in place: a crash mid-write leaves a head whose
        # MAC fails, which `open` reports and repairs from the log.
        line = f"{self.seq:020d} {self.prev} {_head_mac(self.key, self.seq, self.prev)}\n"
        os.pwrite(self._head_fd, line.encode(), 0)

    def append(self, principal: str, action: str, target: str, result: str,
               detail: dict[str, Scalar] | None = None) -> AuditRecord:
        rec = AuditRecord(self.seq + 1, time.time(), cap(principal or "-"), cap(action), cap(target), cap(result),
                          cap_detail(detail or {}), self.prev)
        rec.mac = record_mac(self.key, rec)
        assert self._f is not None, "AuditLog.open() first"
        self._f.write(msgspec.json.encode(rec).decode() + "\n")
        self.seq, self.prev = rec.seq, rec.mac
        self._write_head()
        self.since_checkpoint += 1
        if self.since_checkpoint >= self.checkpoint_records:
            self.checkpoint()
        return rec

    def checkpoint_due(self, now: float, every_s: float = CHECKPOINT_S) -> bool:
        return self.since_checkpoint > 0 and now - self.last_checkpoint >= every_s

    def checkpoint(self) -> AuditRecord:
        """A signed checkpoint over the chain so far (its seq = the records before it)."""
        seq, head = self.seq + 1, self.prev
        self.since_checkpoint = -1  # the checkpoint itself does not count
        self.last_checkpoint = time.monotonic()
        rec = self.append("security", CHECKPOINT, f"seq {seq}", "ok",
                          {"records": seq, "head": head, "sig": checkpoint_sig(self.key, seq, head)})
        if self.on_checkpoint is not None:
            self.on_checkpoint(rec)
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
            records.append(_decoder.decode(raw))
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
