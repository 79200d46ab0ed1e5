"""A real training process killed with SIGKILL mid-run and resumed ends exactly where an uninterrupted
run ends: same data order, optimizer, scheduler and RNG (dropout is on, so the RNG matters)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

WORKER = Path(__file__).resolve().parent / "train_worker.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run_worker(out: Path, *args: str) -> None:
    cmd = [sys.executable, str(WORKER), "--out", str(out), "--steps", "10", "--checkpoint-every", "3", *args]
    subprocess.run(cmd, check=True, env=ENV, capture_output=True, timeout=900)


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_same_final_weights(tmp_path: Path) -> None:
    run_worker(tmp_path / "full")
    expected = load_file(str(tmp_path / "full" / "final.safetensors"))

    killed = tmp_path / "killed"
    cmd = [
        sys.executable,
        str(WORKER),
        "--out",
        str(killed),
        "--steps",
        "10",
        "--checkpoint-every",
        "3",
        "--print-steps",
        "--hang-after",
        "5",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        for line in proc.stdout:  # step 5 is past the checkpoint at 3, before the one at 6
            if line.strip() == "step 5":
                proc.send_signal(signal.SIGKILL)
                break
        proc.wait(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()
    assert not (killed / "final.safetensors").exists()
    assert (killed / "run" / "checkpoint.pt").exists()
    assert not [p.name for p in (killed / "run").iterdir() if p.name.startswith(".")]  # no .NAME.*.tmp

    run_worker(killed, "--resume")
    resumed = load_file(str(killed / "final.safetensors"))
    assert sorted(resumed) == sorted(expected)
    for name, tensor in expected.items():
        assert (resumed[name] == tensor).all(), f"{name} differs after resume"


def test_rng_state_round_trip_includes_pythons_cached_gaussian() -> None:
    import random

    import torch

    from lora_core.training.state import _rng_state, _set_rng_state

    random.gauss(0.0, 1.0)  # draws a pair and caches the second value: part of the state
    saved = _rng_state()
    expected = [random.gauss(0.0, 1.0), random.random(), float(torch.rand(()))]
    torch.manual_seed(123)
    random.seed(123)
    _set_rng_state(saved)
    assert [random.gauss(0.0, 1.0), random.random(), float(torch.rand(()))] == expected


def _tiny_run(out: Path, **kw: object) -> tuple[object, object]:
    import torch

    import lora_core as lc
    from lora_core.training.data import PackedDataset

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, lc.TinyConfig().vocab_size, (16, 12), generator=gen)
    data = PackedDataset(ids, ids.clone())
    kw = {"lr": 1e-2, "batch_size": 4, "max_steps": 2, "checkpoint_every": 2, "progress": False, **kw}
    cfg = lc.TrainConfig(output_dir=out, **kw)
    return data, cfg


def _tamper(state: dict, case: str) -> dict:
    import torch

    last = list(state["trainable"])[-1]  # the last parameter: the others would be copied first
    if case == "wrong_shape":
        state["trainable"][last] = torch.zeros(3)
    elif case == "wrong_dtype":
        state["trainable"][last] = state["trainable"][last].double()
    elif case == "nan_weight":
        state["trainable"][last] = state["trainable"][last] * float("nan")
    elif case == "optimizer_groups":
        state["optimizer"]["param_groups"] = state["optimizer"]["param_groups"][:1] * 3
    elif case == "optimizer_moment_shape":
        pid = max(state["optimizer"]["state"])
        state["optimizer"]["state"][pid]["exp_avg"] = torch.zeros(2, 2)
    elif case == "rng":
        state["rng"] = [{"torch": torch.zeros(3), "cuda": [], "python": [1, 2]}]
    elif case == "history":
        state["history"] = "{not json"
    elif case == "missing_field":
        del state["scheduler"]
    return state


@pytest.mark.parametrize(
    "case",
    ["wrong_shape", "wrong_dtype", "nan_weight", "optimizer_groups", "optimizer_moment_shape", "rng",
     "history", "missing_field", "empty_file", "garbage_bytes", "truncated", "another_object"],
)  # fmt: skip
def test_a_bad_checkpoint_is_refused_before_the_model_changes(tmp_path: Path, case: str) -> None:
    import torch

    import lora_core as lc
    from lora_core.training.state import CHECKPOINT_NAME

    data, cfg = _tiny_run(tmp_path)
    lc.train(lc.TinyCausalLM(), data, config=cfg)
    ckpt = tmp_path / CHECKPOINT_NAME
    raw = ckpt.read_bytes()
    if case == "empty_file":
        ckpt.write_bytes(b"")
    elif case == "garbage_bytes":
        ckpt.write_bytes(b"not a checkpoint" * 64)
    elif case == "truncated":
        ckpt.write_bytes(raw[: len(raw) // 2])
    elif case == "another_object":
        torch.save([1, 2, 3], ckpt)
    else:
        torch.save(_tamper(torch.load(ckpt, weights_only=True), case), ckpt)
    model = lc.TinyCausalLM()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _, resume_cfg = _tiny_run(tmp_path, resume=True)
    with pytest.raises(ValueError, match=str(ckpt)):
        lc.train(model, data, config=resume_cfg)
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name
