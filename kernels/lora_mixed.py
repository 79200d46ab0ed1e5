"""Per-row LoRA for mixed batches: each token row of ``x`` through its own adapter, in one pass.

Batched-LoRA serving kernels (Punica's SGMV, vLLM's ``lora_shrink`` / ``lora_expand``) split the low-rank
update ``s_a · (x A_aᵀ) B_aᵀ`` into two segmented products over the rows sorted by adapter::

    shrink   S[p]    = x[order[p]] · W[a_p]ᵀ                   W: (n, R, K) stacked A    → S: (P, R) fp32
    expand   y[t]   += scale[a_t] · S[p] · W[a_t]ᵀ, t = order[p]  W: (n, N, R) stacked B    in place on y

**Layout.** Adapters are stacked and zero-padded to the largest rank ``R = max r_a`` (padded rows of A and
columns of B are 0, so they add nothing): A as ``(n_adapters, R, in)``, B as ``(n_adapters, out, R)``.
``index`` gives each row of the batch its adapter slot, ``-1`` for ``"__base__"`` (no update). A row of
the batch may hold ``tokens_per_row`` tokens (``x`` is ``(rows·tokens_per_row, K)``); they share the slot.
`mixed_plan` sorts the tokens by slot (``order``: position p → token; base tokens are left out) and cuts
each adapter's run of positions into tiles of at most ``BLOCK_M`` positions, one adapter per tile::

    tiles[i] = (slot, first position, positions)     int32 (n_tiles, 3), built on the host from index

A program takes one tile (and, shrink, one slice of K / expand, one BLOCK_N columns of the output): it
gathers its tokens' rows of x by ``order``, loads its adapter's ``W[slot]`` tile and uses the tensor cores
(``tl.dot``, fp32 accumulation) as a dense GEMM would. Shrink splits K over ``SPLIT`` programs when there
are too few tiles to fill the GPU (float32 partial sums, then one ``sum`` over the splits). Expand adds
into ``y`` in place (each element belongs to one program): base rows are never touched. The plan is
built from the host-side index (no device sync) and cached per (index, tokens_per_row, device).

**Backward** uses the same two kernels on transposed stacks (``lora_core.lora.mixed`` holds the autograd
Function): ``G·B_a`` is shrink with ``B_aᵀ`` (n, R, out), and ``∂L/∂x += s_a (G B_a) A_a`` is expand with
``A_aᵀ`` (n, in, R). fp32 inputs multiply in full fp32 (``input_precision="ieee"``), like torch's default;
fp16/bf16 on the tensor cores. Ranks above ``MAX_R`` (``MIXED_MAX_R``) take the reference path (a bigger
``R`` tile spills). Every configuration the launchers choose is compiled for sm_80 / sm_90a by the compile
gate (``compile_check``).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from lora_core.kernels import MIXED_MAX_R
from lora_core.kernels.nf4_dequant import check_device
from lora_core.kernels.splitk import num_sms, split_count

BLOCK_M = 64  # positions (tokens of one adapter) per tile
BLOCK_RS = (16, 32, 64, 128)  # the rank tile: the smallest that covers R (tl.dot needs ≥ 16)
MAX_R = MIXED_MAX_R  # = BLOCK_RS[-1]
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ----------------------------------------------------------------------------- kernels


@triton.jit(do_not_specialize=["R", "K", "K_PER_SPLIT", "stride_xm", "stride_wa", "stride_wr", "stride_sm",
                               "stride_ss"])  # fmt: skip
def _lora_shrink_kernel(
    x_ptr, w_ptr, order_ptr, tiles_ptr, s_ptr,
    R, K, K_PER_SPLIT,
    stride_xm, stride_wa, stride_wr, stride_sm, stride_ss,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    """s[split, p, :R] = x[order[p], slice] · W[slot, :R, slice]ᵀ for the positions p of tile program_id(0).

    x (M, K) with unit stride along K; W (n, R, K) with unit stride along K; s (SPLIT, P, R) float32.
    """
    tile = tl.program_id(0)
    pid_s = tl.program_id(1)
    slot = tl.load(tiles_ptr + 3 * tile)
    first = tl.load(tiles_ptr + 3 * tile + 1)
    count = tl.load(tiles_ptr + 3 * tile + 2)
    offs_p = first + tl.arange(0, BLOCK_M)  # (BM,) positions
    mask_p = tl.arange(0, BLOCK_M) < count
    tok = tl.load(order_ptr + offs_p, mask=mask_p, other=0).to(tl.int64)  # (BM,) the rows of x they are
    offs_r = tl.arange(0, BLOCK_R)  # (BR,)
    w_base = w_ptr + slot.to(tl.int64) * stride_wa
    k_start = pid_s * K_PER_SPLIT
    k_end = tl.minimum(k_start + K_PER_SPLIT, K)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)  # (BK,)
        a = tl.load(
            x_ptr + tok[:, None] * stride_xm + offs_k[None, :],
            mask=mask_p[:, None] & (offs_k[None, :] < k_end),
            other=0.0,
        )  # (BM, BK) fmt: skip
        w = tl.load(
            w_base + offs_r[:, None] * stride_wr + offs_k[None, :],
            mask=(offs_r[:, None] < R) & (offs_k[None, :] < k_end),
            other=0.0,
        )  # (BR, BK) fmt: skip
        if IEEE:
            acc = tl.dot(a, tl.trans(w), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, tl.trans(w), acc)
    out = s_ptr + pid_s * stride_ss + offs_p[:, None] * stride_sm + offs_r[None, :]
    tl.store(out, acc, mask=mask_p[:, None] & (offs_r[None, :] < R))


@triton.jit(do_not_specialize=["R", "N", "stride_sm", "stride_wa", "stride_wn", "stride_ym"])
def _lora_expand_kernel(
    s_ptr, w_ptr, scale_ptr, order_ptr, tiles_ptr, y_ptr,
    R, N,
    stride_sm, stride_wa, stride_wn, stride_ym,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    """y[order[p], cols] += scale[slot] · s[p, :R] · W[slot, cols, :R]ᵀ for the positions p of the tile.

    s (P, R) float32 with unit stride along R; W (n, N, R) with unit stride along R; y (M, N) with unit
    stride along N, updated in place (rounded once to y's dtype).
    """
    tile = tl.program_id(0)
    pid_n = tl.program_id(1)
    slot = tl.load(tiles_ptr + 3 * tile)
    first = tl.load(tiles_ptr + 3 * tile + 1)
    count = tl.load(tiles_ptr + 3 * tile + 2)
    offs_p = first + tl.arange(0, BLOCK_M)  # (BM,)
    mask_p = tl.arange(0, BLOCK_M) < count
    tok = tl.load(order_ptr + offs_p, mask=mask_p, other=0).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
    w = tl.load(
        w_ptr + slot.to(tl.int64) * stride_wa + offs_n[:, None] * stride_wn + offs_r[None, :],
        mask=(offs_n[:, None] < N) & (offs_r[None, :] < R),
        other=0.0,
    )  # (BN, BR) fmt: skip
    s = tl.load(
        s_ptr + offs_p[:, None] * stride_sm + offs_r[None, :],
        mask=mask_p[:, None] & (offs_r[None, :] < R),
        other=0.0,
    )  # (BM, BR) float32 fmt: skip
    if IEEE:
        acc = tl.dot(s.to(w.dtype), tl.trans(w), input_precision="ieee")  # (BM, BN)
    else:
        acc = tl.dot(s.to(w.dtype), tl.trans(w))
    acc = acc * tl.load(scale_ptr + slot)
    ptrs = y_ptr + tok[:, None] * stride_ym + offs_n[None, :]
    mask = mask_p[:, None] & (offs_n[None, :] < N)
    y = tl.load(ptrs, mask=mask, other=0.0)
    tl.store(ptrs, (y.to(tl.float32) + acc).to(y_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- the plan (host side)


@dataclass(frozen=True)
class MixedPlan:
    """Tokens sorted by adapter slot, cut into tiles (module docstring).

    Args:
        order: (P,) int32 on the device, the token (row of x) at sorted position p; base tokens left out.
        tiles: (n_tiles, 3) int32 on the device: slot, first position, positions (≤ BLOCK_M).
        segments: per slot used, ``(slot, first, end)`` positions on the host (the weight gradients).
        n_tokens: M, the rows of x the plan is for.
    """

    order: torch.Tensor
    tiles: torch.Tensor
    segments: tuple[tuple[int, int, int], ...]
    n_tokens: int


def mixed_plan(index: Sequence[int], tokens_per_row: int, device: torch.device | str) -> MixedPlan:
    """The plan for rows whose adapter slots are ``index`` (``-1``: base), each ``tokens_per_row`` tokens
    of x. ``index`` is host data (a list or a CPU tensor), so building the plan never waits for the GPU."""
    if isinstance(index, torch.Tensor):
        if index.device.type != "cpu" or index.dim() != 1 or index.is_floating_point():
            raise ValueError(f"index must be a 1-D integer CPU tensor or a list, got {index.dtype} on "
                             f"{index.device} with shape {tuple(index.shape)}")  # fmt: skip
        index = index.tolist()
    if not all(isinstance(i, int) and i >= -1 for i in index):
        raise ValueError("index must hold one adapter slot ≥ 0 per row, or -1 for the base alone")
    if not isinstance(tokens_per_row, int) or tokens_per_row < 1:
        raise ValueError(f"tokens_per_row must be a positive int, got {tokens_per_row!r}")
    return _plan(tuple(index), tokens_per_row, torch.device(device))


@functools.lru_cache(maxsize=32)  # every LoRA layer of a model sees the same batch: build it once
def _plan(index: tuple[int, ...], t: int, device: torch.device) -> MixedPlan:
    order: list[int] = []
    tiles: list[tuple[int, int, int]] = []
    segments = []
    for slot in sorted(set(index) - {-1}):
        first = len(order)
        for row, s in enumerate(index):
            if s == slot:
                order.extend(range(row * t, (row + 1) * t))
        segments.append((slot, first, len(order)))
        tiles += [(slot, p, min(BLOCK_M, len(order) - p)) for p in range(first, len(order), BLOCK_M)]
    as_tensor = functools.partial(torch.tensor, dtype=torch.int32, device=device)
    return MixedPlan(as_tensor(order), as_tensor(tiles).reshape(-1, 3), tuple(segments), len(index) * t)


# ----------------------------------------------------------------------------- launchers


def block_r(r: int) -> int:
    """The rank tile for a stack of rank ``r`` (≤ MAX_R)."""
    return next(b for b in BLOCK_RS if r <= b)


def _config(n_tiles: int, r: int, k: int, dtype: torch.dtype, device: torch.device) -> dict[str, int]:
    """Tiles of both kernels. BLOCK_K = BLOCK_N = 32: the gathered x tile's 64-bit row addresses cost
    registers, and a width of 64 took 160-255 registers a thread (2 blocks per SM) where 32 takes 64-166;
    fp32 (``"ieee"``, no tensor cores) needs 16 at a rank tile of 128 to stay unspilled (compile gate)."""
    br = block_r(r)
    width = 16 if dtype == torch.float32 and br == 128 else 32
    cfg = {"BLOCK_R": br, "BLOCK_K": width, "BLOCK_N": width, "num_warps": 8 if br >= 64 else 4}
    cfg["SPLIT"] = split_count(n_tiles, triton.cdiv(k, cfg["BLOCK_K"]), num_sms(device))  # shrink splits K
    return cfg


def _check(x: torch.Tensor, w: torch.Tensor, plan: MixedPlan, name: str) -> None:
    if not isinstance(plan, MixedPlan):
        raise TypeError(f"plan must be a MixedPlan (mixed_plan(...)), got {type(plan).__name__}")
    if x.dtype not in SUPPORTED_DTYPES or w.dtype != x.dtype:
        raise TypeError(f"{name} and the stacked weight must share one dtype of float16/bfloat16/float32, "
                        f"got {x.dtype} and {w.dtype}")  # fmt: skip
    if x.dim() != 2 or x.shape[0] != plan.n_tokens or w.dim() != 3:
        raise ValueError(f"{name} must be (M={plan.n_tokens}, ·) and the weight (n_adapters, ·, ·); got "
                         f"{tuple(x.shape)} and {tuple(w.shape)}")  # fmt: skip
    if x.device != w.device or x.device != plan.order.device:
        raise ValueError(f"{name}, the weight and the plan must be on one device")
    check_device(x, name)


def lora_mixed_shrink(x: torch.Tensor, w: torch.Tensor, plan: MixedPlan) -> torch.Tensor:
    """``S[p] = x[order[p]] · w[slot_p]ᵀ``: x (M, K), w (n_adapters, R, K), one dtype → S (P, R) float32
    (P = tokens with an adapter, in ``plan.order``'s order)."""
    _check(x, w, plan, "x")
    if w.shape[2] != x.shape[1] or w.shape[1] > MAX_R:
        raise ValueError(f"w must be (n_adapters, R ≤ {MAX_R}, K={x.shape[1]}), got {tuple(w.shape)}")
    x = x if x.stride(1) == 1 else x.contiguous()
    w = w.contiguous()
    n_pos, (_, r, k) = plan.order.numel(), w.shape
    if k == 0:  # an empty sum
        return torch.zeros((n_pos, r), dtype=torch.float32, device=x.device)
    cfg = _config(plan.tiles.shape[0], r, k, x.dtype, x.device)
    per_split = triton.cdiv(triton.cdiv(k, cfg["BLOCK_K"]), cfg["SPLIT"]) * cfg["BLOCK_K"]
    split = max(1, triton.cdiv(k, per_split))  # slices actually used
    ws = torch.empty((split, n_pos, r), dtype=torch.float32, device=x.device)
    if plan.tiles.shape[0] and n_pos and r:
        _lora_shrink_kernel[(plan.tiles.shape[0], split)](
            x, w, plan.order, plan.tiles, ws, r, k, per_split,
            x.stride(0), w.stride(0), w.stride(1), ws.stride(1), ws.stride(0),
            BLOCK_M=BLOCK_M, BLOCK_R=cfg["BLOCK_R"], BLOCK_K=cfg["BLOCK_K"], IEEE=x.dtype == torch.float32,
            num_warps=cfg["num_warps"],
        )  # fmt: skip
    return ws[0] if split == 1 else ws.sum(0)


def lora_mixed_expand(y: torch.Tensor, s: torch.Tensor, w: torch.Tensor, scale: torch.Tensor,
                      plan: MixedPlan) -> torch.Tensor:  # fmt: skip
    """``y[order[p]] += scale[slot_p] · s[p] · w[slot_p]ᵀ`` in place and returned: y (M, N), s (P, R)
    float32, w (n_adapters, N, R) in y's dtype, scale (n_adapters,) float32. Base rows are untouched."""
    _check(y, w, plan, "y")
    n_pos = plan.order.numel()
    if w.shape[1] != y.shape[1] or w.shape[2] > MAX_R or tuple(s.shape) != (n_pos, w.shape[2]):
        raise ValueError(f"w must be (n_adapters, N={y.shape[1]}, R ≤ {MAX_R}) and s ({n_pos}, R); got "
                         f"{tuple(w.shape)} and {tuple(s.shape)}")  # fmt: skip
    if tuple(scale.shape) != (w.shape[0],):
        raise ValueError(f"scale must be ({w.shape[0]},), got {tuple(scale.shape)}")
    if y.stride(1) != 1:
        raise ValueError("y must have unit stride along its last dimension (it is updated in place)")
    s, w, scale = s.float().contiguous(), w.contiguous(), scale.float().contiguous()
    _, n, r = w.shape
    cfg = _config(plan.tiles.shape[0], r, 0, y.dtype, y.device)
    if plan.tiles.shape[0] and n_pos and r and n:
        grid = (plan.tiles.shape[0], triton.cdiv(n, cfg["BLOCK_N"]))
        _lora_expand_kernel[grid](
            s, w, scale, plan.order, plan.tiles, y, r, n, s.stride(0), w.stride(0), w.stride(1), y.stride(0),
            BLOCK_M=BLOCK_M, BLOCK_R=cfg["BLOCK_R"], BLOCK_N=cfg["BLOCK_N"], IEEE=y.dtype == torch.float32,
            num_warps=cfg["num_warps"],
        )  # fmt: skip
    return y
