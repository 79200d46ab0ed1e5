"""What a frozen base is: the protocol every ``W₀`` a LoRA layer adapts follows, and how a module holds one.

A LoRA layer *holds* its base; it never subclasses it. Everything the layer, the fused Functions, merging
and unloading need from ``W₀`` is one of these:

    forward(x, bias)         x W₀ᵀ + b, exactly as the original module computed it (differentiable in x, b)
    product(x, bias)         x W₀ᵀ + b      (2-D: the fused LoRA Function's frozen GEMM, dispatch's fastest)
    product_grad(g)          g W₀           (2-D: its input gradient)
    matmul_acc(out, x)       out += x W₀ᵀ   (2-D, in place: the fused DoRA Function's frozen GEMM)
    matmul_grad_acc(out, g)  out += g W₀    (2-D, in place: its input gradient)
    row_sqnorm()             ‖W₀_i‖² per output row (out,), float32/float64 (DoRA's norm)
    cache_key()              changes whenever W₀ does (the layer caches row_sqnorm under it)
    dense_weight(dtype)      W₀ as a dense (out, in) tensor (a view when no cast is needed)
    set_dense_weight(w)      W₀ ← w (out, in); returns the error of storing it (None: exact)
    plain_module(w, bias)    the original module class again, holding w (merge) or W₀ as stored
    weight                   W₀ as stored: what ``layer.weight`` shows (Parameter or NF4Tensor)
    storage() / rebind(ts)   the tensors holding W₀ by name, and using others in their place (FSDP's
                             gathered copies: ``lora_core.training.fsdp``)

Besides `FrozenBase` itself, the two pieces every base and every module holding one share:
`HoldsFrozenBase` (an ``nn.Module`` whose ``weight``, state dict and device moves go through its base) and
`PlainTemplate` (the original module's class and attributes, to rebuild it in ``plain_module``); and
`is_conv1d`, which tells GPT-2's transposed ``Conv1D`` apart. The bases themselves are in
`lora_core.lora.bases` (`DenseBase`) and `lora_core.lora.nf4_base` (`NF4Base`, `NF4Linear`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import Tensor, nn


class FrozenBase(Protocol):
    """What a LoRA layer needs from its frozen ``W₀`` (module docstring)."""

    @property
    def weight(self) -> Any: ...

    def forward(self, x: Tensor, bias: Tensor | None) -> Tensor: ...

    def product(self, x: Tensor, bias: Tensor | None) -> Tensor: ...

    def product_grad(self, g: Tensor) -> Tensor: ...

    def matmul_acc(self, out: Tensor, x: Tensor) -> Tensor: ...

    def matmul_grad_acc(self, out: Tensor, g: Tensor) -> Tensor: ...

    def row_sqnorm(self) -> Tensor: ...

    def cache_key(self) -> tuple[Any, ...]: ...

    def dense_weight(self, dtype: torch.dtype | None = None) -> Tensor: ...

    def set_dense_weight(self, w: Tensor) -> float | None: ...

    def plain_module(self, weight: Tensor | None, bias: Tensor | None) -> nn.Module: ...


class HoldsFrozenBase(nn.Module):
    """A module whose frozen weight is ``self.base`` (a `FrozenBase`): ``weight`` shows ``base.weight``,
    and the state dict and device moves go through the base (bitsandbytes' keys for NF4)."""

    base: Any

    @property
    def weight(self) -> Any:  # type: ignore[override]
        return self.base.weight

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> Any:
        out = super()._apply(fn, recurse)
        self.base.apply(fn)
        return out

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        self.base.save_state(destination, prefix + "weight")

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, local_metadata: dict[str, Any], strict: bool,
        missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str],
    ) -> None:  # fmt: skip
        if "weight" in self._parameters:  # a dense base: its Parameter is ours, nn.Module reads it
            return super()._load_from_state_dict(
                state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
            )
        key = prefix + "weight"
        rest = {k: v for k, v in state_dict.items() if not (k == key or k.startswith(key + "."))}
        super()._load_from_state_dict(
            rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        self.base.load_state(state_dict, key, missing_keys, error_msgs)


class PlainTemplate:
    """How to rebuild the module a base was taken from: its class and plain attributes (e.g. ``nf``)."""

    def __init__(self, module: nn.Module | None) -> None:
        self.cls = type(module) if module is not None else nn.Linear
        self.has_bias = module is None or hasattr(module, "bias")  # nn.Embedding has none
        skip = ("training",)
        self.attrs = {} if module is None else {
            k: v for k, v in vars(module).items() if not k.startswith("_") and k not in skip
        }  # fmt: skip

    def build(self, weight: nn.Parameter, bias: Tensor | None, training: bool) -> nn.Module:
        plain = self.cls.__new__(self.cls)
        nn.Module.__init__(plain)
        plain.__dict__.update(self.attrs)
        plain.weight = weight
        if self.has_bias:
            plain.bias = bias
        plain.train(training)  # nn.Module.__init__ left it in training mode
        return plain


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's ``Conv1D`` (a linear layer storing its weight as (in, out)), recognised without importing
    transformers: the class name, an ``nf`` (= out features) attribute and a 2-D weight."""
    weight = getattr(module, "weight", None)
    return (
        type(module).__name__ == "Conv1D"
        and hasattr(module, "nf")
        and isinstance(weight, Tensor)
        and weight.ndim == 2
    )


__all__ = ["FrozenBase", "HoldsFrozenBase", "PlainTemplate", "is_conv1d"]
