"""bench_e2e: the CPU smoke run as a real subprocess (JSON fields, PNG), the refusal without CUDA, the
target bookkeeping on hand-made rows, and ``apply_lora(device=...)`` (case a's layer-by-layer quantize)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lora_core.bench import e2e as bench_e2e

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "bench_e2e.py"
GLIBC = sys.platform.startswith("linux") and os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")


def cases_that_ran(meta: dict, rows: list, proc: subprocess.CompletedProcess) -> dict:
    """The four cases' rows by name, after checking that every case that must run on a CPU ran — lora_core's
    and PEFT's LoRA always, bitsandbytes' where it can — and that the exit status says whether all did."""
    by = {r["case"]: r for r in rows}
    assert list(by) == ["a", "b", "c", "d"]
    must_run = ["a", "c", "d"] + (["b"] if _bnb_cpu() else [])
    assert set(must_run) <= set(meta["ran"]), (meta["skipped"], proc.stderr[-2000:])
    assert proc.returncode == (0 if len(meta["ran"]) == 4 else 1), proc.stderr[-2000:]
    return by


def test_cpu_tiny_smoke_run_writes_json_and_png(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--tiny", "--steps", "1", "--warmup", "1",
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=900, cwd=tmp_path,
    )  # fmt: skip
    data = json.loads((tmp_path / "bench_e2e_tiny.json").read_text())
    meta, rows = data["meta"], data["results"]
    assert meta["case"] == "tiny" and meta["device"].startswith("CPU")
    for pkg in ("torch", "transformers", "peft", "bitsandbytes", "lora-core"):
        assert pkg in meta["versions"]
    assert meta["model"]["hidden_size"] == 64 and meta["r"] == 16 and meta["alpha"] == 32.0
    assert meta["target_modules"] == bench_e2e.TARGET_MODULES
    by = cases_that_ran(meta, rows, proc)
    for key in meta["ran"]:
        r = by[key]
        assert r["tokens_per_s"] > 0 and len(r["step_ms"]) == 1 and r["peak_gib"] is None
        assert math.isfinite(r["loss_first"]) and abs(r["loss_first"] - math.log(512)) < 1.0
        assert r["trainable_params"] == by["a"]["trainable_params"]  # same adapters in every case
    # same random model: PEFT and lora_core see the same base (a vs b: same NF4 weights)
    assert meta["loss_agreement"]["c_vs_d"] < 2e-2
    if "b" in meta["ran"]:
        assert meta["loss_agreement"]["a_vs_b"] < 2e-2
        assert by["b"]["dtypes"]["lm_head"] == "float32"  # prepare_model_for_kbit_training's upcast
    assert by["a"]["dtypes"]["lm_head"] == "bfloat16"
    assert meta["targets"] == []  # no targets for the smoke run
    assert (tmp_path / "bench_e2e_tiny.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "tokens/s" in proc.stdout and "wrote" in proc.stdout
    assert not list(tmp_path.glob(".*"))  # no temp files left behind


def test_cpu_harness_runs_each_case_in_its_own_process_and_writes_json(tmp_path: Path) -> None:
    """``--device cpu --model tiny``: the real-model CPU harness (one process per case, interleaved rounds,
    peak RSS per process) on the 2-layer random Llama; the JSON holds what the report needs."""
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--model", "tiny", "--steps", "2", "--rounds", "2",
         "--warmup", "1", "--threads", "1", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=900, cwd=tmp_path,
    )  # fmt: skip
    data = json.loads((tmp_path / "bench_e2e_tiny.json").read_text())
    meta, rows = data["meta"], data["results"]
    assert meta["case"] == "tiny" and meta["device"].startswith("CPU") and meta["dtype"] == "float32"
    assert meta["cases"]["c"] == "lora_core fp32 LoRA" and meta["cases"]["d"] == "PEFT fp32 LoRA"
    assert (meta["rounds"], meta["steps_per_round"], meta["steps"], meta["threads"]) == (2, 1, 2, 1)
    assert len(meta["load_average_before"]) == 3 and meta["targets"] == []
    by = cases_that_ran(meta, rows, proc)
    for key in meta["ran"]:
        r = by[key]
        assert r["threads"] == 1 and len(r["step_ms"]) == 2 and len(r["tokens_per_s_rounds"]) == 2
        assert r["tokens_per_s"] > 0 and r["tokens_per_s_min"] <= r["tokens_per_s_max"]
        assert 0 < r["rss_after_load_gib"] <= r["peak_gib"] < 64  # the process's own resident set, in GiB
        assert r["cpu_s_per_step_median"] > 0 and r["dtypes"]["lm_head"] == "float32"
        assert math.isfinite(r["loss_first"]) and abs(r["loss_first"] - math.log(512)) < 1.0
        assert r["trainable_params"] == by["a"]["trainable_params"]
        if GLIBC:  # lc.train's malloc setting for the lora_core cases, glibc's default for PEFT's
            assert r["malloc"] == ("kept freed memory" if key in "ac" else "glibc's default"), key
    assert meta["keep_freed_memory"] == "lora_core"
    assert meta["loss_agreement"]["c_vs_d"] < 1e-3  # float32: the same model, batches and (zero-B) adapters
    assert meta["ratios"]["c_over_d"]["min_round"] <= meta["ratios"]["c_over_d"]["max_round"]
    if "b" in meta["ran"]:
        assert meta["loss_agreement"]["a_vs_b"] < 1e-3  # bitsandbytes' NF4 bytes are ours
    assert (tmp_path / "bench_e2e_tiny.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "a/b" in proc.stdout and "wrote" in proc.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench_e2e_tiny.json", "bench_e2e_tiny.png"]


def test_targets_smollm2_cpu_case() -> None:
    rows = [_row("a", 120, 1.9), _row("b", 100, 2.5), _row("c", 111, 1.9), _row("d", 100, 2.4)]
    assert [c["passed"] for c in bench_e2e.evaluate_targets("smollm2", rows)] == [True, True, True, True]
    rows = [_row("a", 119, 1.9), _row("b", 100, 2.5), _row("c", 120, 2.5), _row("d", 100, 2.4)]
    assert [c["passed"] for c in bench_e2e.evaluate_targets("smollm2", rows)] == [False, True, True, False]


def _bnb_cpu() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
@pytest.mark.parametrize(
    ("argv", "message"),
    [([], "needs a CUDA GPU"), (["--case", "7b"], "needs a CUDA GPU"), (["--device", "cpu"], "--tiny"),
     (["--model", "smollm2"], "--device cpu"), (["--device", "cpu", "--model", "tiny", "--tiny"], "--tiny"),
     (["--device", "cpu", "--model", "tiny", "--steps", "2", "--rounds", "3"], "--rounds")],
)  # fmt: skip
def test_refuses_cleanly(argv: list[str], message: str, tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT), *argv, "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=900, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())  # nothing written


def _row(case: str, tok_s: float, peak: float, loss: float = 10.0) -> dict:
    return {"case": case, "ran": True, "tokens_per_s": tok_s, "peak_gib": peak, "loss_first": loss}


def test_targets_default_case() -> None:
    ok = bench_e2e.evaluate_targets("default", [_row("a", 53_000, 8.0), _row("b", 40_000, 8.76)])
    assert [c["passed"] for c in ok] == [True, True] and ok[0]["value"] == pytest.approx(1.325)
    slow = bench_e2e.evaluate_targets("default", [_row("a", 50_000, 8.0), _row("b", 40_000, 8.76)])
    assert [c["passed"] for c in slow] == [False, True]  # 1.25× < 1.3×
    fat = bench_e2e.evaluate_targets("default", [_row("a", 60_000, 8.9), _row("b", 40_000, 8.76)])
    assert [c["passed"] for c in fat] == [True, False]
    missing = bench_e2e.evaluate_targets("default", [_row("a", 60_000, 8.0), {"case": "b", "ran": False}])
    assert [c["passed"] for c in missing] == [None, None]


def test_targets_7b_case_are_strict() -> None:
    tie = bench_e2e.evaluate_targets("7b", [_row("a", 2650, 5.38), _row("b", 2650, 5.38)])
    assert [c["passed"] for c in tie] == [False, False]
    win = bench_e2e.evaluate_targets("7b", [_row("a", 3000, 5.0), _row("b", 2650, 5.38)])
    assert [c["passed"] for c in win] == [True, True]
    table = bench_e2e.format_table("7b", [_row("a", 3000, 5.0) | {"label": "x", "step_ms_median": 1.0,
                                   "load_peak_gib": 1.0, "trainable_params": 3}], win)  # fmt: skip
    assert "PASS" in table and "3,000" in table


def test_loss_agreement_pairs() -> None:
    rows = [_row("a", 1, 1, 10.0), _row("b", 1, 1, 10.01), _row("c", 1, 1, 9.9), {"case": "d", "ran": False}]
    agree = bench_e2e.loss_agreement(rows)
    assert agree["a_vs_b"] == pytest.approx(0.01) and agree["c_vs_d"] is None
    assert agree["a_vs_c"] == pytest.approx(0.1)


def test_apply_lora_device_moves_each_layer_then_the_rest() -> None:
    """``apply_lora(model, cfg, device=d)`` gives the model a plain ``apply_lora`` + ``.to(d)`` gives, and
    rejects a bad device before touching the model."""
    from torch import nn

    from lora_core import LoraConfig, apply_lora

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    twin = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    twin.load_state_dict(model.state_dict())
    cfg = LoraConfig(r=2, alpha=4, target_modules=["0", "2"], quantize="nf4")
    with pytest.raises(ValueError, match="device"):
        apply_lora(model, cfg, device="no-such-device")
    assert isinstance(model[0], nn.Linear)  # untouched
    torch.manual_seed(1)
    apply_lora(model, cfg, device="cpu")
    torch.manual_seed(1)
    apply_lora(twin, cfg)
    x = torch.randn(3, 8)
    assert torch.equal(model(x), twin(x))
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        n for n, p in twin.named_parameters() if p.requires_grad
    ]


@pytest.mark.gpu
def test_apply_lora_device_quantizes_without_the_dense_model_on_the_gpu() -> None:
    """QLoRA from a CPU model: the GPU peak during ``apply_lora(device="cuda")`` stays below the dense bf16
    model's size (it holds the 4-bit weights plus one dense layer)."""
    from torch import nn

    from lora_core import LoraConfig, apply_lora

    # 64 small layers: quantize_nf4's transient (≈ 20 bytes/element) for one layer stays well below the model
    model = nn.Sequential(*[nn.Linear(512, 512, bias=False) for _ in range(64)]).to(torch.bfloat16)
    dense_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    apply_lora(model, LoraConfig(r=8, alpha=16, target_modules=r"\d+", quantize="nf4"), device="cuda")
    peak = torch.cuda.max_memory_allocated() - base
    assert peak < 0.6 * dense_bytes, (peak, dense_bytes)
    assert model(torch.randn(2, 512, device="cuda", dtype=torch.bfloat16)).is_cuda
