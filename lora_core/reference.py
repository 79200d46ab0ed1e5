"""Reference math for LoRA and DoRA: the direct formulas, in plain PyTorch, that everything else must match.

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
"""

from __future__ import annotations

import torch
from torch import Tensor


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
    y = x @ weight.T  # (..., out)
    if bias is not None:
        y = y + bias
    xd = x if dropout_mask is None else x * dropout_mask  # (..., in)
    return y + scaling * ((xd @ lora_A.T) @ lora_B.T)


def lora_delta_weight_ref(lora_A: Tensor, lora_B: Tensor, scaling: float) -> Tensor:  # (out, in)
    """``s · B A``: the dense update that merging adds to ``W``."""
    return scaling * (lora_B @ lora_A)


def dora_weight_norm_ref(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float) -> Tensor:  # (out,)
    """``‖W + s·B A‖`` per output row (the norm over the input dimension)."""
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
    g = magnitude / norm  # (out,)
    xd = x if dropout_mask is None else x * dropout_mask  # (..., in)
    y = x @ weight.T  # (..., out)
    if bias is not None:
        y = y + bias
    return y + (g - 1) * (xd @ weight.T) + g * (scaling * ((xd @ lora_A.T) @ lora_B.T))


def dora_merged_weight_ref(
    weight: Tensor, lora_A: Tensor, lora_B: Tensor, magnitude: Tensor, scaling: float
) -> Tensor:
    """``W' = m · (W + s·B A) / ‖W + s·B A‖_row``: the dense weight a merged DoRA layer holds. (out, in)"""
    v = weight + scaling * (lora_B @ lora_A)  # (out, in)
    return (magnitude / torch.linalg.vector_norm(v, dim=1)).unsqueeze(1) * v
