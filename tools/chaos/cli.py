"""`llmos chaos`: argument handling (the command line lives in tools/cli.py)."""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

from typing import TYPE_CHECKING

from common.home import llmos_home

if TYPE_CHECKING:
    from tools.chaos.abuse import AbuseConfig


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of load and faults (default 60)")
    ap.add_argument("--out", type=Path, default=Path("chaos-report"), help="report directory")
    ap.add_argument("--seed", type=int, default=0, help="seeds the fault schedule and the clients")
    ap.add_argument("--model", default="demo", help="'demo' (default) or a local Hugging Face directory")
    ap.add_argument("--clients", type=int, default=12, help="concurrent streaming clients (a quarter over HTTP)")
    ap.add_argument("--faults-per-minute", type=float, default=30.0)
    ap.add_argument("--attach", action="store_true", help="use the llmos running under --home instead of booting one")
    ap.add_argument("--abuse", action="store_true",
                    help="abusive clients beside the honest ones (oversized prompts, disguised kernel ops, unread "
                         "replies, login floods, quota bypass, malformed frames): each must be refused")
    ap.add_argument("--kernel-rss-bound-mb", type=float, default=None,
                    help="with --abuse: the run fails if the kernel's RSS peaks above this (default 200)")


def run(args: argparse.Namespace) -> int:
    import anyio

    from tools.chaos.abuse import AbuseConfig
    from tools.chaos.report import summary
    from tools.chaos.run import ChaosConfig, run_chaos

    cfg = ChaosConfig(duration_s=args.duration, seed=args.seed, model=args.model, clients=args.clients,
                      http_clients=-1, faults_per_minute=args.faults_per_minute, attach=args.attach,
                      command="llmos " + shlex.join(sys.argv[1:]), abuse=_abuse_config(args, AbuseConfig))
    if args.attach:
        home = llmos_home(args.home)
    else:
        # A private LLMOS_HOME (short: ipc socket paths are limited) unless one is given.
        home = Path(args.home).resolve() if args.home else Path(tempfile.mkdtemp(prefix="llmos-chaos-", dir="/tmp"))
    result = anyio.run(run_chaos, home, cfg, args.out, backend="asyncio", backend_options={"use_uvloop": True})
    print(summary(result.report))
    print(f"  report: {args.out / 'report.json'}, {args.out / 'throughput.svg'}")
    holds = bool(result.report["holds"])
    if not args.attach and not args.home:
        if holds:
            shutil.rmtree(home, ignore_errors=True)
        else:
            print(f"  logs kept in {home}")
    return 0 if holds else 1


def _abuse_config(args: argparse.Namespace, cls: type[AbuseConfig]) -> AbuseConfig | None:
    if not args.abuse:
        if args.kernel_rss_bound_mb is not None:
            raise SystemExit("--kernel-rss-bound-mb needs --abuse")
        return None
    if args.kernel_rss_bound_mb is None:
        return cls()
    if args.kernel_rss_bound_mb <= 0:
        raise SystemExit("--kernel-rss-bound-mb must be positive")
    return cls(kernel_rss_bound_mb=args.kernel_rss_bound_mb)
