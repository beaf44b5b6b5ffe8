"""Restore targets: checking them before anything is written, and writing them.

A VM disk is restored into a raw file, a qcow2 file or a block device.  A
file is written under a temporary name beside it, synced and renamed into
place only when complete (`atomicfile`), so that a failure (ENOSPC) or an
interruption leaves the old target as it was and no partial file; a block
device is written in place, held open exclusively (O_EXCL) meanwhile so that
nothing mounts or opens it under the restore.  The checks refuse up front
what would fail half-way or lose data: targets inside the backup store,
targets in use, existing targets without `force`, devices too small.  A
container is restored into a directory (`check_directory`; `treeswap` builds
the tree beside it and swaps it in).

The host (`dirbackup.host`) decides what is copied from where; this module
only knows targets.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from dirbackup import atomicfile, copy, qcow2, qemu
from dirbackup.errors import HostError

FORMATS = ("raw", "qcow2")
_TAG = "restore"  # temporary files are named .<target>.restore-<pid>


def is_block_device(path: Path) -> bool:
    try:
        return stat.S_ISBLK(path.stat().st_mode)
    except FileNotFoundError:
        return False


def raw_size(path: Path) -> int:
    """Bytes in a file or block device, read as raw."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return copy.fd_size(fd)
    finally:
        os.close(fd)


def check(
    targets: Mapping[str, tuple[Path, int]],
    target_format: str,
    force: bool,
    store_root: Path | None = None,
) -> None:
    """Refuse, before anything is written, restore targets (device -> (path,
    disk size)) that would fail half-way or lose data: one target for two
    disks, a target inside the backup store, a target in use (even with
    `force`), an existing target without `force`, a directory, a missing
    parent directory, a block device smaller than its disk or given a qcow2."""
    if target_format not in FORMATS:
        raise HostError(f"unknown target format {target_format!r} (raw or qcow2)")
    seen: dict[str, str] = {}
    for device, (target, size) in targets.items():
        key = os.path.realpath(target)
        if key in seen:
            raise HostError(f"{seen[key]} and {device} are both to be restored into {target}")
        seen[key] = device
        if store_root is not None and _inside(Path(key), store_root):
            raise HostError(f"restore target {target} lies inside the backup store; refused")
        if target.is_dir():
            raise HostError(f"restore target {target} is a directory (give a file or device)")
        if not target.exists():
            if not target.parent.is_dir():
                raise HostError(f"restore target {target}: {target.parent} is not a directory")
            continue
        _check_not_in_use(target)
        if not force:
            raise HostError(f"restore target {target} exists; use --force to overwrite it")
        if is_block_device(target):
            if target_format != "raw":
                raise HostError(f"{target} is a block device: only raw restores go there")
            if raw_size(target) < size:
                raise HostError(f"block device {target} is smaller than the disk ({size} bytes)")


def check_directory(target: Path, force: bool) -> None:
    """Refuse a container's restore target that is not a directory, or one
    that is not empty without `force`."""
    if target.exists() and not target.is_dir():
        raise HostError(f"restore target {target} is not a directory")
    if target.exists() and any(target.iterdir()) and not force:
        raise HostError(f"restore target {target} is not empty; use --force")


def write(
    target: Path,
    size: int,
    target_format: str,
    run: Callable[[Any], copy.CopyStats],
    cluster_size: int = copy.DEFAULT_CLUSTER_SIZE,
) -> copy.CopyStats:
    """Write a disk of `size` bytes into `target` through `run`, which copies
    into the copy target it is given (a qcow2.Writer or a copy.FileTarget)
    and returns the copy's statistics.  A qcow2 target gets `cluster_size`
    (no larger than the smallest cluster of the chain it is copied from)."""
    if target_format == "qcow2":
        # the writer removes its file unless finished
        with (
            atomicfile.replacing(target, _TAG) as tmp,
            qcow2.Writer(tmp, size, cluster_size) as writer,
        ):
            stats = run(writer)
            writer.finish()
        return stats
    if is_block_device(target):
        fd = _open_exclusive(target)
        try:
            return run(copy.FileTarget(fd, str(target), fresh=False))
        finally:
            os.fsync(fd)
            os.close(fd)

    def fill(fd: int) -> copy.CopyStats:
        os.ftruncate(fd, size)
        stats = run(copy.FileTarget(fd, str(target)))
        os.ftruncate(fd, size)  # the image's zero tail up to a whole sector goes
        return stats

    return atomicfile.replace_with(target, fill, tag=_TAG)


def qemu_img_convert(source: str, target: Path, size: int, target_format: str) -> None:
    """`qemu-img convert` of the raw `source` into the target, the same way
    as `write`: a block device in place (held exclusively meanwhile), a file
    under a temporary name renamed into place when complete."""
    cmd = ["qemu-img", "convert", "-f", "raw", "-O", target_format]
    if is_block_device(target):
        fd = _open_exclusive(target)
        try:
            qemu.run([*cmd, "-n", source, str(target)], timeout=None)
        finally:
            os.close(fd)
        return
    with atomicfile.replacing(target, _TAG) as tmp:
        qemu.run([*cmd, source, str(tmp)], timeout=None)
        fd = os.open(tmp, os.O_RDWR | os.O_CLOEXEC)
        try:
            if target_format == "raw":
                os.ftruncate(fd, size)  # the export's zero tail up to a whole sector goes
            os.fsync(fd)
        finally:
            os.close(fd)


def _inside(path: Path, root: Path) -> bool:
    """Whether `path` (a real path) is `root` or lies below it; compared by
    device and inode too, so that a bind mount of the store counts."""
    try:
        want = os.stat(root)
    except OSError:
        return False
    real_root = os.path.realpath(root)
    if path == Path(real_root) or Path(real_root) in path.parents:
        return True
    for d in (path, *path.parents):
        with contextlib.suppress(OSError):
            if os.path.samestat(os.stat(d), want):
                return True
    return False


def _check_not_in_use(target: Path) -> None:
    """A target another process uses is never written, not even with --force:
    a block device that is mounted or opened exclusively (O_EXCL: LVM, md, a
    file system, a running restore), or an image that QEMU (a VM, qemu-nbd,
    qemu-img) holds its lock on."""
    if is_block_device(target):
        os.close(_open_exclusive(target, os.O_RDONLY))
    if qemu.image_locked(target):
        raise HostError(
            f"restore target {target} is in use by QEMU (a VM, qemu-nbd or qemu-img holds "
            "its image lock); refused"
        )


def _open_exclusive(target: Path, mode: int = os.O_WRONLY) -> int:
    """Open a block device exclusively: the kernel then refuses it to mounts
    and to other exclusive openers for as long as it is open."""
    try:
        return os.open(target, mode | os.O_EXCL | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            raise HostError(
                f"restore target {target} is in use (mounted, or held open exclusively by "
                "another process); refused"
            ) from None
        raise
