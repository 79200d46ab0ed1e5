"""``LoRALinear``: a frozen linear map plus a trainable low-rank update (LoRA, rsLoRA, DoRA, PiSSA init).

    y = x W₀ᵀ + b + s · (drop(x) Aᵀ) Bᵀ            A: (r, in), B: (out, r), s = α/r  (rsLoRA: α/√r)

DoRA (Liu et al. 2024) rescales each output row of ``W₀ + sBA`` to a learned magnitude ``m``; see
``lora_core.lora.functional`` for the formulas (PEFT's, so adapters are interchangeable).

The layer *holds* its frozen ``W₀`` as a base object (``lora_core.lora.bases``: `DenseBase`, or `NF4Base` for
QLoRA) and the adapter; it never reaches into the weight itself::

    LoRALinear ─┬─ base: DenseBase | NF4Base     x W₀ᵀ + b, products for the fused path, W₀ on request
                ├─ bias (out,)                   the base module's own Parameter
                └─ adapters, by name (``lora_core.lora.slots``): lora_A[name] (r, in), lora_B[name] (out, r),
                   DoRA's magnitude (out,), lora_specs[name] (r, alpha, dropout, rsLoRA, DoRA)

Several adapters: ``active_adapters`` (a list, set by ``lc.set_adapter``) is read once per call; one active
adapter runs exactly as a single-adapter layer always did (fused on CUDA), several add their updates on the
reference path, and a mixed batch (``lc.mixed_adapters``) gives each row of the batch its own adapter.

Each call goes one of two ways, as ``lora_core.dispatch.plan_lora`` decides: the fused autograd Function
(``lora_core.lora.fused``; CUDA) or the reference formula (``lora_core.lora.functional``; everywhere
else). Merge, unmerge and unload are inherited from ``lora_core.lora.merging.MergesAdapters`` (one pure
function, ``functional.merged_weight_sum``, for `merge` and `unload` alike), the adapters' bookkeeping from
``lora_core.lora.slots.HoldsAdapters``; this module is the layer's constructors and forward.

State-dict keys stay where the base module had them: ``weight`` (stored as the base stored it: (out, in)
for ``nn.Linear``, (in, out) for GPT-2's ``Conv1D``; NF4 bases use bitsandbytes' keys) and ``bias``; the
adapter ``"default"`` adds ``lora_A.weight`` (r, in), ``lora_B.weight`` (out, r) and, for DoRA,
``lora_magnitude_vector`` (out,) — PEFT's saved names; another adapter ``name`` adds
``lora_A.<name>.weight``, ``lora_B.<name>.weight`` (PEFT's in-memory keys) and
``lora_magnitude.<name>.weight``.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lora_core import dispatch
from lora_core.lora import functional
from lora_core.lora.bases import DenseBase, FrozenBase, frozen_base_of, is_conv1d, linear_features
from lora_core.lora.config import check_bool
from lora_core.lora.fused import fused_dora_linear, fused_lora_linear
from lora_core.lora.merging import MergesAdapters
from lora_core.lora.mixed import mixed_lora_linear
from lora_core.lora.slots import BASE, DEFAULT, AdapterSpec, check_adapter_name


def adapter_dtype_for(weight_dtype: torch.dtype) -> torch.dtype:
    """Adapters train in float32 over a half-precision (or quantized) base, as PEFT does by default
    (``autocast_adapter_dtype``); over a float32/float64 base they take the base's dtype."""
    return weight_dtype if weight_dtype in (torch.float32, torch.float64) else torch.float32


