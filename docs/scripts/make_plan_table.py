"""The planner's table in docs/training.md ("Will it fit? The planner"), made by `lc.plan_memory`.

    python docs/scripts/make_plan_table.py            # rewrite the table between its markers
    python docs/scripts/make_plan_table.py --check    # exit 1 if the committed table is out of date

tests/test_planner.py checks that the committed table equals `plan_table()`, so the docs stay true when the
planner changes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "training.md"
START, END = "<!-- plan-table: start (docs/scripts/make_plan_table.py) -->", "<!-- plan-table: end -->"
MODELS = ("llama-2-7b", "llama-2-13b", "llama-2-70b")
CARDS = (24, 48, 80)
LAYOUTS = ((1, "auto", False), (2, "fsdp", False), (8, "fsdp", False), (2, "fsdp", True))
SETTINGS = {"seq": 2048, "batch": 1, "r": 16, "quantize": "nf4", "dtype": "bf16", "grad_ckpt": True}


def plan_table() -> str:
    """Markdown: per-rank GiB of each part for each model and GPU layout, and whether it fits each card."""
    from lora_core.training.planner import GIB, plan_memory

    def gib(x: int) -> str:
        return f"{x / GIB:.1f}"

    head = (
        "| model | GPUs | weights | adapters + grads + AdamW | activations | gathered | overhead | "
        "total / GPU | " + " | ".join(f"{c} GB" for c in CARDS) + " |"
    )
    rows = [head, "|" + "---|" * (8 + len(CARDS))]
    for model in MODELS:
        for gpus, strategy, offload in LAYOUTS:
            plans = [
                plan_memory(model, gpus=gpus, gpu_gb=c, strategy=strategy, cpu_offload=offload, **SETTINGS)
                for c in CARDS
            ]
            p = plans[0]  # the parts do not depend on the card
            how = "1" if gpus == 1 else f"{gpus}, FSDP" + (" + CPU offload" if offload else "")
            fit = [
                f"fits ({gib(q.margin)} free)" if q.fits else f"no ({gib(-q.margin)} short)" for q in plans
            ]
            cells = [p.model.name, how, gib(p.weights), gib(p.adapters + p.gradients + p.optimizer),
                     gib(p.activations), gib(p.gathered), gib(p.overhead), gib(p.total), *fit]  # fmt: skip
            rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def replace_table(text: str, table: str) -> str:
    """``text`` with what lies between the markers replaced by ``table``."""
    if START not in text or END not in text:
        raise SystemExit(f"{DOC}: the markers {START!r} and {END!r} are missing")
    before, rest = text.split(START, 1)
    _, after = rest.split(END, 1)
    return f"{before}{START}\n{table}\n{END}{after}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check the committed table")
    args = parser.parse_args(argv)
    text = DOC.read_text()
    new = replace_table(text, plan_table())
    if args.check:
        if new != text:
            print(f"{DOC} is out of date: run python docs/scripts/make_plan_table.py", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
