"""Compile every kernel configuration the launchers can choose, for NVIDIA GPUs, on a machine without one.

Triton compiles for a GPU it cannot see: ``triton.compile`` takes a target (``GPUTarget("cuda", 90, 32)``
is sm_90a) and runs the ``ptxas`` it bundles. What a real launch would compile is decided by the
launcher (tiles, flags) *and* by Triton's binder, which specialises on the arguments (an int equal to 1
becomes a constant, ints and pointers divisible by 16 get a ``tt.divisibility`` hint). So this module:

1. **captures launches**: runs a public launcher (``nf4_matmul`` ...) on CPU tensors with
   ``JITFunction.run`` intercepted and the device checks off; the launcher's own host code chooses the
   configuration, exactly as on a GPU with ``arch``'s SM count;
2. **specialises** each launch with Triton's own binder for the CUDA backend (``aot.specialise``);
3. **dedupes** launches that would compile to the same kernel (same function, signature, constants,
   hints, options) and **compiles** each distinct one for each target, reading registers and spills from
   ptxas' log and shared memory from the kernel's metadata (``aot.compile_kernel``).

The cases (``cases``) are enumerated from the launchers' own choices: their supported dtypes, every
block size the NF4 container accepts, M from 1 to one past ``FUSED_MAX_M`` (so every ``BLOCK_M`` that
``_config`` picks, and the dequantize + cuBLAS path), K aligned / ragged / not a multiple of 8, splits
of 1 and more, bias on and off, double quantization on and off; and for the per-row LoRA kernels of
mixed batches (``lora_mixed``), every dtype and rank tile.

It lives in the package (not in ``benchmarks/``) because it is tied to the launchers' internals (what to
intercept, what to enumerate) and to the Triton version the kernels are written for; the compile gate
(``tests/test_kernels_compile.py``) and the static report (``static_report.py``) both use it.

Command line (Triton must not be in interpreter mode)::

    python -m lora_core.kernels.compile_check [--arch 80,90] [--jobs 2] [--json out.json]

prints one line per distinct kernel and exits 1 when one breaks the gate (``problems``).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import multiprocessing
import os
import sys
import time
import types
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
from lora_core.kernels.aot import (
    ARCHS,
    Arch,
    Launch,
    Result,
    compile_kernel,
    disassemble,
    kernel_key,
    specialise,
)

from lora_core.quant.nf4 import NF4Tensor

__all__ = ["ARCHS", "Arch", "Case", "Launch", "Result", "capture", "cases", "compile_kernel", "disassemble",
           "distinct_kernels", "kernel_key", "main", "problems", "run", "specialise"]  # fmt: skip


@dataclass(frozen=True)
class Case:
    """One call of a public launcher: ``op`` in dequantize / matmul / grad, on a weight (n, k)."""

    op: str
    dtype: str  # float16 / bfloat16 / float32
    n: int
    k: int
    block_size: int = 64
    double_quant: bool = True
    m: int = 1
    bias: bool = False
    layout: str = "contiguous"  # of x / grad_out: contiguous, strided (every other column), transposed,
    # padded (rows of a wider tensor: a row stride that is not a multiple of 8)

    @property
    def name(self) -> str:
        if self.op.startswith("mixed"):  # the per-row LoRA kernels: n is the rank, k the reduced/out width
            return f"{self.op} {self.dtype} r={self.n} width={self.k} tokens={self.m}"
        s = f"{self.op} {self.dtype} {self.n}x{self.k} bs={self.block_size} dq={int(self.double_quant)}"
        if self.op != "dequantize":
            s += (
                f" M={self.m}"
                + (" bias" if self.bias else "")
                + ("" if self.layout == "contiguous" else f" {self.layout}")
            )
        return s


# ----------------------------------------------------------------------------- 1. capture launches


@contextlib.contextmanager
def intercepted(arch: int) -> Iterator[list[Launch]]:
    """Launchers run on CPU tensors; their kernel launches are recorded instead of run."""
    from lora_core.kernels import lora_mixed, nf4_dequant, nf4_gemm
    from triton.runtime.jit import JITFunction

    launches: list[Launch] = []

    def record(self: Any, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> None:
        launches.append(Launch(self, args, kwargs, grid))

    def no_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return torch.empty((*x.shape[:-1], w.shape[0]), dtype=x.dtype)  # cuBLAS's part: not ours to compile

    saved = (JITFunction.run, nf4_dequant.check_device, nf4_gemm.check_device, nf4_gemm.num_sms, nf4_gemm.F,
             lora_mixed.check_device, lora_mixed.num_sms)  # fmt: skip
    JITFunction.run = record
    nf4_dequant.check_device = nf4_gemm.check_device = lora_mixed.check_device = lambda t, name: None
    nf4_gemm.num_sms = lora_mixed.num_sms = lambda device: ARCHS[arch].sms
    nf4_gemm.F = types.SimpleNamespace(linear=no_linear)
    try:
        yield launches
    finally:
        (JITFunction.run, nf4_dequant.check_device, nf4_gemm.check_device, nf4_gemm.num_sms,
         nf4_gemm.F, lora_mixed.check_device, lora_mixed.num_sms) = saved  # fmt: skip


@functools.lru_cache(maxsize=1)  # cases come grouped by weight: one weight in memory at a time
def fake_nf4(n: int, k: int, block_size: int, double_quant: bool) -> NF4Tensor:
    """An NF4Tensor with valid field sizes and arbitrary contents (launchers only look at sizes)."""
    numel = n * k
    nb = -(-numel // block_size)
    f32 = {"dtype": torch.float32}
    nested = {}
    if double_quant:
        nested = {"nested_absmax": torch.empty(-(-nb // 256), **f32), "nested_code": torch.empty(256, **f32),
                  "nested_block_size": 256, "offset": torch.empty((), **f32)}  # fmt: skip
    return NF4Tensor(
        packed=torch.empty((numel + 1) // 2, dtype=torch.uint8),
        absmax=torch.empty(nb, dtype=torch.uint8) if double_quant else torch.empty(nb, **f32),
        shape=torch.Size((n, k)), dtype=torch.bfloat16, block_size=block_size, code=torch.empty(16, **f32),
        **nested,
    )  # fmt: skip


def _activation(rows: int, cols: int, dtype: torch.dtype, layout: str) -> torch.Tensor:
    if layout == "transposed":
        return torch.empty(cols, rows, dtype=dtype).T
    if layout == "strided":
        return torch.empty(rows, 2 * cols, dtype=dtype)[:, ::2]
    if layout == "padded":
        return torch.empty(rows, cols + 4, dtype=dtype)[:, :cols]
    return torch.empty(rows, cols, dtype=dtype)


def capture(case: Case, arch: int) -> list[Launch]:
    """The launches one launcher call makes (the configuration it chooses on ``arch``)."""
    import lora_core.kernels as kernels

    dtype = getattr(torch, case.dtype)
    if case.op.startswith("mixed"):
        return _capture_mixed(case, dtype, arch)
    q = fake_nf4(case.n, case.k, case.block_size, case.double_quant)
    with intercepted(arch) as launches:
        if case.op == "dequantize":
            kernels.nf4_dequantize(q, dtype)
        elif case.op == "matmul":
            bias = torch.empty(case.n, dtype=dtype) if case.bias else None
            kernels.nf4_matmul(_activation(case.m, case.k, dtype, case.layout), q, bias)
        else:
            kernels.nf4_matmul_grad(_activation(case.m, case.n, dtype, case.layout), q)
    return launches


def _capture_mixed(case: Case, dtype: torch.dtype, arch: int) -> list[Launch]:
    """The per-row LoRA kernels: ``case.m`` tokens in two rows of two adapters (rank ``case.n``), reducing
    over (shrink) or writing (expand) ``case.k`` columns."""
    import lora_core.kernels as kernels

    plan = kernels.mixed_plan([0, 1], case.m // 2, "cpu")
    with intercepted(arch) as launches:
        if case.op == "mixed_shrink":
            kernels.lora_mixed_shrink(torch.empty(case.m, case.k, dtype=dtype),
                                      torch.empty(2, case.n, case.k, dtype=dtype), plan)  # fmt: skip
        else:
            y, w = torch.empty(case.m, case.k, dtype=dtype), torch.empty(2, case.k, case.n, dtype=dtype)
            kernels.lora_mixed_expand(y, torch.empty(case.m, case.n), w, torch.ones(2), plan)
    return launches


# ----------------------------------------------------------------------------- 2. which configurations


def block_sizes() -> list[int]:
    """Every block size the NF4 container accepts (asked of its own check, not copied)."""
    from lora_core.quant.nf4 import check_nf4_fields

    ok = []
    for bs in (2**i for i in range(1, 15)):
        try:
            check_nf4_fields(fake_nf4(1, 64, bs, False), "q")
        except ValueError:
            continue
        ok.append(bs)
    return ok


def cases() -> list[Case]:
    """Launcher calls that between them make every configuration the launchers can choose."""
    from lora_core.kernels import nf4_dequant, nf4_gemm

    names = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}
    out = []
    for dt in nf4_dequant._SUPPORTED_DTYPES:
        for bs in block_sizes():
            for dq in (False, True):
                # numel a multiple of 8·16, of 8 only, and odd (a partial last word)
                for n, k in ((64, 1024), (8, 1001), (1, 1001)):
                    out.append(Case("dequantize", names[dt], n, k, bs, dq))
    # every M up to one past FUSED_MAX_M, reduced to the first and last M of each BLOCK_M _config picks
    by_block_m: dict[int, list[int]] = {}
    for m in range(1, nf4_gemm.FUSED_MAX_M + 2):
        bm = nf4_gemm._config(m, 4096, 4096, torch.device("cpu"), False)["BLOCK_M"]
        by_block_m.setdefault(bm, []).append(m)
    ms = sorted({m for group in by_block_m.values() for m in (group[0], group[-1])})
    # K: a multiple of 128 and of every block size / ragged (K % 8 == 0 only) / K % 8 != 0 (not fused);
    # N and K small and large so that both split = 1 and split > 1 occur for matmul and grad
    shapes = [(n, k) for n in (256, 4096) for k in (512, 520, 4096, 4104, 4100)]
    for dt in nf4_gemm._SUPPORTED_DTYPES:
        for bs in block_sizes():
            for dq in (False, True):
                for n, k in shapes:
                    for m in ms:
                        out.append(Case("grad", names[dt], n, k, bs, dq, m))
                        for bias in (False, True):
                            out.append(Case("matmul", names[dt], n, k, bs, dq, m, bias))
    # the per-row LoRA kernels: every dtype and rank tile (each BLOCK_R's smallest and largest rank)
    from lora_core.kernels import lora_mixed

    for dt in lora_mixed.SUPPORTED_DTYPES:
        lo = 1
        for br in lora_mixed.BLOCK_RS:
            for r in (lo, br):
                out += [Case(op, names[dt], r, 4096, m=256) for op in ("mixed_shrink", "mixed_expand")]
            lo = br + 1
    # other strides of x / grad_out (a stride of 1 becomes a constant, and the forward kernel specialises on
    # x's row stride being a multiple of 8, so these are other kernels)
    for layout in ("strided", "transposed", "padded"):
        for m in (1, nf4_gemm.FUSED_MAX_M):
            out.append(Case("matmul", "bfloat16", 4096, 4096, 64, True, m, False, layout))
            out.append(Case("grad", "bfloat16", 4096, 4096, 64, True, m, False, layout))
    return out


def problems(r: Result) -> list[str]:
    """What the gate refuses: a failed compile, a spill, or more shared memory than a block can have."""
    out = []
    if r.error:
        out.append(f"does not compile: {r.error}")
    elif r.spill_stores != 0 or r.spill_loads != 0 or r.regs < 0:
        out.append(f"spills {r.spill_stores}/{r.spill_loads} bytes (stores/loads), {r.regs} registers")
    if r.shared > ARCHS[r.arch].smem_per_block:
        a = ARCHS[r.arch]
        out.append(f"needs {r.shared} B of shared memory > {a.smem_per_block} on {a.name}")
    return out


# ----------------------------------------------------------------------------- the whole matrix

_JOBS: list[tuple[Launch, int, bool, list[str]]] = []  # read by forked workers


def _compile_job(i: int) -> Result:
    launch, arch, want_sass, names = _JOBS[i]
    result = compile_kernel(launch, arch, want_sass)
    result.cases = names
    return result


def distinct_kernels(case_list: list[Case], archs: list[int]) -> list[tuple[Launch, int, list[str]]]:
    """Capture every case on every arch and keep one launch per distinct compiled kernel."""
    seen: dict[tuple[int, str, str], tuple[Launch, int, list[str]]] = {}
    for arch in archs:
        for case in case_list:
            for launch in capture(case, arch):
                key = (arch, *kernel_key(launch, arch))
                seen.setdefault(key, (launch, arch, []))[2].append(case.name)
    return list(seen.values())


def run(case_list: list[Case], archs: list[int], jobs: int, want_sass: bool = False,
        progress: Callable[[Result], None] | None = None) -> list[Result]:  # fmt: skip
    """Compile every distinct kernel of ``case_list`` for ``archs`` on ``jobs`` processes."""
    global _JOBS
    _JOBS = [(launch, arch, want_sass, names) for launch, arch, names in distinct_kernels(case_list, archs)]
    results: list[Result] = []
    with contextlib.ExitStack() as stack:
        if jobs > 1:
            pool = stack.enter_context(multiprocessing.get_context("fork").Pool(jobs))
            done: Iterator[Result] = pool.imap(_compile_job, range(len(_JOBS)))
        else:
            done = map(_compile_job, range(len(_JOBS)))
        for r in done:
            results.append(r)
            if progress:
                progress(r)
    return results


def describe(r: Result) -> str:
    ce = " ".join(f"{k}={v}" for k, v in r.constexprs.items())
    if r.error:
        return f"{r.kernel:26s} sm_{r.arch} FAIL {r.error}  [{ce}]"
    blocks, by = r.occupancy()
    return (f"{r.kernel:26s} sm_{r.arch} regs {r.regs:3d} spill {r.spill_stores}/{r.spill_loads} "
            f"smem {r.shared:6d} B  {blocks:2d} blocks/SM ({by})  {r.seconds:4.1f}s  [{ce}] "
            f"({len(r.cases)} cases, e.g. {r.cases[0]})")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    from lora_core.kernels import interpreter_active

    prog = "python -m lora_core.kernels.compile_check"
    ap = argparse.ArgumentParser(prog=prog, description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--arch", default="80,90", help="compute capabilities, comma-separated (80, 90)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes")
    ap.add_argument("--json", help="write every result here")
    args = ap.parse_args(argv)
    if interpreter_active():
        print("compile_check needs TRITON_INTERPRET unset (the interpreter replaces @jit)", file=sys.stderr)
        return 2
    archs = [int(a) for a in args.arch.split(",")]
    start = time.perf_counter()
    case_list = cases()
    results = run(case_list, archs, args.jobs, progress=lambda r: print(describe(r), flush=True))
    bad = [(r, p) for r in results for p in problems(r)]
    elapsed = time.perf_counter() - start
    print(f"{len(case_list)} cases -> {len(results)} distinct kernels on sm_{', sm_'.join(map(str, archs))} "
          f"in {elapsed:.0f} s with {args.jobs} processes; {len(bad)} problems")  # fmt: skip
    for r, p in bad:
        print(f"PROBLEM {r.kernel} sm_{r.arch} {r.constexprs}: {p} (e.g. {r.cases[0]})")
    if args.json:
        rows = [{**asdict(r), "sass": None, "problems": problems(r)} for r in results]
        with open(args.json, "w") as f:
            json.dump({"seconds": elapsed, "cases": len(case_list), "results": rows}, f, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
