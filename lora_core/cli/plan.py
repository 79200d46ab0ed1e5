"""``lora-core plan``: will a fine-tune fit? Per-rank memory from the model's shapes (`lc.plan_memory`).

    lora-core plan --model 70b --gpus 2 --gpu-gb 24 --seq 512 --batch 1 --grad-ckpt

prints one row per part (weights, adapters, gradients, optimizer, activations, gathered, overhead) in GiB
per rank, the total, and ``fits: margin X GiB`` or ``does not fit: short by X GiB``. Exit code 0 when it
fits, 1 when it does not, 2 on bad input (one line, like every ``lora-core`` command).
"""

from __future__ import annotations

import argparse
from typing import Any

from lora_core.cli.common import CliError


def add_parser(sub: Any) -> None:
    pl = sub.add_parser(
        "plan",
        help="will a fine-tune fit? per-GPU memory of LoRA/QLoRA on N GPUs (from the model's shapes)",
        description="Estimate per-rank GPU memory (weights, adapters, gradients, optimizer, activations, "
        "FSDP's gathered layers, overhead) and whether it fits. Built-in models: llama-2-7b (7b), "
        "llama-2-13b (13b), llama-2-70b (70b), smollm2-135m; or a folder with a transformers config.json.",
    )
    pl.add_argument("--model", required=True, help="built-in name or a folder holding config.json")
    pl.add_argument("--gpus", type=int, default=1, help="GPUs (ranks), one process each (default 1)")
    pl.add_argument("--gpu-gb", type=float, default=24.0, help="memory per GPU in GiB (default 24)")
    pl.add_argument("--seq", type=int, default=512, help="tokens per sequence (default 512)")
    pl.add_argument("--batch", type=int, default=1, help="sequences per rank per micro-batch (default 1)")
    pl.add_argument("--r", type=int, default=16, help="LoRA rank (default 16)")
    pl.add_argument("--target-modules", default="all-linear", help="comma-separated names or 'all-linear'")
    pl.add_argument("--quantize", choices=("nf4", "none"), default="nf4", help="base weights (default nf4)")
    pl.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16", help="compute dtype")
    pl.add_argument(
        "--grad-ckpt", "--gradient-checkpointing", dest="grad_ckpt", action="store_true",
        help="gradient checkpointing (recompute each block's activations in backward)",
    )  # fmt: skip
    way = pl.add_mutually_exclusive_group()
    way.add_argument("--fsdp", dest="strategy", action="store_const", const="fsdp", help="shard the base")
    way.add_argument("--ddp", dest="strategy", action="store_const", const="ddp", help="replicate the base")
    pl.add_argument(
        "--cpu-offload", action="store_true",
        help="FSDP with CPU offload: base shards, adapters, gradients and AdamW state in CPU memory",
    )  # fmt: skip
    pl.set_defaults(strategy="auto")


def plan_command(args: argparse.Namespace) -> int:
    from lora_core.training.planner import plan_memory

    if args.target_modules.strip() == "all-linear":
        targets: Any = "all-linear"
    else:
        targets = tuple(t.strip() for t in args.target_modules.split(",") if t.strip())
    try:
        plan = plan_memory(
            args.model, gpus=args.gpus, gpu_gb=args.gpu_gb, seq=args.seq, batch=args.batch, r=args.r,
            targets=targets, quantize=args.quantize, dtype=args.dtype, grad_ckpt=args.grad_ckpt,
            strategy=args.strategy, cpu_offload=args.cpu_offload,
        )  # fmt: skip
    except (ValueError, TypeError) as e:  # name the flag, not the library's argument
        message = str(e)
        flags = (("gpu_gb", "--gpu-gb"), ("targets", "--target-modules"), ("model", "--model"),
                 ("cpu_offload", "--cpu-offload"))  # fmt: skip
        for arg, flag in flags:
            message = message.replace(arg, flag, 1) if message.startswith(arg) else message
        first = message.split(" ", 1)[0]
        if first in ("gpus", "seq", "batch", "r", "quantize", "dtype"):
            message = "--" + message
        raise CliError(message) from None
    print(plan.table())
    return 0 if plan.fits else 1


def fsdp_needed(
    model: Any, *, gpus: int, gpu_gb: float, seq: int, batch: int, r: int, targets: str, quantize: str,
    grad_ckpt: bool,
) -> str | None:  # fmt: skip
    """What ``lora-core finetune`` under ``torchrun`` on GPUs does when neither ``--fsdp`` nor ``--ddp`` is
    given: None keeps DDP (it fits, FSDP does not fit either, or the planner cannot read ``model``'s
    shapes); otherwise the one line to print when it shards the base instead (FSDP fits where DDP does not).
    ``targets``: ``--target-modules`` (``all-linear`` or comma-separated names)."""
    from lora_core.training.planner import plan_memory

    names = targets if targets == "all-linear" else tuple(targets.split(","))
    kwargs = dict(gpus=gpus, gpu_gb=gpu_gb, seq=seq, batch=batch, r=r, targets=names, quantize=quantize,
                  grad_ckpt=grad_ckpt)  # fmt: skip
    try:
        ddp, fsdp = (plan_memory(model, strategy=s, **kwargs) for s in ("ddp", "fsdp"))
    except (ValueError, TypeError):  # not a Llama-shaped config.json, a target the planner does not model
        return None
    if ddp.fits or not fsdp.fits:
        return None
    gib = 2**30
    return (
        f"using --fsdp: lora-core plan puts DDP at {ddp.total / gib:.1f} GiB per GPU, more than the "
        f"{gpu_gb:.1f} GiB there, and FSDP at {fsdp.total / gib:.1f} GiB (pass --ddp to keep DDP)"
    )
