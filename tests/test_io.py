"""Atomic writes: the target is the old version or the new one, never half of one, and no temp is left."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from lora_core.atomic import atomic_write, atomic_write_dir, atomic_write_text


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


@pytest.fixture(params=[0o022, 0o077], ids=["umask022", "umask077"])
def umask(request: pytest.FixtureRequest):
    previous = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(previous)


def test_files_and_folders_honour_the_umask(tmp_path: Path, umask: int) -> None:
    f = atomic_write_text(tmp_path / "f.txt", "x")
    g = atomic_write(tmp_path / "g.bin", lambda tmp: tmp.write_bytes(b"y"))
    d = atomic_write_dir(tmp_path / "d", lambda tmp: (tmp / "a.txt").write_text("z"))
    assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE(g.stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE(d.stat().st_mode) == 0o777 & ~umask
    assert stat.S_IMODE((d / "a.txt").stat().st_mode) == 0o666 & ~umask
    d.chmod(0o750)  # replacing a folder keeps the mode its owner gave it
    atomic_write_dir(d, lambda tmp: (tmp / "b.txt").write_text("w"))
    assert stat.S_IMODE(d.stat().st_mode) == 0o750


def test_atomic_write_dir_can_keep_the_files_it_did_not_write(tmp_path: Path) -> None:
    target = tmp_path / "adapter"
    target.mkdir()
    (target / "README.md").write_text("mine")
    (target / "weights").write_text("old")
    (target / "sub").mkdir()
    (target / "sub" / "w").write_text("nested")
    (target / "link").symlink_to("README.md")
    atomic_write_dir(target, lambda tmp: (tmp / "weights").write_text("new"), keep_other_files=True)
    assert sorted(p.name for p in target.iterdir()) == ["README.md", "link", "sub", "weights"]
    assert (target / "weights").read_text() == "new" and (target / "README.md").read_text() == "mine"
    assert (target / "sub" / "w").read_text() == "nested" and os.readlink(target / "link") == "README.md"
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]
    with pytest.raises(Boom):  # a failure keeps them too, and everything else
        atomic_write_dir(target, fill_half_way, keep_other_files=True)
    assert sorted(p.name for p in target.iterdir()) == ["README.md", "link", "sub", "weights"]
    assert (target / "weights").read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_atomic_write_dir_through_a_symlink_replaces_the_folder_it_points_to(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "alias").symlink_to(real)
    atomic_write_dir(tmp_path / "alias", lambda tmp: (tmp / "a.txt").write_text("new"))
    assert (tmp_path / "alias").is_symlink() and (real / "a.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alias", "real"]


def test_atomic_write_dir_refuses_a_file_and_puts_the_old_folder_back_when_the_swap_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "file").write_text("keep")
    with pytest.raises(NotADirectoryError, match="not a directory"):
        atomic_write_dir(tmp_path / "file", lambda tmp: None)
    assert (tmp_path / "file").read_text() == "keep"
    target = atomic_write_dir(tmp_path / "d", lambda tmp: (tmp / "a.txt").write_text("old"))
    real_replace = os.replace

    def replace(src, dst):  # the second rename (new folder into place) fails, e.g. EXDEV, EIO
        if Path(src).name.endswith(".tmp") and Path(dst) == target:
            raise OSError(errno.EIO, "simulated")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="simulated"):
        atomic_write_dir(target, lambda tmp: (tmp / "a.txt").write_text("new"))
    assert (target / "a.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "file"]


# ---- the other writers of lora_core go through here: a failure leaves the old output or none --------------
def _half_then_disk_full(tensors, filename, *args, **kwargs):
    Path(filename).write_bytes(b"half a safetensors file")
    raise OSError(errno.ENOSPC, "No space left on device")


def test_save_quantized_on_a_full_disk_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import torch
    from torch import nn

    import lora_core as lc
    from lora_core.quant import checkpoint

    model = lc.apply_lora(nn.Sequential(nn.Linear(64, 64)), lc.LoraConfig(r=2, target_modules=["0"]))
    path = tmp_path / "model.safetensors"
    checkpoint.save_quantized(model, path)
    before = path.read_bytes()
    monkeypatch.setattr(checkpoint, "save_file", _half_then_disk_full)
    with torch.no_grad():
        model[0].lora_B.weight.fill_(1.0)
    with pytest.raises(OSError, match="No space"):
        checkpoint.save_quantized(model, path)
    with pytest.raises(OSError, match="No space"):
        checkpoint.save_quantized(model, tmp_path / "fresh.safetensors")
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


def test_a_failing_merge_leaves_nothing_at_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import safetensors.torch

    import lora_core as lc
    from lora_core import cli

    model = lc.apply_lora(lc.TinyCausalLM(seed=0), lc.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    lc.save_adapter(model, tmp_path / "adapter")
    # The tiny model's save_pretrained writes config.json, then the weights: the disk fills up on the second.
    monkeypatch.setattr(safetensors.torch, "save_file", _half_then_disk_full)
    argv = ["merge", str(tmp_path / "adapter"), "--out", str(tmp_path / "merged"), "--model", "tiny"]
    args = cli.build_parser().parse_args(argv)
    with pytest.raises(OSError, match="No space"):
        cli.merge(args)
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_tiny_save_pretrained_writes_each_file_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import safetensors.torch

    import lora_core as lc
    from lora_core.models.tiny import load_tiny

    model = lc.TinyCausalLM(seed=0)
    model.save_pretrained(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    monkeypatch.setattr(safetensors.torch, "save_file", _half_then_disk_full)
    with pytest.raises(OSError, match="No space"):
        lc.TinyCausalLM(seed=1).save_pretrained(tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    monkeypatch.undo()
    load_tiny(tmp_path)
