"""One chaos run: boot llmos (or attach to a running one), take a fault-free
greedy reference, drive the clients while faults are injected, check the
history, write the report."""

from __future__ import annotations

import random
import socket
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import msgspec

from text.shipped import tokenizer_from_files
from ipc.protocol import security as sec
from ipc.protocol.driver import DRIVER, DescribeModel, ModelDescription
from common.config.driver import REPRODUCIBLE_DTYPE
from kernel.config import ChildSpec, default_children, echo_child
from sdk.client import AsyncClient
from tools.testing import running_llmos
from text.stream import TextStream
from ipc.errors import BadRequest, LlmosError
from tools.chaos import faults as fx
from tools.chaos import workload as wl
from tools.chaos.abuse import AbuseConfig, AbuseMix
from tools.chaos.abuse import prepare as prepare_abuse
from tools.chaos.checker import Reference, Verdict, check
from tools.chaos.history import History
from tools.chaos.nodes import NODE_FAULT_NEEDS_RAY, SimNodes, on_nodes
from tools.chaos.procs import Sampler, alive, leaked
from tools.chaos.report import write_report

FAULT_SERVICES = ("security", "memory", "driver", "scheduler", "gateway")


@dataclass
class ChaosConfig:
    duration_s: float = 60.0
    seed: int = 0
    model: str = "demo"
    clients: int = 12
    http_clients: int = 0  # -1: a quarter of `clients` (when there is a gateway)
    tenants: tuple[str, ...] = ("alice", "bob", "carol")
    faults_per_minute: float = 30.0
    services: tuple[str, ...] = FAULT_SERVICES
    kv_cache_mb: int = 64
    drain_s: float = 180.0  # after `duration_s`, how long requests in flight may take to end
    attach: bool = False
    boot_timeout_s: float = 600.0
    command: str = ""
    abuse: AbuseConfig | None = None  # abusive clients beside the honest ones (tools/chaos/abuse.py)
    node_faults_per_minute: float = 0.0  # driver nodes lost (the Ray launcher only: tools/chaos/nodes.py)
    # The driver's dtype: the checker holds every unfaulted greedy request to
    # the reference run token for token (common/config/driver.py).
    dtype: str = REPRODUCIBLE_DTYPE


@dataclass
class ChaosResult:
    history: History
    verdict: Verdict
    report: dict[str, Any]
    out: Path
    extra: dict[str, Any] = field(default_factory=dict)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def chaos_children(model: str, kv_cache_mb: int, http: str, dtype: str = REPRODUCIBLE_DTYPE) -> list[ChildSpec]:
    """`llmos up`'s children, with the priority policy so priorities matter,
    and the echo test service (the fuzzers probe and kill it)."""
    return [msgspec.structs.replace(c, args=[*c.args, "--policy", "priority"]) if c.name == "scheduler" else c
            for c in default_children(model, {"cpu": 1}, http, kv_cache_mb=kv_cache_mb,
                                      driver_args=["--dtype", dtype] if dtype else None)] + [echo_child()]


