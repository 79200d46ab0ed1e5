"""The package installs and imports the way the design says, and never shadows PyPI's `kernels`."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import lora_core

REPO = Path(__file__).resolve().parent.parent


def test_top_level_kernels_does_not_resolve_into_this_repo() -> None:
    spec = importlib.util.find_spec("kernels")
    if spec is not None and spec.origin is not None:
        assert REPO not in Path(spec.origin).resolve().parents, f"`import kernels` resolves to {spec.origin}"


def test_kernels_import_as_lora_core_kernels() -> None:
    import lora_core.kernels as k

    assert k.__name__ == "lora_core.kernels"
    assert Path(k.__file__).parent.name in ("kernels",)


def test_kernels_folder_refuses_another_name() -> None:
    code = f"import sys; sys.path.insert(0, {str(REPO)!r}); import kernels"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode != 0
    assert "ImportError" in result.stderr and "lora_core.kernels" in result.stderr


def test_import_pulls_in_neither_triton_nor_transformers() -> None:
    code = "import sys, lora_core; print(sorted(m for m in ('triton', 'transformers') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_public_api_is_declared() -> None:
    assert isinstance(lora_core.__all__, list)
    for name in lora_core.__all__:
        assert hasattr(lora_core, name), f"lora_core.__all__ names {name!r}, which does not exist"


def test_ci_runs_the_readme_test_command() -> None:
    """.ci/run and the README give the same test command, so CI tests what users run."""
    ci_lines = (REPO / ".ci" / "run").read_text().splitlines()
    (command,) = [line for line in ci_lines if "pytest" in line and not line.startswith("#")]
    assert command in (REPO / "README.md").read_text()


def test_console_script_runs() -> None:
    script = Path(sys.executable).parent / "lora-core"
    if not script.exists():
        pytest.skip("lora-core console script not installed in this environment")
    result = subprocess.run([str(script), "--version"], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == f"lora-core {lora_core.__version__}"


@pytest.mark.slow
def test_wheel_contains_only_lora_core(tmp_path: Path) -> None:
    """Build a real wheel from a copy of the sources; its only top-level package is lora_core."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(REPO / name, src / name)
    for name in ("lora_core", "kernels"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
    subprocess.run([*pip_wheel, "-w", str(tmp_path), str(src)], check=True)
    (wheel,) = tmp_path.glob("lora_core-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {n.split("/")[0] for n in names}
    assert top_level == {"lora_core", f"lora_core-{lora_core.__version__}.dist-info"}, top_level
    assert "lora_core/kernels/__init__.py" in names
    assert "lora_core/py.typed" in names
