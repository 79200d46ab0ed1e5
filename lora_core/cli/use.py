"""``lora-core generate`` and ``lora-core export``: use a fine-tune, from the command line.

    base model ─┬─ (no adapter) ─────────────────────────────────────────────┬─ generate: stream text
                └─ + adapter, merged onto the base it was trained on (below) ─┴─ export: one GGUF file

*The base it was trained on*: an adapter trained with QLoRA learned ``s·BA`` against the dequantized NF4
weights ``dequant(NF4(W₀))``, not against ``W₀``. ``finetune`` records the quantization in
``adapter_config.json`` (``lora_core_quantization``), and ``load_merged`` merges onto that same base by
default (``--onto trained``), or onto the original dense weights (``--onto dense``) or an NF4 base
(``--onto nf4``, e.g. for a QLoRA adapter PEFT trained, which records nothing). Either way the result is
a plain dense model holding ``W + s·BA`` exactly (``unload_lora(dequantize=True)``).

The parsers are added to ``lora-core``'s by ``add_parsers``; every flag is checked before a model loads.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from lora_core.cli.common import TINY, CliError, load_model, pick_device, read_json

ONTO = ("trained", "nf4", "dense")


def add_parsers(sub: Any) -> None:
    """Add ``generate`` and ``export`` to the ``lora-core`` subparsers."""
    gen = sub.add_parser(
        "generate",
        help="generate text with a model (and adapter), streamed as it is produced",
        description="Sample a continuation of --prompt (or, with --chat, the assistant's reply to it).",
    )
    _model_flags(gen)
    gen.add_argument("--prompt", required=True, help="the text to continue (with --chat: the user's message)")
    gen.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template to --prompt")
    add_sampling_flags(gen)
    gen.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")

    ex = sub.add_parser(
        "export",
        help="write the (merged) model as one GGUF file for llama.cpp / ollama",
        description="Merge --adapter (if given) into --model and write a GGUF file (llama architecture).",
    )
    _model_flags(ex)
    ex.add_argument("--out", required=True, help="output .gguf file (must not exist)")
    ex.add_argument("--format", choices=("gguf",), default="gguf", help="file format (default gguf)")
    ex.add_argument(
        "--dtype",
        choices=("f16", "bf16", "q8_0", "f32"),
        default="f16",
        help="weight type (default f16; norms stay f32)",
    )


def _model_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=None,
        help=f"transformers folder, .gguf file, or '{TINY}' (default: the adapter's base, else SmolLM2)",
    )
    parser.add_argument("--adapter", default=None, help="adapter directory (PEFT layout) to merge in")
    parser.add_argument(
        "--onto",
        choices=ONTO,
        default="trained",
        help="base to merge the adapter onto: what it was trained on (default), NF4, or the dense weights",
    )


def add_sampling_flags(parser: argparse.ArgumentParser, *, tokens_and_seed: bool = True) -> None:
    """The sampling flags (``SamplingConfig``'s fields). ``finetune`` adds them for its before/after samples
    too, without ``--max-new-tokens`` and ``--seed`` (it has ``--sample-tokens`` and its own ``--seed``)."""
    from lora_core.inference.sampling import SamplingConfig

    d = SamplingConfig()
    if tokens_and_seed:
        parser.add_argument(
            "--max-new-tokens",
            type=int,
            default=None,
            help=f"tokens to generate (default {d.max_new_tokens})",
        )
        parser.add_argument("--seed", type=int, default=None, help="seed the sampler (reproducible output)")
    parser.add_argument(
        "--temperature",
        type=float,
        default=d.temperature,
        help=f"T >= 0; 0 is greedy (default {d.temperature})",
    )
    parser.add_argument(
        "--top-k", type=int, default=d.top_k, help=f"keep the k likeliest, 0: all (default {d.top_k})"
    )
    parser.add_argument(
        "--top-p",
        type=float,
        default=d.top_p,
        help=f"keep the smallest set with mass >= p, in (0, 1] (default {d.top_p})",
    )
    parser.add_argument(
        "--repetition-penalty",
        type=float,
        default=d.repetition_penalty,
        help=f"CTRL's penalty on seen tokens, 1: none (default {d.repetition_penalty})",
    )
    parser.add_argument(
        "--stop", action="append", default=[], help="stop at this string (repeatable; \\n is a newline)"
    )


def sampling_config(args: argparse.Namespace, max_new_tokens: int) -> Any:
    """``SamplingConfig`` from the flags; a bad value is a ``CliError`` naming the flag."""
    from lora_core.inference.sampling import SamplingConfig, SamplingError

    try:
        return SamplingConfig(
            max_new_tokens=max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            repetition_penalty=args.repetition_penalty,
            # A shell passes "\n" as two characters; a stop at a blank line is the common case.
            stop=tuple(x.replace("\\n", "\n").replace("\\t", "\t") for x in args.stop),
            seed=args.seed,
        )
    except SamplingError as e:
        raise CliError(f"--{e.field.replace('_', '-')} {e.rule}, got {e.value!r}") from None


# ---------------------------------------------------------------------------------------------- models


def load_merged(model_name: str | None, adapter: str | None, onto: str, device: Any) -> tuple[Any, Any, str]:
    """``(model, tokenizer, base_name)``: the base model, with ``adapter`` merged in exactly (see the module
    docstring for ``onto``). Everything about the adapter is checked before the model is changed."""
    import lora_core as lc
    from lora_core.lora.config import LoraConfig

    quant: dict[str, Any] = {"quantize": "none"}
    if adapter is not None:
        config = read_json(Path(adapter) / "adapter_config.json", f"{adapter} is not an adapter directory")
        recorded = LoraConfig.from_peft_dict(config)  # ValueError (exit 2) for a config lora_core cannot use
        if onto == "nf4" or (onto == "trained" and recorded.quantize == "nf4"):
            quant = {
                "quantize": "nf4",
                "quant_block_size": recorded.quant_block_size,
                "double_quant": recorded.double_quant,
            }
        model_name = model_name or config.get("base_model_name_or_path") or None
    elif onto != "trained":
        raise CliError("--onto needs --adapter: it chooses the base weights an adapter is merged onto")
    model, tokenizer, base = load_model(model_name, device)
    if adapter is not None:
        model = lc.load_adapter(model, adapter, **quant)  # ValueError (exit 2) when made for another model
        model = lc.unload_lora(model, dequantize=True)  # W + s·BA exactly, in a plain dense model
    return model.eval(), tokenizer, base


# -------------------------------------------------------------------------------------------- commands


def generate_command(args: argparse.Namespace) -> int:
    """``lora-core generate``: stream the sampled text to stdout as it is produced."""
    from lora_core.inference.sampling import generate

    cfg = sampling_config(args, 128 if args.max_new_tokens is None else args.max_new_tokens)
    if not args.prompt and not args.chat:
        raise CliError("--prompt is empty: give some text to continue")
    if args.adapter is not None and not Path(args.adapter).is_dir():
        raise CliError(f"--adapter: not an adapter directory: {args.adapter}")
    model, tokenizer, _ = load_merged(args.model, args.adapter, args.onto, pick_device(args.device))

    def stream(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()  # a person watches the tokens arrive

    generate(model, tokenizer, args.prompt, cfg, chat=args.chat, on_text=stream)
    sys.stdout.write("\n")
    return 0


def export_command(args: argparse.Namespace) -> int:
    """``lora-core export``: the merged model as a GGUF file (written atomically: all or nothing)."""
    import torch

    from lora_core.atomic import atomic_write
    from lora_core.inference.gguf import check_exportable, write_gguf

    out = Path(args.out)
    if out.exists():
        raise CliError(f"--out {out} already exists; pick a new file name")
    if out.suffix != ".gguf":
        raise CliError(f"--out {out} must end in .gguf")
    if not out.parent.is_dir():
        raise CliError(f"--out: no such directory: {out.parent}")
    if args.adapter is not None and not Path(args.adapter).is_dir():
        raise CliError(f"--adapter: not an adapter directory: {args.adapter}")
    model, tokenizer, base = load_merged(args.model, args.adapter, args.onto, torch.device("cpu"))
    check_exportable(model, tokenizer, args.dtype)  # ValueError (exit 2) before anything is written
    name = Path(base).name + ("-finetuned" if args.adapter else "")  # general.name, shown by llama.cpp
    atomic_write(out, lambda tmp: write_gguf(model, tokenizer, tmp, dtype=args.dtype, name=name))
    size = out.stat().st_size / 2**20
    print(
        f"wrote {out} ({size:.1f} MiB, {args.dtype}); run it with llama.cpp: llama-cli -m {out}",
        file=sys.stderr,
    )
    return 0
