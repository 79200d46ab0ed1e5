"""Reference math for LoRA and DoRA: the direct formulas, in plain PyTorch. This is the CPU path (the
layers call it off-GPU) and what every fast path is tested against: one copy of each formula.

LoRA (Hu et al. 2021, eq. 3) adds a trainable low-rank update to a frozen linear map::

    x ──► W₀ ───────────────────────┐
    │                               (+)──► y = x W₀ᵀ + b + s · (drop(x) Aᵀ) Bᵀ
    └──► drop ──► A (r×in) ──► B (out×r) ──► ×s ──┘

with ``s = α / r`` (or ``α / √r`` for rsLoRA, Kalajdzievski 2023). Without dropout this equals one linear
map with weight ``W₀ + s·B A``.

DoRA (Liu et al. 2024, eq. 5) splits the adapted weight into a magnitude and a direction::

    W' = m · V / ‖V‖_row,     V = W₀ + s·B A,     m ∈ ℝ^out (trainable, initialised to ‖W₀‖_row)

and (§4.3) treats ``‖V‖_row`` as a constant in backward: gradients flow into ``V`` only through the
numerator. PEFT computes the output without forming ``W'``, as a correction of the base output; with
``g = m / ‖V‖_row`` (the norm detached)::

    y = x W₀ᵀ + b + (g − 1) ⊙ (drop(x) W₀ᵀ) + g ⊙ s · (drop(x) Aᵀ) Bᵀ

which, without dropout, is ``x W'ᵀ + b``. Row norms are over the input dimension (one per output).

**Merging** writes ``W'`` (DoRA) or ``W₀ + s·BA`` (LoRA) into the base: `merged_weight`, the one function
that merge and unload both use; `unmerged_weight` inverts it (DoRA needs the norm it divided by).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def lora_update(xd: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float) -> Tensor:  # (..., out)
    """``s · (drop(x) Aᵀ) Bᵀ``: the low-rank update of the output, ``xd`` (..., in) already dropped out."""
    return F.linear(F.linear(xd, lora_A), lora_B) * scaling


def dora_weight_norm(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float) -> Tensor:  # (out,)
    """``‖W + s·B A‖`` per output row (the norm over the input dimension), without gradient (DoRA §4.3)."""
    with torch.no_grad():
        return torch.linalg.vector_norm(weight + scaling * (lora_B @ lora_A), dim=1)


def dora_update(
    xd: Tensor,  # (..., in), dropped out
    base_xd: Tensor,  # (..., out): drop(x) W₀ᵀ (no bias)
    lora_A: Tensor,  # (r, in)
    lora_B: Tensor,  # (out, r)
    magnitude: Tensor,  # (out,)
    weight_norm: Tensor,  # (out,): ‖W₀ + s·BA‖_row, detached
    scaling: float,
) -> Tensor:  # (..., out)
    """``(g − 1) ⊙ drop(x) W₀ᵀ + g ⊙ s·(drop(x) Aᵀ) Bᵀ`` with ``g = m / ‖W₀ + s·BA‖_row``: what DoRA adds
    to the base output (module docstring)."""
    g = magnitude / weight_norm  # (out,)
    return (g - 1) * base_xd + g * lora_update(xd, lora_A, lora_B, scaling)


def lora_linear_ref(
    x: Tensor,  # (..., in)
    weight: Tensor,  # (out, in)
    bias: Tensor | None,  # (out,)
    lora_A: Tensor,  # (r, in)
    lora_B: Tensor,  # (out, r)
    scaling: float,
    dropout_mask: Tensor | None = None,  # (..., in): the dropout multiplier, already divided by (1 - p)
) -> Tensor:  # (..., out)
    """``y = x Wᵀ + b + s · ((x ⊙ mask) Aᵀ) Bᵀ``: a LoRA linear layer, the direct formula."""
    xd = x if dropout_mask is None else x * dropout_mask  # (..., in)
    return F.linear(x, weight, bias) + lora_update(xd, lora_A, lora_B, scaling)


def lora_delta_weight_ref(lora_A: Tensor, lora_B: Tensor, scaling: float) -> Tensor:  # (out, in)
    """``s · B A``: the dense update that merging adds to ``W``."""
    return scaling * (lora_B @ lora_A)


def dora_weight_norm_ref(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float) -> Tensor:  # (out,)
    """``‖W + s·B A‖`` per output row, differentiable (the layers use the detached `dora_weight_norm`)."""
    return torch.linalg.vector_norm(weight + scaling * (lora_B @ lora_A), dim=1)


def dora_linear_ref(
    x: Tensor,  # (..., in)
    weight: Tensor,  # (out, in)
    bias: Tensor | None,  # (out,)
    lora_A: Tensor,  # (r, in)
    lora_B: Tensor,  # (out, r)
    magnitude: Tensor,  # (out,)
    scaling: float,
    dropout_mask: Tensor | None = None,  # (..., in)
) -> Tensor:  # (..., out)
    """DoRA as PEFT computes it (module docstring): the base output plus a magnitude-rescaled correction,
    the row norm detached (DoRA §4.3). Without dropout this is ``x (m ⊙ V/‖V‖_row)ᵀ + b``."""
    norm = dora_weight_norm_ref(weight, lora_A, lora_B, scaling).detach()  # (out,)
    xd = x if dropout_mask is None else x * dropout_mask  # (..., in)
    base_xd = F.linear(xd, weight)  # (..., out)
    return F.linear(x, weight, bias) + dora_update(xd, base_xd, lora_A, lora_B, magnitude, norm, scaling)


def merged_weight(
    weight: Tensor,  # (out, in)
    lora_A: Tensor,  # (r, in)
    lora_B: Tensor,  # (out, r)
    scaling: float,
    magnitude: Tensor | None = None,  # (out,): DoRA
) -> tuple[Tensor, Tensor | None]:
    """The dense weight a merged layer holds, ``W₀ + s·BA`` (LoRA) or ``m ⊙ V / ‖V‖_row`` with
    ``V = W₀ + s·BA`` (DoRA), computed in ``weight``'s dtype; and DoRA's ``‖V‖_row`` (None for LoRA),
    which `unmerged_weight` needs to undo the rescaling."""
    v = weight + lora_delta_weight_ref(lora_A, lora_B, scaling).to(weight.dtype)  # (out, in)
    if magnitude is None:
        return v, None
    norm = torch.linalg.vector_norm(v, dim=1)  # (out,)
    return (magnitude.to(weight.dtype) / norm)[:, None] * v, norm


def unmerged_weight(
    merged: Tensor,  # (out, in)
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    magnitude: Tensor | None = None,
    norm: Tensor | None = None,  # (out,): what `merged_weight` returned (DoRA)
) -> Tensor:  # (out, in)
    """``W₀`` back from `merged_weight`'s result (exact up to float rounding)."""
    if magnitude is not None:
        if norm is None:
            raise ValueError("unmerging DoRA needs the row norm merged_weight returned")
        merged = merged * (norm / magnitude.to(merged.dtype))[:, None]
    return merged - lora_delta_weight_ref(lora_A, lora_B, scaling).to(merged.dtype)


