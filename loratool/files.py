"""Output files: atomic writes, no silent overwrites, content hashes for metadata."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from loratool.errors import InputError, OutputExistsError


def check_writable(path: Path, force: bool) -> None:
    """Fail before any work is done if `path` exists (without --force) or its folder cannot be written."""
    path = Path(path)
    if path.exists() and not force:
        raise OutputExistsError(f"{path} already exists; pass --force to overwrite it.")
    parent = path.parent if str(path.parent) else Path(".")
    if parent.exists() and not os.access(parent, os.W_OK):
        raise InputError(f"cannot write to {parent}: choose another output path with -o.")
    if parent.exists() and not parent.is_dir():
        raise InputError(f"{parent} is not a folder: choose another output path with -o.")


@contextlib.contextmanager
def atomic_path(path: Path, force: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling of `path`; it replaces `path` only if the block succeeds.

    Works for files and for folders (a diffusers model): readers never see a half-written output.
    """
    path = Path(path)
    check_writable(path, force)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    _remove(tmp)
    try:
        yield tmp
        if path.is_dir() and tmp.is_dir():
            _remove(path)  # os.replace cannot replace a non-empty folder
        os.replace(tmp, path)
    finally:
        _remove(tmp)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
