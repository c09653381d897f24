"""tools/terminal.py: what the CLI prints from a model or another user never
reaches the terminal raw."""

from __future__ import annotations

import re

from tools.terminal import printable

UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def test_every_control_character_is_shown_escaped_and_newlines_and_tabs_kept() -> None:
    every = "".join(chr(c) for c in range(0x200)) + "\u202e\u2066 done"
    shown = printable(every)
    assert not UNSAFE.search(shown)
    assert "\\x07" in shown and "\\x1b" in shown and "\\x00" in shown and "\\r" in shown and "\\x9b" in shown
    assert "\\u202e" in shown and "\n" in shown and "\t" in shown
    assert printable("héllo, 世界 — ok\n") == "héllo, 世界 — ok\n"  # ordinary text untouched


def test_an_escape_sequence_cannot_drive_the_terminal() -> None:
    attack = "tenant\x1b]0;pwned\x07\x1b[2J\x1b[31m"
    assert printable(attack) == "tenant\\x1b]0;pwned\\x07\\x1b[2J\\x1b[31m"
    assert printable("a\nb", newlines=False) == "a\\nb"  # one table cell stays one line
