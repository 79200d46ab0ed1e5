"""A real training process for the resume and DDP tests (run as a script, alone or under torchrun).

Trains the tiny model (with LoRA adapters when lora_core has them, else all its weights) on a fixed text
and writes the trained parameters to ``OUT/final.safetensors`` (rank 0). ``--sleep`` slows each step;
``--print-steps`` prints ``step N`` after every optimizer step; ``--hang-after N`` waits after step N, so a
test can kill the process there whatever the machine's load.

``--fsdp`` shards the frozen base (``TrainConfig(fsdp=True)``); ``--variant`` picks the base and the adapter
(``dense-lora``, ``nf4-lora``, ``dense-dora``, ``nf4-dora``; several comma-separated run one after another,
each in ``OUT/<variant>``). Every rank writes ``report-rank<r>.json``: the losses and the frozen-tensor bytes
it held before and after sharding (`lora_core.training.fsdp.frozen_bytes`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

import lora_core as lc
from lora_core.training.data import load_dataset
from lora_core.training.fsdp import frozen_bytes

TEXT = "".join(f"{i} little pigs went to market, and {i * 7 % 13} came home.\n" for i in range(200))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--checkpoint-every", type=int, default=None)
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--sleep", type=float, default=0.0)
    ap.add_argument("--print-steps", action="store_true")
    ap.add_argument("--hang-after", type=int, default=None, help="after this step, wait to be killed")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--fsdp", action="store_true")
    ap.add_argument("--cpu-offload", action="store_true")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument(
        "--variant", default=None, help="comma-separated: dense-lora, nf4-lora, dense-dora, nf4-dora"
    )
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.variant is None:
        run(args, Path(args.out), None)
    else:
        for variant in args.variant.split(","):
            run(args, Path(args.out) / variant, variant)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def run(args: argparse.Namespace, out: Path, variant: str | None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "data.txt").write_text(TEXT)
    train_set, _ = load_dataset(out / "data.txt", lc.CharTokenizer(), block_size=32)
    torch.manual_seed(0)
    model = lc.TinyCausalLM(lc.TinyConfig(dropout=args.dropout), seed=0)
    base, _, adapter = (variant or "dense-lora").partition("-")
    # a variant adapts the head too: a frozen-base holder outside the decoder blocks (its own FSDP unit)
    linear = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
    lora = lc.LoraConfig(
        r=4, alpha=8, dropout=args.dropout, target_modules="all-linear" if variant is None else linear,
        use_dora=adapter == "dora", quantize="nf4" if base == "nf4" else "none",
    )  # fmt: skip
    model = lc.apply_lora(model, lora)
    bytes_before = frozen_bytes(model)

    def on_step(step: int, metrics: dict) -> None:
        if args.print_steps:
            print(f"step {step}", flush=True)
        time.sleep(args.sleep)
        if step == args.hang_after:  # the test kills us here: never mid-write, however loaded the machine
            print(f"hanging pid {os.getpid()}", flush=True)
            time.sleep(600)

    cfg = lc.TrainConfig(
        output_dir=out / "run",
        lr=3e-3,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        max_steps=args.steps,
        warmup_steps=2,
        checkpoint_every=args.checkpoint_every,
        resume=args.resume,
        progress=False,
        on_step=on_step,
        fsdp=args.fsdp,
        cpu_offload=args.cpu_offload,
        gradient_checkpointing=args.gradient_checkpointing,
    )
    result = lc.train(model, train_set, None, cfg)
    # 5 examples: 3 on rank 0, 2 on rank 1 (sharded, every rank must still run as many forwards)
    eval_loss = lc.evaluate(model, train_set.subset(slice(0, 5)), cfg) if variant else None
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    losses = [h["loss"] for h in result.history if "loss" in h]
    report = {
        "frozen_bytes_before": bytes_before,
        "frozen_bytes_after": frozen_bytes(model),
        "state_dict_keys": sorted(model.state_dict()),
        "losses": losses,
        "eval_loss": eval_loss,
    }
    (out / f"report-rank{rank}.json").write_text(json.dumps(report))
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        state = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        save_file(
            state, str(out / f"final{'' if not torch.distributed.is_initialized() else '-rank0'}.safetensors")
        )
    if torch.distributed.is_initialized():  # every rank writes its copy: the test checks they agree
        rank = torch.distributed.get_rank()
        state = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        save_file(state, str(out / f"final-rank{rank}.safetensors"))


if __name__ == "__main__":
    sys.exit(main())
