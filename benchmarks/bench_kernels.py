"""Time lora_core's NF4 kernels against cuBLAS bf16, the torch reference and bitsandbytes (needs CUDA).

Same as ``lora-core bench``; the logic lives in ``lora_core.bench.kernels``. Run from the repository root:

    python benchmarks/bench_kernels.py                      # everything (a few minutes on an H100)
    python benchmarks/bench_kernels.py --shapes 8192x8192 --m 1 16 4096 --ops matmul
"""

from __future__ import annotations

import sys

from lora_core.bench.kernels import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
