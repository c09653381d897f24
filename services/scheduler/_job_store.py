"""The job store: one directory per job under ``$LLMOS_HOME/jobs``, with
``job.json`` (the spec and schedule, replaced atomically) and
``runs.jsonl`` (one `JobRun` per line, append-only; a torn last line is
cut). Blocking file I/O: the runner calls it from a worker thread."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import msgspec

from common.logs import get_logger
from ipc.protocol import scheduler as sp
from ipc.protocol import jobs as jp

log = get_logger()

# Runs kept per job: runs.jsonl is compacted to the latest KEEP_RUNS once it
# holds twice as many.
KEEP_RUNS = 256


class JobRecord(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A job as persisted in job.json."""

    job_id: str
    principal: str
    request: sp.Submit
    at_ns: int
    every_s: float = 0.0
    max_runs: int = 0
    name: str = ""
    created_ns: int
    next_run_ns: int  # when run `started + 1` is due
    started: int = 0  # runs begun (the last may not have ended)
    started_due_ns: int = 0  # when run `started` was due
    cancelled: bool = False
    error: str = ""  # why the job failed, if it did


def job_dir(principal: str, job_id: str) -> str:
    """The directory of `principal`'s job `job_id` under the store's root."""
    if not principal:
        return job_id
    return f"{hashlib.sha256(principal.encode()).hexdigest()[:16]}.{job_id}"


class JobStore:
    """The files, one directory per job (named by `job_dir` for new jobs; a
    job keeps the directory it was loaded from). Blocking: call it from a
    worker thread."""

    def __init__(self, root: Path):
        self.root = root
        self._enc = msgspec.json.Encoder()
        self._rec = msgspec.json.Decoder(JobRecord)
        self._run = msgspec.json.Decoder(jp.JobRun)

    def load_all(self) -> list[tuple[JobRecord, list[int], str]]:
        """Every readable job with the run numbers recorded for it and its directory."""
        out: list[tuple[JobRecord, list[int], str]] = []
        if not self.root.is_dir():
            return out
        for d in sorted(self.root.iterdir()):
            try:
                rec = self._rec.decode((d / "job.json").read_bytes())
            except (OSError, msgspec.DecodeError) as exc:
                log.warning("jobs.unreadable", path=str(d), error=str(exc))
                continue
            self._cut_torn_tail(d / "runs.jsonl")
            out.append((rec, [r.run for r in self.read_runs(d.name)], d.name))
        return out

    @staticmethod
    def _cut_torn_tail(path: Path) -> None:
        """Drop a last line without its newline (a crash mid-append), so the
        next append starts a line of its own."""
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return
        if data and not data.endswith(b"\n"):
            with open(path, "r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)

    def encode(self, rec: JobRecord) -> bytes:
        return self._enc.encode(rec)

    def write_record(self, name: str, data: bytes) -> None:
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        d = self.root / name
        d.mkdir(exist_ok=True, mode=0o700)
        tmp = d / "job.json.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, d / "job.json")

    def remove(self, name: str) -> None:
        shutil.rmtree(self.root / name, ignore_errors=True)

    def append_run(self, name: str, run: jp.JobRun) -> None:
        path = self.root / name / "runs.jsonl"
        with open(path, "ab") as f:
            f.write(self._enc.encode(run) + b"\n")
            f.flush()
            os.fsync(f.fileno())
        runs = self.read_runs(name)
        if len(runs) > 2 * KEEP_RUNS:
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(b"".join(self._enc.encode(r) + b"\n" for r in runs[-KEEP_RUNS:]))
            os.replace(tmp, path)

    def read_runs(self, name: str, last: int = 0) -> list[jp.JobRun]:
        try:
            lines = (self.root / name / "runs.jsonl").read_bytes().splitlines()
        except FileNotFoundError:
            return []
        runs = []
        for line in lines:
            try:
                runs.append(self._run.decode(line))
            except msgspec.DecodeError:
                continue  # torn by a crash mid-append: that run is run again
        return runs[-last:] if last else runs


__all__ = ["KEEP_RUNS", "JobRecord", "JobStore", "job_dir"]
