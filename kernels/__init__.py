"""Triton kernels of lora_core. This folder is installed as ``lora_core.kernels``.

Each kernel module imports only torch and triton, and exposes public launchers that (1) check shapes and
dtypes with clear errors, (2) allocate the output and (3) launch a private ``@triton.jit`` kernel. Triton is
imported by those modules only, so ``import lora_core`` works on machines without it: the public launchers
below are loaded on first attribute access (module ``__getattr__``).

- ``nf4_dequantize(q, dtype=torch.bfloat16, out=None)``: NF4 -> dense, bit-exact (``nf4_dequant.py``).
- ``nf4_matmul(x, q, bias=None, *, out=None, workspace=None)``: ``x @ dequant(q)ᵀ (+ bias)``
  (``nf4_gemm.py``).
- ``nf4_matmul_grad(grad_out, q, *, out=None, workspace=None)``: ``grad_out @ dequant(q)``, the input
  gradient (``nf4_gemm.py``).
- ``nf4_matmul_fused(a, q, *, grad=False, out=None, workspace=None)``: the fused kernel alone at any M
  (benchmarks time both strategies).
- ``nf4_matmul_workspace_numel(rows, q, *, grad=False)``: float32 elements a caller's ``workspace=`` needs
  (the split-K partial sums; 0 when K is not split).
- ``mixed_plan(index, tokens_per_row, device)``, ``lora_mixed_shrink(x, w, plan)``,
  ``lora_mixed_expand(y, s, w, scale, plan)``: a different LoRA adapter per row of a batch
  (``lora_mixed.py``).

``out=`` is where the result is written (contiguous, the result's shape, dtype and device), ``workspace=``
float32 scratch; both are allocated when not given and their contents on entry never matter.

On a machine without a GPU, setting ``TRITON_INTERPRET=1`` before Triton is first imported runs the
kernels on the CPU (slowly): that is how CI tests them.
"""

from __future__ import annotations

# Hugging Face publishes a package named `kernels` that transformers imports. If this folder were
# importable as `kernels` (say, from a checkout put on sys.path) it would shadow that package.
if __name__ != "lora_core.kernels":
    raise ImportError(
        f"this folder is the package 'lora_core.kernels' and cannot be imported as {__name__!r}. "
        "Most likely a lora_core checkout is on sys.path (Python started in its root, e.g. `python -c` or "
        "`python -m pytest` there) and something asked for the top-level `kernels` package (transformers "
        "does on import). Start Python from another directory or use the installed scripts (`pytest`, "
        "`lora-core`); in code, write `from lora_core import kernels`."
    )

import importlib
import os
from typing import Any

__all__: list[str] = [
    "FUSED_MAX_M",
    "MIXED_MAX_R",
    "interpreter_active",
    "lora_mixed_expand",
    "lora_mixed_shrink",
    "mixed_plan",
    "nf4_dequantize",
    "nf4_matmul",
    "nf4_matmul_fused",
    "nf4_matmul_grad",
    "nf4_matmul_workspace_numel",
]

# Rows of x up to which `nf4_matmul` runs the fused kernel (it reads only the packed bytes); above it,
# dequantize + cuBLAS (tensor-core bound). 16: a BLOCK_M = 64 tile spills (the compile gate, nf4_gemm's
# BLOCK_MS). Owned here, read by `nf4_gemm` and by `lora_core.dispatch`.
FUSED_MAX_M = 16

# The largest rank the per-row kernels of mixed batches take (``lora_mixed``: its largest rank tile; a
# bigger one would spill). Owned here, read by `lora_mixed` and `lora_core.dispatch`.
MIXED_MAX_R = 128

# public name -> the submodule that defines it (imported, with triton, on first use). The modules are
# named unlike the functions: the import system binds a submodule as an attribute of its package, which
# would hide a function of the same name.
_LAZY = {
    "nf4_dequantize": "nf4_dequant",
    "nf4_matmul": "nf4_gemm",
    "nf4_matmul_grad": "nf4_gemm",
    "nf4_matmul_fused": "nf4_gemm",
    "nf4_matmul_workspace_numel": "nf4_gemm",
    "mixed_plan": "lora_mixed",
    "lora_mixed_shrink": "lora_mixed",
    "lora_mixed_expand": "lora_mixed",
}


def interpreter_active() -> bool:
    """True when Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value  # later look-ups skip __getattr__
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
