"""Benchmark of one adapted linear layer: forward + backward time and saved activations, ours vs PEFT.

Every row is timed as ``y = layer(x); y.backward(g)`` (``triton.testing.do_bench`` median, L2 flushed) and
reported as a multiple of the **frozen bf16 linear's** forward + backward (gradient w.r.t. the input only)
on the same ``x`` — one run, one device, so the ratios are comparable. Variants:

    frozen       nn.Linear, bf16, weight frozen                      the denominator
    lora  qlora  dora                                                 lora_core (fused path on CUDA)
    peft_lora  peft_qlora (bitsandbytes Linear4bit)  peft_dora        PEFT, when installed

Issue targets (H100, bf16, r = 16): LoRA ≤ 1.3×, QLoRA ≤ 1.45×, DoRA ≤ 1.6×; saved activations per layer
beyond the frozen layer's ≤ M·(in + r) elements. ``saved_elems`` is what the layer holds after forward
besides its output (``torch.cuda.memory_allocated`` before/after); ``peak_mib`` the peak over forward and
backward above the starting point.

Writes ``bench_lora_layer.json`` (device, versions, every number) and ``bench_lora_layer.png`` into
``--out``. Needs CUDA; without it, exits with code 2 and says so.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lora_core.atomic import atomic_write
from lora_core.bench.common import parse_shape, pyplot, time_us, versions, write_json
from lora_core.one_line_parser import OneLineParser

SHAPES: list[tuple[int, int]] = [(4096, 4096), (11008, 4096)]  # (out, in)
M_VALUES: list[int] = [4096, 16384]
VARIANTS = ["frozen", "lora", "qlora", "dora", "peft_lora", "peft_qlora", "peft_dora"]
TARGETS = {"lora": 1.3, "qlora": 1.45, "dora": 1.6}


# ----------------------------------------------------------------------------- layers


def _frozen(n_out: int, n_in: int) -> nn.Module:
    lin = nn.Linear(n_in, n_out, bias=False, device="cuda", dtype=torch.bfloat16)
    nn.init.normal_(lin.weight, std=0.02)
    return lin.requires_grad_(False)


def _ours(kind: str, lin: nn.Module, r: int, dropout: float) -> nn.Module:
    from lora_core.lora.layer import LoRALinear

    cls: Any = LoRALinear
    if kind == "qlora":
        from lora_core.lora.qlora import QLoRALinear

        cls = QLoRALinear
    layer = cls.from_linear(lin, r=r, alpha=2.0 * r, dropout=dropout, use_dora=kind == "dora")
    nn.init.normal_(layer.lora_B.weight, std=0.02)  # B = 0 would let a lazy kernel skip work
    return layer.train()


def _peft(kind: str, lin: nn.Module, r: int, dropout: float) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    holder = nn.Module()
    if kind == "peft_qlora":
        import bitsandbytes as bnb

        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False, compute_dtype=torch.bfloat16,
                              compress_statistics=True, quant_type="nf4")  # fmt: skip
        q.weight = bnb.nn.Params4bit(lin.weight.detach().cpu(), requires_grad=False, quant_type="nf4",
                                     compress_statistics=True)  # fmt: skip
        holder.proj = q.cuda()
    else:
        holder.proj = lin
    cfg = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout, target_modules=["proj"],
                     use_dora=kind == "peft_dora")  # fmt: skip
    model = get_peft_model(holder, cfg)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.02)
    return model.train()


def make_layer(kind: str, n_out: int, n_in: int, r: int, dropout: float) -> nn.Module:
    lin = _frozen(n_out, n_in)
    if kind == "frozen":
        return lin
    if kind.startswith("peft_"):
        return _peft(kind, lin, r, dropout)
    return _ours(kind, lin, r, dropout)


# ----------------------------------------------------------------------------- measuring


def measure(layer: nn.Module, x: torch.Tensor, g: torch.Tensor) -> dict[str, float]:
    """Time of forward + backward (µs), saved activation elements (bf16-sized) and peak memory (MiB)."""
    params = [p for p in layer.parameters() if p.requires_grad]

    def step() -> None:
        for p in params:
            p.grad = None
        layer(x).backward(g)

    step()  # warm-up: kernels compiled, caches (DoRA's ‖W₀‖²) filled
    torch.cuda.synchronize()
    us = time_us(step)
    for p in params:
        p.grad = None
    x.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    y = layer(x)
    saved = torch.cuda.memory_allocated() - start - y.numel() * y.element_size()
    y.backward(g)
    del y
    peak = torch.cuda.max_memory_allocated() - start
    return {"us": us, "saved_elems": saved / 2, "peak_mib": peak / 2**20}


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for n_out, n_in in args.shapes:
        for m in args.m:
            x = torch.randn(m, n_in, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            g = torch.randn(m, n_out, device="cuda", dtype=torch.bfloat16)
            for dropout in args.dropout:
                frozen_us = None
                for kind in args.variants:
                    row: dict[str, Any] = {
                        "variant": kind, "out": n_out, "in": n_in, "m": m, "r": args.r, "dropout": dropout,
                        "budget_elems": m * (n_in + args.r),
                    }  # fmt: skip
                    try:
                        layer = make_layer(kind, n_out, n_in, args.r, dropout)
                        row.update(measure(layer, x, g))
                    except (ImportError, RuntimeError, ValueError, TypeError) as err:  # PEFT/bnb absent...
                        row["error"] = f"{type(err).__name__}: {err}"[:300]
                    layer = None
                    torch.cuda.empty_cache()
                    if kind == "frozen" and "us" in row:
                        frozen_us = row["us"]
                    if "us" in row and frozen_us:
                        row["x_frozen"] = row["us"] / frozen_us
                        row["target"] = TARGETS.get(kind)
                    rows.append(row)
                    print(f"  {n_out}×{n_in} M={m:<6} p={dropout:<5} {kind:<11} "
                          + (f"{row['us']:9.1f} µs  {row.get('x_frozen', 0):5.2f}×" if "us" in row
                             else row["error"]), file=sys.stderr)  # fmt: skip
            del x, g
    return rows


# ----------------------------------------------------------------------------- output


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    head = (f"{'shape (out×in)':<14} {'M':>6} {'p':>5} {'variant':<11} {'µs':>9} {'×frozen':>8} "
            f"{'target':>7} {'saved/M(in+r)':>13} {'peak MiB':>9}")  # fmt: skip
    lines = [head, "-" * len(head)]
    for r in rows:
        if "us" not in r:
            lines.append(f"{r['out']}×{r['in']:<9} {r['m']:>6} {r['dropout']:>5} {r['variant']:<11} "
                         f"(skipped: {r['error'][:60]})")  # fmt: skip
            continue
        target = r.get("target")
        mark = "" if target is None else (" ok" if r["x_frozen"] <= target else " MISS")
        lines.append(
            f"{r['out']}×{r['in']:<9} {r['m']:>6} {r['dropout']:>5} {r['variant']:<11} {r['us']:9.1f} "
            f"{r.get('x_frozen', float('nan')):8.2f} {'' if target is None else f'≤{target}':>7}{mark:<5}"
            f"{r['saved_elems'] / r['budget_elems']:9.2f} {r['peak_mib']:9.0f}"
        )
    return "\n".join(lines)


def plot(path: Path, rows: Sequence[dict[str, Any]], meta: dict[str, Any]) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    cases = sorted({(r["out"], r["in"], r["m"], r["dropout"]) for r in rows})
    timed = {r["variant"] for r in rows if "x_frozen" in r}
    kinds = [k for k in VARIANTS if k != "frozen" and k in timed]
    fig, ax = plt.subplots(figsize=(max(8, 1.2 * len(cases)), 4.5))
    width = 0.8 / max(1, len(kinds))
    for i, kind in enumerate(kinds):
        vals = [next((r["x_frozen"] for r in rows if (r["out"], r["in"], r["m"], r["dropout"]) == c
                      and r["variant"] == kind and "x_frozen" in r), 0.0) for c in cases]  # fmt: skip
        ax.bar([j + i * width for j in range(len(cases))], vals, width, label=kind)
    for kind, t in TARGETS.items():
        ax.axhline(t, ls="--", lw=0.8, color="gray")
        ax.text(len(cases) - 0.5, t, f" {kind} ≤{t}×", fontsize=7, va="bottom")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))])
    ax.set_xticklabels([f"{o}×{i}\nM={m} p={p}" for o, i, m, p in cases], fontsize=7)
    ax.set_ylabel("forward+backward / frozen bf16 linear")
    ax.set_title(f"LoRA layer, r={meta['r']}, bf16 — {meta['device']}", fontsize=9)
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
    return True


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="lora-core bench layer", description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", type=parse_shape, nargs="+", default=SHAPES, help="weights out×in")
    p.add_argument("--m", type=int, nargs="+", default=M_VALUES, help="tokens per step")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--dropout", type=float, nargs="+", default=[0.0, 0.05])
    p.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="folder for JSON and PNG")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_lora_layer: needs a CUDA GPU (torch.cuda.is_available() is False); nothing timed.",
              file=sys.stderr)  # fmt: skip
        return 2
    if "frozen" not in args.variants:
        args.variants = ["frozen", *args.variants]  # the denominator of every ratio
    args.out.mkdir(parents=True, exist_ok=True)
    meta_versions = versions()
    try:
        import importlib.metadata as md

        meta_versions["peft"] = md.version("peft")
    except Exception:  # absent or broken metadata: just not recorded
        meta_versions["peft"] = None
    meta = {"device": torch.cuda.get_device_name(), "versions": meta_versions, "r": args.r,
            "dtype": "bfloat16", "timer": "triton.testing.do_bench median, L2 flushed",
            "targets": TARGETS}  # fmt: skip
    rows = run(args)
    write_json(args.out / "bench_lora_layer.json", meta, rows)
    plotted = plot(args.out / "bench_lora_layer.png", rows, meta)
    print(format_table(rows))
    print(f"\nwrote {args.out / 'bench_lora_layer.json'}" + (" and bench_lora_layer.png" if plotted else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
