"""Reading and decoding a ``(BLOCK_N, BLOCK_K)`` tile of an NF4 weight in registers, for the matmul kernels.

``W`` is ``(N, K)`` row-major NF4 (``lora_core.quant.nf4``), its packed bytes viewed as int32 words of 8
codes each (little endian: element ``8w + 2j`` is byte ``j``'s high nibble, ``8w + 2j + 1`` its low one).
``w_tile_words`` loads a tile's words and scales, ``w_tile_decode`` turns them into the float32 tile
``code[nibble] * absmax``, exactly the values ``nf4_dequantize`` computes before its final rounding.
"""

from __future__ import annotations

import triton
import triton.language as tl
from lora_core.kernels.nf4_dequant import block_absmax


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
        absmax_ptr, nested_code_ptr, nested_absmax_ptr, offset_ptr, offs_gw >> word_shift, mask,
        nested_shift, DOUBLE_QUANT,
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
