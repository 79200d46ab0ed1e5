"""Dispatch: THE one module that decides, per call, which implementation runs.

Three decisions, each a pure function of the call (its tensors, autocast, `fused_mode`), never of a layer's
class or of state left behind by an earlier call:

1. **A LoRA layer's forward** (`plan_lora`): the fused autograd Function (``lora_core.lora.fused``: one
   Function per layer, saving only ``x`` and ``xa``), or the reference formula (``lora_core.lora.functional``,
   plain PyTorch ops). CUDA inputs take the fused path; on other devices a LoRA (not DoRA) adapter takes
   it when a gradient is wanted (training: the Function skips an autograd graph of ~8 nodes and two
   (M, out) passes per layer, ~15% of a CPU LoRA layer's step), the reference otherwise (no_grad,
   inference_mode, DoRA). Under autocast the fused Function computes in autocast's dtype, as the
   reference's ops would.

       reference   CPU / other devices: without grad, or DoRA; a merged layer; a base weight that
                   trains; fused_mode("never")
       fused       CUDA; CPU / other devices: LoRA with grad enabled; fused_mode("always")

   A **mixed batch** (``lc.mixed_adapters``, `plan_mixed`): where `plan_lora` says fused and the compute
   dtype is fp16/bf16/fp32, the per-row Triton kernels (``lora_core.lora.mixed``) apply every LoRA
   adapter of the batch in one pass; on a CPU only under ``TRITON_INTERPRET=1`` with ``fused_mode("always")``
   (the tests). The layer keeps DoRA adapters, dropout in effect and ranks above ``MIXED_MAX_R`` on the
   reference.

2. **An NF4 product** ``x · dequant(q)ᵀ`` and its input gradient (`nf4_path`):

       lookup      not CUDA: ``quant.nf4_lookup``'s dequantize (bit-identical to the reference's weight:
                   on an AVX-512 / AVX2 CPU with a C compiler ``quant.nf4_native``'s one pass, else a
                   byte-pair table gather in ~3 passes instead of ~7), then torch's matmul
       kernel      CUDA, M ≤ ``FUSED_MAX_M`` rows: the fused Triton kernel reads only packed bytes
       dequantize  CUDA, more rows: dequantize once (one streaming pass), then cuBLAS (tensor-core bound)

   The lookup path computes exactly what ``quant.nf4``'s references compute (the same dense weight, the
   same matmul), so on a CPU its results equal theirs bit for bit.

   The cross-over ``FUSED_MAX_M`` belongs to the kernels (``lora_core.kernels.FUSED_MAX_M``, read off
   ``lora-core bench``'s M sweep); this module only reads it.

3. **The fused path's dense GEMMs** (`linear`, `mm`): oneDNN for float32 on a CPU (faster than the MKL
   sgemm torch calls there, equal within float32 tolerance), ``F.linear`` / ``@`` elsewhere.

Triton is imported lazily: only a CUDA call reaches ``lora_core.kernels``' launchers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lora_core.kernels import FUSED_MAX_M, MIXED_MAX_R, interpreter_active  # these load no Triton
from lora_core.quant.nf4 import NF4Tensor
from lora_core.quant.nf4_lookup import nf4_dequantize_lookup

# ---- the LoRA layer: fused Function or reference -----------------------------------------------------

_MODES = ("auto", "always", "never")
_mode = "auto"


@contextlib.contextmanager
def fused_mode(mode: str) -> Iterator[None]:
    """Choose the path of ``LoRALinear.forward`` inside the block: ``"auto"`` (fused on CUDA, and
    elsewhere when grad is enabled; else the reference), ``"always"`` (fused on any device, also without
    grad) or ``"never"`` (the reference everywhere: how the tests compare the two on CPU)."""
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
        if not torch.is_grad_enabled():
            return reference(f"{x.device.type} input without grad")
        if any(spec.use_dora for name, spec in layer.lora_specs.items() if name in layer.active_adapters):
            return reference(f"DoRA on a {x.device.type} input")  # measured for LoRA only; DoRA stays exact
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
    if not x.is_cuda and not (interpreter_active() and _mode == "always"):  # a CPU's fused LoRA is not Triton
        return LoraPlan("reference", None, "the per-row kernels need CUDA (or the interpreter and 'always')")
    return LoraPlan("kernel", plan.dtype, "per-row kernels")


# ---- the NF4 product: Triton kernel, dequantize + cuBLAS, or reference ---------------------------------


def nf4_path(rows: int, device: torch.device) -> str:
    """``"lookup"``, ``"kernel"`` or ``"dequantize"`` for a product with ``rows`` rows of x on ``device``
    (module docstring)."""
    if device.type != "cuda":
        return "lookup"
    return "kernel" if rows <= FUSED_MAX_M else "dequantize"


def _rows(t: Tensor) -> int:
    return t.numel() // t.shape[-1] if t.dim() and t.shape[-1] else 0


def _dense(q: NF4Tensor, dtype: torch.dtype, path: str) -> Tensor:  # (out, in): a transient W, never kept
    if path == "lookup":
        return nf4_dequantize_lookup(q, dtype)
    from lora_core.kernels import nf4_dequantize

    return nf4_dequantize(q, dtype)


def nf4_matmul(x: Tensor, q: NF4Tensor, bias: Tensor | None = None) -> Tensor:
    """``x · dequant(q)ᵀ (+ bias)``: x (..., in) → (..., out), in x's dtype."""
    if nf4_path(_rows(x), x.device) == "lookup":
        return F.linear(x, nf4_dequantize_lookup(q, x.dtype), bias)  # = nf4_matmul_ref, bit for bit
    from lora_core.kernels import nf4_matmul as kernel  # the launcher applies the same cross-over

    return kernel(x, q, bias)


