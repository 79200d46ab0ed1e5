"""Benchmarks of the NF4 kernels against cuBLAS bf16, the pure-PyTorch reference and bitsandbytes.

``lora-core bench`` / ``python benchmarks/bench_kernels.py`` time, on random (never zero) data and with
``triton.testing.do_bench`` (CUDA events, warm-up first, median of many runs, L2 flushed before each run so
weights come from HBM as they do in a real model):

- ``dequantize``: NF4 -> bf16, as a fraction of the device's measured copy bandwidth (bytes read + written).
- ``matmul`` ``x (M, K) @ Wᵀ`` and ``grad`` ``g (M, N) @ W`` for W of shape (N, K) and M in a sweep, as
  speed-up over cuBLAS bf16 on the dense weight and as a fraction of the floor
  ``max(bytes / copy bandwidth, 2·M·N·K / measured bf16 GEMM rate)``. Both of our strategies (fused split-K
  kernel, dequantize + cuBLAS) are timed at every M, so the cross-over ``FUSED_MAX_M`` can be read off.

Writes ``bench_kernels.json`` (device, versions, every number) and ``bench_kernels.png`` into ``--out``.
Needs CUDA; without it, exits with code 2 and says so.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from lora_core.atomic import atomic_write
from lora_core.bench.common import parse_shape, pyplot, time_us, versions, write_json
from lora_core.one_line_parser import OneLineParser

SHAPES: list[tuple[int, int]] = [(4096, 4096), (8192, 8192), (28672, 8192), (11008, 4096), (4096, 11008)]
M_VALUES: list[int] = [1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096]
BASELINE = "cublas_bf16"
# bytes per parameter of an NF4 weight (packed codes + scales), by double quantization
NF4_BYTES_PER_PARAM = {True: 0.5 + 1 / 64 + 4 / (64 * 256), False: 0.5 + 4 / 64}


# ----------------------------------------------------------------------------- numbers -> table / JSON / plot


def floor_us(op: str, n: int, k: int, m: int, double_quant: bool, copy_gbs: float, tflops: float) -> float:
    """The time no implementation can beat: max(bytes moved / copy bandwidth, flops / GEMM rate), in µs."""
    w_bytes = n * k * NF4_BYTES_PER_PARAM[double_quant]
    if op == "dequantize":
        moved, flops = w_bytes + 2 * n * k, 0.0
    else:
        m_in, m_out = (k, n) if op == "matmul" else (n, k)
        moved, flops = w_bytes + 2 * m * (m_in + m_out), 2.0 * m * n * k
    return max(moved / (copy_gbs * 1e3), flops / (tflops * 1e6))


def summarize(records: Sequence[dict[str, Any]], meta: dict[str, Any]) -> list[dict[str, Any]]:
    """Add ``speedup_vs_cublas`` and ``pct_of_floor`` to each timing record (a new list of dicts)."""
    base = {
        (r["op"], r["n"], r["k"], r["m"]): r["us"] for r in records if r["impl"] == BASELINE
    }  # fmt: skip
    rows = []
    for r in records:
        fl = floor_us(r["op"], r["n"], r["k"], r["m"], meta["double_quant"], meta["copy_gbs"], meta["tflops"])
        b = base.get((r["op"], r["n"], r["k"], r["m"]))
        rows.append(
            {**r, "floor_us": fl, "pct_of_floor": 100.0 * fl / r["us"],
             "speedup_vs_cublas": (b / r["us"]) if b else None}
        )  # fmt: skip
    return rows


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """One line per (op, shape, M): µs of each implementation, then ours' speed-up and % of floor."""
    impls = sorted({r["impl"] for r in rows}, key=lambda s: (s != "ours", s != BASELINE, s))
    groups: dict[tuple[str, int, int, int], dict[str, dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["op"], r["n"], r["k"], r["m"]), {})[r["impl"]] = r
    head = f"{'op':<10} {'N×K':>12} {'M':>5} " + " ".join(f"{i[:14]:>14}" for i in impls)
    head += f" {'ours/cuBLAS':>11} {'ours %floor':>11}"
    lines = [head + "   (µs)", "-" * len(head)]
    for (op, n, k, m), by in groups.items():
        cells = " ".join(f"{by[i]['us']:14.1f}" if i in by else f"{'-':>14}" for i in impls)
        ours = by.get("ours")
        sp = f"{ours['speedup_vs_cublas']:10.2f}×" if ours and ours["speedup_vs_cublas"] else f"{'-':>11}"
        pf = f"{ours['pct_of_floor']:10.0f}%" if ours else f"{'-':>11}"
        lines.append(f"{op:<10} {f'{n}×{k}':>12} {m if op != 'dequantize' else '':>5} {cells} {sp} {pf}")
    return "\n".join(lines)


