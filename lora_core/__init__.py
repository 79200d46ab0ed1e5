"""lora_core: LoRA and QLoRA for PyTorch, from scratch.

The public surface is what ``__all__`` lists; everything else is internal. Importing lora_core never
imports Triton or transformers: the Triton kernels (``lora_core.kernels``) load on first use on a GPU.
"""

from __future__ import annotations

__version__ = "0.1.0"

from lora_core.adapters import load_adapter, save_adapter
from lora_core.config import LoraConfig
from lora_core.layers import LoRALinear
from lora_core.model import (
    TrainableReport,
    apply_lora,
    get_lora_config,
    merge_lora,
    trainable_parameters,
    unload_lora,
    unmerge_lora,
)

__all__: list[str] = [
    # LoRA layers and model surgery (issue 4)
    "LoRALinear",
    "LoraConfig",
    "TrainableReport",
    "__version__",
    "apply_lora",
    "get_lora_config",
    "load_adapter",
    "merge_lora",
    "save_adapter",
    "trainable_parameters",
    "unload_lora",
    "unmerge_lora",
]

# Training loop, data and the tiny built-in model (issue 8)
from lora_core.data import PackedDataset, load_dataset
from lora_core.models.tiny import CharTokenizer, TinyCausalLM, TinyConfig, TinyForSequenceClassification
from lora_core.train import TrainConfig, TrainingDiverged, TrainResult, evaluate, train

__all__ += [
    "CharTokenizer",
    "PackedDataset",
    "TinyCausalLM",
    "TinyConfig",
    "TinyForSequenceClassification",
    "TrainConfig",
    "TrainResult",
    "TrainingDiverged",
    "evaluate",
    "load_dataset",
    "train",
]
