"""QLoRA as bitsandbytes + PEFT do it: the whole frozen base in 4 bit, not only the adapted layers.

``LoraConfig(quantize="nf4")`` quantizes the target layers (they become ``QLoRALinear``); with
``quantize_base`` (its default under ``quantize="nf4"``) every other linear layer is stored in NF4 too, as
a frozen `NF4Linear`, except the output head (``lm_head`` / ``get_output_embeddings()``) and the modules
trained fully (``modules_to_save``): the same set ``BitsAndBytesConfig(load_in_4bit=True)`` quantizes.

    nn.Linear / GPT-2 Conv1D          → NF4Linear (quantized here: the config's block size, double quant)
    bitsandbytes Linear4bit (nf4)     → NF4Linear over its very bytes (nothing dequantized or requantized)
    NF4Linear                         → left as it is

The plan (`frozen_linear_paths`) is made before the model changes, so a failure leaves it as it was.
"""

from __future__ import annotations

import torch
from torch import nn

from lora_core.lora.bases import NF4Base, NF4Linear, is_bnb_4bit, linear_features


def frozen_linear_paths(model: nn.Module, skip: set[str], saved: list[str]) -> list[str]:
    """Paths of the linear layers to store in NF4: every ``nn.Linear`` / ``Conv1D`` / bitsandbytes
    Linear4bit that is not in ``skip`` (targets, output head), not inside a module of ``saved``
    (``modules_to_save``) and not already an `NF4Linear`.

    Raises:
        TypeError: such a layer holds a weight that cannot become NF4 (e.g. bitsandbytes 8-bit).
    """
    paths = []
    for path, module in model.named_modules():
        if not path or path in skip or isinstance(module, NF4Linear) or linear_features(module) is None:
            continue
        if any(path == s or path.startswith(s + ".") for s in saved):
            continue
        weight = getattr(module, "weight", None)
        if not is_bnb_4bit(module) and not (isinstance(weight, torch.Tensor) and weight.is_floating_point()):
            raise TypeError(
                f"quantize_base: {path!r} is a {type(module).__name__} with a "
                f"{getattr(weight, 'dtype', None)} weight, which cannot be stored in NF4; pass "
                "quantize_base=False or exclude it"
            )
        paths.append(path)
    return paths


def quantize_frozen_linears(
    model: nn.Module, paths: list[str], block_size: int, double_quant: bool, device: torch.device | None
) -> None:
    """Replace each module at ``paths`` by a frozen `NF4Linear` (on ``device`` first, when given, so a GPU
    holds one dense weight at a time)."""
    for path in paths:
        module = model.get_submodule(path)
        if device is not None:
            module.to(device)
        base = NF4Base.from_module(module, block_size, double_quant)
        bias = module.bias
        if bias is not None:
            bias.requires_grad_(False)
        nf4 = NF4Linear(base, bias).train(module.training)
        parent, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, nf4)


def dequantize_frozen_linears(model: nn.Module) -> None:
    """Replace every frozen `NF4Linear` in ``model`` by an ``nn.Linear`` holding ``dequant(W)`` exactly (the
    weights the model computed with), bias kept: what ``unload_lora(dequantize=True)`` does to the
    layers ``quantize_base`` stored in NF4, so that the result is a plain dense model."""
    for path, module in [(p, m) for p, m in model.named_modules() if isinstance(m, NF4Linear)]:
        weight = module.base.dense_weight()  # (out, in), the dtype the weight was quantized from
        dense = nn.Linear(module.in_features, module.out_features, bias=False, device=weight.device)
        dense.weight = nn.Parameter(weight, requires_grad=False)
        dense.bias = module.bias
        dense.train(module.training)
        parent, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, dense)


__all__ = ["dequantize_frozen_linears", "frozen_linear_paths", "quantize_frozen_linears"]
