"""NF4 dequantization in Triton, bit-exact with the reference in ``lora_core.quant.nf4``.

The math (per element ``i`` of the flattened weight, ``b = i // block_size``)::

    absmax_f32[b] = nested_code[absmax[b]] * nested_absmax[b // 256] + offset    # double quant only
    w[i]          = (code[nibble(i)] * absmax_f32[b]).to(dtype)                  # float32, then one rounding

How the kernel is laid out (one program = ``WORDS_PER_PROG`` 32-bit words = 8 elements each)::

    packed bytes viewed as int32 words (W,)      word = [byte3 | byte2 | byte1 | byte0]   (little endian)
      -> nibbles (W, 8): element 2j = byte j >> 4, element 2j+1 = byte j & 15, i.e. word >> SHIFT[e] & 15
      -> code[nibble] * absmax (W, 8) float32 -> cast -> store: a thread's 8 values are 8 adjacent outputs

- **Words, shifts and the 16-entry table.** One 32-bit load brings 8 codes; a shift and a mask give each
  nibble and one load from the 64-byte code table (a single L1 line: every thread of a warp hits it in
  one wavefront) its float32 value. An earlier version turned each byte into both codes with one 8-byte
  gather from a 256-entry pair table (2 KiB): half the loads, but ~6 L1 wavefronts per gather, and a
  byte and an output transpose through shared memory. The static report (``benchmarks/README.md``)
  shows why this one is faster (estimates, not timings).
- **The decoded values already are the store layout.** A thread decodes one word into 8 consecutive
  outputs, exactly one 16-byte store in bf16/fp16: no shared-memory round trip between load and store.
- **One scale per word.** A block holds at least 16 elements, so a word (8 elements, starting at a
  multiple of 8) never straddles two blocks: ``block = word >> (log2(block_size) - 3)``, one scale per
  word. The shift is a run-time argument, so one compiled kernel serves every block size.
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

# 32-bit words each program decodes: 1024 words = 8192 elements = 16 KiB of bf16 out per program; with 8
# warps a thread decodes 4 words (4 × 16-byte stores in bf16).
_WORDS_PER_PROG = 1024
_NUM_WARPS = 8
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


def check_out(out: object, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A caller's ``out=``: a contiguous tensor of the result's shape, dtype and device (raises naming it)."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor or None, got {type(out).__name__}")
    if out.shape != shape or out.dtype != dtype or out.device != device or not out.is_contiguous():
        raise ValueError(
            f"out must be contiguous, shape {tuple(shape)}, dtype {dtype}, device {device}; got "
            f"shape {tuple(out.shape)}, dtype {out.dtype}, device {out.device}, "
            f"contiguous={out.is_contiguous()}"
        )
    return out


def packed_words(packed: torch.Tensor) -> torch.Tensor:
    """The packed bytes (contiguous uint8) as int32 words, 4 bytes each: a view when the byte count and
    the start are multiples of 4, else a zero-padded copy (only tiny or odd-sized weights: ``numel % 8``)."""
    if packed.numel() % 4 == 0 and packed.storage_offset() % 4 == 0:
        return packed.view(torch.int32)
    padded = torch.zeros(-(-packed.numel() // 4) * 4, dtype=torch.uint8, device=packed.device)
    padded[: packed.numel()] = packed
    return padded.view(torch.int32)


def log2(n: int) -> int:
    """log2 of a power of two (block sizes are checked to be powers of two by ``check_nf4_fields``)."""
    return n.bit_length() - 1


def scale_args(q: NF4Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """The double-quantization operands and log2 of the nested block size (dummies when off: unread)."""
    if q.double_quant:
        return q.nested_code, q.nested_absmax, q.offset.reshape(1), log2(int(q.nested_block_size))
    return q.absmax, q.absmax, q.absmax, 8


# ----------------------------------------------------------------------------- the kernels


@triton.jit
def block_absmax(
    absmax_ptr, nested_code_ptr, nested_absmax_ptr, offset_ptr, offs_blk, mask, nested_shift,
    DOUBLE_QUANT: tl.constexpr,
):  # fmt: skip
    """The float32 scale of each block in ``offs_blk`` (any shape); 0 where ``mask`` is False."""
    if DOUBLE_QUANT:
        # absmax_f32 = nested_code[absmax] * nested_absmax[b // nested_block_size] + offset
        a_code = tl.load(absmax_ptr + offs_blk, mask=mask, other=0).to(tl.int32)
        a_scale = tl.load(nested_absmax_ptr + (offs_blk >> nested_shift), mask=mask, other=0.0)
        absmax = tl.load(nested_code_ptr + a_code) * a_scale + tl.load(offset_ptr)
    else:
        absmax = tl.load(absmax_ptr + offs_blk, mask=mask, other=0.0)
    return tl.where(mask, absmax, 0.0)


@triton.jit
def nibble_shifts():
    """``(8,)`` int32: element ``e`` of a little-endian word is ``word >> SHIFT[e] & 15``, the first
    element of each byte in its high nibble: ``[4, 0, 12, 8, 20, 16, 28, 24]``."""
    e = tl.arange(0, 8)
    return (e >> 1) * 8 + (1 - (e & 1)) * 4


@triton.jit(do_not_specialize=["n_elements", "n_words", "n_blocks", "word_shift", "nested_shift"])
def _nf4_dequant_kernel(
    # pointers
    words_ptr, absmax_ptr, code_ptr, nested_code_ptr, nested_absmax_ptr, offset_ptr, out_ptr,
    # sizes
    n_elements, n_words, n_blocks, word_shift, nested_shift,
    # meta-parameters
    WORDS_PER_PROG: tl.constexpr, WHOLE_WORDS: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)  # int64: 28672×8192 elements still fit int32, bigger ones may not
    offs_word = pid * WORDS_PER_PROG + tl.arange(0, WORDS_PER_PROG)  # (W,) word index
    # word = packed.view(int32)[offs_word]: 8 codes
    word = tl.load(words_ptr + offs_word, mask=offs_word < n_words, other=0)  # (W,)
    # absmax_f32 per word: block = element // block_size = word // (block_size / 8)
    offs_blk = offs_word >> word_shift  # (W,)
    absmax = block_absmax(
        absmax_ptr,
        nested_code_ptr,
        nested_absmax_ptr,
        offset_ptr,
        offs_blk,
        offs_blk < n_blocks,
        nested_shift,
        DOUBLE_QUANT,
    )  # (W,)
    # w = code[nibble] * absmax
    nibble = (word[:, None] >> nibble_shifts()[None, :]) & 15  # (W, 8)
    w = tl.load(code_ptr + nibble) * absmax[:, None]  # (W, 8) float32
    offs_out = offs_word[:, None] * 8 + tl.arange(0, 8)[None, :]  # (W, 8)
    if WHOLE_WORDS:  # numel % 8 == 0: a mask per word keeps each thread's 8 outputs one vector store
        mask = (offs_word < n_words)[:, None]
    else:
        mask = offs_out < n_elements
    tl.store(out_ptr + offs_out, w.to(out_ptr.dtype.element_ty), mask=mask)


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
        check_out(out, shape, dtype, q.device)
    n = q.numel
    if n == 0:
        return out
    words = packed_words(q.packed)
    n_words = -(-n // 8)  # words holding at least one element (the padding of a copy is never read)
    nested_code, nested_absmax, offset, nested_shift = scale_args(q)
    grid = (triton.cdiv(n_words, _WORDS_PER_PROG),)
    _nf4_dequant_kernel[grid](
        words, q.absmax, q.code.reshape(16), nested_code, nested_absmax, offset, out,
        n, n_words, q.absmax.numel(), log2(q.block_size) - 3, nested_shift,
        WORDS_PER_PROG=_WORDS_PER_PROG, WHOLE_WORDS=n % 8 == 0, DOUBLE_QUANT=q.double_quant,
        num_warps=_NUM_WARPS,
        enable_fp_fusion=False,  # bit-exactness: keep `mul` then `add` (module doc)
    )  # fmt: skip
    return out
