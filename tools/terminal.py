"""Text a terminal can show: what the CLI prints from elsewhere (generated
text, names, notes, error messages) never reaches the terminal raw.

A model's text can hold any byte (the demo model's random weights produce
BEL, ESC, NUL...), and names and notes come from other users: written raw,
they beep, garble the screen or drive it (an ESC sequence can move the
cursor, retitle the window, hide text). `printable` makes every such
character visible instead, keeping newlines and tabs.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

# C0 controls but tab and newline, DEL, C1 controls, and the bidirectional
# overrides and isolates that reorder what is shown ("Trojan Source").
_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_NAMED = {"\r": "\\r"}


def _visible(m: re.Match[str]) -> str:
    c = m.group()
    code = ord(c)
    return _NAMED.get(c) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")


def printable(text: str, *, newlines: bool = True) -> str:
    """`text` with every control character shown as an escape (`\\x07`,
    `\\x1b`, `\\r`, `\\u202e`); tabs kept, and newlines unless `newlines` is
    False (a table cell, one line of a listing)."""
    out = _UNSAFE.sub(_visible, text)
    return out if newlines else out.replace("\n", "\\n")


def print_table(rows: Sequence[tuple[str, ...]]) -> None:
    rows = table_cells(rows)
    widths = [max(len(r[k]) for r in rows) for k in range(len(rows[0]))]
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())


def table_cells(rows: Sequence[tuple[str, ...]]) -> list[tuple[str, ...]]:
    """Cells from elsewhere (names, notes, exit reasons) as one visible line each."""
    return [tuple(printable(c, newlines=False) for c in r) for r in rows]


__all__ = ["print_table", "printable", "table_cells"]
