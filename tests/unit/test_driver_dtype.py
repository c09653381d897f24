"""A driver's dtype: what `auto` picks from the device, and a dtype the
device cannot run refused at start-up (exit EX_CONFIG, no restart loop)."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from common.config.driver import DriverConfig
from drivers.base import pin
from drivers.cpu import CpuDriver
from drivers.model.dtypes import FP16_FLAGS, cpu_flags, resolve_dtype
from drivers.model.runner import ModelRunner
from ipc.errors import EX_CONFIG, BadRequest, ConfigError

CPU = torch.device("cpu")
NO_FP16 = pytest.mark.skipif(bool(cpu_flags() & FP16_FLAGS), reason="this CPU runs float16 natively")


@pytest.mark.parametrize("flags,expected", [
    (frozenset({"avx2", "fma"}), torch.float32),                   # Zen 1-3, Haswell..Skylake client
    (frozenset({"avx512f", "avx512_bf16"}), torch.bfloat16),       # Cooper Lake, Zen 4
    (frozenset({"avx512f", "amx_tile", "amx_bf16"}), torch.bfloat16),   # Sapphire Rapids
])
def test_auto_picks_bf16_only_where_the_cpu_multiplies_it_natively(flags: frozenset[str],
                                                                    expected: torch.dtype) -> None:
    assert resolve_dtype("auto", CPU, flags=flags) == expected
    assert resolve_dtype("", CPU, flags=flags) == expected        # config files from before "auto"
    # Asked for by name, bf16 runs anywhere (slowly without the flags).
    assert resolve_dtype("bfloat16", CPU, flags=flags) == torch.bfloat16
    assert resolve_dtype("float32", CPU, flags=flags) == torch.float32


def test_float16_on_a_cpu_needs_native_fp16() -> None:
    with pytest.raises(BadRequest, match="float16 is not supported on this CPU"):
        resolve_dtype("float16", CPU, flags=frozenset({"avx2", "avx512_bf16"}))
    assert resolve_dtype("float16", CPU, flags=frozenset({"avx512_fp16"})) == torch.float16
    with pytest.raises(BadRequest, match="dtype must be one of auto, float32"):
        resolve_dtype("int4", CPU)


def test_config_defaults_to_auto_and_names_the_choices() -> None:
    assert DriverConfig().dtype == "auto"
    DriverConfig(dtype="").validate()
    with pytest.raises(BadRequest, match="auto, float32, bfloat16, float16"):
        DriverConfig(dtype="fp8").validate()


def test_runner_reports_the_dtype_auto_chose(checkpoint: Path) -> None:
    runner = ModelRunner.load(str(checkpoint), kv_cache_bytes=1 << 20, block_size=4)
    expected = resolve_dtype("auto", CPU)
    assert runner.info.dtype == {torch.float32: "float32", torch.bfloat16: "bfloat16"}[expected]
    assert runner.cache.k.dtype == expected and runner.model.weights.lm_head.dtype == expected
    assert runner.info.threads == torch.get_num_threads() == len(os.sched_getaffinity(0))
    # A bf16 cache holds twice the blocks of a float32 one in the same bytes.
    half = ModelRunner.load(str(checkpoint), kv_cache_bytes=1 << 20, block_size=4, dtype="bfloat16")
    full = ModelRunner.load(str(checkpoint), kv_cache_bytes=1 << 20, block_size=4, dtype="float32")
    assert half.info.num_blocks == 2 * full.info.num_blocks


@NO_FP16
async def test_driver_start_up_refuses_float16_on_this_cpu(checkpoint: Path, tmp_path: Path) -> None:
    driver = CpuDriver(["--model", str(checkpoint), "--kv-cache-mb", "1", "--dtype", "float16"],
                       home=str(tmp_path))
    with pytest.raises(ConfigError, match="float16 is not supported on this CPU"):
        await driver.on_start()


@NO_FP16
def test_driver_process_exits_ex_config_so_it_is_not_restarted(checkpoint: Path, home: Path) -> None:
    env = {**os.environ, "LLMOS_HOME": str(home), "LLMOS_INSTANCE": "cpu"}
    proc = subprocess.run([sys.executable, "-m", "drivers", "cpu", "--model", str(checkpoint),
                           "--kv-cache-mb", "1", "--dtype", "float16"],
                          env=env, capture_output=True, text=True, timeout=90)
    assert proc.returncode == EX_CONFIG, proc.stderr[-2000:]
    assert "float16 is not supported on this CPU" in proc.stderr


def test_cpus_flag_pins_the_driver_and_sizes_its_threads(checkpoint: Path, tmp_path: Path) -> None:
    before = os.sched_getaffinity(0)
    cpu = min(before)
    try:
        driver = CpuDriver(["--model", str(checkpoint), "--kv-cache-mb", "1", "--cpus", str(cpu)],
                           home=str(tmp_path))
        # The runner loads in a worker thread: it must see the pinning too.
        with ThreadPoolExecutor(1) as pool:
            driver.runner = pool.submit(driver.load_runner).result()
            assert pool.submit(os.sched_getaffinity, 0).result() == {cpu}
        meta = driver.ready_meta()
        assert meta["threads"] == 1 and meta["dtype"] == driver.runner.info.dtype
    finally:
        pin(before)
        torch.set_num_threads(len(before))
    with pytest.raises(ConfigError, match="argument --cpus: not a CPU list"):
        CpuDriver(["--model", "demo", "--cpus", "3-x"], home=str(tmp_path))


def test_metrics_show_each_drivers_dtype() -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from ipc.protocol import kernel as kp
    from services.gateway.backend import Stats
    from services.gateway.metrics import GatewayMetrics

    cpu = kp.InstanceInfo("driver", "cpu", 7, kp.ChildState.READY, meta={"model": "demo", "device": "cpu", "dtype": "float32"})
    status = kp.StatusReply(1, 1.0, [cpu, kp.InstanceInfo("memory", "memory", 8, kp.ChildState.READY)], kp.KernelCounters())
    text = GatewayMetrics().render(Stats(status, None, None)).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    [sample] = families["llmos_driver_info"].samples
    assert sample.labels == {"instance": "cpu", "model": "demo", "device": "cpu", "dtype": "float32"}
