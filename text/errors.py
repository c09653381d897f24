"""Errors of text handling."""

from __future__ import annotations

from ipc.errors import BadRequest


class CheckpointError(BadRequest):
    """A model checkpoint cannot be loaded; the message names the file (and
    the tensor, where one is at fault). Raised for a model's tokenizer files
    here and for its weights and config by the drivers."""
