"""Quantized checkpoints: save / load a model with NF4 bases (and its adapters) with safetensors, and read
a Hugging Face checkpoint that bitsandbytes pre-quantized straight into `NF4Tensor`s.

One format serves both: a 4-bit weight ``<path>.weight`` is stored as bitsandbytes stores it,

    <path>.weight                                   uint8 (ceil(n/2), 1)   packed codes, high nibble first
    <path>.weight.absmax                            uint8 (nb,) with double quant, else float32
    <path>.weight.quant_map                         float32 (16,)          the NF4 table
    <path>.weight.nested_absmax                     float32 (ceil(nb/256),)        (double quant only)
    <path>.weight.nested_quant_map                  float32 (256,)                 (double quant only)
    <path>.weight.quant_state.bitsandbytes__nf4     uint8 JSON: quant_type, blocksize, dtype, shape,
                                                    nested_blocksize, nested_dtype, nested_offset

so a file written here loads into bitsandbytes / transformers and theirs load here. Everything else
(biases, adapters, dense layers) is stored as it is in ``model.state_dict()``.
"""

from __future__ import annotations

import os

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lora_core.atomic import atomic_write
from lora_core.quant.bnb import QUANT_STATE_SUFFIX
from lora_core.quant.nf4 import NF4Tensor


def save_quantized(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Save ``model.state_dict()`` (NF4 bases in bitsandbytes' layout, adapters, everything else) to one
    safetensors file. Shared tensors (e.g. tied embeddings) are stored once per key (copied)."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    seen: dict[int, str] = {}
    for key, value in state.items():  # safetensors refuses aliased storages
        ptr = value.untyped_storage().data_ptr() if value.numel() else -1
        if ptr in seen:
            state[key] = value.clone()
        elif ptr != -1:
            seen[ptr] = key
    atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt", "lora_core": "nf4"}))


def load_quantized(model: nn.Module, path: str | os.PathLike[str], strict: bool = True) -> nn.Module:
    """Load a file written by `save_quantized` (or a bitsandbytes-quantized state dict) into ``model``,
    which must already have the same structure (e.g. ``apply_lora(model, LoraConfig(quantize="nf4"))``).
    NF4 tensors land on the device the model's NF4 weights are on. Returns ``model``."""
    state = load_file(os.fspath(path))
    result = model.load_state_dict(state, strict=strict)
    if not strict and (result.missing_keys or result.unexpected_keys):
        import warnings

        warnings.warn(f"load_quantized: {result}", UserWarning, stacklevel=2)
    return model


def read_bnb_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | NF4Tensor]:
    """Group a bitsandbytes-quantized state dict: every ``<name>`` that has ``<name>.quant_state.
    bitsandbytes__nf4`` becomes one `NF4Tensor` under ``<name>``; other keys pass through unchanged.

    Raises:
        ValueError: an FP4 weight (``...bitsandbytes__fp4``), or a quantized entry that is incomplete or
            malformed (see `NF4Tensor.from_bnb_state`); the message names the key.
        TypeError: an entry of a quantized weight that is not a tensor.
    """
    fp4 = [k for k in state if k.endswith(".quant_state.bitsandbytes__fp4")]
    if fp4:
        raise ValueError(f"FP4 weights are not supported (NF4 only): {fp4[:3]}")
    names = [k[: -len(QUANT_STATE_SUFFIX)] for k in state if k.endswith(QUANT_STATE_SUFFIX)]
    out: dict[str, torch.Tensor | NF4Tensor] = {}
    used: set[str] = set()
    for name in names:
        keys = {k for k in state if k == name or k.startswith(name + ".")}
        out[name] = NF4Tensor.from_bnb_state({k: state[k] for k in keys}, name)
        used |= keys
    out.update({k: v for k, v in state.items() if k not in used})
    return out


def load_bnb_checkpoint(path: str | os.PathLike[str]) -> dict[str, torch.Tensor | NF4Tensor]:
    """Read a bitsandbytes pre-quantized safetensors file (a Hugging Face ``model.safetensors`` saved with
    ``load_in_4bit``/``bnb_4bit_quant_type="nf4"``) into NF4 tensors; see `read_bnb_state_dict`."""
    return read_bnb_state_dict(load_file(os.fspath(path)))


__all__ = ["load_bnb_checkpoint", "load_quantized", "read_bnb_state_dict", "save_quantized"]
