"""Forward+backward of one LoRA / QLoRA / DoRA layer vs the frozen bf16 linear and PEFT (needs CUDA).

The logic lives in ``lora_core.bench.layers``. Run from the repository root:

    python benchmarks/bench_lora_layer.py                              # r=16, M 4096/16384, 2 shapes
    python benchmarks/bench_lora_layer.py --shapes 4096x4096 --m 4096 --variants lora dora
"""

from __future__ import annotations

import sys

from lora_core.bench.layers import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
