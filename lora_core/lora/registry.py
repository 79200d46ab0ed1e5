"""Which adapters a model holds, and adding one more: the bookkeeping under ``surgery`` and ``multi``.

The model root keeps three attributes (set with ``object.__setattr__``, so they are no submodules and never
reach the state dict): ``_lora_configs`` ({adapter name: LoraConfig}, in the order they were added),
``_lora_config`` (the first adapter's, what ``get_lora_config`` returns) and ``_lora_active`` (the
active adapter names). Each ``LoRALinear`` holds its own adapters (``lora_core.lora.slots``) and its
``active_adapters``.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from lora_core.lora.config import LoraConfig
from lora_core.lora.layer import LoRALinear, linear_features
from lora_core.lora.slots import DEFAULT

CONFIG_ATTR = "_lora_config"
CONFIGS_ATTR = "_lora_configs"  # {adapter name: LoraConfig}, in the order the adapters were added
ACTIVE_ATTR = "_lora_active"  # [adapter name]: what set_adapter chose


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """``(path, layer)`` for every ``LoRALinear`` in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def features_of(module: nn.Module) -> tuple[int, int] | None:
    """``(in, out)`` of a linear layer, or of a LoRA layer (a target for one more adapter)."""
    if isinstance(module, LoRALinear):
        return module.in_features, module.out_features
    return linear_features(module)


def adapter_configs(model: nn.Module) -> dict[str, LoraConfig]:
    """``{adapter name: its LoraConfig}`` of ``model`` (empty without LoRA layers)."""
    if not any(True for _ in lora_layers(model)):
        return {}
    return dict(getattr(model, CONFIGS_ATTR, None) or {DEFAULT: getattr(model, CONFIG_ATTR)})


def check_new_adapter_name(model: nn.Module, name: str, hint: str) -> None:
    """A ValueError naming the model's adapters when ``name`` is taken (``hint``: what to do instead)."""
    existing = adapter_configs(model)
    if name in existing:
        raise ValueError(
            f"the model already has LoRA layers with an adapter named {name!r} (adapters: {list(existing)}); "
            f"{hint}"
        )


def replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, child, new)


def _saved_targets(cfg: LoraConfig, paths: list[str]) -> LoraConfig:
    targets = sorted({p.rsplit(".", 1)[-1] for p in paths}) if cfg.target_modules == "all-linear" else None
    return LoraConfig(**{**cfg.__dict__, "target_modules": targets or cfg.target_modules})


def add_model_adapter(
    model: nn.Module, cfg: LoraConfig, name: str, plan: list[tuple[str, int, float]], cls: type[LoRALinear],
    extra: dict[str, object], device: torch.device | None,
) -> nn.Module:  # fmt: skip
    """``apply_lora`` on a model with adapters: a new, inactive, frozen adapter ``name`` on each target."""
    active = list(getattr(model, ACTIVE_ATTR, []))
    for path, r, alpha in plan:
        module = model.get_submodule(path) if path else model
        kwargs = dict(r=r, alpha=alpha, dropout=cfg.dropout, use_rslora=cfg.use_rslora, use_dora=cfg.use_dora)
        if isinstance(module, LoRALinear):
            module.add_adapter(name, init=cfg.init, **kwargs)  # type: ignore[arg-type]
            layer = module
        else:
            if device is not None:
                module.to(device)
            layer = cls.from_linear(
                module, init=cfg.init, fan_in_fan_out=cfg.fan_in_fan_out, adapter_name=name, **kwargs, **extra
            )  # type: ignore[arg-type]
            layer.requires_grad_(False)
            replace_module(model, path, layer)
        layer.active_adapters = [n for n in active if n in layer.lora_specs]
        for p in layer.adapter_parameters(name):
            p.requires_grad_(False)
    configs = {**adapter_configs(model), name: _saved_targets(cfg, [p for p, _, _ in plan])}
    object.__setattr__(model, CONFIGS_ATTR, configs)
    return model


