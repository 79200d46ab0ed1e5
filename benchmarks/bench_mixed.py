"""Mixed-adapter batches (8 adapters, one per row) vs one adapter for the batch vs PEFT's ``adapter_names``.

The logic lives in ``lora_core.bench.mixed``. Run from the repository root:

    python benchmarks/bench_mixed.py                     # CUDA: hidden 2048, 12 layers, bf16, batch 8×512
    python benchmarks/bench_mixed.py --device cpu        # CPU: hidden 256, 2 layers, fp32, batch 8×128
"""

from __future__ import annotations

import sys

from lora_core.bench.mixed import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
