"""A socket path is never taken over while someone listens on it, and is
removed only by whoever made it (issue 13 #1)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from ipc.errors import Unavailable
from ipc.sockets import ipc_path_id, prepare_ipc_path, remove_ipc_path


def _bound(path: Path, listen: bool) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    if listen:
        s.listen(1)
    return s


def test_a_live_socket_is_refused_a_stale_one_cleared(tmp_path: Path) -> None:
    path = tmp_path / "front.sock"
    live = _bound(path, listen=True)
    try:
        with pytest.raises(Unavailable, match=f"ipc://{path} is in use by another process"):
            prepare_ipc_path(f"ipc://{path}")
        assert path.exists()
    finally:
        live.close()
    prepare_ipc_path(f"ipc://{path}")  # nobody listens now: a dead kernel's leftover
    assert not path.exists()


def test_only_the_file_we_made_is_removed(tmp_path: Path) -> None:
    path = tmp_path / "back.sock"
    ep = f"ipc://{path}"
    ours = _bound(path, listen=False)
    made = ipc_path_id(ep)
    path.rename(tmp_path / "moved.sock")  # (still there: its inode cannot be reused)
    theirs = _bound(path, listen=True)  # another process bound the path since
    try:
        remove_ipc_path(ep, made)
        assert path.exists()
        remove_ipc_path(ep, None)
        assert path.exists()
        remove_ipc_path(ep, ipc_path_id(ep))
        assert not path.exists()
    finally:
        theirs.close()
        ours.close()
    assert ipc_path_id("tcp://127.0.0.1:1") is None
