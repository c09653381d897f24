"""Model runner throughput against transformers, a matmul-only bound and the
machine's memory bandwidth.

    python -m tools.bench.driver [--quick] [--json PATH] [--threads N] [--device cpu|cuda]

On the demo model (seeded random weights), for float32 and, where the device
multiplies it natively (AMX / AVX-512 BF16 CPUs, CUDA), the 16-bit dtype
`auto` picks: decode tokens/s of `ModelRunner.execute` at batch 1, 8, 32, 64
and 128 with 256 tokens of context per sequence (greedy, block tables drawn
from a shuffled pool), and prefill tokens/s (prompts fed in 512-token
steps); beside it transformers' `generate` (static batch, LlamaForCausalLM
with the same config and weights, same dtype) at batch 1, 8 and 32, and a
bound: the runner's own weight matrices multiplied as in a decode step at
batch 64, with no attention, norms or sampling. `bandwidth_frac_b1` is
batch-1 decode's bytes read per token (weights, one embedding row, the KV
of its context) times its tokens/s over the streaming read bandwidth
measured in the same run (a sum over 256 MiB).

Every figure is the best of `reps` timed repetitions, and the figures
compared with each other (runner vs transformers at one batch size, runner
vs bound at 64) are measured alternately, rep by rep, so that both bests
come from the same stretch of machine load; the JSON keeps every rep
(`reps_tps`) so the noise is visible.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from drivers.model.catalog import DEMO_CONFIG
from drivers.model.dtypes import REPORTED_FLAGS, cpu_flags, dtype_name, resolve_dtype
from drivers.model.kv_cache import block_nbytes
from drivers.model.runner import ModelRunner
from ipc.protocol.driver import StepSeq
from ipc.protocol.sampling import SamplingParams

CONTEXT = 256
PREFILL_BUDGET = 512
GREEDY = SamplingParams(temperature=0.0)


@dataclass(frozen=True)
class Plan:
    batches: tuple[int, ...]
    hf_batches: tuple[int, ...]
    decode_steps: int
    reps: int


FULL = Plan((1, 8, 32, 64, 128), (1, 8, 32), decode_steps=32, reps=5)
QUICK = Plan((1, 8, 32, 64, 128), (1, 8, 32), decode_steps=6, reps=2)


class RunnerBench:
    """Prefills the largest batch's prompts once; each decode measurement
    then replays steps at positions CONTEXT.. of the first `batch` sequences
    (the runner is stateless, so a replay simply rewrites those KV slots),
    keeping every measurement at the same context length."""

    def __init__(self, runner: ModelRunner, sequences: int, steps: int, seed: int = 0):
        self.runner = runner
        self.steps = steps
        rng = random.Random(seed)
        bs = runner.info.block_size
        per_seq = -(-(CONTEXT + steps) // bs)
        free = list(range(runner.info.num_blocks))
        rng.shuffle(free)                       # physical placement is arbitrary
        self.tables = [free[i * per_seq:(i + 1) * per_seq] for i in range(sequences)]
        prompts = [[rng.randrange(258) for _ in range(CONTEXT)] for _ in range(sequences)]
        self.prefill_tokens = 0
        self.prefill_s = 0.0
        self.first = self._prefill(prompts, self.tables)

    def decode_s(self, batch: int) -> float:
        """Seconds for `steps` decode steps of the first `batch` sequences."""
        r, tables = self.runner, self.tables
        last = self.first[:batch]
        began = time.perf_counter()
        for k in range(self.steps):
            out = r.execute([StepSeq(i, [last[i]], CONTEXT + k, tables[i], params=GREEDY)
                             for i in range(batch)])
            last = [res.token if res.token is not None else 0 for res in out]
        return time.perf_counter() - began

    def _prefill(self, prompts: list[list[int]], tables: list[list[int]]) -> list[int]:
        """Feed prompts in steps of up to PREFILL_BUDGET tokens (chunked like
        a scheduler); returns each sequence's first sampled token."""
        first: dict[int, int] = {}
        queue = [(i, 0) for i in range(len(prompts))]
        while queue:
            step, budget, rest = [], PREFILL_BUDGET, []
            for i, done in queue:
                take = min(budget, len(prompts[i]) - done)
                if take <= 0:
                    rest.append((i, done))
                    continue
                budget -= take
                final = done + take == len(prompts[i])
                step.append(StepSeq(i, prompts[i][done:done + take], done, tables[i],
                                    sample=final, params=GREEDY))
                if not final:
                    rest.append((i, done + take))
            began = time.perf_counter()
            for res in self.runner.execute(step):
                if res.token is not None:
                    first[res.seq_id] = res.token
            self.prefill_s += time.perf_counter() - began
            self.prefill_tokens += sum(len(s.token_ids) for s in step)
            queue = rest
        return [first[i] for i in range(len(prompts))]

    def bound_s(self, batch: int) -> float:
        """Seconds for the matmuls alone of `steps` decode steps, with the
        runner's own weights."""
        w = self.runner.model.weights
        c = self.runner.config
        dt, dev = w.lm_head.dtype, w.lm_head.device
        x = torch.randn(batch, c.hidden_size, dtype=dt, device=dev)
        attn = torch.randn(batch, c.q_size, dtype=dt, device=dev)
        qkv = torch.empty(batch, w.layers[0].qkv.shape[1], dtype=dt, device=dev)
        gate_up = torch.empty(batch, w.layers[0].gate_up.shape[1], dtype=dt, device=dev)
        act = torch.randn(batch, c.intermediate_size, dtype=dt, device=dev)

        _sync(x.device)
        began = time.perf_counter()
        with torch.inference_mode():
            for _ in range(self.steps):
                for layer in w.layers:
                    torch.mm(x, layer.qkv, out=qkv)
                    x.addmm_(attn, layer.o)
                    torch.mm(x, layer.gate_up, out=gate_up)
                    x.addmm_(act, layer.down)
                _ = x @ w.lm_head
        _sync(x.device)
        return time.perf_counter() - began

    def bytes_per_token_b1(self) -> int:
        """What one batch-1 decode step reads: every weight but the
        embedding (one row of it), and the KV of its context."""
        w, c = self.runner.model.weights, self.runner.config
        item = w.lm_head.element_size()
        weights = w.num_params() - w.embed.numel() + c.hidden_size
        context = CONTEXT + self.steps // 2
        return item * (weights + context * 2 * c.num_hidden_layers * c.kv_size)