def dora_merged_weight_ref(
    weight: Tensor, lora_A: Tensor, lora_B: Tensor, magnitude: Tensor, scaling: float
) -> Tensor:
    """``W' = m · (W + s·B A) / ‖W + s·B A‖_row``: the dense weight a merged DoRA layer holds. (out, in)"""
    return merged_weight(weight, lora_A, lora_B, scaling, magnitude)[0]


# ---- several adapters folded into one weight -------------------------------------------------------------
def merged_weight_sum(
    weight: Tensor,  # (out, in): W₀
    adapters: list[tuple[Tensor, Tensor, float, Tensor | None]],  # (A (r, in), B (out, r), s, DoRA m | None)
) -> tuple[Tensor, list[Tensor | None]]:
    """``W₀ + Σᵢ (merged_weight(W₀, i) − W₀)``: each adapter's change against the same W₀, as a forward
    with them all active adds them; and each DoRA adapter's row norm (None for LoRA). One adapter: exactly
    `merged_weight`."""
    if len(adapters) == 1:
        w, norm = merged_weight(weight, *adapters[0])
        return w, [norm]
    w, norms = weight, []
    for a, b, s, m in adapters:
        wi, norm = merged_weight(weight, a, b, s, m)
        w, norms = w + (wi - weight), [*norms, norm]
    return w, norms


def unmerged_weight_sum(
    merged: Tensor,  # (out, in)
    adapters: list[tuple[Tensor, Tensor, float, Tensor | None]],
    norms: list[Tensor | None],  # what `merged_weight_sum` returned
) -> Tensor:  # (out, in)
    """``W₀`` back from `merged_weight_sum`, row-wise: with ``gᵢ = mᵢ / normᵢ`` (1 for LoRA),
    ``W' = W₀ ⊙ (1 + Σᵢ (gᵢ − 1)) + Σᵢ gᵢ ⊙ sᵢBᵢAᵢ``,
    so ``W₀ = (W' − Σᵢ gᵢ ⊙ sᵢBᵢAᵢ) / (1 + Σᵢ (gᵢ − 1))``."""
    if len(adapters) == 1:
        return unmerged_weight(merged, *adapters[0], norms[0])
    w = merged
    scale = torch.ones(merged.shape[0], dtype=merged.dtype, device=merged.device)  # (out,)
    for (a, b, s, m), norm in zip(adapters, norms):
        if m is not None and norm is None:
            raise ValueError("unmerging DoRA needs the row norm merged_weight returned")
        g = m.to(merged.dtype) / norm if m is not None else torch.ones_like(scale)  # type: ignore[operator]
        w = w - g[:, None] * lora_delta_weight_ref(a, b, s).to(merged.dtype)
        scale = scale + (g - 1)
    return w / scale[:, None]
