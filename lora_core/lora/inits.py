"""Adapter inits beyond the default: OLoRA, PiSSA with a randomized SVD, LoftQ (PEFT's ``init_lora_weights``).

Both start from the frozen weight ``W`` (out, in), pick ``B`` (out, r) and ``A`` (r, in), and replace ``W``
by the residual ``W − s·BA`` (``s`` = the layer's scale), so the layer's outputs are unchanged at step 0
while the adapter starts on a subspace of ``W`` that matters:

    olora            W = QR (QR decomposition)     B = Q[:, :r]             A = R[:r]
                     (Büyükakyüz 2024, "OLoRA: Orthonormal Low-Rank Adaptation")
    pissa_niter_N    W ≈ U S Vᵀ (randomized SVD:   B = U_r √(S_r/s)         A = √(S_r/s) V_rᵀ
                     torch.svd_lowrank, N subspace iterations; Meng et al. 2024, "PiSSA", §3.3)

LoftQ (Li et al. 2023, "LoftQ: LoRA-Fine-Tuning-Aware Quantization", Alg. 1) is for a 4-bit base: instead
of keeping ``W`` and quantizing it (so the model at step 0 is ``NF4(W)``, not ``W``), it alternates

    Q_t = NF4(W − s·B_{t−1}A_{t−1})         (B_0 A_0 = 0)
    s·B_t A_t = best rank-r approximation of W − dequant(Q_t)        (SVD, factors split as in PiSSA)

for ``N`` iterations (``init="loftq"``: 1; ``"loftq_iter_<N>"``), so that ``dequant(Q) + s·BA`` ≈ ``W``
better than ``dequant(NF4(W))`` alone. The base becomes ``Q`` exactly (an NF4 base: its block size and
double quantization) or ``dequant(Q)`` (a dense base: block 64, no double quantization, as PEFT). PEFT's
LoftQ puts ``BA`` (no scale) on ``W − dequant(Q)``; ours puts ``s·BA`` there, which is the same when
``s = 1`` and still an approximation of ``W`` when it is not.

``"pissa"`` (the exact SVD) lives in ``slots.HoldsAdapters.reset_lora_parameters`` (every layer has it);
``pissa_niter_N`` is the same formula with Halko et al.'s randomized SVD, which costs O(out·in·r) instead of
O(out·in·min(out, in)): it draws a random (in, r) test matrix from torch's global RNG, so seed it to
reproduce an init. The formulas
are PEFT's (``LoraLayer.olora_init`` / ``pissa_init``), computed in float32 or wider.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from lora_core.quant.nf4 import NF4Tensor, dequantize_nf4, quantize_nf4

PISSA_NITER = re.compile(r"pissa_niter_(\d+)")
LOFTQ = re.compile(r"loftq(?:_iter_(\d+))?")


def olora_factors(w: Tensor, r: int) -> tuple[Tensor, Tensor]:  # (r, in), (out, r)
    """OLoRA's ``(A, B) = (R[:r], Q[:, :r])`` from ``W = QR``; ``BA`` is W's projection on Q's first r
    columns, so ``W − s·BA`` keeps the rest of W when ``s = 1``."""
    q, rr = torch.linalg.qr(w)  # (out, k), (k, in)
    return rr[:r].contiguous(), q[:, :r].contiguous()


def pissa_niter_factors(w: Tensor, r: int, scaling: float, niter: int) -> tuple[Tensor, Tensor]:
    """PiSSA's factors from ``torch.svd_lowrank(W, q=r, niter)``: ``s·BA`` ≈ the best rank-r approximation."""
    u, s_vals, v = torch.svd_lowrank(w, q=r, niter=niter)  # (out, r), (r,), (in, r)
    root = torch.sqrt(s_vals / scaling)  # (r,)
    return root[:, None] * v.T, u * root[None, :]  # A (r, in), B (out, r)


