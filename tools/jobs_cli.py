"""`llmos jobs …` and `llmos sessions …`: the scheduler's jobs and sessions
from the command line (over `Client.jobs` and `Client.sessions`).

    llmos jobs submit "PROMPT" [--at TIME] [--every S] [--max-runs N] [--id ID] [generate's flags] [--json]
    llmos jobs list [--json]                       id, state, schedule, runs, next run, last result
    llmos jobs list --all [--principal P] [--json] every principal's jobs (admin; audited)
    llmos jobs show ID [--last N] [--json]         the job and its latest N results
    llmos jobs cancel ID [--principal P]           with --principal: P's job (admin; audited)
    llmos sessions list [--json]                   the caller's conversations: turns, tokens, KV
    llmos sessions show NAME [--json]              state, KV, and each turn's tokens and text
    llmos sessions open NAME [--system TEXT] [--max-context N] [--replace]
    llmos sessions fork NAME INTO [--turns N]      a new conversation from NAME's history
    llmos sessions suspend|resume NAME             switch its KV out to the swap tier / back
    llmos sessions close NAME [--keep-history]     free its KV and delete its history

Times are shown in local time; `--at` takes ISO 8601 (a time without an
offset is local) or unix seconds.
"""

from __future__ import annotations

import argparse
import math
from datetime import datetime
from typing import Any, Callable

import msgspec

from ipc.errors import BadRequest
from ipc.protocol import scheduler as sp
from ipc.protocol import jobs as jp
from ipc.protocol import sessions as sessp
from tools.cli_flags import add_generation_args, connect, generation_options
from tools.terminal import print_table, printable

SNIPPET = 40


def parse_at(text: str) -> float:
    """ISO 8601 or unix seconds → unix seconds."""
    try:
        at = float(text)
    except ValueError:
        try:
            at = datetime.fromisoformat(text).timestamp()
        except ValueError:
            at = math.nan
    if not (math.isfinite(at) and at >= 0):
        raise BadRequest(f"--at wants an ISO 8601 time (e.g. 2030-01-31T09:00:00+01:00) or unix seconds, "
                         f"got {text!r}")
    return at


def _plain(obj: Any) -> Any:
    """A wire struct as JSON-ready builtins, by field name (the wire encodes them as arrays)."""
    if isinstance(obj, msgspec.Struct):
        return {f: _plain(getattr(obj, f)) for f in obj.__struct_fields__}
    if isinstance(obj, list):
        return [_plain(x) for x in obj]
    return obj


def _print_json(obj: Any) -> None:
    print(msgspec.json.encode(_plain(obj)).decode())


def _when(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9).isoformat(" ", "seconds") if ns else "-"


def _schedule(job: jp.JobInfo) -> str:
    every = f"every {job.every_s:g}s" if job.every_s else "once"
    return f"{every}, {job.max_runs} runs" if job.every_s and job.max_runs else every


def _snippet(run: jp.JobRun) -> str:
    text = " ".join((run.text or (f"[{run.error}]" if run.error else "")).split())
    return text if len(text) <= SNIPPET else text[:SNIPPET - 1] + "…"


def cmd_jobs_submit(args: argparse.Namespace) -> int:
    at = parse_at(args.at) if args.at is not None else None
    with connect(args) as c:
        job = c.jobs.submit(args.prompt, at=at, every=args.every, max_runs=args.max_runs, name=args.name,
                            job_id=args.id, **generation_options(args))
    if args.json:
        _print_json(job)
    else:
        print(printable(f"{job.job_id}  {job.state}  {_schedule(job)}  next run {_when(job.next_run_ns)}"))
    return 0


