"""Replacing a file all at once: written beside it under a temporary name,
synced, renamed over it, the directory synced.

A reader, or the file system after a crash, sees the old file or the new one,
never half of one; a write that fails (ENOSPC, Ctrl-C) leaves the old file as
it was and removes its temporary file.  The store's small files (manifests,
attributes, logs) and the restore targets (`restore_target`) are written this
way.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def temporary_name(path: Path, tag: str) -> Path:
    """Where `path` is written before it is renamed into place: a hidden
    name beside it, naming the writing process (`tag`: what writes it)."""
    return path.with_name(f".{path.name}.{tag}-{os.getpid()}")


def fsync_path(path: Path) -> None:
    """fsync a file or directory by path."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def replacing(path: Path, tag: str = "tmp") -> Iterator[Path]:
    """Yields the temporary path to write `path`'s new content to (a leftover
    of a crashed earlier writer removed first); the writer syncs what it
    wrote.  When the block ends normally the temporary file is renamed over
    `path` and the directory synced; when it raises, the file is removed."""
    tmp = temporary_name(path, tag)
    tmp.unlink(missing_ok=True)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def replace_with(
    path: Path, write: Callable[[int], T], *, mode: int = 0o644, tag: str = "tmp"
) -> T:
    """Replace `path` by what `write(fd)` writes into a new file (opened for
    reading and writing); returns what `write` returned."""
    with replacing(path, tag) as tmp:
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
        try:
            result = write(fd)
            os.fsync(fd)
        finally:
            os.close(fd)
    return result


def write_atomic(path: Path, data: str | bytes, mode: int = 0o644) -> None:
    """Replace a file's content all at once (temp file, fsync, rename, fsync dir).

    Errors name the file (ENOSPC from write() alone would not)."""
    raw = data.encode() if isinstance(data, str) else data

    def write(fd: int) -> None:
        view = memoryview(raw)
        while view:
            view = view[os.write(fd, view) :]

    try:
        replace_with(path, write, mode=mode)
    except OSError as exc:
        if exc.filename is not None or exc.errno is None:
            raise
        raise OSError(exc.errno, f"writing {path}: {exc.strerror}", str(path)) from None
