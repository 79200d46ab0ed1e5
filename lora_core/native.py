"""C for the CPU's hot loops, compiled on first use: the machinery shared by every native fast path.

Two loops of a CPU training step have no fast torch op: the NF4 dequantize (a gather over one index,
single-threaded in torch; ``quant.nf4_native``) and the dropout mask (``torch.bernoulli_``: ≈ 2.5 ms per
(512, 576) mask, half a second of each forward of SmolLM2; ``lora.dropout``). Each of those modules holds
its C source; `compile_c` turns a source into a loaded library:

    $CC (else cc, else gcc) -O3 -march=native -std=c11 -shared -fPIC  →  a temporary folder  →  ctypes

≈ 0.2 s, once per process and source; the file is removed once mapped, and a ctypes call releases the GIL.
Where it cannot happen — not Linux on x86-64, no compiler, a failed build, or ``LORA_CORE_NATIVE=0`` —
`compile_c` returns the reason (one line) instead, and the caller keeps its torch path: the same result
for the dequantize (bit for bit), a mask of the same law for dropout.
"""

from __future__ import annotations

import ctypes
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

OPT_OUT = "LORA_CORE_NATIVE"  # "0": never compile, every caller keeps its torch path


def opted_out(variable: str) -> bool:
    """Whether the environment turns ``variable`` off (``0``, ``false``, ``no`` or ``off``, any case)."""
    return os.environ.get(variable, "1").strip().lower() in ("0", "false", "no", "off")


def compile_c(source: str, flags: tuple[str, ...] = ("-O3", "-march=native")) -> ctypes.CDLL | str:
    """Compile C ``source`` with ``flags`` into a shared library and load it: the library, or why not (one
    line). The caller sets its functions' ``argtypes`` / ``restype``."""
    if opted_out(OPT_OUT):
        return f"{OPT_OUT}={os.environ[OPT_OUT]}"
    if not sys.platform.startswith("linux") or platform.machine() not in ("x86_64", "AMD64"):
        return f"not Linux on x86-64 ({sys.platform}, {platform.machine()})"
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        return "no C compiler (set CC, or install cc / gcc)"
    with tempfile.TemporaryDirectory(prefix="lora_core_native_") as tmp:
        src, lib = Path(tmp) / "native.c", Path(tmp) / "native.so"
        src.write_text(source)
        try:
            done = subprocess.run([cc, *flags, "-std=c11", "-shared", "-fPIC", "-o", str(lib), str(src)],
                                  capture_output=True, text=True, timeout=120)  # fmt: skip
        except (OSError, subprocess.SubprocessError) as e:
            return f"{cc} did not run: {e}"
        if done.returncode != 0:
            return f"{cc} failed: {(done.stderr.strip().splitlines() or ['?'])[0][:200]}"
        try:
            return ctypes.CDLL(str(lib))  # mapped: the file can go with the folder
        except OSError as e:
            return f"the compiled library did not load: {e}"


__all__ = ["OPT_OUT", "compile_c", "opted_out"]
