"""Fused LoRA / QLoRA / DoRA: one autograd Function per layer, saving only ``x``, ``xa`` and a seed.

Autograd through ``LoRALinear``'s plain formula keeps ``x``, ``drop(x)``, the dropout mask, ``drop(x)Aᵀ``
and (DoRA) several full-size temporaries, and launches ~10 separate kernels. Here one Function computes

    LoRA:   y = x W₀ᵀ + b + s · (drop(x) Aᵀ) Bᵀ                       xa := drop(x) Aᵀ   (M, r)
    DoRA:   y = x W₀ᵀ + b + (g − 1) ⊙ (drop(x) W₀ᵀ) + g ⊙ s · xa Bᵀ    g := m / ‖W₀ + sBA‖_row (detached)

with the small products landing in the big output buffer (``addmm_``: the GEMM adds into the buffer in
its epilogue, so the add costs no pass of its own)::

    LoRA:  out  = x W₀ᵀ + b        (M, out)   the frozen GEMM (`base.product`: oneDNN on a CPU)
           out += xa (s·B)ᵀ        (M, out)   skinny GEMM with beta = 1 (B = 0 adds exactly nothing)
    DoRA:  out  = xa (s·B)ᵀ        (M, out)   skinny GEMM, writes the buffer
           out += x W₀ᵀ            (M, out)   the frozen GEMM with beta = 1 (dense: BLAS; NF4: base op)

**Backward** (G = ∂L/∂y, (M, out); mask' = mask / (1 − p), the Bernoulli(1 − p) mask of dropout)::

    LoRA
    ∂L/∂x  = G W₀ + s · ((G B) A) ⊙ mask'          (M, in)    t = G W₀;  t += (G·sB) A  (⊙ mask')
    ∂L/∂A  = s · (G B)ᵀ drop(x)                     (r, in)    drop(x) = x ⊙ mask', regenerated
    ∂L/∂B  = s · Gᵀ xa                              (out, r)   xa is saved
    ∂L/∂b  = Σ_rows G                               (out,)

    DoRA, no dropout: y = g ⊙ z + b with z = x W₀ᵀ + s · xa Bᵀ (so z = (y − b) / g: y is saved, not z)
    ∂L/∂x  = (G ⊙ g) W₀ + s · (G (g ⊙ B)) A         g scales B's rows: no (M, in) temporary for it
    ∂L/∂A  = s · (G (g ⊙ B))ᵀ x
    ∂L/∂B  = s · g ⊙ (Gᵀ xa)
    ∂L/∂m  = Σ_rows (G ⊙ z) / ‖V‖ = (Σ_rows G ⊙ y − b ⊙ Σ_rows G) / m     (norm detached: DoRA §4.3)

    DoRA with dropout: x W₀ᵀ − drop(x) W₀ᵀ = (x − drop(x)) W₀ᵀ, so with w = drop(x) W₀ᵀ + s · xa Bᵀ
    y      = (x ⊙ (1 − mask')) W₀ᵀ + g ⊙ w + b        (two frozen GEMMs, as PEFT's formula needs)
    ∂L/∂x  = G W₀ + mask' ⊙ ((G ⊙ (g − 1)) W₀ + s · (G (g ⊙ B)) A)
    ∂L/∂A, ∂L/∂B as above with drop(x);  ∂L/∂m = Σ_rows (G ⊙ w) / ‖V‖   (w is saved: (M, out))

DoRA's row norms never form ``W₀ + sBA`` (A W₀ᵀ is the base op applied to the r rows of A)::

    ‖W₀ + sBA‖²_i = ‖W₀_i‖² + 2s · Σ_j B_ij (A W₀ᵀ)_ji + s² · (B (A Aᵀ) Bᵀ)_ii

``‖W₀_i‖²`` is cached per layer (the base is frozen; the cache key follows the weight's storage/version).

**What is saved** between forward and backward: ``x`` (one reference, no copy), ``xa`` (M, r), the
adapter Parameters themselves, an int seed (the dropout mask is regenerated from it — never stored), and
for DoRA ``g``/``‖V‖`` (out,) plus the output ``y`` (no dropout: the same storage the caller holds) or
``w`` (M, out) (dropout). Never a dequantized weight, never a second copy of ``x``.

The frozen ``W₀`` comes in as a base object (``lora_core.lora.bases``: dense or NF4, one protocol). Whether a
layer takes this path is ``lora_core.dispatch``'s decision (CUDA inputs do; `fused_mode("always")` makes
the tests run the fused math on CPU in float64). The Functions compute in ``x``'s dtype: under autocast
the layer hands them ``x`` already cast to autocast's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lora_core import dispatch
from lora_core.lora.bases import DenseBase, FrozenBase
from lora_core.lora.dropout import dropout_mask

# ---- dropout regenerated from a seed (the mask: lora.dropout) ----------------------------------------------


def _draw_seed() -> int:
    # From the CPU generator: no device sync; reproducible under torch.manual_seed, and activation
    # checkpointing (which restores the CPU RNG state) re-draws the same seed when it re-runs forward.
    return int(torch.randint(0, 2**62, (1,)).item())


# ---- the Functions -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoraSpec:
    """Everything a fused Function needs besides its tensors (instead of a dozen positional arguments).

    Args:
        base: the frozen product (`DenseBase` or `NF4Base`).
        scaling: ``s = α/r`` (or ``α/√r``, rsLoRA).
        dropout: ``p`` of the adapter-input dropout, 0 for none (or in eval mode).
        seed: the dropout mask's seed (ignored when ``dropout == 0``).
        w0_sqnorm: DoRA only: ``‖W₀_i‖²`` (out,), float32/float64 — the constant part of the row norms.
    """

    base: FrozenBase
    scaling: float
    dropout: float = 0.0
    seed: int = 0
    w0_sqnorm: Tensor | None = None


def as2d(t: Tensor) -> Tensor:  # (..., n) -> (M, n), a view whenever the strides allow it
    return t.reshape(-1, t.shape[-1])


class LoRALinearFunction(torch.autograd.Function):
    """``y = base(x) + b + s · (drop(x) Aᵀ) Bᵀ``; backward per the module docstring. Saves x, xa (M, r)."""

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, lora_A: Tensor, lora_B: Tensor, bias: Tensor | None, spec: LoraSpec
    ) -> Tensor:
        dt, s, p = x.dtype, spec.scaling, spec.dropout
        x2 = as2d(x)  # (M, in)
        xd = x2 * dropout_mask(x2, p, spec.seed) if p > 0 else x2  # (M, in), transient
        xa = dispatch.linear(xd, lora_A.to(dt))  # (M, r)
        del xd
        bs = (lora_B * s).to(dt)  # (out, r): s rides on the small operand
        b = None if bias is None else bias.to(dt)
        out = spec.base.product(x2, b)  # (M, out) = x W₀ᵀ + b
        out.addmm_(xa, bs.T)  # += s·xa Bᵀ   (B = 0 adds exactly nothing)
        ctx.save_for_backward(x2, xa, lora_A, lora_B)
        ctx.spec, ctx.bias_dtype, ctx.x_shape = spec, None if bias is None else bias.dtype, x.shape
        return out.view(*x.shape[:-1], out.shape[-1])  # (..., out)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x2, xa, lora_A, lora_B = ctx.saved_tensors
        spec: LoraSpec = ctx.spec
        s, p, dt = spec.scaling, spec.dropout, grad.dtype
        need_x, need_a, need_b, need_bias = ctx.needs_input_grad[:4]
        g2 = as2d(grad)  # (M, out)
        grad_x = grad_a = grad_b = grad_bias = None
        mask = dropout_mask(x2, p, spec.seed) if p > 0 and (need_x or need_a) else None  # (M, in)
        if need_x or need_a:
            # s·(G B)                                                               (M, r)
            gbs = dispatch.mm(g2, (lora_B * s).to(dt))
        if need_x:
            # ∂L/∂x = G W₀ + s·((G B) A) ⊙ mask'                                   (M, in)
            grad_x = spec.base.product_grad(g2)  # G W₀: the frozen GEMM writes the buffer
            if mask is None:
                grad_x.addmm_(gbs, lora_A.to(dt))
            else:
                grad_x.add_(dispatch.mm(gbs, lora_A.to(dt)).mul_(mask))
            grad_x = grad_x.view(ctx.x_shape)
        if need_a:
            # ∂L/∂A = s·(G B)ᵀ drop(x)                                             (r, in)
            xd = x2 if mask is None else mask.mul_(x2)  # the mask's buffer becomes drop(x)
            grad_a = matmul_to(gbs.T, xd, lora_A.dtype)
        if need_b:
            # ∂L/∂B = s·Gᵀ xa                                                      (out, r)
            grad_b = matmul_to(g2.T, xa, lora_B.dtype).mul_(s)
        if need_bias:
            # ∂L/∂b = Σ_rows G                                                     (out,)
            grad_bias = g2.sum(0, dtype=torch.promote_types(dt, torch.float32)).to(ctx.bias_dtype)
        return grad_x, grad_a, grad_b, grad_bias, None


def matmul_to(a: Tensor, b: Tensor, dtype: torch.dtype) -> Tensor:
    """``a @ b`` (2-D, or batched 3-D) rounded once to ``dtype``: float32 adapter grads from half inputs. On
    CUDA, cuBLAS writes its float32 accumulator directly (``torch.mm`` / ``torch.bmm`` with ``out_dtype=``);
    elsewhere the half result is cast."""
    op = torch.mm if a.dim() == 2 else torch.bmm
    if a.dtype != dtype and a.is_cuda and _OUT_DTYPE[op]:
        try:
            return op(a, b, out_dtype=dtype)
        except (TypeError, RuntimeError):  # an older torch, or a dtype pair it does not offer
            _OUT_DTYPE[op] = False
    return (dispatch.mm(a, b) if op is torch.mm else torch.bmm(a, b)).to(dtype)


# aten::mm.dtype / aten::bmm.dtype (torch ≥ 2.8); turned off for good the first time torch refuses one
_OUT_DTYPE = {torch.mm: hasattr(torch.ops.aten.mm, "dtype"), torch.bmm: hasattr(torch.ops.aten.bmm, "dtype")}


def dora_row_norm(base: FrozenBase, lora_A: Tensor, lora_B: Tensor, scaling: float, w0_sqnorm: Tensor,
                  compute_dtype: torch.dtype) -> Tensor:  # fmt: skip
    """``‖W₀ + s·BA‖`` per output row (out,), in ``w0_sqnorm``'s dtype, without forming the (out, in) sum:

        ‖W₀ + sBA‖²_i = ‖W₀_i‖² + 2s·Σ_j B_ij (A W₀ᵀ)_ji + s²·(B (A Aᵀ) Bᵀ)_ii

    ``A W₀ᵀ`` (r, out) is the base op on A's r rows (NF4: the fused kernel reads only packed bytes). A half
    ``compute_dtype`` would round A to 8/11 bits; A is split into ``hi + lo`` halves (2r rows, one product)
    and, for a dense base on CUDA, cuBLAS returns the float32 accumulator, so the cross term keeps float32
    accuracy (elsewhere the product is rounded to the half dtype once). The sum is clamped at 0
    (cancellation when W₀ ≈ −sBA).
    """
    acc = w0_sqnorm.dtype
    r = lora_A.shape[0]
    a = lora_A.to(acc)  # (r, in)
    b = lora_B.to(acc)  # (out, r)
    if compute_dtype == lora_A.dtype:
        aw = base.forward(lora_A, None).to(acc)  # (r, out)
    else:
        hi = lora_A.to(compute_dtype)
        lo = (lora_A - hi.to(lora_A.dtype)).to(compute_dtype)
        hilo = torch.cat([hi, lo])  # (2r, in)
        if isinstance(base, DenseBase):
            both = matmul_to(hilo, base.dense_weight().T, acc)  # (2r, out)
        else:
            both = base.forward(hilo, None).to(acc)
        aw = both[:r] + both[r:]
    cross = (b * aw.T).sum(1)  # (out,)
    quad = ((b @ (a @ a.T)) * b).sum(1)  # (out,)
    return (w0_sqnorm + 2 * scaling * cross + scaling**2 * quad).clamp_min(0).sqrt()


def _scale_cols(t: Tensor, g: Tensor) -> Tensor:  # t ⊙ g over the last dim, computed in g's precision
    return torch.mul(t, g, out=torch.empty_like(t))


class DoRALinearFunction(torch.autograd.Function):
    """DoRA as PEFT computes it (module docstring), with the row norm detached. Saves x, xa (M, r), g and
    ‖V‖ (out,), and y (no dropout; the output itself) or w = drop(x) W₀ᵀ + s·xa Bᵀ (with dropout)."""

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, lora_A: Tensor, lora_B: Tensor, magnitude: Tensor, bias: Tensor | None,
        spec: LoraSpec,
    ) -> Tensor:  # fmt: skip
        dt, s, p = x.dtype, spec.scaling, spec.dropout
        assert spec.w0_sqnorm is not None  # set by fused_dora_linear
        norm = dora_row_norm(spec.base, lora_A, lora_B, s, spec.w0_sqnorm, dt).to(magnitude.dtype)  # (out,)
        g = magnitude / norm  # (out,)
        x2 = as2d(x)  # (M, in)
        bs = (lora_B * s).to(dt)  # (out, r)
        b = None if bias is None else bias.to(dt)
        if p == 0:
            xa = x2 @ lora_A.to(dt).T  # (M, r)
            out = xa @ bs.T  # (M, out)
            spec.base.matmul_acc(out, x2)  # z = x W₀ᵀ + s·xa Bᵀ
            out.mul_(g)  # g ⊙ z  (one rounding: computed in g's precision)
            if b is not None:
                out.add_(b)
            y = out.view(*x.shape[:-1], out.shape[-1])  # (..., out)
            ctx.save_for_backward(x2, xa, lora_A, lora_B, magnitude, bias, g, norm, y)
        else:
            xd = x2 * dropout_mask(x2, p, spec.seed)  # (M, in), transient
            xa = xd @ lora_A.to(dt).T  # (M, r)
            w = xa @ bs.T  # (M, out)
            spec.base.matmul_acc(w, xd)  # w = drop(x) W₀ᵀ + s·xa Bᵀ
            xr = torch.sub(x2, xd, out=xd)  # x − drop(x), in drop(x)'s buffer
            out = _scale_cols(w, g)  # g ⊙ w
            if b is not None:
                out.add_(b)
            spec.base.matmul_acc(out, xr)  # + (x − drop(x)) W₀ᵀ
            del xd, xr
            y = out.view(*x.shape[:-1], out.shape[-1])
            ctx.save_for_backward(x2, xa, lora_A, lora_B, magnitude, bias, g, norm, w)
        ctx.spec, ctx.bias_dtype, ctx.x_shape = spec, None if bias is None else bias.dtype, x.shape
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x2, xa, lora_A, lora_B, magnitude, bias, g, norm, yw = ctx.saved_tensors
        spec: LoraSpec = ctx.spec
        s, p, dt = spec.scaling, spec.dropout, grad.dtype
        need_x, need_a, need_b, need_m, need_bias = ctx.needs_input_grad[:5]
        g2 = as2d(grad)  # (M, out)
        acc = torch.promote_types(dt, torch.float32)
        grad_x = grad_a = grad_b = grad_m = grad_bias = None
        mask = dropout_mask(x2, p, spec.seed) if p > 0 and (need_x or need_a) else None  # (M, in)
        col_g = g2.sum(0, dtype=acc) if (need_bias or need_m) else None  # Σ_rows G  (out,)
        if need_x or need_a:
            # s·G (g ⊙ B)                                                          (M, r)
            gbg = g2 @ (lora_B * (s * g)[:, None]).to(dt)
        if need_x:
            grad_x = gbg @ lora_A.to(dt)  # s·(G (g⊙B)) A                           (M, in)
            if mask is None:
                # ∂L/∂x = (G ⊙ g) W₀ + s·(G (g⊙B)) A
                spec.base.matmul_grad_acc(grad_x, _scale_cols(g2, g))
            else:
                # ∂L/∂x = G W₀ + mask' ⊙ ((G ⊙ (g − 1)) W₀ + s·(G (g⊙B)) A)
                spec.base.matmul_grad_acc(grad_x, _scale_cols(g2, g - 1))
                grad_x.mul_(mask)
                spec.base.matmul_grad_acc(grad_x, g2)
            grad_x = grad_x.view(ctx.x_shape)
        if need_a:
            # ∂L/∂A = s·(G (g⊙B))ᵀ drop(x)                                          (r, in)
            xd = x2 if mask is None else mask.mul_(x2)
            grad_a = matmul_to(gbg.T, xd, lora_A.dtype)
        if need_b:
            # ∂L/∂B = s·g ⊙ (Gᵀ xa)                                                 (out, r)
            grad_b = matmul_to(g2.T, xa, lora_B.dtype).mul_((s * g)[:, None].to(lora_B.dtype))
        if need_m:
            # ∂L/∂m = Σ_rows (G ⊙ z) / ‖V‖                                          (out,)
            grad_m = _dora_grad_magnitude(spec, g2, yw, col_g, magnitude, norm, bias, x2, xa, lora_B)
            grad_m = grad_m.to(magnitude.dtype)
        if need_bias:
            # ∂L/∂b = Σ_rows G                                                      (out,)
            grad_bias = col_g.to(ctx.bias_dtype)
        return grad_x, grad_a, grad_b, grad_m, grad_bias, None


def _dora_grad_magnitude(
    spec: LoraSpec, g2: Tensor, yw: Tensor, col_g: Tensor, magnitude: Tensor, norm: Tensor,
    bias: Tensor | None, x2: Tensor, xa: Tensor, lora_B: Tensor,
) -> Tensor:  # fmt: skip
    """∂L/∂m = Σ_rows (G ⊙ z) / ‖V‖ (out,), z the un-rescaled output (module docstring)."""
    acc = col_g.dtype
    # Σ_rows G ⊙ y   (with dropout: Σ_rows G ⊙ w, and w is z itself)
    gy = (g2 * as2d(yw)).sum(0, dtype=acc)
    if spec.dropout > 0:
        return gy / norm.to(acc)
    # z = (y − b) / g   ⇒   Σ_rows G ⊙ z / ‖V‖ = (Σ_rows G ⊙ y − b ⊙ Σ_rows G) / m
    if bias is not None:
        gy = gy - bias.to(acc) * col_g
    m = magnitude.to(acc)
    zero = m == 0
    grad = gy / torch.where(zero, 1, m)
    if bool(zero.any()):  # one host sync, after this backward's kernels are queued
        # where m = 0, y = b holds no trace of z: recompute z (a full product, in this rare case only)
        z = xa @ (lora_B * spec.scaling).to(xa.dtype).T  # (M, out)
        spec.base.matmul_acc(z, x2)
        grad = torch.where(zero, (g2 * z).sum(0, dtype=acc) / norm.to(acc), grad)
    return grad


# ---- functional entry points ------------------------------------------------------------------------


def _check(x: Tensor, lora_A: Tensor, lora_B: Tensor, bias: Tensor | None, scaling: float,
           dropout: float) -> None:  # fmt: skip
    if lora_A.ndim != 2 or lora_B.ndim != 2 or lora_B.shape[1] != lora_A.shape[0]:
        raise ValueError(f"lora_A must be (r, in) and lora_B (out, r); got {tuple(lora_A.shape)}, "
                         f"{tuple(lora_B.shape)}")  # fmt: skip
    if x.ndim < 1 or x.shape[-1] != lora_A.shape[1]:
        raise ValueError(f"x must be (..., {lora_A.shape[1]}), got {tuple(x.shape)}")
    if bias is not None and tuple(bias.shape) != (lora_B.shape[0],):
        raise ValueError(f"bias must have shape ({lora_B.shape[0]},), got {tuple(bias.shape)}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    if not scaling == scaling:  # NaN
        raise ValueError("scaling must be a number, got NaN")


def fused_lora_linear(
    x: Tensor,  # (..., in)
    base: FrozenBase,
    lora_A: Tensor,  # (r, in)
    lora_B: Tensor,  # (out, r)
    bias: Tensor | None = None,  # (out,)
    *,
    scaling: float,
    dropout: float = 0.0,
    seed: int | None = None,
) -> Tensor:  # (..., out)
    """``y = base(x) + b + s·(drop(x) Aᵀ) Bᵀ`` through `LoRALinearFunction` (LoRA, Hu et al. 2021, eq. 3).

    Args:
        x: input, the compute dtype (adapters are cast to it for the products; grads come back in theirs).
        base: the frozen weight, a ``lora_core.lora.bases`` base (`DenseBase(W)` or `NF4Base(q)`).
        lora_A, lora_B, bias: adapter factors and the (frozen or trainable) bias.
        scaling: ``s``. dropout: ``p`` (0: none). seed: the mask's seed; drawn from the CPU RNG if None.
    """
    _check(x, lora_A, lora_B, bias, scaling, dropout)
    seed = _draw_seed() if seed is None and dropout > 0 else (seed or 0)
    return LoRALinearFunction.apply(x, lora_A, lora_B, bias, LoraSpec(base, float(scaling), dropout, seed))


def fused_dora_linear(
    x: Tensor,  # (..., in)
    base: FrozenBase,
    lora_A: Tensor,  # (r, in)
    lora_B: Tensor,  # (out, r)
    magnitude: Tensor,  # (out,)
    bias: Tensor | None = None,  # (out,)
    *,
    scaling: float,
    dropout: float = 0.0,
    seed: int | None = None,
    w0_sqnorm: Tensor | None = None,  # (out,)
) -> Tensor:  # (..., out)
    """DoRA (Liu et al. 2024, eq. 5; PEFT's formula with the norm detached, §4.3) via `DoRALinearFunction`.

    Args:
        as `fused_lora_linear`, plus ``magnitude`` m (out,) and ``w0_sqnorm`` = ``‖W₀_i‖²`` (computed from
        ``base`` when None; pass it cached — it is constant while the base is frozen).
    """
    _check(x, lora_A, lora_B, bias, scaling, dropout)
    if tuple(magnitude.shape) != (lora_B.shape[0],):
        raise ValueError(f"magnitude must have shape ({lora_B.shape[0]},), got {tuple(magnitude.shape)}")
    if w0_sqnorm is None:
        w0_sqnorm = base.row_sqnorm()
    seed = _draw_seed() if seed is None and dropout > 0 else (seed or 0)
    spec = LoraSpec(base, float(scaling), dropout, seed, w0_sqnorm.detach())
    return DoRALinearFunction.apply(x, lora_A, lora_B, magnitude, bias, spec)


__all__ = [
    "DoRALinearFunction",
    "LoRALinearFunction",
    "LoraSpec",
    "dora_row_norm",
    "dropout_mask",
    "fused_dora_linear",
    "fused_lora_linear",
]
