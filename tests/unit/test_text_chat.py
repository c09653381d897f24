"""Chat turns to prompt text: the checkpoint's Jinja template, or a plain
transcript without one; a template's own refusal is a BadRequest."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ipc.errors import BadRequest
from text.chat import ChatFormatter, Turn

TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def test_the_checkpoints_template_renders_the_turns(tmp_path: Path) -> None:
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": {"content": "<s>"}, "chat_template": TEMPLATE}))
    fmt = ChatFormatter.for_model(str(tmp_path))
    assert fmt.has_template
    assert fmt.render([Turn("system", "Be brief."), Turn("user", "Hi")]) == "<s><|system|>Be brief.<|user|>Hi<|assistant|>"


def test_without_a_template_the_turns_are_a_plain_transcript(tmp_path: Path) -> None:
    for fmt in (ChatFormatter.for_model(None), ChatFormatter.for_model(str(tmp_path))):
        assert not fmt.has_template
        assert fmt.render([Turn("user", "Hi"), Turn("assistant", "")]) == "user: Hi\nassistant: \nassistant:"


def test_a_template_that_refuses_or_does_not_compile_is_a_bad_request() -> None:
    strict = ChatFormatter("{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}", {})
    with pytest.raises(BadRequest, match="chat template: user first"):
        strict.render([Turn("assistant", "hello")])
    with pytest.raises(BadRequest, match="does not compile"):
        ChatFormatter("{% for %}", {})
