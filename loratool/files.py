"""Output files: atomic writes, no silent overwrites, one writer per output, content hashes for metadata.

Every write goes through `atomic_path`: a temporary sibling named `.<name>.tmp-<pid>` is written, synced and
renamed over the output, so readers never see half a file. A run killed mid-write leaves that sibling
behind; the next write to the same folder removes it (only names of that pattern, only of dead processes).
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

from loratool.errors import InputError, LoratoolError, OutputExistsError

TEMP = re.compile(r"\.(?P<name>.+)\.tmp-(?P<pid>\d+)")


def check_writable(path: Path, force: bool, file: bool = False) -> None:
    """Fail before any work is done if `path` exists (without --force), is a folder where a `file` goes, or
    its folder cannot be created or written."""
    path = Path(path)
    if path.is_dir() and file:
        raise InputError(f"{path} is a folder: give -o a file name, e.g. {path / 'out.safetensors'}.")
    if path.exists() and not force:
        raise OutputExistsError(f"{path} already exists; pass --force to overwrite it.")
    folder = path.parent if str(path.parent) else Path(".")
    while not folder.exists() and folder != folder.parent:  # the first folder that exists is where we create
        folder = folder.parent
    if not folder.is_dir():
        raise InputError(f"{folder} is not a folder: choose another output path with -o.")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(f"cannot write to {folder} (permission denied): choose another output path with -o.")


@contextlib.contextmanager
def atomic_path(path: Path, force: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling of `path`; it replaces `path` only if the block succeeds.

    Works for files and for folders (a diffusers model): readers never see a half-written output. A write
    that fails (a full disk) is one line; the temporary sibling is removed either way.
    """
    path = Path(path)
    check_writable(path, force)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep(path.parent, f".{glob.escape(path.name)}.tmp-*")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    _remove(tmp)
    try:
        yield tmp
        _sync(tmp)
        if path.is_dir() and tmp.is_dir():
            _remove(path)  # os.replace cannot replace a non-empty folder
        os.replace(tmp, path)
        _fsync(path.parent)
    except OSError as exc:
        raise LoratoolError(
            f"cannot write {path}: {exc.strerror or exc}; free some space or choose another -o."
        ) from None
    finally:
        _remove(tmp)


def sweep(folder: Path, pattern: str) -> None:
    """Remove what killed runs left: our temporary names (`pattern`) whose process is gone."""
    for stale in Path(folder).glob(pattern):
        found = TEMP.fullmatch(stale.name)
        if found and not _alive(int(found["pid"])):
            _remove(stale)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own leftover: this process is not writing it now
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # someone else's process: alive
    return True


def _sync(tmp: Path) -> None:
    """Readable outputs (0666 less the umask: temporary files are often 0600) on disk before the rename."""
    mask = os.umask(0)
    os.umask(mask)
    for file in [tmp] if tmp.is_file() else [p for p in tmp.rglob("*") if p.is_file()]:
        os.chmod(file, 0o666 & ~mask)
        _fsync(file)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot sync a folder
    finally:
        os.close(fd)


@contextlib.contextmanager
def output_lock(path: Path) -> Iterator[None]:
    """Hold `.<name>.lock` beside `path` for the whole run: a second run to the same output refuses at once
    instead of racing the first (the last writer won, and each deleted the other's checkpoints)."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; runs are not protected from each other
        yield
        return
    path = Path(path)
    lock = path.with_name(f".{path.name}.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise InputError(
                f"{path} is being written by another loratool run (pid {holder}); wait for it or choose another -o."
            ) from None
        if lock.exists() and os.stat(lock).st_ino == os.fstat(fd).st_ino:
            break
        os.close(fd)  # the holder removed the file as we opened it: lock the new one
    try:
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield
    finally:
        lock.unlink(missing_ok=True)
        os.close(fd)


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
