"""The end-to-end benchmark's verdicts and output: its targets, loss agreement, the table and the plot."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lora_core.atomic import atomic_write
from lora_core.bench.common import pyplot

# PEFT + bitsandbytes (b) and PEFT bf16 LoRA (d) as measured on an H100 in 2026-11 (tokens/s, peak GiB),
# printed beside ours for context.
H100_REFERENCE: dict[str, dict[str, tuple[float, float]]] = {
    "default": {"b": (40.6e3, 8.76), "d": (47.6e3, 9.60)},
    "7b": {"b": (2650.0, 5.38)},
}
SPEEDUP_TARGET = 1.3  # default case: a ≥ 1.3 × b
# The real SmolLM2-135M on a CPU (``e2e_cpu``, float32): a ≥ 1.2 × b and c ≥ 1.1 × d, each at no more peak
# memory (resident set) than its PEFT counterpart.
CPU_TARGETS: dict[str, list[tuple[str, str, float]]] = {"smollm2": [("a", "b", 1.2), ("c", "d", 1.1)]}


# ----------------------------------------------------------------------------- checks and output


def evaluate_targets(case: str, rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets for ``case`` as ``{name, value, limit, passed}`` (passed None: not measured)."""
    by = {r["case"]: r for r in rows if r.get("ran")}
    a, b = by.get("a"), by.get("b")
    measured = a is not None and b is not None and a.get("peak_gib") is not None
    speed = a["tokens_per_s"] / b["tokens_per_s"] if measured else None  # type: ignore[index]
    mem = (a["peak_gib"], b["peak_gib"]) if measured else (None, None)  # type: ignore[index]
    if case == "default":
        checks = [("a tokens/s ÷ b tokens/s", speed, f"≥ {SPEEDUP_TARGET}",
                   None if speed is None else speed >= SPEEDUP_TARGET),
                  ("a peak GiB vs b peak GiB", mem[0], f"≤ {mem[1]}",
                   None if mem[0] is None else mem[0] <= mem[1])]  # fmt: skip
    elif case == "7b":
        checks = [("a tokens/s ÷ b tokens/s", speed, "> 1", None if speed is None else speed > 1.0),
                  ("a peak GiB vs b peak GiB", mem[0], f"< {mem[1]}",
                   None if mem[0] is None else mem[0] < mem[1])]  # fmt: skip
    elif case in CPU_TARGETS:
        checks = [c for x, y, ratio in CPU_TARGETS[case] for c in _pair_checks(by, x, y, ratio)]
    else:
        return []  # the tiny smoke runs have no targets
    return [{"name": n, "value": v, "limit": lim, "passed": p} for n, v, lim, p in checks]


def _pair_checks(by: dict[str, dict[str, Any]], x: str, y: str, ratio: float) -> list[tuple[Any, ...]]:
    """``x`` tokens/s ≥ ``ratio`` × ``y``'s, and ``x`` peak ≤ ``y`` peak (None: not measured)."""
    rx, ry = by.get(x), by.get(y)
    ok = rx is not None and ry is not None
    ok = ok and rx.get("peak_gib") is not None and ry.get("peak_gib") is not None  # type: ignore[union-attr]
    speed = rx["tokens_per_s"] / ry["tokens_per_s"] if ok else None  # type: ignore[index]
    mem = (rx["peak_gib"], ry["peak_gib"]) if ok else (None, None)  # type: ignore[index]
    return [(f"{x} tokens/s ÷ {y} tokens/s", speed, f"≥ {ratio}", None if speed is None else speed >= ratio),
            (f"{x} peak GiB vs {y} peak GiB", mem[0], f"≤ {mem[1]}",
             None if mem[0] is None else mem[0] <= mem[1])]  # fmt: skip


def loss_agreement(rows: Sequence[dict[str, Any]]) -> dict[str, float | None]:
    """|first loss| differences of the pairs that must agree: a vs b (same NF4 weights), c vs d."""
    by = {r["case"]: r.get("loss_first") for r in rows if r.get("ran")}
    pair = {"a_vs_b": ("a", "b"), "c_vs_d": ("c", "d"), "a_vs_c": ("a", "c")}
    return {k: abs(by[x] - by[y]) if by.get(x) is not None and by.get(y) is not None else None
            for k, (x, y) in pair.items()}  # fmt: skip


