"""FSDP2 over the frozen base (``TrainConfig(fsdp=True)``, ``lora-core finetune --fsdp``): real torchrun
subprocesses, 2 CPU processes on gloo (127.0.0.1 only), the tiny model (``tests/train_worker.py``).

- Two sharded ranks train exactly what one process trains with the same global batch (dense and NF4 bases,
  LoRA and DoRA), while each rank holds half of the frozen bytes.
- A rank killed with SIGKILL mid-run, resumed: the same adapter as an uninterrupted sharded run.
- The commands of docs/training.md's "More than one GPU" section run as written.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_ddp import free_port
from tolerances import assert_close

import lora_core as lc

REPO = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "train_worker.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "LORA_CORE_DEBUG": ""}
VARIANTS = ("dense-lora", "nf4-lora", "dense-dora", "nf4-dora")


def torchrun(nproc: int = 2) -> list[str]:
    """``torchrun --nproc-per-node N`` on this interpreter, on a free local port."""
    port = str(free_port())
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(nproc),
            "--master-addr", "127.0.0.1", "--master-port", port]  # fmt: skip


def run(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(cmd, env=ENV, cwd=cwd, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def report(folder: Path, rank: int) -> dict:
    return json.loads((folder / f"report-rank{rank}.json").read_text())


@pytest.mark.slow
def test_two_sharded_ranks_equal_one_process_and_each_holds_half_the_base(tmp_path: Path) -> None:
    common = ["--variant", ",".join(VARIANTS), "--steps", "3", "--dropout", "0.0", "--grad-accum", "2"]
    # 2 ranks × batch 2 × accumulation 2 = 1 process × batch 4 × accumulation 2; checkpointing and the
    # offload policy ride along (neither changes the math; on a CPU the offload moves nothing).
    sharded = ["--fsdp", "--gradient-checkpointing", "--cpu-offload", "--batch-size", "2"]
    run([*torchrun(), str(WORKER), "--out", str(tmp_path / "fsdp"), *common, *sharded])
    run([sys.executable, str(WORKER), "--out", str(tmp_path / "one"), *common, "--batch-size", "4"])

    for variant in VARIANTS:
        fsdp, one = tmp_path / "fsdp" / variant, tmp_path / "one" / variant
        rank0 = load_file(str(fsdp / "final-rank0.safetensors"))
        rank1 = load_file(str(fsdp / "final-rank1.safetensors"))
        single = load_file(str(one / "final.safetensors"))
        assert sorted(rank0) == sorted(single) and len(single) > 0
        for name in single:  # without the gradient average the ranks would see different data and drift
            assert torch.equal(rank0[name], rank1[name]), f"{variant}: ranks disagree on {name}"
            assert_close(rank0[name], single[name])
        assert any(bool(t.abs().sum() > 0) for n, t in single.items() if "lora_B" in n)  # it trained
        losses = [torch.tensor(report(fsdp, r)["losses"]) for r in (0, 1)]
        assert len(losses[0]) == 3 and torch.equal(losses[0], losses[1])
        assert_close(losses[0], torch.tensor(report(one, 0)["losses"]))
        evals = [torch.tensor(report(folder, 0)["eval_loss"]) for folder in (fsdp, one)]
        assert_close(*evals)  # lc.evaluate after training, 5 examples: 3 on one rank, 2 on the other

        keys = report(fsdp, 0)["state_dict_keys"]  # NF4: the shards, not entries built from freed tensors
        packed = [k for k in keys if k.endswith("q_proj.fsdp_base_packed")]
        assert len(packed) == (2 if variant.startswith("nf4") else 0), keys
        assert not [k for k in keys if k.endswith("q_proj.weight.absmax")], keys
        whole = report(one, 0)["frozen_bytes_after"]  # the single process: every frozen byte, unsharded
        assert report(one, 0)["frozen_bytes_before"] == whole
        held = [report(fsdp, r)["frozen_bytes_after"] for r in (0, 1)]
        assert all(report(fsdp, r)["frozen_bytes_before"] == whole for r in (0, 1))
        # each rank keeps its half: no whole copy of a layer survives the step (the gathered ones are freed)
        assert whole <= sum(held) <= whole + 64 * 8, (variant, held, whole)  # 64 tensors × ≤ 8 B of padding
        assert all(abs(h - whole / 2) <= 0.01 * whole for h in held), (variant, held, whole)


@pytest.mark.slow
def test_sigkill_one_sharded_rank_then_resume_gives_the_uninterrupted_adapter(tmp_path: Path) -> None:
    # Dropout on, so the per-rank RNG states in the checkpoint matter; NF4 base, the QLoRA case.
    common = [
        "--variant",
        "nf4-lora",
        "--fsdp",
        "--steps",
        "8",
        "--checkpoint-every",
        "3",
        "--batch-size",
        "2",
    ]
    run([*torchrun(), str(WORKER), "--out", str(tmp_path / "full"), *common])
    expected = load_file(str(tmp_path / "full" / "nf4-lora" / "final-rank0.safetensors"))

    killed = tmp_path / "killed"
    cmd = [*torchrun(), str(WORKER), "--out", str(killed), *common, "--print-steps", "--hang-after", "5"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=ENV)
    try:
        for line in proc.stdout:  # rank 0 hangs after step 5: past the checkpoint at 3, before the one at 6
            if found := re.fullmatch(r"hanging pid (\d+)", line.strip()):
                os.kill(int(found.group(1)), signal.SIGKILL)  # rank 0 only; torchrun then stops rank 1
                break
        proc.wait(timeout=120)
    finally:
        proc.kill()
    run_dir = killed / "nf4-lora"
    assert found and proc.returncode != 0
    assert not list(run_dir.glob("final*.safetensors"))
    assert torch.load(run_dir / "run" / "checkpoint.pt", weights_only=True)["step"] == 3

    run([*torchrun(), str(WORKER), "--out", str(killed), *common, "--resume"])
    resumed = load_file(str(run_dir / "final-rank0.safetensors"))
    assert sorted(resumed) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(resumed[name], tensor), f"{name} differs after resume"


def section(doc: Path, title: str) -> str:
    text = doc.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


@pytest.mark.slow
def test_the_docs_multi_gpu_commands_run_as_written(tmp_path: Path) -> None:
    """Every ``torchrun`` line of docs/training.md's "More than one GPU" section, in order, in one folder
    (a python block whose first line is ``# NAME.py`` is saved there as NAME.py first)."""
    text = section(REPO / "docs" / "training.md", "More than one GPU")
    for block in re.findall(r"^```python\n(.*?)^```", text, re.DOTALL | re.MULTILINE):
        if name := re.fullmatch(r"# (\w+\.py)", block.splitlines()[0]):
            (tmp_path / name.group(1)).write_text(block)
    commands = [line for line in re.findall(r"^```bash\n(.*?)^```", text, re.DOTALL | re.MULTILINE)]
    lines = [ln.strip() for block in commands for ln in block.splitlines() if ln.startswith("torchrun ")]
    assert len(lines) >= 3, lines
    for line in lines:
        args = line.split()[1:]
        result = run([*torchrun(int(args[args.index("--nproc-per-node") + 1])), *args[2:]], cwd=tmp_path)
        if "finetune" in args:  # the run's report is printed once (rank 0), not once per rank
            for line in ("held-out loss before", "sample after", "wrote "):
                assert result.stderr.count(line) == 1, (line, result.stderr[-2000:])
    adapter = tmp_path / "runs" / "fsdp" / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "adapter_config.json").is_file()
    model = lc.load_adapter(lc.TinyCausalLM(seed=0), adapter)  # rank 0's save, in PEFT's layout
    trained = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert trained and any(bool(p.abs().sum() > 0) for p in trained)  # B starts at zero: it trained
    assert (tmp_path / "runs" / "fsdp-api" / "adapter" / "adapter_model.safetensors").is_file()


