"""lora_core: LoRA and QLoRA for PyTorch, from scratch.

The public surface is what ``__all__`` lists; everything else is internal. Importing lora_core never
imports Triton or transformers: the Triton kernels (``lora_core.kernels``) load on first use on a GPU.
"""

from __future__ import annotations

__version__ = "0.1.0"

from lora_core.data import PackedDataset, load_dataset
from lora_core.models.tiny import CharTokenizer, TinyCausalLM, TinyConfig, TinyForSequenceClassification
from lora_core.train import TrainConfig, TrainingDiverged, TrainResult, evaluate, train

__all__: list[str] = [
    # training (lora_core.train, lora_core.data, lora_core.models.tiny)
    "CharTokenizer",
    "PackedDataset",
    "TinyCausalLM",
    "TinyConfig",
    "TinyForSequenceClassification",
    "TrainConfig",
    "TrainResult",
    "TrainingDiverged",
    "__version__",
    "evaluate",
    "load_dataset",
    "train",
]  # fmt: skip
