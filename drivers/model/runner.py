"""`ModelRunner`: the one object a driver holds. A model, its paged KV cache,
a sampler, and an optional host swap tier, behind plain-Python calls.

Threading: every method may be called from any thread (the driver calls from
a worker thread, off its event loop), one call at a time; a lock makes
overlapping calls wait rather than corrupt the cache.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from drivers.model import catalog
from drivers.model.attention import DecodeKernel
from drivers.checks import Limits, Trust, check_steps
from drivers.model.batch import build_batch
from drivers.model.config import ModelConfig, load_config
from drivers.model.demo import ensure_demo
from drivers.model.dtypes import dtype_name, resolve_dtype
from drivers.model.errors import InvalidStep
from drivers.model.host_tier import HostTier
from drivers.model.kv_cache import KVCache, block_nbytes
from drivers.model.llama import LlamaModel, Weights
from drivers.model.loader import load_checkpoint
from drivers.model.sampling import Sampler, SampleRow, splitmix64
from drivers.model.step import SeqResult
from text.tokenizer import Tokenizer
from ipc.errors import BadRequest, Internal
from ipc.protocol.driver import StepSeq

@dataclass(frozen=True, slots=True)
class ModelInfo:
    name: str                      # "demo" or the directory as given
    architecture: str
    path: str                      # the directory the weights came from
    vocab_size: int                # rows of the output layer
    sampleable_vocab: int          # ids the tokenizer decodes; only these are sampled
    max_model_len: int             # longest prompt + generation, in tokens
    num_blocks: int                # KV blocks this runner owns: ids [0, num_blocks)
    block_size: int                # tokens per block
    block_nbytes: int              # bytes per block (all layers, K and V)
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    dtype: str                     # what the weights and KV cache hold
    device: str
    threads: int                   # torch intra-op threads (process-wide)
    num_params: int
    host_slots: int                # slots in the host swap tier (0: none)


@dataclass(frozen=True, slots=True)
class RunnerHealth:
    ok: bool
    detail: str                    # "ok", or what is wrong
    steps: int                     # execute calls served
    tokens: int                    # tokens run through the model
    last_step_s: float             # duration of the last execute


class ModelRunner:
    """Use `ModelRunner.load(...)`; the constructor takes built parts."""

    def __init__(self, name: str, path: Path, config: ModelConfig, weights: Weights,
                 tokenizer: Tokenizer, cache: KVCache, *, max_model_len: int,
                 decode_kernel: DecodeKernel, host_tier: HostTier | None = None):
        self.config = config
        self.tokenizer = tokenizer
        self.cache = cache
        self.host_tier = host_tier
        self.model = LlamaModel(config, weights, cache, max_len=max_model_len,
                                decode_kernel=decode_kernel)
        sampleable = min(tokenizer.vocab_size, config.vocab_size)
        self.sampler = Sampler(sampleable)
        self.device = weights.embed.device
        self.limits = Limits(config.vocab_size, max_model_len, cache.num_blocks, cache.block_size)
        # Sequences without a seed draw from this runner's own random stream.
        self._salt = random.getrandbits(63)
        self._lock = threading.Lock()
        self._steps = self._tokens = 0
        self._last_step_s = 0.0
        # Why the last step says the runner is broken (None: it was fine): a
        # forward pass that raised, or logits non-finite for every sequence.
        self._fault: str | None = None
        dtype = dtype_name(weights.embed.dtype)
        self.info = ModelInfo(
            name=name, architecture=config.architecture, path=str(path),
            vocab_size=config.vocab_size, sampleable_vocab=sampleable,
            max_model_len=max_model_len, num_blocks=cache.num_blocks,
            block_size=cache.block_size, block_nbytes=cache.block_nbytes,
            eos_token_ids=tokenizer.eos_token_ids or config.eos_token_ids,
            bos_token_id=tokenizer.bos_token_id, dtype=dtype, device=str(self.device),
            threads=torch.get_num_threads(),
            num_params=weights.num_params(), host_slots=host_tier.num_slots if host_tier else 0)

    @classmethod
    def load(cls, model: str, *, kv_cache_bytes: int, device: str = "cpu",
             dtype: str | None = None, block_size: int = 16, num_threads: int | None = None,
             home: str | Path | None = None, max_model_len: int | None = None,
             decode_kernel: DecodeKernel | None = None, host_tier_slots: int = 0,
             host_tier_path: str | Path | None = None, host_tier_bytes: int = 0) -> "ModelRunner":
        """Load `model` ("demo" or a local Hugging Face directory).

        kv_cache_bytes: device memory for the block pool; num_blocks is that
            divided by `info.block_nbytes`.
        dtype: "auto" (default) | "float32" | "bfloat16" | "float16"
            (dtypes.py: what auto picks, what a device refuses).
        num_threads: torch intra-op threads (process-wide); default one per
            CPU this process may run on (os.sched_getaffinity).
        max_model_len: cap below the model's context window.
        decode_kernel: "bag" or "gather" (attention.py); default "bag" on
            CPU, else "gather".
        host_tier_slots / host_tier_path: a swap tier of that many block
            slots, in a disk-backed file at the path or else in host RAM;
            host_tier_bytes: its size in bytes instead (slots = bytes / block).
        """
        if block_size < 1:
            raise BadRequest(f"block_size must be >= 1, got {block_size}")
        if num_threads is not None and num_threads < 1:
            raise BadRequest(f"num_threads must be >= 1, got {num_threads}")
        torch.set_num_threads(num_threads or len(os.sched_getaffinity(0)))
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise BadRequest("device 'cuda' requested but CUDA is not available")
        tdtype = resolve_dtype(dtype or "auto", dev)
        path = ensure_demo(home) if model == catalog.DEMO else catalog.model_dir(model, home)
        config = load_config(path)
        per_block = block_nbytes(config, block_size, tdtype)
        num_blocks = kv_cache_bytes // per_block
        if num_blocks < 1:
            raise BadRequest(f"kv_cache_bytes {kv_cache_bytes} is less than one KV block "
                             f"({per_block} bytes at block_size {block_size})")
        config, weights, tokenizer = load_checkpoint(path, dtype=tdtype, device=dev)
        limit = config.max_model_len if max_model_len is None else min(max_model_len, config.max_model_len)
        if limit < 1:
            raise BadRequest(f"max_model_len must be >= 1, got {max_model_len}")
        # On a CPU, bag reads the pool once (in bf16 too: 10x the gather's speed).
        kernel: DecodeKernel = decode_kernel or ("bag" if dev.type == "cpu" else "gather")
        if kernel not in ("bag", "gather"):
            raise BadRequest(f"decode_kernel must be 'bag' or 'gather', got {kernel!r}")
        cache = KVCache(config, num_blocks, block_size, dtype=tdtype, device=dev)
        host_tier_slots = host_tier_slots or host_tier_bytes // per_block
        tier = HostTier(host_tier_slots, per_block, host_tier_path) if host_tier_slots > 0 else None
        return cls(model, path, config, weights, tokenizer, cache, max_model_len=limit,
                   decode_kernel=kernel, host_tier=tier)

    def execute(self, steps: Sequence[StepSeq], trust: Sequence[Trust | None] | None = None) -> list[SeqResult]:
        """Run one step for every sequence in `steps` in a single forward pass:
        write their new tokens' keys and values into their blocks and sample
        the next token of each with `sample=True`. Results come in the order
        of `steps`. An invalid step fails only its own sequence (see
        `SeqResult.error`); nothing is written for it. `trust`: what earlier
        checks vouch for in each step (drivers/seq_table.py), so only what
        is new is checked."""
        for s in steps:
            if not isinstance(s, StepSeq):
                raise InvalidStep(f"execute takes StepSeq values, got {type(s).__name__}")
        with self._lock, torch.inference_mode():
            began = time.perf_counter()
            errors = check_steps(steps, self.limits, trust)
            valid = [i for i, e in enumerate(errors) if e is None]
            results = [SeqResult(s.seq_id, error=e) for s, e in zip(steps, errors)]
            if valid:
                self._run([steps[i] for i in valid], valid, results)
            self._steps += 1
            self._last_step_s = time.perf_counter() - began
        return results

    def _run(self, steps: list[StepSeq], where: list[int], results: list[SeqResult]) -> None:
        batch, sampled = build_batch(steps, self.model.attention, self.device)
        try:
            logits = self.model.forward(batch)
        except RuntimeError as exc:
            self._fault = f"the last step's forward pass failed: {exc}"
            raise Internal(f"forward pass failed: {exc}") from exc
        self._tokens += batch.tokens.numel()
        self._fault = None
        if not sampled:
            return
        rows = [self._sample_row(steps[i]) for i in sampled]
        samples = self.sampler.sample(logits, rows)
        if all(sample.token is None for sample in samples):
            self._fault = (f"the last step's logits were non-finite for all {len(samples)} "
                           f"sequences sampled (weights or device arithmetic broken)")
        for i, sample in zip(sampled, samples):
            s = steps[i]
            results[where[i]] = SeqResult(s.seq_id, sample.token, sample.logprob,
                                          sample.top_logprobs, sample.error)

    def _sample_row(self, s: StepSeq) -> SampleRow:
        p = s.params
        seed = p.seed if p.seed is not None else splitmix64(self._salt ^ s.seq_id)
        history: Sequence[int] = ()
        if p.repetition_penalty != 1.0:
            history = [*s.prior_token_ids, *s.token_ids]
        return SampleRow(p, seed, s.start_pos + len(s.token_ids), history)

    def copy_blocks(self, pairs: Sequence[tuple[int, int]]) -> None:
        """Copy whole blocks (src, dst) for copy-on-write; all reads happen
        before any write."""
        with self._lock, torch.inference_mode():
            self.cache.copy_blocks(pairs)

    def swap_out(self, block_ids: Sequence[int]) -> np.ndarray:
        """A host copy of blocks: uint8 [len(block_ids), info.block_nbytes]."""
        with self._lock, torch.inference_mode():
            return self.cache.read_blocks(block_ids)

    def swap_in(self, block_ids: Sequence[int], data: np.ndarray | bytes | memoryview) -> None:
        """Write blocks back from what `swap_out` returned (any buffer of
        those bytes)."""
        with self._lock, torch.inference_mode():
            self.cache.write_blocks(block_ids, data)

    def swap_out_to_host(self, block_ids: Sequence[int], slots: Sequence[int]) -> None:
        """Copy blocks into host tier slots (block_ids[i] -> slots[i])."""
        tier = self._tier(len(block_ids), len(slots))
        tier.write(slots, self.swap_out(block_ids))

    def swap_in_from_host(self, slots: Sequence[int], block_ids: Sequence[int]) -> None:
        """Copy host tier slots back into blocks (slots[i] -> block_ids[i])."""
        tier = self._tier(len(block_ids), len(slots))
        self.swap_in(block_ids, tier.read(slots))

    def _tier(self, blocks: int, slots: int) -> HostTier:
        if self.host_tier is None:
            raise InvalidStep("this runner has no host swap tier (host_tier_slots=0)")
        if blocks != slots:
            raise InvalidStep(f"{blocks} block ids but {slots} slots")
        return self.host_tier

    def health(self) -> RunnerHealth:
        """Whether the runner still computes: the last step's outcome, and,
        when no step is running, a tiny probe on the device (a lost CUDA
        device fails it). Never waits for a running step: while one runs,
        the last step's outcome stands."""
        detail = self._fault
        if detail is None and self._lock.acquire(blocking=False):
            try:
                with torch.inference_mode():
                    probe = torch.ones(8, device=self.device).sum()
                    if probe.item() != 8.0:
                        detail = "device arithmetic is wrong (1 * 8 != 8)"
            except RuntimeError as exc:
                detail = f"device error: {exc}"
            finally:
                self._lock.release()
        return RunnerHealth(detail is None, detail or "ok", self._steps, self._tokens, self._last_step_s)

    def close(self) -> None:
        if self.host_tier is not None:
            self.host_tier.close()
