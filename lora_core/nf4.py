"""NF4: 4-bit NormalFloat quantization (QLoRA, Dettmers et al. 2023), byte-compatible with bitsandbytes.

Layout of a quantized weight ``w`` (any shape, ``n = w.numel()`` elements), exactly as bitsandbytes
stores it:

- ``w`` is flattened row-major and cut into blocks of ``block_size`` elements (64 for weights); the last
  block may be partial.
- Each block is scaled by its absolute maximum (``absmax``, float32) and every element rounds to the
  nearest of the 16 NF4 codes below; the code's index is the 4-bit value.
- Two codes per byte, the first element in the high nibble: ``[a, b, c, d] -> [ab, cd]``; an odd ``n``
  leaves the last low nibble as padding (zero).
- Double quantization (bitsandbytes' ``compress_statistics=True``): ``offset = mean(absmax)``; then
  ``absmax - offset`` is quantized block-wise (blocks of 256) to 8 bits with bitsandbytes' signed dynamic
  map, keeping one float32 scale per 256-block. Dequantizing adds ``offset`` back.

Memory per parameter: 4 + 32/64 = 4.5 bits without double quantization, 4 + 8/64 + 32/(64·256) ≈ 4.127
bits with it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# The 16 NF4 codes, index = 4-bit code (bitsandbytes' table). Built from quantiles of N(0, 1): 7 negative,
# 8 positive and an exact zero, normalised to [-1, 1]; see `nf4_code_table_from_quantiles`.
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip


@dataclass
class NF4Tensor:
    """A weight quantized to NF4: the packed codes plus what it takes to dequantize them.

    Fields (``n`` = number of elements, ``nb = ceil(n / block_size)`` blocks):

    - ``packed``: uint8 ``(ceil(n / 2),)``, two codes per byte, element ``2i`` in the high nibble.
    - ``absmax``: the per-block scales, ``(nb,)``. float32 without double quantization; uint8 codes into
      ``nested_code`` with it.
    - ``shape``, ``dtype``: the original tensor's shape and dtype (the default dequantize dtype).
    - ``block_size``: elements per block (a power of two in [16, 4096]; 64 for weights).
    - ``code``: float32 ``(16,)``, the NF4 table (``NF4_CODE``).
    - Double quantization only (``None`` without it): ``nested_absmax`` float32 ``(ceil(nb / 256),)``,
      ``nested_code`` float32 ``(256,)`` (bitsandbytes' signed dynamic map), ``nested_block_size`` (256),
      ``offset`` float32 0-dim tensor (the mean of the original absmax).

    Dequantization (the reference; kernels must match it bit for bit):
    ``absmax_f32 = nested_code[absmax] * nested_absmax[block // nested_block_size] + offset`` (with double
    quantization; in float32, multiply then add), then ``w[i] = (code[nibble(i)] * absmax_f32[i //
    block_size]).to(dtype)``.
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    block_size: int
    code: torch.Tensor
    nested_absmax: torch.Tensor | None = None
    nested_code: torch.Tensor | None = None
    nested_block_size: int | None = None
    offset: torch.Tensor | None = None

    @property
    def double_quant(self) -> bool:
        """Whether the block scales are themselves quantized (bitsandbytes' ``compress_statistics``)."""
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        return int(torch.Size(self.shape).numel())

    @property
    def device(self) -> torch.device:
        return self.packed.device
