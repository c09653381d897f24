from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from common.config.gateway import GatewayConfig
from common.config.scheduler import Objective
from ipc.errors import BadRequest, ConfigError
from kernel.config import ChildSpec, Config, Restart, Strategy, load_config
from tools.testing import write_config


def test_defaults_need_no_file() -> None:
    cfg = load_config(None)
    assert cfg.kernel.max_attempts >= 1
    # secure by default: the security server first (it writes admin.key), auth on
    # echo is a test service: not in a default boot
    assert [c.name for c in cfg.children] == ["security", "memory", "cpu", "scheduler"]
    assert cfg.kernel.auth
    cpu = cfg.children[2]
    # the driver's settings are its [driver] table, not flags
    assert cpu.service == "driver" and cpu.args == ["cpu"] and cfg.driver.model == "demo"


def test_llmos_up_flags_choose_the_children() -> None:
    from kernel.config import default_children
    from tools.cli import parse_drivers

    kids = default_children("/models/x", parse_drivers("cpu=2,cuda=1"), ":8000")
    assert [(c.name, c.instances) for c in kids] == [
        ("security", 1), ("memory", 1), ("cpu", 2), ("cuda", 1), ("scheduler", 1), ("gateway", 2)]
    assert kids[-1].args == ["--listen", ":8000"] and kids[2].args[2] == "/models/x"
    # both gateway instances accept from the one socket the kernel binds; each may drain before SIGKILL
    assert kids[-1].listen == ":8000" and kids[-1].shutdown_timeout_s > GatewayConfig().drain_s
    one = default_children(http=":8000", gateway=GatewayConfig(instances=1))
    assert one[-1].instances == 1
    with pytest.raises(ConfigError, match="listening address"):
        Config(children=[ChildSpec("gateway", "services.gateway", listen="nowhere")]).validate()
    # the gateway is optional: it stops alone; the core escalates
    assert not kids[-1].significant and all(c.significant for c in kids[:-1])
    with pytest.raises(BadRequest, match="--drivers"):
        parse_drivers("cpu=two")


def test_llmos_up_swap_flags_reach_the_driver_and_the_scheduler_as_flags_they_accept() -> None:
    from drivers.base import driver_args, driver_config
    from kernel.config import default_children
    from common.config.scheduler import PreemptionMode
    from services.scheduler.service import scheduler_args

    kids = {c.name: c for c in default_children("demo", {"cpu": 1}, swap_mb=64.0, preemption="swap")}
    assert driver_config(driver_args(kids["cpu"].args[1:])).swap_mb == 64.0
    assert scheduler_args(kids["scheduler"].args).preemption == PreemptionMode.SWAP
    plain = {c.name: c for c in default_children("demo", {"cpu": 1})}
    assert driver_config(driver_args(plain["cpu"].args[1:])).swap_mb == 0.0
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


@pytest.mark.parametrize("text, fragment", [
    ("[scheduler.policy]\nname = 'lottery'\n", "[scheduler] policy.name: Invalid enum value 'lottery'"),
    ("[scheduler]\ntoken_budget = 0\n", "[scheduler] token_budget must be >= 1"),
    ("[memory]\ntenant_blocks = {a = 'lots'}\n", "[memory] tenant_blocks[...]: Expected `int`"),
    ("[memory]\ndefault_tenant_blocks = -7\n", "[memory] default_tenant_blocks must be >= 0"),
    ("[memory]\nblocks = 3\n", "[memory] Object contains unknown field `blocks`"),
    ("[gateway]\nmax_body_bytes = 'big'\n", "[gateway] max_body_bytes: Expected `int`"),
    ("[security]\ntoken_ttl_s = 0\n", "[security] token_ttl_s must be within"),
    ("[driver]\ndtype = 'int4'\n", "[driver] dtype must be one of"),
    ("[driver]\nkv_cache_mb = -1\n", "[driver] kv_cache_mb must be > 0"),
    ("[schedular]\n", "unknown field `schedular`"),
    ("scheduler = 3\n", "[scheduler] Expected `object`"),
    ("[[children]]\nname='a'\nmodule='m'\nsignificant='no'\n", "[[children] #1] significant: Expected `bool`"),
])
def test_every_table_is_typed_and_errors_name_file_table_and_field(tmp_path: Path, text: str,
                                                                  fragment: str) -> None:
    from ipc.errors import ConfigError

    p = tmp_path / "llmos.toml"
    p.write_text(text)
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    assert f"config file {p}" in ei.value.message and fragment in ei.value.message


