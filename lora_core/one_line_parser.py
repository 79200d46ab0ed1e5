"""argparse for every ``lora-core`` command: a usage error is one line and exit 2.

argparse prints the whole usage block before its error; a user who typed one wrong flag then has to find the
message under a screen of options, and every other error of the command line is one line already. The
parser here prints only ``lora-core: error: <command>: <message>`` (``--help`` still shows the usage).
It sits at the bottom layer because the benchmark suites (``lora-core bench ...``) and the kernels' static
report build their own parsers below the CLI package.
"""

from __future__ import annotations

import argparse
from typing import NoReturn


class OneLineParser(argparse.ArgumentParser):
    """An ``argparse.ArgumentParser`` whose usage errors are one line: for ``prog="lora-core bench e2e"``,
    ``lora-core: error: bench e2e: argument --steps: invalid int value: 'x'`` (exit 2). Subparsers made
    with ``add_subparsers().add_parser`` are of this class too (argparse reuses the parent's class)."""

    def error(self, message: str) -> NoReturn:
        program, _, command = self.prog.partition(" ")  # "lora-core", "finetune" / "bench e2e" / ""
        where = f"{command}: " if command else ""
        self.exit(2, f"{program}: error: {where}{' '.join(message.split())}\n")


__all__ = ["OneLineParser"]
