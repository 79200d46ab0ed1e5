"""lora_core: LoRA and QLoRA for PyTorch, from scratch.

The public surface is what ``__all__`` lists; everything else is internal. Importing lora_core never
imports Triton or transformers: the Triton kernels (``lora_core.kernels``) load on first use on a GPU.
"""

from __future__ import annotations

__version__ = "0.1.0"

from lora_core.dispatch import fused_mode
from lora_core.inference.sampling import SamplingConfig, generate
from lora_core.lora.adapters import load_adapter, save_adapter
from lora_core.lora.combine import add_weighted_adapter
from lora_core.lora.config import LoraConfig
from lora_core.lora.conv import LoRAConv
from lora_core.lora.embedding import LoRAEmbedding
from lora_core.lora.fused import fused_dora_linear, fused_lora_linear
from lora_core.lora.layer import LoRALinear
from lora_core.lora.multi import (
    active_adapters,
    delete_adapter,
    disable_adapter,
    list_adapters,
    mixed_adapters,
    set_adapter,
)
from lora_core.lora.nf4_linear import nf4_linear
from lora_core.lora.optim import loraplus_optimizer, loraplus_param_groups
from lora_core.lora.qlora import NF4Linear, QLoRALinear
from lora_core.lora.surgery import (
    TrainableReport,
    apply_lora,
    get_lora_config,
    merge_lora,
    trainable_parameters,
    unload_lora,
    unmerge_lora,
)
from lora_core.models.streaming import load_pretrained
from lora_core.models.tiny import CharTokenizer, TinyCausalLM, TinyConfig, TinyForSequenceClassification
from lora_core.quant.checkpoint import (
    load_bnb_checkpoint,
    load_quantized,
    read_bnb_state_dict,
    save_quantized,
)
from lora_core.quant.nf4 import NF4Tensor, dequantize_nf4, quantize_nf4
from lora_core.training.config import TrainConfig
from lora_core.training.data import PackedDataset, load_dataset
from lora_core.training.loop import TrainingDiverged, TrainResult, evaluate, train
from lora_core.training.losses import causal_lm_hidden_and_head, causal_lm_loss, chunked_causal_lm_loss
from lora_core.training.model_shapes import ModelShape
from lora_core.training.planner import MemoryPlan, plan_memory

__all__: list[str] = [
    "__version__",
    # LoRA layers and model surgery
    "LoRAConv",
    "LoRAEmbedding",
    "LoRALinear",
    "LoraConfig",
    "TrainableReport",
    "apply_lora",
    "get_lora_config",
    "load_adapter",
    "loraplus_optimizer",
    "loraplus_param_groups",
    "load_pretrained",
    "merge_lora",
    "save_adapter",
    "trainable_parameters",
    "unload_lora",
    "unmerge_lora",
    # several adapters in one model (issue 15)
    "active_adapters",
    "add_weighted_adapter",
    "delete_adapter",
    "disable_adapter",
    "list_adapters",
    "mixed_adapters",
    "set_adapter",
    # NF4 quantization and QLoRA
    "NF4Linear",
    "NF4Tensor",
    "QLoRALinear",
    "dequantize_nf4",
    "load_bnb_checkpoint",
    "load_quantized",
    "nf4_linear",
    "quantize_nf4",
    "read_bnb_state_dict",
    "save_quantized",
    # fused LoRA / QLoRA / DoRA autograd Functions (the default path on CUDA)
    "fused_dora_linear",
    "fused_lora_linear",
    "fused_mode",
    # training loop, data and the tiny built-in model
    "TrainConfig",
    "TrainResult",
    "TrainingDiverged",
    "evaluate",
    "train",
    "PackedDataset",
    "load_dataset",
    "CharTokenizer",
    "TinyCausalLM",
    "TinyConfig",
    "TinyForSequenceClassification",
    # text generation with the library's sampler (issue 18)
    "SamplingConfig",
    "generate",
    # chunked causal-LM loss (issue 10): no (tokens × vocab) fp32 logits
    "causal_lm_hidden_and_head",
    "causal_lm_loss",
    "chunked_causal_lm_loss",
    # will it fit? per-GPU memory from the model's shapes (issue 19)
    "MemoryPlan",
    "ModelShape",
    "plan_memory",
]