def nf4_matmul_grad(grad_out: Tensor, q: NF4Tensor) -> Tensor:
    """``grad_out · dequant(q)``: (..., out) → (..., in), the input gradient of `nf4_matmul`."""
    if nf4_path(_rows(grad_out), grad_out.device) == "lookup":
        return grad_out @ nf4_dequantize_lookup(q, grad_out.dtype)  # = nf4_matmul_grad_ref, bit for bit
    from lora_core.kernels import nf4_matmul_grad as kernel

    return kernel(grad_out, q)


def nf4_matmul_acc(out: Tensor, x: Tensor, q: NF4Tensor) -> Tensor:
    """``out += x · dequant(q)ᵀ`` in place (x 2-D): for many rows the add rides in the GEMM's epilogue."""
    path = nf4_path(x.shape[0], x.device)
    if path == "kernel":
        return out.add_(nf4_matmul(x, q))
    return out.addmm_(x, _dense(q, x.dtype, path).T)


def nf4_matmul_grad_acc(out: Tensor, g: Tensor, q: NF4Tensor) -> Tensor:
    """``out += g · dequant(q)`` in place (g 2-D)."""
    path = nf4_path(g.shape[0], g.device)
    if path == "kernel":
        return out.add_(nf4_matmul_grad(g, q))
    return out.addmm_(g, _dense(q, g.dtype, path))


# ---- 3. the fused path's dense GEMMs: oneDNN for float32 on a CPU ------------------------------------------


def _onednn_linear() -> Any:
    """oneDNN's matmul as Inductor calls it (``mkldnn::_linear_pointwise``), or None without it."""
    try:
        return torch.ops.mkldnn._linear_pointwise if torch.backends.mkldnn.is_available() else None
    except (AttributeError, RuntimeError):
        return None


_ONEDNN_LINEAR = _onednn_linear()


