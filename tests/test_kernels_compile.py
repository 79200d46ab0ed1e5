"""The compile gate: every kernel configuration the launchers can choose compiles for sm_80 and sm_90a.

No GPU needed: Triton compiles for a target it cannot see and runs its bundled ptxas (see
``lora_core.kernels.compile_check``). A configuration fails the gate when it does not compile, spills
registers, or needs more shared memory than a block may have on that architecture (A100: 163 KiB,
H100/H200: 227 KiB); the launchers must choose another configuration there instead.

The matrix runs in a subprocess: this test session runs Triton in interpreter mode (conftest), which
replaces ``@triton.jit`` functions by interpreted ones that cannot be compiled. It gets a fresh Triton
cache (nothing is reused across runs) and compiles on every core; about 2 × 100 distinct kernels, a few
minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.triton

compile_check = pytest.importorskip("lora_core.kernels.compile_check")


def test_gate_refuses_spills_and_too_much_shared_memory() -> None:
    fits = {"num_warps": 4, "regs": 96, "spill_stores": 0, "spill_loads": 0, "shared": 1024}
    ok = compile_check.Result("k", 80, {}, "-", **fits)
    assert compile_check.problems(ok) == []
    spill = compile_check.Result("k", 90, {}, "-", num_warps=4, regs=255, spill_stores=8, spill_loads=8)
    assert "spills" in compile_check.problems(spill)[0]
    # 172 KiB fits an H100's 227 KiB but not an A100's 163 KiB
    big = {"num_warps": 4, "regs": 128, "spill_stores": 0, "spill_loads": 0, "shared": 172 * 1024}
    assert compile_check.problems(compile_check.Result("k", 90, {}, "-", **big)) == []
    assert "shared memory" in compile_check.problems(compile_check.Result("k", 80, {}, "-", **big))[0]
    failed = compile_check.Result("k", 90, {}, "-", error="CompilationError: ...")
    assert "does not compile" in compile_check.problems(failed)[0]


def test_cases_cover_what_the_launchers_choose() -> None:
    """The enumeration reaches every BLOCK_M, both paths of M, every dtype and block size."""
    from lora_core.kernels import nf4_gemm

    cases = compile_check.cases()
    assert compile_check.block_sizes() == [16, 32, 64, 128, 256, 512, 1024, 2048, 4096]
    ms = {c.m for c in cases if c.op != "dequantize"}
    fused = [m for m in ms if m <= nf4_gemm.FUSED_MAX_M]
    block_ms = {nf4_gemm._config(m, 4096, 4096, torch.device("cpu"), False)["BLOCK_M"] for m in fused}
    assert block_ms == set(nf4_gemm.BLOCK_MS) and max(ms) > nf4_gemm.FUSED_MAX_M
    assert {c.dtype for c in cases} == {"float16", "bfloat16", "float32"}
    assert {c.k % 8 != 0 for c in cases} == {True, False} and {c.bias for c in cases} == {True, False}
    # the per-row LoRA kernels: every dtype × rank tile, for both kernels
    from lora_core.kernels import lora_mixed

    mixed = {(c.op, c.dtype, lora_mixed.block_r(c.n)) for c in cases if c.op.startswith("mixed")}
    assert len(mixed) == 2 * len(lora_mixed.SUPPORTED_DTYPES) * len(lora_mixed.BLOCK_RS)


def test_every_configuration_compiles_without_spills_within_shared_memory(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # fresh: nothing cached across runs
    out = tmp_path / "gate.json"
    cmd = [sys.executable, "-m", "lora_core.kernels.compile_check", "--arch", "80,90", "--json", str(out),
           "--jobs", str(os.cpu_count() or 1)]  # fmt: skip
    # cwd: anywhere but the repository root, whose kernels/ folder must not shadow anything
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800)
    summary = [line for line in proc.stdout.splitlines() if "distinct kernels" in line or "PROBLEM" in line]
    assert proc.returncode == 0, "\n".join(summary) or proc.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = report["results"]
    names = ("_nf4_dequant_kernel", "nf4_matmul_kernel", "nf4_matmul_grad_kernel",  # split-K: one launch
             "_lora_shrink_kernel", "_lora_expand_kernel")  # fmt: skip
    assert {(r["arch"], r["kernel"]) for r in rows} == {(arch, k) for arch in (80, 90) for k in names}
    assert all(r["regs"] > 0 and not r["problems"] for r in rows)
