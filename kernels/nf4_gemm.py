"""Matrix products with an NF4 weight: ``x @ Wᵀ (+ bias)`` (forward) and ``g @ W`` (what backward needs).

``W`` is ``(N, K)`` (``out_features, in_features``) stored as NF4 (see ``lora_core.quant.nf4``); ``x`` is
``(..., K)``, ``g`` is ``(..., N)``. Two strategies, picked by the number of rows ``M`` of ``x``:

**Small M (decode, M ≤ FUSED_MAX_M): a fused split-K kernel.** The product is bound by reading ``W``.
Reading it packed (0.52 byte/param with double quantization) instead of as bf16 (2 bytes/param) is a 3.9×
smaller floor, so each program dequantizes a ``(BLOCK_N, BLOCK_K)`` tile of ``W`` in registers and feeds it
straight to ``tl.dot``; ``W`` never exists in memory as bf16::

    grid = (M tiles × N tiles, SPLIT_K)          program (tile, s) sums k over its slice of K:
    for k0 in slice s, step BLOCK_K:
        a   = x[offs_m, k0:k0+BLOCK_K]                                   # (BLOCK_M, BLOCK_K)
        w   = (T[packed bytes] * absmax).to(x.dtype)                     # (BLOCK_N, BLOCK_K)
        acc += a @ wᵀ                                                    # tensor cores, fp32 acc
    SPLIT_K == 1: out = (acc + bias).to(x.dtype)
    SPLIT_K  > 1: ws[s] = acc; a second tiny kernel sums the SPLIT_K partials, adds bias, casts.

  With M ≤ 16 the tensor-core tile is mostly padding (BLOCK_M = 16 is tl.dot's minimum) but costs little:
  the multiply-adds are ~1% of the time the bytes take; what costs is the dequantization arithmetic, which
  is why the tile is laid out so each scale is loaded once per 64-element block and each packed byte is
  turned into its two codes with one 8-byte gather from a 2 KiB pair table (see ``nf4_dequant``).
  Split-K exists because at M = 1 an 8192-wide output only makes 8192 / BLOCK_N = 128 tiles — one per SM,
  far too few loads in flight to saturate HBM. The heuristic splits K until there are about
  ``_PROGRAMS_PER_SM`` programs per SM, keeping at least ``_MIN_ITERS_PER_SPLIT`` tiles per slice so the
  partial sums (``SPLIT_K·M·N·4`` bytes) stay negligible next to ``W``.

**Large M (prefill / training, M > FUSED_MAX_M): dequantize, then cuBLAS.** The product is bound by the
tensor cores (2·M·N·K flops); a bf16 copy of ``W`` costs one streaming pass (``nf4_dequantize``, ~57 µs
for 8192² at H100 copy bandwidth) next to ~705 µs of cuBLAS at M = 4096, i.e. ≤ 1.10× cuBLAS, and cuBLAS's
Hopper kernels (wgmma, TMA) are better than a fused Triton GEMM would be without tuning on the device.
The cross-over ``FUSED_MAX_M`` is a first guess, to be read off ``lora-core bench``'s M sweep, which times
both strategies at every M.

The backward product ``g @ W`` reduces over N (the rows of W) instead of K, with the same tile loader.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from lora_core.kernels import FUSED_MAX_M
from lora_core.kernels.nf4_dequant import (
    block_absmax,
    check_device,
    check_nf4,
    nested_args,
    nf4_dequantize,
    pair_table,
)

from lora_core.quant.nf4 import NF4Tensor

_PROGRAMS_PER_SM = 4  # ~4 resident programs per SM keep enough 16-byte loads in flight
_MIN_ITERS_PER_SPLIT = 4  # a K slice spans at least this many BLOCK_K tiles
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _load_w_tile(
    packed_ptr, absmax_ptr, table_ptr, nested_code_ptr, nested_absmax_ptr, offset_ptr,
    offs_n, k0, N, K,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    NESTED_BLOCK_SIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, ALIGNED: tl.constexpr,
):  # fmt: skip
    """``W[offs_n, k0:k0+BLOCK_K]`` dequantized to float32, ``(BLOCK_N, BLOCK_K)``; 0 outside ``(N, K)``.

    Needs K even (each row starts on a byte). ALIGNED (K and BLOCK_K multiples of BLOCK_SIZE): the tile
    is viewed as (BLOCK_N, blocks, bytes per block) and each block's scale is loaded once; otherwise every
    byte computes its own block index (ragged K: correct, slower).
    """
    if ALIGNED:
        KB: tl.constexpr = BLOCK_K // BLOCK_SIZE  # quantization blocks per tile row
        HB: tl.constexpr = BLOCK_SIZE // 2  # bytes per block
        blocks_per_row = K // BLOCK_SIZE
        blk_in_row = k0 // BLOCK_SIZE + tl.arange(0, KB)  # (KB,)
        mask = (offs_n[:, None] < N) & (blk_in_row[None, :] < blocks_per_row)  # (BN, KB)
        offs_blk = offs_n[:, None].to(tl.int64) * blocks_per_row + blk_in_row[None, :]  # (BN, KB)
        absmax = block_absmax(
            absmax_ptr, nested_code_ptr, nested_absmax_ptr, offset_ptr, offs_blk, mask,
            NESTED_BLOCK_SIZE, DOUBLE_QUANT,
        )  # (BN, KB)
        offs_byte = offs_blk[:, :, None] * HB + tl.arange(0, HB)[None, None, :]  # (BN, KB, HB)
        byte = tl.load(packed_ptr + offs_byte, mask=mask[:, :, None], other=0).to(tl.int32)
        pair = tl.load(table_ptr + byte[:, :, :, None] * 2 + tl.arange(0, 2)[None, None, None, :])
        w = pair * absmax[:, :, None, None]  # (BN, KB, HB, 2)
    else:
        HK: tl.constexpr = BLOCK_K // 2  # bytes per tile row
        offs_kb = k0 // 2 + tl.arange(0, HK)  # (HK,) byte column
        mask = (offs_n[:, None] < N) & (offs_kb[None, :] < K // 2)  # (BN, HK)
        offs_byte = offs_n[:, None].to(tl.int64) * (K // 2) + offs_kb[None, :]  # (BN, HK)
        # both nibbles of a byte share a block: BLOCK_SIZE is even
        absmax = block_absmax(
            absmax_ptr, nested_code_ptr, nested_absmax_ptr, offset_ptr, (offs_byte * 2) // BLOCK_SIZE,
            mask, NESTED_BLOCK_SIZE, DOUBLE_QUANT,
        )  # (BN, HK)
        byte = tl.load(packed_ptr + offs_byte, mask=mask, other=0).to(tl.int32)
        pair = tl.load(table_ptr + byte[:, :, None] * 2 + tl.arange(0, 2)[None, None, :])
        w = pair * absmax[:, :, None]  # (BN, HK, 2)
    return tl.reshape(w, (BLOCK_N, BLOCK_K))


@triton.jit
def _nf4_matmul_kernel(
    # pointers
    a_ptr, packed_ptr, absmax_ptr, table_ptr, nested_code_ptr, nested_absmax_ptr, offset_ptr,
    bias_ptr, c_ptr,
    # sizes
    M, N, K, K_PER_SPLIT,
    # strides
    stride_am, stride_ak, stride_cs, stride_cm, stride_cn,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    NESTED_BLOCK_SIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, ALIGNED: tl.constexpr,
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """c[s] = a[:, slice s of K] @ W[:, slice s]ᵀ  (+ bias when HAS_BIAS); a (M, K), W (N, K) NF4."""
    pid_mn = tl.program_id(0)
    pid_s = tl.program_id(1)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pid_m = pid_mn // num_pid_n
    pid_n = pid_mn % num_pid_n
    offs_am = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
    offs_bn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = pid_s * K_PER_SPLIT
    k_end = tl.minimum(k_start + K_PER_SPLIT, K)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)  # (BK,)
        a = tl.load(
            a_ptr + offs_am[:, None] * stride_am + offs_k[None, :] * stride_ak,
            mask=(offs_am[:, None] < M) & (offs_k[None, :] < k_end), other=0.0,
        )  # (BM, BK)
        w = _load_w_tile(
            packed_ptr, absmax_ptr, table_ptr, nested_code_ptr, nested_absmax_ptr, offset_ptr,
            offs_bn, k0, N, K, BLOCK_N, BLOCK_K, BLOCK_SIZE, NESTED_BLOCK_SIZE, DOUBLE_QUANT, ALIGNED,
        )  # (BN, BK) float32
        # acc += x @ dequant(W)ᵀ, W rounded to x's dtype first (as the reference does)
        acc = tl.dot(a, tl.trans(w.to(a.dtype)), acc, input_precision=DOT_PRECISION)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_bn, mask=offs_bn < N, other=0.0).to(tl.float32)[None, :]
    c_ptrs = c_ptr + pid_s * stride_cs + offs_am[:, None] * stride_cm + offs_bn[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(offs_am[:, None] < M) & (offs_bn[None, :] < N))


@triton.jit
def _nf4_matmul_grad_kernel(
    # pointers
    a_ptr, packed_ptr, absmax_ptr, table_ptr, nested_code_ptr, nested_absmax_ptr, offset_ptr, c_ptr,
    # sizes
    M, N, K, N_PER_SPLIT,
    # strides
    stride_am, stride_an, stride_cs, stride_cm, stride_ck,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    NESTED_BLOCK_SIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, ALIGNED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """c[s] = g[:, slice s of N] @ W[slice s, :]; g (M, N), W (N, K) NF4. Reduces over N."""
    pid_mk = tl.program_id(0)
    pid_s = tl.program_id(1)
    num_pid_k = tl.cdiv(K, BLOCK_K)
    pid_m = pid_mk // num_pid_k
    pid_k = pid_mk % num_pid_k
    offs_am = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
    k0 = pid_k * BLOCK_K
    offs_ck = k0 + tl.arange(0, BLOCK_K)  # (BK,)

    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    n_start = pid_s * N_PER_SPLIT
    n_end = tl.minimum(n_start + N_PER_SPLIT, N)
    for n0 in range(n_start, n_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)  # (BN,)
        a = tl.load(
            a_ptr + offs_am[:, None] * stride_am + offs_n[None, :] * stride_an,
            mask=(offs_am[:, None] < M) & (offs_n[None, :] < n_end), other=0.0,
        )  # (BM, BN)
        w = _load_w_tile(
            packed_ptr, absmax_ptr, table_ptr, nested_code_ptr, nested_absmax_ptr, offset_ptr,
            offs_n, k0, n_end, K, BLOCK_N, BLOCK_K, BLOCK_SIZE, NESTED_BLOCK_SIZE, DOUBLE_QUANT, ALIGNED,
        )  # (BN, BK) float32
        acc = tl.dot(a, w.to(a.dtype), acc, input_precision=DOT_PRECISION)  # g @ dequant(W)

    c_ptrs = c_ptr + pid_s * stride_cs + offs_am[:, None] * stride_cm + offs_ck[None, :] * stride_ck
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(offs_am[:, None] < M) & (offs_ck[None, :] < K))


@triton.jit
def _splitk_reduce_kernel(
    ws_ptr, bias_ptr, c_ptr,
    M, N,
    SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """c = sum_s ws[s] (+ bias), cast; ws float32 (SPLIT, M, N) and c (M, N), both contiguous."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M * N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(SPLIT):
        acc += tl.load(ws_ptr + s * M * N + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(c_ptr + offs, acc.to(c_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- host side


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: any small number; only the split heuristic reads it


def _config(m: int, n_out: int, reduce: int, device: torch.device, grad: bool) -> dict[str, int]:
    """Tile sizes and split for an (m × reduce) @ (reduce × n_out) product. First guesses, see module doc.

    BLOCK_K = 128: a tile row is 64 contiguous packed bytes (two full 32-byte sectors per row, 16-byte
    loads per thread). BLOCK_N = 64 rows: 4 KiB of packed W per iteration, 8192 fp32 values = 64 registers
    a thread at 4 warps. BLOCK_M: the smallest tl.dot tile that covers m (16, 32, 64).
    """
    block_m = 16 if m <= 16 else (32 if m <= 32 else 64)
    cfg = {"BLOCK_M": block_m, "BLOCK_N": 64, "BLOCK_K": 128}
    # forward: the output tile is BLOCK_N wide and K is reduced BLOCK_K at a time; grad: the reverse
    tile_out, step = (cfg["BLOCK_K"], cfg["BLOCK_N"]) if grad else (cfg["BLOCK_N"], cfg["BLOCK_K"])
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n_out, tile_out)
    iters = triton.cdiv(reduce, step)
    split = 1
    target = _PROGRAMS_PER_SM * _num_sms(device)
    while tiles * split < target and iters // (2 * split) >= _MIN_ITERS_PER_SPLIT:
        split *= 2
    cfg["SPLIT"] = split
    return cfg


def _check_x(x: object, name: str, width: int, width_name: str, q: NF4Tensor) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16 or float32, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] != width:
        raise ValueError(
            f"{name} must have shape (..., {width_name}={width}) to match q.shape={tuple(q.shape)}, "
            f"got {tuple(x.shape)}"
        )
    if x.device != q.device:
        raise ValueError(f"{name} is on {x.device} but q is on {q.device}")
    check_device(x, name)
    return x


def _check_q2d(q: object) -> NF4Tensor:
    q = check_nf4(q)
    if len(q.shape) != 2:
        raise ValueError(f"q must be a 2-D weight (out_features, in_features), got shape {tuple(q.shape)}")
    return q


def _alloc(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Uninitialised output/workspace (tests replace this with a NaN-filled one to catch unwritten cells)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _launch_fused(a: torch.Tensor, q: NF4Tensor, bias: torch.Tensor | None, grad: bool,
                  cfg: dict[str, int] | None = None) -> torch.Tensor:  # fmt: skip
    """The fused kernel on a 2-D ``a``: forward ``a (M, K) -> (M, N)`` or grad ``a (M, N) -> (M, K)``."""
    n, k = q.shape
    m = a.shape[0]
    n_out, reduce = (k, n) if grad else (n, k)
    cfg = dict(cfg or _config(m, n_out, reduce, a.device, grad))
    bm, bn, bk, split = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["SPLIT"]
    step = bn if grad else bk
    per_split = triton.cdiv(triton.cdiv(reduce, step), split) * step
    split = triton.cdiv(reduce, per_split)  # slices actually used
    out = _alloc((m, n_out), a.dtype, a.device)
    c = out if split == 1 else _alloc((split, m, n_out), torch.float32, a.device)
    stride_cs = 0 if split == 1 else c.stride(0)
    nested_code, nested_absmax, offset, nested_bs = nested_args(q)
    meta = {
        "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "BLOCK_SIZE": q.block_size,
        "NESTED_BLOCK_SIZE": nested_bs, "DOUBLE_QUANT": q.double_quant,
        "ALIGNED": k % q.block_size == 0 and bk % q.block_size == 0,
        "DOT_PRECISION": "ieee" if a.dtype == torch.float32 else "tf32",
        "num_warps": 4, "num_stages": 3,
    }  # fmt: skip
    quant = (q.packed, q.absmax, pair_table(q.code), nested_code, nested_absmax, offset)
    if grad:
        grid = (triton.cdiv(m, bm) * triton.cdiv(k, bk), split)
        _nf4_matmul_grad_kernel[grid](
            a, *quant, c, m, n, k, per_split,
            a.stride(0), a.stride(1), stride_cs, c.stride(-2), c.stride(-1), **meta,
        )  # fmt: skip
    else:
        grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn), split)
        _nf4_matmul_kernel[grid](
            a, *quant, bias if bias is not None else a, c, m, n, k, per_split,
            a.stride(0), a.stride(1), stride_cs, c.stride(-2), c.stride(-1),
            HAS_BIAS=bias is not None and split == 1, **meta,
        )  # fmt: skip
    if split > 1:
        block = 1024
        _splitk_reduce_kernel[(triton.cdiv(m * n_out, block),)](
            c, bias if bias is not None else c, out, m, n_out,
            SPLIT=split, HAS_BIAS=bias is not None, BLOCK=block,
        )  # fmt: skip
    return out


