"""The served model's chat formatter and token texts, from what its driver sent.

The gateway may run where the driver's model directory is not (no shared
filesystem, docs/scale-out.md): both are built from the tokenizer files in
the driver's ModelDescription (text/shipped.py), never from its `path`, and
kept per model.
"""

from __future__ import annotations

import anyio

from ipc.protocol.driver import ModelDescription
from services.gateway.choices import Pieces
from text.chat import ChatFormatter
from text.shipped import formatter_from_files, tokenizer_from_files


class ModelText:
    def __init__(self) -> None:
        self._formatters: dict[tuple[str, str], ChatFormatter] = {}
        self._pieces: dict[tuple[str, str], Pieces] = {}

    def formatter(self, desc: ModelDescription) -> ChatFormatter:
        key = (desc.name, desc.path)
        fmt = self._formatters.get(key)
        if fmt is None:
            fmt = self._formatters[key] = formatter_from_files(desc.tokenizer_files, f"model {desc.name!r}")
        return fmt

    async def pieces(self, desc: ModelDescription) -> Pieces:
        """The model's token texts, for logprobs (its tokenizer built once, off the loop)."""
        key = (desc.name, desc.path)
        got = self._pieces.get(key)
        if got is None:
            tok = await anyio.to_thread.run_sync(
                lambda: tokenizer_from_files(desc.tokenizer_files, f"model {desc.name!r}",
                                             eos_token_ids=desc.eos_token_ids, bos_token_id=desc.bos_token_id))
            got = self._pieces[key] = Pieces(tok)
        return got
