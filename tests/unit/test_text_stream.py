"""Streamed text: no broken UTF-8, stop strings held back until they cannot match."""

from __future__ import annotations

from text.tokenizer import ByteTokenizer
from text.stream import TextStream

TOK = ByteTokenizer()


def feed_all(stream: TextStream, text: str) -> list[str]:
    return [stream.feed(b) for b in text.encode("utf-8")]


def test_multibyte_characters_are_released_whole() -> None:
    s = TextStream(TOK, [])
    deltas = feed_all(s, "héllo 🙂!")
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == "héllo 🙂!"
    assert deltas[1] == "" and deltas[2] == "é"  # the first byte of é waited for the second


def test_a_possible_stop_string_is_held_back_then_released_when_it_cannot_match() -> None:
    s = TextStream(TOK, [], stop=["END"])
    deltas = feed_all(s, "abEN")
    assert "".join(deltas) == "ab"  # "EN" may become "END"
    assert s.feed(ord("x")) == "ENx"
    assert not s.stopped


def test_a_stop_string_cuts_the_text_and_nothing_follows() -> None:
    s = TextStream(TOK, [], stop=["END", "xyz"])
    out = "".join(feed_all(s, "hello ENDxyz more"))
    assert out == "hello " and s.stopped and s.text == "hello "
    assert s.finish() == ""


def test_finish_releases_what_was_held() -> None:
    s = TextStream(TOK, [], stop=["END"])
    assert "".join(feed_all(s, "tail E")) == "tail "
    assert s.finish() == "E" and s.text == "tail E"