def _use_fused(m: int, k: int) -> bool:
    # Odd K: rows do not start on a byte, which the tile loader needs; rare enough to take the other path.
    return m <= FUSED_MAX_M and k % 2 == 0


def nf4_matmul(x: torch.Tensor, q: NF4Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ dequant(q)ᵀ (+ bias)``, the forward of a linear layer whose weight is NF4 (QLoRA, §3).

    Args:
        x: ``(..., K)`` float16 / bfloat16 / float32, any strides.
        q: the NF4 weight of shape ``(N, K)`` (``out_features, in_features``), same device.
        bias: optional ``(N,)`` in ``x.dtype``.

    Returns:
        ``(..., N)`` in ``x.dtype`` (fp32 accumulation; the weight is rounded to ``x.dtype`` first).
    """
    q = _check_q2d(q)
    n, k = q.shape
    x = _check_x(x, "x", k, "in_features", q)
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if bias.shape != (n,) or bias.dtype != x.dtype or bias.device != x.device:
            raise ValueError(
                f"bias must have shape ({n},), dtype {x.dtype} and device {x.device}; got "
                f"{tuple(bias.shape)}, {bias.dtype}, {bias.device}"
            )
        bias = bias.contiguous()
    lead = x.shape[:-1]
    if lead.numel() == 0 or n == 0 or k == 0:  # nothing to reduce: the sum over K is empty, y = bias
        y = torch.zeros((*lead, n), dtype=x.dtype, device=x.device)
        return y if bias is None else y + bias
    a = x.reshape(-1, k)  # a view when it can be; strides are passed to the kernel
    if not _use_fused(a.shape[0], k):
        return F.linear(x, nf4_dequantize(q, x.dtype), bias)
    return _launch_fused(a, q, bias, grad=False).reshape(*lead, n)


def nf4_matmul_grad(grad_out: torch.Tensor, q: NF4Tensor) -> torch.Tensor:
    """``grad_out @ dequant(q)``: the input gradient of ``x @ Wᵀ`` for an NF4 weight ``W`` (N, K).

    Args:
        grad_out: ``(..., N)`` float16 / bfloat16 / float32, any strides.
        q: the NF4 weight of shape ``(N, K)``, same device.

    Returns:
        ``(..., K)`` in ``grad_out.dtype``.
    """
    q = _check_q2d(q)
    n, k = q.shape
    grad_out = _check_x(grad_out, "grad_out", n, "out_features", q)
    lead = grad_out.shape[:-1]
    if lead.numel() == 0 or n == 0 or k == 0:  # an empty product or an empty sum over N: zeros
        return torch.zeros((*lead, k), dtype=grad_out.dtype, device=grad_out.device)
    g = grad_out.reshape(-1, n)
    if not _use_fused(g.shape[0], k):
        return grad_out @ nf4_dequantize(q, grad_out.dtype)
    return _launch_fused(g, q, None, grad=True).reshape(*lead, k)
