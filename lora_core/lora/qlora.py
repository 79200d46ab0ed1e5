"""QLoRA layers: LoRA adapters over a frozen NF4 base (Dettmers et al. 2023, "QLoRA").

    y = dequant(W_nf4) x + b + s · B A drop(x)        W_nf4 frozen, 4-bit; A, B (and DoRA's m) in float

``QLoRALinear`` is a ``LoRALinear`` holding an `NF4Base` instead of a `DenseBase` (``lora_core.lora.bases``):
the LoRA/rsLoRA/DoRA/PiSSA math is the same code, only the frozen products differ:

    forward              nf4_linear (saves only the packed weight; grad_x = grad_out · dequant(W))
    dense weight         dequantize_nf4
    merge / unmerge      requantize, and record the error (merging into 4 bits is lossy: PEFT only warns)
    unload(dequantize)   a dense merged layer (exact, unless already merged), or a frozen ``NF4Linear``

Checkpoints use bitsandbytes' names: the module's ``weight`` key holds the packed bytes ``(ceil(n/2), 1)``
and ``weight.absmax``, ``weight.quant_map``, ``weight.nested_absmax``, ``weight.nested_quant_map``,
``weight.quant_state.bitsandbytes__nf4`` hold the rest. ``.to(device)`` / ``.cuda()`` move the NF4
tensors and keep their dtypes; ``.half()`` never touches them (the scales stay float32).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from lora_core.lora import inits
from lora_core.lora.bases import NF4Base, NF4Linear, is_bnb_4bit, is_conv1d
from lora_core.lora.layer import LoRALinear


class QLoRALinear(LoRALinear):
    """``LoRALinear`` over a frozen NF4 base (QLoRA). Build it with ``QLoRALinear.from_linear(base, r=...,
    alpha=..., quant_block_size=64, double_quant=True)`` or ``apply_lora`` with ``quantize="nf4"``.

    Args:
        base, r, alpha, dropout, use_rslora, use_dora, fan_in_fan_out: as in ``LoRALinear``. ``base`` may
            already be 4-bit: a bitsandbytes ``Linear4bit`` (nf4) or an `NF4Linear` gives its NF4 bytes
            as they are (then the two settings below are the module's, not these).
        quant_block_size: NF4 block size, a power of two in [16, 4096] (QLoRA: 64).
        double_quant: quantize the block scales too (QLoRA §3, "Double Quantization").
        adapter_name: the first adapter's name, as in ``LoRALinear``.
    """

    def __init__(
        self, base: nn.Module, *, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
        use_dora: bool = False, fan_in_fan_out: bool = False, quant_block_size: int = 64,
        double_quant: bool = True, adapter_name: str = "default",
    ) -> None:  # fmt: skip
        super().__init__(
            base, r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora, use_dora=use_dora,
            fan_in_fan_out=fan_in_fan_out, frozen=NF4Base.from_module(base, quant_block_size, double_quant),
            adapter_name=adapter_name,
        )  # fmt: skip

    @classmethod
    def from_linear(cls, base: nn.Module, *, init: str = "default", **kwargs: Any) -> LoRALinear:
        """As ``LoRALinear.from_linear``; LoftQ (``init="loftq"`` / ``"loftq_iter_<N>"``) starts from
        ``base``'s dense weight (not from its NF4 copy) and leaves its ``Q`` as the base."""
        dense = not (isinstance(base, NF4Linear) or is_bnb_4bit(base))
        if not (dense and isinstance(init, str) and inits.LOFTQ.fullmatch(init)):
            return super().from_linear(base, init=init, **kwargs)
        w = base.weight.detach()
        layer = cls(base, **kwargs)
        layer._loftq_source = w.T if is_conv1d(base) else w  # (out, in), taken by inits.apply_extra_init
        layer.reset_lora_parameters(init, layer.adapter_names()[0])
        return layer

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self.base.describe()}"

    @property
    def requantization_error(self) -> float | None:
        """max |w − dequant(quantize(w))| of the last merge / unmerge / PiSSA init, None before one."""
        return self.base.requantization_error


__all__ = ["NF4Linear", "QLoRALinear"]
