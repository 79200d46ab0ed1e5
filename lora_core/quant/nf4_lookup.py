"""NF4 dequantization off the GPU: one table lookup per packed byte, bit-identical to `nf4_dequantize_ref`.

The reference (``lora_core.quant.nf4``) unpacks the nibbles into a uint8 tensor, widens them to int64
indices, gathers one float32 code per element and repeats every block scale over its block: about seven
passes over n-element temporaries, most of a QLoRA step's non-GEMM time on a CPU. Here each packed byte
indexes a 256-entry table of code *pairs*, so one gather writes both elements of the byte, in order::

    byte b = (hi << 4) | lo   ──►   pair[b] = (code[hi], code[lo])     two float32, stored as one int64

    packed (n/2,) uint8 ─int32─► index_select(pair (256,) int64) ─view float32─► codes (n,)   = code[nibble]
    codes ─view (nb, block)─► ×= absmax_f32 (nb, 1)   in place                  ─► W = q.shape

The table holds the float32 bit patterns as int64 words, so the gather is a plain 8-byte copy (no float
arithmetic that could touch a bit), and the high nibble lands first, as bitsandbytes packs it. Every
element is then ``code[nibble] * absmax_f32[block]`` — one float32 multiplication, exactly the reference's
— and one rounding to ``dtype``: the result equals the reference bit for bit (tests/test_nf4_lookup.py).

Cost: an (n/2,) int32 index, the gather and one in-place multiply over the output itself (float32), or a
multiply into a float32 buffer and one cast (other dtypes). Nothing is cached between calls (the 2 KiB
pair table is rebuilt from ``q.code`` each time): a dequantized weight lives as long as the caller keeps it.
"""

from __future__ import annotations

import torch

from lora_core.quant.nf4 import NF4Tensor, nf4_block_scales


def pair_table(code: torch.Tensor) -> torch.Tensor:  # (16,) float32 -> (256,) int64
    """``pair[b]`` = the float32 pair ``(code[b >> 4], code[b & 15])`` as one 64-bit word (4 KiB; built per
    call from the weight's own table, on its device, so nothing is cached)."""
    pairs = torch.stack([code.repeat_interleave(16), code.repeat(16)], dim=1)  # (256, 2): [hi, lo]
    return pairs.contiguous().view(torch.int64).reshape(256)


def nf4_dequantize_lookup(q: NF4Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``q`` as a dense tensor of ``q.shape`` in ``dtype``, bit-identical to ``nf4_dequantize_ref(q, dtype)``
    (module docstring), in about three passes instead of seven. Any device; any 16-entry float32 ``q.code``
    (the table a checkpoint carries is the one used, as in the reference)."""
    n, block = q.numel, q.block_size
    if n == 0:
        return torch.empty(q.shape, dtype=dtype, device=q.device)
    index = q.packed.reshape(-1).to(torch.int32)  # (ceil(n/2),)
    codes = torch.index_select(pair_table(q.code.float()), 0, index).view(torch.float32)  # (2·ceil(n/2),)
    del index
    scales = nf4_block_scales(q)  # (nb,) float32
    out = codes if dtype == torch.float32 else torch.empty_like(codes)
    full = n - n % block  # elements in whole blocks; the last block may be partial
    nb_full = full // block
    if full:
        torch.mul(
            codes[:full].view(nb_full, block), scales[:nb_full, None], out=out[:full].view(nb_full, block)
        )
    if full < n:
        torch.mul(codes[full:n], scales[nb_full], out=out[full:n])
    if dtype != torch.float32:
        out = out[:n].to(dtype)  # one rounding, as the reference's (code · absmax).to(dtype)
    return out[:n].view(q.shape)


__all__ = ["nf4_dequantize_lookup", "pair_table"]
