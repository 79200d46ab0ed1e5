"""Several adapters in one model: list, switch, delete, disable, and one adapter per row of a batch.

    lc.apply_lora(model, cfg, adapter_name="fr")   add an adapter (lora_core.lora.surgery)
    lc.load_adapter(model, path, adapter_name=...)  add one from disk (lora_core.lora.adapters)
    lc.list_adapters(model)        ["default", "fr"]: every adapter, in the order they were added
    lc.set_adapter(model, "fr")    the active adapter(s); several active ones add their updates
    lc.active_adapters(model)      ["fr"]
    lc.delete_adapter(model, "default")
    with lc.disable_adapter(model): ...               the base model alone
    with lc.mixed_adapters(model, ["fr", "__base__"]): model(batch)    row i through adapter names[i]

PEFT's semantics (``PeftModel.set_adapter`` and friends): switching makes the active adapters' tensors
trainable and freezes the others; a merged model is unmerged (with a warning) before switching. Every
check runs before the model changes: an unknown name, deleting the active adapter, a mixed batch on a
merged model raise ValueError naming the adapters, and the model is as it was.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from torch import nn

from lora_core.lora.layer import LoRALinear
from lora_core.lora.registry import (
    ACTIVE_ATTR,
    CONFIG_ATTR,
    CONFIGS_ATTR,
    adapter_configs,
    lora_layers,
    replace_module,
)
from lora_core.lora.slots import BASE


def list_adapters(model: nn.Module) -> list[str]:
    """Every adapter of ``model``, in the order they were added (``[]`` without LoRA layers)."""
    return list(adapter_configs(model))


def active_adapters(model: nn.Module) -> list[str]:
    """The active adapters of ``model`` (``set_adapter``'s choice).

    Raises:
        ValueError: the model has no LoRA layers.
    """
    if not adapter_configs(model):
        raise ValueError("the model has no LoRA layers (apply_lora or load_adapter first)")
    return list(getattr(model, ACTIVE_ATTR))


def _names(model: nn.Module, names: object, what: str, allowed: Sequence[str] = ()) -> list[str]:
    """``names`` (one or a sequence) as a list, each an adapter of ``model`` (or in ``allowed``)."""
    have = list_adapters(model)
    if not have:
        raise ValueError("the model has no LoRA layers (apply_lora or load_adapter first)")
    out = [names] if isinstance(names, str) else names
    if not isinstance(out, (list, tuple)) or not out or not all(isinstance(n, str) for n in out):
        raise TypeError(f"{what} must be an adapter name or a non-empty list of them, got {names!r}")
    unknown = sorted({n for n in out if n not in have and n not in allowed})
    if unknown:
        raise ValueError(f"{what}: no adapter named {unknown}; the model has {have}")
    return list(out)


def set_adapter(model: nn.Module, adapter_name: str | Sequence[str]) -> None:
    """Make ``adapter_name`` (or several: their updates add) the active adapter(s); they train, the
    others are frozen. A merged model is unmerged first (PEFT warns and does the same).

    Raises:
        ValueError: an unknown name (the model is unchanged); TypeError: not a name or a list of names.
    """
    names = _names(model, adapter_name, "set_adapter")
    layers = [layer for _, layer in lora_layers(model)]
    if any(layer.merged for layer in layers):
        warnings.warn("set_adapter on a merged model: unmerging it first", UserWarning, stacklevel=2)
        for layer in layers:
            if layer.merged:
                layer.unmerge()
    for layer in layers:
        layer.active_adapters = [n for n in names if n in layer.lora_specs]
        for name in layer.adapter_names():
            for p in layer.adapter_parameters(name):
                p.requires_grad_(name in names)
    object.__setattr__(model, ACTIVE_ATTR, names)


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Remove adapter ``adapter_name`` from every layer; a layer left without adapters becomes the plain
    module again.

    Raises:
        ValueError: an unknown name; the adapter is active (``set_adapter`` another first) or merged.
    """
    if not isinstance(adapter_name, str):
        raise TypeError(f"delete_adapter takes one adapter name, got {adapter_name!r}")
    (name,) = _names(model, adapter_name, "delete_adapter")
    if name in active_adapters(model):
        raise ValueError(
            f"delete_adapter: {name!r} is active (active: {active_adapters(model)}); "
            "set_adapter(model, ...) to another adapter first"
        )
    layers = list(lora_layers(model))
    if any(name in layer.merged_adapters for _, layer in layers):
        raise ValueError(f"delete_adapter: {name!r} is merged into the base; unmerge_lora(model) first")
    for path, layer in layers:
        if name not in layer.lora_specs:
            continue
        layer.delete_adapter(name)
        if not layer.lora_specs and path:  # no adapter left here: the plain module again
            replace_module(model, path, layer.base.plain_module(None, layer.bias, layer.training))
    configs = adapter_configs(model) if any(True for _ in lora_layers(model)) else {}
    configs.pop(name, None)
    object.__setattr__(model, CONFIGS_ATTR, configs)
    if configs:
        object.__setattr__(model, CONFIG_ATTR, next(iter(configs.values())))


@contextmanager
def disable_adapter(model: nn.Module) -> Iterator[nn.Module]:
    """``with lc.disable_adapter(model): model(x)`` runs the base model alone. Merged layers are unmerged
    for the block and merged again after it; the state comes back on exit, also after an exception.

    Raises:
        ValueError: the model has no LoRA layers.
    """
    if not list_adapters(model):
        raise ValueError("the model has no LoRA layers (apply_lora or load_adapter first)")
    layers = [layer for _, layer in lora_layers(model)]
    before = [(layer.disabled, list(layer.merged_adapters)) for layer in layers]
    try:
        for layer in layers:
            if layer.merged:
                layer.unmerge()
            layer.disabled = True
        yield model
    finally:
        for layer, (disabled, merged) in zip(layers, before):
            layer.disabled = disabled
            if merged and not layer.merged:
                layer.merge(merged)


@contextmanager
def mixed_adapters(model: nn.Module, adapter_names: Sequence[str]) -> Iterator[nn.Module]:
    """``with lc.mixed_adapters(model, names): model(batch)``: row ``i`` of the batch (dim 0 of each LoRA
    layer's input) goes through adapter ``names[i]`` alone, ``"__base__"`` through none. Equals running
    each row with its adapter active (PEFT's ``model(..., adapter_names=names)``); gradients flow to every
    adapter used. On CUDA the plain LoRA adapters run through per-row Triton kernels in one pass
    (``lora_core.lora.mixed``); DoRA adapters, dropout in effect and every adapter elsewhere take the
    reference (the base once for the whole batch, each adapter's update on its own rows).

    Raises:
        ValueError: an unknown name (named); a merged model (unmerge first); TypeError: not a list of str.
    """
    if isinstance(adapter_names, str):
        raise TypeError("adapter_names must be a list with one adapter name per row, got a str")
    names = _names(model, list(adapter_names), "mixed_adapters", allowed=(BASE,))
    layers = [layer for _, layer in lora_layers(model)]
    if any(layer.merged for layer in layers):
        raise ValueError("mixed_adapters on a merged model: unmerge_lora(model) first")
    before = [layer.row_adapters for layer in layers]
    try:
        for layer in layers:
            layer.row_adapters = names
        yield model
    finally:
        for layer, rows in zip(layers, before):
            layer.row_adapters = rows


def adapter_layers(model: nn.Module, adapter_name: str) -> list[tuple[str, LoRALinear]]:
    """``(path, layer)`` of every layer holding adapter ``adapter_name``."""
    return [(p, layer) for p, layer in lora_layers(model) if adapter_name in layer.lora_specs]


__all__ = [
    "active_adapters",
    "adapter_layers",
    "delete_adapter",
    "disable_adapter",
    "list_adapters",
    "mixed_adapters",
    "set_adapter",
]