def loftq_factors(
    w: Tensor, r: int, scaling: float, num_iter: int, block_size: int = 64, double_quant: bool = False
) -> tuple[Tensor, Tensor, NF4Tensor]:  # A (r, in), B (out, r), Q
    """LoftQ's alternation (module docstring): ``(A, B, Q)`` with ``dequant(Q) + s·BA`` ≈ ``W``."""
    if isinstance(num_iter, bool) or not isinstance(num_iter, int) or num_iter < 1:
        raise ValueError(f"loftq: the number of iterations must be an int ≥ 1, got {num_iter!r}")
    res = w
    for i in range(num_iter):
        q = quantize_nf4(res, block_size, double_quant)
        u, s_vals, vh = torch.linalg.svd(w - dequantize_nf4(q, w.dtype), full_matrices=False)
        root = torch.sqrt(s_vals[:r] / scaling)  # (r,)
        a, b = root[:, None] * vh[:r], u[:, :r] * root[None, :]
        if i + 1 < num_iter:
            res = w - scaling * (b @ a)
    return a, b, q


def is_extra_init(init: Any) -> bool:
    """Whether ``init`` is one of this module's names (``"olora"``, ``"pissa_niter_<N>"``, ``"loftq"``,
    ``"loftq_iter_<N>"``)."""
    return isinstance(init, str) and (
        init == "olora" or PISSA_NITER.fullmatch(init) is not None or LOFTQ.fullmatch(init) is not None
    )


@torch.no_grad()
def apply_extra_init(layer: Any, init: str, a_out: Any, b_out: Any, r: int, scaling: float) -> None:
    """Initialise one adapter of ``layer`` (a ``LoRALinear``: its ``base``), writing its A into ``a_out``
    (r, in) and B into ``b_out`` (out, r), with ``init``, and store the residual in the base (an NF4 base
    requantizes it, and records the error).

    Raises:
        ValueError: ``init`` is not one of this module's names.
    """
    if not is_extra_init(init):
        raise ValueError(
            "init must be one of ['default', 'gaussian', 'pissa', 'olora', 'pissa_niter_<N>', 'loftq', "
            f"'loftq_iter_<N>'], got {init!r}"
        )
    # QLoRALinear.from_linear leaves the dense weight it quantized here for LoftQ (which must start from W,
    # not from NF4(W)); every other init starts from the base as it is.
    w = layer.__dict__.pop("_loftq_source", None)
    w = layer.base.dense_weight() if w is None else w
    w = w.to(torch.promote_types(w.dtype, torch.float32))  # (out, in)
    if LOFTQ.fullmatch(init):
        iters = int(LOFTQ.fullmatch(init).group(1) or 1)  # type: ignore[union-attr]
        old = getattr(layer.base, "q", None)  # an NF4 base keeps its settings and takes Q exactly
        settings = (old.block_size, old.double_quant) if isinstance(old, NF4Tensor) else (64, False)
        a, b, q = loftq_factors(w, r, scaling, iters, *settings)
        a_out.copy_(a)
        b_out.copy_(b)
        if isinstance(old, NF4Tensor):
            layer.base.q = q if q.dtype == old.dtype else replace(q, dtype=old.dtype)
            layer.base.requantization_error = float((dequantize_nf4(q, w.dtype) - w).abs().max())
        else:
            layer.base.set_dense_weight(dequantize_nf4(q, w.dtype))
        return
    if init == "olora":
        a, b = olora_factors(w, r)
    else:
        niter = int(PISSA_NITER.fullmatch(init).group(1))  # type: ignore[union-attr]
        a, b = pissa_niter_factors(w, r, scaling, niter)
    a_out.copy_(a)
    b_out.copy_(b)
    layer.base.set_dense_weight(w - scaling * (b @ a))


__all__ = ["apply_extra_init", "is_extra_init", "loftq_factors", "olora_factors", "pissa_niter_factors"]
