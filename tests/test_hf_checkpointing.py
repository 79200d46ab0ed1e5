"""Gradient checkpointing with the whole base frozen: every LoRA parameter gets the gradient it gets
without checkpointing, whether ``gradient_checkpointing_enable`` comes before or after ``apply_lora`` and
with reentrant checkpointing too (where a block whose input does not require grad passes no gradient to its
parameters). ``apply_lora`` registers transformers' input-embedding hook (``enable_input_require_grads``)
once, ``unload_lora`` removes it. Real transformers models: the tiny Llama and a tiny ViT (``pixel_values``:
transformers registers no hook of its own for it)."""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
from tiny_llama import tiny_llama_model
from tolerances import assert_close
from torch import nn

import lora_core as lc
from lora_core.lora.hf_model import _inputs_require_grad

transformers = pytest.importorskip("transformers")

CFG = lc.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init="gaussian")
IDS = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))


def with_lora(model: nn.Module) -> nn.Module:
    """``apply_lora`` with B ≠ 0 (seeded: A's init and B), so that A's gradients are not zero either."""
    torch.manual_seed(1)
    lc.apply_lora(model, CFG)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    return model


def lora_grads(model: nn.Module, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
    """One training forward/backward; the gradient of every LoRA parameter (zeros where none arrived)."""
    model.train()
    model.zero_grad(set_to_none=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "use_cache=True is incompatible with gradient checkpointing"
        loss = model(**inputs).loss
    if loss.requires_grad:
        loss.backward()
    return {
        n: torch.zeros_like(p) if p.grad is None else p.grad.clone()
        for n, p in model.named_parameters()
        if "lora_" in n
    }


def checkpointing(model: nn.Module, reentrant: bool | None) -> None:
    kwargs = None if reentrant is None else {"use_reentrant": reentrant}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' deprecation of the old name
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def our_hooks(model: nn.Module) -> int:
    return sum(h is _inputs_require_grad for m in model.modules() for h in m._forward_hooks.values())


@pytest.mark.parametrize(
    "order, reentrant, theirs",  # theirs: transformers' own embedding hook kept (else removed: ours alone)
    [("before", True, True), ("after", True, False), ("before", True, False), ("after", None, True)],
)
def test_llama_lora_gradients_equal_those_without_checkpointing(order: str, reentrant: bool, theirs: bool):
    base = tiny_llama_model()
    want = lora_grads(with_lora(copy.deepcopy(base)), input_ids=IDS, labels=IDS)
    assert all(g.abs().sum() > 0 for g in want.values())
    model = copy.deepcopy(base)
    if order == "before":
        checkpointing(model, reentrant)
    with_lora(model)
    if order == "after":
        checkpointing(model, reentrant)
    if not theirs:  # as with a transformers that registers none (4.x without PEFT): ours must suffice
        model.disable_input_require_grads()
    assert model.is_gradient_checkpointing and our_hooks(model) == 1
    got = lora_grads(model, input_ids=IDS, labels=IDS)
    assert got.keys() == want.keys()
    for name in want:
        assert_close(got[name], want[name])


def tiny_vit() -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(
        image_size=16, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=64, num_labels=3,
    )  # fmt: skip
    return transformers.ViTForImageClassification(cfg)


def test_vit_with_reentrant_checkpointing() -> None:
    base = tiny_vit()  # main input pixel_values: transformers' checkpointing registers no embedding hook
    inputs = {"pixel_values": torch.randn(2, 3, 16, 16), "labels": torch.tensor([0, 2])}
    want = lora_grads(with_lora(copy.deepcopy(base)), **inputs)
    model = with_lora(copy.deepcopy(base))
    checkpointing(model, reentrant=True)
    assert not getattr(model, "_require_grads_hooks", None)  # nothing from transformers
    got = lora_grads(model, **inputs)
    for name in want:
        assert want[name].abs().sum() > 0
        assert_close(got[name], want[name])


def test_the_hook_is_registered_once_and_removed_on_unload() -> None:
    model = tiny_llama_model()
    lc.apply_lora(model, CFG)
    lc.apply_lora(model, CFG, adapter_name="second")  # a second adapter: still one hook
    assert our_hooks(model) == 1
    with torch.no_grad():  # never in no_grad / inference: the embedding output stays a plain tensor
        assert not model.model.embed_tokens(IDS).requires_grad
    with torch.inference_mode():
        model(IDS)
    clone = copy.deepcopy(model)  # the hook is a module-level function: copies and pickles carry it
    assert our_hooks(clone) == 1 and our_hooks(pickle.loads(pickle.dumps(clone))) == 1
    assert clone.model.embed_tokens(IDS).requires_grad
    lc.unload_lora(model)
    assert our_hooks(model) == 0
