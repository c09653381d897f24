"""`python -m kernel [--home DIR] [--config FILE]`: one uvloop process."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ipc.errors import LlmosError
from common.home import llmos_home
from kernel.config import Config, load_config
from kernel.console import Console
from kernel.homelock import HomeLocked, KernelLock
from common.logs import configure


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kernel")
    ap.add_argument("--home", help="LLMOS_HOME (default ~/.llmos)")
    ap.add_argument("--config", help="TOML config file")
    args = ap.parse_args(argv)
    home = llmos_home(args.home)
    configure("kernel", home)
    try:
        config = load_config(args.config)
    except LlmosError as exc:
        print(f"llmos: {exc.message}", file=sys.stderr)
        return 2
    try:
        return boot(config, home, Path(args.config) if args.config else None)
    except HomeLocked as exc:
        print(f"llmos: {exc.message}", file=sys.stderr)
        return 1
    except LlmosError as exc:  # the ray launcher chosen without Ray installed
        print(f"llmos: {exc.message}", file=sys.stderr)
        return 2


def boot(config: Config, home: Path, config_path: Path | None = None, *, console: Console | None = None,
         children_to_files: bool = False) -> int:
    """Take the home (or raise `HomeLocked` at once, before any socket is
    touched), run the kernel, free the home. `children_to_files`: the
    terminal is the console's, so children's output goes under logs/."""
    import anyio

    from kernel.launcher import Launcher, LocalLauncher
    from kernel.main import run_kernel

    with KernelLock.acquire(home):
        launcher: Launcher
        if config.launcher.kind == "ray":
            from kernel.ray_launcher import RayLauncher  # Ray only when chosen
            launcher = RayLauncher(config.launcher)
            launcher.connect()  # before the loop starts: ray.init held it for seconds from a thread
        else:
            launcher = LocalLauncher(output_home=home if children_to_files else None)
        rc = anyio.run(run_kernel, config, home, launcher, config_path, console, backend="asyncio",
                       backend_options={"use_uvloop": True})
    return int(rc)


if __name__ == "__main__":
    sys.exit(main())