async def run_chaos(home: Path, cfg: ChaosConfig, out: Path, nodes: SimNodes | None = None) -> ChaosResult:
    """`nodes`: boot on that simulated Ray cluster (the Ray launcher) rather
    than as local subprocesses; node faults need it."""
    if nodes is None and cfg.node_faults_per_minute > 0:
        raise BadRequest(NODE_FAULT_NEEDS_RAY)
    if nodes is not None and cfg.attach:
        raise BadRequest("a chaos run attached to a running llmos cannot boot it on a simulated Ray cluster")
    out.mkdir(parents=True, exist_ok=True)
    async with AsyncExitStack() as stack:
        kernel_proc = None
        if cfg.attach:
            admin = await stack.enter_async_context(await AsyncClient.connect(home=home))
        else:
            http = f"127.0.0.1:{_free_port()}" if "gateway" in cfg.services else ""
            children = chaos_children(cfg.model, cfg.kv_cache_mb, http, cfg.dtype)
            if nodes is not None:
                nodes.home = home
                children = on_nodes(children, nodes.drivers)
            llmos = await stack.enter_async_context(running_llmos(
                home, children, auth=True, ready_timeout=cfg.boot_timeout_s,
                launcher=nodes.launcher() if nodes is not None else None))
            admin, kernel_proc = llmos.client, llmos.kernel
        status = await admin.status()
        kernel_pid = status.pid
        history = History()
        tracker = fx.Tracker(history, status)
        gateway = next((i for i in status.instances if i.service == "gateway"), None)
        base_url = str(gateway.meta.get("http", "")) if gateway is not None else ""
        n_http = 0 if not base_url else (cfg.http_clients if cfg.http_clients >= 0 else cfg.clients // 4)
        run_tag = "" if not cfg.attach else f"chaos{cfg.seed}-"
        keys = {t: (await admin.call(sec.SECURITY, sec.CreateKey(run_tag + t, ["generate"], note="chaos"))).api_key
                for t in cfg.tenants}
        clients = {t: await stack.enter_async_context(await AsyncClient.connect(home=home, api_key=k))
                   for t, k in keys.items()}
        mix: AbuseMix | None = None
        if cfg.abuse is not None:
            # Before the reference run: the quota tenant's policy has that long to reach the scheduler.
            mix = await prepare_abuse(stack, admin, home, cfg.abuse, kernel_pid=kernel_pid,
                                      honest_key=keys[cfg.tenants[0]], base_url=base_url, seed=cfg.seed, tag=run_tag)
        desc: ModelDescription = await admin.call(DRIVER, DescribeModel(), timeout=60)
        reference = await _reference(clients[cfg.tenants[0]])
        text_of = _text_checker(desc)

        targets = fx.targets_of(status, cfg.services)
        plan = fx.add_node_faults(fx.plan_faults(cfg.seed, cfg.duration_s, targets, cfg.faults_per_minute),
                                  cfg.seed, cfg.duration_s, targets, cfg.node_faults_per_minute)
        sampler = Sampler(lambda: {"kernel": kernel_pid, **tracker.ready})
        stop = anyio.Event()
        history.t0 = time.monotonic()
        async with anyio.create_task_group() as tg:
            await tg.start(tracker.follow, admin)
            tg.start_soon(sampler.run)
            if mix is not None:
                tg.start_soon(mix.sample_rss)
            with anyio.move_on_after(cfg.duration_s + cfg.drain_s):
                async with anyio.create_task_group() as work:
                    work.start_soon(fx.inject, plan, tracker, history, nodes)
                    if mix is not None:
                        work.start_soon(mix.run, stop, history.t0)
                    for i in range(cfg.clients):
                        tenant = cfg.tenants[i % len(cfg.tenants)]
                        rng = random.Random(f"{cfg.seed}/{i}")
                        if i < n_http:
                            work.start_soon(wl.http_client, f"h{i}", tenant, keys[tenant], base_url, rng, history,
                                            stop)
                        else:
                            work.start_soon(wl.sdk_client, f"c{i}", tenant, clients[tenant], rng, history, stop)
                    await anyio.sleep(cfg.duration_s)  # the run's length
                    stop.set()
            # Every target back before the end: the leak check sees a settled system.
            for inst in fx.targets_of(status, cfg.services):
                if not alive(kernel_pid):
                    break  # nothing comes back without a kernel (an abusive client stopped it?)
                await tracker.wait_ready(inst, fx.READY_WAIT_S)
            sampler.sample()
            abuse_report = mix.report(history) if mix is not None else None
            tg.cancel_scope.cancel()
        fx.settle(history.faults)
        try:
            final = await admin.status()
            kernel_restarted = final.pid != kernel_pid
            current = {i.pid for i in final.instances}
        except LlmosError:
            kernel_restarted, current = True, set()  # the kernel is gone
        seen = tracker.seen_pids | {f.pid for f in history.faults if f.pid}
        if cfg.attach:
            leaked_pids = leaked(seen, keep=current)
    if not cfg.attach:
        assert kernel_proc is not None
        kernel_restarted = kernel_restarted or kernel_proc.returncode != 0
        leaked_pids = leaked(seen | current)  # after shutdown nothing may be left
    verdict = check(history, reference, text_of, leaked_pids=leaked_pids, kernel_restarted=kernel_restarted)
    report = write_report(out, history, verdict, cfg, plan_size=len(plan), peak_rss_mb=sampler.peak_rss_mb,
                          model=desc.name, dtype=desc.dtype, abuse=abuse_report)
    return ChaosResult(history, verdict, report, out)


async def _reference(client: AsyncClient) -> Reference:
    """Greedy answers with no fault anywhere: SDK requests (ignore_eos, the
    longest length; shorter ones are its prefix) and HTTP ones (EOS honoured)."""
    sdk: dict[int, list[int]] = {}
    http: dict[int, str] = {}

    async def one(i: int) -> None:
        a = await client.generate(wl.PROMPTS[i], max_tokens=max(wl.MAX_TOKENS), temperature=0.0, ignore_eos=True)
        b = await client.generate(wl.PROMPTS[i], max_tokens=wl.HTTP_MAX_TOKENS, temperature=0.0)
        sdk[i], http[i] = a.token_ids, b.text

    async with anyio.create_task_group() as tg:
        for i in range(len(wl.PROMPTS)):
            tg.start_soon(one, i)
    return Reference(sdk, http)


def _text_checker(desc: ModelDescription) -> Any:
    """The text a request's tokens must read as: the scheduler's own text
    stream run over them in one go, independent of chunking and restarts."""
    tok = tokenizer_from_files(desc.tokenizer_files, f"model {desc.name!r}", eos_token_ids=desc.eos_token_ids,
                               bos_token_id=desc.bos_token_id)  # as the driver sent it: no shared disk
    prompts = [tok.encode(p) for p in wl.PROMPTS]

    def text_of(prompt: int, ids: list[int]) -> str:
        ts = TextStream(tok, prompts[prompt])
        return "".join(ts.feed(t) for t in ids) + ts.finish()

    return text_of
