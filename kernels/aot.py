"""Compile one kernel launch for an NVIDIA GPU this machine does not have, and read what it compiled to.

Triton compiles for a GPU it cannot see: ``triton.compile`` takes a target (``GPUTarget("cuda", 90, 32)``
is sm_90a) and runs the ``ptxas`` it bundles. ``specialise`` binds a recorded launch (``Launch``) with
Triton's own binder for the CUDA backend, as ``JITFunction.run`` would on a GPU (an int equal to 1 becomes
a constant, ints and pointers divisible by 16 get a ``tt.divisibility`` hint); ``kernel_key`` says which
launches compile to the same kernel; ``compile_kernel`` compiles one for an ``Arch`` and reads registers
and spills from ptxas' log, shared memory from the kernel's metadata and, if asked, the SASS
(``disassemble``). Used by ``compile_check`` (the gate) and ``static_report``.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Arch:
    """What a GPU generation allows a block (CUDA occupancy calculator's figures)."""

    cc: int  # compute capability, major*10 + minor: Triton's target
    name: str
    sms: int  # of the reference part (A100 / H100 SXM)
    smem_per_block: int  # cudaDevAttrMaxSharedMemoryPerBlockOptin, bytes
    smem_per_sm: int  # shared memory an SM can give its blocks (incl. 1 KiB reserved per block)
    regs_per_sm: int = 65536
    max_warps: int = 64
    max_blocks: int = 32


ARCHS = {
    80: Arch(80, "sm_80 (A100)", 108, 163 * 1024, 164 * 1024),
    90: Arch(90, "sm_90a (H100/H200)", 132, 227 * 1024, 228 * 1024),
}


@dataclass
class Launch:
    fn: Any  # the JITFunction
    args: tuple
    kwargs: dict
    grid: Any


@dataclass
class Result:
    """One distinct kernel compiled for one arch, and the cases that launch it."""

    kernel: str
    arch: int
    constexprs: dict[str, Any]
    hints: str  # the binder's specialisation of the non-constant arguments, abridged
    num_warps: int = 0
    regs: int = -1
    spill_stores: int = -1
    spill_loads: int = -1
    shared: int = -1
    error: str = ""
    seconds: float = 0.0
    cases: list[str] = field(default_factory=list)
    sass: str = ""  # filled only when asked for (the static report); not written to JSON

    def occupancy(self) -> tuple[int, str]:
        """Resident blocks per SM and what limits them (registers, shared memory, warps)."""
        a = ARCHS[self.arch]
        regs_per_warp = -(-max(self.regs, 1) * 32 // 256) * 256  # allocated in units of 256
        limits = {
            "regs": a.regs_per_sm // (regs_per_warp * self.num_warps),
            "smem": a.smem_per_sm // (self.shared + 1024) if self.shared else a.max_blocks,
            "warps": a.max_warps // self.num_warps,
            "blocks": a.max_blocks,
        }
        by = min(limits, key=lambda k: limits[k])
        return limits[by], by


# ----------------------------------------------------------------------------- specialise, compile


@functools.cache
def _binder(fn: Any, arch: int) -> tuple[Any, Any]:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(GPUTarget("cuda", arch, 32))
    return backend, create_function_from_signature(fn.signature, fn.params, backend)


def _bind(launch: Launch, arch: int) -> tuple[Any, dict, Any, list, dict]:
    from triton import knobs

    fn = launch.fn
    backend, binder = _binder(fn, arch)
    kwargs = dict(launch.kwargs)
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    kwargs["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
    bound_args, specialization, options = binder(*launch.args, **kwargs)
    return backend, kwargs, bound_args, specialization, options


def specialise(launch: Launch, arch: int) -> tuple[dict, dict, dict, dict]:
    """(signature, constexprs, attrs, options) as ``JITFunction.run`` computes them for a CUDA device."""
    backend, kwargs, bound_args, specialization, options = _bind(launch, arch)
    options, signature, constexprs, attrs = launch.fn._pack_args(
        backend, kwargs, bound_args, specialization, options
    )
    return signature, constexprs, attrs, options.__dict__


def kernel_key(launch: Launch, arch: int) -> tuple[str, str]:
    """What decides the compiled code, as ``JITFunction.run``'s cache key: the function, the binder's
    specialisation of every argument (types, constants, divisibility) and the options."""
    _, _, _, specialization, options = _bind(launch, arch)
    return launch.fn.__name__, repr((specialization, sorted(options.items())))


_PTXAS = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def compile_kernel(launch: Launch, arch: int, want_sass: bool = False) -> Result:
    """Compile one launch for ``arch``; registers/spills from ptxas' log, shared memory from metadata."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constexprs, attrs, options = specialise(launch, arch)
    fn = launch.fn
    named = {fn.arg_names[path[0]]: v for path, v in constexprs.items()}
    hints = ",".join(f"{fn.arg_names[p[0]]}" for p, v in attrs.items() if v) or "-"
    res = Result(fn.__name__, arch, {k: str(v) for k, v in named.items()}, hints)
    start = time.perf_counter()
    log = io.StringIO()
    knobs.nvidia.dump_ptxas_log = True
    knobs.compilation.always_compile = True  # a cached kernel would skip ptxas and its log
    try:
        with contextlib.redirect_stdout(log):
            src = ASTSource(fn, signature, constexprs, attrs)
            k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    except Exception as e:  # a compile failure is a finding of the gate, reported with the kernel
        res.error = f"{type(e).__name__}: {' / '.join(str(e).strip().splitlines()[:3])[:300]}"
        return res
    finally:
        res.seconds = time.perf_counter() - start
    text = log.getvalue()
    regs, spill = _PTXAS.search(text), _SPILL.search(text)
    res.regs = int(regs.group(1)) if regs else -1
    res.spill_stores, res.spill_loads = (int(spill.group(1)), int(spill.group(2))) if spill else (-1, -1)
    res.shared, res.num_warps = int(k.metadata.shared), int(k.metadata.num_warps)
    if want_sass:
        res.sass = disassemble(k.asm["cubin"])
    return res


def disassemble(cubin: bytes) -> str:
    """SASS text of a cubin, by the ``cuobjdump`` Triton bundles."""
    import subprocess
    import tempfile

    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([tool, "-sass", f.name], capture_output=True, text=True, check=True).stdout
