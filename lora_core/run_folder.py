"""A run's output folder: one writer at a time, and no leftovers of killed writers.

``lora-core finetune`` holds ``hold_folder_lock(out_dir)`` for the whole run, so a second run on the same
folder is refused instead of interleaving ``metrics.jsonl``; under the lock it removes the temporaries that
killed runs left (``remove_stale_temporaries``). The names are those of ``lora_core._io``: ``atomic_write``
writes ``.NAME.XXXXXXXX.tmp`` next to ``NAME`` (``tempfile.mkstemp``), ``atomic_write_dir`` a
``.NAME.XXXXXXXX.tmp`` folder (``mkdtemp``) and, during the swap, ``.NAME.old-PID``.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterable
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


def remove_stale_temporaries(
    folder: str | os.PathLike[str], files: Iterable[str] = (), folders: Iterable[str] = ()
) -> list[Path]:
    """Remove what killed writers left in ``folder``: ``atomic_write``'s ``.NAME.XXXXXXXX.tmp`` files for the
    given file ``NAME``s, ``atomic_write_dir``'s ``.NAME.XXXXXXXX.tmp`` folders and ``.NAME.old-PID`` folders
    for the given folder ``NAME``s (an ``.old-PID`` folder is moved back to ``NAME`` when ``NAME`` is gone:
    a crash between the two renames of the swap left it as the only copy). Only entries whose name matches
    exactly and whose kind (file / folder, not a link) is the one these functions write are touched.

    Only call it while no other process writes into ``folder`` (hold ``hold_folder_lock``). Returns the paths
    removed or restored.
    """
    folder = Path(folder)
    rand = "[a-z0-9_]{8}"  # tempfile's random names: 8 of "abcdefghijklmnopqrstuvwxyz0123456789_"
    file_re = re.compile(rf"\.({'|'.join(map(re.escape, files)) or '(?!)'})\.{rand}\.tmp")
    dir_re = re.compile(rf"\.({'|'.join(map(re.escape, folders)) or '(?!)'})\.(?:{rand}\.tmp|old-[0-9]+)")
    done = []
    for entry in sorted(folder.iterdir()) if folder.is_dir() else []:
        if entry.is_symlink():
            continue
        if file_re.fullmatch(entry.name) and entry.is_file():
            entry.unlink()
        elif (match := dir_re.fullmatch(entry.name)) and entry.is_dir():
            target = folder / match.group(1)
            if ".old-" in entry.name and not target.exists() and not target.is_symlink():
                os.replace(entry, target)  # the old folder is the only copy left: put it back
            else:
                shutil.rmtree(entry)
        else:
            continue
        done.append(entry)
    return done
