"""End-to-end QLoRA / LoRA training: lora_core vs PEFT (+ bitsandbytes), tokens/s and peak GPU memory.

The logic lives in ``lora_core.bench.e2e``. Run from the repository root:

    python benchmarks/bench_e2e.py                       # default case: hidden 2048, 12 layers, batch 4×1024
    python benchmarks/bench_e2e.py --case 7b             # 7B shape, gradient checkpointing, batch 1×2048
    python benchmarks/bench_e2e.py --device cpu --tiny   # CPU smoke run (2 layers, hidden 64)
"""

from __future__ import annotations

import sys

from lora_core.bench.e2e import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
