"""Interoperability with the real ``peft`` package, both ways, on small random-weight transformers models.

lora_core → PEFT: an adapter from ``save_adapter`` loads with ``PeftModel.from_pretrained`` and gives the
same outputs. PEFT → lora_core: an adapter from ``save_pretrained`` loads with ``load_adapter`` and gives the
same outputs. Trainable parameter counts equal PEFT's for the same config.
"""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import lora_core as lc
from lora_core.lora.surgery import lora_layers

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def _llama() -> nn.Module:
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(cfg)


def _bert_cls() -> nn.Module:
    cfg = transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=32, num_labels=3,
    )  # fmt: skip
    return transformers.BertForSequenceClassification(cfg)


def _gpt2() -> nn.Module:
    return transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32)
    )


MODELS = {"llama": _llama, "bert": _bert_cls, "gpt2": _gpt2}
IDS = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))

# (model, our config kwargs); PEFT gets the same values under its names.
CASES = {
    "llama-lora": ("llama", {"target_modules": ["q_proj", "v_proj"]}),
    "llama-rslora": ("llama", {"target_modules": ["q_proj", "v_proj", "down_proj"], "use_rslora": True}),
    "llama-dora": ("llama", {"target_modules": ["k_proj", "o_proj"], "use_dora": True}),
    "bert-seqcls": ("bert", {"target_modules": ["query", "value"], "task_type": "SEQ_CLS"}),
    "gpt2-conv1d": ("gpt2", {"target_modules": ["c_attn", "c_fc"], "fan_in_fan_out": True, "use_dora": True}),
}


@pytest.fixture(scope="module")
def bases() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {name: make().eval() for name, make in MODELS.items()}


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _peft_config(kwargs: dict) -> peft.LoraConfig:
    return peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=kwargs["target_modules"],
        use_rslora=kwargs.get("use_rslora", False), use_dora=kwargs.get("use_dora", False),
        fan_in_fan_out=kwargs.get("fan_in_fan_out", False),
        task_type=kwargs.get("task_type"), init_lora_weights=False,  # random B too, so adapters matter
        bias=kwargs.get("bias", "none"),
    )  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_lora_core_adapter_loads_in_peft(bases, case, tmp_path):
    name, kwargs = CASES[case]
    base = bases[name]
    model = lc.apply_lora(copy.deepcopy(base), lc.LoraConfig(r=4, alpha=8, **kwargs))
    torch.manual_seed(1)
    for _, layer in lora_layers(model):
        nn.init.normal_(layer.lora_B.weight, std=0.2)
        if layer.use_dora:
            with torch.no_grad():
                layer.lora_magnitude_vector.mul_(1.3)
    if name == "bert":
        nn.init.normal_(model.classifier.weight)  # a trained head, saved with the adapter
    model.eval()
    ours = _logits(model)
    assert not torch.allclose(ours, _logits(base))  # the adapter changes something
    lc.save_adapter(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    torch.testing.assert_close(_logits(theirs), ours)


@pytest.mark.parametrize("case", CASES)
def test_peft_adapter_loads_in_lora_core(bases, case, tmp_path):
    name, kwargs = CASES[case]
    base = bases[name]
    torch.manual_seed(2)
    theirs = peft.get_peft_model(copy.deepcopy(base), _peft_config(kwargs))
    if name == "bert":
        nn.init.normal_(theirs.base_model.model.classifier.modules_to_save["default"].weight)
    theirs.eval()
    expected = _logits(theirs)
    theirs.save_pretrained(str(tmp_path))
    ours = lc.load_adapter(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(_logits(ours), expected)
    # merged and unloaded, still the same function
    plain = lc.unload_lora(ours)
    assert not list(lora_layers(plain)) and set(plain.state_dict()) == set(base.state_dict())
    torch.testing.assert_close(_logits(plain), expected)


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("llama", {"target_modules": ["q_proj", "v_proj"], "bias": "all"}),
        ("llama", {"target_modules": "all-linear", "use_dora": True}),
        (
            "llama",
            {
                "target_modules": ["q_proj", "up_proj"],
                "layers_to_transform": [1],
                "rank_pattern": {"up_proj": 2},
            },
        ),
        ("bert", {"target_modules": ["query", "key", "value"], "task_type": "SEQ_CLS", "bias": "lora_only"}),
        ("gpt2", {"target_modules": "all-linear", "fan_in_fan_out": True}),
    ],
)
def test_trainable_counts_equal_peft(bases, name, kwargs):
    base = bases[name]
    ours = lc.trainable_parameters(lc.apply_lora(copy.deepcopy(base), lc.LoraConfig(r=4, alpha=8, **kwargs)))
    theirs_cfg = peft.LoraConfig(
        r=4, lora_alpha=8, **{k: v for k, v in kwargs.items() if k not in ("layers_to_transform",)},
        layers_to_transform=kwargs.get("layers_to_transform"),
    )  # fmt: skip
    theirs = peft.get_peft_model(copy.deepcopy(base), theirs_cfg)
    trainable, total = theirs.get_nb_trainable_parameters()
    assert ours.trainable == trainable
    if "task_type" not in kwargs:  # PEFT keeps a second copy of modules_to_save, so only then totals differ
        assert ours.total == total


