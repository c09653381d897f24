"""The package layering holds: no import against the DAG (ipc <- common <-
sdk <- {kernel, drivers, services} <- tools; text on common), no import
cycle between modules, no module over 400 lines, and the torch-free
packages stay torch-free."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.helpers.imports import cycles, imports, package_cycles, too_long, upward
from tools.testing import REPO_ROOT

PACKAGES = ("ipc", "common", "text", "sdk", "kernel", "drivers", "services", "tools")
MAX_LINES = 400
# Importing these (every module under them) must not import torch: the
# scheduler, gateway, memory and security servers run without it.
TORCH_FREE = ("text", "services.scheduler", "services.gateway", "services.memory", "services.security")


def test_no_import_goes_up_the_package_dag() -> None:
    bad = upward(imports(REPO_ROOT, PACKAGES))
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_no_module_level_import_cycle() -> None:
    found = cycles(imports(REPO_ROOT, PACKAGES))
    assert not found, "module-level import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_no_import_cycle_between_packages() -> None:
    found = package_cycles(REPO_ROOT, PACKAGES)
    assert not found, "package import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_no_test_module_imports_another() -> None:
    """Shared test code lives in helper modules (tests/helpers), not in a
    test module or conftest another test module reaches into."""
    bad = [f"{i.path}:{i.line}: {i.importer} imports {i.module}" for i in imports(REPO_ROOT, ("tests",))
           if i.module.rsplit(".", 1)[-1].startswith("test_") or i.module.endswith("conftest")]
    assert not bad, "test modules importing test modules:\n" + "\n".join(bad)


def test_no_module_over_400_lines() -> None:
    long = too_long(REPO_ROOT, (*PACKAGES, "tests"), MAX_LINES)
    assert not long, f"modules over {MAX_LINES} lines:\n" + "\n".join(long)


def test_torch_free_packages_do_not_import_torch() -> None:
    mods = [m for pkg in TORCH_FREE for m in _submodules(pkg)]
    probe = (
        "import importlib, sys\n"
        f"for m in {mods!r}:\n"
        "    importlib.import_module(m)\n"
        "    if 'torch' in sys.modules:\n"
        "        sys.exit('importing ' + m + ' imported torch')\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO_ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]


def _submodules(package: str) -> list[str]:
    base = REPO_ROOT / package.replace(".", "/")
    names = []
    for path in sorted(base.rglob("*.py")):
        parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
        if parts[-1] == "__main__":
            continue  # runs the service
        if parts[-1] == "__init__":
            parts.pop()
        names.append(".".join(parts))
    return names


def _tree(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_the_checker_finds_an_upward_import_and_a_cycle(tmp_path: Path) -> None:
    _tree(tmp_path, {
        "ipc/__init__.py": "",
        "ipc/wire.py": "def f():\n    from kernel import router  # upward, even in a function\n",
        "kernel/__init__.py": "",
        "kernel/router.py": "from . import ops\n",
        "kernel/ops.py": "from kernel.router import X\n",
        "kernel/lazy.py": "def g():\n    import kernel.ops\n",
        "kernel/typed.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from kernel import lazy\n",
        "kernel/big.py": "x = 1\n" * (MAX_LINES + 1),
    })
    found = imports(tmp_path, ("ipc", "kernel"))
    assert upward(found) == [f"{tmp_path / 'ipc/wire.py'}:2: ipc.wire (ipc) imports kernel.router (kernel)"]
    # function-level and TYPE_CHECKING imports do not make cycles
    assert cycles(found) == [["kernel.ops", "kernel.router"]]
    assert too_long(tmp_path, ("ipc", "kernel"), MAX_LINES) == [f"kernel/big.py: {MAX_LINES + 1} lines"]
    # ipc -> kernel (in a function) and nothing back: no package cycle yet
    assert package_cycles(tmp_path, ("ipc", "kernel")) == []
    (tmp_path / "kernel/wire_user.py").write_text("def h():\n    import ipc.wire\n")
    assert package_cycles(tmp_path, ("ipc", "kernel")) == [["ipc", "kernel"]]


def test_the_checker_resolves_relative_and_package_imports(tmp_path: Path) -> None:
    _tree(tmp_path, {
        "services/__init__.py": "",
        "services/a/__init__.py": "from .core import thing\n",
        "services/a/core.py": "from ..b import helper\n",
        "services/b/__init__.py": "from services.a.core import thing\n",
        "services/b/helper.py": "",
    })
    found = imports(tmp_path, ("services",))
    assert {(i.importer, i.module) for i in found} == {
        ("services.a", "services.a.core"), ("services.a.core", "services.b.helper"),
        ("services.b", "services.a.core")}
    # services.a.core runs services.b's __init__, which runs services.a's, which imports services.a.core
    assert cycles(found) == [["services.a", "services.a.core", "services.b"]]
