"""End-to-end fine-tuning benchmark: one model trained four ways, tokens/s and peak GPU memory.

    a  lora_core QLoRA       NF4 base (``apply_lora(quantize="nf4", device=...)``), fused LoRA, chunked loss
    b  PEFT + bitsandbytes   ``from_pretrained(BitsAndBytesConfig(nf4, double quant, bf16 compute))``,
                             ``prepare_model_for_kbit_training``, ``get_peft_model``, the model's own loss
    c  lora_core LoRA        bf16 base, fused LoRA, chunked loss
    d  PEFT LoRA             bf16 base, ``get_peft_model``, the model's own loss
    b0 (optional)            b without ``prepare_model_for_kbit_training`` (its fp32 norms/embeddings/head)

The model is a transformers ``LlamaForCausalLM`` from a config with random weights (no download), written
once to a temporary safetensors checkpoint that every case loads fresh, as a user would load a pretrained
model: ``default``: hidden 2048, intermediate 5632, 12 layers, 16 heads, vocab 32000, bf16, batch 4 × 1024,
no gradient checkpointing; ``7b``: hidden 4096, intermediate 11008, 32 layers, 32 heads, batch 1 × 2048,
gradient checkpointing. LoRA r = 16, α = 32 on q, k, v, o, gate, up, down; AdamW (fused, also on a CPU;
the same for every case). Every case trains on the same random token batches (labels = inputs).

Each case is timed by its own plain step loop — forward, loss, backward, ``AdamW.step``, ``zero_grad`` —
so it measures the library, not a trainer. Warm-up steps are excluded; the timed steps run between two
``torch.cuda.synchronize()``; ``torch.cuda.max_memory_allocated`` is reset after loading (the weights count,
they are allocated) and read after the last step. The setup's own peak (``load_peak_gib``) is recorded too:
case a quantizes on the GPU one layer at a time from a CPU copy, so it never holds the bf16 model there.

Checks, printed as pass/fail: ``default``: a ≥ 1.3 × b's tokens/s at ≤ b's peak memory; ``7b``: a uses less
memory than b and is faster. The first step's loss of every case is recorded: a ≈ b and c ≈ d show that the
cases train the same model (B = 0 at the start, so it is the base model's loss).

Writes ``bench_e2e_<case>.json`` (device, versions, config, every number) and ``bench_e2e_<case>.png``.
Needs CUDA (exit 2 without), except ``--device cpu --tiny``: a 2-layer, hidden-64 smoke run on the CPU.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lora_core.bench.common import write_json
from lora_core.bench.e2e_cases import (
    CASES,
    GIB,
    MODELS,
    TARGET_MODULES,  # noqa: F401  (re-exported: read here by tests)
    build_case,
    case_label,
    free_memory,
    meta,
    model_dtype,
    param_dtype,
    profile_steps,
    quiet_libraries,
    train_step,
    write_checkpoint,
)
from lora_core.bench.e2e_report import MALLOC_CASES, evaluate_targets, format_table, loss_agreement, plot
from lora_core.one_line_parser import OneLineParser


def run_case(key: str, ckpt: Path, spec: dict[str, Any], args: argparse.Namespace, device: torch.device,
             batches: Sequence[torch.Tensor]) -> dict[str, Any]:  # fmt: skip
    """Load a fresh model, train ``warmup + steps`` steps; tokens/s, peak memory, losses."""
    cuda = device.type == "cuda"
    free_memory(device)
    start_alloc = torch.cuda.memory_allocated() if cuda else 0
    model, loss_fn, opt, params, load_s = build_case(key, ckpt, spec, args, device)
    load_peak = torch.cuda.max_memory_allocated() if cuda else None
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    losses, events, t_start = [], [], 0.0
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            if cuda:
                torch.cuda.synchronize()
            t_start = time.perf_counter()
        ids = batches[step % len(batches)]
        ev = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) if cuda else None
        t_step = time.perf_counter()
        if ev:
            ev[0].record()
        loss = train_step(model, loss_fn, opt, ids)
        losses.append(loss)
        if ev:
            ev[1].record()
            events.append(ev)
        else:
            events.append(time.perf_counter() - t_step)
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t_start
    profile = None
    if args.profile:  # two more steps under the profiler: where the time goes (not in the numbers above)
        profile = profile_steps(lambda i: train_step(model, loss_fn, opt, batches[i % len(batches)]), cuda,
                                 args.out / f"bench_e2e_{args.case_name}_profile_{key}.txt")  # fmt: skip
    step_ms = [e[0].elapsed_time(e[1]) if cuda else 1e3 * e for e in events][args.warmup :]
    tokens = args.steps * batches[0].numel()
    row = {
        "case": key, "label": case_label(key, model_dtype(spec)), "ran": True,
        "tokens_per_s": tokens / elapsed,
        "step_ms_median": float(torch.tensor(step_ms).median()), "step_ms": step_ms,
        "peak_gib": torch.cuda.max_memory_allocated() / GIB if cuda else None,
        "load_peak_gib": load_peak / GIB if load_peak is not None else None,
        "start_allocated_gib": start_alloc / GIB, "load_s": load_s,
        "trainable_params": sum(p.numel() for p in params),
        "loss_first": float(losses[0]), "loss_last": float(losses[-1]),
        "profile": profile,
        "dtypes": {"embed": param_dtype(model, "embed_tokens.weight"),
                   "lm_head": param_dtype(model, "lm_head.weight"),
                   "final_norm": param_dtype(model, "model.norm.weight")},  # prepare_model_... casts to fp32
    }  # fmt: skip
    return row  # the model dies with this frame; the next case's `free_memory` returns its memory


# ----------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="lora-core bench e2e", description=__doc__.split("\n\n")[0])
    p.add_argument("--case", choices=["default", "7b"], default="default", help="model size (see module doc)")
    p.add_argument("--tiny", action="store_true", help="a 2-layer hidden-64 model (smoke test)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu needs --tiny or --model")
    p.add_argument("--model", choices=["smollm2", "tiny"], default=None,
                   help="CPU only: the real SmolLM2-135M (float32, batch 4×128), or a tiny random Llama; "
                   "each case in its own process, rounds interleaved (lora_core.bench.e2e_cpu)")  # fmt: skip
    p.add_argument("--rounds", type=int, default=5, help="--model: interleaved rounds (--steps over them)")
    p.add_argument("--threads", type=int, default=None, help="--model: torch threads per case (default all)")
    p.add_argument("--keep-freed-memory", choices=list(MALLOC_CASES), default="lora_core",
                   help="--model: which cases run with lc.train's malloc setting (training.host_memory): "
                   "the lora_core cases (what each library's users get), every case (the computation "
                   "alone), or none")  # fmt: skip
    p.add_argument("--cases", nargs="+", choices=list(CASES), default=["a", "b", "c", "d"])
    p.add_argument("--steps", type=int, default=10, help="timed steps per case")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (kernels compile, AdamW state)")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--loss-chunk", type=int, default=None, help="tokens per chunk of lora_core's loss")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", action="store_true", help="also profile 2 steps per case (tables to --out)")
    p.add_argument("--ckpt-dir", type=Path, default=None, help="reuse/keep the random checkpoint here")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="folder for JSON and PNG")
    return p


def _run_cpu_model(args: argparse.Namespace) -> int:
    """``--model``: the per-process, interleaved CPU harness (``lora_core.bench.e2e_cpu``)."""
    problems = [msg for bad, msg in (
        (args.device != "cpu", "--model runs on the CPU: add --device cpu"),
        (args.tiny, "--model and --tiny are two different runs; give one"),
        (args.rounds < 1 or args.steps < args.rounds, "--rounds must be ≥ 1 and --steps ≥ --rounds"),
        (args.warmup < 1, "--warmup must be ≥ 1"),
        (args.threads is not None and args.threads < 1, "--threads must be ≥ 1"),
    ) if bad]  # fmt: skip
    if problems:
        print(f"bench_e2e: {problems[0]}", file=sys.stderr)
        return 2
    from lora_core.bench import e2e_cpu  # it imports this module: imported here, not at the top

    quiet_libraries()
    args.case_name, args.steps_per_round = args.model, args.steps // args.rounds
    args.steps = args.steps_per_round * args.rounds
    return e2e_cpu.run(args)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.model is not None:
        return _run_cpu_model(args)
    if args.device == "cpu" and not args.tiny:
        print("bench_e2e: --device cpu runs the --tiny smoke configuration or a --model "
              "(smollm2: the real SmolLM2-135M)", file=sys.stderr)  # fmt: skip
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_e2e: needs a CUDA GPU (torch.cuda.is_available() is False); nothing timed. "
              "For a CPU smoke run: --device cpu --tiny", file=sys.stderr)  # fmt: skip
        return 2
    if args.steps < 1 or args.warmup < 1:
        print("bench_e2e: --steps and --warmup must be ≥ 1", file=sys.stderr)
        return 2
    quiet_libraries()
    case = args.case_name = "tiny" if args.tiny else args.case
    spec, device = MODELS[case], torch.device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    ckpt = args.ckpt_dir or Path(tempfile.mkdtemp(prefix="bench_e2e_ckpt_"))
    try:
        if not (ckpt / "config.json").exists():
            ckpt.mkdir(parents=True, exist_ok=True)
            write_checkpoint(spec, ckpt, device, args.seed)
        gen = torch.Generator().manual_seed(args.seed + 1)
        shape = (spec["batch"], spec["seq"])
        batches = [torch.randint(0, spec["vocab_size"], shape, generator=gen).to(device) for _ in range(4)]
        rows = []
        for key in args.cases:
            print(f"bench_e2e [{case}] case {key}: {CASES[key]} ...", file=sys.stderr, flush=True)
            try:
                rows.append(run_case(key, ckpt, spec, args, device, batches))
            except (ImportError, RuntimeError, ValueError, TypeError) as err:  # bnb/PEFT missing, OOM, ...
                rows.append({"case": key, "label": case_label(key, model_dtype(spec)), "ran": False,
                             "skipped": f"{type(err).__name__}: {err}"[:500]})  # fmt: skip
                free_memory(device)
    finally:
        if args.ckpt_dir is None:
            shutil.rmtree(ckpt, ignore_errors=True)
    checks = evaluate_targets(case, rows)
    info = meta(case, spec, args, device)
    info.update(targets=checks, loss_agreement=loss_agreement(rows),
                ran=[r["case"] for r in rows if r["ran"]],
                skipped={r["case"]: r["skipped"] for r in rows if not r["ran"]})  # fmt: skip
    json_path, png_path = args.out / f"bench_e2e_{case}.json", args.out / f"bench_e2e_{case}.png"
    write_json(json_path, info, rows)
    plotted = plot(png_path, case, rows, info)
    print(format_table(case, rows, checks))
    print(f"loss₀ agreement: {info['loss_agreement']}")
    print(f"wrote {json_path}" + (f" and {png_path.name}" if plotted else ""))
    return 0 if all(r["ran"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