def linear(x: Tensor, w: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x wᵀ + bias`` (F.linear's value) for 2-D ``x`` (M, in) and ``w`` (out, in), any strides: the dense
    GEMMs of the fused LoRA Function and of the chunked loss.

    float32 CPU tensors go through oneDNN's matmul, which measured 1.0–1.5× the speed of MKL's sgemm (what
    ``F.linear`` calls; ≈ 1.1× in the quietest runs) with 2 threads on the shared AMD EPYC this project runs
    on, for SmolLM2's shapes; everything else through ``F.linear``. The two sum in different orders: equal
    within float32 tolerance, not bit for bit (tests/test_cpu_gemm.py). The reference path keeps ``F.linear``.
    """
    if (
        _onednn_ok(x, w)
        and x.is_contiguous()  # oneDNN's wrapper copies a strided x (a strided w it reads in place)
        and (bias is None or bias.dtype == torch.float32)
    ):  # fmt: skip
        return _ONEDNN_LINEAR(x, w, bias, "none", [], "")  # (M, out)
    return F.linear(x, w, bias)


def _onednn_ok(x: Tensor, w: Tensor) -> bool:  # x (M, K), w (N, K): float32 CPU matrices, none empty
    return (
        _ONEDNN_LINEAR is not None and x.device.type == "cpu" and x.dtype == w.dtype == torch.float32
        and x.dim() == 2 and w.dim() == 2 and x.numel() > 0 and w.numel() > 0
        and not _broadcast(x) and not _broadcast(w)
    )  # fmt: skip


def _broadcast(t: Tensor) -> bool:
    """A stride of 0 along a dimension longer than 1: an ``expand``ed tensor, e.g. the gradient
    ``y.sum().backward()`` sends. oneDNN reads one as a strided weight ≈ 100× slower than torch's mm
    (a (512, 576) gradient times a (576, 16) adapter: 92 ms against 0.7), so it stays on torch."""
    return any(stride == 0 and size > 1 for size, stride in zip(t.shape, t.stride()))


_SKINNY = 64  # a side this small (the adapter rank) is cheap to copy: r·K floats against r·K·N FLOPs


def mm(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` for 2-D tensors, as `linear` computes it: (M, K) @ (K, N) → (M, N).

    oneDNN takes a strided ``b`` in place but copies a strided ``a``, which torch's mm would not; so a
    strided ``a`` goes to oneDNN only when one side of the product is skinny (≤ 64, an adapter's rank) —
    the weight gradients of a LoRA layer, ``(G·sB)ᵀ x`` (r, in) and ``Gᵀ xa`` (out, r), both with
    K = M tokens (transposed views of row-major activations)::

        M ≤ 64:  linear(a.contiguous(), bᵀ)        copies a: M·K floats
        N ≤ 64:  linear(bᵀ.contiguous(), a)ᵀ        (bᵀ aᵀ)ᵀ, copies b: K·N floats (returns a transposed view)

    Measured on SmolLM2's shapes with one thread (M = 512 tokens, r = 16): ``Gᵀ xa`` for a 576 → 1536
    layer 288 µs against MKL's 675, ``(G·sB)ᵀ x`` for 1536 → 576 282 µs against 379; the others within ±15 %.
    """
    if a.is_contiguous() or not _onednn_ok(a, b.T):
        return linear(a, b.T)
    if a.shape[0] <= _SKINNY:
        return linear(a.contiguous(), b.T)
    if b.shape[1] <= _SKINNY:
        return linear(b.T.contiguous(), a).T
    return linear(a, b.T)


def nf4_linear(x: Tensor, q: NF4Tensor, bias: Tensor | None = None) -> Tensor:
    """The fused path's ``x · dequant(q)ᵀ + bias`` (x 2-D): the lookup dequantize and `linear` off CUDA,
    `nf4_matmul` on CUDA."""
    if nf4_path(x.shape[0], x.device) == "lookup":
        return linear(x, nf4_dequantize_lookup(q, x.dtype), bias)
    return nf4_matmul(x, q, bias)


def nf4_linear_grad(g: Tensor, q: NF4Tensor) -> Tensor:
    """The fused path's ``g · dequant(q)`` (g 2-D), as `nf4_linear` computes its forward."""
    if nf4_path(g.shape[0], g.device) == "lookup":
        return mm(g, nf4_dequantize_lookup(q, g.dtype))
    return nf4_matmul_grad(g, q)


__all__ = [
    "MIXED_MAX_R",  # read by the layer: adapters of a higher rank take the reference
    "LoraPlan",
    "fused_mode",
    "linear",
    "mm",
    "nf4_linear",
    "nf4_linear_grad",
    "nf4_matmul",
    "nf4_matmul_acc",
    "nf4_matmul_grad",
    "nf4_matmul_grad_acc",
    "nf4_path",
    "plan_lora",
    "plan_mixed",
]
