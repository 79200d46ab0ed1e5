"""Which adapters a model holds, and adding one more: the bookkeeping under ``surgery`` and ``multi``.

The model root keeps three attributes (set with ``object.__setattr__``, so they are no submodules and never
reach the state dict): ``_lora_configs`` ({adapter name: LoraConfig}, in the order they were added),
``_lora_config`` (the first adapter's, what ``get_lora_config`` returns) and ``_lora_active`` (the
active adapter names). Each ``LoRALinear`` holds its own adapters (``lora_core.lora.slots``) and its
``active_adapters``.

Which LoRA layer class adapts a module (`lora_class_for`: `LoRALinear`, `LoRAEmbedding`, `LoRAConv`) and the
per-target plan ``apply_lora`` follows (`plan_layers`) live here too.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from lora_core.lora.config import LoraConfig
from lora_core.lora.conv import LoRAConv
from lora_core.lora.embedding import LoRAEmbedding
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


# The layer types LoRA adapts, beside linear layers; "all-linear" (`features_of`) leaves them out.
OTHER_LAYERS: tuple[type[LoRALinear], ...] = (LoRAEmbedding, LoRAConv)
TARGET_TYPES = "nn.Linear, GPT-2 Conv1D, nn.Embedding, nn.Conv1d and nn.Conv2d"


def features_of(module: nn.Module) -> tuple[int, int] | None:
    """``(in, out)`` of a linear layer, or of a linear LoRA layer (a target for one more adapter)."""
    if isinstance(module, OTHER_LAYERS):
        return None
    if isinstance(module, LoRALinear):
        return module.in_features, module.out_features
    return linear_features(module)


def lora_class_for(module: nn.Module) -> type[LoRALinear] | None:
    """The LoRA layer class that adapts ``module`` (a LoRA layer: its own class); None for other modules."""
    if isinstance(module, LoRALinear):
        return type(module)
    return next((cls for cls in (*OTHER_LAYERS, LoRALinear) if cls.features(module) is not None), None)


def plan_layers(
    model: nn.Module, cfg: LoraConfig, paths: list[str]
) -> list[tuple[str, int, float, type[LoRALinear], dict[str, object]]]:
    """``(path, r, alpha, layer class, extra arguments)`` for each target ``apply_lora`` adapts.

    Raises:
        ValueError: ``r`` larger than a layer's ``min(in, out)``; ``quantize="nf4"`` or an init other than
            ``"default"`` / ``"gaussian"`` on an embedding or conv target (each message names the module).
    """
    modules = dict(model.named_modules())
    plan = []
    for path in paths:
        module = modules[path]
        cls: type[LoRALinear] = lora_class_for(module)  # type: ignore[assignment]  # find_targets checked
        r, alpha = cfg.rank_and_alpha(path)
        n_in, n_out = cls.in_out(module)
        if r > min(n_in, n_out):
            raise ValueError(f"r={r} is larger than min(in, out)={min(n_in, n_out)} of module {path!r}")
        extra: dict[str, object] = {}
        if issubclass(cls, OTHER_LAYERS):
            kind = type(module).__name__
            if cfg.quantize == "nf4":
                raise ValueError(
                    f"quantize='nf4' quantizes linear layers only; target module {path!r} is a {kind}: leave "
                    "it out of target_modules or use quantize='none'"
                )
            if cfg.init not in ("default", "gaussian"):
                raise ValueError(
                    f"init={cfg.init!r} is for linear layers; target module {path!r} is a {kind}, which "
                    "takes init 'default' or 'gaussian'"
                )
        elif cfg.quantize == "nf4" and not isinstance(module, LoRALinear):
            from lora_core.lora.qlora import QLoRALinear  # lazily: the NF4 path is optional

            cls = QLoRALinear
            extra = {"quant_block_size": cfg.quant_block_size, "double_quant": cfg.double_quant}
        plan.append((path, r, alpha, cls, extra))
    return plan


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
    model: nn.Module, cfg: LoraConfig, name: str,
    plan: list[tuple[str, int, float, type[LoRALinear], dict[str, object]]], device: torch.device | None,
) -> nn.Module:  # fmt: skip
    """``apply_lora`` on a model with adapters: a new, inactive, frozen adapter ``name`` on each target
    (``plan``: `plan_layers`)."""
    active = list(getattr(model, ACTIVE_ATTR, []))
    for path, r, alpha, cls, extra in plan:
        module = model.get_submodule(path) if path else model
        kwargs = dict(r=r, alpha=alpha, dropout=cfg.dropout, use_rslora=cfg.use_rslora, use_dora=cfg.use_dora)
        if isinstance(module, LoRALinear):
            module.add_adapter(name, init=cfg.init, **kwargs)  # type: ignore[arg-type]
            layer = module
        else:
            if device is not None:
                module.to(device)
            layer = cls.from_module(
                module, init=cfg.init, fan_in_fan_out=cfg.fan_in_fan_out, adapter_name=name, **kwargs, **extra
            )  # type: ignore[arg-type]
            layer.requires_grad_(False)
            replace_module(model, path, layer)
        layer.active_adapters = [n for n in active if n in layer.lora_specs]
        for p in layer.adapter_parameters(name):
            p.requires_grad_(False)
    configs = {**adapter_configs(model), name: _saved_targets(cfg, [p for p, *_ in plan])}
    object.__setattr__(model, CONFIGS_ATTR, configs)
    return model
