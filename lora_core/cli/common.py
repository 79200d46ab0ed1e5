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
            config = read_json(folder / "config.json", f"{name} is not a model folder")
            if config.get("model_type") == "lora_core_tiny":
                from lora_core.models.tiny import CharTokenizer, load_tiny

                return load_tiny(folder).to(device), CharTokenizer(), base
    try:
        model, tokenizer = pretrained.load_hf_causal_lm(folder)
    except OSError as e:  # transformers: no weights, an unreadable config or tokenizer, a bad GGUF file
        raise CliError(f"cannot load the model in {folder}: {e}") from None
    return model.to(device), tokenizer, base


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
