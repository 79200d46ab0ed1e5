"""Frozen bases: the ``W₀`` a LoRA layer adapts, behind one small protocol (dense and NF4 today).

A LoRA layer *holds* its base; it never subclasses it. What a base offers (forward, the fused path's
products, row norms, ``W₀`` on request and written back, the plain module again, its tensors for FSDP) is
the protocol `FrozenBase`, tabled in `lora_core.lora.base_protocol` with the module plumbing every holder
shares (`HoldsFrozenBase`). Two bases follow it::

    DenseBase   here: the base's own ``weight`` Parameter (the layer registers that very object, so the
                state-dict key ``<path>.weight`` and every reference to it survive)
    NF4Base     ``lora_core.lora.nf4_base``: an `NF4Tensor`, no Parameter, its tensors keep their dtypes
                and its state-dict entries use bitsandbytes' names; with `NF4Linear`, a frozen layer on it

`frozen_base_of(module)` picks the base a module already is: a frozen `NF4Linear` or a quantized
bitsandbytes ``Linear4bit`` (a model loaded with ``BitsAndBytesConfig(load_in_4bit=True)``) gives an
`NF4Base` over the very same bytes (bitsandbytes' NF4 layout is ours, so nothing is dequantized or
requantized: `NF4Base.from_bnb`); anything else a `DenseBase`. Every name of the three modules is importable
from here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lora_core import dispatch
from lora_core.lora.base_protocol import FrozenBase, HoldsFrozenBase, PlainTemplate, is_conv1d
from lora_core.lora.bnb_models import is_bnb_4bit
from lora_core.lora.nf4_base import NF4Base, NF4Linear


def linear_features(module: nn.Module) -> tuple[int, int] | None:
    """``(in_features, out_features)`` of an ``nn.Linear`` (bitsandbytes' ``Linear4bit`` included), a
    ``Conv1D`` or a frozen `NF4Linear`; ``None`` for anything else."""
    if isinstance(module, (nn.Linear, NF4Linear)):
        return module.in_features, module.out_features
    if is_conv1d(module):
        n_in, n_out = module.weight.shape
        return int(n_in), int(n_out)
    return None


class DenseBase:
    """A dense frozen weight. ``weight`` is stored as the base stored it: (out, in) for ``nn.Linear``,
    (in, out) for GPT-2's ``Conv1D`` (``fan_in_fan_out``); the products take either layout without a copy.

    Args:
        weight: the Parameter (or tensor) itself; not copied.
        fan_in_fan_out: ``weight`` is (in, out).
        template: the module to rebuild in `plain_module` (default ``nn.Linear``).
    """

    def __init__(self, weight: Tensor, fan_in_fan_out: bool = False, template: nn.Module | None = None):
        self.weight = weight
        self.fan_in_fan_out = fan_in_fan_out
        self._template = PlainTemplate(template)

    @classmethod
    def adopt(cls, module: nn.Module, fan_in_fan_out: bool) -> DenseBase:
        """Take over ``module``'s weight Parameter (frozen, not copied)."""
        module.weight.requires_grad_(False)
        return cls(module.weight, fan_in_fan_out, module)

    @property
    def requires_grad(self) -> bool:
        return bool(self.weight.requires_grad)

    @property
    def dtype(self) -> torch.dtype:
        return self.weight.dtype

    def dense_weight(self, dtype: torch.dtype | None = None) -> Tensor:  # (out, in)
        w = self.weight.T if self.fan_in_fan_out else self.weight
        return w if dtype is None else w.to(dtype)

    def cast(self, dtype: torch.dtype) -> DenseBase:
        """The same base in ``dtype`` (autocast's cast of the weight; no copy when it already is)."""
        if self.weight.dtype == dtype:
            return self
        return DenseBase(self.weight.detach().to(dtype), self.fan_in_fan_out)

    def forward(self, x: Tensor, bias: Tensor | None) -> Tensor:  # (..., in) -> (..., out)
        if self.fan_in_fan_out:  # Conv1D's own formula, so outputs match it bit for bit
            x2 = x.reshape(-1, x.shape[-1])  # (N, in)
            y = x2 @ self.weight if bias is None else torch.addmm(bias, x2, self.weight)
            return y.view(*x.shape[:-1], y.shape[-1])
        return F.linear(x, self.weight, bias)

    def product(self, x: Tensor, bias: Tensor | None) -> Tensor:  # (M, in) -> (M, out)
        return dispatch.linear(x, self.dense_weight(), bias)  # (out, in) in either storage layout

    def product_grad(self, g: Tensor) -> Tensor:  # (M, out) -> (M, in)
        return dispatch.mm(g, self.dense_weight())

    def matmul_acc(self, out: Tensor, x: Tensor) -> Tensor:
        return out.addmm_(x, self.dense_weight().T)  # beta = 1: the add rides in the GEMM epilogue

    def matmul_grad_acc(self, out: Tensor, g: Tensor) -> Tensor:
        return out.addmm_(g, self.dense_weight())

    def row_sqnorm(self) -> Tensor:  # (out,)
        acc = torch.promote_types(self.weight.dtype, torch.float32)
        return torch.linalg.vector_norm(self.dense_weight(), dim=1, dtype=acc).square()

    def cache_key(self) -> tuple[Any, ...]:
        w = self.weight
        return (w.data_ptr(), w._version, tuple(w.shape), w.stride(), w.dtype, w.device)

    @torch.no_grad()
    def set_dense_weight(self, w: Tensor) -> None:
        """``W₀ ← w`` (out, in) in place (the Parameter object stays); exact, so no error to report."""
        want = tuple(self.dense_weight().shape)
        if tuple(w.shape) != want:
            raise ValueError(f"w must have shape {want} (out, in), got {tuple(w.shape)}")
        self.weight.copy_(w.T if self.fan_in_fan_out else w)

    def plain_module(self, weight: Tensor | None, bias: Tensor | None, training: bool = False) -> nn.Module:
        """The original module class holding ``weight`` (out, in), or this very Parameter when None."""
        if weight is None:
            param = self.weight
        else:
            stored = weight.T if self.fan_in_fan_out else weight
            param = nn.Parameter(stored.to(self.weight.dtype).contiguous(), requires_grad=False)
        return self._template.build(param, bias, training)

    # state dict and device moves: the Parameter is registered on the layer, so nn.Module handles both
    def save_state(self, destination: dict[str, Any], key: str) -> None:
        pass

    def load_state(self, state: dict[str, Any], key: str, missing: list[str], errors: list[str]) -> None:
        pass

    def apply(self, fn: Callable[[Tensor], Tensor]) -> DenseBase:
        return self

    # sharding (lora_core.training.fsdp): the tensors an engine splits, and taking them back
    def storage(self) -> dict[str, Tensor]:
        """The tensors holding ``W₀``, by name: the dense ``weight`` Parameter (the layer's own)."""
        return {"weight": self.weight}

    def rebind(self, tensors: dict[str, Tensor]) -> None:
        """Use ``tensors`` (`storage`'s names) from now on: e.g. FSDP's gathered copy of the weight."""
        self.weight = tensors["weight"]


def frozen_base_of(module: nn.Module, fan_in_fan_out: bool) -> DenseBase | NF4Base:
    """The frozen base ``module`` already holds: `NF4Base` for an `NF4Linear` or a quantized bitsandbytes
    Linear4bit (its bytes adopted as they are), else `DenseBase` over its own weight Parameter."""
    if isinstance(module, NF4Linear) or is_bnb_4bit(module):
        return NF4Base.from_module(module)
    return DenseBase.adopt(module, fan_in_fan_out)


__all__ = [
    "DenseBase",
    "FrozenBase",
    "frozen_base_of",
    "is_bnb_4bit",
    "HoldsFrozenBase",
    "NF4Base",
    "NF4Linear",
    "is_conv1d",
    "linear_features",
]
