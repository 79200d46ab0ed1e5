"""bitsandbytes' side of NF4: its 8-bit map for the nested absmax, and its state-dict layout.

`lora_core.quant.nf4` holds the NF4 format itself (codes, packing, quantize / dequantize); this module holds
what is bitsandbytes' convention rather than the paper's, so that our bytes and theirs are the same.

**The 8-bit double-quant map.** With double quantization (bitsandbytes' ``compress_statistics=True``) the
per-block absmax minus its mean is stored as 8-bit codes into bitsandbytes' signed dynamic map
(`dynamic_map_signed`, 256 float32 values) in blocks of 256, with one float32 scale per block. The
rounding, to the bit (bitsandbytes 0.50's CPU path): scale ``v = x * (1 / absmax256)``; the CPU kernel
then looks the code up in a 65536-entry table: ``j = trunc((clamp(v, -1, 1) + 1) * 0.5 * 65535 + 0.5)`` and
``table[j]`` = the number of float32 midpoints strictly below ``-1 + 2j / 65535``. That is nearest
rounding up to a grid of 3e-5, which only matters for the dense codes near zero. A 256-block of zeros
stores code 0 with scale 0.

**What bitsandbytes stores** for a 4-bit weight under a prefix (``weight`` in a ``Linear4bit``):

    <prefix>                                   uint8 (ceil(n/2), 1)  packed codes, high nibble first
    <prefix>.absmax                            uint8 (nb,) with double quant, else float32 (nb,)
    <prefix>.quant_map                         float32 (16,)         the NF4 table
    <prefix>.nested_absmax                     float32 (ceil(nb/256),)    double quant only
    <prefix>.nested_quant_map                  float32 (256,)             double quant only
    <prefix>.quant_state.bitsandbytes__nf4     uint8: a UTF-8 JSON blob

The blob's fields: ``quant_type`` ("nf4"; "fp4" lives under ``...bitsandbytes__fp4`` and is refused),
``blocksize`` (int), ``dtype`` (the original dtype's torch name, e.g. "bfloat16"), ``shape`` (list of
ints); with double quantization also ``nested_blocksize`` (256), ``nested_dtype`` ("float32") and
``nested_offset`` (float, the mean that was subtracted from the absmax).

This module sits below `lora_core.quant.nf4` and never imports it: its functions read and return plain
fields (tensors, ints, the blob's JSON), and take an NF4 container by its attributes (``packed``,
``absmax``, ``code``, ...). `NF4Tensor.from_bnb_state` builds the container from `read_bnb_fields`.
"""

from __future__ import annotations

import json
import math
from functools import cache
from typing import Any

import torch

# The key suffix of the JSON blob that marks a bitsandbytes NF4 weight (``<weight key>`` + this).
QUANT_STATE_SUFFIX = ".quant_state.bitsandbytes__nf4"

# ---------------------------------------------------------------------------------------------------------
# The 8-bit dynamic map (nested absmax)
# ---------------------------------------------------------------------------------------------------------