class _Clock:
    """A generate() streamer that only notes when each token arrives: the
    first put() is the prompt, the second the first generated token (so the
    prefill is over)."""

    def __init__(self) -> None:
        self.puts: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.puts.append(time.perf_counter())

    def end(self) -> None:
        self.puts.append(time.perf_counter())


class HFBench:
    """transformers generate, greedy, static batch, on the same weights."""

    def __init__(self, model_dir: Path, steps: int, dtype: torch.dtype, device: torch.device):
        from transformers import LlamaForCausalLM

        model = LlamaForCausalLM.from_pretrained(model_dir, dtype=dtype)
        self.model = model.to(device).eval()  # type: ignore[arg-type]
        self.device = device
        self.steps = steps
        self.gen = torch.Generator().manual_seed(1)
        self.prompts: dict[int, torch.Tensor] = {}

    def decode_s(self, batch: int) -> float:
        """Seconds from the first generated token to the last of `steps`
        more (the prefill excluded)."""
        ids = self.prompts.setdefault(
            batch, torch.randint(0, 258, (batch, CONTEXT), generator=self.gen).to(self.device))
        clock = _Clock()
        with torch.inference_mode():
            self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                max_new_tokens=self.steps + 1, min_new_tokens=self.steps + 1,
                                do_sample=False, pad_token_id=0, streamer=clock)
        return clock.puts[-1] - clock.puts[1]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def read_bandwidth(device: torch.device, reps: int) -> float:
    """Streaming read bandwidth in bytes/s: the best of `reps` sums over a
    256 MiB buffer (far past any cache) with every thread."""
    x = torch.ones(64 * 2**20, dtype=torch.float32, device=device)
    x.sum()
    best = float("inf")
    for _ in range(max(reps, 3)):
        _sync(device)
        began = time.perf_counter()
        x.sum()
        _sync(device)
        best = min(best, time.perf_counter() - began)
    return x.numel() * x.element_size() / best


