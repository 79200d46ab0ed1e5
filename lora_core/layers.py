"""``LoRALinear``: a frozen linear layer plus a trainable low-rank update (LoRA, rsLoRA, DoRA, PiSSA init).

    y = x W₀ᵀ + b + s · (drop(x) Aᵀ) Bᵀ            A: (r, in), B: (out, r), s = α/r  (rsLoRA: α/√r)

DoRA (Liu et al. 2024) rescales each output row of ``W₀ + sBA`` to a learned magnitude ``m``; see
``lora_core.reference`` for the formula this layer computes (PEFT's, so adapters are interchangeable).

State-dict keys stay where the base module had them: the frozen weight is this module's own ``weight``
(stored as the base stored it: (out, in) for ``nn.Linear``, (in, out) for GPT-2's ``Conv1D`` with
``fan_in_fan_out=True``) and ``bias``; the adapter adds ``lora_A.weight`` (r, in), ``lora_B.weight``
(out, r) and, for DoRA, ``lora_magnitude_vector`` (out,) — PEFT's saved names.

Everything that touches the frozen weight goes through four hooks, so a subclass can store it differently
(``lora_core.qlora.QLoRALinear`` keeps it in NF4) without changing the LoRA math:

    base_forward(x)      x W₀ᵀ + b                      base_weight(dtype)   W₀ as (out, in)
    set_base_weight(w)   W₀ ← w, w given as (out, in)   unload(dequantize)   the plain merged module

and ``base_op()`` hands the fused path (``lora_core.fused``: one autograd Function per layer, the default
on CUDA) the frozen product as an object; ``None`` keeps a subclass on this module's reference path.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lora_core import fused
from lora_core.config import _check_alpha, _check_bool, _check_dropout


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
    """``(in_features, out_features)`` of an ``nn.Linear`` or ``Conv1D``; ``None`` for anything else."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if is_conv1d(module):
        n_in, n_out = module.weight.shape
        return int(n_in), int(n_out)
    return None


def adapter_dtype_for(weight_dtype: torch.dtype) -> torch.dtype:
    """Adapters train in float32 over a half-precision (or quantized) base, as PEFT does by default
    (``autocast_adapter_dtype``); over a float32/float64 base they take the base's dtype."""
    return weight_dtype if weight_dtype in (torch.float32, torch.float64) else torch.float32


