from __future__ import annotations

from pathlib import Path

import pytest

from ipc.errors import BadRequest
from kernel.config import ChildSpec, Config, Restart, Strategy, load_config
from sdk.testing import write_config


def test_defaults_need_no_file() -> None:
    cfg = load_config(None)
    assert cfg.kernel.max_attempts >= 1
    # secure by default: the security server first (it writes admin.key), auth on
    assert [c.name for c in cfg.children] == ["security", "echo", "memory", "cpu", "scheduler"]
    assert cfg.kernel.auth
    cpu = cfg.children[3]
    assert cpu.service == "driver" and cpu.args[:3] == ["cpu", "--model", "demo"]


def test_llmos_up_flags_choose_the_children() -> None:
    from kernel.config import default_children
    from tools.cli import parse_drivers

    kids = default_children("/models/x", parse_drivers("cpu=2,cuda=1"), ":8000")
    assert [(c.name, c.instances) for c in kids] == [
        ("security", 1), ("echo", 1), ("memory", 1), ("cpu", 2), ("cuda", 1), ("scheduler", 1), ("gateway", 1)]
    assert kids[-1].args == ["--listen", ":8000"] and kids[3].args[2] == "/models/x"
    with pytest.raises(BadRequest, match="--drivers"):
        parse_drivers("cpu=two")


def test_llmos_up_swap_flags_reach_the_driver_and_the_scheduler_as_flags_they_accept() -> None:
    from drivers.base import driver_args
    from kernel.config import default_children
    from services.scheduler.config import PreemptionMode
    from services.scheduler.service import scheduler_args

    kids = {c.name: c for c in default_children("demo", {"cpu": 1}, swap_mb=64.0, preemption="swap")}
    assert driver_args(kids["cpu"].args[1:]).swap_mb == 64.0
    assert scheduler_args(kids["scheduler"].args).preemption == PreemptionMode.SWAP
    plain = {c.name: c for c in default_children("demo", {"cpu": 1})}
    assert driver_args(plain["cpu"].args[1:]).swap_mb == 0.0
    assert scheduler_args(plain["scheduler"].args).preemption == PreemptionMode.RECOMPUTE


def test_toml_file_is_decoded_into_typed_structs(tmp_path: Path) -> None:
    p = tmp_path / "llmos.toml"
    p.write_text("""
[supervisor]
strategy = "rest_for_one"

[[children]]
name = "echo"
module = "services.echo"
restart = "transient"
instances = 2
intensity = 3
""")
    cfg = load_config(p)
    assert cfg.supervisor.strategy is Strategy.REST_FOR_ONE
    assert cfg.children[0].restart is Restart.TRANSIENT and cfg.children[0].instances == 2


def test_config_written_by_the_test_helper_round_trips(tmp_path: Path) -> None:
    cfg = Config(children=[ChildSpec("echo", "services.echo", args=["--x"], env={"A": "b"})])
    assert load_config(write_config(tmp_path / "c.toml", cfg)) == cfg


@pytest.mark.parametrize("text, fragment", [
    ("[[children]]\nname = 'x'\nmodule = 'm'\nrestart = 'sometimes'\n", "restart"),
    ("[kernel]\nmax_attemps = 3\n", "max_attemps"),
    ("[[children]]\nname='a'\nmodule='m'\n[[children]]\nname='a'\nmodule='m'\n", "duplicate"),
    ("not = [valid", "not valid TOML"),
])
def test_bad_config_names_the_file_and_the_field(tmp_path: Path, text: str, fragment: str) -> None:
    p = tmp_path / "bad.toml"
    p.write_text(text)
    with pytest.raises(BadRequest, match=fragment) as ei:
        load_config(p)
    assert "bad.toml" in str(ei.value) or "duplicate" in fragment


def test_missing_config_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(BadRequest, match="nope.toml"):
        load_config(tmp_path / "nope.toml")
