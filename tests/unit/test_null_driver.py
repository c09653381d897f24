"""The null driver (drivers/null.py): torch-free, deterministic, and held to
the same Execute contract as a model driver (a bad step fails alone)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

from drivers.null import ALPHABET, EOS, NullDriver, continuation, next_token
from drivers.registry import driver_class
from ipc.errors import BadRequest, ConfigError
from ipc.protocol import driver as dp
from ipc.protocol.sampling import SamplingParams
from tools.testing import REPO_ROOT


def null(tmp_path: Path, *argv: str) -> NullDriver:
    return NullDriver(["--num-blocks", "8", "--block-size", "4", "--max-model-len", "64", *argv],
                      instance="null-0", home=str(tmp_path))


def test_the_null_driver_and_the_registry_import_no_torch() -> None:
    probe = ("import sys\n"
             "from drivers.registry import driver_class\n"
             "cls = driver_class('null')\n"
             "assert cls.__module__ == 'drivers.null', cls\n"
             "sys.exit('torch imported' if 'torch' in sys.modules else 0)\n")
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]


def test_registered_like_the_model_drivers() -> None:
    assert driver_class("null") is NullDriver


def test_tokens_are_a_pure_function_of_last_token_and_position() -> None:
    seen = {next_token(t, p) for t in range(258) for p in range(64)}
    assert seen <= set(ALPHABET) and len(seen) > 10 and EOS not in seen
    assert continuation([256, 104, 105], 40) == continuation([256, 104, 105], 40)
    assert continuation([256, 104, 105], 40) != continuation([256, 104, 106], 40)
    # A continuation is the same when resumed part-way (a restart recomputes).
    whole = continuation([256, 7], 30)
    assert continuation([256, 7, *whole[:10]], 20) == whole[10:]


def step(seq_id: int, tokens: list[int], start: int, table: list[int], **kw: Any) -> dp.StepSeq:
    return dp.StepSeq(seq_id, tokens, start, table, **kw)


async def test_execute_answers_each_sequence_and_fails_bad_ones_alone(tmp_path: Path) -> None:
    drv = null(tmp_path)
    await drv.on_start()
    good = step(1, [256, 104, 105], 0, [0])
    steps = [good,
             step(2, [300], 0, [1]),                       # out of the vocabulary
             step(3, [5], 0, [99]),                        # not one of its blocks
             step(4, [5] * 9, 0, [2, 3]),                  # table too short for 9 positions
             step(5, [5], 70, list(range(8))),             # past max_model_len
             step(6, [5], 0, [4], params=SamplingParams(top_p=0.0)),
             step(7, [5, 6], 0, [5], sample=False),        # a prefill chunk: no token
             step(1, [5], 3, [0])]                         # seq 1 twice
    out = await drv.execute(dp.Execute(steps), None)  # type: ignore[arg-type]
    assert [o.seq_id for o in out.outputs] == [s.seq_id for s in steps]
    assert out.outputs[0].token == continuation([256, 104, 105], 1)[0] and not out.outputs[0].error
    assert "vocabulary" in out.outputs[1].error and "block id 99" in out.outputs[2].error
    assert "block table" in out.outputs[3].error and "context window" in out.outputs[4].error
    assert "top_p" in out.outputs[5].error
    assert out.outputs[6].token == -1 and not out.outputs[6].error
    assert "more than once" in out.outputs[7].error
    assert all(o.token == -1 for o in out.outputs[1:6])
    health = await drv.health(dp.DriverHealth(), None)  # type: ignore[arg-type]
    assert health.ok and health.steps == 1 and not health.busy
    desc = await drv.describe(dp.DescribeModel(), None)  # type: ignore[arg-type]
    assert (desc.num_blocks, desc.block_size, desc.max_model_len, desc.eos_token_ids) == (8, 4, 64, [EOS])
    from text.tokenizer import load_tokenizer
    assert load_tokenizer(desc.path).decode([104, 105]) == "hi"


async def test_copies_and_swaps_are_checked(tmp_path: Path) -> None:
    drv = null(tmp_path)
    with pytest.raises(BadRequest, match="copy names block 8"):
        await drv.execute(dp.Execute([], copies=[(0, 8)]), None)  # type: ignore[arg-type]
    with pytest.raises(BadRequest, match="no host swap tier"):
        await drv.swap_out(dp.SwapBlocksOut([0], [0]), None)  # type: ignore[arg-type]
    tiered = null(tmp_path, "--host-slots", "2")
    assert (await tiered.swap_out(dp.SwapBlocksOut([0, 7], [0, 1]), None)).blocks == 2  # type: ignore[arg-type]
    with pytest.raises(BadRequest, match="host slot 2"):
        await tiered.swap_in(dp.SwapBlocksIn([2], [0]), None)  # type: ignore[arg-type]
    with pytest.raises(BadRequest, match="2 block ids but 1 slots"):
        await tiered.swap_in(dp.SwapBlocksIn([0], [0, 1]), None)  # type: ignore[arg-type]


@pytest.mark.parametrize("argv, field", [(["--step-ms", "nan"], "--step-ms"), (["--step-ms", "-1"], "--step-ms"),
                                         (["--per-token-us", "inf"], "--per-token-us"),
                                         (["--num-blocks", "0"], "--num-blocks")])
def test_bad_flags_are_refused_naming_the_flag(tmp_path: Path, argv: list[str], field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        null(tmp_path, *argv)


def test_llmos_up_passes_driver_args_and_refuses_bad_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    import tools.cli as cli

    seen: list[Any] = []

    def fake_up(args: Any) -> int:
        seen.append(cli.up_config(args))
        return 0

    monkeypatch.setattr(cli, "cmd_up", fake_up)
    assert cli.main(["up", "--drivers", "null=2", "--driver-args=--step-ms 5 --num-blocks 64"]) == 0
    (null_child,) = [c for c in seen[0].children if c.service == "driver"]
    assert null_child.instances == 2 and null_child.args[0] == "null"
    drv = NullDriver(null_child.args[1:], instance="null-0", home="/tmp/unused-llmos-home")
    assert (drv.args.step_ms, drv.limits.num_blocks) == (5.0, 64)
    for bad, fragment in [("--step-ms", "expected one argument"), ("--step-ms five", "invalid float"),
                          ("--warp 9", "unrecognized arguments: --warp 9"), ("'--step-ms 5", "No closing quotation")]:
        with pytest.raises((ConfigError, BadRequest), match=fragment):
            cli.up_config(cli_namespace(cli, "--drivers", "null=1", f"--driver-args={bad}"))


def cli_namespace(cli: Any, *flags: str) -> Any:
    captured: list[Any] = []
    real = cli.cmd_up
    cli.cmd_up = captured.append
    try:
        cli.main(["up", *flags])
    finally:
        cli.cmd_up = real
    return captured[0]


async def test_steps_sent_back_to_back_run_in_order_each_on_the_token_before(tmp_path: Path) -> None:
    """Async scheduling: step N+1 arrives before N's reply; the driver runs
    them in arrival order and feeds N+1 the token N sampled."""
    drv = null(tmp_path)
    await drv.on_start()
    prompt = [256, 104, 105]
    first = dp.Execute([step(1, prompt, 0, [0, 1])], epoch="e")
    chained = [dp.Execute(deltas=[dp.StepDelta(1, [], len(prompt) + i, 2, chain=True)], epoch="e") for i in range(4)]
    outs: list[dp.Executed] = []

    async def send(msg: dp.Execute) -> None:
        outs.append(await drv.execute(msg, None))  # type: ignore[arg-type]

    async with anyio.create_task_group() as tg:
        for msg in [first, *chained]:
            tg.start_soon(send, msg)
    assert [o.outputs[0].token for o in outs] == continuation(prompt, 5)
