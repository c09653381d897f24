"""Where a model named on the command line lives, torch-free.

A model is named either "demo" (the built-in model, generated into
`$LLMOS_HOME/models/demo/` by the first driver that loads it) or a path to a
local Hugging Face directory. The scheduler and gateway use `open_config` and
`open_tokenizer` to learn a model's shape and tokenizer without torch; for
the demo they need no files at all.
"""

from __future__ import annotations

import os
from pathlib import Path

from drivers.model.config import ModelConfig, load_config
from drivers.model.errors import CheckpointError
from text.tokenizer import ByteTokenizer, Tokenizer, load_tokenizer

DEMO = "demo"

# ~56M parameters: large enough that decoding is matmul-bound like a real
# model, small enough for two CPU cores.
DEMO_CONFIG = ModelConfig(
    architecture="LlamaForCausalLM",
    hidden_size=512,
    intermediate_size=1408,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=64,
    vocab_size=32000,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    bos_token_id=256,
    eos_token_ids=(257,),
    torch_dtype="float32",
)


def llmos_home(home: str | Path | None = None) -> Path:
    """`home`, else $LLMOS_HOME, else ~/.llmos."""
    if home is not None:
        return Path(home)
    env = os.environ.get("LLMOS_HOME")
    return Path(env) if env else Path.home() / ".llmos"


def demo_dir(home: str | Path | None = None) -> Path:
    return llmos_home(home) / "models" / DEMO


def model_dir(model: str, home: str | Path | None = None) -> Path:
    """The directory a model name refers to (it may not exist yet for the demo)."""
    if model == DEMO:
        return demo_dir(home)
    path = Path(model).expanduser()
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such model directory (name 'demo' or a local "
                              f"Hugging Face directory)", detail={"file": str(path)})
    return path


def open_config(model: str, home: str | Path | None = None) -> ModelConfig:
    return DEMO_CONFIG if model == DEMO else load_config(model_dir(model, home))


def open_tokenizer(model: str, home: str | Path | None = None) -> Tokenizer:
    if model == DEMO:
        return ByteTokenizer()
    config = load_config(model_dir(model, home))
    return load_tokenizer(model_dir(model, home), eos_token_ids=config.eos_token_ids,
                          bos_token_id=config.bos_token_id)
