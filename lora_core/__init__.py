"""lora_core: LoRA and QLoRA for PyTorch, from scratch.

The public surface is what ``__all__`` lists; everything else is internal. Importing lora_core never
imports Triton or transformers: the Triton kernels (``lora_core.kernels``) load on first use on a GPU.
"""

from __future__ import annotations

__version__ = "0.1.0"

from typing import Any

from lora_core.autograd import nf4_linear
from lora_core.checkpoint import load_bnb_checkpoint, load_quantized, read_bnb_state_dict, save_quantized
from lora_core.nf4 import NF4Tensor, dequantize_nf4, quantize_nf4

__all__: list[str] = [
    # NF4 / QLoRA (issue 5)
    "NF4Linear",
    "NF4Tensor",
    "QLoRALinear",
    "__version__",
    "dequantize_nf4",
    "load_bnb_checkpoint",
    "load_quantized",
    "nf4_linear",
    "quantize_nf4",
    "read_bnb_state_dict",
    "save_quantized",
]


def __getattr__(name: str) -> Any:
    # The QLoRA layers build on lora_core.layers; import them on first use.
    if name in ("QLoRALinear", "NF4Linear"):
        from lora_core import qlora

        return getattr(qlora, name)
    raise AttributeError(f"module 'lora_core' has no attribute {name!r}")
