"""Adapter inits beyond the default: OLoRA and PiSSA with a randomized SVD (PEFT's ``init_lora_weights``).

Both start from the frozen weight ``W`` (out, in), pick ``B`` (out, r) and ``A`` (r, in), and replace ``W``
by the residual ``W − s·BA`` (``s`` = the layer's scale), so the layer's outputs are unchanged at step 0
while the adapter starts on a subspace of ``W`` that matters:

    olora            W = QR (QR decomposition)     B = Q[:, :r]             A = R[:r]
                     (Büyükakyüz 2024, "OLoRA: Orthonormal Low-Rank Adaptation")
    pissa_niter_N    W ≈ U S Vᵀ (randomized SVD:   B = U_r √(S_r/s)         A = √(S_r/s) V_rᵀ
                     torch.svd_lowrank, N subspace iterations; Meng et al. 2024, "PiSSA", §3.3)

``"pissa"`` (the exact SVD) lives in ``LoRALinear.reset_lora_parameters``; ``pissa_niter_N`` is the same
formula with Halko et al.'s randomized SVD, which costs O(out·in·r) instead of O(out·in·min(out, in)): it
draws a random (in, r) test matrix from torch's global RNG, so seed it to reproduce an init. The formulas
are PEFT's (``LoraLayer.olora_init`` / ``pissa_init``), computed in float32 or wider.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor

PISSA_NITER = re.compile(r"pissa_niter_(\d+)")


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


def is_extra_init(init: Any) -> bool:
    """Whether ``init`` is one of this module's names (``"olora"``, ``"pissa_niter_<N>"``)."""
    return isinstance(init, str) and (init == "olora" or PISSA_NITER.fullmatch(init) is not None)


@torch.no_grad()
def apply_extra_init(layer: Any, init: str) -> None:
    """Initialise ``layer`` (a ``LoRALinear``: ``base``, ``lora_A``, ``lora_B``, ``r``, ``scaling``) with
    ``init`` and store the residual in its base (an NF4 base requantizes it, and records the error).

    Raises:
        ValueError: ``init`` is not one of this module's names.
    """
    if not is_extra_init(init):
        raise ValueError(
            f"init must be one of ['default', 'gaussian', 'pissa', 'olora', 'pissa_niter_<N>'], got {init!r}"
        )
    w = layer.base.dense_weight()
    w = w.to(torch.promote_types(w.dtype, torch.float32))  # (out, in)
    if init == "olora":
        a, b = olora_factors(w, layer.r)
    else:
        niter = int(PISSA_NITER.fullmatch(init).group(1))  # type: ignore[union-attr]
        a, b = pissa_niter_factors(w, layer.r, layer.scaling, niter)
    layer.lora_A.weight.copy_(a)
    layer.lora_B.weight.copy_(b)
    layer.base.set_dense_weight(w - layer.scaling * (b @ a))


__all__ = ["apply_extra_init", "is_extra_init", "olora_factors", "pissa_niter_factors"]
