"""Tiny random checkpoints for the model tests, written by transformers'
own `save_pretrained` so the loader reads exactly what users would have."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import torch

from drivers.model.runner import ModelRunner
from drivers.model.sampling import Sample, Sampler, SampleRow
from ipc.protocol.driver import StepSeq
from ipc.protocol.sampling import SamplingParams
from tests.helpers.stacks import EXACT_DTYPE

TOKENIZER_VOCAB = 280     # byte-level BPE: 256 bytes + 22 merges, then <s> </s>
MODEL_VOCAB = 300         # the model's embedding is padded past the tokenizer

TINY: dict[str, Any] = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, vocab_size=MODEL_VOCAB,
                            max_position_embeddings=256, bos_token_id=278, eos_token_id=279,
                            rms_norm_eps=1e-5)

_TRAINING_TEXT = ["hello world, the quick brown fox jumps over the lazy dog. " * 4,
                  "héllo wörld — ünïcode text, €uro and emoji 🙂 🙃 " * 4]


def write_tokenizer(directory: Path) -> Path:
    """A byte-level BPE tokenizer.json: 278 learned ids, then <s> (278) and
    </s> (279)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TOKENIZER_VOCAB - 2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_TRAINING_TEXT, trainer)
    tok.add_special_tokens(["<s>", "</s>"])
    path = directory / "tokenizer.json"
    tok.save(str(path))
    return path


def make_checkpoint(directory: Path, arch: str = "llama", *, sharp: bool = False,
                    seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """Save a tiny random `arch` ("llama" | "qwen2" | "mistral") checkpoint
    and tokenizer into `directory`; return the transformers model.

    sharp: re-initialise with variance-preserving weights and a strong
    output head, so logits are far from flat and greedy decoding has clear
    margins (the default 0.02 init gives near-uniform logits)."""
    from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                              Qwen2Config, Qwen2ForCausalLM)

    classes = {"llama": (LlamaConfig, LlamaForCausalLM),
               "qwen2": (Qwen2Config, Qwen2ForCausalLM),
               "mistral": (MistralConfig, MistralForCausalLM)}
    config_cls, model_cls = classes[arch]
    torch.manual_seed(seed)
    kwargs = {**TINY, **overrides}
    if arch == "mistral":
        kwargs.setdefault("sliding_window", None)
    model = model_cls(config_cls(**kwargs)).eval()
    if sharp:
        _sharpen(model, seed)
    else:
        # Random norm weights, so a loader that skipped them would fail.
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.uniform_(0.5, 1.5)
    model.save_pretrained(directory)
    write_tokenizer(directory)
    return model


def _sharpen(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                std = 1.0 if "embed" in name else p.shape[1] ** -0.5
                if "lm_head" in name:
                    std *= 4.0
                p.copy_(torch.randn(p.shape, generator=gen) * std)
            elif "bias" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


class RecordingSampler(Sampler):
    """The real sampler, keeping a copy of every logits row it is given."""

    def __init__(self, vocab_limit: int):
        super().__init__(vocab_limit)
        self.logits: list[torch.Tensor] = []

    def sample(self, logits: torch.Tensor, rows: Sequence[SampleRow]) -> list[Sample]:
        self.logits.extend(logits.clone())
        return super().sample(logits, rows)


def recording(runner: ModelRunner) -> RecordingSampler:
    rec = RecordingSampler(runner.sampler.vocab_limit)
    runner.sampler = rec
    return rec


def hf_logits(model: torch.nn.Module, ids: Sequence[int]) -> torch.Tensor:
    """transformers' logits [len(ids), vocab] for one sequence."""
    with torch.no_grad():
        return model(torch.tensor([list(ids)])).logits[0].float()


def prefill_then_decode(runner: ModelRunner, seq_id: int, ids: Sequence[int], prompt_len: int,
                        table: list[int], chunk: int = 0, **step: Any) -> None:
    """Feed ids[:prompt_len] as a prompt (in chunks of `chunk` tokens if
    given), then each later id as a one-token decode step."""
    chunk = chunk or prompt_len
    for lo in range(0, prompt_len, chunk):
        hi = min(prompt_len, lo + chunk)
        runner.execute([StepSeq(seq_id, list(ids[lo:hi]), lo, table, sample=hi == prompt_len, **step)])
    for pos in range(prompt_len, len(ids)):
        runner.execute([StepSeq(seq_id, [ids[pos]], pos, table, **step)])


async def local_greedy(ckpt: Path, prompt: list[int], n: int) -> list[int]:
    """`n` greedy tokens after `prompt`, from the model run here (no llmos),
    in a worker thread: the test's event loop keeps serving its clients."""
    return await anyio.to_thread.run_sync(_greedy, ckpt, prompt, n)


def _greedy(ckpt: Path, prompt: list[int], n: int) -> list[int]:
    runner = ModelRunner.load(str(ckpt), kv_cache_bytes=2 * 2**20, num_threads=1, dtype=EXACT_DTYPE)
    bs = runner.info.block_size
    table = list(range((len(prompt) + n) // bs + 1))
    greedy = SamplingParams(temperature=0.0)
    out: list[int | None] = [runner.execute([StepSeq(1, prompt, 0, table, params=greedy)])[0].token]
    for i in range(n - 1):
        out.append(runner.execute([StepSeq(1, [out[-1] or 0], len(prompt) + i, table, params=greedy)])[0].token)
    return [t for t in out if t is not None]