def format_table(case: str, rows: Sequence[dict[str, Any]], checks: Sequence[dict[str, Any]]) -> str:
    head = (f"{'':<3}{'implementation':<28}{'tokens/s':>11}{'step ms':>9}{'peak GiB':>10}{'load GiB':>10}"
            f"{'loss₀':>8}{'trainable':>12}  issue's H100")  # fmt: skip
    lines = [head, "-" * len(head)]
    ref = H100_REFERENCE.get(case, {})
    for r in rows:
        if not r.get("ran"):
            lines.append(f"{r['case']:<3}{r['label'][:27]:<28}  skipped: {r.get('skipped', '')[:70]}")
            continue
        peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
        load = "-" if r["load_peak_gib"] is None else f"{r['load_peak_gib']:.2f}"
        issue = f"{ref[r['case']][0]:,.0f} tok/s, {ref[r['case']][1]} GiB" if r["case"] in ref else ""
        lines.append(f"{r['case']:<3}{r['label'][:27]:<28}{r['tokens_per_s']:>11,.0f}"
                     f"{r['step_ms_median']:>9.1f}{peak:>10}{load:>10}{r['loss_first']:>8.4f}"
                     f"{r['trainable_params']:>12,}  {issue}")  # fmt: skip
    for c in checks:
        verdict = {True: "PASS", False: "FAIL", None: "not measured"}[c["passed"]]
        value = "-" if c["value"] is None else f"{c['value']:.3f}"
        lines.append(f"target ({case}): {c['name']} = {value}, wanted {c['limit']}: {verdict}")
    return "\n".join(lines)


# --keep-freed-memory's choices (bench e2e --model): which cases run with lc.train's malloc setting
MALLOC_CASES = {"lora_core": "the lora_core cases (as lc.train)", "all": "every case", "none": "no case"}


def plot(path: Path, case: str, rows: Sequence[dict[str, Any]], meta: dict[str, Any]) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    ran = [r for r in rows if r.get("ran")]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    colors = {"a": "tab:blue", "b": "tab:orange", "c": "tab:cyan", "d": "tab:red", "b0": "tab:brown"}
    for ax, field, unit in ((axes[0], "tokens_per_s", "tokens/s"), (axes[1], "peak_gib", "peak GiB")):
        vals = [r[field] or 0.0 for r in ran]
        ax.bar([r["case"] for r in ran], vals, color=[colors.get(r["case"], "gray") for r in ran])
        for i, v in enumerate(vals):
            ax.text(i, v, f"{v:,.0f}" if field == "tokens_per_s" else f"{v:.2f}", ha="center", va="bottom",
                    fontsize=8)  # fmt: skip
        b = next((r for r in ran if r["case"] == "b"), None)
        if b is not None and b[field]:
            level = b[field] * (SPEEDUP_TARGET if field == "tokens_per_s" and case == "default" else 1.0)
            ax.axhline(level, ls="--", lw=0.8, color="gray")
        ax.set_ylabel(unit)
        if field == "peak_gib" and not any(vals):
            ax.text(0.5, 0.5, "no GPU memory on the CPU", transform=ax.transAxes, ha="center")
    axes[0].set_title("higher is better (dashed: target vs b)", fontsize=8)
    axes[1].set_title("lower is better (dashed: b)", fontsize=8)
    device = meta["device"] + (f"; r = {meta['r']}, dropout {meta['dropout']}" if "r" in meta else "")
    if meta.get("keep_freed_memory"):  # the CPU harness: which cases ran with lc.train's malloc setting
        device += f"; malloc keeps freed memory in: {MALLOC_CASES[meta['keep_freed_memory']]}"
    fig.suptitle(f"{case}: " + ", ".join(f"{r['case']} = {r['label']}" for r in ran) + f"\n{device}",
                 fontsize=7)  # fmt: skip
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return True
