"""bitsandbytes models as they come: ``apply_lora`` on a transformers model loaded with
``BitsAndBytesConfig(load_in_4bit=True)`` adopts each ``Linear4bit``'s NF4 bytes as they are (targets and,
with ``quantize_base``, the rest), and computes what PEFT + bitsandbytes compute on the same model.

The oracle for a weight is bitsandbytes' own packed bytes and quant-state fields decoded by hand
(``tests/bnb_oracle.py``), never its CPU ``dequantize_4bit`` (wrong on AVX-512 CPUs for in % 64 == 32). The
model's widths (64, 128) are multiples of 64, where bitsandbytes' CPU matmul is right too, so the
model-level comparison with PEFT + bitsandbytes holds on any CPU.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from bnb_oracle import decode_bnb_fields
from torch import nn

import lora_core as lc
from lora_core.lora.bases import NF4Base, is_bnb_4bit

bnb = pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "v_proj"]


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32,
    )  # fmt: skip
    path = tmp_path_factory.mktemp("tiny_llama")
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def load_4bit(path: Path, double_quant: bool = True, quant_type: str = "nf4") -> nn.Module:
    bnb_cfg = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=torch.float32,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_pretrained(
            path, quantization_config=bnb_cfg, device_map="cpu", dtype=torch.float32
        )
    return model.eval()


def bnb_fields(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor, int]]:
    """Per Linear4bit: (its packed bytes, its weight decoded by hand, the bytes' data_ptr)."""
    out = {}
    for path, m in model.named_modules():
        if is_bnb_4bit(m):
            w = m.weight.data
            out[path] = (w.clone(), decode_bnb_fields(w, m.weight.quant_state), w.data_ptr())
    return out


@pytest.mark.parametrize("double_quant", [True, False])
def test_adopts_the_bytes_of_every_linear4bit(tiny_llama_dir: Path, double_quant: bool) -> None:
    model = load_4bit(tiny_llama_dir, double_quant)
    before = bnb_fields(model)
    assert len(before) == 14  # 7 projections × 2 layers; lm_head stays dense, as bitsandbytes leaves it
    lc.apply_lora(model, lc.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, quantize="nf4"))
    assert not any(is_bnb_4bit(m) for m in model.modules())  # quantize_base: the rest adopted too
    for path, (packed, decoded, ptr) in before.items():
        module = model.get_submodule(path)
        kind = lc.QLoRALinear if path.rsplit(".", 1)[-1] in TARGETS else lc.NF4Linear
        assert type(module) is kind, path
        q = module.base.q
        assert q.packed.data_ptr() == ptr, path  # the very bytes: no copy
        assert torch.equal(q.packed, packed.reshape(-1)), path
        assert q.double_quant == double_quant and q.block_size == 64
        assert torch.equal(lc.dequantize_nf4(q, torch.float32), decoded), path  # bit for bit
    assert type(model.lm_head) is nn.Linear


def test_layer_outputs_equal_the_hand_decoded_weight(tiny_llama_dir: Path) -> None:
    model = load_4bit(tiny_llama_dir)
    q_proj = model.model.layers[0].self_attn.q_proj
    w = decode_bnb_fields(q_proj.weight.data, q_proj.weight.quant_state)  # (64, 64)
    lc.apply_lora(model, lc.LoraConfig(r=4, alpha=8, target_modules=TARGETS, quantize="nf4"))
    layer = model.model.layers[0].self_attn.q_proj
    torch.manual_seed(1)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(3, 5, 64)
    a, b = layer.lora_A.weight, layer.lora_B.weight
    want = F.linear(x, w) + 2.0 * (x @ a.T) @ b.T
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)
    mlp = model.model.layers[1].mlp.down_proj  # a non-target: frozen NF4Linear over the adopted bytes
    h = torch.randn(4, 128)
    torch.testing.assert_close(mlp(h), F.linear(h, mlp.base.dense_weight()), rtol=0, atol=0)


