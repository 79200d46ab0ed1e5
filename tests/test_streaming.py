"""Streamed loading (``lc.load_pretrained``) against the reference path it must equal bit for bit:
``lc.apply_lora(AutoModelForCausalLM.from_pretrained(folder, dtype=...).to(device), cfg)`` (then
``shard_model`` under FSDP), on random tiny Llamas written by ``save_pretrained`` (one file, and sharded with
an index; tied and untied embeddings; float32 and bfloat16).

- equal: module tree, ``requires_grad`` and training flags, state dict (NF4 bytes and scales, adapters: the
  same RNG draws in the same order; PiSSA / OLoRA / LoftQ, which read the weights), config, logits;
- memory: the peak of the live tensor bytes (``tests/live_bytes.py``: every storage an op returns, tracked
  until freed; no allocator, no timing) stays within the final model + 1.5 dense blocks, where the reference
  path holds the whole dense model;
- bad input: a clear error naming the argument or tensor;
- two ranks under torchrun (gloo, ``tests/streaming_worker.py``): each rank holds half of the frozen bytes,
  its load peak is below the dense model, and its shards equal those of load whole → apply_lora → shard_model.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from live_bytes import PeakLiveBytes, model_storages
from safetensors.torch import load_file, save_file
from test_fsdp import ENV, torchrun
from tolerances import assert_close

import lora_core as lc

WORKER = Path(__file__).resolve().parent / "streaming_worker.py"
SIZES = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=6, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=96, max_position_embeddings=128)  # fmt: skip
CONFIGS = {
    "qlora-all-linear": dict(target_modules="all-linear", quantize="nf4"),
    "lora-q-v": dict(target_modules=["q_proj", "v_proj"], dropout=0.1),
    "qlora-dora-quantize-base": dict(target_modules=["q_proj", "down_proj"], quantize="nf4", use_dora=True,
                                     quantize_base=True),
    "pissa": dict(target_modules=["o_proj", "up_proj"], init="pissa_niter_2"),
    "olora-bias-all": dict(target_modules=["k_proj"], init="olora", bias="all"),
    "loftq": dict(target_modules=["gate_proj"], quantize="nf4", init="loftq"),
}  # fmt: skip


def save_llama(folder: Path, *, tie: bool, dtype: torch.dtype, shard: bool = False, seed: int = 0) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**SIZES, tie_word_embeddings=tie)).to(dtype)
    with torch.no_grad():  # larger than the 0.02 init, so the logits differ visibly
        for p in model.parameters():
            p.normal_(0, 0.2) if p.dim() == 2 else None
    model.save_pretrained(folder, max_shard_size="100KB" if shard else "5GB")
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("llamas")
    out = {
        "fp32-untied": save_llama(root / "fp32-untied", tie=False, dtype=torch.float32),
        "bf16-tied-sharded": save_llama(
            root / "bf16-tied-sharded", tie=True, dtype=torch.bfloat16, shard=True
        ),
    }
    assert (out["bf16-tied-sharded"] / "model.safetensors.index.json").is_file()
    return out


def reference(folder: Path, cfg: lc.LoraConfig, dtype: torch.dtype | None = None, seed: int = 1):
    from transformers import AutoModelForCausalLM

    kwargs = {} if dtype is None else {"dtype": dtype}
    model = AutoModelForCausalLM.from_pretrained(str(folder), **kwargs).to("cpu")
    torch.manual_seed(seed)
    return lc.apply_lora(model, cfg)


def streamed(folder: Path, cfg: lc.LoraConfig, dtype: torch.dtype | None = None, seed: int = 1):
    torch.manual_seed(seed)
    return lc.load_pretrained(folder, cfg, dtype=dtype)


def assert_identical(a: torch.nn.Module, b: torch.nn.Module) -> None:
    assert str(a) == str(b)
    assert [m.training for m in a.modules()] == [m.training for m in b.modules()]
    assert [(n, p.requires_grad) for n, p in a.named_parameters()] == [
        (n, p.requires_grad) for n, p in b.named_parameters()
    ]
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key
    assert [(n, t.device) for n, t in a.named_buffers()] == [(n, t.device) for n, t in b.named_buffers()]
    assert a.config.to_dict() == b.config.to_dict()  # quantization_config included
    assert lc.get_lora_config(a) == lc.get_lora_config(b)
    assert (a.lm_head.weight is a.model.embed_tokens.weight) == (
        b.lm_head.weight is b.model.embed_tokens.weight
    )
    ids = torch.randint(0, SIZES["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("kind", ["fp32-untied", "bf16-tied-sharded"])
def test_streamed_equals_from_pretrained_then_apply_lora(folders, kind: str, name: str) -> None:
    cfg = lc.LoraConfig(r=4, alpha=8, **CONFIGS[name])
    assert_identical(reference(folders[kind], cfg), streamed(folders[kind], cfg))


def test_a_dtype_casts_as_from_pretrained_does_and_ties_survive(folders) -> None:
    cfg = lc.LoraConfig(r=4, alpha=8, target_modules="all-linear", quantize="nf4")
    for kind, dtype in (("fp32-untied", torch.bfloat16), ("bf16-tied-sharded", torch.float32)):
        model = streamed(folders[kind], cfg, torch.bfloat16 if dtype is None else dtype)
        assert model.model.norm.weight.dtype == dtype
        assert_identical(reference(folders[kind], cfg, dtype), model)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # the tied checkpoint


def test_a_checkpoint_holding_only_the_head_of_tied_embeddings_loads(tmp_path: Path, folders) -> None:
    """As SmolLM2's cached folder (written by ``save_model``): ``lm_head.weight``, no embedding."""
    folder = tmp_path / "head-only"
    folder.mkdir()
    (folder / "config.json").write_text((folders["bf16-tied-sharded"] / "config.json").read_text())
    whole = reference(folders["bf16-tied-sharded"], lc.LoraConfig(r=2, alpha=2, target_modules=["q_proj"]))
    tensors = {k: v for k, v in whole.state_dict().items() if "lora_" not in k}
    tensors = {k.replace(".base_layer", ""): v for k, v in tensors.items()}
    tensors.pop("model.embed_tokens.weight")
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    cfg = lc.LoraConfig(r=4, alpha=8, target_modules=["q_proj"])
    assert_identical(reference(folder, cfg), streamed(folder, cfg))


