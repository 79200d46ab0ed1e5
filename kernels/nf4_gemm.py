"""Matrix products with an NF4 weight: ``x @ Wᵀ (+ bias)`` (forward) and ``g @ W`` (what backward needs).

``W`` is ``(N, K)`` (``out_features, in_features``) stored as NF4 (see ``lora_core.quant.nf4``); ``x`` is
``(..., K)``, ``g`` is ``(..., N)``. Two strategies, picked by the number of rows ``M`` of ``x``:

**Small M (decode, M ≤ FUSED_MAX_M = 16, fp16/bf16, K % 8 == 0): a fused split-K kernel.** The product is
bound by reading ``W``. Reading it packed (0.52 byte/param with double quantization) instead of as bf16
(2 bytes/param) is a 3.9× smaller floor, so each program dequantizes a ``(BLOCK_N, BLOCK_K)`` tile of
``W`` in registers and feeds it straight to ``tl.dot``; ``W`` never exists in memory as bf16::

    grid = (M tiles × N tiles, SPLIT_K)          program (tile, s) sums k over its slice of K:
    words = packed.view(int32)[tile k0]                                  # (BLOCK_N, BLOCK_K / 8) words
    for k0 in slice s, step BLOCK_K:
        next = packed.view(int32)[tile k0 + BLOCK_K]                     # loads in flight during the math
        a   = x[offs_m, k0:k0+BLOCK_K]                                   # (BLOCK_M, BLOCK_K)
        w   = (code[words >> shift & 15] * absmax).to(x.dtype)           # (BLOCK_N, BLOCK_K)
        accᵀ += w @ aᵀ                                                   # tensor cores, fp32 acc
        words = next
    SPLIT_K == 1: out = (acc + bias).to(x.dtype)
    SPLIT_K  > 1: ws[s] = acc; a second tiny kernel sums the SPLIT_K partials, adds bias, casts.

  With M ≤ 16 the tensor-core tile is mostly padding (BLOCK_M = 16 is tl.dot's minimum) but costs little:
  the multiply-adds are ~1% of the time the bytes take; what costs is the dequantization arithmetic. A
  tile row is read as 32-bit words (8 codes each); each nibble is a shift and a mask, and its value one
  load from the 16-entry code table (64 bytes: one L1 wavefront per warp). Each of a word's 8 nibbles is
  decoded in the words' register layout and ``tl.interleave`` puts them in order without moving them
  between threads; the forward kernel computes ``accᵀ = W @ xᵀ`` so the decoded tile is the tensor cores'
  A operand (with ``x @ Wᵀ`` it was the transposed B operand and went through a shared-memory shuffle).
  Each scale is loaded once per ``GROUP`` (64) elements, or once per word when K is ragged
  (``scale_group``). The kernel prefetches the next tile's words into registers itself (``num_stages=1``):
  Triton's pipeliner would otherwise turn the data-dependent code-table loads into per-element
  asynchronous copies through shared memory.
  Split-K exists because at M = 1 an 8192-wide output only makes 8192 / BLOCK_N = 128 tiles — one per SM,
  far too few loads in flight to saturate HBM. The heuristic splits K until there are about
  ``_PROGRAMS_PER_SM`` programs per SM, keeping at least ``_MIN_ITERS_PER_SPLIT`` tiles per slice so the
  partial sums (``SPLIT_K·M·N·4`` bytes) stay negligible next to ``W``.

  Bit-exactness: the weight is ``(code * absmax).to(x.dtype)`` exactly as ``nf4_dequantize`` gives it;
  the kernels are compiled with FP fusion off so that the double-quantized absmax
  (``nested_code * nested_absmax + offset``) rounds twice, as the reference does, not once in an FMA.

**Otherwise: dequantize, then cuBLAS.** Large M (prefill / training) is bound by the tensor cores
(2·M·N·K flops); a bf16 copy of ``W`` costs one streaming pass (``nf4_dequantize``, ~57 µs for 8192² at
H100 copy bandwidth) next to ~705 µs of cuBLAS at M = 4096, i.e. ≤ 1.10× cuBLAS. fp32 activations take
this path too (a fused fp32 kernel spilled 3–25 KB per thread), and so do K % 8 != 0 (rows that do not
start on a packed word) and 16 < M ≤ 64 (a BLOCK_M = 64 tile spills; see ``BLOCK_MS``). The cross-over
``FUSED_MAX_M`` is to be read off ``lora-core bench``'s M sweep, which times both strategies at every M.

The backward product ``g @ W`` reduces over N (the rows of W) instead of K, with the same tile loader.
Every configuration these launchers can choose is compiled for sm_80 and sm_90a by the compile gate
(``compile_check``, ``tests/test_kernels_compile.py``): no spills, shared memory within each limit.
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
    log2,
    nf4_dequantize,
    packed_words,
    scale_args,
)

from lora_core.quant.nf4 import NF4Tensor

_PROGRAMS_PER_SM = 4  # ~4 resident programs per SM keep enough 16-byte loads in flight
_MIN_ITERS_PER_SPLIT = 4  # a K slice spans at least this many BLOCK_K tiles
# The BLOCK_M tiles _config picks from (tl.dot's minimum is 16). A BLOCK_M = 64 tile of this kernel needs
# 255 registers and spills on sm_80 and sm_90 (the compile gate), so M > 16 takes dequantize + cuBLAS.
BLOCK_MS = (16,)
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_FUSED_DTYPES = (torch.float16, torch.bfloat16)  # fp32 activations: dequantize + cuBLAS (module doc)


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _w_tile_words(
    words_ptr, absmax_ptr, nested_code_ptr, nested_absmax_ptr, offset_ptr,
    offs_n, k0, n_limit, k_limit, stride_wn, word_shift, nested_shift,
    BLOCK_K: tl.constexpr, GROUP: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
):  # fmt: skip
    """The packed words of ``W[offs_n, k0:k0+BLOCK_K]`` and their scales, 0 outside ``(n_limit, k_limit)``.

    Returns ``word`` (BN, BLOCK_K // GROUP, GROUP // 8) int32 (8 codes each) and ``scale`` (BN, BLOCK_K //
    GROUP) float32. GROUP elements share one scale: ``K % GROUP == 0`` and GROUP divides the block size
    (or is 8, one word: a block holds ≥ 16 elements and words start at multiples of 8 when ``K % 8 == 0``).
    """
    G: tl.constexpr = BLOCK_K // GROUP  # scale groups per tile row
    WG: tl.constexpr = GROUP // 8  # words per group
    offs_g = k0 + tl.arange(0, G) * GROUP  # (G,) first column of each group
    mask = (offs_n[:, None] < n_limit) & (offs_g[None, :] < k_limit)  # (BN, G)
    # first word of each group: (n * K + k) / 8
    offs_gw = offs_n[:, None].to(tl.int64) * stride_wn + (offs_g // 8)[None, :]  # (BN, G)
    scale = block_absmax(
        absmax_ptr, nested_code_ptr, nested_absmax_ptr, offset_ptr, offs_gw >> word_shift, mask,
        nested_shift, DOUBLE_QUANT,
    )  # (BN, G)
    offs_word = offs_gw[:, :, None] + tl.arange(0, WG)[None, None, :]  # (BN, G, WG)
    word = tl.load(words_ptr + offs_word, mask=mask[:, :, None], other=0)
    return word, scale


@triton.jit
def _code_times(word, shift, scale, code_ptr):
    """code[word >> shift & 15] * scale, elementwise: one nibble of every word, in the words' layout."""
    return tl.load(code_ptr + ((word >> shift) & 15)) * scale


