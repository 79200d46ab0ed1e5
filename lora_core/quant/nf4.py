"""NF4: 4-bit NormalFloat quantization (QLoRA, Dettmers et al. 2023), byte-compatible with bitsandbytes.

Layout of a quantized weight ``w`` (any shape, ``n = w.numel()`` elements), exactly as bitsandbytes
stores it:

- ``w`` is flattened row-major and cut into blocks of ``block_size`` elements (64 for weights); the last
  block may be partial.
- Each block is scaled by its absolute maximum (``absmax``, float32) and every element rounds to the
  nearest of the 16 NF4 codes (``NF4_CODE``); the code's index is the 4-bit value. The codes and the
  packing of the next point live in `lora_core.quant.nf4_codes` (re-exported here).
- Two codes per byte, the first element in the high nibble: ``[a, b, c, d] -> [ab, cd]``; an odd ``n``
  pads the last low nibble with the code of 0.0 (index 7), as bitsandbytes does. Readers ignore it.
- Double quantization (bitsandbytes' ``compress_statistics=True``): ``offset = mean(absmax)``; then
  ``absmax - offset`` is quantized block-wise (blocks of 256) to 8 bits with bitsandbytes' signed dynamic
  map, keeping one float32 scale per 256-block. Dequantizing adds ``offset`` back.

Memory per parameter: 4 + 32/64 = 4.5 bits without double quantization, 4 + 8/64 + 32/(64·256) ≈ 4.127
bits with it.

Rounding, to the bit (read off bitsandbytes 0.50's CPU path, which the tests compare against):

- 4-bit: every arithmetic step in float32. A full block is scaled by ``x * (1 / absmax)``, the partial last
  block by ``x / absmax`` (a true division); ``absmax`` is clamped to ≥ 1e-38 for the scaling (and the
  partial block stores the clamped value). The result is clamped to [-1, 1] and goes to the code whose
  bucket between float32 midpoints ``(code[i] + code[i+1]) / 2`` holds it; a value exactly on a midpoint
  goes to the LOWER code.
- 8-bit (the nested absmax): bitsandbytes' dynamic map and CPU lookup table, see `lora_core.quant.bnb`.
- ``offset`` is torch's float32 ``mean`` of the absmax vector (where that sum overflows, ``|w| ≳ 1e38``,
  bitsandbytes gets NaN; we take the float64 mean rounded to float32).

```
w (out, in) ─flatten─► blocks of 64 ─÷absmax─► nearest NF4 code ─► 2 per byte ─► packed uint8
                             │
                             └─ absmax (nb,) ─ −mean ─► blocks of 256 ─► 8-bit dynamic codes + scale
```
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

# bitsandbytes' conventions (8-bit nested map, state-dict layout, field checks) live in `bnb`, one layer
# below: it works on plain fields and never imports this module.
from lora_core.quant.bnb import (
    check_bnb_scales,
    check_nf4_fields,
    dynamic_map_signed,
    quantize_8bit_dynamic,
    read_bnb_fields,
    to_bnb_state,
)

# The 16 codes and their packing, two per byte, live in `nf4_codes` (the alphabet, without blocks or
# scales); re-exported here, where they have always been imported from.
from lora_core.quant.nf4_codes import (
    NF4_CODE,
    max_code_gap,
    nf4_code_table_from_quantiles,
    nf4_midpoints,
    pack_nf4,
    unpack_nf4,
)


@dataclass(repr=False)
class NF4Tensor:
    """A weight quantized to NF4: the packed codes plus what it takes to dequantize them.

    Fields (``n`` = number of elements, ``nb = ceil(n / block_size)`` blocks):

    - ``packed``: uint8 ``(ceil(n / 2),)``, two codes per byte, element ``2i`` in the high nibble (an odd
      ``n`` pads the last low nibble with 7, the code of 0.0; never read).
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

    def __repr__(self) -> str:
        dq = f", double_quant (nested block {self.nested_block_size})" if self.double_quant else ""
        return (
            f"NF4Tensor(shape={tuple(self.shape)}, dtype={self.dtype}, block_size={self.block_size}{dq}, "
            f"device={self.device}, {self.bits_per_param:.3f} bits/param)"
        )

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors this container holds, by field name (the ``None`` ones left out)."""
        names = ("packed", "absmax", "code", "nested_absmax", "nested_code", "offset")
        return {k: getattr(self, k) for k in names if getattr(self, k) is not None}

    @property
    def nbytes(self) -> int:
        """Bytes held by the tensors that scale with the weight: packed codes, absmax, nested absmax.

        The two code tables (16 + 256 float32, shared by every weight) and the 0-dim offset are constant
        overhead and left out; `bits_per_param` is ``8 * nbytes / numel``.
        """
        held = [self.packed, self.absmax] + ([self.nested_absmax] if self.double_quant else [])
        return sum(t.numel() * t.element_size() for t in held)

    @property
    def bits_per_param(self) -> float:
        return 8.0 * self.nbytes / max(self.numel, 1)

    def to(self, device: torch.device | str) -> NF4Tensor:
        """A copy on ``device``; every tensor keeps its dtype (uint8 codes, float32 scales). ValueError for a
        device this process cannot use (torch raises AssertionError for "cuda" without CUDA)."""
        try:
            return replace(self, **{k: v.to(device=device) for k, v in self.tensors().items()})
        except torch.OutOfMemoryError:
            raise
        except (AssertionError, RuntimeError) as err:
            raise ValueError(f"device={device!r} is not available in this process: {err}") from None

    def cpu(self) -> NF4Tensor:
        return self.to("cpu")

    def cuda(self, device: int | str | torch.device | None = None) -> NF4Tensor:
        if device is None or isinstance(device, int):
            device = torch.device("cuda", device)
        return self.to(device)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize_nf4(self, dtype)

    # -- serialization: bitsandbytes' state-dict keys, one format for both (see `lora_core.quant.bnb`) --

    def to_bnb_state(self, prefix: str = "weight") -> dict[str, torch.Tensor]:
        """The tensors bitsandbytes writes for a 4-bit weight: ``prefix`` (packed, ``(ceil(n/2), 1)``),
        ``prefix.absmax``, ``prefix.quant_map``, with double quantization ``prefix.nested_absmax`` and
        ``prefix.nested_quant_map``, and ``prefix.quant_state.bitsandbytes__nf4`` (a JSON blob as uint8)."""
        return to_bnb_state(self, prefix)

    @classmethod
    def from_bnb_state(cls, tensors: dict[str, torch.Tensor], prefix: str = "weight") -> NF4Tensor:
        """Read what `to_bnb_state` (or bitsandbytes' ``Linear4bit.state_dict``) wrote under ``prefix``.

        Raises:
            ValueError: FP4, a missing key, a malformed quant-state blob or field, sizes / dtypes that do
                not fit the recorded shape, a NaN / inf / negative scale (see `lora_core.quant.bnb`).
            TypeError: an entry that is not a tensor.
        """
        q = cls(**read_bnb_fields(tensors, prefix))
        check_nf4_fields(q, prefix)
        check_bnb_scales(q, prefix)
        return q


# ---------------------------------------------------------------------------------------------------------
# Quantize / dequantize
# ---------------------------------------------------------------------------------------------------------


def _check_block_size(block_size: object, name: str = "block_size") -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, int):
        raise TypeError(f"{name} must be an int, got {type(block_size).__name__}")
    if not (16 <= block_size <= 4096) or block_size & (block_size - 1):
        raise ValueError(f"{name} must be a power of two in [16, 4096], got {block_size}")
    return block_size


def _check_weight(w: object) -> torch.Tensor:
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"w must be a torch.Tensor, got {type(w).__name__}")
    if w.is_complex():
        raise ValueError(f"w must be a real floating-point tensor, got complex dtype {w.dtype}")
    if not w.is_floating_point():
        raise ValueError(f"w must be a floating-point tensor (float32/bfloat16/float16), got {w.dtype}")
    if w.numel() and not bool(torch.isfinite(w).all()):
        what = "NaN" if bool(torch.isnan(w).any()) else "inf"
        raise ValueError(f"w contains {what}; NF4 needs finite weights")
    if w.numel() and w.dtype == torch.float64:  # quantized through float32: its range is the limit
        big = max(float(w.amax()), -float(w.amin()))
        if not torch.isfinite(torch.tensor(big, dtype=torch.float32)):
            raise ValueError(
                f"w has |values| up to {big:.3g}, beyond float32's range (NF4 scales are float32)"
            )
    return w


# Elements quantized per step. The temporaries of one step (float32 copy, |x|, scaled; int32 bucket
# index; uint8 codes) cost ≤ 17 bytes an element, so a step peaks at ≈ 70 MB whatever the weight's
# size, instead of ≈ 20 bytes per element of the whole weight at once. A power of two ≥ 4096: a multiple
# of every block size, so steps cut between blocks, and even, so they cut between bytes of the output.
_QUANT_CHUNK = 1 << 22


def _quantize_4bit_chunk(
    x: torch.Tensor, block_size: int, mids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """flat float32 ``(c,)``, starting on a block boundary → (codes uint8 ``(c,)``, absmax float32).

    bitsandbytes' rounding (module doc): full blocks are multiplied by ``1 / absmax``, a partial last block
    is divided by its absmax; both clamped to ≥ 1e-38. A value on a midpoint goes to the lower code.
    """
    full = x.numel() - x.numel() % block_size
    blocks = x[:full].reshape(-1, block_size)  # (nb_full, bs)
    absmax = blocks.abs().amax(dim=-1) if full else x.new_zeros(0)  # (nb_full,)
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]).reshape(-1)  # reciprocal, then multiply
    if full < x.numel():  # the partial last block: a true division by its (clamped, and so stored) absmax
        tail_max = x[full:].abs().amax().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_max[None]])
        scaled = torch.cat([scaled, x[full:] / tail_max])
    codes = torch.bucketize(scaled.clamp_(-1.0, 1.0), mids, out_int32=True, right=False)  # on a mid → lower
    return codes.to(torch.uint8), absmax


def _quantize_4bit(
    x: torch.Tensor, block_size: int, chunk: int = _QUANT_CHUNK
) -> tuple[torch.Tensor, torch.Tensor]:
    """flat ``(n,)`` (any float dtype) → (packed uint8 ``(ceil(n/2),)``, absmax float32 ``(nb,)``).

    Works through ``x`` ``chunk`` elements (rounded down to whole blocks) at a time, converting each slice
    to float32 on its own, so the temporaries stay bounded; every element's arithmetic is the same as in
    one pass, so the bytes are too (a test pins it).
    """
    n = x.numel()
    chunk = max(block_size, chunk - chunk % block_size)  # whole blocks, so an even number of elements
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(-(-n // block_size), dtype=torch.float32, device=x.device)
    mids = nf4_midpoints().to(x.device)
    for start in range(0, n, chunk):
        codes, amax = _quantize_4bit_chunk(x[start : start + chunk].to(torch.float32), block_size, mids)
        packed[start // 2 : start // 2 + (codes.numel() + 1) // 2] = pack_nf4(codes)
        absmax[start // block_size : start // block_size + amax.numel()] = amax
    return packed, absmax


def quantize_nf4(
    w: torch.Tensor, block_size: int = 64, double_quant: bool = True, *, _chunk: int = _QUANT_CHUNK
) -> NF4Tensor:
    """Quantize ``w`` to NF4 exactly as bitsandbytes' ``quantize_4bit(quant_type="nf4")`` does.

    Args:
        w: float32 / bfloat16 / float16 (float64 is accepted and rounded to float32 first, so it must
            lie in float32's range), any shape, finite. Empty tensors give an empty `NF4Tensor`.
        block_size: elements per absmax block, a power of two in [16, 4096] (QLoRA: 64).
        double_quant: quantize the absmax vector too (QLoRA §3 "Double Quantization"; bitsandbytes'
            ``compress_statistics=True``): 8-bit dynamic codes in blocks of 256 around their mean.
        _chunk: private; elements per quantization step (tests force small steps; the bytes never change).

    Returns:
        An `NF4Tensor` on ``w``'s device.

    Raises:
        ValueError: NaN / inf in ``w``, float64 beyond float32's range, a bad ``block_size``, or (double
            quantization) ``|w|`` so close to float32's limit that the dequantized scales would overflow.
            Where bitsandbytes' float32 ``mean(absmax)`` overflows (``|w| ≳ 1e38``), the offset is the
            float64 mean rounded to float32 instead of bitsandbytes' NaN.
        TypeError: ``w`` not a tensor, ``block_size`` not an int, ``double_quant`` not a bool.
    """
    _check_block_size(block_size)
    if not isinstance(double_quant, bool):
        raise TypeError(f"double_quant must be a bool, got {double_quant!r}")
    w = _check_weight(w)
    packed, absmax = _quantize_4bit(w.detach().reshape(-1), block_size, _chunk)  # float32 per chunk
    q = NF4Tensor(
        packed=packed,
        absmax=absmax,
        shape=torch.Size(w.shape),
        dtype=w.dtype,
        block_size=block_size,
        code=torch.tensor(NF4_CODE, dtype=torch.float32, device=w.device),
    )
    if not double_quant:
        return q
    offset = absmax.mean() if absmax.numel() else absmax.new_zeros(())
    if not bool(torch.isfinite(offset)):  # the float32 sum overflowed (|w| ≳ 1e38): bitsandbytes gives NaN
        offset = absmax.double().mean().float()  # the mean itself is in range
    q8, nested_absmax = quantize_8bit_dynamic(absmax - offset, 256)
    q = replace(
        q,
        absmax=q8,
        nested_absmax=nested_absmax,
        nested_code=dynamic_map_signed().to(w.device),
        nested_block_size=256,
        offset=offset,
    )
    if absmax.numel() and not bool(torch.isfinite(nf4_block_scales(q)).all()):  # code·scale + offset
        raise ValueError(
            f"w has |values| up to {float(absmax.max()):.3g}: too close to float32's limit for double "
            "quantization (its scales would overflow); use double_quant=False"
        )
    return q


def nf4_block_scales(q: NF4Tensor) -> torch.Tensor:
    """The float32 absmax per block ``(nb,)``, undoing double quantization if there is one."""
    if not q.double_quant:
        return q.absmax.float()
    assert q.nested_code is not None and q.offset is not None and q.nested_block_size is not None
    scale = q.nested_absmax.repeat_interleave(q.nested_block_size)[: q.absmax.numel()]  # (nb,)
    return q.nested_code[q.absmax.long()] * scale + q.offset  # multiply, then add: two float32 roundings


def nf4_dequantize_ref(q: NF4Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Reference dequantization (the kernels match it bit for bit): ``code[nibble] * absmax`` in float32,
    then one rounding to ``dtype``. Returns ``q.shape``."""
    n = q.numel
    values = q.code[unpack_nf4(q.packed, n).long()]  # (n,) float32
    scales = nf4_block_scales(q).repeat_interleave(q.block_size)[:n]  # (n,)
    return (values * scales).to(dtype).reshape(q.shape)


def dequantize_nf4(q: NF4Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Back to a dense tensor of ``q.shape`` in ``dtype`` (default: the dtype that was quantized)."""
    if not isinstance(q, NF4Tensor):
        raise TypeError(f"q must be an NF4Tensor, got {type(q).__name__}")
    dtype = q.dtype if dtype is None else dtype
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype or None, got {dtype!r}")
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")
    return nf4_dequantize_ref(q, dtype)


def nf4_matmul_ref(x: torch.Tensor, q: NF4Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ dequant(q)ᵀ + bias`` in ``x``'s dtype: ``x (..., in)``, ``q (out, in)`` → ``(..., out)``."""
    return torch.nn.functional.linear(x, nf4_dequantize_ref(q, x.dtype), bias)


def nf4_matmul_grad_ref(grad_out: torch.Tensor, q: NF4Tensor) -> torch.Tensor:
    """``grad_out @ dequant(q)``: the input gradient of `nf4_matmul_ref`. ``(..., out)`` → ``(..., in)``."""
    return grad_out @ nf4_dequantize_ref(q, grad_out.dtype)


__all__ = [
    "NF4_CODE",
    "NF4Tensor",
    "check_nf4_fields",
    "dequantize_nf4",
    "dynamic_map_signed",
    "max_code_gap",
    "nf4_block_scales",
    "nf4_code_table_from_quantiles",
    "nf4_dequantize_ref",
    "nf4_matmul_grad_ref",
    "nf4_matmul_ref",
    "pack_nf4",
    "quantize_nf4",
    "unpack_nf4",
]
