"""``save_pretrained`` / ``from_pretrained`` for a QLoRA model: the folder records the quantization as
bitsandbytes does (``quantization_config`` in config.json, each weight in bitsandbytes' keys), so the real
``transformers.AutoModelForCausalLM.from_pretrained`` (with bitsandbytes 0.50) builds ``Linear4bit``
layers over the very bytes lora_core saved, and ``lc.load_adapter`` adopts them again.

Oracles: the bytes themselves, and bitsandbytes' fields decoded by hand (``tests/bnb_oracle.py``), never
bitsandbytes' CPU dequantize / matmul (wrong on AVX-512 CPUs for some shapes). The model is the tiny Llama
of ``tests/tiny_llama.py`` (widths 64 and 128, multiples of bitsandbytes' block of 64).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from bnb_oracle import decode_bnb_fields
from tiny_llama import save_tiny_llama
from torch import nn

import lora_core as lc
from lora_core.lora.bases import is_bnb_4bit

transformers = pytest.importorskip("transformers")
pytest.importorskip("bitsandbytes")

TARGETS = ["q_proj", "v_proj"]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


def from_pretrained(folder: Path, **kwargs: object) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoModelForCausalLM.from_pretrained(folder, **kwargs).eval()


def qlora(folder: Path, **quant: object) -> nn.Module:
    """The tiny Llama with trained-looking (non-zero) QLoRA adapters on q_proj / v_proj."""
    model = from_pretrained(folder)
    cfg = lc.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, quantize="nf4", **quant)
    lc.apply_lora(model, cfg)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    return model.eval()


def nf4_weights(model: nn.Module) -> dict[str, lc.NF4Tensor]:
    return {p: m.base.q for p, m in model.named_modules() if isinstance(m, (lc.QLoRALinear, lc.NF4Linear))}


QUANT = [{}, {"quant_block_size": 32, "double_quant": False}, {"quantize_base": False}]


@pytest.mark.parametrize("quant", QUANT, ids=["qlora", "block32-single", "targets-only"])
def test_round_trip_through_transformers(llama_dir: Path, tmp_path: Path, quant: dict) -> None:
    model = qlora(llama_dir, **quant)
    ours = nf4_weights(model)
    assert len(ours) == (14 if quant.get("quantize_base", True) else 4)
    model.save_pretrained(tmp_path / "base")
    lc.save_adapter(model, tmp_path / "adapter")

    record = json.loads((tmp_path / "base" / "config.json").read_text())["quantization_config"]
    assert record["quant_method"] == "bitsandbytes" and record["load_in_4bit"] is True
    assert record["bnb_4bit_quant_type"] == "nf4"
    assert record["bnb_4bit_use_double_quant"] is quant.get("double_quant", True)
    dense = [p for p, m in model.named_modules() if type(m) is nn.Linear and "lora_" not in p]
    assert sorted(record["llm_int8_skip_modules"]) == sorted(dense) and "lm_head" in dense

    loaded = from_pretrained(tmp_path / "base")  # transformers + bitsandbytes, nothing of lora_core
    for path, q in ours.items():
        module = loaded.get_submodule(path)
        assert is_bnb_4bit(module), path
        assert torch.equal(module.weight.data.reshape(-1), q.packed), path  # the very bytes
        state = module.weight.quant_state
        assert (state.blocksize, state.nested) == (q.block_size, q.double_quant), path
        decoded = decode_bnb_fields(module.weight.data, state)  # what bitsandbytes makes of them
        assert torch.equal(decoded, lc.dequantize_nf4(q, torch.float32)), path
    for path in dense:
        module = loaded.get_submodule(path)
        assert type(module) is nn.Linear and torch.equal(module.weight, model.get_submodule(path).weight)

    lc.load_adapter(loaded, tmp_path / "adapter", quantize="nf4", **quant)
    assert {p: q.packed.data_ptr() for p, q in nf4_weights(loaded).items()}.keys() == ours.keys()
    want, got = model.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key  # NF4 bytes, scales, adapters, norms: identical
    ids = torch.randint(0, loaded.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits
        assert expected.abs().max() > 0.1
        torch.testing.assert_close(loaded(ids).logits, expected, rtol=0, atol=0)


def test_bf16_model_records_its_dtype(llama_dir: Path, tmp_path: Path) -> None:
    model = from_pretrained(llama_dir, dtype=torch.bfloat16)
    lc.apply_lora(model, lc.LoraConfig(r=4, target_modules=TARGETS, quantize="nf4"))
    assert model.config.quantization_config["bnb_4bit_compute_dtype"] == "bfloat16"
    model.save_pretrained(tmp_path)
    loaded = from_pretrained(tmp_path)
    layer = loaded.model.layers[1].mlp.down_proj
    assert loaded.dtype == torch.bfloat16 and layer.weight.quant_state.dtype == torch.bfloat16
    q = model.model.layers[1].mlp.down_proj.base.q
    assert torch.equal(decode_bnb_fields(layer.weight.data, layer.weight.quant_state), lc.dequantize_nf4(q))


def test_the_record_follows_the_model(llama_dir: Path) -> None:
    dense = from_pretrained(llama_dir)
    lc.apply_lora(dense, lc.LoraConfig(r=4, target_modules=TARGETS))  # quantize="none": nothing to record
    assert not hasattr(dense.config, "quantization_config")

    model = from_pretrained(llama_dir)
    lc.apply_lora(model, lc.LoraConfig(r=4, target_modules=TARGETS, quantize="nf4", quantize_base=False))
    lc.unload_lora(model, dequantize=True)  # dense again: the record goes
    assert not hasattr(model.config, "quantization_config")

    model = from_pretrained(llama_dir)
    lc.apply_lora(model, lc.LoraConfig(r=4, target_modules=TARGETS, quantize="nf4"))
    lc.unload_lora(model, dequantize=True)  # quantize_base's NF4Linear layers dense too
    assert not hasattr(model.config, "quantization_config")

    model = from_pretrained(llama_dir)
    lc.apply_lora(model, lc.LoraConfig(r=4, target_modules=TARGETS, quantize="nf4"))
    with pytest.warns(UserWarning, match="requantiz"):  # the merged targets requantized: lossy, warns
        lc.unload_lora(model, dequantize=False)  # every linear layer but the head stays in NF4
    assert model.config.quantization_config["llm_int8_skip_modules"] == ["lm_head"]

    bnb_cfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    loaded_4bit = from_pretrained(llama_dir, quantization_config=bnb_cfg, device_map="cpu")
    theirs = loaded_4bit.config.quantization_config
    lc.apply_lora(loaded_4bit, lc.LoraConfig(r=4, target_modules=TARGETS, quantize="nf4"))
    assert loaded_4bit.config.quantization_config is theirs  # bitsandbytes' own record: left alone


KEY = "model.layers.0.mlp.up_proj.weight"
DAMAGES = {  # (what is done to the saved state dict, what the error says)
    "truncated-codes": (
        lambda sd: {**sd, KEY: sd[KEY][:10]},
        r"up_proj: weight.packed must be uint8 with ceil",
    ),
    "nan-scale": (
        lambda sd: {**sd, f"{KEY}.nested_absmax": sd[f"{KEY}.nested_absmax"] * float("nan")},
        "up_proj: weight.nested_absmax must be finite",
    ),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_checkpoint_is_refused_by_name(llama_dir: Path, tmp_path: Path, damage: str) -> None:
    from safetensors.torch import load_file, save_file

    qlora(llama_dir).save_pretrained(tmp_path)
    file = tmp_path / "model.safetensors"
    change, message = DAMAGES[damage]
    save_file(change(load_file(file)), file, metadata={"format": "pt"})
    loaded = from_pretrained(tmp_path)  # bitsandbytes does not check these fields; lora_core does
    before = {p: type(m) for p, m in loaded.named_modules()}
    with pytest.raises(ValueError, match=message):
        lc.apply_lora(loaded, lc.LoraConfig(r=4, target_modules=TARGETS, quantize="nf4"))
    assert {p: type(m) for p, m in loaded.named_modules()} == before  # refused before any change
    with pytest.raises(FileNotFoundError):
        lc.load_adapter(loaded, tmp_path / "no-adapter-here", quantize="nf4")
