"""The figure scripts in docs/scripts/ run and write valid PNGs (into a temporary directory).

Each script is run as a real subprocess, the way a reader regenerates the committed figures:
``python docs/scripts/make_<topic>_figures.py --out DIR``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "docs" / "scripts"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

EXPECTED = {
    "make_lora_figures.py": ["lora_spectrum.png", "lora_rank_error.png"],
    "make_nf4_figures.py": ["nf4_codes.png", "nf4_error_hist.png"],
}


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from the IHDR chunk, after checking the PNG signature."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path.name} is not a PNG"
    assert data[12:16] == b"IHDR", f"{path.name} has no IHDR chunk first"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


@pytest.mark.parametrize("script", sorted(EXPECTED))
def test_figure_script_writes_pngs(script: str, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    result = subprocess.run(
        [sys.executable, str(SCRIPTS / script), "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=900, env={**os.environ, "MPLBACKEND": "Agg"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    for name in EXPECTED[script]:
        width, height = png_size(tmp_path / name)
        assert width >= 400 and height >= 300, f"{name} is only {width}×{height}"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(EXPECTED[script])


def test_committed_figures_are_the_ones_the_scripts_write() -> None:
    committed = {p.name for p in (REPO / "docs" / "figures").glob("*.png")}
    expected = {name for names in EXPECTED.values() for name in names}
    assert expected <= committed, f"run the scripts in docs/scripts/: missing {expected - committed}"


TABLE_SCRIPTS = {"make_plan_table.py": "test_planner.py"}  # scripts writing a table into a doc: tested there


def test_every_figure_script_is_tested() -> None:
    assert {p.name for p in SCRIPTS.glob("make_*.py")} == set(EXPECTED) | set(TABLE_SCRIPTS)
    for script, test in TABLE_SCRIPTS.items():
        assert script in (REPO / "tests" / test).read_text(), f"{test} does not check {script}"


def test_png_check_rejects_non_png(tmp_path: Path) -> None:
    fake = tmp_path / "fake.png"
    fake.write_bytes(b"GIF89a" + bytes(30))
    with pytest.raises(AssertionError, match="not a PNG"):
        png_size(fake)