def plot(path: Path, rows: Sequence[dict[str, Any]], meta: dict[str, Any]) -> bool:
    """Speed-up over cuBLAS against M, one panel per (op, shape); returns False without matplotlib."""
    plt = pyplot()
    if plt is None:
        return False
    panels = sorted({(r["op"], r["n"], r["k"]) for r in rows if r["op"] != "dequantize"})
    if not panels:
        return False
    cols = min(5, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.6 * cols, 3.0 * nrows), squeeze=False)
    for ax, (op, n, k) in zip(axes.flat, panels):
        sel = [r for r in rows if (r["op"], r["n"], r["k"]) == (op, n, k) and r["speedup_vs_cublas"]]
        for impl in sorted({r["impl"] for r in sel}):
            pts = sorted((r["m"], r["speedup_vs_cublas"]) for r in sel if r["impl"] == impl)
            ax.plot(*zip(*pts), marker="o", ms=3, label=impl, lw=2.0 if impl == "ours" else 1.0)
        ax.axhline(1.0, color="k", lw=0.6)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{op} N×K={n}×{k}", fontsize=9)
        ax.set_xlabel("M (rows of x)", fontsize=8)
        ax.set_ylabel("speed-up vs cuBLAS bf16", fontsize=8)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"NF4 kernels on {meta.get('device', '?')}", fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------- the GPU part


def _device_ceilings() -> tuple[float, float]:
    """Measured copy bandwidth (GB/s, read + written) and bf16 GEMM rate (TFLOP/s) of this device."""
    src = torch.randn(512 * 2**20, device="cuda", dtype=torch.bfloat16)  # 1 GiB
    dst = torch.empty_like(src)
    copy_gbs = 2 * src.numel() * 2 / (time_us(lambda: dst.copy_(src)) * 1e3)
    src = dst = None  # free the 2 GiB before the GEMM
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    tflops = 2 * 8192**3 / (time_us(lambda: a @ b) * 1e6)
    return copy_gbs, tflops


def _quantize(w: torch.Tensor, double_quant: bool) -> tuple[Any, Any]:
    """(our NF4Tensor, bitsandbytes' (packed, state) or None) for ``w`` on the GPU."""
    from lora_core.quant.nf4 import NF4Tensor

    try:
        import bitsandbytes.functional as bnbf
    except ImportError:
        bnbf = None
    if bnbf is not None:
        packed, st = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
        nested = {}
        if double_quant:
            nested = {
                "nested_absmax": st.state2.absmax, "nested_code": st.state2.code.float(),
                "nested_block_size": int(st.state2.blocksize), "offset": st.offset.float().reshape(()),
            }  # fmt: skip
        q = NF4Tensor(packed.reshape(-1), st.absmax, w.shape, w.dtype, 64, st.code.float(), **nested)
        return q, (packed, st)
    from lora_core.quant import nf4

    if not hasattr(nf4, "quantize_nf4"):
        raise RuntimeError("need bitsandbytes or lora_core.quant.nf4.quantize_nf4 to make NF4 weights")
    return nf4.quantize_nf4(w, block_size=64, double_quant=double_quant), None


def _reference(q: Any, dtype: torch.dtype) -> torch.Tensor:
    """The pure-PyTorch dequantization (lora_core.quant.nf4's reference when it exists)."""
    from lora_core.quant import nf4

    ref = getattr(nf4, "nf4_dequantize_ref", None)
    if ref is not None:
        return ref(q, dtype)
    absmax = q.absmax
    if q.double_quant:
        idx = torch.arange(absmax.numel(), device=absmax.device) // q.nested_block_size
        absmax = q.nested_code[absmax.long()] * q.nested_absmax[idx] + q.offset
    b = q.packed.long()
    nibble = torch.stack([b >> 4, b & 15], dim=1).reshape(-1)[: q.numel]
    block = torch.arange(q.numel, device=b.device) // q.block_size
    return (q.code[nibble] * absmax[block]).to(dtype).reshape(q.shape)


