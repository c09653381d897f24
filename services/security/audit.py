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

import hashlib
import hmac
import os
import time
from pathlib import Path
from typing import Any, Callable, TextIO

import msgspec

from common.home import security_dir
from ipc.protocol import kernel as kp

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


RECORD_DECODER = msgspec.json.Decoder(AuditRecord)


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
                    rec = RECORD_DECODER.decode(last)
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


def retire_unkeyed_head(home: Path) -> None:
    """The unkeyed log's head ('<seq> <sha256>', beside security/audit.jsonl)
    sits where the keyed head goes: moved aside once, with that log."""
    head = head_path(home)
    try:
        fields = head.read_text().split()
    except FileNotFoundError:
        return
    if len(fields) == 2 and (security_dir(home) / "audit.jsonl").exists():
        os.replace(head, head.with_name("audit.head.unkeyed"))


def append_kernel_event(audit: AuditLog, ev: Any) -> None:
    """The kernel's audit events: refusals (aggregated, with a count) and
    kernel ops that acted or read privileged state."""
    if isinstance(ev, kp.AccessDenied):
        detail: dict[str, str | int | float | bool] = {"reason": ev.reason}
        if ev.token_id:
            detail["token_id"] = ev.token_id
        if ev.dropped:
            detail["dropped_before"] = ev.dropped
        if ev.count != 1:
            detail["count"] = ev.count
        if ev.source:
            detail["source"] = ev.source
        # no dst: a frame for the kernel itself (READY, a control frame)
        audit.append(ev.principal, "access", f"{ev.dst or kp.KERNEL}:{ev.op}", ev.code, detail)
    elif isinstance(ev, kp.KernelOpDone):
        audit.append(ev.principal, "kernel.op", f"kernel:{ev.op}", ev.outcome,
                           {"origin": ev.origin, "target": ev.target, "at": ev.at})
