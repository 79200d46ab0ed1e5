"""A mixed batch on CUDA: every row of the batch through its own LoRA adapter in one autograd Function.

``LoRALinear``'s reference path for ``lc.mixed_adapters`` runs the base once and then each adapter's
update on its own rows (one gather, two GEMMs and an ``index_add`` per adapter). Here the adapters are
stacked, zero-padded to the largest rank R (``lora_core.kernels.lora_mixed``)::

    A_stack (n, R, in),  B_stack (n, out, R),  scale (n,),  slot of row i: index[i]  (-1: "__base__")

and two Triton kernels apply all of them at once, rows sorted by slot (Punica's SGMV: "shrink", then
"expand" added in place into the base output)::

    y      = x W₀ᵀ + b                                   the frozen product, once, as the fused Function
    S[t]   = x[t] A_tᵀ                  (P, R) fp32      shrink   (A_t := A_stack[index of t's row])
    y[t]  += s_t · S[t] B_tᵀ                             expand   (base rows: untouched)

**Backward** (G = ∂L/∂y), the same kernels on transposed stacks, plus one GEMM pair per adapter::

    ∂L/∂x[t]  = G[t] W₀ + s_t · (G[t] B_t) A_t           shrink(G, B_stackᵀ), expand(·, A_stackᵀ) onto G W₀
    ∂L/∂A_a   = s_a · (G B_a)[rows_a]ᵀ x[rows_a]         (R, in)   the weight gradients reduce over the
    ∂L/∂B_a   = s_a · G[rows_a]ᵀ S[rows_a]               (out, R)  rows of one adapter: cuBLAS per adapter
    ∂L/∂b     = Σ_rows G

The stacks are built from the adapters' Parameters by differentiable ops (pad, stack), so autograd hands
each adapter its slice of the stacked gradient. Saved: x, S (P, R) and the stacks. DoRA adapters, and
adapters whose dropout is in effect, stay on the reference path (the layer runs them after this Function).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lora_core.lora.bases import FrozenBase
from lora_core.lora.fused import _as2d, _mm_to


@dataclass(frozen=True)
class MixedSpec:
    """What `MixedLoRAFunction` needs besides its tensors.

    Args:
        base: the frozen product (cast to the compute dtype). plan: the kernels' ``MixedPlan`` for x's rows.
        scales: each slot's ``s`` (host floats: the weight gradients scale by them without a device sync).
    """

    base: FrozenBase
    plan: Any  # lora_core.kernels.lora_mixed.MixedPlan (Triton is imported only when this path runs)
    scales: tuple[float, ...]

    @property
    def scale(self) -> Tensor:  # (n_adapters,) float32 on the plan's device, for the expand kernel
        return _scale_tensor(self.scales, self.plan.order.device)


@functools.lru_cache(maxsize=64)  # a fresh host→device copy per layer call would stall the CPU on it
def _scale_tensor(scales: tuple[float, ...], device: torch.device) -> Tensor:
    return torch.tensor(scales, dtype=torch.float32, device=device)


def stack_adapters(factors: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """``[(A_a (r_a, in), B_a (out, r_a))]`` → ``A_stack (n, R, in)``, ``B_stack (n, out, R)``, zero-padded
    to ``R = max r_a``; differentiable (each adapter gets its slice of the stacked gradient)."""
    r = max(a.shape[0] for a, _ in factors)
    a_stack = torch.stack([F.pad(a, (0, 0, 0, r - a.shape[0])) for a, _ in factors])
    b_stack = torch.stack([F.pad(b, (0, r - b.shape[1])) for _, b in factors])
    return a_stack, b_stack


class MixedLoRAFunction(torch.autograd.Function):
    """``y = base(x) + b + s_t · (x[t] A_tᵀ) B_tᵀ`` per row t (module docstring). x (M, in) in the compute
    dtype; the stacks in the adapters' dtype (cast for the kernels, gradients come back in theirs)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, a_stack: Tensor, b_stack: Tensor, bias: Tensor | None,
                spec: MixedSpec) -> Tensor:  # fmt: skip
        from lora_core.kernels import lora_mixed_expand, lora_mixed_shrink

        dt = x.dtype
        x2 = _as2d(x)  # (M, in)
        out = spec.base.forward(x2, None if bias is None else bias.to(dt))  # (M, out) = x W₀ᵀ + b
        s = lora_mixed_shrink(x2, a_stack.to(dt), spec.plan)  # (P, R) float32
        lora_mixed_expand(out, s, b_stack.to(dt), spec.scale, spec.plan)
        ctx.save_for_backward(x2, s, a_stack, b_stack)
        ctx.spec, ctx.bias_dtype, ctx.x_shape = spec, None if bias is None else bias.dtype, x.shape
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        from lora_core.kernels import lora_mixed_expand, lora_mixed_shrink

        x2, s, a_stack, b_stack = ctx.saved_tensors
        spec: MixedSpec = ctx.spec
        plan, dt = spec.plan, grad.dtype
        need_x, need_a, need_b, need_bias = ctx.needs_input_grad[:4]
        g2 = _as2d(grad).contiguous()  # (M, out)
        grad_x = grad_a = grad_b = grad_bias = None
        gb = None
        if need_x or need_a:
            # G B_t                                                               (P, R) float32
            gb = lora_mixed_shrink(g2, b_stack.transpose(1, 2).to(dt), plan)
        if need_x:
            # ∂L/∂x = G W₀ + s_t · (G B_t) A_t                                     (M, in)
            grad_x = spec.base.matmul_grad_acc(torch.zeros_like(x2, dtype=dt), g2)
            lora_mixed_expand(grad_x, gb, a_stack.transpose(1, 2).to(dt), spec.scale, plan)
            grad_x = grad_x.view(ctx.x_shape)
        if need_a or need_b:
            rows = plan.order  # sorted positions → rows of x; each adapter's rows are one segment
            xs = x2.index_select(0, rows) if need_a else None  # (P, in)
            gs = g2.index_select(0, rows) if need_b else None  # (P, out)
            grad_a = torch.zeros_like(a_stack) if need_a else None
            grad_b = torch.zeros_like(b_stack) if need_b else None
            scale = spec.scales
            for slot, first, end in plan.segments:
                seg = slice(first, end)
                if grad_a is not None:
                    # ∂L/∂A_a = s_a · (G B_a)ᵀ x                                    (R, in)
                    grad_a[slot] = _mm_to(gb[seg].T.to(dt), xs[seg], a_stack.dtype).mul_(scale[slot])  # type: ignore[index]
                if grad_b is not None:
                    # ∂L/∂B_a = s_a · Gᵀ S                                          (out, R)
                    grad_b[slot] = _mm_to(gs[seg].T, s[seg].to(dt), b_stack.dtype).mul_(scale[slot])  # type: ignore[index]
        if need_bias:
            grad_bias = g2.sum(0, dtype=torch.promote_types(dt, torch.float32)).to(ctx.bias_dtype)
        return grad_x, grad_a, grad_b, grad_bias, None


