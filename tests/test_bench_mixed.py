"""The mixed-batch benchmark (``lora-core bench mixed``) runs on the CPU at its tiny size and writes its
JSON (every case timed, the ratios), table and plot; its mixed outputs agree with PEFT's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lora_core.bench import mixed as bench

pytest.importorskip("peft")


def test_tiny_run_writes_ratios(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--device", "cpu", "--size", "tiny", "--warmup", "0", "--reps", "1", "--out", str(tmp_path)]
    assert bench.main(argv) == 0
    data = json.loads((tmp_path / "bench_mixed_tiny_cpu.json").read_text())
    meta, rows = data["meta"], data["results"]
    assert meta["adapters"] == 8 and meta["r"] == 16 and meta["size"] == "tiny"
    assert [r["pass"] for r in rows] == ["forward", "forward+backward"]
    for r in rows:
        assert set(r["ms"]) == set(bench.CASES) and all(v > 0 for v in r["ms"].values())
        assert set(r["ratios"]) == set(bench.RATIOS)
        assert r["ratios"]["mixed/single"] == pytest.approx(r["ms"]["mixed"] / r["ms"]["single"])
    # ours and PEFT compute the same mixed batch; and the adapters matter (mixed ≠ a0 for every row)
    assert meta["max_abs_diff_mixed"] < 1e-4 < meta["max_abs_diff_mixed_vs_single"]
    table = (tmp_path / "bench_mixed_tiny_cpu.md").read_text()
    assert "mixed/single" in table and "forward+backward" in table
    assert "mixed/single" in capsys.readouterr().out
    if (tmp_path / "bench_mixed_tiny_cpu.png").exists():
        assert (tmp_path / "bench_mixed_tiny_cpu.png").read_bytes()[:4] == b"\x89PNG"


def test_bad_arguments_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main(["--device", "cpu", "--adapters", "0", "--out", str(tmp_path)]) == 2
    assert "--adapters" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.build_parser().parse_args(["--size", "huge"])
