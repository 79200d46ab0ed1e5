"""The NF4 base: a frozen ``W₀`` stored as an `NF4Tensor` (QLoRA), and `NF4Linear`, a frozen layer on one.

`NF4Base` follows the protocol of `lora_core.lora.base_protocol` like the dense base does
(`lora_core.lora.bases`), with what 4 bits change:

- no Parameter: its tensors keep their dtypes (uint8 codes, float32 scales), and its state-dict entries
  use bitsandbytes' names (``weight``, ``weight.absmax``, ``weight.quant_state.bitsandbytes__nf4``, ...);
- its products go through ``lora_core.dispatch`` (the fused Triton kernel, dequantize + cuBLAS, or the CPU
  lookup dequantize) and never keep a dense ``W₀``; ``forward`` saves only the packed weight for backward
  (`nf4_linear`);
- ``set_dense_weight`` (merge, unmerge, PiSSA) requantizes and records the error it could not avoid.

A quantized bitsandbytes ``Linear4bit`` (``BitsAndBytesConfig(load_in_4bit=True)``) is adopted over the very
same bytes (bitsandbytes' NF4 layout is ours, so nothing is dequantized or requantized: `NF4Base.from_bnb`).
`NF4Linear` is what ``unload`` gives back for an NF4 layer: ``y = x · dequant(W)ᵀ + b``, nothing trainable.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from lora_core import dispatch
from lora_core.lora.base_protocol import HoldsFrozenBase, PlainTemplate, is_conv1d
from lora_core.lora.bnb_models import is_bnb_4bit, read_linear4bit
from lora_core.lora.nf4_linear import nf4_linear
from lora_core.quant.bnb import QUANT_STATE_SUFFIX
from lora_core.quant.nf4 import NF4Tensor, dequantize_nf4, quantize_nf4


class NF4Base:
    """A frozen NF4 weight (`NF4Tensor`, (out, in)); ``requantization_error`` is max |w − dequant(q)| of
    the last `set_dense_weight` (merge, unmerge, PiSSA), None before one."""

    requires_grad = False

    def __init__(self, q: NF4Tensor, template: nn.Module | None = None, fan_in_fan_out: bool = False) -> None:
        if len(q.shape) != 2:
            raise ValueError(f"q must be a 2-D weight (out, in), got shape {tuple(q.shape)}")
        self.q = q  # always (out, in); fan_in_fan_out says how a dense copy is stored (GPT-2 Conv1D)
        self.fan_in_fan_out = fan_in_fan_out
        self.requantization_error: float | None = None
        self._template = PlainTemplate(template)

    @classmethod
    def quantize(cls, module: nn.Module, block_size: int = 64, double_quant: bool = True) -> NF4Base:
        """Quantize ``module``'s weight (an ``nn.Linear`` or GPT-2 ``Conv1D``) to NF4."""
        w, conv = module.weight.detach(), is_conv1d(module)
        if not w.is_floating_point():
            raise TypeError(
                f"cannot quantize a {type(module).__name__} holding a {w.dtype} weight to NF4: only "
                "floating-point weights, NF4Linear and quantized bitsandbytes Linear4bit (nf4) layers"
            )
        return cls(quantize_nf4(w.T if conv else w, block_size, double_quant), module, fan_in_fan_out=conv)

    @classmethod
    def from_bnb(cls, module: nn.Module) -> NF4Base:
        """Adopt a quantized bitsandbytes ``Linear4bit``'s NF4 weight as it is (`read_linear4bit`: its bytes,
        not copied); `plain_module` then rebuilds an ``nn.Linear``, not a Linear4bit.

        Raises:
            ValueError: not a quantized Linear4bit, or FP4 (only NF4 is supported).
        """
        plain = nn.Linear(module.in_features, module.out_features, bias=False, device="meta")
        return cls(read_linear4bit(module), plain)

    @classmethod
    def from_module(cls, module: nn.Module, block_size: int = 64, double_quant: bool = True) -> NF4Base:
        """The NF4 base of ``module``: an `NF4Linear`'s own, a bitsandbytes Linear4bit's adopted bytes
        (`from_bnb`; ``block_size`` / ``double_quant`` are then the module's), or ``module``'s dense weight
        quantized (`quantize`)."""
        if isinstance(module, NF4Linear):
            return module.base
        if is_bnb_4bit(module):
            return cls.from_bnb(module)
        return cls.quantize(module, block_size, double_quant)

    @property
    def weight(self) -> NF4Tensor:
        return self.q

    def describe(self) -> str:
        """One line for reprs: ``nf4 block_size=64, double_quant=True, dtype=bfloat16``."""
        q = self.q
        dtype = str(q.dtype).removeprefix("torch.")
        return f"nf4 block_size={q.block_size}, double_quant={q.double_quant}, dtype={dtype}"

    @property
    def dtype(self) -> None:
        return None  # products come out in the input's dtype

    def cast(self, dtype: torch.dtype) -> NF4Base:
        return self

    def dense_weight(self, dtype: torch.dtype | None = None) -> Tensor:  # (out, in)
        return dequantize_nf4(self.q, dtype)

    def forward(self, x: Tensor, bias: Tensor | None) -> Tensor:
        return nf4_linear(x, self.q, bias)  # saves only the packed weight for backward

    def product(self, x: Tensor, bias: Tensor | None) -> Tensor:  # (M, in) -> (M, out)
        return dispatch.nf4_linear(x, self.q, bias)  # a transient dense W (CPU), never kept

    def product_grad(self, g: Tensor) -> Tensor:  # (M, out) -> (M, in)
        return dispatch.nf4_linear_grad(g, self.q)

    def matmul_acc(self, out: Tensor, x: Tensor) -> Tensor:
        return dispatch.nf4_matmul_acc(out, x, self.q)

    def matmul_grad_acc(self, out: Tensor, g: Tensor) -> Tensor:
        return dispatch.nf4_matmul_grad_acc(out, g, self.q)

    def row_sqnorm(self) -> Tensor:  # (out,)
        acc = torch.promote_types(self.q.dtype, torch.float32)
        w = dequantize_nf4(self.q, self.q.dtype)  # once per cache fill, freed at once, never saved
        return torch.linalg.vector_norm(w, dim=1, dtype=acc).square()

    def cache_key(self) -> tuple[Any, ...]:
        p = self.q.packed
        return (id(self.q), p.data_ptr(), p._version, p.device)

    @torch.no_grad()
    def set_dense_weight(self, w: Tensor) -> float:
        """Requantize to ``w`` (out, in); returns (and records) the error: 4 bits cannot hold ``w``."""
        q = self.q
        if tuple(w.shape) != tuple(q.shape):
            raise ValueError(f"w must have shape {tuple(q.shape)}, got {tuple(w.shape)}")
        new = quantize_nf4(w.to(q.dtype), q.block_size, q.double_quant)
        err = (dequantize_nf4(new, torch.float32) - w.float()).abs().max() if w.numel() else torch.zeros(())
        self.q = replace(new, dtype=q.dtype)
        self.requantization_error = float(err)
        return self.requantization_error

    def plain_module(self, weight: Tensor | None, bias: Tensor | None, training: bool = False) -> nn.Module:
        """A dense module of the original class holding ``weight`` (out, in); when None, a frozen
        `NF4Linear` holding this base as it is."""
        if weight is None:
            return NF4Linear(self, bias).train(training)
        stored = weight.T if self.fan_in_fan_out else weight
        param = nn.Parameter(stored.to(self.q.dtype).contiguous(), requires_grad=False)
        return self._template.build(param, bias, training)

    # ---- state dict (bitsandbytes' keys) and device moves ---------------------------------------------
    def save_state(self, destination: dict[str, Any], key: str) -> None:
        destination.update(self.q.to_bnb_state(key))

    def load_state(self, state: dict[str, Any], key: str, missing: list[str], errors: list[str]) -> None:
        """Read ``key`` (+ its bitsandbytes entries) from ``state``: an NF4 checkpoint (ours or
        bitsandbytes'), or a dense weight to quantize. Problems go to ``missing`` / ``errors``."""
        ours = {k: v for k, v in state.items() if k == key or k.startswith(key + ".")}
        current = self.q
        try:
            if key + QUANT_STATE_SUFFIX in ours:
                q = NF4Tensor.from_bnb_state(ours, key)
            elif key in ours and ours[key].is_floating_point():  # a dense base checkpoint: quantize it
                w = ours[key].T if self.fan_in_fan_out else ours[key]
                q = quantize_nf4(w.to(current.dtype), current.block_size, current.double_quant)
            elif key in ours:  # packed codes (or other integers) without the blob that says how to read them
                fp4 = f"{key}.quant_state.bitsandbytes__fp4"
                why = (
                    f"{fp4!r} says FP4, which is not supported (NF4 only)"
                    if fp4 in ours
                    else f"there is no '{key}{QUANT_STATE_SUFFIX}' entry (the quant-state blob with its "
                    "shape, dtype and block size), so it cannot be read as NF4; nor is it a dense "
                    "floating-point weight to quantize"
                )
                found = f"{ours[key].dtype}, {tuple(ours[key].shape)}"
                errors.append(f"{key}: present ({found}) but unusable: {why}")
                return
            else:
                missing.append(key)
                return
        except (ValueError, TypeError) as err:  # a malformed entry: reported, the layer keeps its weight
            errors.append(f"{key}: {err}")
            return
        if tuple(q.shape) != tuple(current.shape):
            errors.append(f"{key}: shape {tuple(q.shape)} in the checkpoint, {tuple(current.shape)} here")
            return
        self.q = q.to(current.device)

    def apply(self, fn: Callable[[Tensor], Tensor]) -> NF4Base:
        # Only the device may change: a uint8 probe ignores dtype casts (.half(), .to(float16)).
        device = fn(torch.empty(0, dtype=torch.uint8, device=self.q.device)).device
        if device != self.q.device:
            self.q = self.q.to(device)
        return self

    # sharding (lora_core.training.fsdp): only what grows with the weight is split; the two code tables
    # (16 + 256 float32) and the 0-dim offset stay whole on every rank
    SHARDED_FIELDS = ("packed", "absmax", "nested_absmax")

    def storage(self) -> dict[str, Tensor]:
        """The tensors that grow with ``W₀``, by `NF4Tensor` field: packed codes (uint8), block scales
        (float32, or uint8 codes with double quantization) and the nested scales (float32), all 1-D."""
        return {k: v for k, v in self.q.tensors().items() if k in self.SHARDED_FIELDS}

    def rebind(self, tensors: dict[str, Tensor]) -> None:
        """Use ``tensors`` (`storage`'s fields) from now on: e.g. FSDP's gathered copy of the packed bytes
        (the same bytes, gathered whole: never a dequantized copy)."""
        self.q = replace(self.q, **tensors)


class NF4Linear(HoldsFrozenBase):
    """A frozen linear layer with an NF4 weight: ``y = x · dequant(W)ᵀ + b`` (what ``unload`` returns)."""

    def __init__(self, q: NF4Tensor | NF4Base, bias: Tensor | None = None) -> None:
        super().__init__()
        self.base = q if isinstance(q, NF4Base) else NF4Base(q)
        self.out_features, self.in_features = (int(s) for s in self.base.q.shape)
        self.bias = bias if bias is None or isinstance(bias, nn.Parameter) else nn.Parameter(bias)

    @classmethod
    def from_linear(cls, base: nn.Linear, block_size: int = 64, double_quant: bool = True) -> NF4Linear:
        return cls(NF4Base.quantize(base, block_size, double_quant), base.bias)

    def forward(self, x: Tensor) -> Tensor:  # (..., in) -> (..., out)
        return self.base.forward(x, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.base.describe()}"


__all__ = ["NF4Base", "NF4Linear"]
