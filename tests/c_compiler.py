"""Whether this machine can build lora_core's C fast paths (``quant.nf4_native``, ``lora.dropout``), judged
here independently of ``lora_core.native``'s own checks, so a wrong check there cannot skip their tests."""

from __future__ import annotations

import os
import platform
import shutil
import sys

import pytest

CAN_BUILD = (
    sys.platform.startswith("linux")
    and platform.machine() in ("x86_64", "AMD64")
    and bool(os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc"))
)
needs_c = pytest.mark.skipif(not CAN_BUILD, reason="needs Linux on x86-64 and a C compiler")
