"""``transformers.Trainer`` on a lora_core model: adapter-only checkpoints in PEFT's layout, and resume.

A plain ``Trainer`` trains a model from ``lc.apply_lora`` as it is, but saves it with
``model.save_pretrained``: the whole base plus the LoRA keys, no ``adapter_config.json``. `LoraTrainer`
changes only what is written and read for the model:

    save_model / every checkpoint   adapter_config.json + adapter_model.safetensors (``lc.save_adapter``:
                                    what PEFT's ``save_pretrained`` writes), training_args.bin, the tokenizer
    resume_from_checkpoint          the adapter tensors copied back into the model (`load_adapter_weights`);
                                    optimizer, scheduler, RNG and trainer state as the Trainer restores them
    load_best_model_at_end          the same, from the best checkpoint
    a bitsandbytes 4-bit model      accepted once lora_core's adapters are on it (a plain Trainer refuses a
                                    model with ``hf_quantizer`` and no PEFT adapter as "purely quantized")
    on a CPU                        glibc's malloc keeps what a step frees for the next (as ``lc.train``)
    gradient_checkpointing=True     nothing to do here: ``apply_lora`` hooks the input embeddings so their
                                    output requires grad (``lora_core.lora.hf_model``), so the checkpointed
                                    blocks pass gradients to the adapters, reentrant or not

Importing this module imports ``transformers`` (``import lora_core`` does not)::

    from lora_core.training.hf_trainer import LoraTrainer
    trainer = LoraTrainer(model=lc.apply_lora(model, cfg), args=TrainingArguments(...), train_dataset=ds)
    trainer.train()                                         # checkpoint-*/adapter_model.safetensors
    trainer.train(resume_from_checkpoint=True)              # picks up the last one
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors.torch import load_file
from torch import nn

from lora_core.lora.adapters import CONFIG_NAME, PREFIX, WEIGHTS_NAME, adapter_state_dict, save_adapter
from lora_core.training.host_memory import keep_freed_memory, release_freed_memory

_UNSET = object()
TRAINING_ARGS_NAME = "training_args.bin"  # transformers' name, so its own tools find the arguments


@torch.no_grad()
def load_adapter_weights(model: nn.Module, path: str | os.PathLike[str]) -> nn.Module:
    """Copy the adapter saved at ``path`` (a folder in PEFT's layout) into ``model``, which already has the
    same LoRA layers (``apply_lora`` with the same config): every tensor ``save_adapter`` writes for this
    model must be there, with its shape; nothing else may be.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: ``model`` has no LoRA layers; the folder has no adapter; a tensor is missing, extra or of
            another shape (the model is unchanged then).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    ours = adapter_state_dict(model)  # raises ValueError without LoRA layers
    file = Path(path) / WEIGHTS_NAME
    if not file.is_file() or not (Path(path) / CONFIG_NAME).is_file():
        raise ValueError(f"path {str(path)!r} holds no adapter ({CONFIG_NAME} + {WEIGHTS_NAME})")
    saved = {k.removeprefix(PREFIX): v for k, v in load_file(str(file)).items()}
    missing = sorted(set(ours) - set(saved))
    extra = sorted(set(saved) - set(ours))
    if missing or extra:
        raise ValueError(f"{file}: does not fit this model: missing {missing[:5]}, unexpected {extra[:5]}")
    for key, param in ours.items():
        if tuple(saved[key].shape) != tuple(param.shape):
            got, want = tuple(saved[key].shape), tuple(param.shape)
            raise ValueError(f"{file}: {key} has shape {got}, the model {want}")
    for key, param in ours.items():
        param.copy_(saved[key])
    return model


class LoraTrainer(transformers.Trainer):
    """A ``transformers.Trainer`` that saves and resumes a lora_core model as an adapter (module docstring).
    Everything else (arguments, callbacks, optimizers, LoRA+ through ``optimizers=(lc.loraplus_optimizer(
    model, ...), None)``) is the Trainer's."""

    def __init__(self, model: nn.Module | None = None, *args: Any, **kwargs: Any) -> None:
        # A model loaded 4-bit by bitsandbytes keeps `hf_quantizer` after apply_lora; the Trainer refuses a
        # quantized model without a PEFT adapter ("purely quantized"); transformers' own flag for "adapters
        # attached" lets it through, for the constructor's check only.
        hide = (
            model is not None
            and getattr(model, "is_quantized", False)
            and any(name.endswith("lora_A.weight") for name, _ in model.named_parameters())
        )
        flag = "_hf_peft_config_loaded"
        before = model.__dict__.get(flag, _UNSET) if model is not None else _UNSET
        if hide:
            model.__dict__[flag] = True
        try:
            super().__init__(model, *args, **kwargs)
        finally:
            if hide and before is _UNSET:
                del model.__dict__[flag]
            elif hide:
                model.__dict__[flag] = before

    def train(self, *args: Any, **kwargs: Any) -> Any:
        """``Trainer.train``; on a CPU with glibc's malloc keeping what a step frees for the next step, as
        ``lc.train`` does (``lora_core.training.host_memory``), and giving it back at the end."""
        on_cpu = self.args.device.type == "cpu"
        if on_cpu:
            keep_freed_memory()
        try:
            return super().train(*args, **kwargs)
        finally:
            if on_cpu:
                release_freed_memory()

    def _save(self, output_dir: str | None = None, state_dict: dict[str, Any] | None = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        model = self.accelerator.unwrap_model(self.model)
        name = getattr(getattr(model, "config", None), "name_or_path", None) or None
        save_adapter(model, output_dir, base_model_name_or_path=name)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        target = self.accelerator.unwrap_model(model if model is not None else self.model)
        load_adapter_weights(target, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        load_adapter_weights(self.accelerator.unwrap_model(self.model), self.state.best_model_checkpoint)


__all__ = ["LoraTrainer", "load_adapter_weights"]
