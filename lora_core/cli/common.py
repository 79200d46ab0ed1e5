"""What every ``lora-core`` command shares: the error type, the model names, argument checks, loading a model.

``CliError`` is bad input: ``lora_core.cli`` prints it as one line ``lora-core: error: ...`` and exits 2.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

TINY = "tiny"
SMOLLM2_HUB_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what adapters record as their base


class CliError(Exception):
    """Bad input to the command line: printed as one line, exit code 2."""


def check_output_path(path: Path, flag: str, *, folder: bool) -> None:
    """``path`` can be written as a folder (or a file): it is not the other kind, and no parent is a file."""
    want, other = ("folder", "file") if folder else ("file", "folder")
    if path.exists() and path.is_dir() != folder:
        raise CliError(f"{flag} {path} is a {other}; give a {want}")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise CliError(f"{flag} {path}: {parent} is a file, not a folder")


def check_positive(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise CliError(f"--{name.replace('_', '-')} must be > 0, got {value}")


def load_model(name: str | None, device: Any) -> tuple[Any, Any, str]:
    """``(model, tokenizer, base_name)`` for ``tiny``, a transformers folder, a .gguf file, or the default."""
    from lora_core.models import pretrained

    source = model_source(name)
    if source[0] == TINY:
        from lora_core.models.tiny import CharTokenizer, TinyCausalLM, load_tiny

        model = TinyCausalLM(seed=0) if source[1] is None else load_tiny(source[1])
        return model.to(device), CharTokenizer(), source[2]
    _, folder, base = source
    try:
        model, tokenizer = pretrained.load_hf_causal_lm(folder)
    except OSError as e:  # transformers: no weights, an unreadable config or tokenizer, a bad GGUF file
        raise CliError(f"cannot load the model in {folder}: {e}") from None
    return model.to(device), tokenizer, base


def model_source(name: str | None) -> tuple[str, Path | None, str]:
    """``(kind, path, base_name)`` of ``--model``: kind ``"tiny"`` (path None: the built-in model, or a saved
    tiny model's folder), ``"folder"`` (a transformers folder; the default: SmolLM2's cached one) or
    ``"gguf"`` (a .gguf file, converted to a cached folder when loaded)."""
    from lora_core.models import pretrained

    if name == TINY:
        return TINY, None, TINY
    if name is None or name == SMOLLM2_HUB_NAME:
        return "folder", pretrained.smollm2_folder(), SMOLLM2_HUB_NAME
    path, base = Path(name), str(Path(name).resolve())
    if not path.exists():
        raise CliError(f"model not found: {name} (a transformers folder, a .gguf file, or '{TINY}')")
    if path.is_file() and path.suffix != ".gguf":
        raise CliError(f"{name} is neither a model folder nor a .gguf file")
    if path.is_file():
        return "gguf", path, base
    config = read_json(path / "config.json", f"{name} is not a model folder")
    return (TINY if config.get("model_type") == "lora_core_tiny" else "folder"), path, base


def load_tokenizer(folder: Path) -> Any:
    """The tokenizer of a transformers folder (the model itself is streamed: ``lc.load_pretrained``)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except OSError as e:
        raise CliError(f"cannot load the tokenizer in {folder}: {e}") from None


def read_json(path: Path, what: str) -> dict[str, Any]:
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
