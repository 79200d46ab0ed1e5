"""benchmarks/gpu_check.sh stays runnable on the GPU machine that has never run it.

No GPU has been lent to this project yet, so the script is only ever run there for the first time, with
minutes of device time: a benchmark flag renamed since, or step limits that outgrow the 8-minute budget,
would waste that run. Checked here without a GPU: every `lora-core bench` step's arguments parse with that
suite's own parser, the pytest step selects real `gpu` tests, the limits fit the budget, and on a machine
without CUDA the script stops at once (exit 2), writing only its summary, where it was told to.
"""

from __future__ import annotations

import importlib
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def _steps() -> list[tuple[str, int, str]]:
    """(name, limit in seconds, the command string) of each ``step NAME SECONDS bash -c "..."`` call."""
    text = SCRIPT.read_text().replace("\\\n", " ")  # join continued lines
    found = re.findall(r'^step "([^"]+)" (\d+) bash -c "(.*)"$', text, flags=re.MULTILINE)
    return [(name, int(limit), command) for name, limit, command in found]


def _budget() -> int:
    return int(re.search(r"^BUDGET=(\d+)", SCRIPT.read_text(), flags=re.MULTILINE).group(1))


def test_the_steps_fit_the_eight_minute_budget() -> None:
    steps = _steps()
    assert [name for name, _, _ in steps] == [
        "pytest -m gpu", "bench kernels", "bench layer", "bench e2e", "bench mixed"
    ]  # fmt: skip
    assert _budget() <= 480
    assert sum(limit for _, limit, _ in steps) <= _budget()


def test_every_bench_step_parses_with_its_suite_parser() -> None:
    from lora_core.cli import BENCH_SUITES

    benches = [(name, command) for name, _, command in _steps() if "lora_core.cli bench" in command]
    assert len(benches) == 4
    for name, command in benches:
        words = shlex.split(command.split("lora_core.cli bench", 1)[1].replace("'$RESULTS'", "/tmp/r"))
        suite, argv = words[0], words[1:]
        assert name == f"bench {suite}"
        parser = importlib.import_module(BENCH_SUITES[suite]).build_parser()
        args = parser.parse_args(argv)  # argparse exits (SystemExit) on a flag the suite no longer has
        assert str(args.out) == "/tmp/r", name


def test_the_pytest_step_selects_gpu_tests() -> None:
    (command,) = [command for name, _, command in _steps() if name == "pytest -m gpu"]
    assert "-m gpu" in command
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-c", str(ROOT / "pyproject.toml"), "--rootdir", str(ROOT),
         "-q", "-p", "no:cacheprovider", "-m", "gpu", "--collect-only", str(ROOT / "tests")],
        capture_output=True, text=True, cwd="/", timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    collected = re.search(r"(\d+)/\d+ tests collected", done.stdout)
    assert collected and int(collected.group(1)) >= 10, done.stdout[-500:]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the script's answer on a machine without CUDA")
def test_without_cuda_it_stops_at_once_and_writes_only_its_summary(tmp_path: Path) -> None:
    results = tmp_path / "results"
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_RESULTS": str(results)}
    done = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=120)  # fmt: skip
    assert done.returncode == 2, done.stdout + done.stderr
    assert "no CUDA device" in done.stdout
    assert sorted(p.name for p in results.iterdir()) == ["gpu_check.log", "gpu_check_summary.txt"]
    assert "no CUDA device" in (results / "gpu_check_summary.txt").read_text()
    assert not (results / "gpu_check.log").read_text()  # nothing ran