def test_fsdp_settings_are_checked() -> None:
    with pytest.raises(ValueError, match=r"cpu_offload.*fsdp=True"):
        lc.TrainConfig(cpu_offload=True)
    with pytest.raises(TypeError, match=r"TrainConfig\.fsdp"):
        lc.TrainConfig(fsdp="yes")
    from lora_core.training.fsdp import shard_model

    with pytest.raises(ValueError, match="torchrun"):
        shard_model(lc.TinyCausalLM())


def test_one_process_with_fsdp_trains_as_without(tmp_path: Path) -> None:
    """One process has nothing to shard: ``fsdp=True`` is accepted and changes nothing."""
    ids = torch.randint(0, lc.TinyConfig().vocab_size, (8, 12), generator=torch.Generator().manual_seed(0))
    from lora_core.training.data import PackedDataset

    data, out = PackedDataset(ids, ids.clone()), {}
    for fsdp in (False, True):
        model = lc.apply_lora(
            lc.TinyCausalLM(seed=0), lc.LoraConfig(r=2, alpha=4, target_modules="all-linear")
        )
        cfg = lc.TrainConfig(lr=1e-2, batch_size=4, max_steps=2, progress=False, fsdp=fsdp, cpu_offload=fsdp)
        lc.train(model, data, config=cfg)
        out[fsdp] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for name, p in out[False].items():
        assert torch.equal(p, out[True][name]), name


def test_cpu_offload_without_fsdp_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    from lora_core.cli import main

    assert main(["finetune", "--model", "tiny", "--cpu-offload"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lora-core: error:") and err.count("\n") == 1 and "--fsdp" in err, err


@pytest.mark.parametrize("quantize", ["none", "nf4"])
def test_units_are_the_decoder_blocks_embeddings_and_head(quantize: str) -> None:
    from lora_core.training.fsdp import fsdp_units

    cfg = lc.LoraConfig(r=2, alpha=4, target_modules=["q_proj", "lm_head"], quantize=quantize)
    model = lc.apply_lora(lc.TinyCausalLM(seed=0), cfg)
    # the blocks, then the embeddings and the (adapted) head, each a unit of its own; the final norm: root
    expected = [*model.model.layers, model.model.embed_tokens, model.model.embed_positions, model.lm_head]
    assert sorted(map(id, fsdp_units(model))) == sorted(map(id, expected))


def test_tied_embeddings_stay_in_the_root_unit() -> None:
    from lora_core.training.fsdp import fsdp_units

    model = lc.apply_lora(lc.TinyCausalLM(seed=0), lc.LoraConfig(r=2, alpha=4, target_modules=["q_proj"]))
    model.lm_head.weight = model.model.embed_tokens.weight  # one Parameter, two modules: one unit holds it
    expected = [*model.model.layers, model.model.embed_positions]
    assert sorted(map(id, fsdp_units(model))) == sorted(map(id, expected))
