"""Prometheus metrics: the gateway's own histograms plus, on each scrape, the
kernel's, scheduler's and memory server's figures."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from ipc.protocol.kernel import ChildState
from services.gateway.backend import Stats

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("llmos_http_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=self.registry)
        self.ttft = Histogram("llmos_time_to_first_token_seconds", "Arrival to first token",
                              buckets=_LATENCY, registry=self.registry)
        self.tpot = Histogram("llmos_time_per_output_token_seconds", "Mean time between output tokens",
                              buckets=_LATENCY, registry=self.registry)
        self.tokens_in = Counter("llmos_prompt_tokens", "Prompt tokens of finished requests",
                                 registry=self.registry)
        self.tokens_out = Counter("llmos_generation_tokens", "Generated tokens of finished requests",
                                  registry=self.registry)

    def observe_usage(self, usage: object) -> None:
        prompt = getattr(usage, "prompt_tokens", 0)
        out = getattr(usage, "completion_tokens", 0)
        ttft = getattr(usage, "ttft_s", 0.0)
        total = getattr(usage, "total_s", 0.0)
        self.tokens_in.inc(prompt)
        self.tokens_out.inc(out)
        if out:
            self.ttft.observe(ttft)
        if out > 1:
            self.tpot.observe(max(0.0, total - ttft) / (out - 1))

    def render(self, stats: Stats | None) -> bytes:
        text = generate_latest(self.registry)
        if stats is None:
            return text
        reg = CollectorRegistry()
        reg.register(_Snapshot(stats))
        return text + generate_latest(reg)


class _Snapshot:
    def __init__(self, stats: Stats):
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        st = self.stats.status
        c = st.counters
        for name, value, doc in (("routed", c.routed, "requests routed"), ("replies", c.replies, "replies routed"),
                                 ("rejected", c.rejected, "malformed or unauthorised frames"),
                                 ("dropped", c.dropped, "answers with no one to take them"),
                                 ("resent", c.resent, "requests re-sent after an instance died"),
                                 ("cancelled", c.cancelled, "requests of clients that went away")):
            m = CounterMetricFamily(f"llmos_kernel_messages_{name}", f"Kernel: {doc}")
            m.add_metric([], value)
            yield m
        restarts = CounterMetricFamily("llmos_service_restarts", "Restarts per service instance",
                                       labels=["service", "instance"])
        up = GaugeMetricFamily("llmos_service_up", "1 when the instance is ready", labels=["service", "instance"])
        for i in st.instances:
            restarts.add_metric([i.service, i.instance], i.restarts)
            up.add_metric([i.service, i.instance], 1.0 if i.state == ChildState.READY else 0.0)
        yield restarts
        yield up
        drivers = GaugeMetricFamily("llmos_driver_info", "1 per ready driver: its model, device and dtype",
                                    labels=["instance", "model", "device", "dtype"])
        for i in st.instances:
            if i.service == "driver" and "dtype" in i.meta:
                drivers.add_metric([i.instance, str(i.meta.get("model", "")), str(i.meta.get("device", "")),
                                    str(i.meta["dtype"])], 1.0)
        yield drivers
        s = self.stats.scheduler
        if s is not None:
            gauges: tuple[tuple[str, float, str], ...] = (
                ("requests_running", s.running, "requests running"),
                ("requests_waiting", s.waiting, "requests waiting"),
                ("token_budget", s.token_budget, "tokens per step"),
                ("max_num_seqs", s.max_num_seqs, "sequences per step"),
                ("prefill_chunk", s.prefill_chunk, "prefill tokens per sequence per step"),
                ("goodput", s.goodput_rps, "requests per second that met their objectives, over the last minute"),
                ("ttft_objective_seconds", s.ttft_objective_ms / 1e3, "default time-to-first-token objective"),
                ("tpot_objective_seconds", s.tpot_objective_ms / 1e3, "default time-per-output-token objective"),
                ("step_seconds", s.step_ms / 1e3, "smoothed step time (tuner on)"))
            for name, level, doc in gauges:
                g = GaugeMetricFamily(f"llmos_scheduler_{name}", f"Scheduler: {doc}")
                g.add_metric([], level)
                yield g
            for name, value, doc in (("preemptions", s.preemptions, "preemptions"),
                                     ("tokens_generated", s.tokens_generated, "tokens generated"),
                                     ("steps", s.steps, "engine steps"),
                                     ("tuner_changes", s.tuner_changes, "limit changes the tuner made"),
                                     ("tuner_resets", s.tuner_resets, "step-time model resets (speed changes)"),
                                     ("tuner_held_steps", s.tuner_held_steps,
                                      "steps planned with budget left idle to keep a stream within its objective")):
                m = CounterMetricFamily(f"llmos_scheduler_{name}", f"Scheduler: {doc}")
                m.add_metric([], value)
                yield m
            slo = CounterMetricFamily("llmos_scheduler_slo_requests",
                                      "Requests by verdict on their objectives (rejected: refused early)",
                                      labels=["verdict"])
            for verdict, n in (("met", s.slo_met), ("missed", s.slo_missed), ("rejected", s.slo_rejected)):
                slo.add_metric([verdict], n)
            yield slo
            tuner = GaugeMetricFamily("llmos_scheduler_tuner_state", "1 for the tuner's state", labels=["state"])
            tuner.add_metric([s.tuner or "off"], 1.0)
            yield tuner
        mem = self.stats.memory
        if mem is not None:
            usage = GaugeMetricFamily("llmos_kv_blocks", "KV blocks by state", labels=["pool", "state"])
            hit = GaugeMetricFamily("llmos_prefix_cache_hit_rate", "Prompt tokens served from cache",
                                    labels=["pool"])
            util = GaugeMetricFamily("llmos_kv_utilisation", "Used / total KV blocks", labels=["pool"])
            for p in mem.pools:
                for state, n in (("used", p.used), ("free", p.free), ("cached", p.cached)):
                    usage.add_metric([p.pool, state], n)
                hit.add_metric([p.pool], p.hit_rate)
                util.add_metric([p.pool], p.utilisation)
            yield usage
            yield hit
            yield util
