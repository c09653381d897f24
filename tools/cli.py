"""`llmos`: the command line.

    llmos up [--home DIR] [--config FILE]     boot in the foreground (a readable status; --log-format json)
          [--model DIR] [--drivers cpu=1] [--http :8000] [--policy fair] [--kv-cache-mb 256]
          [--dtype float32] [--ttft-ms MS] [--tpot-ms MS] [--no-autotune]   ...flags over the config file
          [--launcher ray [--ray-address auto]]   children placed on a Ray cluster (docs/scale-out.md)
    llmos config example | check FILE          every setting with its default, as TOML; check a file
    llmos down [--timeout S]                   stop a running llmos, return once it has stopped
    llmos ps [--json]                          services and their state
    llmos kill SERVICE [--signal SIGKILL]      kill a service (the supervisor restarts it)
    llmos generate "PROMPT" [--stream] [--json] generate text through the scheduler
    llmos jobs submit|list|show|cancel         timed and periodic generations (tools/jobs_cli.py)
    llmos sessions list|show|open|fork|suspend|resume|close   conversations the OS keeps (`generate --session`)
    llmos demo                                 boot, show it serving, survive a kill, stop
    llmos chaos [--duration S] [--out DIR]     faults under load, checked and reported (tools/chaos)
          [--abuse [--kernel-rss-bound-mb N]]   ...with abusive clients that must all be refused
    llmos keys create|list|revoke|quota        API keys and tenants (tools/security_cli.py)
    llmos audit verify|tail                    the keyed, hash-chained audit log

With auth on (the default), commands use $LLMOS_HOME/admin.key when this user can read it.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any, Callable

import msgspec

from ipc.errors import BadRequest, LlmosError
from ipc.protocol.kernel import ChildState
from common.home import llmos_home
from tools import jobs_cli, restart, security_cli
from tools.cli_flags import add_generation_args, api_key, connect, generation_options
from tools.terminal import print_table, printable

# Subcommands that work on this machine's LLMOS_HOME (they boot llmos or read
# its files): a remote --endpoint cannot apply to them.
LOCAL_ONLY = {"up": "boots llmos on this machine (its [kernel] front setting says where it listens)",
              "demo": "boots its own llmos on this machine", "chaos": "boots its own llmos on this machine",
              "logs": "reads LLMOS_HOME/logs on this machine", "audit": "reads LLMOS_HOME's audit log on this machine",
              "config": "reads files on this machine"}


def cmd_up(args: argparse.Namespace) -> int:
    from kernel.__main__ import boot
    from common.logs import configure

    from kernel.console import Console
    from kernel.homelock import HomeLocked

    home = llmos_home(args.home)
    # The terminal shows the console (or, with --log-format json, the JSON lines
    # of every process); the JSON logs always go to LLMOS_HOME/logs.
    json_terminal = args.log_format == "json" and not args.quiet
    configure("kernel", home, stderr=json_terminal)
    config = up_config(args)
    console = Console(sys.stderr if args.log_format == "console" and not args.quiet else None, errors=sys.stderr)
    try:
        return boot(config, home, Path(args.config) if args.config else None, console=console,
                    children_to_files=not json_terminal)
    except HomeLocked as exc:
        print(f"llmos: {exc.message}", file=sys.stderr)
        return 1


def up_config(args: argparse.Namespace) -> Any:
    """The config file (or the defaults) with `llmos up`'s flags over it,
    decoded and checked whole before anything starts."""
    from kernel.config import default_children, load_config

    config = load_config(args.config)
    swap_mb = args.swap_mb
    if swap_mb is None and args.preemption == "swap" and config.driver.swap_mb == 0 and not config.driver.host_slots:
        swap_mb = 512.0  # swapping needs a tier to swap to
    # The tuner is on unless the config file or --no-autotune turns it off; --tpot-ms (--autotune) sets
    # its per-token objective (and turns it on over a config file's `enabled = false`).
    tuner_on = args.no_autotune if args.no_autotune is not None else (True if args.autotune is not None else None)
    config = config.with_settings(
        "llmos up flags" + (f" over config file {args.config}" if args.config else ""),
        **{"driver.model": args.model, "driver.kv_cache_mb": args.kv_cache_mb, "driver.dtype": args.dtype,
           "driver.swap_mb": swap_mb, "scheduler.preemption": args.preemption,
           "scheduler.policy.name": args.policy, "scheduler.tpot_target_ms": args.autotune,
           "scheduler.tuner.objective.ttft_ms": args.ttft_ms, "scheduler.tuner.enabled": tuner_on,
           "gateway.instances": args.gateway_instances, "launcher.kind": args.launcher,
           "launcher.address": args.ray_address})
    try:
        driver_args = shlex.split(args.driver_args or "")
    except ValueError as exc:  # an unclosed quote
        raise BadRequest(f"--driver-args {args.driver_args!r}: {exc}") from None
    if driver_args:
        check_driver_args(parse_drivers(args.drivers or "cpu=1"), driver_args)
    if args.config is None or args.drivers or args.http or args.driver_args:
        # --drivers, --driver-args and --http describe the children (a file's [[children]] otherwise)
        config = msgspec.structs.replace(config, children=default_children(
            drivers=parse_drivers(args.drivers or "cpu=1"), http=args.http or "", gateway=config.gateway,
            driver_args=driver_args))
    return config


def check_driver_args(drivers: dict[str, int], flags: list[str]) -> None:
    """Every driver named takes `flags` (ConfigError naming the flag), before anything starts."""
    from drivers.registry import driver_class

    for name in drivers:
        driver_class(name).parser().parse_args(flags)


def parse_drivers(spec: str) -> dict[str, int]:
    """"cpu=1,cuda=2" → {"cpu": 1, "cuda": 2}."""
    out: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, n = part.partition("=")
        try:
            out[name] = int(n or "1")
        except ValueError:
            raise BadRequest(f"--drivers wants NAME=COUNT[,NAME=COUNT], got {spec!r}") from None
        if out[name] < 1:
            raise BadRequest(f"--drivers: {name} needs a count >= 1")
    return out


def cmd_config(args: argparse.Namespace) -> int:
    if args.action == "example":
        from tools.config_example import example_toml

        sys.stdout.write(example_toml())
        return 0
    from kernel.config import load_config

    load_config(args.file)  # raises naming the file, table and field
    print(f"llmos: {args.file}: ok")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    from tools.down import run_down

    if not 0 < args.timeout <= 86400:  # (nan fails this too)
        raise BadRequest(f"--timeout wants seconds in (0, 86400], got {args.timeout:g}")
    return run_down(connect(args), llmos_home(args.home), args.timeout)


def _fmt_uptime(s: float) -> str:
    if s <= 0:
        return "-"
    if s < 120:
        return f"{s:.0f}s"
    if s < 7200:
        return f"{s / 60:.0f}m"
    return f"{s / 3600:.1f}h"


def cmd_ps(args: argparse.Namespace) -> int:
    with connect(args) as c:
        st = c.status()
    if args.json:
        print(msgspec.json.encode({
            "kernel": {"pid": st.pid, "uptime_s": st.uptime_s},
            "instances": [msgspec.structs.asdict(i) for i in st.instances],
            "counters": msgspec.structs.asdict(st.counters),
        }).decode())
        return 0
    rows = [("SERVICE", "INSTANCE", "PID", "STATE", "RESTARTS", "UPTIME", "LAST EXIT")]
    rows.append(("kernel", "kernel", str(st.pid), ChildState.READY, "0", _fmt_uptime(st.uptime_s), ""))
    for i in st.instances:
        rows.append((i.service, i.instance, str(i.pid or "-"), i.state, str(i.restarts),
                     _fmt_uptime(i.uptime_s), i.last_exit))
    print_table(rows)
    return 0


def cmd_kill(args: argparse.Namespace) -> int:
    with connect(args) as c:
        killed = c.kill(args.service, args.signal)
    print(f"llmos: sent {args.signal} to {printable(', '.join(killed)) if killed else 'nothing (not running)'}")
    return 0


def _usage_json(usage: Any) -> dict[str, Any]:
    return msgspec.structs.asdict(usage) if usage is not None else {}


def cmd_generate(args: argparse.Namespace) -> int:
    opts = generation_options(args)
    with connect(args) as c:
        if args.stream:
            for chunk in c.stream_generate(args.prompt, **opts):
                if args.json:
                    print(msgspec.json.encode({
                        "request_id": chunk.request_id, "offset": chunk.offset, "token_ids": chunk.token_ids,
                        "text": chunk.text, "finish_reason": chunk.finish_reason,
                        "usage": _usage_json(chunk.usage) if chunk.usage else None}).decode(), flush=True)
                else:
                    sys.stdout.write(printable(chunk.text))
                    sys.stdout.flush()
                if chunk.finish_reason is not None and not args.json:
                    print()
                    if chunk.error:
                        print(f"llmos: {printable(chunk.error)}", file=sys.stderr)
                    return 0 if chunk.finish_reason != "error" else 1
            return 0
        comp = c.generate(args.prompt, **opts)
    if args.json:
        print(msgspec.json.encode({"request_id": comp.request_id, "text": comp.text, "token_ids": comp.token_ids,
                                   "finish_reason": comp.finish_reason, "usage": _usage_json(comp.usage),
                                   "error": comp.error}).decode())
    else:
        print(printable(comp.text))
        if comp.error:
            print(f"llmos: {printable(comp.error)}", file=sys.stderr)
    return 0 if comp.finish_reason != "error" else 1


def cmd_top(args: argparse.Namespace) -> int:
    from tools.top import run_top

    return run_top(args.home, args.once, args.endpoint, api_key(args))


def cmd_logs(args: argparse.Namespace) -> int:
    from tools.logs import format_record, select

    recs = select(llmos_home(args.home), args.request, args.service)[-args.n:] if args.n else \
        select(llmos_home(args.home), args.request, args.service)
    for rec in recs:
        print(msgspec.json.encode(rec).decode() if args.json else format_record(rec))
    return 0 if recs or not args.request else 1


def cmd_demo(args: argparse.Namespace) -> int:
    from tools.demo import run_demo

    return run_demo(args)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="llmos", description="An operating system for language models.")
    ap.add_argument("--home", help="LLMOS_HOME (default ~/.llmos)")
    ap.add_argument("--endpoint", help="the kernel to talk to, e.g. tcp://host:5555 (default: the one under "
                                       "LLMOS_HOME; tcp:// uses the CURVE keys in LLMOS_HOME/curve)")
    ap.add_argument("--api-key", help="log in with this API key (default: $LLMOS_API_KEY, else "
                                      "LLMOS_HOME/admin.key when readable)")
    sub = ap.add_subparsers(dest="cmd", required=True)

    up = sub.add_parser("up", help="boot llmos in the foreground")
    up.add_argument("--config", help="TOML config file")
    up.add_argument("--model", help="'demo' (default) or a local Hugging Face directory")
    up.add_argument("--drivers", help="drivers to start, e.g. cpu=1 or cuda=1 (default cpu=1)")
    up.add_argument("--driver-args", metavar="FLAGS",
                    help="more flags for every driver, e.g. --drivers null=1 --driver-args='--step-ms 5'")
    up.add_argument("--http", help="serve the OpenAI-compatible HTTP API on HOST:PORT, e.g. :8000")
    up.add_argument("--gateway-instances", type=int, metavar="N",
                    help="gateway processes sharing the HTTP port (default 2, [gateway] instances)")
    up.add_argument("--quiet", action="store_true",
                    help="print nothing but a failure (every process logs only to LLMOS_HOME/logs)")
    up.add_argument("--log-format", choices=["console", "json"], default="console",
                    help="the terminal shows a readable status (console, default) or every process's JSON log lines")
    up.add_argument("--preemption", choices=["recompute", "swap"],
                    help="a preempted request's KV: recompute it (default) or swap it to host memory")
    up.add_argument("--policy", help="the scheduler's policy: fcfs, priority, round_robin, mlfq or fair (default)")
    up.add_argument("--kv-cache-mb", type=float, help="each driver's KV cache in MiB (default 256)")
    up.add_argument("--dtype", help="the model's dtype: auto (default: bfloat16 where the device multiplies it "
                                    "natively, else float32 on CPU, float16 on CUDA), float32, bfloat16 or float16")
    up.add_argument("--ttft-ms", type=float, metavar="MS",
                    help="the default time-to-first-token objective (default 1000, [scheduler.tuner.objective])")
    up.add_argument("--tpot-ms", "--autotune", type=float, metavar="MS", dest="autotune",
                    help="the default time-per-output-token objective the tuner plans steps for (default 100)")
    up.add_argument("--no-autotune", action="store_const", const=False, default=None,
                    help="turn the tuner off: the configured token budget, batch cap and prefill chunk, always")
    up.add_argument("--swap-mb", type=float, default=None,
                    help="each driver's host swap tier in MiB (default 512 with --preemption swap, else none)")
    up.add_argument("--launcher", choices=["local", "ray"],
                    help="start children as local subprocesses (default) or place them on a Ray cluster "
                         "(pip install -e '.[ray]'; docs/scale-out.md)")
    up.add_argument("--ray-address", metavar="ADDR",
                    help="the Ray cluster for --launcher ray: auto (default), HOST:PORT or ray://HOST:10001")
    up.set_defaults(fn=cmd_up)

    cfg = sub.add_parser("config", help="the config file: a sample with every setting, or a check")
    cfg_sub = cfg.add_subparsers(dest="action", required=True)
    cfg_sub.add_parser("example", help="print a commented TOML file with every setting and its default")
    check = cfg_sub.add_parser("check", help="decode FILE as `llmos up --config FILE` would, and say what is wrong")
    check.add_argument("file")
    cfg.set_defaults(fn=cmd_config)

    down = sub.add_parser("down", help="stop a running llmos and wait until it has")
    down.add_argument("--timeout", type=float, default=60.0,
                      help="seconds to wait for every process to exit (default 60)")
    down.set_defaults(fn=cmd_down)

    ps = sub.add_parser("ps", help="list services")
    ps.add_argument("--json", action="store_true")
    ps.set_defaults(fn=cmd_ps)

    kill = sub.add_parser("kill", help="kill a service (it is restarted)")
    kill.add_argument("service")
    kill.add_argument("--signal", default="SIGKILL")
    kill.set_defaults(fn=cmd_kill)

    g = sub.add_parser("generate", help="generate text (needs the scheduler)")
    g.add_argument("prompt")
    add_generation_args(g)
    g.add_argument("--stream", action="store_true", help="print tokens as they come")
    g.add_argument("--json", action="store_true", help="one JSON object (per chunk with --stream)")
    g.set_defaults(fn=cmd_generate)

    top = sub.add_parser("top", help="live view of services, queue, KV cache and tokens/s")
    top.add_argument("--once", action="store_true", help="print one frame and exit")
    top.set_defaults(fn=cmd_top)

    logs = sub.add_parser("logs", help="log lines of every process, merged in time order")
    logs.add_argument("--request", help="only lines about this request id / trace id")
    logs.add_argument("--service", help="only this service or instance")
    logs.add_argument("-n", type=int, default=0, help="only the last N lines")
    logs.add_argument("--json", action="store_true")
    logs.set_defaults(fn=cmd_logs)

    demo = sub.add_parser("demo", help="boot llmos, show it serving and recovering, stop")
    demo.add_argument("--requests", type=int, default=24, help="requests in the workload")
    demo.add_argument("--max-tokens", type=int, default=40, help="tokens per request")
    demo.set_defaults(fn=cmd_demo)

    from tools.chaos import cli as chaos_cli

    chaos = sub.add_parser("chaos", help="inject faults (and, with --abuse, abusive clients) under load, "
                                          "check the recovery contract, report")
    chaos_cli.add_arguments(chaos)
    chaos.set_defaults(fn=chaos_cli.run)

    security_cli.add_commands(sub)
    jobs_cli.add_commands(sub)
    restart.add_commands(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    fn: Callable[[argparse.Namespace], int] = args.fn
    if args.endpoint is not None and args.cmd in LOCAL_ONLY:
        print(f"llmos: --endpoint does not apply to `llmos {args.cmd}`: it {LOCAL_ONLY[args.cmd]}", file=sys.stderr)
        return 2
    try:
        return fn(args)
    except LlmosError as exc:
        # The message may quote what a client or a model sent: shown, never obeyed.
        print(f"llmos: {printable(str(exc))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
