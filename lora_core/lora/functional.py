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

from typing import Any

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


# ---- embedding and convolution layers (PEFT's formulas) ----------------------------------------------------
# Both are the linear formulas above in another frame, so merging reuses `merged_weight` unchanged:
# - nn.Embedding(num, dim) is the linear map one_hot(ids) ↦ one_hot Wᵀ with W₀ᵀ (dim, num) as its (out, in)
#   weight; A (r, num), B (dim, r) (PEFT's ``lora_embedding_A/B``) give ΔW = (s·BA)ᵀ (num, dim).
# - a convolution is a linear map on unfolded patches: with W₀ (out, in, *k) flattened to (out, in·∏k), A is
#   a conv in → r with the base's kernel, stride and padding, B a 1×1 conv r → out, and
#   ΔW = s · (B₍out×r₎ A₍r×in·∏k₎) reshaped to W₀'s shape. DoRA's row norm is the norm over (in, *k).


def embedding_kwargs(module: object) -> dict[str, object]:
    """``F.embedding``'s options of an ``nn.Embedding`` (the LoRA lookup uses the base's, as PEFT does)."""
    names = ("padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse")
    return {n: getattr(module, n) for n in names}


def lora_embedding_update(
    ids: Tensor,  # (...,) integer ids
    lora_A: Tensor,  # (r, num)
    lora_B: Tensor,  # (dim, r)
    scaling: float,
    **kwargs: object,  # padding_idx, max_norm, ...: the base's (`embedding_kwargs`)
) -> Tensor:  # (..., dim)
    """``s · Aᵀ[ids] Bᵀ``: row ``ids`` of Aᵀ (num, r) looked up as the base looks up W₀, then through B."""
    return (F.embedding(ids, lora_A.T, **kwargs) @ lora_B.T) * scaling  # type: ignore[arg-type]


def lora_embedding_ref(
    ids: Tensor,  # (...,)
    weight: Tensor,  # (num, dim)
    lora_A: Tensor,  # (r, num)
    lora_B: Tensor,  # (dim, r)
    scaling: float,
    magnitude: Tensor | None = None,  # (dim,): DoRA
    **kwargs: object,
) -> Tensor:  # (..., dim)
    """A LoRA embedding: ``W₀[ids] + s·Aᵀ[ids] Bᵀ``; DoRA: ``g ⊙ (W₀[ids] + s·Aᵀ[ids] Bᵀ)`` with
    ``g = m / ‖W₀ᵀ + s·BA‖_row`` (one per embedding dimension, detached), which is ``W'ᵀ[ids]``. No
    dropout: PEFT applies none to embeddings."""
    base = F.embedding(ids, weight, **kwargs)  # type: ignore[arg-type]
    update = lora_embedding_update(ids, lora_A, lora_B, scaling, **kwargs)
    if magnitude is None:
        return base + update
    g = magnitude / dora_weight_norm_ref(weight.T, lora_A, lora_B, scaling).detach()  # (dim,)
    return g * (base + update)


def conv_fn(weight: Tensor) -> Any:
    """``F.conv1d`` / ``F.conv2d`` for a 3-D / 4-D kernel."""
    return {3: F.conv1d, 4: F.conv2d}[weight.dim()]


def lora_conv_update(
    xd: Tensor,  # (N, in, *spatial), dropped out
    lora_A: Tensor,  # (r, in, *k)
    lora_B: Tensor,  # (out, r, *1)
    scaling: float,
    stride: Any,
    padding: Any,
) -> Tensor:  # (N, out, *spatial')
    """``s · B ⋆ (A ⋆ drop(x))``: A with the base's kernel, stride and padding, then the 1×1 conv B."""
    conv = conv_fn(lora_A)
    return conv(conv(xd, lora_A, None, stride, padding), lora_B) * scaling


def lora_conv_delta_weight_ref(lora_A: Tensor, lora_B: Tensor, scaling: float) -> Tensor:  # (out, in, *k)
    """``s · B A`` in the kernel's shape: what merging adds to a conv weight."""
    r = lora_A.shape[0]
    delta = lora_delta_weight_ref(lora_A.reshape(r, -1), lora_B.reshape(-1, r), scaling)  # (out, in·∏k)
    return delta.reshape(lora_B.shape[0], *lora_A.shape[1:])


def lora_conv_ref(
    x: Tensor,  # (N, in, *spatial)
    weight: Tensor,  # (out, in, *k)
    bias: Tensor | None,  # (out,)
    lora_A: Tensor,  # (r, in, *k)
    lora_B: Tensor,  # (out, r, *1)
    scaling: float,
    stride: Any = 1,
    padding: Any = 0,
    magnitude: Tensor | None = None,  # DoRA: (1, out, *1), PEFT's shape
    dropout_mask: Tensor | None = None,  # like x
) -> Tensor:  # (N, out, *spatial')
    """A LoRA convolution, the direct formula: ``W₀ ⋆ x + b + s·B ⋆ (A ⋆ drop(x))``. DoRA, as PEFT: with
    ``g = m / ‖W₀ + s·BA‖`` per output channel (norm over (in, *k), detached), the base output plus
    ``(g − 1) ⊙ (W₀ ⋆ drop(x)) + g ⊙ s·B ⋆ (A ⋆ drop(x))``."""
    conv = conv_fn(weight)
    xd = x if dropout_mask is None else x * dropout_mask
    update = lora_conv_update(xd, lora_A, lora_B, scaling, stride, padding)
    out = conv(x, weight, bias, stride, padding)
    if magnitude is None:
        return out + update
    v = weight + lora_conv_delta_weight_ref(lora_A, lora_B, scaling)  # (out, in, *k)
    norm = torch.linalg.vector_norm(v.flatten(1), dim=1).detach()  # (out,)
    g = magnitude / norm.view(magnitude.shape)  # (1, out, *1)
    return out + (g - 1) * conv(xd, weight, None, stride, padding) + g * update
