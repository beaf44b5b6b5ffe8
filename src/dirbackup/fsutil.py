"""File-system helpers the store is built on (besides atomicfile's whole-file
replacement): the atomic exchange of two directories (renameat2),
hard-linking a directory's files into another, reading a regular file
without following symlinks, and sizes and digests of files.

They know nothing of the store's layout: store.py decides which names they
are used on.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Any

from dirbackup.atomicfile import fsync_path
from dirbackup.errors import StoreError

_libc = ctypes.CDLL(None, use_errno=True)
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def exchange(a: Path, b: Path) -> bool:
    """Swap two directories atomically (renameat2 with RENAME_EXCHANGE).
    False where the C library, kernel or file system cannot."""
    renameat2 = getattr(_libc, "renameat2", None)
    if renameat2 is None:
        return False
    rc = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, f"exchanging {a} and {b}: {os.strerror(err)}", str(b))


def link_rest(source: Path, staging: Path) -> bool:
    """Hard-link the files of `source` that `staging` does not have yet into it;
    False where the file system has no hard links."""
    for p in source.iterdir():
        if (staging / p.name).exists() or p.name.startswith("."):
            continue
        try:
            os.link(p, staging / p.name, follow_symlinks=False)
        except OSError as exc:
            if exc.errno in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                return False
            raise
    fsync_path(staging)
    return True


def read_regular(path: Path) -> bytes:
    """The content of a regular file of the store; a symlink or anything else
    is refused (StoreError), FileNotFoundError passes."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise StoreError(f"{path} is a symbolic link; refused") from None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise StoreError(f"{path} is not a regular file; refused")
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def dir_usage(path: Path) -> tuple[int, int]:
    """(apparent size, allocated bytes) of the files in a directory."""
    size = used = 0
    for p in path.iterdir():
        try:
            st = p.lstat()
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                continue
            raise
        if p.is_file():
            size += st.st_size
            used += st.st_blocks * 512
    return size, used


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's content."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def read_json(path: Path) -> dict[str, Any]:
    """A small JSON object file, or {} when missing or unreadable."""
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
