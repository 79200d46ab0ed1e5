"""``LoRALinear``: a frozen linear map plus a trainable low-rank update (LoRA, rsLoRA, DoRA, PiSSA init).

    y = x W₀ᵀ + b + s · (drop(x) Aᵀ) Bᵀ            A: (r, in), B: (out, r), s = α/r  (rsLoRA: α/√r)

DoRA (Liu et al. 2024) rescales each output row of ``W₀ + sBA`` to a learned magnitude ``m``; see
``lora_core.lora.functional`` for the formulas (PEFT's, so adapters are interchangeable).

The layer *holds* its frozen ``W₀`` as a base object (``lora_core.lora.bases``: `DenseBase`, or `NF4Base` for
QLoRA) and the adapter; it never reaches into the weight itself::

    LoRALinear ─┬─ base: DenseBase | NF4Base     x W₀ᵀ + b, products for the fused path, W₀ on request
                ├─ bias (out,)                   the base module's own Parameter
                └─ lora_A (r, in), lora_B (out, r), lora_magnitude_vector (out,) DoRA, lora_dropout

Each call goes one of two ways, as ``lora_core.dispatch.plan_lora`` decides: the fused autograd Function
(``lora_core.lora.fused``; CUDA) or the reference formula (``lora_core.lora.functional``; everywhere
else). Merging uses one pure function, ``functional.merged_weight``, for `merge` and `unload` alike.

State-dict keys stay where the base module had them: ``weight`` (stored as the base stored it: (out, in)
for ``nn.Linear``, (in, out) for GPT-2's ``Conv1D``; NF4 bases use bitsandbytes' keys) and ``bias``; the
adapter adds ``lora_A.weight`` (r, in), ``lora_B.weight`` (out, r) and, for DoRA,
``lora_magnitude_vector`` (out,) — PEFT's saved names.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import Tensor, nn

from lora_core import dispatch
from lora_core.lora import functional, inits
from lora_core.lora.bases import (
    DenseBase,
    FrozenBase,
    HoldsFrozenBase,
    NF4Base,
    frozen_base_of,
    is_conv1d,
    linear_features,
)
from lora_core.lora.config import check_alpha, check_bool, check_dropout
from lora_core.lora.fused import fused_dora_linear, fused_lora_linear


def adapter_dtype_for(weight_dtype: torch.dtype) -> torch.dtype:
    """Adapters train in float32 over a half-precision (or quantized) base, as PEFT does by default
    (``autocast_adapter_dtype``); over a float32/float64 base they take the base's dtype."""
    return weight_dtype if weight_dtype in (torch.float32, torch.float64) else torch.float32


