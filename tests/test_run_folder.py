"""A run's folder: the lock refuses a second holder, and only the temporaries that killed writers of
``lora_core.atomic`` really leave are removed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lora_core.atomic import remove_stale_temporaries
from lora_core.cli.run_folder import LOCK_NAME, FolderBusy, hold_folder_lock

KILLED_WRITERS = """
import os, sys
from lora_core.atomic import atomic_write, atomic_write_dir
folder = sys.argv[1]
if sys.argv[2] == "file":
    atomic_write(folder + "/checkpoint.pt", lambda tmp: (tmp.write_bytes(b"half"), os._exit(9)))
else:
    atomic_write_dir(folder + "/adapter", lambda tmp: ((tmp / "w").write_text("half"), os._exit(9)))
"""


def test_temporaries_of_killed_writers_are_removed_and_nothing_else(tmp_path: Path) -> None:
    for kind in ("file", "dir"):  # real writers killed half-way: the names are _io's, not guessed
        proc = subprocess.run([sys.executable, "-c", KILLED_WRITERS, str(tmp_path), kind], cwd=tmp_path)
        assert proc.returncode == 9
    stale = sorted(p.name for p in tmp_path.iterdir())
    assert len(stale) == 2 and all(n.startswith((".checkpoint.pt.", ".adapter.")) for n in stale), stale
    keep = [".checkpoint.pt.mine.tmp", "checkpoint.pt.0a1b2c3d.tmp", ".notes.0a1b2c3d.tmp", ".adapter.old-x",
            ".checkpoint.pt.0a1b2c3d.tmp.bak", ".checkpoint.pt.abcdefgh.tmp", LOCK_NAME]  # fmt: skip
    for name in keep:
        (tmp_path / name).write_text("user")
    (tmp_path / ".metrics.json.0a1b2c3d.tmp").mkdir()  # the right name, but a folder: not ours
    keep.append(".metrics.json.0a1b2c3d.tmp")
    removed = remove_stale_temporaries(
        tmp_path, files=("checkpoint.pt", "metrics.json"), folders=("adapter",)
    )
    assert sorted(p.name for p in removed) == stale
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep)


def test_an_old_adapter_left_by_a_crash_mid_swap_is_put_back(tmp_path: Path) -> None:
    (tmp_path / ".adapter.0123abcd.old").mkdir()
    (tmp_path / ".adapter.0123abcd.old" / "adapter_config.json").write_text("{}")
    remove_stale_temporaries(tmp_path, folders=("adapter",))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    assert (tmp_path / "adapter" / "adapter_config.json").read_text() == "{}"
    (tmp_path / ".adapter.89abcdef.old").mkdir()  # with adapter/ present, the old copy is dropped
    remove_stale_temporaries(tmp_path, folders=("adapter",))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_the_folder_lock_has_one_holder_at_a_time(tmp_path: Path) -> None:
    held = hold_folder_lock(tmp_path / "run")
    code = "import sys; from lora_core.cli.run_folder import hold_folder_lock; hold_folder_lock(sys.argv[1])"
    other = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "run")], cwd=tmp_path, capture_output=True, text=True
    )
    assert other.returncode != 0 and "FolderBusy" in other.stderr
    with pytest.raises(FolderBusy, match="in use by another process"):
        hold_folder_lock(tmp_path / "run")  # a second open file description: refused too
    held.close()
    hold_folder_lock(tmp_path / "run").close()
