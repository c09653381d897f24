"""Chat turns → prompt text, with the checkpoint's own chat template.

Hugging Face checkpoints carry a Jinja template in tokenizer_config.json
(`chat_template`); it is rendered the way transformers does (sandboxed
Jinja, `messages`, `add_generation_prompt`, the special tokens). A model
without one (the demo model) gets a plain "role: content" transcript.
Turns are plain (role, text) pairs: whoever speaks an API (the gateway's
OpenAI messages) turns its own message shapes into them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

from ipc.errors import BadRequest


class Turn(NamedTuple):
    role: str
    content: str


class ChatFormatter:
    def __init__(self, template: str | None, special: dict[str, str]):
        self._template = None
        self._special = special
        if template:
            from jinja2.exceptions import TemplateError
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = _raise
            try:
                self._template = env.from_string(template)
            except TemplateError as exc:
                raise BadRequest(f"the model's chat template does not compile: {exc}") from None

    @classmethod
    def for_model(cls, model_dir: str | None) -> "ChatFormatter":
        if not model_dir:
            return cls(None, {})
        path = Path(model_dir) / "tokenizer_config.json"
        try:
            text = path.read_text()
        except (FileNotFoundError, NotADirectoryError):
            return cls(None, {})
        except OSError as exc:
            raise BadRequest(f"{path} is unreadable: {exc}") from None
        return cls.from_config(text, str(path))

    @classmethod
    def from_config(cls, text: str | None, origin: str) -> "ChatFormatter":
        """From a tokenizer_config.json's contents (None: no template)."""
        if text is None:
            return cls(None, {})
        try:
            cfg = json.loads(text)
        except json.JSONDecodeError as exc:
            raise BadRequest(f"{origin} is unreadable: {exc}") from None
        if not isinstance(cfg, dict):
            raise BadRequest(f"{origin}: expected a JSON object, got {type(cfg).__name__}")
        special = {k: _token_text(cfg.get(k)) for k in ("bos_token", "eos_token")}
        return cls(cfg.get("chat_template") if isinstance(cfg.get("chat_template"), str) else None, special)

    @property
    def has_template(self) -> bool:
        return self._template is not None

    def render(self, turns: list[Turn]) -> str:
        plain = [{"role": t.role, "content": t.content} for t in turns]
        if self._template is None:
            return "".join(f"{m['role']}: {m['content']}\n" for m in plain) + "assistant:"
        try:
            return self._template.render(messages=plain, add_generation_prompt=True, **self._special)
        except BadRequest:
            raise
        except Exception as exc:  # jinja raises many kinds; all mean "this conversation does not fit"
            raise BadRequest(f"the model's chat template rejected the messages: {exc}") from None


def _raise(message: str) -> None:
    raise BadRequest(f"chat template: {message}")


def _token_text(tok: Any) -> str:
    if isinstance(tok, dict):
        return str(tok.get("content", ""))
    return str(tok or "")