def cmd_jobs_list(args: argparse.Namespace) -> int:
    if args.principal and not args.all:
        raise BadRequest("--principal lists another principal's jobs: it goes with --all")
    with connect(args) as c:
        if args.all:
            every = sorted(c.jobs.list_all(args.principal), key=lambda j: j.created_ns)
            if args.json:
                _print_json(every)
                return 0
            table = [("PRINCIPAL", "ID", "STATE", "SCHEDULE", "RUNS", "NEXT RUN", "ERROR")]
            table += [(j.principal or "-", j.job_id, j.state, _schedule(j), str(j.runs), _when(j.next_run_ns),
                       j.error[:SNIPPET]) for j in every]
            print_table(table)
            return 0
        jobs = sorted(c.jobs.list(), key=lambda j: j.created_ns)
        if args.json:
            _print_json(jobs)
            return 0
        # A listing carries no results: the latest one is one GetJob per job that ran.
        last = {j.job_id: c.jobs.get(j.job_id, last=1).results for j in jobs if j.runs}
    rows = [("ID", "STATE", "SCHEDULE", "RUNS", "NEXT RUN", "LAST RESULT")]
    for j in jobs:
        runs = last.get(j.job_id)
        rows.append((j.job_id, j.state, _schedule(j), str(j.runs), _when(j.next_run_ns),
                     _snippet(runs[-1]) if runs else ""))
    print_table(rows)
    return 0


def cmd_jobs_show(args: argparse.Namespace) -> int:
    if args.last < 0:
        raise BadRequest(f"--last must be >= 0 (0: every result kept), got {args.last}")
    with connect(args) as c:
        job = c.jobs.get(args.job_id, last=args.last)
    if args.json:
        _print_json(job)
        return 0
    print_table([("job", job.job_id), ("name", job.name or "-"), ("state", job.state),
                 ("schedule", _schedule(job)), ("created", _when(job.created_ns)), ("runs", str(job.runs)),
                 ("next run", _when(job.next_run_ns)), *([("error", job.error)] if job.error else [])])
    for r in job.results:
        print(f"\nrun {r.run}  {_when(r.finished_ns)}  {r.finish_reason}  {r.usage.completion_tokens} tokens")
        for line in r.text.splitlines():
            print(f"    {printable(line)}")  # a model's text: its control characters shown, not obeyed
        if r.error:
            print(f"    error: {printable(r.error)}")
    return 0


def cmd_jobs_cancel(args: argparse.Namespace) -> int:
    with connect(args) as c:
        job = c.jobs.cancel_any(args.principal, args.job_id) if args.principal else c.jobs.cancel(args.job_id)
    # The scheduler answers before a run in progress has ended: the job is cancelled when it has.
    state = "cancelling (its run in progress is being stopped)" if job.state == jp.JobState.RUNNING else job.state
    print(printable(f"{job.job_id}  {state} after {job.runs} run{'s' if job.runs != 1 else ''}"))
    return 0


def _session_rows(s: sessp.SessionInfo) -> list[tuple[str, str]]:
    where = {"device": "on the device", "swap": "in the host swap tier"}.get(s.kv_where, s.kv_where)
    kv = f"{s.kv_tokens} positions, {where}" if s.kv_where else "none held"
    evicted = f"{s.evicted_turns} turns, {s.evicted_tokens} tokens" if s.evicted_turns else "none"
    return [("session", printable(s.session)), ("state", s.state), ("queued", str(s.queued)),
            ("active request", printable(s.active_request) or "-"), ("kv", kv),
            ("turns", str(s.turns)), ("history", f"{s.history_tokens} tokens ({s.system_tokens} system)"),
            ("context limit", str(s.max_context) if s.max_context else "the model's"), ("evicted", evicted)]


