"""Mixed-adapter batches: one batch whose rows use 8 different adapters, against one adapter for all rows.

A random-weight transformers ``LlamaForCausalLM`` (no download) carries 8 LoRA adapters (r = 16, α = 32,
no dropout) on all its linear layers (q, k, v, o, gate, up, down); their B factors are random, so no
update is zero. The batch is ``batch × seq`` tokens and row ``i`` uses adapter ``a{i % 8}``. Cases::

    single        lora_core, adapter a0 active for the whole batch (on CUDA: the fused Function)
    mixed         lora_core, ``with lc.mixed_adapters(model, names)`` (on CUDA: the per-row kernels)
    peft_single   PEFT, adapter a0 active
    peft_mixed    PEFT, ``model(..., adapter_names=names)`` (PEFT loops over the adapters of the batch)

each timed for the forward pass (``torch.no_grad``) and for forward + backward (``logits.mean()``; every
adapter used trains). All models run in eval mode (PEFT refuses ``adapter_names`` in training mode; no
dropout anyway). Ratios reported: ``mixed / single`` (issue 15's target on a GPU: ≤ 1.2), ``peft_mixed /
single`` and ``peft_mixed / peft_single``. The adapters of the PEFT model are copied from lora_core's, so
the two mixed outputs must agree (``max_abs_diff_mixed`` in the JSON, a check that both run the same
computation).

Sizes: ``full`` (GPU, bf16): hidden 2048, intermediate 5632, 12 layers, vocab 32000, batch 8 × 512;
``small`` (CPU, fp32): hidden 256, intermediate 688, 2 layers, vocab 1024, batch 8 × 128 — about a minute;
``tiny``: the test's. Timing: on CUDA ``triton.testing.do_bench`` (median); on the CPU the cases take
turns for ``--reps`` rounds after ``--warmup`` and each keeps its smallest CPU time (``process_time``; the
smallest wall time is recorded too) — on a shared machine still a rough figure.

Writes ``bench_mixed_<size>_<device>.json`` (device, versions, config, every number), ``.md`` (the table)
and ``.png`` (the ratios) into ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.metadata as md
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lora_core.atomic import atomic_write, atomic_write_text
from lora_core.bench.common import pyplot, time_us, versions, write_json
from lora_core.bench.e2e_cases import TARGET_MODULES, llama_config
from lora_core.one_line_parser import OneLineParser

SIZES: dict[str, dict[str, Any]] = {
    "full": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 12,
             "num_attention_heads": 16, "vocab_size": 32000, "batch": 8, "seq": 512},
    "small": {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 2, "num_attention_heads": 4,
              "vocab_size": 1024, "batch": 8, "seq": 128},
    "tiny": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
             "vocab_size": 64, "batch": 8, "seq": 4},
}  # fmt: skip
CASES = ["single", "mixed", "peft_single", "peft_mixed"]
RATIOS = {"mixed/single": ("mixed", "single"), "peft_mixed/single": ("peft_mixed", "single"),
          "peft_mixed/peft_single": ("peft_mixed", "peft_single")}  # fmt: skip
TARGET = 1.2  # mixed / single on a GPU (issue 15)


# ----------------------------------------------------------------------------- the two models


def build_models(spec: dict[str, Any], n_adapters: int, r: int, device: torch.device, dtype: torch.dtype,
                 seed: int) -> tuple[nn.Module, nn.Module]:  # fmt: skip
    """lora_core's model and PEFT's, on the same random base, with the same ``n_adapters`` adapters."""
    import peft
    from transformers import LlamaForCausalLM

    import lora_core as lc

    torch.manual_seed(seed)
    base = LlamaForCausalLM(llama_config(spec)).to(device, dtype).eval()
    ours = copy.deepcopy(base)
    for i in range(n_adapters):
        cfg = lc.LoraConfig(r=r, alpha=2.0 * r, dropout=0.0, target_modules=TARGET_MODULES)
        lc.apply_lora(ours, cfg, adapter_name=f"a{i}")
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if ".lora_B." in name:  # B = 0 would make every update vanish
                p.copy_(0.02 * torch.randn(p.shape, generator=gen).to(p.dtype))
    pcfg = peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=TARGET_MODULES)
    theirs = peft.get_peft_model(base, pcfg, adapter_name="a0")
    for i in range(1, n_adapters):
        theirs.add_adapter(f"a{i}", pcfg)
    ours_state = ours.state_dict()
    with torch.no_grad():  # PEFT's in-memory keys are ours under "base_model.model."
        for name, p in theirs.named_parameters():
            if ".lora_" in name:
                p.copy_(ours_state[name.removeprefix("base_model.model.")].to(p.dtype))
    return ours.eval(), theirs.eval()


def _train_all(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_" in name)


def case_fn(case: str, ours: nn.Module, theirs: nn.Module, ids: torch.Tensor, names: list[str],
            backward: bool) -> Callable[[], Any]:  # fmt: skip
    """One call of ``case``: forward (no grad) or forward + backward, the model set up for it."""
    import lora_core as lc

    model = theirs if case.startswith("peft") else ours
    kwargs: dict[str, Any] = {}
    mixed = contextlib.nullcontext
    if case == "single":
        lc.set_adapter(ours, "a0")
    elif case == "mixed":
        _train_all(ours)
        mixed = lambda: lc.mixed_adapters(ours, names)
    elif case == "peft_single":
        theirs.set_adapter("a0")
    else:
        _train_all(theirs)
        kwargs["adapter_names"] = names
    params = [p for p in model.parameters() if p.requires_grad]

    def run() -> Any:
        for p in params:
            p.grad = None
        with mixed(), contextlib.nullcontext() if backward else torch.no_grad():
            logits = model(input_ids=ids, **kwargs).logits
            if backward:
                logits.float().mean().backward()
        return logits

    return run


def _time_all(fns: dict[str, Callable[[], Any]], device: torch.device, warmup: int, reps: int
              ) -> tuple[dict[str, float], dict[str, float]]:  # fmt: skip
    """Milliseconds per call of each case, and (CPU only) the wall-clock figure. CUDA: do_bench's median.
    CPU: the cases take turns (round robin, ``reps`` rounds after ``warmup``) and each keeps its smallest
    **CPU time** (``time.process_time``): on a shared, loaded machine wall time mostly measures how long
    the process waited for a core, CPU time the work it did (exact with ``--threads 1``)."""
    if device.type == "cuda":
        out = {}
        for case, fn in fns.items():
            fn()
            torch.cuda.synchronize()
            out[case] = time_us(fn) / 1e3
        return out, {}
    cpu: dict[str, list[float]] = {case: [] for case in fns}
    wall: dict[str, list[float]] = {case: [] for case in fns}
    for i in range(warmup + reps):
        for case, fn in fns.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            if i >= warmup:
                cpu[case].append(time.process_time() - start_cpu)
                wall[case].append(time.perf_counter() - start)
    return {c: 1e3 * min(t) for c, t in cpu.items()}, {c: 1e3 * min(t) for c, t in wall.items()}


def run(args: argparse.Namespace, device: torch.device) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    spec = SIZES[args.size]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    ours, theirs = build_models(spec, args.adapters, args.r, device, dtype, args.seed)
    gen = torch.Generator().manual_seed(args.seed + 2)
    ids = torch.randint(0, spec["vocab_size"], (spec["batch"], spec["seq"]), generator=gen).to(device)
    names = [f"a{i % args.adapters}" for i in range(spec["batch"])]
    rows = []
    for backward in (False, True):
        pass_name = "forward+backward" if backward else "forward"
        # each case_fn sets its model up; the set-ups are compatible (a0 active, every adapter trainable)
        fns = {case: case_fn(case, ours, theirs, ids, names, backward) for case in args.cases}
        ms, wall = _time_all(fns, device, args.warmup, args.reps)
        for case in args.cases:
            print(f"  {pass_name:<17} {case:<12} {ms[case]:10.2f} ms", file=sys.stderr, flush=True)
        row: dict[str, Any] = {"pass": pass_name, "ms": ms, **({"wall_ms": wall} if wall else {})}
        row["ratios"] = {k: ms[a] / ms[b] for k, (a, b) in RATIOS.items() if a in ms and b in ms}
        rows.append(row)
    checks = {}
    if {"mixed", "peft_mixed"} <= set(args.cases):
        with torch.no_grad():
            a = case_fn("mixed", ours, theirs, ids, names, False)().float()
            b = case_fn("peft_mixed", ours, theirs, ids, names, False)().float()
            c = case_fn("single", ours, theirs, ids, names, False)().float()
        checks["max_abs_diff_mixed"] = float((a - b).abs().max())  # ours vs PEFT: the same computation
        checks["max_abs_diff_mixed_vs_single"] = float((a - c).abs().max())  # > 0: the adapters differ
    return rows, checks


# ----------------------------------------------------------------------------- output


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    cases = [c for c in CASES if any(c in r["ms"] for r in rows)]
    head = f"{'pass':<17} " + " ".join(f"{c + ' ms':>15}" for c in cases) + "  " + "  ".join(RATIOS)
    lines = [head, "-" * len(head)]
    for r in rows:
        cells = " ".join(f"{r['ms'][c]:15.2f}" if c in r["ms"] else f"{'-':>15}" for c in cases)
        ratios = "  ".join(f"{r['ratios'][k]:>{len(k)}.2f}" if k in r["ratios"] else f"{'-':>{len(k)}}"
                           for k in RATIOS)  # fmt: skip
        lines.append(f"{r['pass']:<17} {cells}  {ratios}")
    return "\n".join(lines)


def plot(path: Path, rows: Sequence[dict[str, Any]], meta: dict[str, Any]) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(RATIOS)
    for i, key in enumerate(RATIOS):
        vals = [r["ratios"].get(key, 0.0) for r in rows]
        ax.bar([j + i * width for j in range(len(rows))], vals, width, label=key)
    ax.axhline(TARGET, ls="--", lw=0.8, color="gray")
    ax.text(len(rows) - 0.6, TARGET, f" target mixed/single ≤ {TARGET} (GPU)", fontsize=7, va="bottom")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(rows))])
    ax.set_xticklabels([r["pass"] for r in rows])
    ax.set_ylabel("time ratio")
    ax.set_title(f"{meta['adapters']} adapters, r={meta['r']}, {meta['size']} — {meta['device']}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return True


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="lora-core bench mixed", description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--size", choices=list(SIZES), default=None, help="full on CUDA, small on the CPU")
    p.add_argument("--device", choices=["cuda", "cpu"], default=None, help="cuda when available")
    p.add_argument("--cases", nargs="+", choices=CASES, default=CASES)
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--warmup", type=int, default=1, help="CPU: untimed calls first")
    p.add_argument("--reps", type=int, default=5, help="CPU: timed calls (median)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads", type=int, default=None, help="CPU: torch threads (1 is steadier on a busy machine)"
    )
    p.add_argument("--note", default="", help="recorded with the results (e.g. the machine's load)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="folder for JSON, table, PNG")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_mixed: --device cuda needs a CUDA GPU; use --device cpu", file=sys.stderr)
        return 2
    if args.adapters < 1 or args.r < 1 or args.reps < 1 or args.warmup < 0 or (args.threads or 1) < 1:
        print("bench_mixed: --adapters, --r, --reps and --threads must be ≥ 1, --warmup ≥ 0", file=sys.stderr)
        return 2
    args.size = args.size or ("full" if device.type == "cuda" else "small")
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)
    rows, checks = run(args, device)
    meta_versions = versions()
    for pkg in ("transformers", "peft"):
        meta_versions[pkg] = md.version(pkg)
    cuda = device.type == "cuda"
    meta = {
        "device": torch.cuda.get_device_name(device) if cuda else f"CPU ({torch.get_num_threads()} threads)",
        "versions": meta_versions, "size": args.size, "model": SIZES[args.size], "adapters": args.adapters,
        "r": args.r, "alpha": 2.0 * args.r, "target_modules": TARGET_MODULES,
        "dtype": "bfloat16" if cuda else "float32", "rows": "row i uses adapter a{i % adapters}",
        "timer": "triton.testing.do_bench median" if cuda else
                 f"smallest process CPU time of {args.reps} round-robin runs after {args.warmup}",
        "target": f"mixed/single ≤ {TARGET} on a GPU", "note": args.note, **checks,
    }  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"bench_mixed_{args.size}_{device.type}"
    write_json(stem.with_suffix(".json"), meta, rows)
    table = format_table(rows)
    head = f"{meta['device']}, {meta['dtype']}, size {args.size}: {meta['model']}" + (
        f"; {args.note}" if args.note else ""
    )
    atomic_write_text(stem.with_suffix(".md"), f"{head}\n\n```\n{table}\n```\n")
    plotted = plot(stem.with_suffix(".png"), rows, meta)
    print(table)
    print(f"mixed outputs, ours vs PEFT: max |Δ| = {checks.get('max_abs_diff_mixed')}; mixed vs single: "
          f"{checks.get('max_abs_diff_mixed_vs_single')}")  # fmt: skip
    print(f"wrote {stem}.json, .md" + (", .png" if plotted else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
