"""The fused NF4 matmul kernels (``nf4_matmul_kernel``: ``x @ Wᵀ``, ``nf4_matmul_grad_kernel``: ``g @ W``) and
how they read and decode a ``(BLOCK_N, BLOCK_K)`` tile of an NF4 weight in registers. The launchers, and
why the kernels look as they do, are in ``nf4_gemm`` (module doc); the split-K reduction in ``splitk``.

``W`` is ``(N, K)`` row-major NF4 (``lora_core.quant.nf4``), its packed bytes viewed as int32 words of 8
codes each (little endian: element ``8w + 2j`` is byte ``j``'s high nibble, ``8w + 2j + 1`` its low one).
``w_tile_words`` loads a tile's words and scales, ``w_tile_decode`` turns them into the float32 tile
``code[nibble] * absmax``, exactly the values ``nf4_dequantize`` computes before its final rounding.
"""

from __future__ import annotations

import triton
import triton.language as tl
from lora_core.kernels.nf4_dequant import block_absmax
from lora_core.kernels.splitk import store_or_reduce

# ----------------------------------------------------------------------------- the tile


@triton.jit
def w_tile_words(
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
        absmax_ptr,
        nested_code_ptr,
        nested_absmax_ptr,
        offset_ptr,
        offs_gw >> word_shift,
        mask,
        nested_shift,
        DOUBLE_QUANT,
    )  # (BN, G)
    offs_word = offs_gw[:, :, None] + tl.arange(0, WG)[None, None, :]  # (BN, G, WG)
    word = tl.load(words_ptr + offs_word, mask=mask[:, :, None], other=0)
    return word, scale


@triton.jit
def code_times(word, shift, scale, code_ptr):
    """code[word >> shift & 15] * scale, elementwise: one nibble of every word, in the words' layout."""
    return tl.load(code_ptr + ((word >> shift) & 15)) * scale


@triton.jit
def w_tile_decode(word, scale, code_ptr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """(BN, G, WG) words and (BN, G) scales -> the float32 tile (BN, BLOCK_K): code[nibble] * scale.

    Element e of a word (byte e // 2, high nibble first) is decoded in the words' own register layout and
    the 8 results are interleaved into place (tl.interleave keeps values in their thread: no shuffle
    through shared memory). interleave(x, y) alternates x and y along the last axis, so the even
    elements (0, 2, 4, 6) and the odd ones are each interleaved the same way first.
    """
    s = scale[:, :, None]  # (BN, G, 1)
    v0 = code_times(word, 4, s, code_ptr)  # (BN, G, WG)
    v1 = code_times(word, 0, s, code_ptr)
    v2 = code_times(word, 12, s, code_ptr)
    v3 = code_times(word, 8, s, code_ptr)
    v4 = code_times(word, 20, s, code_ptr)
    v5 = code_times(word, 16, s, code_ptr)
    v6 = code_times(word, 28, s, code_ptr)
    v7 = code_times(word, 24, s, code_ptr)
    even = tl.interleave(tl.interleave(v0, v4), tl.interleave(v2, v6))  # (BN, G, 4 WG): 0 2 4 6 per word
    odd = tl.interleave(tl.interleave(v1, v5), tl.interleave(v3, v7))  # 1 3 5 7
    return tl.reshape(tl.interleave(even, odd), (BLOCK_N, BLOCK_K))  # (BN, G, GROUP) -> (BN, BK)


# ----------------------------------------------------------------------------- the kernels

# Sizes and strides are not specialised (no ==1 constants, no divisibility hints): one compiled kernel
# per constexpr configuration, whatever the shapes, so the compile gate can enumerate them all; a stride
# of 1 along K (contiguous x) and along N (c) is still a constant (16-byte vector loads of x).
_RUNTIME_INTS = ["M", "N", "K", "word_shift", "nested_shift", "stride_am", "stride_wn", "stride_cs",
                 "stride_cm"]  # fmt: skip


@triton.jit(do_not_specialize=[*_RUNTIME_INTS, "K_PER_SPLIT", "n_split", "has_bias"])
def nf4_matmul_kernel(
    # pointers
    a_ptr, words_ptr, absmax_ptr, code_ptr, nested_code_ptr, nested_absmax_ptr, offset_ptr,
    bias_ptr, c_ptr, ws_ptr, counter_ptr,
    # sizes
    M, N, K, K_PER_SPLIT, n_split, word_shift, nested_shift, has_bias,
    # strides
    stride_am, stride_ak, stride_wn, stride_cs, stride_cm, stride_cn,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr, A_ALIGNED: tl.constexpr,
):  # fmt: skip
    """c = a @ Wᵀ (+ bias if has_bias != 0); a (M, K), W (N, K) NF4, c (M, N) in a's dtype.

    Program (tile, s) sums over slice s of K; with n_split > 1 the slices meet in ws (n_split, M, N)
    float32 (c's strides) and counter[tile] (``splitk.store_or_reduce``).
    """
    pid_mn = tl.program_id(0)
    pid_s = tl.program_id(1)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pid_m = pid_mn // num_pid_n
    pid_n = pid_mn % num_pid_n
    offs_am = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
    offs_bn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)

    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # transposed: W is the tensor cores' A operand
    # K_PER_SPLIT is a multiple of BLOCK_K and K of 8 (the launcher's): written so, the compiler knows that
    # the mask of x's loads is constant over 8 elements (16-byte loads; sizes are not specialised)
    k_per_split = K_PER_SPLIT // BLOCK_K * BLOCK_K
    k_start = pid_s * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K // 8 * 8)
    if A_ALIGNED:  # x's rows start on multiples of 8 elements (launcher): say so, the same way
        stride_am = stride_am // 8 * 8
    word, scale = w_tile_words(
        words_ptr, absmax_ptr, nested_code_ptr, nested_absmax_ptr, offset_ptr,
        offs_bn, k_start, N, k_end, stride_wn, word_shift, nested_shift,
        BLOCK_K, GROUP, DOUBLE_QUANT,
    )  # fmt: skip
    for k0 in range(k_start, k_end, BLOCK_K):
        # the next tile's words are loaded into registers while this one is decoded and multiplied
        next_word, next_scale = w_tile_words(
            words_ptr, absmax_ptr, nested_code_ptr, nested_absmax_ptr, offset_ptr,
            offs_bn, k0 + BLOCK_K, N, k_end, stride_wn, word_shift, nested_shift,
            BLOCK_K, GROUP, DOUBLE_QUANT,
        )  # fmt: skip
        offs_k = k0 + tl.arange(0, BLOCK_K)  # (BK,)
        a = tl.load(
            a_ptr + offs_am[:, None] * stride_am + offs_k[None, :] * stride_ak,
            mask=(offs_am[:, None] < M) & (offs_k[None, :] < k_end),
            other=0.0,
        )  # (BM, BK)
        w = w_tile_decode(word, scale, code_ptr, BLOCK_N, BLOCK_K)  # (BN, BK) float32
        # accᵀ += dequant(W) @ xᵀ, W rounded to x's dtype first (as the reference does)
        acc = tl.dot(w.to(a.dtype), tl.trans(a), acc)
        word, scale = next_word, next_scale

    # run-time branches (bias or not, split or not): one compiled kernel for all four
    offs_c = offs_bn[:, None] * stride_cn + offs_am[None, :] * stride_cm  # (BN, BM): c's element (m, n)
    mask_c = (offs_bn[:, None] < N) & (offs_am[None, :] < M)
    acc, last = store_or_reduce(acc, ws_ptr, counter_ptr, offs_c, mask_c, pid_mn, pid_s, n_split, stride_cs)
    if last:  # the whole sum over K is in acc (no split, or the last of the tile's programs)
        if has_bias != 0:
            acc += tl.load(bias_ptr + offs_bn, mask=offs_bn < N, other=0.0).to(tl.float32)[:, None]
        tl.store(c_ptr + offs_c, acc.to(c_ptr.dtype.element_ty), mask=mask_c)