@triton.jit
def _w_tile_decode(word, scale, code_ptr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """(BN, G, WG) words and (BN, G) scales -> the float32 tile (BN, BLOCK_K): code[nibble] * scale.

    Element e of a word (byte e // 2, high nibble first) is decoded in the words' own register layout and
    the 8 results are interleaved into place (tl.interleave keeps values in their thread: no shuffle
    through shared memory). interleave(x, y) alternates x and y along the last axis, so the even
    elements (0, 2, 4, 6) and the odd ones are each interleaved the same way first.
    """
    s = scale[:, :, None]  # (BN, G, 1)
    v0 = _code_times(word, 4, s, code_ptr)  # (BN, G, WG)
    v1 = _code_times(word, 0, s, code_ptr)
    v2 = _code_times(word, 12, s, code_ptr)
    v3 = _code_times(word, 8, s, code_ptr)
    v4 = _code_times(word, 20, s, code_ptr)
    v5 = _code_times(word, 16, s, code_ptr)
    v6 = _code_times(word, 28, s, code_ptr)
    v7 = _code_times(word, 24, s, code_ptr)
    even = tl.interleave(tl.interleave(v0, v4), tl.interleave(v2, v6))  # (BN, G, 4 WG): 0 2 4 6 per word
    odd = tl.interleave(tl.interleave(v1, v5), tl.interleave(v3, v7))  # 1 3 5 7
    return tl.reshape(tl.interleave(even, odd), (BLOCK_N, BLOCK_K))  # (BN, G, GROUP) -> (BN, BK)


# Sizes and strides are not specialised (no ==1 constants, no divisibility hints): one compiled kernel
# per constexpr configuration, whatever the shapes, so the compile gate can enumerate them all; a stride
# of 1 along K (contiguous x) and along N (c) is still a constant (16-byte vector loads of x).
_RUNTIME_INTS = ["M", "N", "K", "word_shift", "nested_shift", "stride_am", "stride_wn", "stride_cs",
                 "stride_cm"]  # fmt: skip


@triton.jit(do_not_specialize=[*_RUNTIME_INTS, "K_PER_SPLIT", "n_split", "has_bias"])
def _nf4_matmul_kernel(
    # pointers
    a_ptr, words_ptr, absmax_ptr, code_ptr, nested_code_ptr, nested_absmax_ptr, offset_ptr,
    bias_ptr, c_ptr, ws_ptr,
    # sizes
    M, N, K, K_PER_SPLIT, n_split, word_shift, nested_shift, has_bias,
    # strides
    stride_am, stride_ak, stride_wn, stride_cs, stride_cm, stride_cn,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
):  # fmt: skip
    """c = a @ Wᵀ (+ bias if has_bias != 0) when n_split == 1, else ws[s] = a[:, slice s] @ W[:, slice s]ᵀ.

    a (M, K), W (N, K) NF4, slices of K; c (M, N) in a's dtype, ws (n_split, M, N) float32 (c's strides).
    """
    pid_mn = tl.program_id(0)
    pid_s = tl.program_id(1)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pid_m = pid_mn // num_pid_n
    pid_n = pid_mn % num_pid_n
    offs_am = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
    offs_bn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)

    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # transposed: W is the tensor cores' A operand
    k_start = pid_s * K_PER_SPLIT
    k_end = tl.minimum(k_start + K_PER_SPLIT, K)
    word, scale = _w_tile_words(
        words_ptr, absmax_ptr, nested_code_ptr, nested_absmax_ptr, offset_ptr,
        offs_bn, k_start, N, k_end, stride_wn, word_shift, nested_shift,
        BLOCK_K, GROUP, DOUBLE_QUANT,
    )  # fmt: skip
    for k0 in range(k_start, k_end, BLOCK_K):
        # the next tile's words are loaded into registers while this one is decoded and multiplied
        next_word, next_scale = _w_tile_words(
            words_ptr, absmax_ptr, nested_code_ptr, nested_absmax_ptr, offset_ptr,
            offs_bn, k0 + BLOCK_K, N, k_end, stride_wn, word_shift, nested_shift,
            BLOCK_K, GROUP, DOUBLE_QUANT,
        )  # fmt: skip
        offs_k = k0 + tl.arange(0, BLOCK_K)  # (BK,)
        a = tl.load(
            a_ptr + offs_am[:, None] * stride_am + offs_k[None, :] * stride_ak,
            mask=(offs_am[:, None] < M) & (offs_k[None, :] < k_end), other=0.0,
        )  # (BM, BK)
        w = _w_tile_decode(word, scale, code_ptr, BLOCK_N, BLOCK_K)  # (BN, BK) float32
        # accᵀ += dequant(W) @ xᵀ, W rounded to x's dtype first (as the reference does)
        acc = tl.dot(w.to(a.dtype), tl.trans(a), acc)
        word, scale = next_word, next_scale

    # run-time branches (bias or not, split or not): one compiled kernel for all four
    offs_c = offs_bn[:, None] * stride_cn + offs_am[None, :] * stride_cm  # (BN, BM): c's element (m, n)
    mask_c = (offs_bn[:, None] < N) & (offs_am[None, :] < M)
    if n_split > 1:
        tl.store(ws_ptr + pid_s * stride_cs + offs_c, acc, mask=mask_c)
    else:
        if has_bias != 0:
            acc += tl.load(bias_ptr + offs_bn, mask=offs_bn < N, other=0.0).to(tl.float32)[:, None]
        tl.store(c_ptr + offs_c, acc.to(c_ptr.dtype.element_ty), mask=mask_c)


