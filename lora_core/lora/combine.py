"""Combining adapters into a new one: ``lc.add_weighted_adapter`` (PEFT's ``add_weighted_adapter``).

Two families, as in PEFT (``peft.tuners.lora.LoraModel``), with the same numbers for the same adapters:

    factor-wise   linear, ties, dare_linear, dare_ties, magnitude_prune (adapters of one rank r)
                  A' = merge_i(√|wᵢsᵢ|·sign(wᵢsᵢ) · Aᵢ) (r, in),   B' = merge_i(√|wᵢsᵢ| · Bᵢ) (out, r)
    cat           A' = [w₁s₁A₁; w₂s₂A₂; ...],  B' = [B₁ B₂ ...]      rank Σ rᵢ: exactly Σ wᵢ sᵢ BᵢAᵢ
    delta + SVD   svd, ties_svd, dare_linear_svd, dare_ties_svd, magnitude_prune_svd
                  ΔW = merge_i(wᵢ · sᵢBᵢAᵢ) (out, in);  U S Vᵀ = ΔW;  B' = U_k S_k, A' = V_kᵀ  (k = svd_rank)

``merge`` is one of (Yadav et al. 2023, "TIES-Merging"; Yu et al. 2024, "DARE"):

    task arithmetic   Σ wᵢ Tᵢ
    magnitude_prune   Σ wᵢ top_density(Tᵢ)                       keep the largest |entries| of each
    ties              keep top entries, elect each entry's sign from Σ Tᵢ ("total") or Σ sign(Tᵢ)
                      ("frequency"), average the weighted entries that agree with it
    dare_linear       Σ wᵢ Bernoulli(density) ⊙ Tᵢ / density     random drop, rescaled: E = Σ wᵢ Tᵢ
    dare_ties         the DARE drop, then ties' sign election and disjoint mean

The new adapter gets ``r = alpha`` = the new rank (PEFT's rule, so its scale is 1 without rsLoRA) and the
union of the adapters' targets; it is added inactive and frozen. The DARE types take ``generator`` (or
``seed``) so a combination can be repeated; without one they draw from torch's global generator, as PEFT.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lora_core.lora.config import LoraConfig
from lora_core.lora.registry import CONFIGS_ATTR, OTHER_LAYERS, adapter_configs, lora_layers
from lora_core.lora.slots import check_adapter_name

FACTOR_WISE = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
COMBINATION_TYPES = (*FACTOR_WISE, "cat", *SVD)


# ---- merging task tensors (PEFT's peft.utils.merge_utils, with an optional generator) ---------------------
def _weighted(tensors: Tensor, weights: Tensor) -> Tensor:  # (n, ...) * (n,) -> (n, ...)
    return tensors * weights.view(weights.shape + (1,) * (tensors.dim() - 1))


def prune(tensor: Tensor, density: float, method: str, generator: torch.Generator | None = None) -> Tensor:
    """Keep a ``density`` fraction of ``tensor``: its largest magnitudes (``"magnitude"``), or a random
    Bernoulli(density) subset rescaled by ``1/density`` (``"random"``, DARE). ``density ≥ 1`` keeps all."""
    if density >= 1:
        warnings.warn(f"density {density} >= 1: nothing is pruned", UserWarning, stacklevel=3)
        return tensor
    if method == "magnitude":
        mask = torch.zeros_like(tensor).reshape(-1)
        mask[torch.topk(tensor.abs().reshape(-1), k=int(density * tensor.numel()), largest=True)[1]] = 1
        return tensor * mask.reshape(tensor.shape)
    mask = torch.bernoulli(torch.full_like(tensor, density), generator=generator)
    return tensor * mask / density


def majority_sign_mask(tensors: Tensor, method: str = "total") -> Tensor:  # (n, ...) bool
    """Which entries agree with the elected sign: that of ``Σᵢ Tᵢ`` ("total") or ``Σᵢ sign(Tᵢ)``
    ("frequency"); a tie elects +."""
    sign = tensors.sign()
    votes = tensors.sum(dim=0) if method == "total" else sign.sum(dim=0)
    return sign == torch.where(votes >= 0, 1, -1)


def merge_tensors(
    kind: str, tensors: list[Tensor], weights: Tensor, density: float | None = None,
    majority_sign_method: str = "total", generator: torch.Generator | None = None,
) -> Tensor:  # fmt: skip
    """Merge task tensors of one shape with ``kind`` in ("linear", "ties", "dare_linear", "dare_ties",
    "magnitude_prune") (the SVD types use the same with their suffix dropped; "svd" is "linear")."""
    if kind in ("ties", "magnitude_prune"):
        tensors = [prune(t, density, "magnitude") for t in tensors]  # type: ignore[arg-type]
    elif kind in ("dare_linear", "dare_ties"):
        tensors = [prune(t, density, "random", generator) for t in tensors]  # type: ignore[arg-type]
    stacked = torch.stack(tensors, dim=0)  # (n, ...)
    if kind not in ("ties", "dare_ties"):
        return _weighted(stacked, weights).sum(dim=0)
    mask = majority_sign_mask(stacked, majority_sign_method)  # elected on the unweighted tensors (PEFT)
    kept = (_weighted(stacked, weights) * mask).sum(dim=0)
    return kept / torch.clamp(mask.sum(dim=0), min=1.0)  # the disjoint mean


# ---- one layer -----------------------------------------------------------------------------------------
def _factor_wise(kind: str, factors: list[tuple[Tensor, Tensor, float]], weights: list[float],
                 **merge: object) -> tuple[Tensor, Tensor]:  # fmt: skip
    """``(A', B')``: each factor merged with ``√|wᵢsᵢ|`` (A also takes the sign)."""
    roots = [math.sqrt(abs(w * s)) for (_, _, s), w in zip(factors, weights)]
    signs = [1.0 if w * s >= 0 else -1.0 for (_, _, s), w in zip(factors, weights)]
    dtype, device = factors[0][0].dtype, factors[0][0].device
    w_a = torch.tensor([r * g for r, g in zip(roots, signs)], device=device)
    w_b = torch.tensor(roots, device=device)
    a = merge_tensors(kind, [f[0].detach() for f in factors], w_a, **merge)  # type: ignore[arg-type]
    b = merge_tensors(kind, [f[1].detach() for f in factors], w_b, **merge)  # type: ignore[arg-type]
    return a.to(dtype), b.to(dtype)


def _svd(
    kind: str, factors: list[tuple[Tensor, Tensor, float]], weights: list[float], rank: int,
    clamp: float | None, full_matrices: bool, driver: str | None, **merge: object,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """``(A', B')`` from the SVD of the merged ``ΔW = merge(wᵢ · sᵢBᵢAᵢ)``."""
    deltas = [s * (b.detach() @ a.detach()) for a, b, s in factors]  # (out, in) each
    base_kind = "linear" if kind == "svd" else kind.removesuffix("_svd")
    w = torch.tensor(weights, device=deltas[0].device)
    delta = merge_tensors(base_kind, deltas, w, **merge)  # type: ignore[arg-type]  # (out, in)
    u, s_vals, vh = torch.linalg.svd(delta, full_matrices=full_matrices, driver=driver)
    u = u[:, :rank] @ torch.diag(s_vals[:rank])  # (out, k)
    vh = vh[:rank, :]  # (k, in)
    if clamp is not None:
        hi = torch.quantile(torch.cat([u.flatten(), vh.flatten()]), clamp)
        u, vh = u.clamp(-hi, hi), vh.clamp(-hi, hi)
    return vh, u


# ---- the model -----------------------------------------------------------------------------------------
def add_weighted_adapter(
    model: nn.Module,
    adapters: Sequence[str],
    weights: Sequence[float],
    adapter_name: str,
    combination_type: str = "svd",
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    svd_full_matrices: bool = True,
    svd_driver: str | None = None,
    density: float | None = None,
    majority_sign_method: str = "total",
    *,
    generator: torch.Generator | None = None,
    seed: int | None = None,
) -> None:
    """Add adapter ``adapter_name``, a weighted combination of ``adapters`` (PEFT's arguments and numbers;
    see the module docstring for each ``combination_type``). It is inactive: ``lc.set_adapter`` it.

    Args:
        weights: one per adapter; negative ones subtract (task arithmetic's negation).
        svd_rank: rank of an SVD combination (default: the largest of the adapters' ranks).
        density: the kept fraction for ties, dare_* and magnitude_prune types, in (0, 1].
        majority_sign_method: ``"total"`` or ``"frequency"`` (ties and dare_ties).
        generator, seed: the random source of the dare types (``seed`` makes a fresh generator).

    Raises:
        ValueError: an unknown adapter or combination type; ``adapter_name`` exists; weights and adapters
            differ in length; a DoRA adapter; an adapter on an embedding or conv layer; factor-wise types
            over adapters of different ranks or
            different target layers; a missing or out-of-range density. The model is unchanged.
    """
    configs = adapter_configs(model)
    names = list(adapters)
    check_adapter_name(adapter_name)
    unknown = [n for n in names if n not in configs]
    if not names or unknown:
        raise ValueError(
            f"add_weighted_adapter: no adapter named {unknown or names}; the model has {list(configs)}"
        )
    if adapter_name in configs:
        raise ValueError(f"add_weighted_adapter: the model already has an adapter named {adapter_name!r}")
    if len(weights) != len(names):
        raise ValueError(f"add_weighted_adapter: {len(names)} adapters {names} but {len(weights)} weights")
    if combination_type not in COMBINATION_TYPES:
        raise ValueError(
            f"combination_type must be one of {list(COMBINATION_TYPES)}, got {combination_type!r}"
        )
    if majority_sign_method not in ("total", "frequency"):
        raise ValueError(f"majority_sign_method must be 'total' or 'frequency', got {majority_sign_method!r}")
    dora = [n for n in names if configs[n].use_dora]
    if dora:
        raise ValueError(f"add_weighted_adapter combines LoRA adapters only; {dora} use DoRA")
    kind = "linear" if len(names) == 1 else combination_type  # PEFT's rule
    uses_density = kind not in ("linear", "cat", "svd")
    if uses_density and (density is None or not 0 < density <= 1):
        raise ValueError(f"combination_type {kind!r} needs a density in (0, 1], got {density!r}")
    ranks = [max([configs[n].r, *configs[n].rank_pattern.values()]) for n in names]
    layers = list(lora_layers(model))
    other = [
        p for p, layer in layers if isinstance(layer, OTHER_LAYERS) and set(names) & set(layer.lora_specs)
    ]
    if other:  # their factors are kernels / PEFT's embedding tables: not combined (yet)
        raise ValueError(f"add_weighted_adapter combines adapters of linear layers only; {other} are not")
    if kind in FACTOR_WISE:
        if len(set(ranks)) != 1:
            raise ValueError(
                f"{kind!r} needs adapters of one rank; {names} have r = {ranks} (use 'cat' or 'svd')"
            )
        held = {n: {p for p, layer in layers if n in layer.lora_specs} for n in names}
        if any(held[n] != held[names[0]] for n in names):
            raise ValueError(
                f"{kind!r} needs adapters on the same layers; {names} adapt different target modules "
                "(use 'cat' or an SVD type)"
            )
    new_rank = ranks[0] if kind in FACTOR_WISE else sum(ranks) if kind == "cat" else svd_rank or max(ranks)
    types = {type(configs[n].target_modules) for n in names}
    if len(types) != 1 or any(configs[n].target_modules is None for n in names):
        raise ValueError(f"{names}: combine adapters whose target_modules are all lists or all regexes")
    if types == {str}:
        targets: list[str] | str = "|".join(f"({configs[n].target_modules})" for n in names)
    else:
        targets = sorted({t for n in names for t in configs[n].target_modules})  # type: ignore[union-attr]
    first = configs[names[0]]
    cfg = LoraConfig(**{
        **first.__dict__, "r": new_rank, "alpha": float(new_rank), "target_modules": targets,
        "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None, "bias": "none",
    })  # fmt: skip
    if generator is None and seed is not None:
        generator = torch.Generator().manual_seed(seed)
    merge = {"density": density, "majority_sign_method": majority_sign_method, "generator": generator}
    plans = []  # everything computed before the model changes
    for _, layer in layers:
        present = [(n, w) for n, w in zip(names, weights) if n in layer.lora_specs]
        if not present:
            continue
        if new_rank > min(layer.in_features, layer.out_features):
            raise ValueError(f"the combined rank {new_rank} exceeds min(in, out) of a layer; lower svd_rank")
        factors = [(layer.lora_A[n], layer.lora_B[n], layer.lora_specs[n].scaling) for n, _ in present]
        ws = [float(w) for _, w in present]
        with torch.no_grad():
            if kind in FACTOR_WISE:
                a, b = _factor_wise(kind, factors, ws, **merge)
            elif kind == "cat":
                a = torch.cat([f[0] * w * f[2] for f, w in zip(factors, ws)], dim=0)
                b = torch.cat([f[1] for f in factors], dim=1)
            else:
                a, b = _svd(kind, factors, ws, new_rank, svd_clamp, svd_full_matrices, svd_driver, **merge)
        plans.append((layer, a, b))
    for layer, a, b in plans:
        layer.add_adapter(adapter_name, r=new_rank, alpha=float(new_rank), dropout=cfg.dropout,
                          use_rslora=cfg.use_rslora, init=None)  # fmt: skip
        new_a, new_b = layer.lora_A[adapter_name], layer.lora_B[adapter_name]
        with torch.no_grad():
            new_a.zero_()
            new_b.zero_()
            new_a[: a.shape[0]] = a.to(new_a.dtype)
            new_b[:, : b.shape[1]] = b.to(new_b.dtype)
        for p in layer.adapter_parameters(adapter_name):
            p.requires_grad_(False)
    object.__setattr__(model, CONFIGS_ATTR, {**configs, adapter_name: cfg})


__all__ = ["COMBINATION_TYPES", "add_weighted_adapter", "majority_sign_mask", "merge_tensors", "prune"]
