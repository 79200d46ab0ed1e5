"""Atomic writes: the target is the old version or the new one, never half of one, and no temp is left."""

from __future__ import annotations

from pathlib import Path

import pytest

from lora_core._io import atomic_write, atomic_write_dir, atomic_write_text


class Boom(RuntimeError):
    pass


def fail_half_way(tmp: Path) -> None:
    tmp.write_text("half")
    raise Boom


def fill_half_way(tmp: Path) -> None:
    (tmp / "partial.txt").write_text("half")
    raise Boom


def test_atomic_write_replaces_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "f.json"
    atomic_write_text(target, "one")
    atomic_write(target, lambda tmp: tmp.write_bytes(b"two"))
    assert target.read_text() == "two"
    assert [p.name for p in target.parent.iterdir()] == ["f.json"]


def test_atomic_write_failure_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "f.txt"
    atomic_write_text(target, "old")
    with pytest.raises(Boom):
        atomic_write(target, fail_half_way)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_atomic_write_dir_replaces_only_after_success(tmp_path: Path) -> None:
    target = tmp_path / "adapter"
    atomic_write_dir(target, lambda tmp: (tmp / "a.txt").write_text("old"))
    with pytest.raises(Boom):
        atomic_write_dir(target, fill_half_way)
    assert [p.name for p in target.iterdir()] == ["a.txt"] and (target / "a.txt").read_text() == "old"
    atomic_write_dir(target, lambda tmp: (tmp / "b.txt").write_text("new"))
    assert [p.name for p in target.iterdir()] == ["b.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]
