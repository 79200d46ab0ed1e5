"""An oracle for bitsandbytes' 4-bit format that is right on every CPU: its own fields, decoded by hand.

bitsandbytes' ``dequantize_4bit`` is not such an oracle: on CPUs with AVX-512, bitsandbytes 0.50.2's native
CPU kernel dequantizes wrongly whenever ``in_features % 64 == 32`` (seen for (40, 96), (128, 96),
(128, 160); max error up to 2.0), while the packed bytes and the absmax / code / nested fields it wrote are
right. So the tests compare lora_core with those bytes and fields, and with this decode of them::

    value[i] = code[nibble[i]] × absmax[i // blocksize]                    (float32, then one rounding)
    absmax   = nested_code[absmax_u8] × nested_absmax[j // 256] + offset   (double quantization only)

written here from bitsandbytes' documented layout, independently of ``lora_core.quant.nf4``.
``tests/test_nf4_bitsandbytes.py::test_bitsandbytes_dequantize_bug_is_bitsandbytes`` records the bug.
"""

from __future__ import annotations

import math

import torch


def decode_bnb_fields(packed: torch.Tensor, state, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """Dequantize a bitsandbytes 4-bit weight from its fields: ``packed`` (uint8, two codes per byte, the
    first in the high nibble) and its ``QuantState`` (``absmax``, ``code``, ``blocksize``, ``dtype``, and for
    double quantization ``offset`` plus ``state2`` with the 8-bit ``code``, ``absmax`` and ``blocksize``).

    Returns ``shape`` (default ``state.shape``) in ``state.dtype``.
    """
    shape = tuple(state.shape) if shape is None else tuple(shape)
    n = math.prod(shape)
    data = packed.reshape(-1).to(torch.uint8)
    nibbles = torch.stack([data >> 4, data & 0x0F], dim=1).reshape(-1)[:n].long()  # [ab, cd] -> a, b, c, d
    if state.nested:
        inner = state.state2
        n_blocks = state.absmax.numel()
        inner_scale = inner.absmax.float().repeat_interleave(inner.blocksize)[:n_blocks]
        absmax = inner.code.float()[state.absmax.long()] * inner_scale + state.offset.float()
    else:
        absmax = state.absmax.float()
    scale = absmax.repeat_interleave(state.blocksize)[:n]
    return (state.code.float()[nibbles] * scale).to(state.dtype).reshape(shape)