def mixed_lora_linear(x: Tensor, base: FrozenBase, factors: list[tuple[Tensor, Tensor, float]],
                      index: list[int], bias: Tensor | None = None) -> Tensor:  # fmt: skip
    """``base(x) + b`` plus, on row ``i`` of x (dim 0; all its tokens), adapter ``factors[index[i]]``'s
    update ``s·(x Aᵀ) Bᵀ`` (``index[i] = -1``: none), through the per-row kernels.

    Args:
        x: (rows, ..., in) in the compute dtype, on CUDA (or the CPU under ``TRITON_INTERPRET=1``).
        base: the frozen base, in x's dtype. factors: ``(A (r, in), B (out, r), s)`` per slot.
        index: one slot per row of x, or -1. bias: (out,) or None.
    """
    from lora_core.kernels import mixed_plan

    if x.dim() < 2 or x.shape[0] != len(index):
        raise ValueError(f"index has {len(index)} slots for an input of shape {tuple(x.shape)}")
    plan = mixed_plan(index, x[0].numel() // x.shape[-1] if x.shape[-1] else 1, x.device)
    a_stack, b_stack = stack_adapters([(a, b) for a, b, _ in factors])
    spec = MixedSpec(base, plan, tuple(float(s) for _, _, s in factors))
    return MixedLoRAFunction.apply(x, a_stack, b_stack, bias, spec)


__all__ = ["MixedLoRAFunction", "MixedSpec", "mixed_lora_linear", "stack_adapters"]
