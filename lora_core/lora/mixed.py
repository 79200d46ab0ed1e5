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

(when every adapter has as many rows, as in a batch spread evenly, the weight gradients are one batched
GEMM each, ``bmm`` over the adapters, instead of one GEMM per adapter).

The Function takes every adapter's A and B and stacks them itself (one ``stack`` + cast per factor when
the ranks agree: few launches per layer); each adapter's gradients are computed on its own rows, at its own
rank. Saved: x, S (P, R) and the stacks in the compute dtype. DoRA adapters, and
adapters whose dropout is in effect, stay on the reference path (the layer runs them after this Function).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lora_core.lora.base_protocol import FrozenBase
from lora_core.lora.fused import as2d, matmul_to


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


def stack_adapters(factors: Sequence[Tensor], dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``A_0, B_0, A_1, B_1, ...`` (A_a (r_a, in), B_a (out, r_a)) → ``A_stack (n, R, in)``, ``B_stack
    (n, out, R)`` in ``dtype``, zero-padded to ``R = max r_a`` (only adapters of a smaller rank are padded:
    with equal ranks each stack is one ``stack`` and one cast)."""
    a_s, b_s = factors[0::2], factors[1::2]
    r = max(a.shape[0] for a in a_s)
    a_stack = torch.stack([a if a.shape[0] == r else F.pad(a, (0, 0, 0, r - a.shape[0])) for a in a_s])
    b_stack = torch.stack([b if b.shape[1] == r else F.pad(b, (0, r - b.shape[1])) for b in b_s])
    return a_stack.to(dtype), b_stack.to(dtype)


class MixedLoRAFunction(torch.autograd.Function):
    """``y = base(x) + b + s_t · (x[t] A_tᵀ) B_tᵀ`` per row t (module docstring). x (M, in) in the compute
    dtype; the factors ``A_0, B_0, A_1, ...`` in the adapters' dtype (stacked and cast for the kernels;
    each adapter's gradients come back in its dtype, computed from its own rows only)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, bias: Tensor | None, spec: MixedSpec, *factors: Tensor) -> Tensor:
        from lora_core.kernels import lora_mixed_expand, lora_mixed_shrink

        dt = x.dtype
        x2 = as2d(x)  # (M, in)
        a_stack, b_stack = stack_adapters(factors, dt)  # (n, R, in), (n, out, R)
        out = spec.base.product(x2, None if bias is None else bias.to(dt))  # (M, out) = x W₀ᵀ + b
        s = lora_mixed_shrink(x2, a_stack, spec.plan)  # (P, R) float32
        lora_mixed_expand(out, s, b_stack, spec.scale, spec.plan)
        ctx.save_for_backward(x2, s, a_stack, b_stack)
        ctx.spec, ctx.bias_dtype, ctx.x_shape = spec, None if bias is None else bias.dtype, x.shape
        ctx.factor_meta = [(f.dtype, f.shape) for f in factors]
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        from lora_core.kernels import lora_mixed_expand, lora_mixed_shrink

        x2, s, a_stack, b_stack = ctx.saved_tensors
        spec: MixedSpec = ctx.spec
        plan, dt = spec.plan, grad.dtype
        need_x, need_bias = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_f = ctx.needs_input_grad[3:]  # A_0, B_0, A_1, B_1, ...
        need_a, need_b = any(need_f[0::2]), any(need_f[1::2])
        g2 = as2d(grad).contiguous()  # (M, out)
        grad_x = grad_bias = None
        gb = None
        if need_x or need_a:
            # G B_t                                                               (P, R) float32
            gb = lora_mixed_shrink(g2, b_stack.transpose(1, 2), plan)
        if need_x:
            # ∂L/∂x = G W₀ + s_t · (G B_t) A_t                                     (M, in)
            grad_x = spec.base.product_grad(g2)  # G W₀, as the fused Function computes it
            lora_mixed_expand(grad_x, gb, a_stack.transpose(1, 2), spec.scale, plan)
            grad_x = grad_x.view(ctx.x_shape)
        grads: list[Tensor | None] = [None] * len(need_f)
        if need_a or need_b:  # per adapter, on its own rows (one segment of the sorted order)
            xs = x2.index_select(0, plan.order) if need_a else None  # (P, in)
            gs = g2.index_select(0, plan.order) if need_b else None  # (P, out)
            if _uniform(plan, ctx.factor_meta):  # every adapter has as many rows: two batched GEMMs
                _batched_weight_grads(grads, need_f, gb, xs, gs, s, spec, ctx.factor_meta, dt)
            else:
                for slot, first, end in plan.segments:
                    seg, sc = slice(first, end), spec.scales[slot]
                    (a_dtype, a_shape), (b_dtype, _) = ctx.factor_meta[2 * slot : 2 * slot + 2]
                    r = a_shape[0]
                    if need_f[2 * slot]:
                        # ∂L/∂A_a = s_a · (G B_a)ᵀ x                                (r, in)
                        grads[2 * slot] = matmul_to(gb[seg, :r].T.to(dt), xs[seg], a_dtype).mul_(sc)  # type: ignore[index]
                    if need_f[2 * slot + 1]:
                        # ∂L/∂B_a = s_a · Gᵀ S                                      (out, r)
                        grads[2 * slot + 1] = matmul_to(gs[seg].T, s[seg, :r].to(dt), b_dtype).mul_(sc)  # type: ignore[index]
            for i, (need, (f_dtype, f_shape)) in enumerate(zip(need_f, ctx.factor_meta)):
                if need and grads[i] is None:  # an adapter no row uses
                    grads[i] = torch.zeros(f_shape, dtype=f_dtype, device=grad.device)
        if need_bias:
            grad_bias = g2.sum(0, dtype=torch.promote_types(dt, torch.float32)).to(ctx.bias_dtype)
        return grad_x, grad_bias, None, *grads


def _uniform(plan: Any, meta: list[tuple[torch.dtype, torch.Size]]) -> bool:
    """Every slot has rows, all as many, and the A's (the B's) share one dtype: the weight gradients are
    then two batched GEMMs instead of two GEMMs per adapter."""
    lengths = {end - first for _, first, end in plan.segments}
    slots = [slot for slot, _, _ in plan.segments]
    same_dtype = len({m[0] for m in meta[0::2]}) == 1 and len({m[0] for m in meta[1::2]}) == 1
    return len(lengths) == 1 and slots == list(range(len(meta) // 2)) and same_dtype


def _batched_weight_grads(grads: list[Tensor | None], need: tuple[bool, ...], gb: Tensor | None,
                          xs: Tensor | None, gs: Tensor | None, s: Tensor, spec: MixedSpec,
                          meta: list[tuple[torch.dtype, torch.Size]], dt: torch.dtype) -> None:  # fmt: skip
    """``grads[2a] = s_a (G B_a)ᵀ x``, ``grads[2a+1] = s_a Gᵀ S`` for every adapter a at once (bmm over
    the n equal segments), each a view at its adapter's rank; ``need`` says which are wanted."""
    n = len(meta) // 2
    scale = spec.scale.view(n, 1, 1)
    if xs is not None and gb is not None:
        ga = matmul_to(
            gb.to(dt).view(n, -1, gb.shape[1]).transpose(1, 2), xs.view(n, -1, xs.shape[1]), meta[0][0]
        )
        ga.mul_(scale.to(ga.dtype))  # (n, R, in)
        for a in range(n):
            grads[2 * a] = ga[a, : meta[2 * a][1][0]] if need[2 * a] else None
    if gs is not None:
        gw = matmul_to(
            gs.view(n, -1, gs.shape[1]).transpose(1, 2), s.to(dt).view(n, -1, s.shape[1]), meta[1][0]
        )
        gw.mul_(scale.to(gw.dtype))  # (n, out, R)
        for a in range(n):
            grads[2 * a + 1] = gw[a, :, : meta[2 * a][1][0]] if need[2 * a + 1] else None


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
    spec = MixedSpec(base, plan, tuple(float(s) for _, _, s in factors))
    return MixedLoRAFunction.apply(x, bias, spec, *(t for a, b, _ in factors for t in (a, b)))


__all__ = ["MixedLoRAFunction", "MixedSpec", "mixed_lora_linear", "stack_adapters"]