def measure(plan: Plan, args: argparse.Namespace, dtype: torch.dtype, bandwidth: float,
            reps_tps: dict[str, list[float]]) -> dict[str, float]:
    """Every figure for one dtype; keys without a dtype suffix."""
    bs, device = args.block_size, torch.device(args.device)
    blocks_needed = max(plan.batches) * -(-(CONTEXT + plan.decode_steps) // bs)
    per_block = block_nbytes(DEMO_CONFIG, bs, dtype)
    runner = ModelRunner.load("demo", kv_cache_bytes=(blocks_needed + 16) * per_block, home=args.home,
                              block_size=bs, device=args.device, dtype=dtype_name(dtype),
                              num_threads=args.threads)
    bench = RunnerBench(runner, max(plan.batches), plan.decode_steps)
    hf = HFBench(Path(runner.info.path), plan.decode_steps, dtype, device)
    figures: dict[str, float] = {"prefill_tps": bench.prefill_tokens / bench.prefill_s}
    tag = dtype_name(dtype)
    for b in plan.batches:
        # Each comparison is measured rep by rep, alternating, so the best
        # of each is taken over the same stretch of machine load.
        runs: dict[str, list[float]] = {"decode": [], "hf": [], "bound": []}
        for _ in range(plan.reps):
            runs["decode"].append(bench.decode_s(b))
            if b in plan.hf_batches:
                runs["hf"].append(hf.decode_s(b))
            if b == 64:
                runs["bound"].append(bench.bound_s(b))
        for k, v in runs.items():
            if v:
                figures[f"{k}_tps_b{b}"] = b * plan.decode_steps / min(v)
                reps_tps[f"{k}_tps_b{b}_{tag}"] = [round(b * plan.decode_steps / t, 1) for t in v]
        print(f"  {tag} b{b}: " + ", ".join(f"{k} {figures[f'{k}_tps_b{b}']:.0f} tok/s"
                                            for k, v in runs.items() if v), file=sys.stderr)
    figures["ratio_vs_hf_b32"] = figures["decode_tps_b32"] / figures["hf_tps_b32"]
    figures["fraction_of_bound_b64"] = figures["decode_tps_b64"] / figures["bound_tps_b64"]
    figures["bytes_per_token_b1"] = bench.bytes_per_token_b1()
    figures["bandwidth_frac_b1"] = figures["decode_tps_b1"] * figures["bytes_per_token_b1"] / bandwidth
    figures["num_params"] = runner.info.num_params
    runner.close()
    return figures


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.bench.driver", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="less work, same figures (~2 min)")
    ap.add_argument("--json", type=Path, help="write the figures here as one JSON object")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: one per CPU)")
    ap.add_argument("--home", default=None, help="LLMOS_HOME holding the demo model")
    ap.add_argument("--block-size", type=int, default=16, help="KV block size (default 16)")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    args = ap.parse_args(argv)
    plan = QUICK if args.quick else FULL
    device = torch.device(args.device)

    flags = sorted(f for f in REPORTED_FLAGS if f in cpu_flags())
    half = resolve_dtype("auto", device)
    if device.type == "cpu" and half == torch.float32:
        half_note = "bf16 is not fast on this CPU (no AMX / AVX-512 BF16): fp32 figures only"
    else:
        half_note = f"16-bit figures in {dtype_name(half)} (auto's choice here)"
    load_before = os.getloadavg()[0]
    bandwidth = read_bandwidth(device, plan.reps)
    reps_tps: dict[str, list[float]] = {}
    figures = measure(plan, args, torch.float32, bandwidth, reps_tps)
    result: dict[str, float] = {"read_bandwidth_gbs": bandwidth / 1e9, **figures}
    half_figs: dict[str, float] = {}
    if half != torch.float32:
        half_figs = measure(plan, args, half, bandwidth, reps_tps)
        sfx = "bf16" if half == torch.bfloat16 else "fp16"
        result.update({f"{k}_{sfx}": v for k, v in half_figs.items()})
        result[f"{sfx}_speedup_b64"] = half_figs["decode_tps_b64"] / figures["decode_tps_b64"]
    load_after = os.getloadavg()[0]

    print(f"\ndriver model bench ({'quick' if args.quick else 'full'}; demo model "
          f"{figures['num_params'] / 1e6:.1f}M params, {args.device}, context {CONTEXT}, "
          f"{plan.decode_steps} decode steps, best of {plan.reps}, block size {args.block_size}, "
          f"{torch.get_num_threads()} threads)")
    print(f"CPU flags: {' '.join(flags) or 'none of ' + ', '.join(REPORTED_FLAGS)}; {half_note}")
    for name, figs in (("float32", figures), (dtype_name(half), half_figs)):
        if not figs:
            continue
        print(f"\n{name}: {'batch':>6} {'runner tok/s':>13} {'transformers':>13} {'ratio':>6}")
        for b in plan.batches:
            theirs = figs.get(f"hf_tps_b{b}")
            ours = figs[f"decode_tps_b{b}"]
            hf_col = "" if theirs is None else f"{theirs:.0f}"
            ratio = "" if theirs is None else f"{ours / theirs:.2f}"
            print(f"{'':>{len(name) + 1}} {b:>6} {ours:>13.0f} {hf_col:>13} {ratio:>6}")
        print(f"  matmul-only bound b64: {figs['bound_tps_b64']:.0f} tok/s; runner reaches "
              f"{figs['fraction_of_bound_b64']:.0%} of it")
        print(f"  batch 1 reads {figs['bytes_per_token_b1'] / 2**20:.0f} MiB/token: "
              f"{figs['bandwidth_frac_b1']:.0%} of the {bandwidth / 1e9:.1f} GB/s streaming read bandwidth")
        print(f"  prefill: {figs['prefill_tps']:.0f} tok/s")
    for k in ("bf16_speedup_b64", "fp16_speedup_b64"):
        if k in result:
            print(f"{k}: {result[k]:.2f}")
    print(f"load average (1 min) before / after: {load_before:.2f} / {load_after:.2f} "
          f"(other processes share these cores; figures move with it)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "bench": "driver", "quick": args.quick, "device": args.device,
            "threads": torch.get_num_threads(), "cpu_flags": flags, "half_dtype": half_note,
            "context": CONTEXT, "decode_steps": plan.decode_steps, "reps": plan.reps,
            "block_size": args.block_size,
            "loadavg_before": round(load_before, 2), "loadavg_after": round(load_after, 2),
            "figures": {k: round(v, 3) for k, v in result.items()}, "reps_tps": reps_tps}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
