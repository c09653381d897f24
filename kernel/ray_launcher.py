"""Children placed by Ray (`[launcher] kind = "ray"`), supervised by llmos.

Ray places and watches processes; llmos keeps its restart policy, names,
heartbeats and capabilities. Each incarnation of a child is one thin Ray
actor (`_Incarnation`) named `<instance>#<n>` (a dead named actor keeps its
name while a handle lives, so names are never reused), with Ray's own
restarts off (`max_restarts=0`) and threads enough for control calls while
its `run` call waits. The actor starts the ordinary `python -m MODULE ARGS`
on its node: the pid the supervisor, `llmos kill` and the chaos tester see
is that real process.

Death reaches the supervisor from three signals: the actor's `run` call
returns (the process exited: its status, within milliseconds); the
kernel's heartbeats catch a hang (kernel/liveness.py SIGKILLs through the
actor); and a lost node or actor makes `run` fail (Ray's node state): that
reads as a SIGKILL, and the supervisor's OTP window decides, a restart
landing wherever Ray finds the resources the spec asks for.

The child's environment (the boot secret among it) goes in the `start`
call's arguments, straight to the actor's worker: not in the actor's
creation options or a runtime_env, which Ray keeps in its GCS and shows in
its dashboard; the child's `/proc/PID/environ` is readable by its own user
only. The child dies with its actor (PR_SET_PDEATHSIG, kernel/ray_child.py): an incarnation whose
node or actor is gone never lingers to answer for its successor.

Ray is imported here only, and only when this launcher is chosen.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import subprocess
import sys
from typing import Any

import anyio

from common.config.launcher import LauncherConfig
from common.logs import get_logger
from ipc.errors import ConfigError
from kernel.config import ChildSpec
from kernel.launcher import ChildProcess, Launcher

log = get_logger()

RAY_MISSING = ("the ray launcher needs Ray: pip install -e '.[ray]' (or pip install ray), "
               "or use [launcher] kind = \"local\"")
ACTOR_THREADS = 4  # run (waits) + signals + node queries


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ConfigError(RAY_MISSING) from None
    return ray


class _Incarnation:
    """The Ray actor: one child process on this node, and control over it."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, module: str, args: list[str], env: dict[str, str]) -> tuple[int, str]:
        import ray

        full_env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        full_env.update(env)
        # kernel.ray_child: the child is SIGKILLed when the actor's worker
        # dies (its node lost, ray.kill); the actor's threads live as long as it.
        self.proc = subprocess.Popen([sys.executable, "-m", "kernel.ray_child", str(os.getpid()), module, *args],
                                     env=full_env, stdin=subprocess.DEVNULL, start_new_session=True)
        return self.proc.pid, ray.get_runtime_context().get_node_id()

    def run(self) -> int:
        assert self.proc is not None
        return self.proc.wait()

    def signal(self, sig: int) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            return False
        try:
            self.proc.send_signal(sig)
        except ProcessLookupError:
            return False
        return True


class RayChild:
    """A `ChildProcess` whose process runs under a Ray actor, maybe on another node."""

    def __init__(self, ray: Any, actor: Any, pid: int, node_id: str, name: str):
        self._ray = ray
        self.actor = actor
        self.pid = pid
        self.node_id = node_id
        self.name = name
        self.returncode: int | None = None
        self._run = actor.run.remote()

    async def wait(self) -> int:
        if self.returncode is not None:
            return self.returncode
        try:
            rc = int(await asyncio.wrap_future(self._run.future()))
        except self._ray.exceptions.RayError as exc:
            # The actor is gone (its node lost, its worker killed): the process with it.
            log.warning("ray_launcher.actor_lost", instance=self.name, node=self.node_id,
                        error=type(exc).__name__)
            rc = -signal.SIGKILL
        self.returncode = rc
        self._ray.kill(self.actor, no_restart=True)
        return rc

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            self.actor.signal.remote(int(sig))

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class RayLauncher(Launcher):
    local = False  # pids are the nodes' (a kernel cannot read another host's /proc)

    def __init__(self, config: LauncherConfig):
        self.config = config
        self.ray = import_ray()
        self._seq = itertools.count(1)
        self._cls: Any = None

    def connect(self) -> None:
        """`ray.init`: call it before the event loop starts (from a worker
        thread it kept the loop from running for seconds); `spawn` calls it
        in a thread if nobody did."""
        ray = self.ray
        if not ray.is_initialized():
            try:
                ray.init(address=self.config.address, namespace=self.config.namespace,
                         log_to_driver=False, logging_level="warning")
            except (ConnectionError, ValueError, RuntimeError) as exc:
                raise ConfigError(f"[launcher] address {self.config.address!r}: cannot join the Ray "
                                  f"cluster: {exc}") from None
        self._cls = ray.remote(_Incarnation)

    async def spawn(self, spec: ChildSpec, instance: str, env: dict[str, str]) -> ChildProcess:
        if self._cls is None:
            await anyio.to_thread.run_sync(self.connect)
        ray = self.ray
        name = f"{instance}#{next(self._seq)}"
        # SPREAD: a spec's instances go to different nodes where the resources
        # allow (data parallel drivers should not all share one host's fate).
        options: dict[str, Any] = dict(name=name, max_restarts=0, max_concurrency=ACTOR_THREADS,
                                       num_cpus=0, num_gpus=spec.num_gpus, resources=dict(spec.resources),
                                       scheduling_strategy="SPREAD")
        if spec.node_id:
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(spec.node_id, soft=False)
        actor = self._cls.options(**options).remote()
        # The environment travels in the call, not in the actor's options (module docstring).
        ref = actor.start.remote(spec.module, list(spec.args), {**spec.env, **env})
        try:
            with anyio.fail_after(self.config.placement_timeout_s):
                pid, node_id = await asyncio.wrap_future(ref.future())
        except TimeoutError:
            ray.kill(actor, no_restart=True)
            raise OSError(f"Ray placed no actor for {instance} within {self.config.placement_timeout_s:g}s "
                          f"(resources {dict(spec.resources)}, num_gpus {spec.num_gpus:g}"
                          f"{', node ' + spec.node_id if spec.node_id else ''})") from None
        except ray.exceptions.RayError as exc:
            ray.kill(actor, no_restart=True)
            raise OSError(f"Ray could not start {instance}: {type(exc).__name__}: {exc}") from None
        log.info("ray_launcher.spawned", instance=instance, actor=name, pid=pid, node=node_id)
        return RayChild(ray, actor, int(pid), str(node_id), instance)