@pytest.mark.parametrize("quantize", ["nf4", "none"])
def test_the_peak_is_the_final_model_plus_one_block_where_the_reference_holds_the_dense_model(
    folders, quantize: str
) -> None:
    folder = folders["fp32-untied"]  # float32: NF4's temporaries (≤ 17 B an element) stay below 1.5 blocks
    cfg = lc.LoraConfig(r=4, alpha=8, target_modules="all-linear", quantize=quantize)
    dense = reference(folder, lc.LoraConfig(r=1, alpha=1, target_modules=["q_proj"]))
    block = sum(p.nbytes for p in dense.model.layers[0].parameters())
    dense_bytes = sum(p.nbytes for p in dense.parameters())
    assert dense_bytes > 6 * block
    del dense
    lc.quantize_nf4(torch.randn(256), 64, True)  # the 8-bit map's lookup table: built once per process
    torch.manual_seed(1)
    mode = PeakLiveBytes()
    with mode:
        model = lc.load_pretrained(folder, cfg)
    final = model_storages(model)
    assert set(final) <= set(mode.live), "a tensor of the model was made where the tally cannot see it"
    held = sum(final.values())
    assert mode.now() <= held + 1024  # nothing else survives the load (a few small scalars at most)
    print(f"{quantize}: streamed peak {mode.peak} B, final {held} B, block {block} B, dense {dense_bytes} B")
    assert mode.peak <= held + 1.5 * block
    if quantize == "nf4":
        assert mode.peak < dense_bytes / 2

    from transformers import AutoModelForCausalLM

    whole = AutoModelForCausalLM.from_pretrained(str(folder))  # its threads are invisible to the tally:
    ref = PeakLiveBytes(initial=list(whole.parameters()))  # start from what it returned, alive at once
    with ref:
        lc.apply_lora(whole, cfg)
    assert ref.peak >= dense_bytes


