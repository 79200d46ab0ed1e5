"""The 16 NF4 codes and how two of them share a byte: the alphabet `lora_core.quant.nf4` quantizes into.

NF4 (QLoRA, Dettmers et al. 2023, §3) rounds each block-normalised weight ``w / absmax ∈ [-1, 1]`` to one
of 16 values built from quantiles of N(0, 1), so that every code is equally likely for normally
distributed weights; the 4-bit index of that value is what is stored, two indices per byte::

    NF4_CODE[0] = -1.0  <  ...  <  NF4_CODE[7] = 0.0  <  ...  <  NF4_CODE[15] = 1.0
    codes [a, b, c, d] (uint8 < 16)  ─pack_nf4─►  bytes [ab, cd]  (a in the high nibble)

Nothing here knows about blocks, scales or `NF4Tensor`: `lora_core.quant.nf4` builds the format on these
and re-exports them (``from lora_core.quant.nf4 import NF4_CODE, pack_nf4`` works as it always did).
"""

from __future__ import annotations

import itertools
from functools import cache

import torch

# The 16 NF4 codes, index = 4-bit code (bitsandbytes' table). Built from quantiles of N(0, 1): 7 negative,
# 8 positive and an exact zero, normalised to [-1, 1]; see `nf4_code_table_from_quantiles`.
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# Code tables
# ---------------------------------------------------------------------------------------------------------


def nf4_code_table_from_quantiles(offset: float = 0.9677083) -> torch.Tensor:
    """Build the NF4 table from quantiles of N(0, 1), as in the QLoRA paper (Dettmers et al. 2023, §3).

    The 4-bit range is split asymmetrically so that zero is a code: 8 positive values are the quantiles at
    8 evenly spaced probabilities from ``offset`` down towards 0.5, 7 negative values mirror the quantiles
    at 7 probabilities over the same range, plus an exact 0. Everything is divided by the largest value,
    so the table spans [-1, 1]. ``offset = 0.9677083`` = ½(1/(2·15) + 1 − 1/(2·16))-ish, the paper's
    choice that keeps ±1 finite. Probabilities are float32 (as bitsandbytes built them), quantiles float64,
    the table float32.

    Returns:
        float32 ``(16,)``, sorted; equals `NF4_CODE`.
    """
    pos_p = torch.linspace(offset, 0.5, 9, dtype=torch.float32)[:-1]  # 8 probabilities > 0.5
    neg_p = torch.linspace(offset, 0.5, 8, dtype=torch.float32)[:-1]  # 7
    pos = torch.special.ndtri(pos_p.double())
    neg = -torch.special.ndtri(neg_p.double())
    values = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).float().sort().values
    return values / values.max()


@cache
def nf4_midpoints() -> torch.Tensor:
    """The 15 bucket edges between neighbouring codes, ``(code[i] + code[i+1]) / 2``: quantizing rounds a
    value to the code whose bucket holds it (one on an edge goes to the lower code)."""
    code = torch.tensor(NF4_CODE, dtype=torch.float32)
    return (code[:-1] + code[1:]) / 2  # (15,) float32, exact as bitsandbytes computes them


def max_code_gap() -> float:
    """The widest gap between neighbouring NF4 codes (between -1 and -0.696…); half of it bounds the
    per-element round-trip error in units of the block's absmax."""
    code = NF4_CODE
    return max(b - a for a, b in itertools.pairwise(code))


# ---------------------------------------------------------------------------------------------------------
# Packing: two 4-bit codes per byte, first element high
# ---------------------------------------------------------------------------------------------------------


def pack_nf4(codes: torch.Tensor) -> torch.Tensor:
    """``(n,)`` integer codes in [0, 16) → uint8 ``(ceil(n/2),)``: ``[a, b, c, d] -> [ab, cd]``.

    An odd ``n`` pads with 7 (the code of 0.0), like bitsandbytes.
    """
    c = codes.reshape(-1).to(torch.uint8)
    if c.numel() % 2:
        c = torch.cat([c, c.new_full((1,), 7)])
    return (c[0::2] << 4) | c[1::2]


def unpack_nf4(packed: torch.Tensor, n: int) -> torch.Tensor:
    """uint8 ``(ceil(n/2),)`` → the first ``n`` codes as uint8 ``(n,)`` (inverse of `pack_nf4`)."""
    p = packed.reshape(-1)
    codes = torch.stack([p >> 4, p & 0xF], dim=-1).reshape(-1)  # (2·bytes,) high nibble first
    return codes[:n]


__all__ = [
    "NF4_CODE",
    "max_code_gap",
    "nf4_code_table_from_quantiles",
    "nf4_midpoints",
    "pack_nf4",
    "unpack_nf4",
]