def cmd_sessions(args: argparse.Namespace) -> int:
    cmd = args.sessions_cmd
    with connect(args) as c:
        if cmd == "list":
            listing = c.sessions.list()
            if args.json:
                _print_json(sessp.SessionList(listing))
                return 0
            print_table([("session", "state", "turns", "tokens", "kv")] +
                        [(printable(s.session), s.state, str(s.turns), str(s.history_tokens),
                          f"{s.kv_tokens} {s.kv_where}" if s.kv_where else "-") for s in listing])
            return 0
        if cmd == "show":
            shown = c.sessions.show(args.name)
            if args.json:
                _print_json(shown)
                return 0
            print_table(_session_rows(shown.info))
            if shown.system_text:
                print(f"\nsystem: {printable(shown.system_text)}")
            for t in shown.turns:
                print(f"\nturn {t.turn}  {printable(t.request_id)}  prompt {t.prompt_tokens} tokens, "
                      f"output {t.output_tokens} tokens")
                print(f"  > {printable(t.prompt_text)}")
                print(f"  < {printable(t.output_text)}")
            return 0
        if cmd == "open":
            s = c.sessions.open(args.name, system=args.system, max_context=args.max_context, replace=args.replace)
        elif cmd == "fork":
            s = c.sessions.fork(args.name, args.into, turns=args.turns)
        elif cmd == "close":
            s = c.sessions.close(args.name, keep_history=args.keep_history)
        else:
            s = getattr(c.sessions, cmd)(args.name)
    if args.json:
        _print_json(s)
        return 0
    print_table(_session_rows(s))
    return 0


def add_commands(sub: Any) -> None:
    """Register `jobs` and `sessions` on the `llmos` parser's subcommands."""
    jobs = sub.add_parser("jobs", help="timed and periodic generations (kept by the scheduler)")
    js = jobs.add_subparsers(dest="jobs_cmd", required=True)
    submit = js.add_parser("submit", help="run a generation at a time, and/or periodically")
    submit.add_argument("prompt")
    submit.add_argument("--at", help="first run: ISO 8601 or unix seconds (default now)")
    submit.add_argument("--every", type=float, default=0.0, help="then every S seconds (default: run once)")
    submit.add_argument("--max-runs", type=int, default=0, help="with --every: stop after N runs (0: until cancelled)")
    submit.add_argument("--name", default="")
    submit.add_argument("--id", help="the job id (default a random one); re-submitting it is harmless")
    add_generation_args(submit)
    submit.add_argument("--json", action="store_true")
    submit.set_defaults(fn=cmd_jobs_submit)
    ls = js.add_parser("list", help="your jobs")
    ls.add_argument("--all", action="store_true", help="every principal's jobs (needs the admin right)")
    ls.add_argument("--principal", default="", help="with --all: only this principal's")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(fn=cmd_jobs_list)
    show = js.add_parser("show", help="a job and its latest results")
    show.add_argument("job_id")
    show.add_argument("--last", type=int, default=10, help="results to show (0: every one kept)")
    show.add_argument("--json", action="store_true")
    show.set_defaults(fn=cmd_jobs_show)
    cancel = js.add_parser("cancel", help="no further runs (a run in progress is cancelled)")
    cancel.add_argument("job_id")
    cancel.add_argument("--principal", default="", help="another principal's job (needs the admin right)")
    cancel.set_defaults(fn=cmd_jobs_cancel)

    sessions = sub.add_parser("sessions", help="conversations (`generate --session NAME`) and their KV")
    ss = sessions.add_subparsers(dest="sessions_cmd", required=True)
    p = ss.add_parser("list", help="your conversations: turns, tokens, KV")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_sessions)
    for name, what in (("show", "state, KV, and each turn's tokens and text"),
                       ("open", "start a conversation with a system prompt or a context limit"),
                       ("fork", "a new conversation from this one's history"),
                       ("suspend", "switch it out: KV to the swap tier, its requests wait"),
                       ("resume", "switch it back in"),
                       ("close", "the conversation is over: free its KV and delete its history")):
        p = ss.add_parser(name, help=what)
        p.add_argument("name")
        p.add_argument("--json", action="store_true")
        p.set_defaults(fn=cmd_sessions)
        if name == "open":
            p.add_argument("--system", default="", help="a system prompt, kept through eviction")
            p.add_argument("--max-context", type=int, default=0, help="a token limit below the model's context")
            p.add_argument("--replace", action="store_true", help="start an existing session over")
        elif name == "fork":
            p.add_argument("into", help="the new session's name")
            p.add_argument("--turns", type=int, default=-1, help="copy only the first N turns")
        elif name == "close":
            p.add_argument("--keep-history", action="store_true", help="free the KV only")
