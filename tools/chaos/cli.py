"""`llmos chaos`: argument handling (the command line lives in tools/cli.py)."""

from __future__ import annotations

import argparse
import shlex
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from typing import TYPE_CHECKING

from common.config.driver import REPRODUCIBLE_DTYPE
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
    ap.add_argument("--dtype", default=REPRODUCIBLE_DTYPE,
                    help="the driver's dtype (default float32: unfaulted greedy requests must equal the reference "
                         "token for token, which bfloat16's shape-dependent rounding does not keep; 'auto' as "
                         "`llmos up`); not with --attach")
    ap.add_argument("--attach", action="store_true", help="use the llmos running under --home instead of booting one")
    ap.add_argument("--abuse", action="store_true",
                    help="abusive clients beside the honest ones (oversized prompts, disguised kernel ops, unread "
                         "replies, login floods, quota bypass, malformed frames): each must be refused")
    ap.add_argument("--kernel-rss-bound-mb", type=float, default=None,
                    help="with --abuse: the run fails if the kernel's RSS peaks above this (default 200)")
    ap.add_argument("--launcher", choices=("local", "ray"), default="local",
                    help="'ray': boot on a simulated Ray cluster on this host (a head and --nodes driver nodes, "
                         "one driver each) and add the node fault (needs Ray: pip install -e '.[ray]')")
    ap.add_argument("--nodes", type=int, default=2, help="with --launcher ray: driver nodes (default 2)")
    ap.add_argument("--node-faults-per-minute", type=float, default=None,
                    help="with --launcher ray: driver nodes removed (no graceful stop) and replaced (default 4)")


def run(args: argparse.Namespace) -> int:
    import anyio

    from tools.chaos.abuse import AbuseConfig
    from tools.chaos.report import summary
    from tools.chaos.run import ChaosConfig, run_chaos

    node_faults = _node_faults(args)
    cfg = ChaosConfig(duration_s=args.duration, seed=args.seed, model=args.model, clients=args.clients,
                      http_clients=-1, faults_per_minute=args.faults_per_minute, attach=args.attach,
                      command="llmos " + shlex.join(sys.argv[1:]), abuse=_abuse_config(args, AbuseConfig),
                      node_faults_per_minute=node_faults, dtype=args.dtype)
    if args.attach:
        home = llmos_home(args.home)
    else:
        # A private LLMOS_HOME (short: ipc socket paths are limited) unless one is given.
        home = Path(args.home).resolve() if args.home else Path(tempfile.mkdtemp(prefix="llmos-chaos-", dir="/tmp"))
    cluster = None
    if args.launcher == "ray":
        from kernel.ray_launcher import import_ray
        from tools.chaos.nodes import SimNodes
        from tools.raysim import start_cluster

        import_ray()  # says how to get Ray when it is missing
        # Its nodes have no exit hooks (tools/raysim.py): a SIGTERM ends the run through the `finally` below.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
        cluster = start_cluster(args.nodes)  # on the main thread, before the event loop
    try:
        nodes = SimNodes(cluster, args.nodes) if cluster is not None else None
        result = anyio.run(run_chaos, home, cfg, args.out, nodes, backend="asyncio",
                           backend_options={"use_uvloop": True})
    finally:
        if cluster is not None:
            cluster.shutdown()
    print(summary(result.report))
    print(f"  report: {args.out / 'report.json'}, {args.out / 'throughput.svg'}")
    holds = bool(result.report["holds"])
    if not args.attach and not args.home:
        if holds:
            shutil.rmtree(home, ignore_errors=True)
        else:
            print(f"  logs kept in {home}")
    return 0 if holds else 1


def _node_faults(args: argparse.Namespace) -> float:
    """Node faults per minute: only on the Ray launcher (4 by default there)."""
    from tools.chaos.nodes import NODE_FAULT_NEEDS_RAY

    if args.launcher != "ray":
        if args.node_faults_per_minute:
            raise SystemExit(NODE_FAULT_NEEDS_RAY)
        return 0.0
    if args.attach:
        raise SystemExit("--launcher ray boots llmos on a simulated Ray cluster: it cannot --attach")
    if not 1 <= args.nodes <= 16:
        raise SystemExit(f"--nodes must be in [1, 16], not {args.nodes}")
    per_minute = 4.0 if args.node_faults_per_minute is None else args.node_faults_per_minute
    if not 0 <= per_minute <= 60:
        raise SystemExit(f"--node-faults-per-minute must be in [0, 60], not {per_minute:g}")
    return per_minute


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
