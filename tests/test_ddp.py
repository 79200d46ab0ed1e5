"""Distributed data parallel under torchrun: 2 CPU processes on gloo (127.0.0.1 only) end with identical
weights, equal to one process trained with the same global batch."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file
from tolerances import assert_close

WORKER = Path(__file__).resolve().parent / "train_worker.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_gloo_processes_equal_one_process_with_the_same_global_batch(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    common = ["--steps", "4", "--dropout", "0.0"]
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
    ]
    # 2 processes × batch 2 × accumulation 2 = global batch 8 = 1 process × batch 4 × accumulation 2.
    ddp = subprocess.run(
        [
            *torchrun,
            str(WORKER),
            "--out",
            str(tmp_path / "ddp"),
            "--batch-size",
            "2",
            "--grad-accum",
            "2",
            *common,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    single = subprocess.run(
        [
            sys.executable,
            str(WORKER),
            "--out",
            str(tmp_path / "one"),
            "--batch-size",
            "4",
            "--grad-accum",
            "2",
            *common,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert single.returncode == 0, single.stderr[-3000:]

    rank0 = load_file(str(tmp_path / "ddp" / "final-rank0.safetensors"))
    rank1 = load_file(str(tmp_path / "ddp" / "final-rank1.safetensors"))
    one = load_file(str(tmp_path / "one" / "final.safetensors"))
    assert sorted(rank0) == sorted(one)
    for name in one:  # without DDP's all-reduce the ranks would see different data and drift apart
        assert (rank0[name] == rank1[name]).all(), f"ranks disagree on {name}"
        assert_close(rank0[name], one[name])
