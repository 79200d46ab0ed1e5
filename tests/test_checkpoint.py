"""Quantized checkpoints: our safetensors round trip, and a real bitsandbytes-written checkpoint read
straight into NF4 (written on CPU by ``bnb.nn.Linear4bit`` and its own state-dict serialization).

The oracle for bitsandbytes' weights is its own fields decoded by hand (``bnb_oracle``), not its CPU
``dequantize_4bit``, which is wrong on AVX-512 CPUs for these shapes (in_features = 96)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from bnb_oracle import decode_bnb_fields
from safetensors.torch import load_file, save_file
from torch import nn

from lora_core.lora.qlora import QLoRALinear
from lora_core.quant.checkpoint import (
    load_bnb_checkpoint,
    load_quantized,
    read_bnb_state_dict,
    save_quantized,
)
from lora_core.quant.nf4 import NF4Tensor, dequantize_nf4, quantize_nf4

bnb = pytest.importorskip("bitsandbytes")


def bnb_model(double_quant: bool, dtype: torch.dtype, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    dense = nn.Sequential(nn.Linear(96, 40), nn.ReLU(), nn.Linear(40, 7)).to(dtype)
    quant = nn.Sequential(
        bnb.nn.Linear4bit(96, 40, compute_dtype=dtype, compress_statistics=double_quant, quant_type="nf4"),
        nn.ReLU(),
        bnb.nn.Linear4bit(40, 7, compute_dtype=dtype, compress_statistics=double_quant, quant_type="nf4"),
    )
    quant.load_state_dict(dense.state_dict())
    return quant.to("cpu")  # bitsandbytes quantizes on the move to a device


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reads_a_bitsandbytes_checkpoint(tmp_path, double_quant, dtype) -> None:
    model = bnb_model(double_quant, dtype, seed=1)
    state = model.state_dict()
    expected_keys = {"weight", "weight.absmax", "weight.quant_map", "weight.quant_state.bitsandbytes__nf4"}
    if double_quant:
        expected_keys |= {"weight.nested_absmax", "weight.nested_quant_map"}
    assert {k[2:] for k in state if k.startswith("0.weight")} == expected_keys
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, path)

    loaded = load_bnb_checkpoint(path)
    assert set(loaded) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    for name in ("0", "2"):
        q = loaded[f"{name}.weight"]
        bnb_weight = getattr(model, name).weight
        assert isinstance(q, NF4Tensor) and q.double_quant == double_quant
        assert q.dtype == bnb_weight.quant_state.dtype and q.shape == bnb_weight.quant_state.shape
        assert torch.equal(q.packed, bnb_weight.data.reshape(-1))  # the very bytes
        assert torch.equal(dequantize_nf4(q), decode_bnb_fields(bnb_weight.data, bnb_weight.quant_state))
        assert torch.equal(loaded[f"{name}.bias"], getattr(model, name).bias)


def test_bnb_checkpoint_loads_into_qlora_layer() -> None:
    """bitsandbytes' state dict (plus a bias) loads into a QLoRALinear: its output is the linear map of
    bitsandbytes' weight (decoded from its fields) plus the bias."""
    model = bnb_model(True, torch.float32, seed=2)
    layer = QLoRALinear.from_linear(nn.Linear(96, 40), r=2, alpha=4)
    state = {k[2:]: v for k, v in model.state_dict().items() if k.startswith("0.")}
    missing, unexpected = layer.load_state_dict(state, strict=False)
    assert unexpected == [] and set(missing) == {"lora_A.weight", "lora_B.weight"}
    x = torch.randn(3, 96)
    bnb_weight = model[0].weight
    expected = F.linear(x, decode_bnb_fields(bnb_weight.data, bnb_weight.quant_state), model[0].bias)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_fp4_is_refused(tmp_path) -> None:
    layer = bnb.nn.Linear4bit(64, 8, quant_type="fp4").to("cpu")
    with pytest.raises(ValueError, match="FP4"):
        read_bnb_state_dict(dict(layer.state_dict()))


def test_save_and_load_quantized_model(tmp_path) -> None:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(48, 32), nn.Tanh(), nn.Linear(32, 5))
    model[0] = QLoRALinear.from_linear(model[0], r=4, alpha=8)
    model[2] = QLoRALinear.from_linear(model[2], r=2, alpha=2, use_dora=True, double_quant=False)
    for p in model.parameters():
        p.data.normal_()  # non-trivial adapters and biases
    path = tmp_path / "ckpt" / "model.safetensors"
    save_quantized(model, path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.safetensors"]  # no temp file left

    torch.manual_seed(4)  # a different random model of the same structure
    fresh = nn.Sequential(nn.Linear(48, 32), nn.Tanh(), nn.Linear(32, 5))
    fresh[0] = QLoRALinear.from_linear(fresh[0], r=4, alpha=8)
    fresh[2] = QLoRALinear.from_linear(fresh[2], r=2, alpha=2, use_dora=True, double_quant=False)
    load_quantized(fresh, path)
    x = torch.randn(6, 48)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    stored = load_file(path)
    assert stored["0.weight"].dtype == torch.uint8 and stored["0.weight"].shape == (48 * 32 // 2, 1)
    assert stored["2.weight.absmax"].dtype == torch.float32  # no double quant on that one


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s.pop("w.absmax"), r"missing \['w.absmax'\]"),
        (lambda s: s.pop("w.quant_map"), r"missing \['w.quant_map'\]"),
        (lambda s: s.pop("w.nested_quant_map"), r"missing \['w.nested_quant_map'\]"),
        (lambda s: s.pop("w"), r"missing \['w'\]"),
        (lambda s: s.update({"w.absmax": s["w.absmax"][:-1]}), "absmax must be"),
        (lambda s: s.update({"w": s["w"][:-1]}), "packed must be uint8"),
        (lambda s: s.update({"w.quant_map": s["w.quant_map"][:8]}), "code must be float32 with 16"),
        (lambda s: s.update({"w.nested_absmax": torch.ones(2)}), "nested_absmax must have"),
    ],
)
def test_incomplete_or_inconsistent_entry_is_a_value_error(edit, message) -> None:
    """`read_bnb_state_dict` promises ValueError for an incomplete entry (it raised KeyError, or
    dequantized with the wrong scales later)."""
    state = dict(quantize_nf4(torch.randn(8, 64)).to_bnb_state("w"))
    edit(state)
    with pytest.raises(ValueError, match=message):
        read_bnb_state_dict(state)


@pytest.mark.parametrize("blocksize", [32, 48, 8192, "64"])
def test_recorded_block_size_is_checked(blocksize) -> None:
    """A blob whose block size disagrees with the stored scales, or is no power of two in [16, 4096]."""
    state = dict(quantize_nf4(torch.randn(8, 64), double_quant=False).to_bnb_state("w"))
    key = "w.quant_state.bitsandbytes__nf4"
    meta = {**json.loads(bytes(state[key].tolist())), "blocksize": blocksize}
    state[key] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"block_size must be a power of two|absmax must be"):
        NF4Tensor.from_bnb_state(state, "w")