def broken_copy(tmp_path: Path, source: Path, edit) -> Path:
    folder = tmp_path / "broken"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text((source / "config.json").read_text())
    tensors = load_file(str(source / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def test_bad_input_names_what_is_wrong(tmp_path: Path, folders) -> None:
    folder, cfg = folders["fp32-untied"], lc.LoraConfig(r=4, alpha=8, target_modules=["q_proj"])
    cases = [
        ((tmp_path / "nowhere", cfg), {}, ValueError, "not a folder"),
        ((tmp_path, cfg), {}, ValueError, "no config.json"),
        ((folder, {"r": 4}), {}, TypeError, "config must be a lora_core.LoraConfig"),
        ((folder, cfg), {"dtype": "bf16"}, TypeError, "dtype"),
        (
            (folder, cfg),
            {"device": "cuda:7"},
            ValueError if not torch.cuda.is_available() else None,
            "cuda:7",
        ),
        ((folder, cfg), {"cpu_offload": True}, ValueError, "cpu_offload=True .* fsdp=True"),
        ((folder, cfg), {"fsdp": True}, ValueError, "torchrun"),
        ((folder, cfg), {"fsdp": 1}, TypeError, "fsdp must be a bool"),
        ((folder, lc.LoraConfig(r=4, alpha=8, target_modules=["qq_proj"])), {}, ValueError, "qq_proj"),
        ((folder, lc.LoraConfig(r=99, alpha=8, target_modules=["k_proj"])), {}, ValueError, "r=99"),
    ]
    for args, kwargs, error, words in cases:
        if error is not None:
            with pytest.raises(error, match=words):
                lc.load_pretrained(*args, **kwargs)
    (tmp_path / "no-weights").mkdir()
    (tmp_path / "no-weights" / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(ValueError, match=r"no model\.safetensors or model\.safetensors\.index\.json"):
        lc.load_pretrained(tmp_path / "no-weights", cfg)

    missing = broken_copy(tmp_path / "a", folder, lambda t: t.pop("model.layers.3.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"no tensor model\.layers\.3\.mlp\.up_proj\.weight"):
        lc.load_pretrained(missing, cfg)

    def wrong(t: dict) -> None:
        t["model.layers.5.self_attn.k_proj.weight"] = torch.zeros(31, 64)

    shaped = broken_copy(tmp_path / "b", folder, wrong)
    with pytest.raises(
        ValueError, match=r"model\.layers\.5\.self_attn\.k_proj\.weight.*\[31, 64\].*\[32, 64\]"
    ):
        lc.load_pretrained(shaped, cfg)
    index = folders["bf16-tied-sharded"] / "model.safetensors.index.json"
    shard = sorted(set(json.loads(index.read_text())["weight_map"].values()))[0]
    sharded = tmp_path / "missing-shard"
    sharded.mkdir()
    for f in folders["bf16-tied-sharded"].iterdir():
        if f.name != shard:
            (sharded / f.name).write_bytes(f.read_bytes())
    with pytest.raises(ValueError, match=f"missing.*{shard}"):
        lc.load_pretrained(sharded, cfg)


@pytest.mark.slow
def test_two_ranks_stream_their_shards_equal_to_the_reference_and_half_the_base(
    tmp_path: Path, folders
) -> None:
    out = tmp_path / "out"
    cmd = [*torchrun(2), str(WORKER), str(folders["fp32-untied"]), str(out)]
    result = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    reports = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rep in reports:
        print({k: v for k, v in rep.items() if k != "logits"})
        assert rep["shards_equal"] and rep["logits_equal"] and rep["grads_equal"], rep
        assert rep["partial_shards_equal"] and rep["partial_logits_equal"], rep
        whole, held = rep["frozen_bytes_whole"], rep["frozen_bytes_streamed"]
        assert held == rep["frozen_bytes_reference"]
        assert abs(held - whole / 2) <= 0.02 * whole, rep
        assert rep["peak_streamed"] < rep["dense_bytes"] / 2, rep
        nf4_block = whole / SIZES["num_hidden_layers"]  # about: the block being sharded, whole in NF4
        assert rep["peak_streamed"] <= held + rep["adapter_bytes"] + 1.5 * rep["block_bytes"] + nf4_block, rep
    assert reports[0]["logits"] == reports[1]["logits"]


@pytest.mark.slow
def test_finetune_fsdp_on_a_transformers_folder_trains_what_one_process_trains(tmp_path: Path) -> None:
    """``lora-core finetune --fsdp`` streams the folder into shards (QLoRA, the default); 2 ranks × batch 1
    train what one process trains with batch 2."""
    from tiny_llama import save_tiny_llama

    save_tiny_llama(tmp_path / "llama")
    text = "".join(f"{i} green bottles hanging on the wall, and {i % 7} fell.\n" for i in range(200))
    (tmp_path / "data.txt").write_text(text)
    common = ["-m", "lora_core.cli", "finetune", "--model", str(tmp_path / "llama"), "--data",
              str(tmp_path / "data.txt"), "--steps", "2", "--seq-len", "32", "--lr", "1e-2", "--dropout",
              "0", "--sample-tokens", "0", "--eval-blocks", "2", "--no-progress",
              "--gradient-checkpointing"]  # fmt: skip
    runs = {
        "fsdp": [*torchrun(2), *common, "--batch-size", "1", "--fsdp", "--cpu-offload"],
        "one": [sys.executable, *common, "--batch-size", "2"],
    }
    for name, cmd in runs.items():
        cmd += ["--output-dir", str(tmp_path / name)]
        result = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600, cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-4000:]
    fsdp, one = (load_file(str(tmp_path / n / "adapter" / "adapter_model.safetensors")) for n in runs)
    assert sorted(fsdp) == sorted(one) and any("lora_B" in k and v.abs().sum() > 0 for k, v in one.items())
    for key in one:
        assert_close(fsdp[key], one[key])
    metrics = [json.loads((tmp_path / n / "metrics.json").read_text()) for n in runs]
    assert metrics[0]["total_params"] == metrics[1]["total_params"] > 0
    for key in ("eval_loss_before", "eval_loss_after"):
        assert_close(torch.tensor(metrics[0][key]), torch.tensor(metrics[1][key]))
