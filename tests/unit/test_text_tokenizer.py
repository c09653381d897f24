"""Tokenizers and the incremental detokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from drivers.model.errors import CheckpointError
from text.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, load_tokenizer
from tests.helpers.model_fixtures import TOKENIZER_VOCAB, write_tokenizer

TEXT = "héllo wörld — €uro 🙂 done"


@pytest.fixture(scope="module")
def hf(tmp_path_factory: pytest.TempPathFactory) -> HFTokenizer:
    d = tmp_path_factory.mktemp("tok")
    write_tokenizer(d)
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": {"content": "</s>"}, "bos_token": "<s>", "chat_template": "{{ messages }}"}))
    tok = load_tokenizer(d, eos_token_ids=[3])
    assert isinstance(tok, HFTokenizer)
    return tok


def test_byte_tokenizer_round_trip_and_specials() -> None:
    tok = ByteTokenizer()
    ids = tok.encode(TEXT)
    assert ids[0] == 256 and ids[1:] == list(TEXT.encode())
    assert tok.encode("a", add_special_tokens=False) == [97]
    assert tok.decode(ids + [257]) == TEXT
    assert tok.decode([256, 104, 257], skip_special_tokens=False) == "<s>h</s>"
    assert (tok.vocab_size, tok.eos_token_ids, tok.bos_token_id) == (258, (257,), 256)


def test_hf_tokenizer_round_trip_and_special_tokens(hf: HFTokenizer) -> None:
    ids = hf.encode(TEXT)
    assert len(ids) < len(TEXT.encode())            # merges were learned and used
    assert hf.decode(ids) == TEXT
    assert hf.vocab_size == TOKENIZER_VOCAB
    assert hf.eos_token_ids == (3, 279)             # config's, then tokenizer_config's
    assert hf.bos_token_id == 278 and hf.chat_template == "{{ messages }}"


def test_bad_tokenizer_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"tokenizer\.json: not a valid tokenizer\.json"):
        load_tokenizer(tmp_path)


def stream(tok: Tokenizer, ids: list[int], prompt: list[int] = []) -> list[str]:
    detok = tok.detokenizer(prompt)
    deltas = [detok.feed(i) for i in ids]
    return deltas + [detok.flush()]


@pytest.mark.parametrize("which", ["byte", "hf"])
def test_stream_reassembles_text_without_broken_characters(which: str, hf: HFTokenizer) -> None:
    tok: Tokenizer = ByteTokenizer() if which == "byte" else hf
    ids = tok.encode(TEXT, add_special_tokens=False)
    deltas = stream(tok, ids, prompt=tok.encode("prompt: "))
    assert "".join(deltas) == TEXT
    assert not any("\ufffd" in d for d in deltas)
    if which == "byte":
        # "é" is two bytes: nothing comes out after the first, all of it
        # after the second.
        assert deltas[1:3] == ["", "é"]
        # "🙂" is four bytes.
        start = len("héllo wörld — €uro ".encode())
        assert deltas[start:start + 4] == ["", "", "", "🙂"]


def test_stream_flush_releases_an_incomplete_character() -> None:
    tok = ByteTokenizer()
    deltas = stream(tok, [104, 0xE2, 0x82])        # "h" then 2 of the 3 bytes of "€"
    assert deltas == ["h", "", "", "\ufffd"]


def test_stream_accepts_several_ids_per_feed() -> None:
    tok = ByteTokenizer()
    detok = tok.detokenizer()
    data = list("aé€".encode())
    # A feed ending inside a character is held back whole.
    assert detok.feed(data[:2]) == ""              # "a" + first byte of "é"
    assert detok.feed(data[2:]) == "aé€"
    assert detok.flush() == ""


def test_skipped_special_tokens_do_not_stall_the_stream() -> None:
    tok = ByteTokenizer()
    assert stream(tok, [104, 257, 105]) == ["h", "", "i", ""]
