"""Autograd for a frozen NF4 base weight: ``nf4_linear``, differentiable in ``x`` and the bias.

Forward and backward of ``y = x Wᵀ + b`` with ``W = dequant(q)`` frozen (QLoRA, Dettmers et al. 2023):

    forward:   y      = x · dequant(q)ᵀ + b            x (..., in), q (out, in) → y (..., out)
    backward:  ∂L/∂x  = ∂L/∂y · dequant(q)              (..., out) → (..., in)
               ∂L/∂b  = Σ_{leading dims} ∂L/∂y          (out,)
               ∂L/∂W  = none: the base is frozen

Between forward and backward only the packed `NF4Tensor` is kept (≈0.52 byte/param), never a dequantized
copy: backward dequantizes again (inside the kernel on a GPU). Nothing is cached across calls, so a
forward under ``eval()`` or ``torch.no_grad()`` cannot leave stale state that a later training step reads.

Which implementation computes the products (Triton kernel, dequantize + cuBLAS, or the reference) is
``lora_core.dispatch``'s decision (`dispatch.nf4_matmul` / `dispatch.nf4_matmul_grad`).
"""

from __future__ import annotations

from typing import Any

import torch

from lora_core import dispatch
from lora_core.quant.nf4 import NF4Tensor


class NF4LinearFunction(torch.autograd.Function):
    """``x ↦ x · dequant(q)ᵀ + b``; saves the `NF4Tensor` (packed), never ``dequant(q)``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, bias: torch.Tensor | None, q: NF4Tensor) -> torch.Tensor:
        ctx.q = q  # the packed container itself: no copy, no dequantized weight
        ctx.bias_dtype = None if bias is None else bias.dtype
        return dispatch.nf4_matmul(x, q, None if bias is None else bias.to(x.dtype))  # (..., out)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = dispatch.nf4_matmul_grad(grad_out, ctx.q)  # (..., in)
        if ctx.needs_input_grad[1]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0).to(ctx.bias_dtype)  # (out,)
        return grad_x, grad_bias, None


def nf4_linear(x: torch.Tensor, q: NF4Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x · dequant(q)ᵀ + bias`` with the frozen NF4 weight ``q`` (out, in); differentiable in ``x`` and
    ``bias``. Output in ``x``'s dtype.

    Args:
        x: ``(..., in)`` float tensor on ``q``'s device.
        q: the quantized weight, ``q.shape == (out, in)``.
        bias: optional ``(out,)``.
    """
    if not isinstance(q, NF4Tensor):
        raise TypeError(f"q must be an NF4Tensor, got {type(q).__name__}")
    if len(q.shape) != 2:
        raise ValueError(f"q must be a 2-D weight (out, in), got shape {tuple(q.shape)}")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"x must be a floating-point tensor, got {got}")  # an int x would truncate W
    if x.shape[-1:] != q.shape[1:]:
        raise ValueError(f"x has {x.shape[-1] if x.dim() else 0} features, the weight expects {q.shape[1]}")
    if x.device != q.device:
        raise ValueError(f"x is on {x.device} but the NF4 weight is on {q.device}; move the module")
    if bias is not None and bias.shape != q.shape[:1]:
        raise ValueError(f"bias must have shape ({q.shape[0]},), got {tuple(bias.shape)}")
    return NF4LinearFunction.apply(x, bias, q)


__all__ = ["NF4LinearFunction", "nf4_linear"]
