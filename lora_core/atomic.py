"""Atomic writes: a reader (or a run killed half-way) sees the old file or the new one, never half of one.

Every file lora_core writes (adapters, checkpoints, metrics, plots, benchmark results) goes through here:
write a temporary sibling, fsync it, rename it over the target, fsync the folder so the rename survives a
crash too. A folder (an adapter, a merged model) is written whole into a temporary sibling folder and then
swapped in, so a failure at any point leaves the previous folder as it was, byte for byte.

Temporaries are created with mode 0o666 (files) / 0o777 (folders) and the kernel applies the umask, so what
lands at the target has the permissions any other tool would give it (not ``mkstemp``'s private 0o600).
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

_RANDOM = "[0-9a-f]{8}"  # the random part of a temporary's name: secrets.token_hex(4), see `_sibling`


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sibling(path: Path, create: Callable[[Path], object], tag: str = "tmp") -> Path:
    """A new hidden name next to ``path`` (``.<name>.<random>.<tag>``), created by ``create`` (which must
    fail with ``FileExistsError`` when the name is taken, as ``O_EXCL`` and ``mkdir`` do)."""
    for _ in range(100):
        candidate = path.with_name(f".{path.name}.{secrets.token_hex(4)}.{tag}")
        try:
            create(candidate)
        except FileExistsError:
            continue
        return candidate
    raise FileExistsError(f"no free temporary name next to {path}")


def _new_file(path: Path) -> None:
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # the umask applies


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], object]) -> Path:
    """Write a file by calling ``write(tmp)`` on a temporary path next to ``path``, then rename it into place.

    ``write`` receives the temporary path (pass it to ``save_file``, ``torch.save``, ``savefig``, ...). On
    any error the temporary file is removed and ``path`` is left as it was. The file gets ``0o666 & ~umask``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path, _new_file)
    try:
        write(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """``atomic_write`` for a UTF-8 text file."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)  # same folder, same file system: no second copy of a large file
    except OSError:
        shutil.copy2(src, dst)


def _move(src: Path, dst: Path) -> None:
    if dst.exists() or dst.is_symlink():  # a folder renamed onto an empty folder would replace it
        raise FileExistsError(dst)
    os.replace(src, dst)


def _fsync_tree(folder: Path) -> None:
    for root, _, files in os.walk(folder):
        for name in files:
            if not os.path.islink(os.path.join(root, name)):
                _fsync(Path(root, name))
        _fsync(Path(root))


def atomic_write_dir(
    path: str | os.PathLike[str], fill: Callable[[Path], object], *, keep_other_files: bool = False
) -> Path:
    """Write a folder by calling ``fill(tmp)`` on an empty temporary sibling folder, then move it into place.

    An existing folder at ``path`` is replaced only after ``fill`` succeeded. With ``keep_other_files``, the
    entries of the existing folder that ``fill`` did not write (a README, another adapter's subfolder) are
    carried into the new folder first (hard links, or copies where linking fails). A symlink at ``path`` is
    followed: the folder it points to is the one replaced. The swap itself is two renames; a crash between
    them leaves the old folder under a hidden name (``.<name>.<random>.old``), never a half-written one at
    ``path``; any other failure puts the old folder back. A new folder gets ``0o777 & ~umask``, a replaced one
    keeps its mode.

    Raises:
        NotADirectoryError: ``path`` exists and is not a folder (nothing is written).
    """
    path = Path(path)
    if path.is_symlink():
        path = path.resolve()
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{path} exists and is not a directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path, lambda p: p.mkdir(0o777))  # the umask applies
    old: Path | None = None
    try:
        fill(tmp)
        if keep_other_files and path.is_dir():
            for entry in path.iterdir():
                dst = tmp / entry.name
                if dst.exists() or dst.is_symlink():
                    continue  # fill wrote a new one
                if entry.is_symlink():
                    os.symlink(os.readlink(entry), dst)
                elif entry.is_dir():
                    shutil.copytree(entry, dst, symlinks=True, copy_function=_link_or_copy)
                else:
                    _link_or_copy(str(entry), str(dst))
        _fsync_tree(tmp)
        if path.exists():
            shutil.copymode(path, tmp)  # a folder the user chmod-ed keeps its mode
            old = _sibling(path, lambda aside: _move(path, aside), "old")
        try:
            os.replace(tmp, path)
        except BaseException:
            if old is not None:
                os.replace(old, path)  # put the previous folder back
                old = None
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    _fsync(path.parent)
    return path


def remove_stale_temporaries(
    folder: str | os.PathLike[str], files: Iterable[str] = (), folders: Iterable[str] = ()
) -> list[Path]:
    """Remove what killed writers left in ``folder``: `atomic_write`'s ``.NAME.XXXXXXXX.tmp`` files for the
    given file ``NAME``s, `atomic_write_dir`'s ``.NAME.XXXXXXXX.tmp`` and ``.NAME.XXXXXXXX.old`` folders for
    the given folder ``NAME``s (``XXXXXXXX``: `_sibling`'s 8 random hex digits). An ``.old`` folder is moved
    back to ``NAME`` when ``NAME`` is gone: a crash between the two renames of the swap left it as the only
    copy. Only entries whose name matches
    exactly and whose kind (file / folder, not a link) is the one these functions write are touched.

    Only call it while no other process writes into ``folder`` (hold ``hold_folder_lock``). Returns the paths
    removed or restored.
    """
    folder = Path(folder)
    file_re = re.compile(rf"\.({'|'.join(map(re.escape, files)) or '(?!)'})\.{_RANDOM}\.tmp")
    dir_re = re.compile(rf"\.({'|'.join(map(re.escape, folders)) or '(?!)'})\.{_RANDOM}\.(?:tmp|old)")
    done = []
    for entry in sorted(folder.iterdir()) if folder.is_dir() else []:
        if entry.is_symlink():
            continue
        if file_re.fullmatch(entry.name) and entry.is_file():
            entry.unlink()
        elif (match := dir_re.fullmatch(entry.name)) and entry.is_dir():
            target = folder / match.group(1)
            if entry.name.endswith(".old") and not target.exists() and not target.is_symlink():
                os.replace(entry, target)  # the old folder is the only copy left: put it back
            else:
                shutil.rmtree(entry)
        else:
            continue
        done.append(entry)
    return done
