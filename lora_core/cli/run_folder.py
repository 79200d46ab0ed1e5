"""A run's output folder: one writer at a time, and no leftovers of killed writers.

``lora-core finetune`` holds ``hold_folder_lock(out_dir)`` for the whole run, so a second run on the same
folder is refused instead of interleaving ``metrics.jsonl``; under the lock it removes the temporaries that
killed runs left (``lora_core.atomic.remove_stale_temporaries``, next to the code that names them).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

LOCK_NAME = ".lora-core.lock"


class FolderBusy(RuntimeError):
    """Another process holds the lock on the folder (``hold_folder_lock``)."""


def hold_folder_lock(folder: str | os.PathLike[str]) -> Any:
    """Create ``folder`` and take an exclusive ``flock`` on ``folder/.lora-core.lock``; return the open file.

    The lock lasts while the returned file is open: close it to release. The OS releases it when the
    process ends, however it ends, so a killed run never leaves a stale lock. The (empty) lock file itself
    stays: removing it while others may be opening it would let two processes lock two different files.

    Raises:
        FolderBusy: another process holds the lock.
    """
    import fcntl  # POSIX only, and only needed here

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    handle = open(folder / LOCK_NAME, "a")  # held open: the lock lasts while it is
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise FolderBusy(f"{folder} is in use by another process (it holds {folder / LOCK_NAME})") from None
    return handle
