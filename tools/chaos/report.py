"""The report of a chaos run: `report.json` (figures and verdict), the history
as JSON lines, and `throughput.svg` (fault windows shaded)."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from tools.chaos import figures, svg
from tools.chaos.abuse import summary_lines as abuse_lines
from tools.chaos.checker import Verdict, fault_windows
from tools.chaos.history import History

if TYPE_CHECKING:
    from tools.chaos.run import ChaosConfig


def write_report(out: Path, history: History, verdict: Verdict, cfg: "ChaosConfig", *, plan_size: int,
                 peak_rss_mb: dict[str, float], model: str, dtype: str = "",
                 abuse: dict[str, Any] | None = None) -> dict[str, Any]:
    history.write(out)
    figs = figures.summarize(history)
    tp = figures.throughput(history)
    fired = [f for f in history.faults if f.t >= 0]
    greedy_faulted = verdict.greedy_faulted
    report: dict[str, Any] = {
        "command": cfg.command,
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": len(__import__("os").sched_getaffinity(0)), "python": platform.python_version()},
        "seed": cfg.seed,
        "duration_s": cfg.duration_s,
        "model": model,
        "dtype": dtype,  # the driver's, as it reported it
        "clients": cfg.clients,
        "holds": verdict.holds and (abuse is None or abuse["holds"]),
        "violations": verdict.violations() + (abuse["violations"] if abuse is not None else []),
        "faults": {"total": len(fired), "planned": plan_size, "skipped": figs["faults_skipped"],
                   "by_kind": figs["faults_by_kind"], "by_service": figs["faults_by_service"],
                   "schedule": [msgspec.to_builtins(f) for f in history.faults]},
        "requests": {"total": verdict.requests, "ok": verdict.ok, "failed": dict(verdict.failed),
                     "unknown": dict(verdict.unknown)},
        "lost": len(verdict.lost),
        "duplicated": len(verdict.duplicated),
        "lost_requests": verdict.lost,
        "duplicated_requests": verdict.duplicated,
        "offset_errors": verdict.offset_errors,
        "text_errors": verdict.text_errors,
        "greedy": {"unfaulted": verdict.greedy_unfaulted, "unfaulted_equal_reference": verdict.greedy_unfaulted_equal,
                   "faulted": greedy_faulted, "faulted_equal_reference": verdict.greedy_faulted_equal,
                   "faulted_equal_fraction": round(verdict.greedy_faulted_equal / greedy_faulted, 4)
                   if greedy_faulted else None},
        "recovery_ready_p99_s": figs["recovery_ready_p99_s"],
        "recovery_ready_s": figs["recovery_ready_s"],
        "next_token_p99_s": figs["next_token_p99_s"],
        "next_token_p50_s": figs["next_token_p50_s"],
        "next_token_s": figs["next_token_s"],
        "http": figs["http"],
        "kernel_restarted": verdict.kernel_restarted,
        "leaked_pids": verdict.leaked_pids,
        "peak_rss_mb": peak_rss_mb,
        "throughput": tp,
    }
    if abuse is not None:
        report["abuse"] = abuse
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    windows = [(a, b, f.service, f"{f.kind} {f.instance} at {a:.1f}s") for a, b, f in fault_windows(fired)]
    title = f"llmos chaos: seed {cfg.seed}, {cfg.duration_s:g}s, {len(fired)} faults"
    (out / "throughput.svg").write_text(svg.chart(title, tp["t_s"], {
        "SDK tokens/s": tp["sdk_tokens_per_s"], "HTTP SSE events/s": tp["http_events_per_s"]}, windows))
    return report


def summary(report: dict[str, Any]) -> str:
    f, r = report["faults"], report["requests"]
    lines = [f"llmos chaos — seed {report['seed']}, {report['duration_s']:g}s, {report['clients']} clients, "
             f"model {report['model']} ({report.get('dtype') or 'dtype unknown'})",
             f"  faults fired      {f['total']} (planned {f['planned']}, skipped {f['skipped']}): "
             + ", ".join(f"{k}={v}" for k, v in sorted(f["by_kind"].items())),
             "  by service        " + ", ".join(f"{s}={sum(k.values())}" for s, k in sorted(f["by_service"].items())),
             f"  requests          {r['total']}: ok {r['ok']}, failed {r['failed'] or 0}, unknown {r['unknown'] or 0}",
             f"  lost / duplicated {report['lost']} / {report['duplicated']}",
             "  HTTP clients      " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in report["http"].items()),
             f"  greedy = reference  unfaulted {report['greedy']['unfaulted_equal_reference']}/"
             f"{report['greedy']['unfaulted']}, faulted {report['greedy']['faulted_equal_reference']}/"
             f"{report['greedy']['faulted']}"]
    for kind, by in sorted(report["recovery_ready_s"].items()):
        for s, q in sorted(by.items()):
            lines.append(f"  {kind:>4} → READY    {s:<10} p50 {q['p50']}s  p95 {q['p95']}s  p99 {q['p99']}s  (n={q['n']})")
    for s, q in sorted(report["next_token_s"].items()):
        lines.append(f"  fault → next token {s:<10} p50 {q['p50']}s  p95 {q['p95']}s  p99 {q['p99']}s  (n={q['n']})")
    lines.append(f"  peak RSS (MiB)    " + ", ".join(f"{k}={v:.0f}" for k, v in sorted(report["peak_rss_mb"].items())))
    lines.append(f"  kernel restarted  {report['kernel_restarted']}; leaked pids {report['leaked_pids'] or 'none'}")
    if "abuse" in report:
        lines.extend(abuse_lines(report["abuse"]))
    lines.append("  contract " + ("HOLDS" if report["holds"] else "BROKEN: " + "; ".join(report["violations"])))
    return "\n".join(lines)