class LoRALinear(nn.Module):
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
            _check_bool(name, flag)
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
        _check_alpha("alpha", alpha)  # a finite number > 0 (not a bool, not a string)
        _check_dropout("dropout", dropout)

        self.in_features, self.out_features = in_features, out_features
        self.r, self.lora_alpha = r, float(alpha)
        self.use_rslora, self.use_dora, self.fan_in_fan_out = use_rslora, use_dora, fan_in_fan_out
        self.scaling = self.lora_alpha / (math.sqrt(r) if use_rslora else r)
        self.merged = False
        # How to rebuild the plain module in `unload` (its class and plain attributes such as `nf`).
        self._base_class = type(base)
        self._base_attrs = {k: v for k, v in vars(base).items() if not k.startswith("_") and k != "training"}

        # Frozen base: the same Parameter objects, so the base's keys and any references to them survive.
        self.weight = base.weight  # (out, in), or (in, out) with fan_in_fan_out
        self.bias = base.bias  # (out,) or None
        self.weight.requires_grad_(False)

        dtype = adapter_dtype_for(self.weight.dtype)
        device = self.weight.device
        self.lora_dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(in_features, r, bias=False, device=device, dtype=dtype)  # weight (r, in)
        self.lora_B = nn.Linear(r, out_features, bias=False, device=device, dtype=dtype)  # weight (out, r)
        if use_dora:
            self.lora_magnitude_vector = nn.Parameter(torch.ones(out_features, device=device, dtype=dtype))
        self.register_buffer("_dora_merged_norm", None, persistent=False)
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

    # ---- the hooks: all access to the frozen weight goes through these ---------------------------------
    def base_forward(self, x: Tensor) -> Tensor:  # (..., in) -> (..., out)
        """The frozen part, ``x W₀ᵀ + b``, computed exactly as the original module did."""
        if self.fan_in_fan_out:  # Conv1D's own formula, so outputs match it bit for bit
            x2 = x.reshape(-1, x.shape[-1])  # (N, in)
            y = x2 @ self.weight if self.bias is None else torch.addmm(self.bias, x2, self.weight)
            return y.view(*x.shape[:-1], self.out_features)
        return F.linear(x, self.weight, self.bias)

    def base_weight(self, dtype: torch.dtype | None = None) -> Tensor:  # (out, in)
        """The dense frozen weight in (out, in) layout (a view when no cast is needed)."""
        w = self.weight.T if self.fan_in_fan_out else self.weight
        return w if dtype is None else w.to(dtype)

    @torch.no_grad()
    def set_base_weight(self, w: Tensor) -> None:
        """Replace the frozen weight by ``w`` given as (out, in), in place (the Parameter object stays)."""
        if tuple(w.shape) != (self.out_features, self.in_features):
            raise ValueError(
                f"w must have shape {(self.out_features, self.in_features)}, got {tuple(w.shape)}"
            )
        self.weight.copy_(w.T if self.fan_in_fan_out else w)

    def base_op(self) -> fused.BaseOp | None:
        """The frozen product for the fused Function: the dense weight (a view, no copy). A subclass that
        overrides ``base_weight`` without ``base_op`` gets ``None``, i.e. the reference path."""
        if type(self).base_weight is not LoRALinear.base_weight:
            return None
        return fused.DenseBase(self.base_weight())

    def delta_weight(self) -> Tensor:  # (out, in)
        """The low-rank update ``s · B A`` in the adapter's dtype."""
        return self.scaling * (self.lora_B.weight @ self.lora_A.weight)

    @torch.no_grad()
    def unload(self, dequantize: bool = False) -> nn.Module:
        """The plain module (the base's own class) holding the merged weight; the adapter is dropped.
        ``dequantize`` matters only for quantized subclasses: the dense layer is dense already."""
        if not self.merged:
            self.merge()
        plain = self._base_class.__new__(self._base_class)
        nn.Module.__init__(plain)
        plain.__dict__.update(self._base_attrs)
        plain.weight = self.weight
        plain.bias = self.bias
        plain.train(self.training)  # nn.Module.__init__ left it in training mode
        return plain

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
        else:
            raise ValueError(f"init must be one of ['default', 'gaussian', 'pissa'], got {init!r}")
        if self.use_dora:
            self.lora_magnitude_vector.copy_(self._dora_norm(self.lora_A.weight.dtype))

    def _pissa_init(self) -> None:
        work = torch.promote_types(self.base_weight().dtype, torch.float32)
        w = self.base_weight(work)  # (out, in)
        u, s_vals, vh = torch.linalg.svd(w, full_matrices=False)  # (out, k), (k,), (k, in)
        root = torch.sqrt(s_vals[: self.r] / self.scaling)  # (r,)
        a = root[:, None] * vh[: self.r]  # (r, in)
        b = u[:, : self.r] * root[None, :]  # (out, r)
        self.lora_A.weight.copy_(a)
        self.lora_B.weight.copy_(b)
        self.set_base_weight((w - self.scaling * (b @ a)).to(self.weight.dtype))

    def _dora_norm(self, dtype: torch.dtype) -> Tensor:  # (out,)
        """``‖W₀ + s·BA‖`` per output row, in ``dtype``, without gradient (DoRA §4.3)."""
        with torch.no_grad():
            w = self.base_weight(dtype)  # (out, in)
            return torch.linalg.vector_norm(w + self.delta_weight().to(dtype), dim=1)

    # ---- forward ---------------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:  # (..., in) -> (..., out)
        if fused.use_fused(self, x):  # THE dispatch point: CUDA → the fused Function; else the formula below
            return fused.lora_layer_forward(self, x)
        result = self.base_forward(x)  # (..., out)
        if self.merged:
            return result
        xa = x.to(self.lora_A.weight.dtype)  # adapters may be float32 over a half-precision base
        if not self.use_dora:
            lora = self.lora_B(self.lora_A(self.lora_dropout(xa))) * self.scaling  # (..., out)
            return (result + lora).to(result.dtype)
        return (result + self._dora_correction(xa, result)).to(result.dtype)

    def _dora_correction(self, x: Tensor, result: Tensor) -> Tensor:  # (..., out)
        """``(g − 1) ⊙ drop(x) W₀ᵀ + g ⊙ s·drop(x) AᵀBᵀ`` with ``g = m / ‖W₀ + s·BA‖_row`` (norm detached)."""
        g = self.lora_magnitude_vector / self._dora_norm(x.dtype)  # (out,)
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            xd = x
            base = result if self.bias is None else result - self.bias  # x W₀ᵀ, reused
        else:  # dropout changes the input, so W₀'s share must be recomputed on drop(x)
            xd = self.lora_dropout(x)
            base = F.linear(xd, self.base_weight(x.dtype))
        lora = self.lora_B(self.lora_A(xd)) * self.scaling  # (..., out)
        return (g - 1) * base + g * lora

    # ---- merge / unmerge -------------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into the base weight: ``W₀ ← W₀ + s·BA`` (DoRA: ``m ⊙ (W₀ + s·BA)/‖·‖_row``).

        Raises:
            ValueError: already merged.
        """
        if self.merged:
            raise ValueError("this LoRALinear is already merged; call unmerge() first")
        work = torch.promote_types(self.base_weight().dtype, torch.float32)
        v = self.base_weight(work) + self.delta_weight().to(work)  # (out, in)
        if self.use_dora:
            norm = torch.linalg.vector_norm(v, dim=1)  # (out,)
            self._dora_merged_norm = norm  # needed to undo the rescaling exactly
            v = (self.lora_magnitude_vector.to(work) / norm)[:, None] * v
        self.set_base_weight(v.to(self.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the adapter out of the base weight again (exact up to float rounding).

        Raises:
            ValueError: not merged.
        """
        if not self.merged:
            raise ValueError("this LoRALinear is not merged; nothing to unmerge")
        work = torch.promote_types(self.base_weight().dtype, torch.float32)
        w = self.base_weight(work)  # (out, in)
        if self.use_dora:
            w = w * (self._dora_merged_norm / self.lora_magnitude_vector.to(work))[:, None]
            self._dora_merged_norm = None
        self.set_base_weight((w - self.delta_weight().to(work)).to(self.weight.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        kind = "DoRA" if self.use_dora else "LoRA"
        return (
            f"{kind}: in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"alpha={self.lora_alpha:g}, scaling={self.scaling:.4g}, fan_in_fan_out={self.fan_in_fan_out}, "
            f"merged={self.merged}"
        )