class LoRALinear(MergesAdapters):
    """A frozen linear map with trainable low-rank updates: ``x ↦ x W₀ᵀ + b + Σ_active s·(drop(x) Aᵀ) Bᵀ``.

    Build it with :meth:`from_linear` (alias ``from_module``, the name every LoRA layer class shares:
    ``LoRAEmbedding`` and ``LoRAConv`` are this layer in another frame); ``add_adapter`` adds more named
    adapters. ``merge()`` folds the active adapters' ``s·BA`` (or DoRA's rescaled weight) into the base
    weight; ``unmerge()`` takes them out again; ``unload()`` returns the plain module. ``r``,
    ``lora_alpha``, ``scaling``, ``use_rslora`` and ``use_dora`` describe the adapter called ``"default"``
    (or, without one, the first adapter).

    Args:
        base: the ``nn.Linear`` or GPT-2 ``Conv1D`` to adapt; its weight and bias Parameters are adopted
            (not copied) and frozen.
        r: rank of the update (LoRA, Hu et al. 2021, §4.1), 1 ≤ r ≤ min(in, out).
        alpha: scale numerator; ``s = alpha / r``, or ``alpha / sqrt(r)`` with ``use_rslora``.
        dropout: dropout probability on the adapter's input (LoRA §4.1), in [0, 1).
        use_rslora: rank-stabilised scaling (Kalajdzievski 2023, "A Rank Stabilization Scaling Factor").
        use_dora: weight-decomposed LoRA (Liu et al. 2024, "DoRA"), with a trainable magnitude (out,).
        fan_in_fan_out: the base stores its weight as (in, out) (GPT-2's ``Conv1D``). Corrected (with a
            warning) when it contradicts the module type, as PEFT does.
        frozen: the frozen base to hold instead of ``base``'s dense weight (e.g. an `NF4Base`; that is all
            `QLoRALinear` changes).
        adapter_name: the name of this first adapter (``"default"``: the keys a single-adapter layer has).
    """

    def __init__(
        self,
        base: nn.Module,
        *,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        use_dora: bool = False,
        fan_in_fan_out: bool = False,
        frozen: FrozenBase | None = None,
        adapter_name: str = DEFAULT,
    ) -> None:
        super().__init__()
        features = self.features(base)
        if features is None:
            raise TypeError(f"{type(self).__name__} adapts {self.ADAPTS} modules, got {type(base).__name__}")
        reason = self.unsupported(base)
        if reason is not None:
            raise ValueError(f"{type(self).__name__} cannot adapt this {type(base).__name__}: {reason}")
        self.in_features, self.out_features = features
        check_bool("fan_in_fan_out", fan_in_fan_out)
        check_adapter_name(adapter_name)  # every argument is checked before the base is adopted
        AdapterSpec.checked(r, alpha, dropout, use_rslora, use_dora, max_r=min(features))
        self.fan_in_fan_out = fan_in_fan_out = self._fan_in_fan_out(base, fan_in_fan_out)

        # The frozen base. A dense one keeps the module's own Parameter, registered here under `weight`
        # (directly: `weight` is a property showing base.weight), so its key and every reference survive.
        self.base = frozen if frozen is not None else self._frozen_base(base, fan_in_fan_out)  # NF4 stays NF4
        if isinstance(self.base, DenseBase):
            self._parameters["weight"] = self.base.weight
        self.bias = getattr(base, "bias", None)  # (out,) or None
        self._init_adapters(adapter_dtype_for(base.weight.dtype))  # lora_A, lora_B, lora_specs, ...
        self.disabled = False  # lc.disable_adapter: the base alone
        self.row_adapters: list[str] | None = None  # lc.mixed_adapters: one adapter name per row of x
        self._w0_sqnorm: tuple[tuple[Any, ...], Tensor] | None = None  # DoRA's ‖W₀_i‖², keyed by W₀
        self.add_adapter(
            adapter_name, r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora, use_dora=use_dora,
            init=None,
        )  # fmt: skip
        self.active_adapters = [adapter_name]
        # Take over the base's mode: a layer put into an eval model must not start applying dropout.
        self.train(base.training)

    # ---- what this class adapts (LoRAEmbedding and LoRAConv override these) ----------------------------
    ADAPTS = "nn.Linear or GPT-2 Conv1D"
    fusable = True  # one active adapter may take the fused CUDA Functions (a linear map)

    @classmethod
    def features(cls, module: nn.Module) -> tuple[int, int] | None:
        """``(in, out)`` of a module of the type this class adapts; None for any other module."""
        return linear_features(module)

    @classmethod
    def unsupported(cls, module: nn.Module) -> str | None:
        """Why this class cannot adapt ``module`` although its type fits (None: it can)."""
        return None

    def _fan_in_fan_out(self, base: nn.Module, fan_in_fan_out: bool) -> bool:
        conv1d = is_conv1d(base)
        if fan_in_fan_out != conv1d:
            warnings.warn(
                f"fan_in_fan_out={fan_in_fan_out} does not fit a {type(base).__name__}; using {conv1d}",
                stacklevel=4,
            )
        return conv1d

    def _frozen_base(self, base: nn.Module, fan_in_fan_out: bool) -> FrozenBase:
        return frozen_base_of(base, fan_in_fan_out)

    @classmethod
    def from_linear(
        cls,
        base: nn.Module,
        *,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        use_dora: bool = False,
        init: str = "default",
        fan_in_fan_out: bool = False,
        **kwargs: Any,
    ) -> LoRALinear:
        """Wrap ``base`` and initialise the adapter: ``init`` first (PiSSA replaces W₀ by its residual), then
        DoRA's magnitude from the resulting ``W₀ + s·BA``. Extra ``kwargs`` go to ``cls(...)``."""
        layer = cls(
            base, r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora, use_dora=use_dora,
            fan_in_fan_out=fan_in_fan_out, **kwargs,
        )  # fmt: skip
        layer.reset_lora_parameters(init, layer.adapter_names()[0])
        return layer

    from_module = from_linear  # the name that reads right for every LoRA layer class

    def base_weight(self, dtype: torch.dtype | None = None) -> Tensor:  # (out, in)
        """The dense frozen weight ``W₀`` in (out, in) layout (``self.base.dense_weight``)."""
        return self.base.dense_weight(dtype)

    # ---- forward ---------------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:  # (..., in) -> (..., out)
        if self.row_adapters is not None and not self.disabled and not self.merged:
            return self._mixed_forward(x, self.row_adapters)
        off = self.disabled or self.merged  # merged: the base holds them
        active = [] if off else [n for n in self.active_adapters if n in self.lora_specs]  # once per call
        if len(active) == 1 and self.fusable:  # one adapter: the fused Function where dispatch says so
            plan = dispatch.plan_lora(self, x)
            if plan.path == "fused":
                return self._fused_forward(x, plan.dtype, active[0])
        result = self.base.forward(x, self.bias)  # (..., out)
        if not active:
            return result
        out = result
        for name in active:  # several active adapters add their updates (PEFT's rule)
            out = out + self._update(name, x, result)
        return out.to(result.dtype)

    def _update(self, name: str, x: Tensor, result: Tensor) -> Tensor:  # (..., out), the adapter's dtype
        """Adapter ``name``'s additive term for input ``x`` whose base output (with bias) is ``result``."""
        spec = self.lora_specs[name]
        a, b = self.lora_A[name], self.lora_B[name]
        xa = x.to(a.dtype)  # adapters may be float32 over a half-precision base
        p = spec.dropout if self.training else 0.0
        if not spec.use_dora:
            return functional.lora_update(F.dropout(xa, p) if p else xa, a, b, spec.scaling)
        if not p:
            xd = xa
            base_xd = result if self.bias is None else result - self.bias  # x W₀ᵀ, reused
        else:  # dropout changes the input, so W₀'s share must be recomputed on drop(x)
            xd = F.dropout(xa, p)
            base_xd = self.base.forward(xd.to(x.dtype), None).to(xd.dtype)
        norm = self._dora_norm(name, xa.dtype)
        return functional.dora_update(xd, base_xd, a, b, self.magnitude(name), norm, spec.scaling)

    def _mixed_forward(self, x: Tensor, names: list[str]) -> Tensor:
        """Row ``i`` of ``x`` (dim 0) through adapter ``names[i]`` alone (``"__base__"``: none). On CUDA
        (``dispatch.plan_mixed``) the per-row kernels apply every plain LoRA adapter in one pass
        (``lora_core.lora.mixed``); the others (DoRA, dropout in effect, rank > ``MIXED_MAX_R``), and
        every adapter elsewhere, take the reference: each adapter's update on its rows, ``index_add``-ed
        onto the base output."""
        if x.dim() < 2 or x.shape[0] != len(names):
            raise ValueError(
                f"mixed_adapters got {len(names)} adapter names for an input of shape {tuple(x.shape)}; "
                "give one name per row (dim 0) of the batch"
            )
        # an adapter this layer lacks: its rows see the base alone
        used = [n for n in dict.fromkeys(names) if n != BASE and n in self.lora_specs]
        plan = dispatch.plan_mixed(self, x)
        fast = [n for n in used if self._kernel_takes(n)] if plan.path == "kernel" else []
        if fast:
            result = self._mixed_kernel_forward(x, names, fast, plan.dtype)  # base + fast adapters' updates
        else:
            result = self.base.forward(x, self.bias)  # (B, ..., out)
        slow = [n for n in used if n not in fast]
        if not slow:
            return result
        # one copy of the output to add into in place (an out-of-place index_add copies it per adapter)
        out = result.to(torch.promote_types(result.dtype, self._adapter_dtype), copy=True)
        for name in slow:  # their rows of `result` are the base output still
            rows = torch.tensor([i for i, n in enumerate(names) if n == name], device=x.device)
            out.index_add_(0, rows, self._update(name, x[rows], result[rows]).to(out.dtype))
        return out.to(result.dtype)

    def _kernel_takes(self, name: str) -> bool:
        """Whether the per-row kernels compute adapter ``name`` (plain LoRA, no dropout in effect)."""
        spec = self.lora_specs[name]
        return not spec.use_dora and not (spec.dropout and self.training) and spec.r <= dispatch.MIXED_MAX_R

    def _mixed_kernel_forward(
        self, x: Tensor, names: list[str], fast: list[str], dtype: torch.dtype
    ) -> Tensor:
        """``base(x) + b`` plus each ``fast`` adapter's update on its rows, through the per-row kernels in
        ``dtype`` (x's, or autocast's: cast as in `_fused_forward`)."""
        slot = {n: i for i, n in enumerate(fast)}
        index = [slot.get(n, -1) for n in names]
        factors = [(self.lora_A[n], self.lora_B[n], self.lora_specs[n].scaling) for n in fast]
        with torch.autocast(x.device.type, enabled=False):
            return mixed_lora_linear(x.to(dtype), self.base.cast(dtype), factors, index, self.bias)

    def _fused_forward(self, x: Tensor, dtype: torch.dtype, name: str) -> Tensor:
        """The fused Function in ``dtype`` (x's, or autocast's: the inputs are cast as autocast would cast
        them, and the Function runs with autocast off, computing exactly in that dtype)."""
        base = self.base.cast(dtype)
        spec = self.lora_specs[name]
        p = spec.dropout if self.training else 0.0
        a, b = self.lora_A[name], self.lora_B[name]
        with torch.autocast(x.device.type, enabled=False):
            x = x.to(dtype)
            if not spec.use_dora:
                return fused_lora_linear(x, base, a, b, self.bias, scaling=spec.scaling, dropout=p)
            return fused_dora_linear(
                x, base, a, b, self.magnitude(name), self.bias, scaling=spec.scaling, dropout=p,
                w0_sqnorm=self._cached_w0_sqnorm(),
            )  # fmt: skip

    def _cached_w0_sqnorm(self) -> Tensor:  # (out,)
        """``‖W₀_i‖²`` for DoRA's norm (from the stored W₀, before any autocast cast): constant while the
        base is frozen, recomputed when W₀ changes."""
        key = self.base.cache_key()
        if self._w0_sqnorm is None or self._w0_sqnorm[0] != key:
            self._w0_sqnorm = (key, self.base.row_sqnorm().detach())
        return self._w0_sqnorm[1]

    def extra_repr(self) -> str:
        kind = "DoRA" if self.use_dora else "LoRA"
        names = "" if self.adapter_names() == [DEFAULT] else f", adapters={self.adapter_names()}"
        return (
            f"{kind}: in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"alpha={self.lora_alpha:g}, scaling={self.scaling:.4g}, fan_in_fan_out={self.fan_in_fan_out}, "
            f"merged={self.merged}, base={type(self.base).__name__}{names}"
        )


__all__ = ["LoRALinear", "adapter_dtype_for", "is_conv1d", "linear_features"]