@triton.jit(do_not_specialize=[*_RUNTIME_INTS, "N_PER_SPLIT", "n_split"])
def _nf4_matmul_grad_kernel(
    # pointers
    a_ptr, words_ptr, absmax_ptr, code_ptr, nested_code_ptr, nested_absmax_ptr, offset_ptr, c_ptr, ws_ptr,
    # sizes
    M, N, K, N_PER_SPLIT, n_split, word_shift, nested_shift,
    # strides
    stride_am, stride_an, stride_wn, stride_cs, stride_cm, stride_ck,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
):  # fmt: skip
    """c = g @ W if n_split == 1, else ws[s] = g[:, slice s of N] @ W[slice s, :]; g (M, N), W (N, K) NF4."""
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
    word, scale = _w_tile_words(
        words_ptr, absmax_ptr, nested_code_ptr, nested_absmax_ptr, offset_ptr,
        n_start + tl.arange(0, BLOCK_N), k0, n_end, K, stride_wn, word_shift,
        nested_shift, BLOCK_K, GROUP, DOUBLE_QUANT,
    )  # fmt: skip
    for n0 in range(n_start, n_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)  # (BN,)
        next_word, next_scale = _w_tile_words(
            words_ptr, absmax_ptr, nested_code_ptr, nested_absmax_ptr, offset_ptr,
            offs_n + BLOCK_N, k0, n_end, K, stride_wn, word_shift, nested_shift,
            BLOCK_K, GROUP, DOUBLE_QUANT,
        )  # fmt: skip
        a = tl.load(
            a_ptr + offs_am[:, None] * stride_am + offs_n[None, :] * stride_an,
            mask=(offs_am[:, None] < M) & (offs_n[None, :] < n_end), other=0.0,
        )  # (BM, BN)
        w = _w_tile_decode(word, scale, code_ptr, BLOCK_N, BLOCK_K)  # (BN, BK) float32
        acc = tl.dot(a, w.to(a.dtype), acc)  # g @ dequant(W)
        word, scale = next_word, next_scale

    offs_c = offs_am[:, None] * stride_cm + offs_ck[None, :] * stride_ck  # (BM, BK)
    mask_c = (offs_am[:, None] < M) & (offs_ck[None, :] < K)
    if n_split > 1:  # a run-time branch, as in the forward kernel
        tl.store(ws_ptr + pid_s * stride_cs + offs_c, acc, mask=mask_c)
    else:
        tl.store(c_ptr + offs_c, acc.to(c_ptr.dtype.element_ty), mask=mask_c)


