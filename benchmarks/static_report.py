"""What the NF4 kernels compile to and how fast a first-order model says that runs (no GPU needed).

Same as ``lora-core bench static``; the logic lives in ``lora_core.kernels.static_report``. Run with
Triton installed (not in interpreter mode):

    python benchmarks/static_report.py                 # sm_90a -> benchmarks/results/static_report.{json,md}
    python benchmarks/static_report.py --arch 80 --out /tmp/static
"""

from __future__ import annotations

import sys

from lora_core.kernels.static_report import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
