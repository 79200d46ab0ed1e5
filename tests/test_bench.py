"""The benchmark's bookkeeping (floor, table, JSON, plot) on fake timings, and its refusal without CUDA."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lora_core.bench import kernels as bench

META = {"device": "fake", "double_quant": True, "copy_gbs": 3000.0, "tflops": 800.0}
REPO = Path(__file__).resolve().parents[1]


def fake_records() -> list[dict]:
    recs = [{"op": "dequantize", "n": 8192, "k": 8192, "m": 0, "impl": "ours", "us": 60.0}]
    for m, base, ours in [(1, 61.0, 20.0), (16, 66.0, 25.0), (4096, 705.0, 760.0)]:
        for impl, us in [(bench.BASELINE, base), ("ours", ours), ("bitsandbytes", 2 * ours)]:
            recs.append({"op": "matmul", "n": 8192, "k": 8192, "m": m, "impl": impl, "us": us})
    return recs


def test_floor_matches_hand_count() -> None:
    # M=1, 8192²: 0.516 byte/param / 3 TB/s ≈ 11.3 µs (plus 48 KiB of x and out); flops are negligible
    fl = bench.floor_us("matmul", 8192, 8192, 1, True, 3000.0, 800.0)
    assert fl == pytest.approx((8192 * 8192 * (0.5 + 1 / 64 + 4 / 16384) + 2 * 2 * 8192) / 3e12 * 1e6)
    # M=4096: compute bound, 2·4096·8192² flops at 800 TFLOP/s ≈ 687 µs
    assert bench.floor_us("matmul", 8192, 8192, 4096, True, 3000.0, 800.0) == pytest.approx(
        2 * 4096 * 8192**2 / 800e12 * 1e6
    )


def test_summary_table_json_and_plot(tmp_path: Path) -> None:
    rows = bench.summarize(fake_records(), META)
    by = {(r["op"], r["m"], r["impl"]): r for r in rows}
    assert by[("matmul", 1, "ours")]["speedup_vs_cublas"] == pytest.approx(61.0 / 20.0)
    assert by[("matmul", 4096, "bitsandbytes")]["speedup_vs_cublas"] == pytest.approx(705.0 / 1520.0)
    assert by[("dequantize", 0, "ours")]["speedup_vs_cublas"] is None
    table = bench.format_table(rows)
    assert "3.05×" in table and "8192×8192" in table and len(table.splitlines()) == 2 + 4
    bench.write_json(tmp_path / "r.json", META, rows)
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["meta"]["device"] == "fake" and len(data["results"]) == len(rows)
    pytest.importorskip("matplotlib")
    assert bench.plot(tmp_path / "r.png", rows, META)
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "r.png"]  # no temp files left


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_refuses_without_cuda() -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_kernels.py"), "--m", "1"],
        capture_output=True, text=True, timeout=900, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 2 and "needs a CUDA GPU" in proc.stderr, proc.stderr


def test_bad_shape_argument() -> None:
    with pytest.raises(SystemExit):
        bench.build_parser().parse_args(["--shapes", "8192by8192"])


@pytest.mark.triton
def test_every_timed_callable_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """The benchmark's calls (ours, cuBLAS stand-in, reference, bitsandbytes) all run, on a tiny weight.

    On CPU this goes through the Triton interpreter: it checks the calls and their arguments, not speed.
    """
    import argparse

    pytest.importorskip("triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    seen: list[tuple[str, int, str]] = []

    def rec(op: str, m: int, impl: str, fn) -> None:
        out = fn()
        assert isinstance(out, torch.Tensor) and out.numel() > 0
        seen.append((op, m, impl))

    args = argparse.Namespace(ops=["dequantize", "matmul", "grad"], m=[1, 3], double_quant=True)
    bench._bench_weight(16, 128, args, rec, device=device)
    impls = {i for _, _, i in seen}
    assert {"ours", bench.BASELINE, "ours_fused", "ours_dequant_cublas", "torch_reference"} <= impls
    assert len([s for s in seen if s[0] == "grad"]) >= 2 * 4
