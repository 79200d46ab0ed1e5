"""Dispatch: THE one module that decides, per call, which implementation runs.

Three decisions, each a pure function of the call (its tensors, autocast, `fused_mode`), never of a layer's
class or of state left behind by an earlier call:

1. **A LoRA layer's forward** (`plan_lora`): the fused autograd Function (``lora_core.lora.fused``: one
   Function per layer, saving only ``x`` and ``xa``), or the reference formula (``lora_core.lora.functional``,
   plain PyTorch ops). CUDA inputs take the fused path, everything else the reference; under autocast
   the fused Function computes in autocast's dtype, as the reference's ops would.

       reference   CPU / other devices; a merged layer; a base weight that trains; fused_mode("never")
       fused       CUDA (or fused_mode("always"): how the tests check the fused math on CPU)

   A **mixed batch** (``lc.mixed_adapters``, `plan_mixed`): where `plan_lora` says fused and the compute
   dtype is fp16/bf16/fp32, the per-row Triton kernels (``lora_core.lora.mixed``) apply every LoRA
   adapter of the batch in one pass; on a CPU only under ``TRITON_INTERPRET=1`` with ``fused_mode("always")``
   (the tests). The layer keeps DoRA adapters, dropout in effect and ranks above ``MIXED_MAX_R`` on the
   reference.

2. **An NF4 product** ``x · dequant(q)ᵀ`` and its input gradient (`nf4_path`):

       reference   not CUDA: ``lora_core.quant.nf4``'s references (dequantize, then matmul)
       kernel      CUDA, M ≤ ``FUSED_MAX_M`` rows: the fused Triton kernel reads only packed bytes
       dequantize  CUDA, more rows: dequantize once (one streaming pass), then cuBLAS (tensor-core bound)

   The cross-over ``FUSED_MAX_M`` belongs to the kernels (``lora_core.kernels.FUSED_MAX_M``, read off
   ``lora-core bench``'s M sweep); this module only reads it.

Triton is imported lazily: only a CUDA call reaches ``lora_core.kernels``' launchers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lora_core.kernels import FUSED_MAX_M, MIXED_MAX_R, interpreter_active  # these load no Triton
from lora_core.quant.nf4 import NF4Tensor, nf4_matmul_grad_ref, nf4_matmul_ref

# ---- the LoRA layer: fused Function or reference -----------------------------------------------------

_MODES = ("auto", "always", "never")
_mode = "auto"


@contextlib.contextmanager
def fused_mode(mode: str) -> Iterator[None]:
    """Choose the path of ``LoRALinear.forward`` inside the block: ``"auto"`` (fused on CUDA, reference
    elsewhere), ``"always"`` (fused on any device: how the tests check it on CPU) or ``"never"``."""
    global _mode
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {list(_MODES)}, got {mode!r}")
    previous, _mode = _mode, mode
    try:
        yield
    finally:
        _mode = previous


@dataclass(frozen=True)
class LoraPlan:
    """How one ``LoRALinear`` call runs.

    Args:
        path: ``"fused"`` or ``"reference"``.
        dtype: the dtype the fused Function computes in (``x``'s, or autocast's); None for the reference,
            whose ops follow autocast's rules themselves.
        reason: why, in words (tests and debugging read it).
    """

    path: str
    dtype: torch.dtype | None
    reason: str


def plan_lora(layer: Any, x: Tensor) -> LoraPlan:
    """The plan for ``layer(x)`` (``layer``: a ``LoRALinear``; its ``base`` is a frozen base)."""

    def reference(reason: str) -> LoraPlan:
        return LoraPlan("reference", None, reason)

    if _mode == "never":
        return reference('fused_mode("never")')
    if not (x.is_cuda or _mode == "always"):
        return reference(f"{x.device.type} input")
    if layer.merged:
        return reference("merged: the base alone")
    if not x.is_floating_point():
        return reference("integer input")
    if layer.base.requires_grad and torch.is_grad_enabled():
        return reference("the base weight trains: the Function treats W₀ as a constant")
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return LoraPlan("fused", torch.get_autocast_dtype(device_type), "autocast")
    base_dtype = layer.base.dtype
    if base_dtype is not None and base_dtype != x.dtype:
        return reference("x and W₀ differ in dtype: the reference raises its usual error")
    return LoraPlan("fused", x.dtype, "fused")


MIXED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # what the per-row kernels compute in


def plan_mixed(layer: Any, x: Tensor) -> LoraPlan:
    """The plan for a mixed batch through ``layer``: ``"kernel"`` (the per-row Triton kernels, in the
    plan's dtype) or ``"reference"`` (module docstring)."""
    plan = plan_lora(layer, x)
    if plan.path != "fused":
        return plan
    if plan.dtype not in MIXED_DTYPES:
        return LoraPlan("reference", None, f"the per-row kernels compute in fp16/bf16/fp32, not {plan.dtype}")
    if not x.is_cuda and not interpreter_active():
        return LoraPlan("reference", None, "the per-row kernels need CUDA (or TRITON_INTERPRET=1)")
    return LoraPlan("kernel", plan.dtype, "per-row kernels")


# ---- the NF4 product: Triton kernel, dequantize + cuBLAS, or reference ---------------------------------


def nf4_path(rows: int, device: torch.device) -> str:
    """``"reference"``, ``"kernel"`` or ``"dequantize"`` for a product with ``rows`` rows of x on
    ``device`` (module docstring)."""
    if device.type != "cuda":
        return "reference"
    return "kernel" if rows <= FUSED_MAX_M else "dequantize"


def _rows(t: Tensor) -> int:
    return t.numel() // t.shape[-1] if t.dim() and t.shape[-1] else 0


def nf4_matmul(x: Tensor, q: NF4Tensor, bias: Tensor | None = None) -> Tensor:
    """``x · dequant(q)ᵀ (+ bias)``: x (..., in) → (..., out), in x's dtype."""
    path = nf4_path(_rows(x), x.device)
    if path == "reference":
        return nf4_matmul_ref(x, q, bias)
    from lora_core.kernels import nf4_matmul as kernel  # the launcher applies the same cross-over

    return kernel(x, q, bias)


def nf4_matmul_grad(grad_out: Tensor, q: NF4Tensor) -> Tensor:
    """``grad_out · dequant(q)``: (..., out) → (..., in), the input gradient of `nf4_matmul`."""
    if nf4_path(_rows(grad_out), grad_out.device) == "reference":
        return nf4_matmul_grad_ref(grad_out, q)
    from lora_core.kernels import nf4_matmul_grad as kernel

    return kernel(grad_out, q)


def nf4_matmul_acc(out: Tensor, x: Tensor, q: NF4Tensor) -> Tensor:
    """``out += x · dequant(q)ᵀ`` in place (x 2-D): for many rows the add rides in cuBLAS' epilogue."""
    if nf4_path(x.shape[0], x.device) == "dequantize":
        from lora_core.kernels import nf4_dequantize

        return out.addmm_(x, nf4_dequantize(q, x.dtype).T)  # a transient W in x's dtype
    return out.add_(nf4_matmul(x, q))


def nf4_matmul_grad_acc(out: Tensor, g: Tensor, q: NF4Tensor) -> Tensor:
    """``out += g · dequant(q)`` in place (g 2-D)."""
    if nf4_path(g.shape[0], g.device) == "dequantize":
        from lora_core.kernels import nf4_dequantize

        return out.addmm_(g, nf4_dequantize(q, g.dtype))
    return out.add_(nf4_matmul_grad(g, q))


__all__ = [
    "MIXED_MAX_R",  # read by the layer: adapters of a higher rank take the reference
    "LoraPlan",
    "fused_mode",
    "nf4_matmul",
    "nf4_matmul_acc",
    "nf4_matmul_grad",
    "nf4_matmul_grad_acc",
    "nf4_path",
    "plan_lora",
    "plan_mixed",
]
