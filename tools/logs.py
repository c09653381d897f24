"""`llmos logs [--request ID] [--service NAME] [-n N]`: the JSON log lines of
every process under LLMOS_HOME/logs, merged in time order. `--request` follows
one request across processes: the SDK sends its request id as the trace id,
and services log it with every line about that request."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from common.home import logs_dir


def records(home: Path) -> Iterator[dict[str, Any]]:
    for path in sorted(logs_dir(home).glob("*.log")):
        with path.open(errors="replace") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a SIGKILL
                if isinstance(rec, dict):
                    yield rec


def select(home: Path, request: str | None, service: str | None) -> list[dict[str, Any]]:
    out = []
    for rec in records(home):
        if request and request not in (rec.get("request_id"), rec.get("trace_id")):
            continue
        if service and service not in (rec.get("service"), rec.get("instance")):
            continue
        out.append(rec)
    out.sort(key=lambda r: str(r.get("timestamp", "")))
    return out


def format_record(rec: dict[str, Any]) -> str:
    rest = {k: v for k, v in rec.items() if k not in ("timestamp", "service", "event", "level", "pid")}
    extra = " ".join(f"{k}={v}" for k, v in rest.items())
    return f"{rec.get('timestamp', '?')} {rec.get('service', '?'):>10} {rec.get('level', ''):7} " \
           f"{rec.get('event', '')} {extra}".rstrip()
