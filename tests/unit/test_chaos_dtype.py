"""`llmos chaos` runs its driver in float32 unless told otherwise: the checker
holds every unfaulted greedy request to the reference run token for token,
and bfloat16 (what `auto` picks on AMX or AVX-512 BF16) rounds differently
for each batch shape, which would read as a broken recovery contract."""

from __future__ import annotations

import argparse

from tools.chaos.cli import add_arguments
from tools.chaos.run import ChaosConfig, chaos_children


def driver_args(children: list) -> list[str]:  # type: ignore[type-arg]
    (driver,) = [c for c in children if c.service == "driver"]
    return list(driver.args)


def test_the_chaos_driver_computes_in_float32_by_default() -> None:
    assert ChaosConfig().dtype == "float32"
    args = driver_args(chaos_children("demo", 16, ""))
    assert args[args.index("--dtype") + 1] == "float32"
    ap = argparse.ArgumentParser()
    add_arguments(ap)
    assert ap.parse_args([]).dtype == "float32"


def test_another_dtype_is_passed_to_the_driver_as_given() -> None:
    args = driver_args(chaos_children("demo", 16, "", "auto"))
    assert args[args.index("--dtype") + 1] == "auto"
    assert "--dtype" not in driver_args(chaos_children("demo", 16, "", ""))
    ap = argparse.ArgumentParser()
    add_arguments(ap)
    assert ap.parse_args(["--dtype", "bfloat16"]).dtype == "bfloat16"