def _bench_weight(
    n: int, k: int, args: argparse.Namespace, rec: Callable[..., None], device: str = "cuda"
) -> None:
    """Every op and M for one weight shape (N, K); ``rec(op, m, impl, fn)`` times ``fn`` and records it.

    ``device="cpu"`` (with the Triton interpreter) only exists so a test can run this code path cheaply.
    """
    import torch.nn.functional as F

    from lora_core.kernels import FUSED_MAX_M, nf4_dequantize, nf4_matmul, nf4_matmul_fused, nf4_matmul_grad

    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnbf
    except ImportError:
        bnb = bnbf = None
    dt = torch.bfloat16
    w = torch.randn(n, k, device=device, dtype=dt) * 0.02
    q, bnb_q = _quantize(w, args.double_quant)
    w_deq = nf4_dequantize(q, dt)  # the dense weight cuBLAS gets (the values ours use)
    if "dequantize" in args.ops:
        out = torch.empty(n, k, device=device, dtype=dt)
        rec("dequantize", 0, "ours", lambda: nf4_dequantize(q, dt, out=out))
        rec("dequantize", 0, "torch_reference", lambda: _reference(q, dt))
        if bnb_q is not None:
            rec("dequantize", 0, "bitsandbytes", lambda: bnbf.dequantize_4bit(*bnb_q))
    for m in args.m:
        x = torch.randn(m, k, device=device, dtype=dt)
        g = torch.randn(m, n, device=device, dtype=dt)
        # rec() runs each lambda before the loop moves on, so capturing x and g is safe
        if "matmul" in args.ops:
            rec("matmul", m, BASELINE, lambda: F.linear(x, w_deq))  # noqa: B023
            rec("matmul", m, "ours", lambda: nf4_matmul(x, q))  # noqa: B023
            if m <= 4 * FUSED_MAX_M:
                rec("matmul", m, "ours_fused", lambda: nf4_matmul_fused(x, q))  # noqa: B023
            rec("matmul", m, "ours_dequant_cublas", lambda: F.linear(x, nf4_dequantize(q, dt)))  # noqa: B023
            rec("matmul", m, "torch_reference", lambda: F.linear(x, _reference(q, dt)))  # noqa: B023
            if bnb_q is not None:
                rec("matmul", m, "bitsandbytes",
                    lambda: bnb.matmul_4bit(x, bnb_q[0].t(), quant_state=bnb_q[1]))  # noqa: B023  # fmt: skip
        if "grad" in args.ops:
            rec("grad", m, BASELINE, lambda: g @ w_deq)  # noqa: B023
            rec("grad", m, "ours", lambda: nf4_matmul_grad(g, q))  # noqa: B023
            if m <= 4 * FUSED_MAX_M:
                rec("grad", m, "ours_fused", lambda: nf4_matmul_fused(g, q, grad=True))  # noqa: B023
            rec("grad", m, "ours_dequant_cublas", lambda: g @ nf4_dequantize(q, dt))  # noqa: B023
            if bnb_q is not None:
                rec("grad", m, "bitsandbytes", lambda: g @ bnbf.dequantize_4bit(*bnb_q))  # noqa: B023


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Time every implementation on every (shape, M); returns raw records ``{op, n, k, m, impl, us}``."""
    records: list[dict[str, Any]] = []
    for n, k in args.shapes:

        def rec(op: str, m: int, impl: str, fn: Callable[[], Any], n: int = n, k: int = k) -> None:
            us = time_us(fn)
            records.append({"op": op, "n": n, "k": k, "m": m, "impl": impl, "us": us})
            print(f"  {op:<10} {n}×{k} M={m:<5} {impl:<22} {us:10.1f} µs", file=sys.stderr)

        _bench_weight(n, k, args, rec)
        torch.cuda.empty_cache()
    return records


# ----------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="lora-core bench kernels", description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", type=parse_shape, nargs="+", default=SHAPES, help="weights N×K (default: all)")
    p.add_argument("--m", type=int, nargs="+", default=M_VALUES, help="rows of x to sweep")
    p.add_argument("--ops", nargs="+", default=["dequantize", "matmul", "grad"],
                   choices=["dequantize", "matmul", "grad"])  # fmt: skip
    p.add_argument("--no-double-quant", dest="double_quant", action="store_false",
                   help="plain float32 block scales (default: double quantization, as QLoRA)")  # fmt: skip
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="folder for JSON and PNG")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not torch.cuda.is_available():
        print("lora-core bench: needs a CUDA GPU (torch.cuda.is_available() is False); nothing timed.",
              file=sys.stderr)  # fmt: skip
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    copy_gbs, tflops = _device_ceilings()
    meta = {
        "device": torch.cuda.get_device_name(), "versions": versions(), "double_quant": args.double_quant,
        "copy_gbs": copy_gbs, "tflops": tflops, "timer": "triton.testing.do_bench median, L2 flushed",
        "dtype": "bfloat16", "block_size": 64,
    }  # fmt: skip
    print(f"{meta['device']}: copy {copy_gbs:.0f} GB/s, bf16 GEMM {tflops:.0f} TFLOP/s", file=sys.stderr)
    rows = summarize(run(args), meta)
    write_json(args.out / "bench_kernels.json", meta, rows)
    plotted = plot(args.out / "bench_kernels.png", rows, meta)
    print(format_table(rows))
    print(f"\nwrote {args.out / 'bench_kernels.json'}" + (" and bench_kernels.png" if plotted else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
