"""What the benchmark suites share: timing on the GPU, parsing shapes, recording versions, writing results."""

from __future__ import annotations

import argparse
import json
import platform
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from lora_core.atomic import atomic_write_text


def time_us(fn: Callable[[], Any]) -> float:
    from triton.testing import do_bench

    return 1e3 * float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


def versions() -> dict[str, str | None]:
    import importlib.metadata as md

    out: dict[str, str | None] = {"python": platform.python_version(), "cuda": torch.version.cuda}
    for pkg in ("torch", "triton", "bitsandbytes", "lora-core"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def parse_shape(text: str) -> tuple[int, int]:
    try:
        n, k = (int(v) for v in text.lower().replace("×", "x").split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a shape is NxK (e.g. 8192x8192), got {text!r}") from None
    return n, k


def pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend, or None without matplotlib (plots are optional)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def write_json(path: Path, meta: dict[str, Any], rows: Sequence[dict[str, Any]]) -> None:
    payload = {"meta": meta, "results": list(rows)}
    atomic_write_text(path, json.dumps(payload, indent=1) + "\n")
