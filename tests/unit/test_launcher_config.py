"""The `[launcher]` table and the Ray launcher's seams that need no cluster:
bad values name the table and field; the local launcher (the default) never
imports Ray; choosing Ray without it installed says how to get it."""

from __future__ import annotations

import subprocess
import sys
import tomllib

import pytest

from common.config.launcher import LauncherKind
from ipc.errors import ConfigError
from kernel.config import decode_config
from tools.testing import REPO_ROOT


def decode(text: str) -> object:
    return decode_config(tomllib.loads(text), "test.toml")


def test_default_is_local_and_ray_is_chosen_by_kind() -> None:
    cfg = decode("")
    assert cfg.launcher.kind == LauncherKind.LOCAL  # type: ignore[attr-defined]
    cfg = decode('[launcher]\nkind = "ray"\naddress = "ray://head:10001"\n')
    assert cfg.launcher.kind == LauncherKind.RAY and cfg.launcher.address == "ray://head:10001"  # type: ignore[attr-defined]


@pytest.mark.parametrize("text, named", [
    ('[launcher]\nkind = "kubernetes"\n', "kind"),
    ('[launcher]\nkind = 7\n', "kind"),
    ('[launcher]\naddress = "   "\n', "address"),
    ('[launcher]\nnamespace = ""\n', "namespace"),
    ('[launcher]\nplacement_timeout_s = -1\n', "placement_timeout_s"),
    ('[launcher]\nplacement_timeout_s = 1e308\n', "placement_timeout_s"),
    ('[launcher]\nhosts = ["a"]\n', "hosts"),
])
def test_bad_launcher_values_name_the_field(text: str, named: str) -> None:
    with pytest.raises(ConfigError) as err:
        decode(text)
    assert "launcher" in err.value.message and named in err.value.message


@pytest.mark.parametrize("child, named", [
    ('resources = {llmos_driver = -1}', "negative resources"),
    ('num_gpus = -0.5', "negative resources"),
    ('resources = {llmos_driver = "one"}', "resources"),
    ('node_id = 5', "node_id"),
])
def test_bad_placement_is_refused(child: str, named: str) -> None:
    with pytest.raises(ConfigError) as err:
        decode(f'[[children]]\nname = "d"\nmodule = "drivers"\n{child}\n')
    assert named in err.value.message


def test_local_launcher_boot_path_never_imports_ray() -> None:
    code = ("import sys, kernel.__main__, kernel.main, kernel.launcher, tools.cli; "
            "sys.exit(1 if any(m == 'ray' or m.startswith('ray.') for m in sys.modules) else 0)")
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=False).returncode == 0


def test_ray_launcher_without_ray_says_how_to_get_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from kernel.ray_launcher import RayLauncher
    from common.config.launcher import LauncherConfig

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray → ImportError, as when it is not installed
    with pytest.raises(ConfigError) as err:
        RayLauncher(LauncherConfig(kind=LauncherKind.RAY))
    assert "pip install -e '.[ray]'" in err.value.message


def test_llmos_up_launcher_flag_reaches_the_config() -> None:
    from tools.cli import build_parser, up_config

    args = build_parser().parse_args(["up", "--launcher", "ray", "--ray-address", "10.0.0.1:6379"])
    cfg = up_config(args)
    assert cfg.launcher.kind == LauncherKind.RAY and cfg.launcher.address == "10.0.0.1:6379"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["up", "--launcher", "slurm"])
