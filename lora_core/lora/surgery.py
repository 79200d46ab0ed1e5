"""Model surgery: put LoRA layers into any ``nn.Module``, fold them in, take them out.

    apply_lora(model, cfg)   every target Linear/Conv1D → LoRALinear, Embedding → LoRAEmbedding, Conv1d/2d →
                             LoRAConv (in place; `registry.plan_layers`); base frozen; on a model
                             that has adapters already, adds adapter ``adapter_name`` next to them
    merge_lora / unmerge_lora    W₀ ⇄ W₀ + s·BA in every layer not yet / already merged (exact up to rounding)
    unload_lora(model)           merged, adapters gone: the plain modules again
    trainable_parameters(model)  how much of the model trains
    plan_surgery / wrap_layer / finish_surgery   apply_lora in steps, for a model filled as it loads
                                 (``lc.load_pretrained`` wraps each target as soon as its weight is read)

Targets are matched by module path, as PEFT does (`lora_core.lora.targets`: names, a regex, "all-linear").
Everything is validated before the first module is replaced, so a failed
call leaves the model as it was. The configs are kept on the model (``model._lora_configs``, by adapter
name, and ``model._lora_config``, the first one's) for ``save_adapter``; ``model._lora_active`` lists the
active adapters (``lora_core.lora.multi`` switches them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lora_core.lora.bnb_models import check_linear4bits
from lora_core.lora.config import LoraConfig
from lora_core.lora.hf_model import disable_input_grads, enable_input_grads, record_quantization
from lora_core.lora.layer import LoRALinear
from lora_core.lora.quantize_base import (
    dequantize_frozen_linears,
    frozen_linear_paths,
    quantize_frozen_linears,
)
from lora_core.lora.registry import (
    ACTIVE_ATTR,
    CONFIG_ATTR,
    CONFIGS_ATTR,
    adapter_configs,
    add_model_adapter,
    check_new_adapter_name,
    lora_layers,
    plan_layers,
    replace_module,
)
from lora_core.lora.slots import DEFAULT, check_adapter_name
from lora_core.lora.targets import find_modules_to_save, find_targets, output_head
from lora_core.quant.nf4 import NF4Tensor

REQUIRES_GRAD_ATTR = "_lora_requires_grad"  # the parameters' flags before apply_lora, restored by unload


@dataclass(frozen=True)
class TrainableReport:
    """What ``trainable_parameters`` returns: counts of parameter elements."""

    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return (
            f"trainable params: {self.trainable:,} || all params: {self.total:,} "
            f"|| trainable%: {self.percent:.4f}"
        )


def trainable_parameters(model: nn.Module) -> TrainableReport:
    """Count trainable and all parameter elements (shared parameters once).

    A frozen NF4 base weight (``QLoRALinear`` / ``NF4Linear``) is no ``nn.Parameter`` but still counts in
    ``total`` with the elements it stands for (not its packed bytes), so QLoRA reports the same totals as
    the dense model it quantizes.
    """
    trainable = total = 0
    for p in model.parameters():
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, NF4Tensor):
            total += weight.numel
    return TrainableReport(trainable=trainable, total=total)


# ---- surgery ---------------------------------------------------------------------------------------------
def check_device(device: object, name: str = "device") -> torch.device:
    """``device`` as a ``torch.device`` that this process can allocate on; TypeError / ValueError naming
    ``name`` otherwise (torch would raise AssertionError for "cuda" without CUDA, and only on first use)."""
    if not isinstance(device, (str, int, torch.device)) or isinstance(device, bool):
        raise TypeError(
            f"{name} must be a torch.device, a name such as 'cpu' or 'cuda:0', or None; got {device!r}"
        )
    try:
        dev = torch.device(device)
        torch.empty(0, device=dev)  # the cheapest way to ask torch whether the device exists here
    except (AssertionError, RuntimeError) as err:
        raise ValueError(f"{name}={device!r} is not available in this process: {err}") from None
    return dev


def apply_lora(
    model: nn.Module,
    cfg: LoraConfig,
    device: torch.device | str | None = None,
    *,
    adapter_name: str = DEFAULT,
) -> nn.Module:
    """Replace the target layers of ``model`` by LoRA layers (in place) and freeze everything else:
    ``LoRALinear`` for ``nn.Linear`` / GPT-2 ``Conv1D``, ``LoRAEmbedding`` for ``nn.Embedding``, ``LoRAConv``
    for ``nn.Conv1d`` / ``nn.Conv2d`` (named in ``target_modules``; ``"all-linear"`` takes linear ones only).

    On a model that has adapters already, this adds adapter ``adapter_name`` next to them (same or other
    targets, rank, DoRA or not; as PEFT's ``add_adapter``): it is not active (``lc.set_adapter`` makes it
    so) and its tensors are frozen until then. Only the first adapter may train ``modules_to_save`` or
    biases (they are not kept per adapter).

    Trainable afterwards: the adapters (and DoRA magnitudes), the biases ``cfg.bias`` asks for, and
    ``modules_to_save``. With ``cfg.quantize == "nf4"`` the layers are ``lora_core.lora.qlora.QLoRALinear``.

    ``device``: move each target layer there just before wrapping it, then the rest of the model. For QLoRA
    on a model loaded on the CPU this quantizes on the GPU one layer at a time, so the GPU never holds more
    than the 4-bit model plus one dense weight (as bitsandbytes' quantize-on-load does).

    Returns:
        ``model`` (or the new layer when ``model`` itself is the only target).

    Raises:
        ValueError: ``adapter_name`` exists already; a second adapter with ``modules_to_save`` or
            ``bias != "none"``; a target name that matches nothing (the message lists the closest
            module names); ``r`` larger than a layer's ``min(in, out)``; nothing left to adapt; a ``device``
            this process cannot use (e.g. ``"cuda"`` without CUDA); an embedding / conv target with
            ``quantize="nf4"``, an init other than default / gaussian, or a conv with ``groups``,
            ``dilation`` or ``padding_mode`` other than the defaults.
        TypeError: ``cfg`` is not a LoraConfig; a target of another type; ``device`` of another type.
    """
    if not isinstance(cfg, LoraConfig):
        raise TypeError(f"cfg must be a lora_core.LoraConfig, got {type(cfg).__name__}")
    check_adapter_name(adapter_name)
    check_new_adapter_name(model, adapter_name, "choose another adapter_name or delete_adapter it first")
    existing = adapter_configs(model)
    if existing and (cfg.effective_modules_to_save() or cfg.bias != "none"):
        raise ValueError(
            f"adapter {adapter_name!r}: only the first adapter ({next(iter(existing))!r}) may train "
            "modules_to_save or biases; use modules_to_save=None, bias='none' for the others"
        )
    # Validate everything before touching the model.
    if device is not None:
        device = check_device(device)  # a bad or absent device fails here, not halfway through the surgery
    surgery = plan_surgery(model, cfg)
    modules = dict(model.named_modules())
    if existing:
        add_model_adapter(model, cfg, adapter_name, surgery.layers, device)
        record_quantization(model)
        return model
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    model.requires_grad_(False)
    new_root: nn.Module | None = None
    for step in surgery.layers:
        if device is not None:
            modules[step[0]].to(device)  # this layer's dense weight only; QLoRA quantizes it right there
        layer = wrap_layer(modules[step[0]], cfg, step, adapter_name)
        if step[0]:
            replace_module(model, step[0], layer)
        else:
            new_root = layer
    root = new_root if new_root is not None else model
    quantize_frozen_linears(root, surgery.rest, cfg.quant_block_size, cfg.double_quant, device)
    if device is not None:
        root.to(device)  # the rest (embeddings, norms, head); NF4 weights keep their dtypes
    finish_surgery(root, cfg, surgery, flags, adapter_name)
    return root


LayerStep = tuple[str, int, float, type[LoRALinear], dict[str, object]]  # path, r, alpha, class, extra


@dataclass(frozen=True)
class SurgeryPlan:
    """What `apply_lora` does to a model, decided (and validated) before it touches it: the target paths,
    the modules trained fully, ``(path, r, alpha, class, extra arguments)`` per target (``plan_layers``) and
    the non-target linear layers ``quantize_base`` stores in NF4."""

    paths: list[str]
    to_save: list[str]
    layers: list[LayerStep]
    rest: list[str]


def plan_surgery(model: nn.Module, cfg: LoraConfig) -> SurgeryPlan:
    """`SurgeryPlan` of ``cfg`` on ``model``, raising as `apply_lora` does. It reads module types, paths and
    shapes only, so it also plans a model whose weights are still on the ``meta`` device."""
    paths = find_targets(model, cfg)
    to_save = find_modules_to_save(model, cfg)
    layers = plan_layers(model, cfg, paths)  # the class per target; r, nf4 and init checked per layer type
    rest = frozen_linear_paths(model, set(paths) | output_head(model), to_save) if cfg.quantize_base else []
    check_linear4bits(model, paths + rest)  # bitsandbytes weights adopted below: read them all first
    return SurgeryPlan(paths, to_save, layers, rest)


def wrap_layer(module: nn.Module, cfg: LoraConfig, step: LayerStep, adapter_name: str = DEFAULT) -> nn.Module:
    """The LoRA layer of one `SurgeryPlan` step around ``module`` (its weight read, NF4-quantized for QLoRA,
    the adapter initialized: the only step that draws from the RNG)."""
    _, r, alpha, cls, extra = step
    return cls.from_module(
        module, r=r, alpha=alpha, dropout=cfg.dropout, use_rslora=cfg.use_rslora, use_dora=cfg.use_dora,
        init=cfg.init, fan_in_fan_out=cfg.fan_in_fan_out, adapter_name=adapter_name, **extra,
    )  # fmt: skip


def mark_trainable(root: nn.Module, cfg: LoraConfig, to_save: list[str]) -> None:
    """``requires_grad`` on what trains (adapters, the biases ``cfg.bias`` asks for, ``modules_to_save``);
    idempotent, so a model built piece by piece can be marked after each piece."""
    for _, layer in lora_layers(root):
        for name, p in layer.named_parameters():
            if name.startswith("lora_"):
                p.requires_grad_(True)
        if cfg.bias == "lora_only" and layer.bias is not None:
            layer.bias.requires_grad_(True)
    if cfg.bias == "all":
        for name, p in root.named_parameters():
            if name == "bias" or name.endswith(".bias"):
                p.requires_grad_(True)
    for path in to_save:
        root.get_submodule(path).requires_grad_(True)


def finish_surgery(
    root: nn.Module, cfg: LoraConfig, plan: SurgeryPlan, flags: dict[str, bool], adapter_name: str = DEFAULT
) -> None:
    """After every layer is wrapped: mark what trains, record the config (``flags``: the parameters'
    ``requires_grad`` before the surgery, restored by `unload_lora`), the NF4 layers and the input hook."""
    paths, to_save = plan.paths, plan.to_save
    mark_trainable(root, cfg, to_save)
    # As PEFT: "all-linear" is recorded as the names it resolved to, so the saved adapter_config.json
    # also loads in PEFT when it has layers_to_transform (PEFT refuses that with a string target).
    targets = sorted({p.rsplit(".", 1)[-1] for p in paths}) if cfg.target_modules == "all-linear" else None
    saved_cfg = LoraConfig(
        **{
            **cfg.__dict__,
            "modules_to_save": [p.rsplit(".", 1)[-1] for p in to_save] or None,
            "target_modules": targets or cfg.target_modules,
        }
    )
    object.__setattr__(root, CONFIG_ATTR, saved_cfg)
    object.__setattr__(root, CONFIGS_ATTR, {adapter_name: saved_cfg})
    object.__setattr__(root, ACTIVE_ATTR, [adapter_name])
    object.__setattr__(root, REQUIRES_GRAD_ATTR, flags)
    record_quantization(root)  # config.json says "4 bit" for save_pretrained / from_pretrained
    enable_input_grads(root)  # LoRA gradients under reentrant checkpointing with frozen embeddings


def get_lora_config(model: nn.Module) -> LoraConfig:
    """The config ``apply_lora`` / ``load_adapter`` used on ``model``.

    Raises:
        ValueError: the model has no LoRA layers.
    """
    cfg = getattr(model, CONFIG_ATTR, None)
    if cfg is None or not any(True for _ in lora_layers(model)):
        raise ValueError("the model has no LoRA layers (apply_lora or load_adapter first)")
    return cfg


def _layers_or_raise(model: nn.Module) -> list[LoRALinear]:
    layers = [layer for _, layer in lora_layers(model)]
    if not layers:
        raise ValueError("the model has no LoRA layers (apply_lora or load_adapter first)")
    return layers


def merge_lora(model: nn.Module, adapter_names: list[str] | None = None) -> nn.Module:
    """Fold the active adapters (or ``adapter_names``) into the base weights (for inference); returns
    ``model``. Adapters a layer has merged already (``layer.merge()`` by hand) are left as they are, so a
    partly merged model ends up fully merged.

    Raises:
        ValueError: no LoRA layers; an unknown adapter name (named); everything already merged (nothing
            is changed then).
    """
    layers = _layers_or_raise(model)
    if adapter_names is not None:
        names = list(adapter_names)
        unknown = [n for n in names if n not in adapter_configs(model)]
        if unknown:
            raise ValueError(f"no adapter named {unknown}; the model has {list(adapter_configs(model))}")
        per_layer = [[n for n in names if n in layer.lora_specs] for layer in layers]
    else:
        per_layer = [[n for n in layer.active_adapters if n in layer.lora_specs] for layer in layers]
    todo = [
        (layer, wanted) for layer, wanted in zip(layers, per_layer)
        if any(n not in layer.merged_adapters for n in wanted)
    ]  # fmt: skip
    if not todo:
        raise ValueError("the model is already merged; unmerge_lora(model) first")
    for layer, wanted in todo:
        layer.merge(wanted)
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undo ``merge_lora``; returns ``model``. Only the merged layers are unmerged, so a partly merged
    model (one ``layer.merge()`` by hand) ends up fully unmerged.

    Raises:
        ValueError: no LoRA layers, or no layer merged (nothing is changed then).
    """
    layers = _layers_or_raise(model)
    todo = [layer for layer in layers if layer.merged]
    if not todo:
        raise ValueError("the model is not merged; nothing to unmerge")
    for layer in todo:
        layer.unmerge()
    return model


def unload_lora(model: nn.Module, dequantize: bool = False) -> nn.Module:
    """Merge every adapter and put the plain modules back (``layer.unload(dequantize=...)``); parameters get
    back the ``requires_grad`` they had before ``apply_lora``. Returns ``model`` (or the plain layer when
    ``model`` itself is a ``LoRALinear``). With ``dequantize=True`` the result is a plain dense model: the
    frozen `NF4Linear` layers of ``quantize_base`` become ``nn.Linear`` holding their exact dequantized
    weights.

    Raises:
        ValueError: no LoRA layers.
    """
    _layers_or_raise(model)
    if isinstance(model, LoRALinear):
        root = model.unload(dequantize=dequantize)
    else:
        for path, layer in list(lora_layers(model)):
            replace_module(model, path, layer.unload(dequantize=dequantize))
        root = model
    if dequantize:
        dequantize_frozen_linears(root)
    flags = getattr(model, REQUIRES_GRAD_ATTR, {})
    for name, p in root.named_parameters():
        p.requires_grad_(flags.get(name, True))
    for attr in (CONFIG_ATTR, CONFIGS_ATTR, ACTIVE_ATTR, REQUIRES_GRAD_ATTR):
        if attr in model.__dict__:
            object.__delattr__(model, attr)
    disable_input_grads(root)
    record_quantization(root)  # dense again, or NF4Linear layers still (dequantize=False)
    return root
