"""Bounded logs and login budgets without sockets (issue 12 #6): rotation by
size, a process killed mid-line, attacker-sized values cut; failure budgets
that never refuse a valid key; refusals aggregated with counts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ipc.errors import Unauthorized
from common.logs import MAX_VALUE, RotatingFile, _env_int, truncate_strings
from services.security.limits import (
    GLOBAL_BURST,
    PREFIX_BURST,
    SOURCE_BURST,
    Aggregator,
    LoginLimiter,
)
from services.security.store import MAX_API_KEY, State, Store, split_api_key


def test_the_log_rotates_by_size_and_keeps_a_bounded_number_of_files(tmp_path: Path) -> None:
    path = tmp_path / "svc.log"
    f = RotatingFile(path, max_bytes=4096, backups=3)
    line = json.dumps({"event": "x", "pad": "p" * 90}) + "\n"
    for _ in range(1000):  # ~100 KB through a 4 KB x 4 budget
        f.write(line)
    f.close()
    files = sorted(tmp_path.iterdir())
    assert [p.name for p in files] == ["svc.log", "svc.log.1", "svc.log.2", "svc.log.3"]
    assert all(p.stat().st_size <= 4096 for p in files)
    for p in files:  # every file holds whole lines only
        assert all(json.loads(x)["event"] == "x" for x in p.read_text().splitlines())


def test_rotation_off_and_bad_settings_are_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = RotatingFile(tmp_path / "a.log", max_bytes=0)
    for _ in range(100):
        f.write("y" * 100 + "\n")
    f.close()
    assert [p.name for p in tmp_path.iterdir()] == ["a.log"]
    monkeypatch.setenv("LLMOS_LOG_MAX_BYTES", "16MiB")
    with pytest.raises(ValueError, match="LLMOS_LOG_MAX_BYTES must be an integer, got '16MiB'"):
        _env_int("LLMOS_LOG_MAX_BYTES", 1)
    monkeypatch.setenv("LLMOS_LOG_BACKUPS", "-1")
    with pytest.raises(ValueError, match="LLMOS_LOG_BACKUPS must be >= 0"):
        _env_int("LLMOS_LOG_BACKUPS", 3)


_WRITER = """
import json, sys
from pathlib import Path
from common.logs import RotatingFile
f = RotatingFile(Path(sys.argv[1]), max_bytes=8192, backups=2)
print("ready", flush=True)
i = 0
while True:
    f.write(json.dumps({"event": "spin", "i": i, "pad": "q" * 200}))
    f.write("\\n")
    i += 1
"""


def test_a_process_killed_mid_write_leaves_whole_lines_for_the_next(tmp_path: Path) -> None:
    path = tmp_path / "k.log"
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)], cwd=root, stdout=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(root)})
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        deadline = time.monotonic() + 30
        while not path.with_name("k.log.2").exists():  # it has rotated at least twice
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # a kill may also land between two parts of one write: simulate the worst case
    with open(path, "ab") as raw:
        raw.write(b'{"event": "half')
    f = RotatingFile(path, max_bytes=8192, backups=2)
    f.write(json.dumps({"event": "next"}) + "\n")
    f.close()
    text = path.read_text().splitlines()
    assert text[-2] == '{"event": "half' and json.loads(text[-1]) == {"event": "next"}
    # a kill between the two renames of a rotation leaves k.log.1 absent until the next one: nothing is lost
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names in (["k.log", "k.log.1", "k.log.2"], ["k.log", "k.log.2"]), names
    for p in names[1:]:
        assert all(json.loads(x)["event"] == "spin" for x in (tmp_path / p).read_text().splitlines())


def test_long_values_are_cut_in_every_log_line() -> None:
    ev = {"event": "kernel.refused", "dst": "d" * 1_000_000, "ids": ["x" * 5000] * 1000,
          "nested": {"k" * 500: "v" * 5000}, "n": 3, "exception": "T" * 20_000}
    out = truncate_strings(None, "info", ev)
    line = json.dumps(out)
    assert len(line) < 16 * 1024  # 1 MB + 5 MB + 2.5 MB in, about 13 KB out (8 KB of it the traceback)
    assert out["dst"].startswith("d" * MAX_VALUE) and out["dst"].endswith(f"[+{1_000_000 - MAX_VALUE} chars]")
    assert len(out["ids"]) == 17 and out["ids"][-1] == "…[+984 items]"
    assert out["n"] == 3 and len(out["exception"]) < 8300


def test_a_valid_key_is_never_refused_by_the_failure_budgets() -> None:
    """The budgets are charged only by failures; the store checks first."""
    store = Store(State(), 3600)
    rec, api_key = store.create_key("alice", ["echo"])
    lim = LoginLimiter()
    t = 1000.0
    refused = 0
    for i in range(10_000):  # a flood aimed at alice's key id
        try:
            store.authenticate(f"llmos.{rec.key_id}.wrong{i}")
        except Unauthorized as exc:
            assert exc.detail["cause"] == "wrong secret"
            over, wait = lim.failed("client", rec.key_id, now=t)
            refused += bool(over)
            assert not over or wait > 0
        assert store.authenticate(api_key) is rec  # in the middle of it, every time
    assert refused >= 10_000 - max(SOURCE_BURST, PREFIX_BURST, GLOBAL_BURST)


def test_budgets_per_source_per_key_prefix_and_global() -> None:
    lim = LoginLimiter()
    t = 0.0
    assert all(lim.failed("a", f"aaaa{i:08x}", now=t) == ("", 0.0) for i in range(int(PREFIX_BURST)))
    over, wait = lim.failed("b", "aaaaffffffff", now=t)  # another source, same key-id prefix
    assert over == "key id" and wait == pytest.approx(0.5)
    assert lim.failed("b", "bbbb00000000", now=t) == ("", 0.0)  # another prefix is its own budget
    # one source spraying random key ids: its own budget runs out
    lim = LoginLimiter()
    results = [lim.failed("c", f"{i:04x}00000000", now=t)[0] for i in range(int(SOURCE_BURST) + 1)]
    assert results[-1] == "source" and not any(results[:-1])
    # many sources, many prefixes: the global budget still holds
    lim = LoginLimiter()
    results = [lim.failed(f"s{i}", f"{i:04x}00000000", now=t)[0] for i in range(int(GLOBAL_BURST) + 1)]
    assert results[-1] == "global"
    assert lim.failed("s0", "000000000000", now=t + 60)[0] == ""  # refilled with time


def test_failures_are_aggregated_one_record_per_source_and_cause_per_interval() -> None:
    agg = Aggregator(interval_s=10.0)
    first = [agg.add("login", "unauthorized", "client", "wrong secret", f"k{i % 20}", now=float(i) / 100)
             for i in range(1000)]
    assert first[0] and not any(first[1:])  # the first written at once, the rest counted
    assert agg.add("login", "unauthorized", "client", "unknown key id", "x", now=1.0)
    assert agg.flush(now=5.0) == []
    [s] = agg.flush(now=10.5)
    assert (s.count, s.distinct_key_ids, len(s.key_ids)) == (999, 20, 8) and s.cause == "wrong secret"
    assert agg.add("login", "unauthorized", "client", "wrong secret", "k0", now=11.0)  # a new interval


def test_an_oversized_api_key_is_refused_before_any_hashing() -> None:
    with pytest.raises(Unauthorized, match="invalid API key") as ei:
        split_api_key("llmos." + "a" * 10_000_000)
    assert ei.value.detail["cause"] == f"longer than {MAX_API_KEY} characters"
