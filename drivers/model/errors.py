"""Errors raised by the model code.

    BadRequest (ipc.errors)
    ├── CheckpointError     a model directory is missing a file, names an
    │                       unsupported architecture, or holds a tensor of the
    │                       wrong name, shape or dtype
    └── InvalidStep         a whole `execute` / `copy_blocks` / swap call is
                            malformed (one bad sequence in a step is not an
                            exception: its `SeqResult.error` says what was wrong)
"""

from __future__ import annotations

from ipc.errors import BadRequest
from text.errors import CheckpointError

__all__ = ["CheckpointError", "InvalidStep"]


class InvalidStep(BadRequest):
    """A runner call as a whole is malformed."""
