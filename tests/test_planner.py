"""The memory planner (`lc.plan_memory`, ``lora-core plan``) against what real models hold on the CPU.

Each figure is measured on a tiny transformers Llama with lora_core's adapters, not restated:
- weights: the bytes of every NF4 tensor and dense frozen parameter after ``apply_lora(quantize="nf4")``;
- adapters / gradients / optimizer: the trainable parameters, their ``.grad`` and ``torch.optim.AdamW``'s
  state after one step;
- activations: the tensors autograd saves (a ``saved_tensors_hooks`` pack hook, storages counted once) on
  lora_core's fused path (the CUDA path, forced on CPU with ``lc.fused_mode("always")``), and the peak of
  the live bytes of a whole forward + backward (a ``TorchDispatchMode`` that tracks every storage an op
  returns until it is freed: deterministic, no timing or allocator involved).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import lora_core as lc
from lora_core.training import planner
from lora_core.training.losses import causal_lm_loss

REPO = Path(__file__).resolve().parent.parent
SCRIPT = Path(sys.executable).parent / "lora-core"
ALL = planner.LINEARS
# Hidden 48 and intermediate 100: NF4 weights with a partial last 64-block and a partial nested block.
TINY = planner.ModelShape("tiny", 48, 100, 3, 4, 2, 97)
PEAK_LOW, PEAK_HIGH = 0.5, 1.2  # measured peak / estimate, as docs/training.md states


def tiny_llama(shape: planner.ModelShape, dtype: torch.dtype = torch.float32, r: int = 8, targets=ALL):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=shape.vocab_size, hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers, num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads, tie_word_embeddings=shape.tie_word_embeddings,
        max_position_embeddings=256, attn_implementation="sdpa",
    )  # fmt: skip
    model = LlamaForCausalLM(cfg).to(dtype)
    return lc.apply_lora(model, lc.LoraConfig(r=r, alpha=2 * r, target_modules=list(targets), quantize="nf4"))


# ------------------------------------------------------------------------------------------------ weights


@pytest.mark.parametrize("n", [1, 63, 64, 65, 4800, 64 * 256 + 1, 100_001])
@pytest.mark.parametrize("double_quant", [True, False])
def test_nf4_bytes_of_one_weight_equal_quantize_nf4s(n: int, double_quant: bool) -> None:
    q = lc.quantize_nf4(torch.randn(n), 64, double_quant)
    assert planner.nf4_nbytes(n, 64, double_quant) == sum(t.nbytes for t in q.tensors().values())


@pytest.mark.parametrize("dtype, name", [(torch.float32, "fp32"), (torch.bfloat16, "bf16")])
@pytest.mark.parametrize("tie", [False, True])
def test_weight_bytes_equal_a_real_nf4_model(dtype: torch.dtype, name: str, tie: bool) -> None:
    shape = planner.ModelShape("tiny", 48, 100, 3, 4, 2, 97, tie_word_embeddings=tie)
    model = tiny_llama(shape, dtype)
    nf4 = sum(
        t.nbytes for m in model.modules() if isinstance(getattr(m, "base", None), lc.lora.bases.NF4Base)
        for t in m.base.q.tensors().values()
    )  # fmt: skip
    dense = sum(p.nbytes for p in {id(p): p for p in model.parameters() if not p.requires_grad}.values())
    assert nf4 + dense == planner.base_weight_bytes(shape, "nf4", name)
    assert planner.plan_memory(shape, dtype=name).weights == nf4 + dense


def test_dense_weights_and_the_built_in_shapes_match_the_published_parameter_counts() -> None:
    """bf16 bytes / 2 = parameters: the counts transformers reports for these checkpoints."""
    published = {"llama-2-7b": 6_738_415_616, "llama-2-13b": 13_015_864_320, "llama-2-70b": 68_976_648_192,
                 "smollm2-135m": 134_515_008}  # fmt: skip
    for name, count in published.items():
        assert planner.base_weight_bytes(planner.model_shape(name), "none", "bf16") == 2 * count, name


# ------------------------------------------------------------------------- adapters, gradients, AdamW


@pytest.mark.parametrize("r, targets", [(8, ALL), (4, ("q_proj", "v_proj")), (2, ("down_proj",))])
def test_adapters_gradients_and_adamw_state_equal_the_real_ones(r: int, targets: tuple[str, ...]) -> None:
    model = tiny_llama(TINY, r=r, targets=targets)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)  # what lc.train builds
    ids = torch.randint(0, TINY.vocab_size, (2, 16))
    causal_lm_loss(model, ids, ids).backward()
    optimizer.step()
    plan = lc.plan_memory(TINY, r=r, targets=targets, dtype="fp32")
    assert plan.trainable_params == sum(p.numel() for p in trainable)
    assert plan.adapters == sum(p.nbytes for p in trainable)
    assert plan.gradients == sum(p.grad.nbytes for p in trainable)
    assert plan.optimizer == sum(t.nbytes for s in optimizer.state.values() for t in s.values())


# ------------------------------------------------------------------------------------------- activations


def saved_bytes(model, ids: torch.Tensor) -> int:
    """Bytes of the (distinct) storages autograd saves for backward, the parameters left out."""
    params = {StorageWeakRef(p.untyped_storage()).cdata for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = StorageWeakRef(t.untyped_storage()).cdata
        if key not in params:
            seen[key] = t.untyped_storage().nbytes()
        return t

    with lc.fused_mode("always"), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        causal_lm_loss(model, ids, ids)
    return sum(seen.values())


@pytest.mark.parametrize("dtype, name", [(torch.float32, "fp32"), (torch.bfloat16, "bf16")])
@pytest.mark.parametrize("targets", [ALL, ("q_proj", "v_proj")])
@pytest.mark.parametrize("grad_ckpt", [False, True])
def test_saved_activations_equal_what_autograd_saves(dtype, name, targets, grad_ckpt: bool) -> None:
    model = tiny_llama(TINY, dtype, targets=targets).train()
    if grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for batch, seq in ((1, 32), (2, 24)):
        ids = torch.randint(0, TINY.vocab_size, (batch, seq))
        expected = planner.saved_activation_bytes(TINY, seq, batch, 8, targets, name, grad_ckpt)
        assert saved_bytes(model, ids) == expected, (batch, seq)


def test_without_an_attention_target_in_block_0_the_estimate_is_still_exact() -> None:
    """apply_lora makes the embedding's output need grad (for gradient checkpointing with a frozen embedding,
    as PEFT does), so block 0 saves what every block saves even when its attention has no target."""
    targets = ("o_proj", "down_proj")
    model = tiny_llama(TINY, targets=targets).train()
    measured = saved_bytes(model, torch.randint(0, TINY.vocab_size, (2, 32)))
    assert measured == planner.saved_activation_bytes(TINY, 32, 2, 8, targets, "fp32")


class PeakLiveBytes(TorchDispatchMode):
    """The most bytes alive at once among the storages ops return (those in ``skip`` excluded)."""

    def __init__(self, skip: set[int]) -> None:
        super().__init__()
        self.skip, self.live, self.peak = skip, {}, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.live = {k: v for k, v in self.live.items() if not v[0].expired()}  # freed since the last op
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                ref = StorageWeakRef(t.untyped_storage())
                if ref.cdata not in self.skip:
                    self.live[ref.cdata] = (ref, t.untyped_storage().nbytes())
        self.peak = max(self.peak, sum(n for _, n in self.live.values()))
        return out


@pytest.mark.parametrize("grad_ckpt", [False, True])
def test_the_activation_estimate_bounds_the_measured_peak_of_a_training_step(grad_ckpt: bool) -> None:
    model = tiny_llama(TINY).train()
    if grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    held = [*model.parameters(), *model.buffers()]
    held += [
        t
        for m in model.modules()
        if hasattr(getattr(m, "base", None), "q")
        for t in m.base.q.tensors().values()
    ]
    # the gradients the step leaves behind are the planner's "gradients", not activations: set before
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
            held.append(p.grad)
    ids = torch.randint(0, TINY.vocab_size, (2, 64))
    mode = PeakLiveBytes({StorageWeakRef(t.untyped_storage()).cdata for t in held})
    with lc.fused_mode("always"), mode:
        causal_lm_loss(model, ids, ids).backward()
    estimate = lc.plan_memory(TINY, seq=64, batch=2, r=8, dtype="fp32", grad_ckpt=grad_ckpt).activations
    print(f"peak {mode.peak} B, estimate {estimate} B: {mode.peak / estimate:.3f}")
    assert PEAK_LOW * estimate <= mode.peak <= PEAK_HIGH * estimate, (mode.peak, estimate)


# ---------------------------------------------------------------------------------------- DDP and FSDP


def test_fsdp_divides_the_base_keeps_the_adapters_whole_and_gathers_two_blocks() -> None:
    one = lc.plan_memory("llama-2-70b", gpus=1, gpu_gb=80, seq=512)
    ddp = lc.plan_memory("llama-2-70b", gpus=8, gpu_gb=80, seq=512, strategy="ddp")
    fsdp = lc.plan_memory("llama-2-70b", gpus=8, gpu_gb=80, seq=512, strategy="fsdp")
    assert (one.strategy, ddp.strategy, fsdp.strategy) == ("single", "ddp", "fsdp")
    assert ddp.weights == one.weights and fsdp.weights == -(-one.weights // 8)
    for plan in (ddp, fsdp):  # lora_core.training.fsdp shards the frozen base only (as the tests there show)
        assert plan.gradients == 2 * one.gradients  # + the all-reduce's flat copy
        assert (plan.adapters, plan.optimizer) == (one.adapters, one.optimizer)
    shape = fsdp.model
    block = planner.block_weight_bytes(shape)
    assert fsdp.gathered == planner.root_weight_bytes(shape) + 2 * block and one.gathered == ddp.gathered == 0
    assert fsdp.activations == ddp.activations == one.activations  # per rank, batch per rank
    rest = fsdp.total - fsdp.overhead
    assert fsdp.overhead == planner.OVERHEAD_FIXED_BYTES + int(planner.OVERHEAD_FRACTION * rest)


def test_auto_shards_only_when_replicas_do_not_fit_and_offload_leaves_only_the_gathered_blocks() -> None:
    assert lc.plan_memory("7b", gpus=2, gpu_gb=24).strategy == "ddp"
    sharded = lc.plan_memory("70b", gpus=2, gpu_gb=40, seq=2048, grad_ckpt=True)
    assert sharded.strategy == "fsdp" and sharded.fits
    assert not lc.plan_memory("70b", gpus=2, gpu_gb=40, seq=2048, grad_ckpt=True, strategy="ddp").fits
    off = lc.plan_memory("70b", gpus=2, gpu_gb=24, seq=512, grad_ckpt=True, cpu_offload=True)
    assert off.strategy == "fsdp + CPU offload" and off.weights == 0
    assert (off.adapters, off.optimizer) == (sharded.adapters, sharded.optimizer)  # whole, on the GPU
    assert off.gathered == sharded.gathered and off.margin == off.gpu_bytes - off.total


def test_finetune_under_torchrun_shards_only_where_ddp_does_not_fit_and_fsdp_does(tmp_path: Path) -> None:
    """``lora-core finetune`` on GPUs without --fsdp / --ddp: `fsdp_needed` decides (pure: shapes only)."""
    from lora_core.cli.plan import fsdp_needed

    run = dict(gpus=2, seq=2048, batch=1, r=16, targets="all-linear", quantize="nf4", grad_ckpt=True)
    note = fsdp_needed("70b", gpu_gb=40, **run)  # DDP 46.3 GiB, FSDP 30.5 GiB per GPU (the docs' table)
    assert note is not None and note.startswith("using --fsdp") and "--ddp" in note and "\n" not in note
    assert fsdp_needed("7b", gpu_gb=24, **run) is None  # DDP fits: the default stays
    assert fsdp_needed("70b", gpu_gb=8, **run) is None  # neither fits: nothing to gain by switching
    assert fsdp_needed("70b", gpu_gb=40, **{**run, "targets": "q_proj,score"}) is None  # unknown target
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 768}))
    assert fsdp_needed(tmp_path, gpu_gb=40, **run) is None  # shapes the planner cannot read


def test_fsdp_and_ddp_together_are_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    from lora_core.cli import main

    assert main(["finetune", "--model", "tiny", "--fsdp", "--ddp"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lora-core: error:") and err.count("\n") == 1 and "--ddp" in err, err


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        ({"gpus": 0}, ValueError, "gpus"),
        ({"seq": 1.5}, TypeError, "seq"),
        ({"batch": True}, TypeError, "batch"),
        ({"gpu_gb": float("nan")}, ValueError, "gpu_gb"),
        ({"quantize": "int8"}, ValueError, "quantize"),
        ({"dtype": "float8"}, ValueError, "dtype"),
        ({"strategy": "zero3"}, ValueError, "strategy"),
        ({"targets": ("lm_head",)}, ValueError, "targets"),
        ({"cpu_offload": True, "strategy": "ddp"}, ValueError, "cpu_offload"),
        ({"model": "llama-9b"}, ValueError, "llama-9b"),
        ({"model": 7}, TypeError, "model"),
    ],
)
def test_bad_arguments_name_themselves(kwargs: dict, error: type, words: str) -> None:
    args = {"model": "7b", **kwargs}
    with pytest.raises(error, match=words):
        lc.plan_memory(args.pop("model"), **args)


def test_a_model_folder_reads_config_json(tmp_path: Path) -> None:
    s = planner.model_shape("smollm2-135m")
    fields = {k: v for k, v in s.__dict__.items() if k not in ("name", "head_dim")}
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", **fields}))
    assert planner.model_shape(str(tmp_path)) == planner.ModelShape(**{**s.__dict__, "name": str(tmp_path)})
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(ValueError, match="intermediate_size"):
        planner.model_shape(str(tmp_path))


# ------------------------------------------------------------------------------------- the command line

ENV = {**os.environ, "LORA_CORE_DEBUG": ""}


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(SCRIPT), "plan", *args], capture_output=True, text=True, env=ENV, timeout=300)


@pytest.mark.skipif(not SCRIPT.exists(), reason="lora-core console script not installed")
def test_cli_prints_the_plan_and_exits_0_when_it_fits_1_when_it_does_not(tmp_path: Path) -> None:
    fits = cli("--model", "13b", "--gpu-gb", "24", "--seq", "2048", "--grad-ckpt")
    plan = lc.plan_memory("13b", gpu_gb=24, seq=2048, grad_ckpt=True)
    assert fits.returncode == 0 and fits.stdout == plan.table() + "\n" and "fits: margin" in fits.stdout
    big = cli(
        "--model", "70b", "--gpus", "2", "--gpu-gb", "24", "--seq", "512", "--batch", "1", "--grad-ckpt"
    )
    assert big.returncode == 1 and "fsdp on 2 × 24 GiB" in big.stdout, big.stdout + big.stderr
    assert big.stdout.splitlines()[-1].startswith("does not fit: short by")
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in TINY.__dict__.items() if k != "name"}))
    folder = cli("--model", str(tmp_path), "--quantize", "none", "--r", "8", "--fsdp", "--gpus", "2")
    assert folder.returncode == 0 and folder.stdout.startswith(f"{tmp_path}: fsdp"), folder.stderr
    bad = cli("--model", "7b", "--gpus", "0")
    assert (
        bad.returncode == 2
        and bad.stdout == ""
        and bad.stderr == "lora-core: error: --gpus must be >= 1, got 0\n"
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "nowhere"], "--model 'nowhere' is neither a built-in"),
        (["--model", "7b", "--gpu-gb", "0"], "--gpu-gb must be a positive number"),
        (["--model", "7b", "--seq", "-5"], "--seq must be >= 1"),
        (["--model", "7b", "--target-modules", "q_proj,lm_head"], "--target-modules must be"),
        (["--model", "7b", "--ddp", "--cpu-offload"], "--cpu-offload needs"),
        (["--model", "7b", "--fsdp", "--ddp"], "plan: argument --ddp: not allowed with argument --fsdp"),
        (["--model", "7b", "--quantize", "fp4"], "plan: argument --quantize: invalid choice"),
        (["--gpus", "2"], "the following arguments are required: --model"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(args: list[str], message: str, capsys) -> None:
    from lora_core.cli import main

    try:
        code = main(["plan", *args])
    except SystemExit as e:  # argparse's own usage errors
        code = e.code
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and err.startswith("lora-core: error:") and err.count("\n") == 1, err
    assert message in err, err


def test_help_lists_plan_and_its_flags(capsys) -> None:
    from lora_core.cli import main

    for argv, words in (
        (["--help"], ["plan"]),
        (["plan", "--help"], ["--gpu-gb", "--fsdp", "--cpu-offload"]),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        out = capsys.readouterr().out
        assert exit_info.value.code == 0 and all(w in out for w in words), argv


# ------------------------------------------------------------------------------------------- the docs


def test_the_table_in_docs_training_md_is_what_the_planner_says(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_plan_table", REPO / "docs/scripts/make_plan_table.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    doc = (REPO / "docs" / "training.md").read_text()
    assert script.replace_table(doc, script.plan_table()) == doc, "run python docs/scripts/make_plan_table.py"
    monkeypatch.setattr(
        planner, "OVERHEAD_FRACTION", 0.2
    )  # the check can fail: another planner, another table
    assert script.replace_table(doc, script.plan_table()) != doc
