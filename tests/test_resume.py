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
    subprocess.run(cmd, check=True, env=ENV, capture_output=True, timeout=120)


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
