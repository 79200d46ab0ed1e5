"""LoRA+ (Hayou et al. 2024, "LoRA+: Efficient Low Rank Adaptation of Large Models") as an optimizer factory.

LoRA+ trains ``B`` with a larger learning rate than ``A``: with ``x ↦ s·B A x``, B's output side is wide and
A's input side is, and one step size for both is inefficient when the width grows (§3). The paper's
recipe is ``lr_B = ratio × lr_A`` with ratio ≈ 16 (§4)::

    group                          lr                     weight decay
    lora_B (and lora_embedding_B)  lr × ratio × scale     weight_decay if ≥ 2-D, else 0
    everything else that trains    lr × scale             weight_decay if ≥ 2-D, else 0

``scale`` is 1 unless ``lr_groups`` (``{regex: multiplier}``, first ``re.search`` match on the parameter
name) says otherwise. Parameters with ``requires_grad=False`` are left out. Use it with any optimizer, a
``transformers.Trainer`` (``optimizers=(opt, None)``) or your own loop; ``lc.train`` builds its AdamW here.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch
from torch import nn

_B_NAMES = ("lora_B", "lora_embedding_B")


def _is_b(name: str) -> bool:
    return any(part in _B_NAMES for part in name.split("."))


def _positive(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a positive number, got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def loraplus_param_groups(
    model: nn.Module,
    lr: float,
    ratio: float = 16.0,
    weight_decay: float = 0.0,
    lr_groups: dict[str, float] | None = None,
) -> list[dict[str, Any]]:
    """The optimizer's parameter groups for LoRA+ (module docstring), in first-seen order.

    Args:
        model: any module; its trainable parameters are grouped by (lr multiplier, weight decay).
        lr: the base learning rate (A's, and every other trainable parameter's).
        ratio: ``lr_B / lr`` (the paper's λ; 16 is its default). ``1`` gives plain LoRA.
        weight_decay: applied to parameters with ≥ 2 dimensions only (no decay on biases, norms, DoRA's m).
        lr_groups: ``{regex: multiplier}`` per-layer learning rates, matched with ``re.search``.

    Raises:
        TypeError / ValueError: an argument of the wrong type or range (named); no trainable parameter.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    lr, ratio = _positive("lr", lr), _positive("ratio", ratio)
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)):
        raise TypeError(f"weight_decay must be a number ≥ 0, got {weight_decay!r}")
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"weight_decay must be a finite number ≥ 0, got {weight_decay!r}")
    if lr_groups is not None and not isinstance(lr_groups, dict):
        raise TypeError(f"lr_groups must be a dict {{regex: multiplier}} or None, got {lr_groups!r}")
    patterns = dict(lr_groups or {})
    for pattern, scale in patterns.items():
        try:
            re.compile(pattern)
        except (re.error, TypeError) as err:
            raise ValueError(f"lr_groups: {pattern!r} is not a valid regex ({err})") from None
        _positive(f"lr_groups[{pattern!r}]", scale)

    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        scale = next((float(s) for pat, s in patterns.items() if re.search(pat, name)), 1.0)
        if _is_b(name):
            scale *= ratio
        # DoRA's magnitude is a vector even where PEFT shapes it (1, out, 1, ...) for a conv: no decay
        wd = float(weight_decay) if p.dim() >= 2 and "lora_magnitude" not in name else 0.0
        groups.setdefault((scale, wd), []).append(p)
    if not groups:
        raise ValueError("the model has no parameter with requires_grad=True: nothing to train")
    return [{"params": ps, "lr": lr * s, "weight_decay": wd} for (s, wd), ps in groups.items()]


def loraplus_optimizer(
    model: nn.Module,
    lr: float,
    ratio: float = 16.0,
    optimizer_cls: type[torch.optim.Optimizer] = torch.optim.AdamW,
    *,
    weight_decay: float = 0.0,
    lr_groups: dict[str, float] | None = None,
    **kwargs: Any,
) -> torch.optim.Optimizer:
    """An optimizer over ``model``'s trainable parameters with LoRA+ learning rates: ``lora_B`` at
    ``lr × ratio``, the rest at ``lr`` (groups: `loraplus_param_groups`).

    Args:
        model, lr, ratio, weight_decay, lr_groups: see `loraplus_param_groups`.
        optimizer_cls: a ``torch.optim.Optimizer`` subclass taking ``(param_groups, lr=..., **kwargs)``.
        kwargs: the optimizer's other arguments (``betas``, ``eps``, ``momentum``, ...).

    Example::

        opt = lc.loraplus_optimizer(model, lr=2e-4, ratio=16)          # AdamW
        trainer = transformers.Trainer(model=model, args=args, optimizers=(opt, None), ...)
    """
    if not (isinstance(optimizer_cls, type) and issubclass(optimizer_cls, torch.optim.Optimizer)):
        raise TypeError(f"optimizer_cls must be a torch.optim.Optimizer subclass, got {optimizer_cls!r}")
    groups = loraplus_param_groups(model, lr, ratio, weight_decay, lr_groups)
    return optimizer_cls(groups, lr=lr, **kwargs)


__all__ = ["loraplus_optimizer", "loraplus_param_groups"]
