"""What the end-to-end benchmarks share: the model specs, the four ways to train (a lora_core QLoRA,
b PEFT + bitsandbytes, c lora_core LoRA, d PEFT LoRA; b0 optional), one training step, the run's metadata.

``lora_core.bench.e2e`` (one process, GPU or the CPU smoke run) and ``lora_core.bench.e2e_cpu`` (one process
per case, the real SmolLM2 on a CPU) build every case with `build_case` and step it with `train_step`.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata as md
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lora_core.atomic import atomic_write_text
from lora_core.bench.common import versions
from lora_core.bench.e2e_report import H100_REFERENCE

MODELS: dict[str, dict[str, Any]] = {
    "default": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 12,
                "num_attention_heads": 16, "vocab_size": 32000, "batch": 4, "seq": 1024, "grad_ckpt": False},
    "7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
           "num_attention_heads": 32, "vocab_size": 32000, "batch": 1, "seq": 2048, "grad_ckpt": True},
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "vocab_size": 512, "batch": 2, "seq": 64, "grad_ckpt": False},
}  # fmt: skip
CASES: dict[str, str] = {
    "a": "lora_core QLoRA (NF4)",
    "b": "PEFT + bitsandbytes QLoRA",
    "c": "lora_core bf16 LoRA",
    "d": "PEFT bf16 LoRA",
    "b0": "PEFT + bnb QLoRA, no prepare_model_for_kbit_training",
}


def case_label(key: str, dtype: torch.dtype) -> str:
    """``CASES[key]`` naming the dtype the LoRA cases really run in (float32 on a CPU, bf16 by default)."""
    short = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))
    return CASES[key].replace("bf16", short)


TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GIB = 2**30


# ----------------------------------------------------------------------------- the model, once on disk


def llama_config(spec: dict[str, Any]) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=spec["hidden_size"], intermediate_size=spec["intermediate_size"],
        num_hidden_layers=spec["num_hidden_layers"], num_attention_heads=spec["num_attention_heads"],
        num_key_value_heads=spec["num_attention_heads"], vocab_size=spec["vocab_size"],
        max_position_embeddings=max(2048, spec["seq"]), tie_word_embeddings=False, use_cache=False,
    )  # fmt: skip


def write_checkpoint(spec: dict[str, Any], folder: Path, device: torch.device, seed: int) -> None:
    """A random-weight bf16 checkpoint (transformers' init, seeded), built on ``device`` for speed."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # initialise in bf16: no fp32 copy of a 7B model
    try:
        with device:
            model = LlamaForCausalLM(llama_config(spec))
    finally:
        torch.set_default_dtype(previous)
    model.save_pretrained(folder)
    del model
    free_memory(device)


# ----------------------------------------------------------------------------- the four ways to train


def model_dtype(spec: dict[str, Any]) -> torch.dtype:
    """The dtype every case loads (and bitsandbytes computes) in: ``spec["dtype"]``, bfloat16 by default."""
    return getattr(torch, spec.get("dtype", "bfloat16"))


def _lora_core_model(ckpt: Path, spec: dict[str, Any], args: argparse.Namespace, device: torch.device,
                     quantize: bool) -> tuple[nn.Module, Callable[..., torch.Tensor]]:  # fmt: skip
    from transformers import LlamaForCausalLM

    from lora_core import LoraConfig, apply_lora, causal_lm_loss

    cfg = LoraConfig(r=args.r, alpha=args.alpha, dropout=args.dropout, target_modules=TARGET_MODULES,
                     quantize="nf4" if quantize else "none")  # fmt: skip
    dtype = model_dtype(spec)
    if quantize:  # dense weights stay on the CPU; each layer is moved, quantized on the GPU, the next...
        model = LlamaForCausalLM.from_pretrained(ckpt, dtype=dtype)
        apply_lora(model, cfg, device=device)
    else:
        model = LlamaForCausalLM.from_pretrained(ckpt, dtype=dtype, device_map={"": device})
        apply_lora(model, cfg)
    if spec["grad_ckpt"]:
        _checkpointing(model, {"use_reentrant": False})  # non-reentrant: no input-requires-grad hook

    def loss_fn(m: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        return causal_lm_loss(m, ids, ids, chunk_size=args.loss_chunk)

    return model, loss_fn


def _peft_model(ckpt: Path, spec: dict[str, Any], args: argparse.Namespace, device: torch.device,
                quantize: bool, prepare: bool = True,
                ) -> tuple[nn.Module, Callable[..., torch.Tensor]]:  # fmt: skip
    import peft
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    dtype = model_dtype(spec)
    if quantize:  # the QLoRA recipe of PEFT's docs (compute dtype: the model's)
        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=dtype)  # fmt: skip
        model = LlamaForCausalLM.from_pretrained(ckpt, quantization_config=bnb, dtype=dtype,
                                                 device_map={"": device})  # fmt: skip
        if prepare:
            model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=spec["grad_ckpt"])
        elif spec["grad_ckpt"]:
            _checkpointing(model, None)
    else:
        model = LlamaForCausalLM.from_pretrained(ckpt, dtype=dtype, device_map={"": device})
        if spec["grad_ckpt"]:
            _checkpointing(model, None)  # transformers' default kwargs, what a PEFT user gets
    cfg = peft.LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=args.dropout,
                          target_modules=TARGET_MODULES, bias="none", task_type="CAUSAL_LM")  # fmt: skip
    model = peft.get_peft_model(model, cfg)

    def loss_fn(m: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        return m(input_ids=ids, labels=ids, use_cache=False).loss

    return model, loss_fn


BUILDERS: dict[str, Callable[..., tuple[nn.Module, Callable[..., torch.Tensor]]]] = {
    "a": lambda *a: _lora_core_model(*a, quantize=True),
    "b": lambda *a: _peft_model(*a, quantize=True),
    "c": lambda *a: _lora_core_model(*a, quantize=False),
    "d": lambda *a: _peft_model(*a, quantize=False),
    "b0": lambda *a: _peft_model(*a, quantize=True, prepare=False),
}


def _checkpointing(model: nn.Module, kwargs: dict[str, Any] | None) -> None:
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers ≥ 5
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)  # type: ignore[operator]


