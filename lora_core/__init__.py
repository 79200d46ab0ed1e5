"""lora_core: LoRA and QLoRA for PyTorch, from scratch.

The public surface is what ``__all__`` lists; everything else is internal. Importing lora_core never
imports Triton or transformers: the Triton kernels (``lora_core.kernels``) load on first use on a GPU.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__: list[str] = ["__version__"]
