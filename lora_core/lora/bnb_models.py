"""bitsandbytes' 4-bit layers as lora_core reads them, without importing bitsandbytes.

A model loaded with ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")`` holds
``bnb.nn.Linear4bit`` modules: an ``nn.Linear`` whose ``weight`` is a ``Params4bit`` (uint8, the packed
codes, ``(ceil(n/2), 1)``) with a ``quant_state`` (absmax, code table, block size, dtype, shape, and with
double quantization the nested absmax / code / offset). That is lora_core's NF4 layout
(`lora_core.quant.nf4`) byte for byte, so `read_linear4bit` wraps the very same storage in an `NF4Tensor`:
nothing is dequantized, requantized or copied. It reads the quant state through bitsandbytes' own
serialization (``quant_state.as_dict(packed=True)``: the keys its ``state_dict`` writes) and the checks of
`NF4Tensor.from_bnb_state`.

One exception to "the very same storage": on CPUs with AVX-512 BF16, bitsandbytes' first eval-mode,
no-grad forward of a ``Linear4bit`` rewrites its weight in place into a CPU-only layout (nibbles permuted in
blocks of 32 rows, absmax cast to bf16 and transposed, double quantization undone; ``quant_state.
packing_format_for_cpu``). Reading those bytes as NF4 would give wrong weights without any error, so
`read_linear4bit` first asks bitsandbytes to undo it, exactly as bitsandbytes' own ``state_dict`` does
before it writes the layer: the bytes adopted are the bytes bitsandbytes would save.
"""

from __future__ import annotations

from torch import Tensor, nn

from lora_core.quant.nf4 import NF4Tensor


def is_bnb_4bit(module: nn.Module) -> bool:
    """A quantized bitsandbytes 4-bit linear layer (``bnb.nn.Linear4bit``; its ``weight`` is a ``Params4bit``
    with a ``quant_state``), recognised without importing bitsandbytes. An unquantized one (a float weight
    before its first ``.to(device)``) is a plain ``nn.Linear`` here."""
    quant_state = getattr(getattr(module, "weight", None), "quant_state", None)
    return isinstance(module, nn.Linear) and quant_state is not None and hasattr(quant_state, "as_dict")


def read_linear4bit(module: nn.Module) -> NF4Tensor:
    """The NF4 weight of a quantized bitsandbytes ``Linear4bit`` (module docstring), sharing its bytes.

    Raises:
        ValueError: not a quantized Linear4bit, or FP4 (only NF4 is supported).
    """
    if not is_bnb_4bit(module):
        raise ValueError(f"expected a quantized bitsandbytes Linear4bit, got {type(module).__name__}")
    state = module.weight.quant_state
    if getattr(state, "quant_type", "nf4") != "nf4":
        raise ValueError(
            f"bitsandbytes {type(module).__name__} with quant_type={state.quant_type!r}: only 'nf4' can "
            "be adopted (load the model with BitsAndBytesConfig(bnb_4bit_quant_type='nf4'))"
        )
    if getattr(state, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse  # what its state_dict does

        module.weight.data, state = _convert_weight_packed_for_cpu_inverse(module.weight.data, state)
        module.weight.quant_state = state
    tensors = {f"weight.{k}": v for k, v in state.as_dict(packed=True).items()}
    tensors["weight"] = module.weight.data.as_subclass(Tensor)  # (ceil(n/2), 1) packed codes
    return NF4Tensor.from_bnb_state(tensors, "weight")


def check_linear4bits(model: nn.Module, paths: list[str]) -> None:
    """`read_linear4bit` on every quantized Linear4bit among ``paths`` (before any surgery, so a malformed
    weight, e.g. from a damaged checkpoint, fails with the model unchanged).

    Raises:
        ValueError: naming the module's path and what is wrong with its weight.
    """
    for path in paths:
        module = model.get_submodule(path)
        if is_bnb_4bit(module):
            try:
                read_linear4bit(module)
            except (ValueError, TypeError) as err:
                raise ValueError(f"{path or type(model).__name__}: {err}") from None


__all__ = ["check_linear4bits", "is_bnb_4bit", "read_linear4bit"]
