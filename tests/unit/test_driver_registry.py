"""Third-party drivers are found through the `llmos.drivers` entry-point group."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from drivers.base import Driver
from drivers.cpu import CpuDriver
from drivers.registry import available, driver_class
from ipc.errors import NotFound


def test_builtin_drivers_are_registered() -> None:
    assert {"cpu", "cuda"} <= set(available())
    assert driver_class("cpu") is CpuDriver


def test_a_third_party_driver_installed_as_a_distribution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "xpu_driver.py").write_text(
        "from drivers.base import Driver\n\nclass XpuDriver(Driver):\n    device = 'xpu'\n")
    (tmp_path / "not_a_driver.py").write_text("class Thing:\n    pass\n")
    dist = tmp_path / "llmos_xpu-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: llmos-xpu\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[llmos.drivers]\nxpu = xpu_driver:XpuDriver\nbroken = not_a_driver:Thing\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "xpu" in available()
    cls = driver_class("xpu")
    assert issubclass(cls, Driver) and cls.device == "xpu" and cls.name == "driver"
    with pytest.raises(NotFound, match="not a Driver subclass"):
        driver_class("broken")
    with pytest.raises(NotFound, match="no driver named 'nope'"):
        driver_class("nope")
    sys.modules.pop("xpu_driver", None)
