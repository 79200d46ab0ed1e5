"""NF4 dequantization in Triton, bit-exact with the reference in ``lora_core.quant.nf4``.

The math (per element ``i`` of the flattened weight, ``b = i // block_size``)::

    absmax_f32[b] = nested_code[absmax[b]] * nested_absmax[b // 256] + offset    # double quant only
    w[i]          = (code[nibble(i)] * absmax_f32[b]).to(dtype)                  # float32, then one rounding

How the kernel is laid out (one program = ``BLOCKS_PER_PROG`` quantization blocks)::

    packed bytes (BLOCKS_PER_PROG, block_size/2)  --pair table-->  (BLOCKS_PER_PROG, block_size/2, 2) fp32
          byte b = [hi | lo]                                       (code[hi], code[lo])
    * absmax (BLOCKS_PER_PROG, 1, 1)  -> reshape (BLOCKS_PER_PROG, block_size) -> cast -> one contiguous store

- **Byte -> two codes in one load.** Instead of splitting nibbles and looking each one up, a 256-entry
  *pair table* ``T[b] = (code[b >> 4], code[b & 15])`` (2 KiB, lives in L1) turns each packed byte into its
  two float32 codes with one 8-byte gather: half the load instructions and no shift/mask arithmetic. The
  table is built from ``q.code`` itself (so any code table works) and cached per code tensor.
- **One scale per block, not per element.** The tile's middle axis is the quantization block, so the
  absmax (and, with double quantization, its two nested look-ups) is loaded once per block and broadcast.
- **Wide, coalesced accesses.** Bytes are read ``block_size/2`` contiguous per row of the tile, and the
  output of a program is one contiguous run of ``BLOCKS_PER_PROG * block_size`` elements, so the
  compiler emits 16-byte loads/stores. This kernel is bandwidth bound: it reads 0.5 + 1/64 (or 4/64) bytes
  and writes 2 (bf16) bytes per element; nothing else should cost.
- **Bit-exactness and FMA.** ``nested_code * nested_absmax + offset`` is a multiply followed by an add; on
  a GPU the compiler would contract it to one fused multiply-add (a single rounding), which differs from
  the reference's two roundings in the last bit. The kernel is therefore launched with
  ``enable_fp_fusion=False``. The other product (``code * absmax``) has no add to fuse with, and the final
  cast rounds to nearest even as ``Tensor.to`` does.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import triton
import triton.language as tl
from lora_core.kernels import interpreter_active

from lora_core.quant.nf4 import NF4Tensor, check_nf4_fields

# Elements each program writes. 8192 bf16 = 16 KiB out per program: with 8 warps that is 64 bytes of
# output and 16 bytes of input per thread, i.e. one 16-byte load and four 16-byte stores in flight.
_ELEMS_PER_PROG = 8192
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ----------------------------------------------------------------------------- shared helpers (host side)


def check_nf4(q: object, name: str = "q") -> NF4Tensor:
    """Validate an :class:`NF4Tensor` for the kernels; raises TypeError/ValueError naming ``name``.

    Returns ``q``, or a copy whose tensors are made contiguous: the kernels index them as flat arrays.
    """
    if not isinstance(q, NF4Tensor):
        raise TypeError(f"{name} must be a lora_core.quant.nf4.NF4Tensor, got {type(q).__name__}")
    check_nf4_fields(q, name)
    tensors = [q.packed, q.absmax, q.code]
    if q.double_quant:
        tensors += [q.nested_absmax, q.nested_code, q.offset]
    for t in tensors:
        if t.device != q.packed.device:
            raise ValueError(
                f"all tensors of {name} must be on one device; found {t.device} and {q.packed.device}"
            )
    check_device(q.packed, f"{name}.packed")
    strided = {k: v.contiguous() for k, v in q.tensors().items() if not v.is_contiguous()}
    return replace(q, **strided) if strided else q


def check_device(t: torch.Tensor, name: str) -> None:
    """Kernels run on CUDA tensors, or on CPU tensors when Triton's interpreter is active."""
    if t.device.type == "cuda":
        return
    if t.device.type == "cpu" and interpreter_active():
        return
    raise ValueError(
        f"{name} is on {t.device}: the Triton kernels need CUDA tensors (or CPU tensors with "
        "TRITON_INTERPRET=1 set before triton is imported); use the references in lora_core.quant.nf4 on CPU"
    )


# A cache of pair tables, keyed by the code tensor's identity. Holding the code tensor itself keeps its
# memory from being reused by another tensor, and its version counter catches in-place edits.
_PAIR_TABLES: dict[int, tuple[torch.Tensor, int, torch.Tensor]] = {}


def pair_table(code: torch.Tensor) -> torch.Tensor:
    """``T[b] = (code[b >> 4], code[b & 15])`` for every byte ``b``: float32 ``(256, 2)``, contiguous."""
    hit = _PAIR_TABLES.get(id(code))
    if hit is not None and hit[0] is code and hit[1] == code._version:
        return hit[2]
    flat = code.reshape(16)
    table = torch.stack([flat.repeat_interleave(16), flat.repeat(16)], dim=1).contiguous()  # (256, 2)
    if len(_PAIR_TABLES) >= 16:  # a handful of distinct code tables is the normal case
        _PAIR_TABLES.pop(next(iter(_PAIR_TABLES)))
    _PAIR_TABLES[id(code)] = (code, code._version, table)
    return table