# ----------------------------------------------------------------------------- measuring one case


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def param_dtype(model: nn.Module, suffix: str) -> str | None:
    for name, p in model.named_parameters():
        if name.endswith(suffix):
            return str(p.dtype).replace("torch.", "")
    return None


def train_step(model: nn.Module, loss_fn: Callable[..., torch.Tensor], opt: torch.optim.Optimizer,
          ids: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """One plain training step: forward, loss, backward, AdamW step, zero_grad. Returns the loss."""
    loss = loss_fn(model, ids)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def profile_steps(step: Callable[[int], Any], cuda: bool, path: Path) -> dict[str, Any]:
    """Run two steps under ``torch.profiler``; write the top-30 operator table to ``path``; return the
    wall time and the summed device-kernel time per step (kernel time ≪ wall time: launch-bound)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        for i in range(2):
            step(i)
        if cuda:
            torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / 2
    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = prof.key_averages()
    table = events.table(sort_by=sort, row_limit=30, max_name_column_width=60)
    atomic_write_text(path, table + "\n")
    kernel_us = sum(getattr(e, "self_device_time_total", 0.0) for e in events) / 2 if cuda else None
    return {"wall_ms_per_step": 1e3 * wall, "device_kernel_ms_per_step": None if kernel_us is None
            else kernel_us / 1e3, "table": path.name}  # fmt: skip


def build_case(key: str, ckpt: Path, spec: dict[str, Any], args: argparse.Namespace, device: torch.device,
               ) -> tuple[nn.Module, Callable[..., torch.Tensor], torch.optim.Optimizer, list[nn.Parameter],
                          float]:  # fmt: skip
    """Case ``key``'s model (training mode), loss, AdamW over its trainable parameters, those parameters and
    the seconds loading took."""
    t0 = time.perf_counter()
    model, loss_fn = BUILDERS[key](ckpt, spec, args, device)
    load_s = time.perf_counter() - t0
    model.train()  # from_pretrained returns eval mode; checkpointing only acts in training
    params = [p for p in model.parameters() if p.requires_grad]
    # fused: one kernel over all the adapters' tensors, on a CPU too (torch ≥ 2.4). The for-loop AdamW runs
    # ~10 small ops per tensor (420 tensors for SmolLM2 r = 16): measured 21 ms per step with one thread
    # against 6 fused, and 165 vs 16 ms of CPU with two threads, where every small op is a thread barrier.
    opt = torch.optim.AdamW(params, lr=args.lr, fused=True)
    return model, loss_fn, opt, params, load_s


def meta(case: str, spec: dict[str, Any], args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    meta_versions = versions()
    for pkg in ("transformers", "peft", "accelerate"):
        try:
            meta_versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            meta_versions[pkg] = None
    cuda = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if cuda else f"CPU ({torch.get_num_threads()} threads)"
    return {
        "device": name, "versions": meta_versions, "case": case, "model": spec,
        "target_modules": TARGET_MODULES,
        "r": args.r, "alpha": args.alpha, "dropout": args.dropout, "lr": args.lr,
        "optimizer": "AdamW (fused)",
        "steps": args.steps, "warmup": args.warmup, "loss_chunk": args.loss_chunk,
        "dtype": str(model_dtype(spec)).removeprefix("torch."),
        "timer": "perf_counter between cuda.synchronize() over the timed steps; per-step CUDA events",
        "memory": "torch.cuda.max_memory_allocated, reset after loading, read after the last step",
        "reference_h100": H100_REFERENCE.get(case),
        "cases": {k: case_label(k, model_dtype(spec)) for k in args.cases},
    }  # fmt: skip


def quiet_libraries() -> None:
    """No progress bars, info logs or FutureWarnings from transformers in the benchmark's output."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
