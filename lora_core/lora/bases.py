"""Frozen bases: the ``W₀`` a LoRA layer adapts, behind one small protocol (dense and NF4 today).

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

`DenseBase` keeps the base's own ``weight`` Parameter (the layer registers that very object, so the
state-dict key ``<path>.weight`` and every reference to it survive). `NF4Base` keeps an `NF4Tensor`: no
Parameter, its tensors keep their dtypes, and its state-dict entries use bitsandbytes' names.

`frozen_base_of(module)` picks the base a module already is: a frozen `NF4Linear` or a quantized
bitsandbytes ``Linear4bit`` (a model loaded with ``BitsAndBytesConfig(load_in_4bit=True)``) gives an
`NF4Base` over the very same bytes (bitsandbytes' NF4 layout is ours, so nothing is dequantized or
requantized: `NF4Base.from_bnb`); anything else a `DenseBase`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lora_core import dispatch
from lora_core.lora.bnb_models import is_bnb_4bit, read_linear4bit
from lora_core.lora.nf4_linear import nf4_linear
from lora_core.quant.bnb import QUANT_STATE_SUFFIX
from lora_core.quant.nf4 import NF4Tensor, dequantize_nf4, quantize_nf4


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


def linear_features(module: nn.Module) -> tuple[int, int] | None:
    """``(in_features, out_features)`` of an ``nn.Linear`` (bitsandbytes' ``Linear4bit`` included), a
    ``Conv1D`` or a frozen `NF4Linear`; ``None`` for anything else."""
    if isinstance(module, (nn.Linear, NF4Linear)):
        return module.in_features, module.out_features
    if is_conv1d(module):
        n_in, n_out = module.weight.shape
        return int(n_in), int(n_out)
    return None


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


class _PlainTemplate:
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
        self._template = _PlainTemplate(template)

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
        self._template = _PlainTemplate(template)

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