def test_all_linear_with_layers_to_transform_loads_in_peft(bases, tmp_path):
    # PEFT's LoraConfig refuses a string target with layers_to_transform; "all-linear" is saved resolved.
    base = bases["llama"]
    cfg = lc.LoraConfig(r=4, alpha=8, target_modules="all-linear", layers_to_transform=[1])
    model = lc.apply_lora(copy.deepcopy(base), cfg)
    torch.manual_seed(3)
    for _, layer in lora_layers(model):
        nn.init.normal_(layer.lora_B.weight, std=0.2)
    assert {p.split(".")[2] for p, _ in lora_layers(model)} == {"1"}
    lc.save_adapter(model.eval(), tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    torch.testing.assert_close(_logits(theirs), _logits(model))
    back = lc.load_adapter(copy.deepcopy(base), tmp_path)
    assert [p for p, _ in lora_layers(back)] == [p for p, _ in lora_layers(model)]


# Trained biases: PEFT keeps an adapted layer's bias at `<path>.base_layer.bias` (other layers' at
# `<path>.bias`) and, with bias="all", also writes its head's `classifier.modules_to_save.bias` and
# `classifier.original_module.bias`.
BERT_QV = {"target_modules": ["query", "value"], "task_type": "SEQ_CLS"}
BIAS_CASES = {
    "bert-seqcls-lora_only": ("bert", {**BERT_QV, "bias": "lora_only"}),
    "bert-seqcls-all": ("bert", {**BERT_QV, "bias": "all"}),
    "gpt2-all": ("gpt2", {"target_modules": ["c_attn"], "fan_in_fan_out": True, "bias": "all"}),
}  # fmt: skip


def _train_biases(model: nn.Module) -> list[str]:
    """Give every trainable bias a random value (as training would); return their names."""
    names = [n for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias")]
    with torch.no_grad():
        for n in names:
            model.get_parameter(n).normal_(std=0.5)
    return names


@pytest.mark.parametrize("case", BIAS_CASES)
def test_trained_biases_round_trip_to_peft(bases, case, tmp_path):
    name, kwargs = BIAS_CASES[case]
    base = bases[name]
    model = lc.apply_lora(copy.deepcopy(base), lc.LoraConfig(r=4, alpha=8, **kwargs))
    torch.manual_seed(4)
    for _, layer in lora_layers(model):
        nn.init.normal_(layer.lora_B.weight, std=0.2)
    assert _train_biases(model)
    model.eval()
    ours = _logits(model)
    lc.save_adapter(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    torch.testing.assert_close(_logits(theirs), ours, atol=1e-5, rtol=0)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    for path, _ in lora_layers(model):
        assert f"base_model.model.{path}.base_layer.bias" in saved
        assert f"base_model.model.{path}.bias" not in saved
    back = lc.load_adapter(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(_logits(back), ours, atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", BIAS_CASES)
def test_peft_trained_biases_load_in_lora_core(bases, case, tmp_path):
    name, kwargs = BIAS_CASES[case]
    base = bases[name]
    torch.manual_seed(5)
    theirs = peft.get_peft_model(copy.deepcopy(base), _peft_config(kwargs))
    assert _train_biases(theirs)
    if name == "bert":
        nn.init.normal_(theirs.base_model.model.classifier.modules_to_save["default"].weight)
    theirs.eval()
    expected = _logits(theirs)
    assert not torch.allclose(expected, _logits(base))
    theirs.save_pretrained(str(tmp_path))
    ours = lc.load_adapter(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(_logits(ours), expected, atol=1e-5, rtol=0)
