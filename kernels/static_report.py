"""What the kernels compile to, and a first-order model of how fast that can run: no GPU needed.

``lora-core bench static`` (or ``python benchmarks/static_report.py``) compiles the launches of real
workloads (dequantize, matmul and its gradient on 8192² and 28672×8192 weights, M = 1 and 16) for sm_90a
with ``compile_check`` and reports, per kernel: registers, spills, shared memory, occupancy, the SASS
instruction mix per weight (per element for dequantize) and a **modelled** time next to the HBM floor.
Writes ``static_report.json`` and ``static_report.md`` into ``--out`` (default ``benchmarks/results``).

**The model (estimates, not timings).** One H100/H200 SM per clock retires at most: 4 warp-instructions
(issue), 2 integer-ALU warp-instructions (IADD3, LOP3, SHF, LEA, ISETP, SEL, PRMT, MOV, F2FP ...: 16
lanes per SMSP), 4 FP32 (FFMA, FMUL, FADD) or 2 IMAD (IMAD.MOV too: moves the compiler puts on the FMA
pipe), and 1 L1 wavefront (128 bytes of LDG/STG/LDS/STS;
``.128`` = 4, ``.64`` = 2, narrower = 1; a 32-bit load from the 64-byte code table = 1, since every lane
hits one line). The busiest resource gives SM clocks per weight; 132 SMs at 1.755 GHz give a time; the
HBM floor is bytes / bandwidth (H100 3.0 TB/s measured copy, H200 4.0 TB/s); the modelled time is the
larger of the two. Not modelled: latency (loads in flight), shared-memory bank conflicts, DRAM efficiency,
launch overhead, the split-K reduction (done by the last program of each tile, in the same launch: its
reads of the float32 partials are outside the main loop), tensor-core time (≈1%).
For dequantize the whole kernel is counted (no loop); for the matmuls the main loop (the longest
backward branch of the SASS) over the weights one warp decodes per iteration.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections import Counter
from typing import Any

from lora_core.one_line_parser import OneLineParser

SMS, CLOCK = 132, 1.755e9
HBM = {"H100": 3.0e12, "H200": 4.0e12}
# bytes per weight read (+ written): NF4 with double quantization 4 + 8/64 + 32/(64·256) bits
NF4_BYTES = (4 + 8 / 64 + 32 / (64 * 256)) / 8

_OP = re.compile(r"/\*([0-9a-f]{4,5})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
_ALU = re.compile(
    r"^(IADD3|IADD|LOP3|LOP|SHF|SHL|SHR|LEA|ISETP|SEL|FSEL|PRMT|SGXT|IMNMX|VIMNMX|F2FP|P2R|R2P|MOV|"
    r"FSETP|IABS|BMSK|PLOP3|VIADD|FMNMX)"
)
_FP32 = re.compile(r"^(FFMA|FMUL|FADD)")
_IMAD = re.compile(r"^IMAD")
_MEM = re.compile(r"^(LDG|STG|LDS|STS|LDSM|STSM|LDGSTS|LDL|STL|RED|ATOM)")


def sass_instructions(sass: str) -> list[tuple[int, str, str]]:
    """(address, opcode with modifiers, operands) for every instruction of a ``cuobjdump -sass`` dump."""
    return [(int(a, 16), op, rest) for a, op, rest in _OP.findall(sass)]


def main_loop(sass: str) -> Counter:
    """Opcode counts of the longest loop body (a backward branch's target .. the branch); all if none."""
    ins = sass_instructions(sass)
    best = None
    for addr, op, rest in ins:
        m = re.search(r"(0x[0-9a-f]+)", rest) if op.startswith("BRA") else None
        if (
            m
            and int(m.group(1), 16) < addr
            and (best is None or addr - int(m.group(1), 16) > best[1] - best[0])
        ):
            best = (int(m.group(1), 16), addr)
    return Counter(op for a, op, _ in ins if best is None or best[0] <= a <= best[1])


def wavefronts(op: str) -> float:
    """L1 data-path wavefronts (128 B) one warp-instruction costs (see the module doc)."""
    if not _MEM.match(op) or op.startswith("LDGDEPBAR"):
        return 0.0
    if op.startswith(("LDSM", "STSM")):
        return 4.0 if op.endswith(".4") else 2.0 if op.endswith(".2") else 1.0
    m = re.search(r"\.(128|64)\b", op)
    w = {"128": 4.0, "64": 2.0}[m.group(1)] if m else 1.0
    return 2 * w if op.startswith("LDGSTS") else w  # L1 read + shared-memory write


def resources(ops: Counter) -> dict[str, float]:
    """SM clocks one warp's instructions ``ops`` take on each resource."""
    return {
        "issue": sum(ops.values()) / 4,
        "alu": sum(n for op, n in ops.items() if _ALU.match(op)) / 2,
        "fma": sum(n for op, n in ops.items() if _FP32.match(op)) / 4
        + sum(n for op, n in ops.items() if _IMAD.match(op)) / 2,
        "l1": sum(n * wavefronts(op) for op, n in ops.items()),
    }


def mix(ops: Counter, items: float) -> dict[str, float]:
    """Instructions per item (per thread: a warp-instruction serves 32 lanes) by kind."""
    kinds = {"memory": _MEM, "int_alu": _ALU, "fp32": _FP32}
    out = {k: sum(n for op, n in ops.items() if p.match(op)) * 32 / items for k, p in kinds.items()}
    out["total"] = sum(ops.values()) * 32 / items
    return out


def model(ops: Counter, items_per_warp: float, total_items: float, bytes_per_item: float) -> dict[str, Any]:
    clk = {k: v / items_per_warp for k, v in resources(ops).items()}
    bound = max(clk, key=lambda k: clk[k])
    t_sm = total_items * clk[bound] / (SMS * CLOCK)
    out: dict[str, Any] = {
        "clk_per_item_x1000": {k: round(v * 1e3, 2) for k, v in clk.items()},
        "bound": bound,
    }
    for gpu, bw in HBM.items():
        floor = total_items * bytes_per_item / bw
        out[gpu] = {
            "floor_us": floor * 1e6,
            "model_us": max(floor, t_sm) * 1e6,
            "share": floor / max(floor, t_sm),
        }
    return out


def workloads() -> list[tuple[str, Any, float, float, str]]:
    """(name, case, items, bytes per item, what an item is) of the report."""
    from lora_core.kernels.compile_check import Case

    out = []
    for dq in (True, False):
        scale = (8 / 64 + 32 / (64 * 256)) / 8 if dq else 4 / 64
        out.append(
            (
                f"dequantize bf16 8192x8192 dq={int(dq)}",
                Case("dequantize", "bfloat16", 8192, 8192, 64, dq),
                8192 * 8192,
                2 + 0.5 + scale,
                "element",
            )
        )
    for n, k in ((8192, 8192), (28672, 8192)):
        for m in (1, 16):
            for op in ("matmul", "grad"):
                out.append(
                    (
                        f"{op} bf16 {n}x{k} M={m}",
                        Case(op, "bfloat16", n, k, 64, True, m),
                        n * k,
                        NF4_BYTES,
                        "weight",
                    )
                )
    out.append(
        (
            "matmul fp16 8192x8200 M=1 (ragged K)",
            Case("matmul", "float16", 8192, 8200, 64, True, 1),
            8192 * 8200,
            NF4_BYTES,
            "weight",
        )
    )
    return out


def report(arch: int = 90) -> list[dict[str, Any]]:
    from lora_core.kernels import compile_check as cc

    rows = []
    compiled: dict[tuple[str, str], Any] = {}  # M=1 and M=16 launch the same kernel: compile it once
    for name, case, items, bpi, unit in workloads():
        for launch in cc.capture(case, arch):
            key = cc.kernel_key(launch, arch)
            if key not in compiled:
                compiled[key] = cc.compile_kernel(launch, arch, want_sass=True)
            r = compiled[key]
            blocks, by = r.occupancy()
            row: dict[str, Any] = {
                "workload": name,
                "kernel": r.kernel,
                "arch": arch,
                "grid": str(launch.grid),
                "constexprs": r.constexprs,
                "regs": r.regs,
                "spills": [r.spill_stores, r.spill_loads],
                "shared": r.shared,
                "num_warps": r.num_warps,
                "blocks_per_sm": blocks,
                "occupancy_limit": by,
                "error": r.error,
            }
            if r.error:
                rows.append(row)
                continue
            ce = r.constexprs
            if r.kernel == "_nf4_dequant_kernel":  # no loop: the whole kernel over one program's elements
                ops, per_warp = Counter(op for _, op, _ in sass_instructions(r.sass)), items / launch.grid[0]
            else:
                ops, per_warp = main_loop(r.sass), int(ce["BLOCK_N"]) * int(ce["BLOCK_K"])
            per_warp /= r.num_warps
            row.update(
                unit=unit,
                mix_per_item=mix(ops, per_warp),
                model=model(ops, per_warp, items, bpi),
                memory_ops={op: n for op, n in sorted(ops.items()) if _MEM.match(op)},
            )
            rows.append(row)
    return rows


def markdown(rows: list[dict[str, Any]], arch: int) -> str:
    lines = [
        f"# Static report: what the kernels compile to (sm_{arch}{'a' if arch == 90 else ''}, estimates)",
        "",
        "Modelled with lora_core.kernels.static_report (see its docstring: per-SM issue / integer ALU /"
        " FP32 / L1-wavefront limits, 132 SMs at 1.755 GHz, HBM H100 3.0 TB/s, H200 4.0 TB/s). Not timings.",
        "",
        "| workload | kernel | regs | spills | smem B | blocks/SM | instr/item (int, mem) | bound |"
        " H100 model µs (floor) | H100 share | H200 model µs (floor) | H200 share |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        head = (
            f"| {r['workload']} | {r['kernel'].strip('_')} | {r['regs']} | {r['spills'][0]}/{r['spills'][1]} "
            f"| {r['shared']} | {r['blocks_per_sm']} ({r['occupancy_limit']}) |"
        )
        if "model" not in r:
            lines.append(
                head + " – | launch latency | – | – | – | – |"
                if not r["error"]
                else head + f" {r['error']} |"
            )
            continue
        m, x = r["model"], r["mix_per_item"]
        lines.append(
            head + f" {x['total']:.2f} ({x['int_alu']:.2f}, {x['memory']:.2f}) / {r['unit']} | {m['bound']} |"
            f" {m['H100']['model_us']:.1f} ({m['H100']['floor_us']:.1f}) | {m['H100']['share']:.0%} |"
            f" {m['H200']['model_us']:.1f} ({m['H200']['floor_us']:.1f}) | {m['H200']['share']:.0%} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from lora_core.kernels import interpreter_active

    ap = OneLineParser(prog="lora-core bench static", description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--arch", type=int, default=90, choices=(80, 90))
    ap.add_argument("--out", default=os.path.join("benchmarks", "results"))
    args = ap.parse_args(argv)
    if interpreter_active():
        print("the static report needs TRITON_INTERPRET unset", file=sys.stderr)
        return 2
    start = time.perf_counter()
    rows = report(args.arch)
    os.makedirs(args.out, exist_ok=True)
    import torch
    import triton

    meta = {
        "triton": triton.__version__,
        "torch": torch.__version__,
        "arch": args.arch,
        "sms": SMS,
        "clock_hz": CLOCK,
        "hbm_bytes_per_s": HBM,
        "seconds": round(time.perf_counter() - start, 1),
    }
    with open(os.path.join(args.out, "static_report.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    text = markdown(rows, args.arch)
    with open(os.path.join(args.out, "static_report.md"), "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
