"""Triton kernels of lora_core. This folder is installed as ``lora_core.kernels``.

Each kernel module imports only torch and triton, and exposes public launchers that (1) check shapes and
dtypes with clear errors, (2) allocate the output and (3) launch a private ``@triton.jit`` kernel. Triton is
imported by those modules only, so ``import lora_core`` works on machines without it.

On a machine without a GPU, setting ``TRITON_INTERPRET=1`` before Triton is first imported runs the
kernels on the CPU (slowly): that is how CI tests them.
"""

from __future__ import annotations

# Hugging Face publishes a package named `kernels` that transformers imports. If this folder were
# importable as `kernels` (say, from a checkout put on sys.path) it would shadow that package.
if __name__ != "lora_core.kernels":
    raise ImportError(
        f"this folder is the package 'lora_core.kernels' and cannot be imported as {__name__!r}; "
        "install lora_core (pip install -e .) and write `from lora_core import kernels`"
    )

import os

__all__: list[str] = ["interpreter_active"]


def interpreter_active() -> bool:
    """True when Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