class LoRALinear(HoldsFrozenBase):
    """A frozen linear map with a trainable low-rank update: ``x ↦ x W₀ᵀ + b + s·(drop(x) Aᵀ) Bᵀ``.

    Build it with :meth:`from_linear`. ``merge()`` folds ``s·BA`` (or DoRA's rescaled weight) into the
    base weight for inference; ``unmerge()`` takes it out again; ``unload()`` returns the plain module.

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
    ) -> None:
        super().__init__()
        features = linear_features(base)
        if features is None:
            raise TypeError(f"LoRALinear adapts nn.Linear or GPT-2 Conv1D modules, got {type(base).__name__}")
        in_features, out_features = features
        for name, flag in (
            ("use_rslora", use_rslora),
            ("use_dora", use_dora),
            ("fan_in_fan_out", fan_in_fan_out),
        ):
            check_bool(name, flag)
        conv1d = is_conv1d(base)
        if fan_in_fan_out != conv1d:
            warnings.warn(
                f"fan_in_fan_out={fan_in_fan_out} does not fit a {type(base).__name__}; using {conv1d}",
                stacklevel=3,
            )
            fan_in_fan_out = conv1d
        if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= min(in_features, out_features):
            raise ValueError(
                f"r must be an int in [1, min(in, out) = {min(in_features, out_features)}], got {r!r}"
            )
        check_alpha("alpha", alpha)  # a finite number > 0 (not a bool, not a string)
        check_dropout("dropout", dropout)

        self.in_features, self.out_features = in_features, out_features
        self.r, self.lora_alpha = r, float(alpha)
        self.use_rslora, self.use_dora, self.fan_in_fan_out = use_rslora, use_dora, fan_in_fan_out
        self.scaling = self.lora_alpha / (math.sqrt(r) if use_rslora else r)
        self.merged = False

        # The frozen base. A dense one keeps the module's own Parameter, registered here under `weight`
        # (directly: `weight` is a property showing base.weight), so its key and every reference survive.
        self.base = frozen if frozen is not None else frozen_base_of(base, fan_in_fan_out)  # NF4 stays NF4
        if isinstance(self.base, DenseBase):
            self._parameters["weight"] = self.base.weight
        self.bias = base.bias  # (out,) or None

        dtype = adapter_dtype_for(base.weight.dtype)
        device = base.weight.device
        self.lora_dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(in_features, r, bias=False, device=device, dtype=dtype)  # weight (r, in)
        self.lora_B = nn.Linear(r, out_features, bias=False, device=device, dtype=dtype)  # weight (out, r)
        if use_dora:
            self.lora_magnitude_vector = nn.Parameter(torch.ones(out_features, device=device, dtype=dtype))
        self.register_buffer("_dora_merged_norm", None, persistent=False)
        self._w0_sqnorm: tuple[tuple[Any, ...], Tensor] | None = None  # DoRA's ‖W₀_i‖², keyed by W₀
        # Take over the base's mode: a layer put into an eval model must not start applying dropout.
        self.train(base.training)

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
        layer.reset_lora_parameters(init)
        return layer

    def base_weight(self, dtype: torch.dtype | None = None) -> Tensor:  # (out, in)
        """The dense frozen weight ``W₀`` in (out, in) layout (``self.base.dense_weight``)."""
        return self.base.dense_weight(dtype)

    def delta_weight(self) -> Tensor:  # (out, in)
        """The low-rank update ``s · B A`` in the adapter's dtype."""
        return functional.lora_delta_weight_ref(self.lora_A.weight, self.lora_B.weight, self.scaling)

    # ---- adapter initialisation ------------------------------------------------------------------------
    @torch.no_grad()
    def reset_lora_parameters(self, init: str = "default") -> None:
        """Initialise A and B (and DoRA's magnitude).

        Args:
            init: ``"default"``: A kaiming-uniform (a=√5), B = 0 (LoRA §4.1: the update starts at zero).
                ``"gaussian"``: A ~ N(0, std=1/r), B = 0 (PEFT's choice). ``"pissa"``: with ``W₀ = U S Vᵀ``,
                ``B = U_r √(S_r/s)``, ``A = √(S_r/s) V_rᵀ`` so that ``s·BA`` is the best rank-r approximation
                of W₀, and W₀ becomes the residual ``W₀ − s·BA`` (Meng et al. 2024, "PiSSA", §3); outputs
                are unchanged up to rounding.
        """
        if init == "default":
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B.weight)
        elif init == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1.0 / self.r)
            nn.init.zeros_(self.lora_B.weight)
        elif init == "pissa":
            self._pissa_init()
        else:  # "olora", "pissa_niter_<N>" (lora_core.lora.inits); ValueError for anything else
            inits.apply_extra_init(self, init)
        if self.use_dora:
            self.lora_magnitude_vector.copy_(self._dora_norm(self.lora_A.weight.dtype))

    def _pissa_init(self) -> None:
        w = self.base.dense_weight()
        w = w.to(torch.promote_types(w.dtype, torch.float32))  # (out, in)
        u, s_vals, vh = torch.linalg.svd(w, full_matrices=False)  # (out, k), (k,), (k, in)
        root = torch.sqrt(s_vals[: self.r] / self.scaling)  # (r,)
        a = root[:, None] * vh[: self.r]  # (r, in)
        b = u[:, : self.r] * root[None, :]  # (out, r)
        self.lora_A.weight.copy_(a)
        self.lora_B.weight.copy_(b)
        self.base.set_dense_weight(w - self.scaling * (b @ a))

    def _dora_norm(self, dtype: torch.dtype) -> Tensor:  # (out,)
        """``‖W₀ + s·BA‖`` per output row, in ``dtype``, without gradient (DoRA §4.3)."""
        a, b = self.lora_A.weight.to(dtype), self.lora_B.weight.to(dtype)
        return functional.dora_weight_norm(self.base.dense_weight(dtype), a, b, self.scaling)

    # ---- forward ---------------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:  # (..., in) -> (..., out)
        plan = dispatch.plan_lora(self, x)
        if plan.path == "fused":
            return self._fused_forward(x, plan.dtype)
        result = self.base.forward(x, self.bias)  # (..., out)
        if self.merged:
            return result
        xa = x.to(self.lora_A.weight.dtype)  # adapters may be float32 over a half-precision base
        a, b = self.lora_A.weight, self.lora_B.weight
        if not self.use_dora:
            lora = functional.lora_update(self.lora_dropout(xa), a, b, self.scaling)  # (..., out)
            return (result + lora).to(result.dtype)
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            xd = xa
            base_xd = result if self.bias is None else result - self.bias  # x W₀ᵀ, reused
        else:  # dropout changes the input, so W₀'s share must be recomputed on drop(x)
            xd = self.lora_dropout(xa)
            base_xd = self.base.forward(xd.to(x.dtype), None).to(xd.dtype)
        norm = self._dora_norm(xa.dtype)
        dora = functional.dora_update(xd, base_xd, a, b, self.lora_magnitude_vector, norm, self.scaling)
        return (result + dora).to(result.dtype)

    def _fused_forward(self, x: Tensor, dtype: torch.dtype) -> Tensor:
        """The fused Function in ``dtype`` (x's, or autocast's: the inputs are cast as autocast would cast
        them, and the Function runs with autocast off, computing exactly in that dtype)."""
        base = self.base.cast(dtype)
        drop = self.lora_dropout
        p = float(drop.p) if self.training and isinstance(drop, nn.Dropout) else 0.0
        a, b = self.lora_A.weight, self.lora_B.weight
        with torch.autocast(x.device.type, enabled=False):
            x = x.to(dtype)
            if not self.use_dora:
                return fused_lora_linear(x, base, a, b, self.bias, scaling=self.scaling, dropout=p)
            return fused_dora_linear(
                x, base, a, b, self.lora_magnitude_vector, self.bias, scaling=self.scaling, dropout=p,
                w0_sqnorm=self._cached_w0_sqnorm(),
            )  # fmt: skip

    def _cached_w0_sqnorm(self) -> Tensor:  # (out,)
        """``‖W₀_i‖²`` for DoRA's norm (from the stored W₀, before any autocast cast): constant while the
        base is frozen, recomputed when W₀ changes."""
        key = self.base.cache_key()
        if self._w0_sqnorm is None or self._w0_sqnorm[0] != key:
            self._w0_sqnorm = (key, self.base.row_sqnorm().detach())
        return self._w0_sqnorm[1]

    # ---- merge / unmerge / unload ----------------------------------------------------------------------
    def _merged(self) -> tuple[Tensor, Tensor | None]:
        """``functional.merged_weight`` of this layer, in float32 or wider: (W' (out, in), DoRA's norm)."""
        w = self.base.dense_weight()
        w = w.to(torch.promote_types(w.dtype, torch.float32))
        m = self.lora_magnitude_vector if self.use_dora else None
        return functional.merged_weight(w, self.lora_A.weight, self.lora_B.weight, self.scaling, m)

    def _store(self, w: Tensor, what: str) -> None:
        """Write ``w`` into the base; a base that cannot hold it exactly (NF4) reports the error: warn."""
        err = self.base.set_dense_weight(w)
        if err is not None:
            warnings.warn(
                f"{what} a 4-bit NF4 base requantizes it: requantization error max |ΔW| = {err:.3g}; "
                "unload_lora(model, "
                "dequantize=True) merges exactly into a dense layer",
                UserWarning,
                stacklevel=3,
            )

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into the base weight: ``W₀ ← W₀ + s·BA`` (DoRA: ``m ⊙ (W₀ + s·BA)/‖·‖_row``).

        Raises:
            ValueError: already merged.
        """
        if self.merged:
            raise ValueError("this LoRALinear is already merged; call unmerge() first")
        w, self._dora_merged_norm = self._merged()
        self._store(w, "merging into")
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the adapter out of the base weight again (exact up to float rounding for a dense base).

        Raises:
            ValueError: not merged.
        """
        if not self.merged:
            raise ValueError("this LoRALinear is not merged; nothing to unmerge")
        w = self.base.dense_weight()
        w = w.to(torch.promote_types(w.dtype, torch.float32))
        m = self.lora_magnitude_vector if self.use_dora else None
        a, b = self.lora_A.weight, self.lora_B.weight
        w0 = functional.unmerged_weight(w, a, b, self.scaling, m, self._dora_merged_norm)
        self._dora_merged_norm = None
        self._store(w0, "unmerging from")
        self.merged = False

    @torch.no_grad()
    def unload(self, dequantize: bool = False) -> nn.Module:
        """The plain module (the base's own class) holding the merged weight; the adapter is dropped.

        A dense base merges in place and hands its Parameter to the plain module. An NF4 base gives, with
        ``dequantize=True``, a dense module holding ``dequant(W) + s·BA`` exactly (`functional.merged_weight`,
        never requantized); with ``False``, a frozen `NF4Linear` (requantized: lossy, warns). On an NF4 layer
        that is already merged, ``dequantize=True`` cannot be exact (the exact sum was not kept): it returns
        ``dequant`` of what the base holds and warns with the recorded error.
        """
        exact_dense = dequantize and isinstance(self.base, NF4Base)
        if exact_dense and not self.merged:
            weight: Tensor | None = self._merged()[0]
        elif exact_dense:
            err = self.base.requantization_error
            err_text = "unknown" if err is None else f"{err:.3g}"
            warnings.warn(
                "unload(dequantize=True) on an already merged QLoRALinear returns the requantized merge, not "
                f"the exact one: requantization error max |ΔW| = {err_text}; "
                "unload before merging for the exact dequant(W) + s·BA",
                UserWarning,
                stacklevel=2,
            )
            weight = self.base.dense_weight()
        else:
            if not self.merged:
                self.merge()
            weight = None  # the base as it is stored now
        return self.base.plain_module(weight, self.bias, self.training)

    def extra_repr(self) -> str:
        kind = "DoRA" if self.use_dora else "LoRA"
        return (
            f"{kind}: in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"alpha={self.lora_alpha:g}, scaling={self.scaling:.4g}, fan_in_fan_out={self.fan_in_fan_out}, "
            f"merged={self.merged}, base={type(self.base).__name__}"
        )


__all__ = ["LoRALinear", "adapter_dtype_for", "is_conv1d", "linear_features"]