def dynamic_map_signed() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (``create_dynamic_map(signed=True)``), float32 ``(256,)``.

    Dettmers 2015 (8-Bit Approximations for Parallelism in Deep Learning): a sign bit, then a run of
    exponent bits that is terminated by an indicator bit, then the fraction. For decade ``i = 0..6`` the
    magnitudes are ``10^(i-6)`` times the midpoints of ``2^i + 1`` points spread linearly over [0.1, 1]
    (2^i values per decade and sign), giving 2·127 values; add 0 and 1, sort.
    """
    values: list[float] = [0.0, 1.0]
    for i in range(7):
        edges = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        scale = 10.0 ** (i - 6)
        values += (scale * mids).tolist() + (-scale * mids).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32)


@cache
def _dynamic_map_and_lut() -> tuple[torch.Tensor, torch.Tensor]:
    """The dynamic map and bitsandbytes' CPU lookup table: grid point ``j`` (value ``-1 + 2j/65535``) →
    the index of the nearest code, ties to the lower one (= how many midpoints lie strictly below)."""
    code = dynamic_map_signed()
    mids = 0.5 * (code[:-1] + code[1:])
    grid = -1.0 + (2.0 * torch.arange(65536, dtype=torch.float32)) / 65535.0
    lut = torch.bucketize(grid, mids, right=False).to(torch.uint8)  # count of mids < grid
    return code, lut


def quantize_8bit_dynamic(x: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """flat float32 → (uint8 codes into `dynamic_map_signed`, float32 scale per block), bnb CPU rounding."""
    _, lut = _dynamic_map_and_lut()
    n = x.numel()
    pad = (-n) % block_size
    blocks = torch.cat([x, x.new_zeros(pad)]).reshape(-1, block_size)  # zero padding leaves absmax alone
    absmax = blocks.abs().amax(dim=-1)  # (nb,)
    # 0 · inf = nan appears only where absmax == 0; those blocks are overwritten below.
    v = (blocks * (1.0 / absmax)[:, None]).clamp(-1.0, 1.0)
    j = ((v + 1.0) * 0.5 * 65535.0 + 0.5).nan_to_num(0.0).to(torch.int64)  # trunc: values are ≥ 0
    q = lut.to(x.device)[j]
    q = torch.where(absmax[:, None] == 0, torch.zeros_like(q), q)  # bnb writes code 0 for an all-zero block
    return q.reshape(-1)[:n], absmax


# ---------------------------------------------------------------------------------------------------------
# Checking an NF4Tensor's fields (what a checkpoint reader or a kernel launcher needs before indexing)
# ---------------------------------------------------------------------------------------------------------


def check_nf4_fields(q: Any, name: str = "q") -> Any:
    """Check that the fields of ``q`` fit together (sizes, dtypes, block sizes); ValueError naming ``name``
    and the field. What a reader of a checkpoint or a kernel launcher needs before it indexes them."""
    bs = q.block_size
    if isinstance(bs, bool) or not isinstance(bs, int) or not (16 <= bs <= 4096) or bs & (bs - 1):
        raise ValueError(f"{name}.block_size must be a power of two in [16, 4096], got {bs!r}")
    n = q.numel
    nb = -(-n // bs)
    if q.packed.dtype != torch.uint8 or q.packed.numel() != (n + 1) // 2:
        raise ValueError(
            f"{name}.packed must be uint8 with ceil(numel/2) = {(n + 1) // 2} elements for shape "
            f"{tuple(q.shape)}, got {q.packed.dtype} with {q.packed.numel()}"
        )
    if q.code.dtype != torch.float32 or q.code.numel() != 16:
        got = f"{q.code.dtype} {tuple(q.code.shape)}"
        raise ValueError(f"{name}.code must be float32 with 16 entries, got {got}")
    want_absmax = torch.uint8 if q.double_quant else torch.float32
    if q.absmax.dtype != want_absmax or q.absmax.numel() != nb:
        raise ValueError(
            f"{name}.absmax must be {want_absmax} with ceil(numel/block_size) = {nb} entries "
            f"(double_quant={q.double_quant}), got {q.absmax.dtype} with {q.absmax.numel()}"
        )
    if q.double_quant:
        nbs = q.nested_block_size
        bad_nbs = isinstance(nbs, bool) or not isinstance(nbs, int) or nbs <= 0 or nbs & (nbs - 1)
        if q.nested_code is None or q.offset is None or bad_nbs:
            raise ValueError(
                f"{name} has nested_absmax but lacks nested_code/offset or a power-of-two nested_block_size"
            )
        if q.nested_absmax.numel() != -(-nb // nbs) or q.nested_code.numel() != 256:
            raise ValueError(
                f"{name}.nested_absmax must have ceil({nb}/{nbs}) entries and nested_code 256, got "
                f"{q.nested_absmax.numel()} and {q.nested_code.numel()}"
            )
    return q


# ---------------------------------------------------------------------------------------------------------
# The state-dict layout (`NF4Tensor.to_bnb_state` / `NF4Tensor.from_bnb_state` delegate here)
# ---------------------------------------------------------------------------------------------------------


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def to_bnb_state(q: Any, prefix: str = "weight") -> dict[str, torch.Tensor]:
    """The tensors bitsandbytes writes for a 4-bit weight: ``prefix`` (packed, ``(ceil(n/2), 1)``),
    ``prefix.absmax``, ``prefix.quant_map``, with double quantization ``prefix.nested_absmax`` and
    ``prefix.nested_quant_map``, and ``prefix.quant_state.bitsandbytes__nf4`` (a JSON blob as uint8)."""
    meta: dict[str, object] = {
        "quant_type": "nf4",
        "blocksize": q.block_size,
        "dtype": _dtype_name(q.dtype),
        "shape": list(q.shape),
    }
    out = {
        prefix: q.packed.reshape(-1, 1),
        f"{prefix}.absmax": q.absmax,
        f"{prefix}.quant_map": q.code,
    }
    if q.double_quant:
        assert q.offset is not None and q.nested_code is not None  # invariant of double_quant
        out[f"{prefix}.nested_absmax"] = q.nested_absmax
        out[f"{prefix}.nested_quant_map"] = q.nested_code
        meta.update(
            nested_blocksize=q.nested_block_size,
            nested_dtype="float32",
            nested_offset=float(q.offset.item()),
        )
    blob = json.dumps(meta).encode("utf-8")
    out[prefix + QUANT_STATE_SUFFIX] = torch.tensor(list(blob), dtype=torch.uint8)
    return out


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _read_blob(blob: object, key: str) -> dict[str, object]:
    """The quant-state tensor → its JSON object; ValueError naming ``key`` for anything else."""
    if not isinstance(blob, torch.Tensor) or blob.dtype != torch.uint8:
        got = f"a {blob.dtype} tensor" if isinstance(blob, torch.Tensor) else f"a {type(blob).__name__}"
        raise ValueError(f"{key} must be a uint8 tensor holding a UTF-8 JSON object, got {got}")
    raw = bytes(blob.reshape(-1).cpu().tolist())
    try:
        meta = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ValueError(f"{key} is not UTF-8 text ({err})") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{key} is not valid JSON ({err})") from None
    if not isinstance(meta, dict):
        raise ValueError(
            f"{key} must be a JSON object (quant_type, blocksize, dtype, shape, ...), got a JSON "
            f"{type(meta).__name__}"
        )
    return meta


def _check_meta(meta: dict[str, object], key: str, nested: bool) -> tuple[torch.dtype, torch.Tensor | None]:
    """Types and ranges of the blob's fields (``blocksize`` is left to `check_nf4_fields`); returns the
    dtype and, with double quantization, the offset as a float32 0-dim tensor."""
    shape = meta["shape"]
    if not isinstance(shape, list) or not all(_is_int(s) and s >= 0 for s in shape):
        raise ValueError(f"{key}: 'shape' must be a list of non-negative ints, got {shape!r}")
    dtype = getattr(torch, meta["dtype"], None) if isinstance(meta["dtype"], str) else None
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(
            f"{key}: 'dtype' must name a floating-point torch dtype ('bfloat16', 'float16', 'float32', "
            f"'float64'), got {meta['dtype']!r}"
        )
    if not nested:
        return dtype, None
    nbs = meta["nested_blocksize"]
    if not _is_int(nbs) or nbs <= 0 or nbs & (nbs - 1):  # type: ignore[operator]
        raise ValueError(
            f"{key}: 'nested_blocksize' must be a power-of-two int (bitsandbytes: 256), got {nbs!r}"
        )
    off = meta["nested_offset"]
    ok = isinstance(off, (int, float)) and not isinstance(off, bool) and math.isfinite(off)
    offset = torch.tensor(float(off), dtype=torch.float32) if ok else None  # type: ignore[arg-type]
    if offset is None or not bool(torch.isfinite(offset)):
        raise ValueError(
            f"{key}: 'nested_offset' must be a finite number within float32's range, got {off!r}"
        )
    return dtype, offset


def check_bnb_scales(q: Any, prefix: str) -> None:
    """The float tables and scales must be finite (and the scales ≥ 0): a NaN or a negative absmax would
    dequantize to NaN or to sign-flipped weights without any error."""
    checks = [(f"{prefix}.quant_map", q.code, False)]
    if q.double_quant:
        assert q.nested_absmax is not None and q.nested_code is not None  # double_quant's invariant
        checks += [
            (f"{prefix}.nested_absmax", q.nested_absmax, True),
            (f"{prefix}.nested_quant_map", q.nested_code, False),
        ]
    else:
        checks.append((f"{prefix}.absmax", q.absmax, True))
    for key, t, scale in checks:
        if t.numel() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{key} must be finite, got {'NaN' if bool(t.isnan().any()) else 'inf'}")
        if scale and t.numel() and bool((t < 0).any()):
            raise ValueError(f"{key} holds block absolute maxima and must be >= 0, got {float(t.min()):g}")


def read_bnb_fields(tensors: dict[str, torch.Tensor], prefix: str = "weight") -> dict[str, Any]:
    """Read what `to_bnb_state` (or bitsandbytes' ``Linear4bit.state_dict``) wrote under ``prefix``: the
    NF4 container's fields, as keyword arguments (``NF4Tensor(**fields)``; `NF4Tensor.from_bnb_state`
    builds it and checks it with `check_nf4_fields` and `check_bnb_scales`).

    Args:
        tensors: the state dict (or the part of it under ``prefix``).
        prefix: the weight's key, e.g. ``"model.layers.0.mlp.down_proj.weight"``.

    Raises:
        ValueError: FP4; a missing key; a quant-state blob that is not a uint8 UTF-8 JSON object, or whose
            fields have the wrong type or range (``shape`` a list of ints ≥ 0, ``dtype`` a floating-point
            torch dtype, ``nested_offset`` finite in float32, ...); sizes / dtypes that do not fit the
            recorded shape; a NaN / inf table or scale, or a negative scale.
        TypeError: an entry that is not a tensor.
    """
    key = prefix + QUANT_STATE_SUFFIX
    if key not in tensors:
        fp4 = f"{prefix}.quant_state.bitsandbytes__fp4"
        if fp4 in tensors:
            raise ValueError(f"{fp4!r}: FP4 weights are not supported (NF4 only)")
        raise ValueError(f"missing key {key!r}")
    meta = _read_blob(tensors[key], key)
    if meta.get("quant_type") != "nf4":
        raise ValueError(f"{key}: quant_type {meta.get('quant_type')!r} is not 'nf4'")
    nested = "nested_blocksize" in meta or f"{prefix}.nested_absmax" in tensors
    needed = [prefix, f"{prefix}.absmax", f"{prefix}.quant_map"]
    needed += [f"{prefix}.nested_absmax", f"{prefix}.nested_quant_map"] if nested else []
    missing = [k for k in needed if k not in tensors]
    missing += [f"{key}: {k}" for k in ("blocksize", "dtype", "shape") if k not in meta]
    missing += [f"{key}: {k}" for k in ("nested_blocksize", "nested_offset") if nested and k not in meta]
    if missing:
        raise ValueError(f"incomplete NF4 entry {prefix!r}: missing {missing}")
    for k in needed:
        if not isinstance(tensors[k], torch.Tensor):
            raise TypeError(f"{k} must be a torch.Tensor, got {type(tensors[k]).__name__}")
    dtype, offset = _check_meta(meta, key, nested)
    packed = tensors[prefix].reshape(-1)
    if packed.dtype != torch.uint8:  # bnb's quant_storage may be another dtype; the bytes are the same
        packed = packed.contiguous().view(torch.uint8)
    return dict(
        packed=packed,
        absmax=tensors[f"{prefix}.absmax"].reshape(-1),
        shape=torch.Size(meta["shape"]),  # type: ignore[arg-type]
        dtype=dtype,
        block_size=meta["blocksize"],  # type: ignore[arg-type]
        code=tensors[f"{prefix}.quant_map"].float(),
        nested_absmax=tensors[f"{prefix}.nested_absmax"].float() if nested else None,
        nested_code=tensors[f"{prefix}.nested_quant_map"].float() if nested else None,
        nested_block_size=meta["nested_blocksize"] if nested else None,  # type: ignore[arg-type]
        offset=offset.to(packed.device) if offset is not None else None,
    )


__all__ = [
    "QUANT_STATE_SUFFIX",
    "check_bnb_scales",
    "check_nf4_fields",
    "dynamic_map_signed",
    "read_bnb_fields",
    "to_bnb_state",
]