@triton.jit(do_not_specialize=["M", "N", "SPLIT", "has_bias"])
def _splitk_reduce_kernel(
    ws_ptr, bias_ptr, c_ptr,
    M, N, SPLIT, has_bias,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """c = sum_s ws[s] (+ bias), cast; ws float32 (SPLIT, M, N) and c (M, N), both contiguous."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M * N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(SPLIT):  # a run-time loop: one compiled kernel for every split
        acc += tl.load(ws_ptr + s * M * N + offs, mask=mask, other=0.0)
    if has_bias != 0:
        acc += tl.load(bias_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(c_ptr + offs, acc.to(c_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- host side


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: any small number; only the split heuristic reads it


def _config(m: int, n_out: int, reduce: int, device: torch.device, grad: bool,
            word_scales: bool = False) -> dict[str, int]:  # fmt: skip
    """Tile sizes and split for an (m × reduce) @ (reduce × n_out) product. First guesses, see module doc.

    BLOCK_K = 128: a tile row is 16 contiguous packed words (64 bytes: two full 32-byte sectors per row,
    16-byte loads per thread). BLOCK_N = 64 rows: 4 KiB of packed W per iteration, 8192 fp32 values = 64
    registers a thread at 4 warps. BLOCK_M: the smallest tl.dot tile in ``BLOCK_MS`` that covers m.
    ``word_scales`` (one scale per word: ragged K, blocks of 16/32): BLOCK_K = 64, since with 128 the
    per-word scales push the forward kernel with double quantization to 255 registers and spills on sm_90.
    """
    block_m = next(b for b in BLOCK_MS if m <= b) if m <= BLOCK_MS[-1] else BLOCK_MS[-1]
    cfg = {"BLOCK_M": block_m, "BLOCK_N": 64, "BLOCK_K": 64 if word_scales else 128}
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


def scale_group(k: int, block_k: int, block_size: int) -> int:
    """Elements of a tile row that share one scale (the kernels' GROUP): ``min(BLOCK_K, 64)`` when it
    divides both K and the block size (every group then lies in one block: QLoRA's 64-blocks), else 8,
    one word (ragged K, block sizes 16 and 32). Two values only: each is another compiled kernel."""
    group = min(block_k, 64)
    return group if k % group == 0 and block_size % group == 0 else 8


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
    """The fused kernel on a 2-D ``a``: forward ``a (M, K) -> (M, N)`` or grad ``a (M, N) -> (M, K)``.

    Needs ``K % 8 == 0`` (rows start on a packed word) and ``a`` in float16/bfloat16.
    """
    n, k = q.shape
    m = a.shape[0]
    n_out, reduce = (k, n) if grad else (n, k)
    cfg = dict(cfg or _config(m, n_out, reduce, a.device, grad, scale_group(k, 128, q.block_size) == 8))
    bm, bn, bk, split = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["SPLIT"]
    step = bn if grad else bk
    per_split = triton.cdiv(triton.cdiv(reduce, step), split) * step
    split = triton.cdiv(reduce, per_split)  # slices actually used
    out = _alloc((m, n_out), a.dtype, a.device)
    # the split-K partial sums (float32); with no split an empty tensor stands in (never written)
    ws = _alloc((split, m, n_out), torch.float32, a.device) if split > 1 else out.new_empty(0).float()
    nested_code, nested_absmax, offset, nested_shift = scale_args(q)
    sizes = (m, n, k, per_split, split, log2(q.block_size) - 3, nested_shift)  # + has_bias (forward)
    strides = (a.stride(0), a.stride(1), k // 8, m * n_out, out.stride(0), out.stride(1))  # ws: out's + s
    meta = {
        "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP": scale_group(k, bk, q.block_size),
        "DOUBLE_QUANT": q.double_quant, "num_warps": cfg.get("num_warps", 4),
        "num_stages": 1,  # the kernels prefetch the next words into registers themselves (module doc)
        "enable_fp_fusion": False,  # the scales round as the reference's (nf4_dequant's module doc)
    }  # fmt: skip
    quant = (packed_words(q.packed), q.absmax, q.code.reshape(16), nested_code, nested_absmax, offset)
    if grad:
        grid = (triton.cdiv(m, bm) * triton.cdiv(k, bk), split)
        _nf4_matmul_grad_kernel[grid](a, *quant, out, ws, *sizes, *strides, **meta)
    else:
        grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn), split)
        _nf4_matmul_kernel[grid](
            a, *quant, bias if bias is not None else a, out, ws, *sizes, int(bias is not None),
            *strides, **meta,
        )  # fmt: skip
    if split > 1:
        block = 1024
        _splitk_reduce_kernel[(triton.cdiv(m * n_out, block),)](
            ws, bias if bias is not None else out, out, m, n_out, split, int(bias is not None),
            BLOCK=block, enable_fp_fusion=False,
        )  # fmt: skip
    return out


def nf4_matmul_fused(a: torch.Tensor, q: NF4Tensor, *, grad: bool = False) -> torch.Tensor:
    """The fused kernel alone, whatever M: ``a (M, K) @ dequant(q)ᵀ`` or, with ``grad``, ``a (M, N) @
    dequant(q)``. For benchmarks that time both strategies at every M (``lora-core bench kernels``);
    `nf4_matmul` / `nf4_matmul_grad` choose between them. ``a``: 2-D float16/bfloat16, ``K % 8 == 0``."""
    q = _check_q2d(q)
    n, k = q.shape
    a = _check_x(a, "a", n if grad else k, "out_features" if grad else "in_features", q)
    if a.dim() != 2 or a.dtype not in _FUSED_DTYPES or k % 8:
        raise ValueError(f"the fused kernel needs a 2-D float16/bfloat16 a and K % 8 == 0, got "
                         f"{tuple(a.shape)} {a.dtype}, K = {k}")  # fmt: skip
    return _launch_fused(a, q, None, grad)


def _use_fused(m: int, k: int, dtype: torch.dtype) -> bool:
    """The fused kernels take M ≤ FUSED_MAX_M rows of fp16/bf16 with ``K % 8 == 0``. Otherwise (many rows,
    fp32 activations, or rows that do not start on a packed word) dequantize + cuBLAS (module doc)."""
    return m <= FUSED_MAX_M and k % 8 == 0 and dtype in _FUSED_DTYPES


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
    if not _use_fused(a.shape[0], k, x.dtype):
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
    if not _use_fused(g.shape[0], k, grad_out.dtype):
        return F.linear(grad_out, nf4_dequantize(q, grad_out.dtype).T)  # = grad_out @ W
    return _launch_fused(g, q, None, grad=True).reshape(*lead, k)
