"""QLoRA layers: LoRA adapters over a frozen NF4 base (Dettmers et al. 2023, "QLoRA").

    y = dequant(W_nf4) x + b + s · B A drop(x)        W_nf4 frozen, 4-bit; A, B (and DoRA's m) in float

``QLoRALinear`` is a ``LoRALinear`` whose four base-weight hooks read and write NF4 instead of a dense
weight, so the LoRA/rsLoRA/DoRA/PiSSA math is shared unchanged:

    base_forward(x)     → autograd.nf4_linear (saves only the packed weight; grad_x = grad_out · dequant(W))
    base_weight(dtype)  → dequantize_nf4
    set_base_weight(w)  → requantize, and record the error (merging into 4 bits is lossy: PEFT only warns)
    unload(dequantize)  → a dense merged layer (exact, unless already merged), or a frozen ``NF4Linear``

Checkpoints use bitsandbytes' names: the module's ``weight`` key holds the packed bytes ``(ceil(n/2), 1)``
and ``weight.absmax``, ``weight.quant_map``, ``weight.nested_absmax``, ``weight.nested_quant_map``,
``weight.quant_state.bitsandbytes__nf4`` hold the rest. ``.to(device)`` / ``.cuda()`` move the NF4
tensors and keep their dtypes; ``.half()`` never touches them (the scales stay float32).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from lora_core import fused
from lora_core.autograd import nf4_linear
from lora_core.layers import LoRALinear
from lora_core.nf4 import NF4Tensor, dequantize_nf4, quantize_nf4

_BNB_SUFFIXES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state.bitsandbytes__nf4")


class _NF4WeightMixin:
    """A module whose ``weight`` is an `NF4Tensor` kept in ``self._nf4`` (not a Parameter: it is frozen and
    its tensors must keep their dtypes), with bitsandbytes-named state-dict entries."""

    _nf4: NF4Tensor | None

    @property
    def weight(self) -> Any:
        # While LoRALinear.__init__ runs, the dense Parameter is still registered: hand that out.
        q = self.__dict__.get("_nf4")
        if q is not None:
            return q
        params = self.__dict__.get("_parameters", {})
        if "weight" in params:
            return params["weight"]
        raise AttributeError("weight")

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> Any:
        out = super()._apply(fn, recurse)  # type: ignore[misc]
        q = self.__dict__.get("_nf4")
        if q is not None:
            # Only the device may change: a uint8 probe ignores dtype casts (.half(), .to(float16)).
            device = fn(torch.empty(0, dtype=torch.uint8, device=q.device)).device
            if device != q.device:
                self._nf4 = q.to(device)
        return out

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)  # type: ignore[misc]
        assert self._nf4 is not None  # set in __init__
        destination.update(self._nf4.to_bnb_state(prefix + "weight"))

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, local_metadata: dict[str, Any], strict: bool,
        missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str],
    ) -> None:  # fmt: skip
        key = prefix + "weight"
        ours = {k: v for k, v in state_dict.items() if k == key or k.startswith(key + ".")}
        rest = {k: v for k, v in state_dict.items() if k not in ours}
        super()._load_from_state_dict(  # type: ignore[misc]
            rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        assert self._nf4 is not None
        current = self._nf4
        try:
            if f"{key}.quant_state.bitsandbytes__nf4" in ours:  # an NF4 checkpoint (ours or bitsandbytes')
                q = NF4Tensor.from_bnb_state(ours, key)
            elif key in ours and ours[key].is_floating_point():  # a dense base checkpoint: quantize it
                w = ours[key].T if getattr(self, "fan_in_fan_out", False) else ours[key]
                q = quantize_nf4(w.to(current.dtype), current.block_size, current.double_quant)
            elif key in ours:  # packed codes (or other integers) without the blob that says how to read them
                fp4 = f"{key}.quant_state.bitsandbytes__fp4"
                why = (
                    f"{fp4!r} says FP4, which is not supported (NF4 only)"
                    if fp4 in ours
                    else f"there is no '{key}.quant_state.bitsandbytes__nf4' entry (the quant-state blob "
                    "with its shape, dtype and block size), so it cannot be read as NF4; nor is it a dense "
                    "floating-point weight to quantize"
                )
                error_msgs.append(
                    f"{key}: present ({ours[key].dtype}, {tuple(ours[key].shape)}) but unusable: {why}"
                )
                return
            else:
                missing_keys.append(key)
                return
        except (ValueError, TypeError) as err:
            error_msgs.append(f"{key}: {err}")
            return
        if tuple(q.shape) != tuple(current.shape):
            error_msgs.append(f"{key}: shape {tuple(q.shape)} in the checkpoint, {tuple(current.shape)} here")
            return
        self._nf4 = q.to(current.device)


class NF4Linear(_NF4WeightMixin, nn.Module):
    """A frozen linear layer with an NF4 weight: ``y = x · dequant(W)ᵀ + b`` (what ``unload`` returns)."""

    def __init__(self, q: NF4Tensor, bias: Tensor | None = None) -> None:
        super().__init__()
        if len(q.shape) != 2:
            raise ValueError(f"q must be a 2-D weight (out, in), got shape {tuple(q.shape)}")
        self.out_features, self.in_features = (int(s) for s in q.shape)
        self._nf4 = q
        self.bias = bias if bias is None or isinstance(bias, nn.Parameter) else nn.Parameter(bias)

    @classmethod
    def from_linear(cls, base: nn.Linear, block_size: int = 64, double_quant: bool = True) -> NF4Linear:
        return cls(quantize_nf4(base.weight.detach(), block_size, double_quant), base.bias)

    def forward(self, x: Tensor) -> Tensor:  # (..., in) -> (..., out)
        assert self._nf4 is not None
        return nf4_linear(x, self._nf4, self.bias)

    def extra_repr(self) -> str:
        q = self._nf4
        assert q is not None
        return f"in_features={self.in_features}, out_features={self.out_features}, nf4 block={q.block_size}"


class QLoRALinear(_NF4WeightMixin, LoRALinear):
    """``LoRALinear`` over a frozen NF4 base (QLoRA). Build it with ``QLoRALinear.from_linear(base, r=...,
    alpha=..., quant_block_size=64, double_quant=True)`` or ``apply_lora`` with ``quantize="nf4"``.

    Args:
        base, r, alpha, dropout, use_rslora, use_dora, fan_in_fan_out: as in ``LoRALinear``.
        quant_block_size: NF4 block size, a power of two in [16, 4096] (QLoRA: 64).
        double_quant: quantize the block scales too (QLoRA §3, "Double Quantization").

    Attributes:
        requantization_error: max |w − dequant(quantize(w))| of the last `set_base_weight` (merge,
            unmerge, PiSSA), ``None`` before one.
    """

    def __init__(
        self, base: nn.Module, *, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
        use_dora: bool = False, fan_in_fan_out: bool = False, quant_block_size: int = 64,
        double_quant: bool = True,
    ) -> None:  # fmt: skip
        super().__init__(
            base, r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora, use_dora=use_dora,
            fan_in_fan_out=fan_in_fan_out,
        )  # fmt: skip
        dense = LoRALinear.base_weight(self).detach()  # (out, in), the dense weight still registered
        q = quantize_nf4(dense, quant_block_size, double_quant)
        del self._parameters["weight"]  # the dense copy goes; from here on `weight` is the NF4Tensor
        self._nf4 = q
        self.requantization_error: float | None = None
        self._capture: list[Tensor] | None = None  # see `unload`

    # ---- the hooks ------------------------------------------------------------------------------------
    def base_forward(self, x: Tensor) -> Tensor:  # (..., in) -> (..., out)
        assert self._nf4 is not None
        return nf4_linear(x, self._nf4, self.bias)

    def base_op(self) -> fused.NF4Base:
        """The fused path's frozen product: the packed weight (kernels on CUDA), never a dense copy."""
        assert self._nf4 is not None
        return fused.NF4Base(self._nf4)

    def base_weight(self, dtype: torch.dtype | None = None) -> Tensor:  # (out, in)
        assert self._nf4 is not None
        return dequantize_nf4(self._nf4, dtype)

    @torch.no_grad()
    def set_base_weight(self, w: Tensor) -> None:
        """Requantize the base to ``w`` (out, in) and record the error (4 bits cannot hold ``w`` exactly)."""
        q = self._nf4
        assert q is not None
        if tuple(w.shape) != tuple(q.shape):
            raise ValueError(f"w must have shape {tuple(q.shape)}, got {tuple(w.shape)}")
        if self._capture is not None:  # `unload(dequantize=True)`: keep the exact dense weight instead
            self._capture.append(w)
            return
        new = quantize_nf4(w.to(q.dtype), q.block_size, q.double_quant)
        err = (dequantize_nf4(new, torch.float32) - w.float()).abs().max() if w.numel() else torch.zeros(())
        self._nf4 = replace(new, dtype=q.dtype)
        self.requantization_error = float(err)

    @torch.no_grad()
    def merge(self) -> None:
        """``LoRALinear.merge`` into the 4-bit base: requantizes, so it is lossy; warns with the error."""
        super().merge()
        warnings.warn(
            f"merged an adapter into a 4-bit NF4 base: requantization error max |ΔW| = "
            f"{self.requantization_error:.3g}; unload_lora(model, dequantize=True) merges exactly into a "
            "dense layer",
            UserWarning,
            stacklevel=2,
        )

    @torch.no_grad()
    def unload(self, dequantize: bool = False) -> nn.Module:
        """The merged plain layer. ``dequantize=True``: a dense ``nn.Linear`` (or the base's class) holding
        ``dequant(W) + s·BA`` exactly (no requantization); ``False``: a frozen `NF4Linear` (requantized).

        On a layer that is already merged, ``dequantize=True`` cannot be exact: `merge` wrote
        ``requantize(dequant(W) + s·BA)`` into the 4-bit base and the exact sum was not kept (nor the
        pre-merge base, so unmerging is lossy too). It then returns ``dequant`` of what the base holds and
        warns with the error `merge` recorded (`requantization_error`). Unload an unmerged layer for the
        exact result."""
        q = self._nf4
        assert q is not None
        if not dequantize:
            if not self.merged:
                self.merge()
            return NF4Linear(self._nf4, self.bias).train(self.training)  # type: ignore[arg-type]
        if self.merged:  # the exact merge is gone: say so rather than hand back a silently lossy weight
            err = "unknown" if self.requantization_error is None else f"{self.requantization_error:.3g}"
            warnings.warn(
                "unload(dequantize=True) on an already merged QLoRALinear returns the requantized merge, not "
                f"the exact one: requantization error max |ΔW| = {err}; unload "
                "before merging for the exact dequant(W) + s·BA",
                UserWarning,
                stacklevel=2,
            )
            w = self.base_weight()
        else:  # run LoRALinear.merge's math (DoRA included) but catch the dense result
            self._capture = []
            try:
                LoRALinear.merge(self)
            finally:
                captured, self._capture = self._capture, None
            self.merged = False
            w = captured[-1]
        plain = self._base_class.__new__(self._base_class)
        nn.Module.__init__(plain)
        plain.__dict__.update(self._base_attrs)
        plain.weight = nn.Parameter((w.T if self.fan_in_fan_out else w).to(q.dtype).contiguous())
        plain.bias = self.bias
        plain.train(self.training)  # nn.Module.__init__ left it in training mode
        return plain


__all__ = ["NF4Linear", "QLoRALinear"]
