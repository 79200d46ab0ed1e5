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
multiply into a float32 buffer and one cast (other dtypes). The per-block scales of a double-quantized
weight are undone in place too (``nested_code[absmax] · nested_absmax + offset``: a gather, then one
multiply and one add over (nb/256, 256) views, the reference's two roundings), not through
``nf4_block_scales``' four (nb,) temporaries. On a CPU the gather is single-threaded (≈ 0.6 ns per byte,
60 % of the call for SmolLM2's 576 × 1536 weights); the rest was small-op overhead, which matters because
a QLoRA step dequantizes every weight twice (forward and backward): 420 calls per step for SmolLM2.

On a CPU with AVX-512 or AVX2 and a C compiler, ``nf4_native`` does the lookup and the multiply in one pass
(16 or 8 codes at once; the same bits): the torch path below is what runs everywhere else.

Nothing derived from a weight is cached between calls: a dequantized weight lives as long as the caller
keeps it. Only the 2 KiB pair table of a CPU code table is kept, keyed by the 16 codes' bytes (every NF4
weight holds the same table, so there is one entry; a checkpoint with its own table gets its own).
"""

from __future__ import annotations

import ctypes

import torch

from lora_core.quant import nf4_native
from lora_core.quant.nf4 import NF4Tensor, nf4_block_scales


def pair_table(code: torch.Tensor) -> torch.Tensor:  # (16,) float32 -> (256,) int64
    """``pair[b]`` = the float32 pair ``(code[b >> 4], code[b & 15])`` as one 64-bit word (4 KiB; built per
    call from the weight's own table, on its device, so nothing is cached)."""
    pairs = torch.stack([code.repeat_interleave(16), code.repeat(16)], dim=1)  # (256, 2): [hi, lo]
    return pairs.contiguous().view(torch.int64).reshape(256)


_PAIRS: dict[bytes, torch.Tensor] = {}  # CPU pair tables by the 16 codes' float32 bytes
_MAX_PAIRS = 64  # distinct code tables kept (one in practice); the dict is emptied beyond that


def _pairs(code: torch.Tensor) -> torch.Tensor:  # (16,) float32 -> (256,) int64, cached on a CPU
    if code.device.type != "cpu":
        return pair_table(code)  # reading the codes back would synchronise the device
    key = code.contiguous().numpy().tobytes()
    table = _PAIRS.get(key)
    if table is None:
        if len(_PAIRS) >= _MAX_PAIRS:
            _PAIRS.clear()
        table = _PAIRS[key] = pair_table(code)
    return table


def _block_scales(q: NF4Tensor) -> torch.Tensor:  # (nb,) float32, = nf4_block_scales(q) bit for bit
    """The per-block absmax, undoing double quantization in place: ``nested_code[absmax]`` (one gather),
    then ``× nested_absmax`` and ``+ offset`` over (nb/256, 256) views (the reference's two roundings)."""
    if not q.double_quant:
        return nf4_block_scales(q)
    nested = q.nested_block_size
    assert q.nested_code is not None and q.offset is not None and nested is not None
    nb = q.absmax.numel()
    scales = torch.index_select(q.nested_code.float(), 0, q.absmax.reshape(-1).to(torch.int32))  # (nb,)
    full = nb - nb % nested
    if full:
        scales[:full].view(-1, nested).mul_(q.nested_absmax[: full // nested, None])
    if full < nb:
        scales[full:].mul_(q.nested_absmax[full // nested])
    return scales.add_(q.offset)


def nf4_dequantize_lookup(
    q: NF4Tensor, dtype: torch.dtype, *, native: bool | ctypes.CDLL = True
) -> torch.Tensor:
    """``q`` as a dense tensor of ``q.shape`` in ``dtype``, bit-identical to ``nf4_dequantize_ref(q, dtype)``
    (module docstring), in about three passes instead of seven. Any device; any 16-entry float32 ``q.code``
    (the table a checkpoint carries is the one used, as in the reference).

    ``native``: True uses ``nf4_native``'s SIMD build for a CPU tensor where it exists, False always the
    torch gather; a library from ``nf4_native.build`` is used as given (tests build the scalar C too)."""
    n, block = q.numel, q.block_size
    if n == 0:
        return torch.empty(q.shape, dtype=dtype, device=q.device)
    lib = None
    if q.device.type == "cpu" and block % 2 == 0:  # (a CUDA tensor never builds the C)
        lib = nf4_native.library() if native is True else (native or None)
    if lib is not None:
        out = torch.empty(n, dtype=torch.float32)  # one pass: lookup and multiply (nf4_native)
        packed, code = q.packed.reshape(-1).contiguous(), q.code.float().contiguous()
        nf4_native.dequantize_into(lib, packed, code, _block_scales(q).contiguous(), out, n, block)
        return (out if dtype == torch.float32 else out.to(dtype)).view(q.shape)  # one rounding to dtype
    index = q.packed.reshape(-1).to(torch.int32)  # (ceil(n/2),)
    codes = torch.index_select(_pairs(q.code.float()), 0, index).view(torch.float32)  # (2·ceil(n/2),)
    del index
    scales = _block_scales(q)  # (nb,) float32
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
