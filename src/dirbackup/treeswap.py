"""Replace a directory tree as a whole.

A container restore into a directory must leave exactly the backed-up tree
(no stray files from before, with --force), and a restore that fails or is
interrupted must leave the old tree as it was.  So the new tree is built
beside the old one, on the same file system, and only a complete tree takes
the old one's place: with one rename(RENAME_EXCHANGE) (two renames where the
file system cannot exchange), after which the old tree is removed.

A target that is itself a mount point (a container volume) cannot be renamed.
The new tree is then built inside it, in a hidden directory; once complete,
the old entries are removed (the file system's own lost+found stays), the new
ones moved up, and the new root's owner, mode, extended attributes (ACLs
included) and times given to the target.

Nothing below the target may be a mount point: removing the old tree would
reach into it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import stat
from collections.abc import Callable
from pathlib import Path

from dirbackup.errors import DirbackupError
from dirbackup.mount import is_mount_point, mounts_below

_libc = ctypes.CDLL(None, use_errno=True)
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
LOST_FOUND = "lost+found"


class TreeSwapError(DirbackupError):
    """The target directory cannot be replaced safely."""


def replace_tree(target: Path, build: Callable[[Path], None]) -> None:
    """Make `target` hold exactly the tree `build(directory)` writes into an
    empty directory.  `target` may be missing (its parents are created),
    empty or not.  If `build` fails, the old tree stays as it was."""
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise TreeSwapError(f"restore target {target} is not a directory")
    real = os.path.realpath(target)
    if target.exists():
        nested = [m for m in mounts_below(real) if m != real]
        if nested:
            raise TreeSwapError(
                f"restore target {target} has a file system mounted at {nested[-1]}; "
                "unmount it first"
            )
    if target.exists() and is_mount_point(real):
        _replace_inside(target, build)
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.restore-{os.getpid()}")
    _remove(staging)  # left by a killed restore of ours
    staging.mkdir(mode=0o700)
    try:
        build(staging)
    except BaseException:
        _remove(staging)
        raise
    if not target.exists():
        os.rename(staging, target)
        return
    old = staging  # after the exchange, the old tree is at the staging name
    if not _exchange(staging, target):
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.rename(target, old)
        os.rename(staging, target)
    _remove(old)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically; False where the file system cannot."""
    rc = _libc.renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, f"exchanging {a} and {b}: {os.strerror(err)}")


def _replace_inside(target: Path, build: Callable[[Path], None]) -> None:
    staging = target / f".dirbackup-restore-{os.getpid()}"
    _remove(staging)
    before = os.lstat(target)
    staging.mkdir(mode=0o700)
    try:
        build(staging)
        if (staging / staging.name).exists():
            raise TreeSwapError(f"the restored tree holds {staging.name}; refused")
    except BaseException:
        _remove(staging)
        os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))  # as it was
        raise
    root = os.lstat(staging)  # before moving the entries out changes its times
    xattrs = {n: os.getxattr(staging, n) for n in _xattr_names(staging)}
    for entry in os.scandir(target):
        if entry.name not in (staging.name, LOST_FOUND):
            _remove(Path(entry.path))
    for entry in os.scandir(staging):
        if entry.name == LOST_FOUND and (target / LOST_FOUND).exists():
            _remove(target / LOST_FOUND)
        os.rename(entry.path, target / entry.name)
    staging.rmdir()
    os.chown(target, root.st_uid, root.st_gid)
    for name in _xattr_names(target):
        if name not in xattrs:
            os.removexattr(target, name)
    for name, value in xattrs.items():
        os.setxattr(target, name, value)
    os.chmod(target, stat.S_IMODE(root.st_mode))
    os.utime(target, ns=(root.st_atime_ns, root.st_mtime_ns))


def _xattr_names(path: Path) -> list[str]:
    try:
        return os.listxattr(path)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return []
        raise


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