def test_each_service_decodes_its_table_from_what_the_kernel_hands_down(monkeypatch: pytest.MonkeyPatch,
                                                                         tmp_path: Path) -> None:
    from common.config.driver import load_driver_config
    from ipc.errors import ConfigError
    from common.config.memory import load_memory_config
    from common.config.scheduler import PolicyName, load_scheduler_config

    p = tmp_path / "llmos.toml"
    p.write_text("[memory]\ntenant_blocks = {a = 4}\n[driver]\nkv_cache_mb = 64.0\n")
    cfg = load_config(p).with_settings("flags", **{"scheduler.policy.name": "mlfq"})
    for k, v in cfg.child_env(p).items():
        monkeypatch.setenv(k, v)
    assert load_memory_config().tenant_blocks == {"a": 4}
    assert load_driver_config(kv_cache_mb=None).kv_cache_mb == 64.0
    assert load_driver_config(kv_cache_mb=32.0).kv_cache_mb == 32.0  # a flag wins
    assert load_scheduler_config(None).policy.name is PolicyName.MLFQ
    with pytest.raises(ConfigError, match=r"\[driver\] kv_cache_mb must be > 0"):
        load_driver_config(kv_cache_mb=0.0)


def test_up_flags_set_the_tables_and_a_bad_flag_is_named() -> None:
    from ipc.errors import ConfigError
    from tools.cli import main, up_config

    args = _up_args("--policy", "priority", "--kv-cache-mb", "64", "--dtype", "bfloat16", "--autotune", "40")
    cfg = up_config(args)
    assert cfg.scheduler.policy.name == "priority" and cfg.scheduler.tpot_target_ms == 40.0
    assert cfg.driver.kv_cache_mb == 64.0 and cfg.driver.dtype == "bfloat16"
    assert up_config(_up_args("--preemption", "swap")).driver.swap_mb == 512.0
    assert up_config(_up_args()).scheduler.tuner.enabled  # on by default
    assert not up_config(_up_args("--no-autotune")).scheduler.tuner.enabled
    assert up_config(_up_args("--tpot-ms", "80")).scheduler.tuner.enabled
    tuned = up_config(_up_args("--ttft-ms", "500", "--tpot-ms", "80", "--no-autotune")).scheduler
    assert not tuned.tuner.enabled and tuned.objectives.objective == Objective(ttft_ms=500, tpot_ms=80)
    for bad, fragment in [(("--policy", "lottery"), "[scheduler] policy.name"),
                          (("--ttft-ms", "0"), "[scheduler] tuner.objective: ttft_ms and tpot_ms must be > 0"),
                          (("--kv-cache-mb", "0"), "[driver] kv_cache_mb"),
                          (("--dtype", "int4"), "[driver] dtype"),
                          (("--autotune", "-5"), "[scheduler] tpot_target_ms")]:
        with pytest.raises(ConfigError) as ei:
            up_config(_up_args(*bad))
        assert "llmos up flags" in ei.value.message and fragment in ei.value.message
    assert main(["config", "check", "/nonexistent/llmos.toml"]) == 1


def _up_args(*flags: str) -> argparse.Namespace:
    """The namespace `llmos up FLAGS` hands cmd_up (which is not run)."""
    import tools.cli as cli

    captured: list[argparse.Namespace] = []

    def fake_up(a: argparse.Namespace) -> int:
        captured.append(a)
        return 0

    real, cli.cmd_up = cli.cmd_up, fake_up  # type: ignore[assignment]
    try:
        assert cli.main(["up", *flags]) == 0
    finally:
        cli.cmd_up = real
    return captured[0]


def test_config_example_has_every_setting_and_decodes_back_to_the_defaults(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import msgspec

    from tools.cli import main

    assert main(["config", "example"]) == 0
    text = capsys.readouterr().out
    p = tmp_path / "example.toml"
    p.write_text(text)
    assert load_config(p) == Config()
    for table in ("kernel", "kernel.limits", "supervisor", "scheduler", "scheduler.policy", "scheduler.tuner",
                  "scheduler.tuner.objective", "memory", "gateway", "security", "driver"):
        assert f"[{table}]" in text
    for table in ("scheduler", "memory", "gateway", "security", "driver"):
        for f in msgspec.structs.fields(type(getattr(Config(), table))):
            if isinstance(getattr(getattr(Config(), table), f.name), msgspec.Struct):
                continue  # a table of its own: [scheduler.policy], [scheduler.tuner]
            assert f"\n{f.name} = " in text, f"{table}.{f.name} missing from the example"
    assert "# one of: fcfs, priority, round_robin, mlfq, fair" in text
    assert main(["config", "check", str(p)]) == 0


def test_driver_dtypes_match_the_model_runner() -> None:
    from common.config.driver import DTYPES
    from drivers.model.dtypes import AUTO, TORCH_DTYPES

    assert set(DTYPES) == {AUTO, *TORCH_DTYPES}