def test_model_equals_peft_plus_bitsandbytes(tiny_llama_dir: Path) -> None:
    ours, theirs = load_4bit(tiny_llama_dir), load_4bit(tiny_llama_dir)
    pc = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="gaussian")
    theirs = peft.get_peft_model(theirs, pc).eval()
    lc.apply_lora(ours, lc.LoraConfig.from_peft(pc, quantize="nf4"))
    torch.manual_seed(2)
    with torch.no_grad():  # the same non-zero adapters in both
        for name, p in theirs.named_parameters():
            if "lora_" in name:
                p.normal_(std=0.1)
                path = name.removeprefix("base_model.model.").replace(".default", "")
                ours.get_parameter(path).copy_(p)
    ids = torch.randint(0, 64, (2, 12))
    # bitsandbytes in train mode (dropout is 0 here): in eval mode under no_grad, on CPUs with AVX-512 BF16,
    # its Linear4bit repacks the weight for a bf16-absmax CPU kernel that rounds the base to ~1e-3
    # (see the next test); in train mode it dequantizes its NF4 bytes exactly, as PEFT training does.
    theirs.train()
    with torch.no_grad():
        want = theirs(ids).logits
        got = ours(ids).logits
    assert want.abs().max() > 0.1
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_a_layer_bitsandbytes_repacked_for_its_cpu_kernel_is_adopted_as_bitsandbytes_saves_it() -> None:
    """bitsandbytes' CPU fast path (AVX-512 BF16 machines, eval, no grad) rewrites a Linear4bit's bytes in
    place: nibbles permuted, absmax in bf16, double quantization undone. Adopting those bytes as NF4 would be
    silently wrong, so they are first restored as bitsandbytes' own state_dict restores them. The repacking
    is forced here with bitsandbytes' own converter, so the test runs the same on every CPU."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    def repacked_twin() -> tuple[nn.Module, torch.Tensor]:
        torch.manual_seed(5)
        dense = nn.Linear(128, 64, bias=False)
        layer = bnb.nn.Linear4bit(128, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(dense.weight.data, requires_grad=False, quant_type="nf4")
        layer = layer.to("cpu")  # quantizes, with double quantization (bitsandbytes' default)
        original = decode_bnb_fields(layer.weight.data, layer.weight.quant_state)
        layer.weight.data, layer.weight.quant_state = _convert_weight_packed_for_cpu(
            layer.weight.data, layer.weight.quant_state
        )
        return layer, original

    layer, original = repacked_twin()
    assert layer.weight.quant_state.packing_format_for_cpu and layer.weight.shape == (64, 64)
    model = nn.Sequential(layer)
    lc.apply_lora(model, lc.LoraConfig(r=4, target_modules=["0"], quantize="nf4"))
    adopted = lc.dequantize_nf4(model[0].base.q, torch.float32)

    twin, _ = repacked_twin()
    saved = twin.state_dict()  # bitsandbytes restores its own layout to save
    want = decode_bnb_fields(saved["weight"], twin.weight.quant_state)
    assert torch.equal(adopted, want)
    # The same nibbles as before the repacking; only the absmax went through bf16 (relative error < 2^-8).
    torch.testing.assert_close(adopted, original, rtol=2**-8, atol=0)


def test_quantize_none_adopts_targets_and_leaves_the_rest_to_bitsandbytes(tiny_llama_dir: Path) -> None:
    model = load_4bit(tiny_llama_dir)
    cfg = lc.LoraConfig(r=4, target_modules=TARGETS)  # quantize="none": quantize_base False
    assert cfg.quantize_base is False
    lc.apply_lora(model, cfg)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert type(q_proj) is lc.LoRALinear and isinstance(q_proj.base, NF4Base)
    assert is_bnb_4bit(model.model.layers[0].mlp.up_proj)
    ids = torch.randint(0, 64, (1, 8))
    loss = model(ids, labels=ids).loss
    loss.backward()  # gradients reach the adapters through the adopted NF4 base
    assert q_proj.lora_B.weight.grad is not None and q_proj.lora_B.weight.grad.abs().sum() > 0
    plain = lc.unload_lora(model, dequantize=True).model.layers[0].self_attn.q_proj
    assert type(plain) is nn.Linear and plain.weight.shape == (64, 64)


def test_quantize_base_on_a_dense_model(tiny_llama_dir: Path) -> None:
    def linears(model: nn.Module) -> dict[str, str]:
        kinds = (nn.Linear, lc.NF4Linear, lc.LoRALinear)
        return {p: type(m).__name__ for p, m in model.named_modules()
                if isinstance(m, kinds) and not p.split(".")[-1].startswith("lora_")}  # fmt: skip

    dense = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    cfg = lc.LoraConfig(r=4, target_modules=TARGETS, quantize="nf4", quant_block_size=32, double_quant=False)
    assert cfg.quantize_base is True  # QLoRA's default: the whole base in 4 bit
    lc.apply_lora(dense, cfg)
    kinds = linears(dense)
    assert kinds.pop("lm_head") == "Linear"
    assert {p.rsplit(".", 1)[-1] for p, k in kinds.items() if k == "QLoRALinear"} == set(TARGETS)
    assert {k for p, k in kinds.items() if p.rsplit(".", 1)[-1] not in TARGETS} == {"NF4Linear"}
    nf4 = dense.model.layers[0].mlp.gate_proj
    assert (nf4.base.q.block_size, nf4.base.q.double_quant) == (32, False)
    assert not any(p.requires_grad for p in nf4.parameters())
    assert "quantize_base" not in lc.get_lora_config(dense).to_peft_dict()  # not part of an adapter
    only = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    lc.apply_lora(only, lc.LoraConfig(r=4, target_modules=TARGETS, quantize="nf4", quantize_base=False))
    assert type(only.model.layers[0].mlp.gate_proj) is nn.Linear
    saved = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    cfg = lc.LoraConfig(r=4, target_modules=TARGETS, quantize="nf4", modules_to_save=["mlp"])
    lc.apply_lora(saved, cfg)
    assert type(saved.model.layers[0].mlp.gate_proj) is nn.Linear  # trained fully: not quantized
    assert type(saved.model.layers[0].self_attn.o_proj) is lc.NF4Linear


def test_reprs_show_the_nf4_base(tiny_llama_dir: Path) -> None:
    model = load_4bit(tiny_llama_dir)
    lc.apply_lora(model, lc.LoraConfig(r=4, target_modules=TARGETS, quantize="nf4"))
    text = repr(model.model.layers[0].self_attn)
    assert "(q_proj): QLoRALinear(\n    LoRA: in_features=64, out_features=64, r=4" in text
    assert "nf4 block_size=64, double_quant=True, dtype=float32" in text
    assert "NF4Linear(in_features=64, out_features=64, nf4 block_size=64, double_quant=True" in text


def test_errors_name_the_argument(tiny_llama_dir: Path) -> None:
    with pytest.raises(ValueError, match="quantize_base"):
        lc.LoraConfig(quantize_base=True)
    with pytest.raises(TypeError, match="quantize_base"):
        lc.LoraConfig(quantize="nf4", quantize_base="yes")
    fp4 = load_4bit(tiny_llama_dir, quant_type="fp4")
    with pytest.raises(ValueError, match="quant_type='fp4'"):
        lc.apply_lora(fp4, lc.LoraConfig(r=4, target_modules=TARGETS, quantize="nf4"))
    assert is_bnb_4bit(fp4.model.layers[0].self_attn.q_proj)  # refused before any change


def test_a_linear4bit_layer_alone() -> None:
    torch.manual_seed(3)
    dense = nn.Linear(128, 64, bias=True)
    layer = bnb.nn.Linear4bit(128, 64, bias=True, quant_type="nf4", compute_dtype=torch.float32)
    layer.load_state_dict(dense.state_dict())
    layer = layer.to("cpu")  # bitsandbytes quantizes on the move
    w = decode_bnb_fields(layer.weight.data, layer.weight.quant_state)
    q = lc.QLoRALinear.from_linear(layer, r=2, alpha=4)
    x = torch.randn(4, 128)
    torch.testing.assert_close(q(x), F.linear(x, w, dense.bias), rtol=0, atol=0)  # B = 0 at init
    assert q.bias is layer.bias
