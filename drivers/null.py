"""`python -m drivers null`: a driver that runs no model. The smallest
complete driver, the stand-in for a device in benchmarks and scale tests.

It answers each `Execute` after a simulated step time (``--step-ms`` plus
``--per-token-us`` per token the step carries) with tokens that are a pure
function of each sequence's last token and its position: the same prompt
gives the same output on every run, on every restart of the driver and after
any recompute, whatever the sampling parameters (every request is greedy
here). The tokens are lowercase letters and spaces of the byte tokenizer
(text/tokenizer.py), never EOS, so a generation runs to its max_tokens.

What it keeps of the contract: the same per-sequence checks as the model
runner (drivers/checks.py: a bad step fails alone, with a reason), copies and
swaps checked against its blocks and host slots, DescribeModel (the scheduler
loads the tokenizer from `path`, a directory this driver writes under
LLMOS_HOME), DriverHealth, steps one at a time in arrival order. No torch:
it starts in well under a second (tests/unit/test_null_driver.py holds it).
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import anyio

from drivers.checks import Limits, check_steps
from drivers.seq_table import SeqTable
from drivers.service import DriverService
from ipc.errors import BadRequest, ConfigError
from ipc.protocol import driver as dp
from sdk.service import Context, handler
from text.tokenizer import BYTE_TOKENIZER_FILE

BOS, EOS, VOCAB = 256, 257, 258          # the byte tokenizer's ids
BYTE_SPEC = {"type": "byte", "bos_token_id": BOS, "eos_token_id": EOS}
ALPHABET = b"abcdefghijklmnopqrstuvwxyz     "
DEFAULT_MAX_MODEL_LEN = 131_072


def next_token(last: int, pos: int) -> int:
    """The token after `last`, which sits at position `pos`."""
    h = (last * 0x9E3779B1 + pos * 0x85EBCA77) & 0xFFFFFFFF
    h ^= h >> 15
    return ALPHABET[(h * 0x2C1B3C6D & 0xFFFFFFFF) % len(ALPHABET)]


def continuation(prompt_ids: list[int], n: int) -> list[int]:
    """The `n` tokens the null driver generates after `prompt_ids`."""
    out: list[int] = []
    last, pos = prompt_ids[-1], len(prompt_ids) - 1
    for _ in range(n):
        last, pos = next_token(last, pos), pos + 1
        out.append(last)
    return out


class NullDriver(DriverService):
    device = "null"

    @classmethod
    def parser(cls) -> argparse.ArgumentParser:
        ap = super().parser()
        ap.add_argument("--step-ms", type=float, default=0.0, help="simulated time of every step")
        ap.add_argument("--per-token-us", type=float, default=0.0, help="plus this per token in the step")
        ap.add_argument("--num-blocks", type=int, default=65_536, help="KV blocks it reports (none exist)")
        return ap

    def __init__(self, argv: list[str] | None = None, **kwargs: Any):
        super().__init__(argv, **kwargs)
        a = self.args
        for flag, value in (("--step-ms", a.step_ms), ("--per-token-us", a.per_token_us)):
            if not 0 <= value <= 60_000:           # (nan fails this too)
                raise ConfigError(f"{flag} must be in [0, 60000], got {value}")
        if a.num_blocks < 1:
            raise ConfigError(f"--num-blocks must be >= 1, got {a.num_blocks}")
        self.limits = Limits(VOCAB, self.config.max_model_len or DEFAULT_MAX_MODEL_LEN,
                             a.num_blocks, self.config.block_size)
        # A swap tier of --swap-mb holds a slot per simulated 16 KiB block.
        self.host_slots = self.config.host_slots or int(self.config.swap_mb * 2**20) // (16 * 1024)
        self.model_dir = self.home / "null-model"
        self._lock = anyio.Lock()
        self._busy = False
        self.steps = self.tokens = 0
        self.seqs = SeqTable()  # each running sequence as the scheduler last sent it
        self.last_step_s = 0.0

    async def on_start(self) -> None:
        self.model_dir.mkdir(parents=True, exist_ok=True)
        (self.model_dir / BYTE_TOKENIZER_FILE).write_text(json.dumps(BYTE_SPEC))

    def ready_meta(self) -> dict[str, str | int | float | bool]:
        lim = self.limits
        return {"model": "null", "device": "null", "dtype": "none", "threads": 0,
                "num_blocks": lim.num_blocks, "block_size": lim.block_size, "host_slots": self.host_slots,
                "max_model_len": lim.max_model_len, "vocab_size": VOCAB}

    @handler
    async def execute(self, msg: dp.Execute, ctx: Context) -> dp.Executed:
        self._check_blocks([b for pair in msg.copies for b in pair], "copy")
        async with self._lock:
            began, began_loop = time.perf_counter(), anyio.current_time()
            self._busy = True
            try:
                # The checks and outputs count within the simulated time.
                # Deltas made whole (seq_table.py); checked for what they add.
                steps, trust, resend = self.seqs.expand_trusted(msg)
                errors = check_steps(steps, self.limits, trust)
                outputs = [self._one(s, err) for s, err in zip(steps, errors)]
                self.seqs.record(steps, errors, [o.token for o in outputs])
                outputs += resend
                n_tokens = sum(len(s.token_ids) for s in steps)
                simulated = self.args.step_ms / 1e3 + n_tokens * self.args.per_token_us / 1e6
                await anyio.sleep_until(began_loop + simulated)
            finally:
                self._busy = False
            self.last_step_s = time.perf_counter() - began
            self.steps += 1
            self.tokens += n_tokens
        return dp.Executed(outputs, self.last_step_s)

    def _one(self, s: dp.StepSeq, error: str | None) -> dp.SeqOutput:
        if error is not None:
            return dp.SeqOutput(s.seq_id, error=error)
        if not s.sample:
            return dp.SeqOutput(s.seq_id)
        token = next_token(s.token_ids[-1], s.start_pos + len(s.token_ids) - 1)
        top = [(token, 0.0)] if s.params.logprobs else []
        return dp.SeqOutput(s.seq_id, token, 0.0, top)

    def _check_blocks(self, blocks: list[int], what: str) -> None:
        bad = next((b for b in blocks if not 0 <= b < self.limits.num_blocks), None)
        if bad is not None:
            raise BadRequest(f"{what} names block {bad}, not one of this driver's [0, {self.limits.num_blocks})")

    def _check_swap(self, block_ids: list[int], slots: list[int]) -> None:
        if not self.host_slots:
            raise BadRequest("this driver has no host swap tier (host_slots=0)")
        if len(block_ids) != len(slots):
            raise BadRequest(f"{len(block_ids)} block ids but {len(slots)} slots")
        self._check_blocks(block_ids, "swap")
        bad = next((s for s in slots if not 0 <= s < self.host_slots), None)
        if bad is not None:
            raise BadRequest(f"swap names host slot {bad}, not one of [0, {self.host_slots})")

    @handler
    async def swap_out(self, msg: dp.SwapBlocksOut, ctx: Context) -> dp.Swapped:
        self._check_swap(msg.block_ids, msg.slots)   # nothing to copy: no KV exists
        return dp.Swapped(len(msg.block_ids))

    @handler
    async def swap_in(self, msg: dp.SwapBlocksIn, ctx: Context) -> dp.Swapped:
        self._check_swap(msg.block_ids, msg.slots)
        return dp.Swapped(len(msg.block_ids))

    @handler(idempotent=True)
    async def describe(self, msg: dp.DescribeModel, ctx: Context) -> dp.ModelDescription:
        lim = self.limits
        return dp.ModelDescription("null", "null", str(self.model_dir), VOCAB, 256, lim.max_model_len,
                                   lim.num_blocks, lim.block_size, [EOS], BOS, "none", "null", 0,
                                   self.host_slots, tokenizer_files={BYTE_TOKENIZER_FILE: json.dumps(BYTE_SPEC)})

    @handler(idempotent=True)
    async def health(self, msg: dp.DriverHealth, ctx: Context) -> dp.DriverHealthReply:
        return dp.DriverHealthReply(True, self._busy, self.steps, self.tokens, self.last_step_s)


if __name__ == "__main__":
    NullDriver.main()
