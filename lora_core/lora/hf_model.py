"""What a transformers model needs around the LoRA surgery, kept true by ``apply_lora`` and ``unload_lora``
(nothing here imports transformers: the model is read through its modules and ``model.config``).

**The quantization, recorded.** A model with NF4 layers (``quantize="nf4"``: `QLoRALinear` targets and,
with ``quantize_base``, `NF4Linear` for the rest) has a state dict in bitsandbytes' layout already
(``lora_core.quant.bnb``: ``weight`` packed uint8 ``(ceil(n/2), 1)``, ``weight.absmax``, ``weight.quant_map``,
``weight.nested_*``, ``weight.quant_state.bitsandbytes__nf4``). What was missing for ``save_pretrained`` /
``from_pretrained`` is the ``quantization_config`` bitsandbytes writes into ``config.json``: without it
transformers builds a dense model and refuses the packed ``(ceil(n/2), 1)`` weights. `record_quantization`
sets ``model.config.quantization_config`` to what ``BitsAndBytesConfig(load_in_4bit=True,
bnb_4bit_quant_type="nf4", ...).to_dict()`` gives, with ``llm_int8_skip_modules`` = the linear layers that
stay dense (the output head, ``modules_to_save``, the non-targets without ``quantize_base``), so
``AutoModelForCausalLM.from_pretrained(folder)`` (with bitsandbytes installed) builds a ``Linear4bit`` for
exactly the NF4 layers and loads their bytes as they are; ``apply_lora`` / ``load_adapter`` adopt them
again (``lora_core.lora.bnb_models``). Block size and double quantization are per weight, in its quant-state
blob. A ``quantization_config`` lora_core did not write (a model loaded 4-bit by bitsandbytes) is left alone.

**Gradients through frozen embeddings.** Under reentrant activation checkpointing
(``torch.utils.checkpoint(..., use_reentrant=True)``) a block whose inputs do not require grad yields no
gradients for its parameters: with the whole base frozen the embedding output does not, so the LoRA weights
inside checkpointed blocks get none. transformers' ``enable_input_require_grads`` (what PEFT's
``get_peft_model`` / ``prepare_model_for_kbit_training`` call) registers a forward hook on the input
embeddings that marks their output as requiring grad; `enable_input_grads` registers the same hook, once,
whatever the order of ``apply_lora`` and ``gradient_checkpointing_enable``, and `disable_input_grads`
(``unload_lora``) removes it. The hook is a module-level function, so ``copy.deepcopy`` and pickling of the
model keep working, and it acts only while grad mode is on (never under ``no_grad`` / ``inference_mode``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lora_core.lora.bases import NF4Base, NF4Linear, is_bnb_4bit, linear_features
from lora_core.lora.layer import LoRALinear

RECORDED_ATTR = "_lora_quantization_recorded"  # True while config.quantization_config is lora_core's


# ---- the quantization, recorded --------------------------------------------------------------------------
def bnb_quantization_config(model: nn.Module) -> dict[str, Any] | None:
    """bitsandbytes' ``quantization_config`` (``BitsAndBytesConfig.to_dict()``'s keys) describing the
    model's 4-bit layers, or None when it has none. ``bnb_4bit_compute_dtype`` is the first NF4 weight's
    dtype (the dtype it was quantized from), ``bnb_4bit_use_double_quant`` whether any uses it."""
    dtypes: list[torch.dtype] = []
    double: list[bool] = []
    dense: list[str] = []
    inside = None  # the path of the LoRA / NF4 layer whose children are being walked (its lora_A, lora_B)
    for path, module in model.named_modules():
        if inside is not None and path.startswith(inside):
            continue
        base = module.base if isinstance(module, (LoRALinear, NF4Linear)) else None
        if isinstance(base, NF4Base):
            dtypes.append(base.q.dtype)
            double.append(base.q.double_quant)
        elif is_bnb_4bit(module):  # a bitsandbytes Linear4bit left as it is (quantize="none")
            state = module.weight.quant_state
            dtypes.append(state.dtype)
            double.append(bool(getattr(state, "nested", False)))
        elif isinstance(module, LoRALinear) or linear_features(module) is not None:
            dense.append(path)  # stays a dense nn.Linear / Conv1D in the plain model
        if isinstance(module, (LoRALinear, NF4Linear)):
            inside = path + "."
    if not dtypes:
        return None
    return {
        "quant_method": "bitsandbytes",
        "_load_in_4bit": True,
        "_load_in_8bit": False,
        "load_in_4bit": True,
        "load_in_8bit": False,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": any(double),
        "bnb_4bit_compute_dtype": str(dtypes[0]).removeprefix("torch."),
        "bnb_4bit_quant_storage": "uint8",
        "llm_int8_skip_modules": dense,  # explicit, so transformers adds no default skips of its own
        "llm_int8_threshold": 6.0,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_enable_fp32_cpu_offload": False,
    }


def record_quantization(model: nn.Module) -> None:
    """Make ``model.config.quantization_config`` describe the model's NF4 layers (module docstring): set it
    when the model has some, remove the one lora_core set when it has none any more. No-op for a model
    without a transformers-style ``config`` and for a ``quantization_config`` lora_core did not write."""
    config = getattr(model, "config", None)
    if config is None or not callable(getattr(config, "to_dict", None)):
        return
    ours = model.__dict__.get(RECORDED_ATTR, False)
    if not ours and getattr(config, "quantization_config", None) is not None:
        return  # bitsandbytes' own (the model was loaded in 4 bit): true as it is
    record = bnb_quantization_config(model)
    if record is not None:
        config.quantization_config = record
        object.__setattr__(model, RECORDED_ATTR, True)
    elif ours:
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        object.__delattr__(model, RECORDED_ATTR)


# ---- gradients through frozen embeddings -------------------------------------------------------------------
def _inputs_require_grad(module: nn.Module, args: Any, output: Any) -> None:
    """Forward hook on the input embeddings: their output requires grad (transformers'
    ``make_inputs_require_grads``), so reentrant checkpointing passes gradients to the blocks' LoRA."""
    if torch.is_grad_enabled() and isinstance(output, Tensor) and output.is_floating_point():
        if not output.requires_grad:
            output.requires_grad_(True)


def _input_embeddings(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_input_embeddings", None)
    if not callable(get):
        return None
    try:
        emb = get()
    except (NotImplementedError, AttributeError):  # transformers' way of saying "this model has none"
        return None
    return emb if isinstance(emb, nn.Module) else None


def enable_input_grads(model: nn.Module) -> None:
    """Register `_inputs_require_grad` on ``model.get_input_embeddings()`` unless it is there already
    (idempotent); no-op for a model without input embeddings."""
    emb = _input_embeddings(model)
    if emb is not None and not any(h is _inputs_require_grad for h in emb._forward_hooks.values()):
        emb.register_forward_hook(_inputs_require_grad)


def disable_input_grads(model: nn.Module) -> None:
    """Remove every `_inputs_require_grad` hook from ``model``'s modules (transformers' own hooks stay)."""
    for module in model.modules():
        for key in [k for k, h in module._forward_hooks.items() if h is _inputs_require_grad]:
            del module._forward_hooks[key]


__all__ = [
    "bnb_quantization_config",
    "disable_input_grads",
    "enable_input_grads",
    "record_quantization",
]