def nested_args(q: NF4Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """The double-quantization operands (dummies when off, never read by the kernels then)."""
    if q.double_quant:
        return q.nested_code, q.nested_absmax, q.offset.reshape(1), int(q.nested_block_size)
    return q.absmax, q.absmax, q.absmax, 256


# ----------------------------------------------------------------------------- the kernels


@triton.jit
def block_absmax(
    absmax_ptr, nested_code_ptr, nested_absmax_ptr, offset_ptr, offs_blk, mask,
    NESTED_BLOCK_SIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
):  # fmt: skip
    """The float32 scale of each block in ``offs_blk`` (any shape); 0 where ``mask`` is False."""
    if DOUBLE_QUANT:
        # absmax_f32 = nested_code[absmax] * nested_absmax[b // 256] + offset
        a_code = tl.load(absmax_ptr + offs_blk, mask=mask, other=0).to(tl.int32)
        a_scale = tl.load(nested_absmax_ptr + offs_blk // NESTED_BLOCK_SIZE, mask=mask, other=0.0)
        absmax = tl.load(nested_code_ptr + a_code) * a_scale + tl.load(offset_ptr)
    else:
        absmax = tl.load(absmax_ptr + offs_blk, mask=mask, other=0.0)
    return tl.where(mask, absmax, 0.0)


@triton.jit
def _nf4_dequant_kernel(
    # pointers
    packed_ptr, absmax_ptr, table_ptr, nested_code_ptr, nested_absmax_ptr, offset_ptr, out_ptr,
    # sizes
    n_elements, n_bytes, n_blocks,
    # meta-parameters
    BLOCK_SIZE: tl.constexpr, NESTED_BLOCK_SIZE: tl.constexpr, BLOCKS_PER_PROG: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
):  # fmt: skip
    HALF: tl.constexpr = BLOCK_SIZE // 2
    pid = tl.program_id(0).to(tl.int64)  # int64: 28672×8192 elements still fit int32, bigger ones may not
    offs_blk = pid * BLOCKS_PER_PROG + tl.arange(0, BLOCKS_PER_PROG)  # (P,) block index
    offs_byte = offs_blk[:, None] * HALF + tl.arange(0, HALF)[None, :]  # (P, H) byte index

    # absmax_f32 = nested_code[absmax] * nested_absmax[b // 256] + offset   (no FMA: see module doc)
    absmax = block_absmax(
        absmax_ptr, nested_code_ptr, nested_absmax_ptr, offset_ptr, offs_blk, offs_blk < n_blocks,
        NESTED_BLOCK_SIZE, DOUBLE_QUANT,
    )  # (P,)

    # (code[hi], code[lo]) = T[byte]: one 8-byte gather per byte
    byte = tl.load(packed_ptr + offs_byte, mask=offs_byte < n_bytes, other=0).to(tl.int32)  # (P, H)
    pair = tl.load(table_ptr + byte[:, :, None] * 2 + tl.arange(0, 2)[None, None, :])  # (P, H, 2)
    w = pair * absmax[:, None, None]  # (P, H, 2) float32
    w = tl.reshape(w, (BLOCKS_PER_PROG, BLOCK_SIZE))  # element order: byte-major, high nibble first

    offs_out = offs_blk[:, None] * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)[None, :]  # (P, BS)
    tl.store(out_ptr + offs_out, w.to(out_ptr.dtype.element_ty), mask=offs_out < n_elements)


# ----------------------------------------------------------------------------- the launcher


def nf4_dequantize(
    q: NF4Tensor, dtype: torch.dtype = torch.bfloat16, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Dequantize ``q`` to a dense tensor of shape ``q.shape``, bit-exact with ``nf4_dequantize_ref``.

    Args:
        q: the NF4 weight (QLoRA, Dettmers et al. 2023, §3; bitsandbytes' byte layout), on CUDA.
        dtype: float16, bfloat16 (default, what QLoRA computes in) or float32.
        out: optional contiguous output of shape ``q.shape`` and dtype ``dtype`` on ``q``'s device.

    Returns:
        ``out`` (or a new tensor) holding ``(code[nibble] * absmax).to(dtype)`` for every element.
    """
    q = check_nf4(q)
    if dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"dtype must be one of {_SUPPORTED_DTYPES}, got {dtype}")
    shape = torch.Size(q.shape)
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=q.device)
    else:
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
        if out.shape != shape or out.dtype != dtype or out.device != q.device or not out.is_contiguous():
            raise ValueError(
                f"out must be contiguous, shape {tuple(shape)}, dtype {dtype}, device {q.device}; got "
                f"shape {tuple(out.shape)}, dtype {out.dtype}, device {out.device}, "
                f"contiguous={out.is_contiguous()}"
            )
    n = q.numel
    if n == 0:
        return out
    bs = q.block_size
    n_blocks = -(-n // bs)
    blocks_per_prog = max(1, _ELEMS_PER_PROG // bs)
    elems = blocks_per_prog * bs
    nested_code, nested_absmax, offset, nested_bs = nested_args(q)
    grid = (triton.cdiv(n_blocks, blocks_per_prog),)
    _nf4_dequant_kernel[grid](
        q.packed, q.absmax, pair_table(q.code), nested_code, nested_absmax, offset, out,
        n, q.packed.numel(), n_blocks,
        BLOCK_SIZE=bs, NESTED_BLOCK_SIZE=nested_bs, BLOCKS_PER_PROG=blocks_per_prog,
        DOUBLE_QUANT=q.double_quant,
        num_warps=8 if elems >= 8192 else 4,
        enable_fp_fusion=False,  # bit-exactness: keep `mul` then `add` (module doc)
    )  # fmt: skip
    return out
