"""Atomic writes: a reader (or a run killed half-way) sees the old file or the new one, never half of one.

Every file lora_core writes (adapters, checkpoints, metrics, plots, benchmark results) goes through here:
write a temporary sibling, fsync it, rename it over the target, fsync the folder so the rename survives a
crash too.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], object]) -> Path:
    """Write a file by calling ``write(tmp)`` on a temporary path next to ``path``, then rename it into place.

    ``write`` receives the temporary path (pass it to ``save_file``, ``torch.save``, ``savefig``, ...). On
    any error the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """``atomic_write`` for a UTF-8 text file."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_dir(path: str | os.PathLike[str], fill: Callable[[Path], object]) -> Path:
    """Write a folder by calling ``fill(tmp)`` on an empty temporary sibling folder, then move it into place.

    An existing folder at ``path`` is replaced only after ``fill`` succeeded (the swap itself is two renames
    with a removal between them, so a crash at that instant can leave the old folder under a hidden name,
    never a half-written one at ``path``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    try:
        fill(tmp)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(path.parent)
    return path