@triton.jit(do_not_specialize=[*_RUNTIME_INTS, "N_PER_SPLIT", "n_split"])
def nf4_matmul_grad_kernel(
    # pointers
    a_ptr, words_ptr, absmax_ptr, code_ptr, nested_code_ptr, nested_absmax_ptr, offset_ptr, c_ptr, ws_ptr,
    counter_ptr,
    # sizes
    M, N, K, N_PER_SPLIT, n_split, word_shift, nested_shift,
    # strides
    stride_am, stride_an, stride_wn, stride_cs, stride_cm, stride_ck,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
):  # fmt: skip
    """c = g @ W; g (M, N), W (N, K) NF4, c (M, K). Split over N as the forward kernel splits over K."""
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
    word, scale = w_tile_words(
        words_ptr, absmax_ptr, nested_code_ptr, nested_absmax_ptr, offset_ptr,
        n_start + tl.arange(0, BLOCK_N), k0, n_end, K, stride_wn, word_shift,
        nested_shift, BLOCK_K, GROUP, DOUBLE_QUANT,
    )  # fmt: skip
    for n0 in range(n_start, n_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)  # (BN,)
        next_word, next_scale = w_tile_words(
            words_ptr, absmax_ptr, nested_code_ptr, nested_absmax_ptr, offset_ptr,
            offs_n + BLOCK_N, k0, n_end, K, stride_wn, word_shift, nested_shift,
            BLOCK_K, GROUP, DOUBLE_QUANT,
        )  # fmt: skip
        a = tl.load(
            a_ptr + offs_am[:, None] * stride_am + offs_n[None, :] * stride_an,
            mask=(offs_am[:, None] < M) & (offs_n[None, :] < n_end),
            other=0.0,
        )  # (BM, BN)
        w = w_tile_decode(word, scale, code_ptr, BLOCK_N, BLOCK_K)  # (BN, BK) float32
        acc = tl.dot(a, w.to(a.dtype), acc)  # g @ dequant(W)
        word, scale = next_word, next_scale

    offs_c = offs_am[:, None] * stride_cm + offs_ck[None, :] * stride_ck  # (BM, BK)
    mask_c = (offs_am[:, None] < M) & (offs_ck[None, :] < K)
    acc, last = store_or_reduce(acc, ws_ptr, counter_ptr, offs_c, mask_c, pid_mk, pid_s, n_split, stride_cs)
    if last:
        tl.store(c_ptr + offs_c, acc.to(c_ptr.dtype.element_ty), mask=mask_c)
