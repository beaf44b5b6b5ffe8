"""File-level restore: `dirbackup mount` and `dirbackup umount`.

A VM disk's file system is mounted read-only through a read-only view of
its validated chain: RestoringProvider.serve_checked (the chain checked
against its digests first, as for a qemu-img restore) on a socket of a run
directory, nbdfuse exposing that export as a file, and the file system
mounted from that file through a read-only loop device (`mount -o loop`,
with `offset`/`sizelimit` for a partition of an MBR or GPT disk, found by
partx), journal replay off (ext2/3/4 `noload`, xfs `norecovery`), `nodev`
and `nosuid`.  The loop device is set to clear itself: it goes with the
mount.  A container backup's squashfs image is mounted read-only; a tar
archive is refused (restore it).

The helpers (qemu-nbd, nbdfuse) outlive the command: they run detached,
recorded in the run directory's state file, and `umount` finds them by the
mount point.  qemu-nbd is not persistent: it exits when nbdfuse, its only
client, does.  The run directory is owned by the `mount` process until the
file system is mounted, then by nbdfuse: a `mount` killed half-way (or an
nbdfuse killed later) leaves a run directory whose owner is dead, which the
next command's run-directory cleanup takes down (issue 12): the file system
mounted from its file, then its FUSE mount, after which both helpers exit.
A helper started but not yet recorded when the signal came is found by its
command line, which names the run directory (its socket, its mount point).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from dirbackup import qemu
from dirbackup.api import LogFunction, VmType
from dirbackup.errors import DirbackupError
from dirbackup.mount import (
    SquashfsMount,
    is_mount_point,
    loop_devices_over,
    loop_mounts_over,
    mounts_below,
)
from dirbackup.procs import owner_line
from dirbackup.storage import DirectoryStorage
from dirbackup.store import BackupId
from dirbackup.toolrun import capture, resolve_log, run_tool

PREFIX = "dirbackup-mount-"
STATE = "state.json"
SECTOR = 512

#: Mount options per file system type: read-only, and no journal replay.
_NO_REPLAY = {"ext2": "noload", "ext3": "noload", "ext4": "noload", "xfs": "norecovery"}


def _write_state(rundir: Path, state: dict[str, Any]) -> None:
    tmp = rundir / f".{STATE}.tmp"
    tmp.write_text(json.dumps(state, indent=1))
    tmp.replace(rundir / STATE)


def _empty_dir(mountpoint: Path) -> str:
    real = os.path.realpath(mountpoint)
    if not os.path.isdir(real):
        raise DirbackupError(f"mount point {mountpoint} is not a directory")
    if is_mount_point(real):
        raise DirbackupError(f"{mountpoint} is already a mount point")
    if os.listdir(real):
        raise DirbackupError(f"mount point {mountpoint} is not empty")
    return real


def partitions(image: Path) -> dict[int, tuple[int, int]]:
    """The partitions of a disk image (MBR or GPT) as {number: (offset, size)} in bytes."""
    said = capture(
        [
            "partx",
            "--bytes",
            "--noheadings",
            "--raw",
            "-o",
            "NR,START,SECTORS",
            str(image),
        ],
        timeout=60,
    )
    found: dict[int, tuple[int, int]] = {}
    for line in (said or b"").decode(errors="replace").splitlines():
        fields = line.split()
        if len(fields) == 3 and all(f.isdigit() for f in fields):
            found[int(fields[0])] = (int(fields[1]) * SECTOR, int(fields[2]) * SECTOR)
    return found


def fs_type(image: Path, offset: int, size: int | None) -> str | None:
    """The file system blkid finds at `offset` of `image` (None: none)."""
    argv = ["blkid", "-p", "-o", "export", "-O", str(offset)]
    if size is not None:
        argv += ["-S", str(size)]
    said = capture([*argv, str(image)], timeout=60) or b""
    for line in said.decode(errors="replace").splitlines():
        if line.startswith("TYPE="):
            return line[5:]
    return None


def mount(
    storage: DirectoryStorage,
    bid: BackupId,
    device: str | None,
    mountpoint: Path,
    *,
    partition: int | None = None,
    log: LogFunction | None = None,
) -> str:
    """Mount a backup's disk (or container tree) read-only on `mountpoint`;
    returns what was mounted, for the user."""
    log = resolve_log(log)
    real = _empty_dir(mountpoint)
    volid = bid.volid(storage.storeid)
    if bid.vmtype == VmType.LXC:
        return _mount_container(storage, bid, mountpoint, real, log)
    if device is None:
        raise DirbackupError(f"{volid} is a VM backup: name the disk to mount (DEV)")
    rundir = qemu.make_rundir(PREFIX)
    state: dict[str, Any] = {"mountpoint": real, "volid": volid, "device": device}
    _write_state(rundir, state)
    try:
        provider = storage.new_backup_provider(log)
        server = provider.serve_checked(
            bid.volname,
            device,
            str(rundir / "nbd.sock"),
            shared=1,
            persistent=False,
            detached=True,
        )
        state["qemu-nbd"] = owner_line(server.pid)
        _write_state(rundir, state)
        (rundir / "fuse").mkdir()
        fuse = qemu.start_nbdfuse(rundir / "fuse", "disk", server.uri, detached=True)
        state["nbdfuse"] = owner_line(fuse.pid)
        _write_state(rundir, state)
        offset, size = 0, None
        where = f"{device} of {volid}"
        table = partitions(fuse.path)
        if partition is not None:
            if partition not in table:
                have = ", ".join(map(str, sorted(table))) or "none"
                raise DirbackupError(f"{where} has no partition {partition} (it has: {have})")
            offset, size = table[partition]
            where = f"partition {partition} of {where}"
        kind = fs_type(fuse.path, offset, size)
        if kind is None and partition is None and table:
            have = ", ".join(map(str, sorted(table)))
            raise DirbackupError(
                f"{where} is a partitioned disk: give --partition N (it has: {have})"
            )
        if kind is None:
            raise DirbackupError(f"{where} holds no file system blkid knows")
        options = ["ro", "nodev", "nosuid", "loop", f"offset={offset}"]
        options += [f"sizelimit={size}"] if size is not None else []
        options += [_NO_REPLAY[kind]] if kind in _NO_REPLAY else []
        run_tool(
            ["mount", "-t", kind, "-o", ",".join(options), str(fuse.path), real],
            name="mount",
            log=log,
        )
        state["complete"] = True
        _write_state(rundir, state)
        (rundir / f".{qemu.OWNER}.tmp").write_text(state["nbdfuse"])  # ours until now
        (rundir / f".{qemu.OWNER}.tmp").replace(rundir / qemu.OWNER)
    except BaseException:
        _teardown(rundir, state)
        raise
    return f"{where} ({kind}) mounted read-only on {mountpoint}"


def _mount_container(
    storage: DirectoryStorage, bid: BackupId, mountpoint: Path, real: str, log: LogFunction
) -> str:
    volid = bid.volid(storage.storeid)
    found = storage.store.backup(bid).archive()
    if found is None or found[0] == "tar":
        raise DirbackupError(
            f"{volid} is a tar archive, which cannot be mounted: restore it with "
            "`dirbackup restore --rootfs DIR`"
        )
    squashfs = SquashfsMount(Path(found[1]), Path(real), log=log)
    squashfs.mount()  # the kernel's loop mount, or squashfuse (a daemon of its own)
    record = _squashfs_record(real)
    record.write_text(json.dumps({"mountpoint": real, "volid": volid}))
    return f"{volid} (squashfs) mounted read-only on {mountpoint}"


def _squashfs_record(real: str) -> Path:
    """Where a container mount is recorded: a file (not a run directory, which
    would be cleaned up with no live owner) named by the mount point."""
    name = hashlib.sha256(real.encode()).hexdigest()[:16]
    return Path(qemu.run_base(), f"{PREFIX}squashfs-{name}.json")


def _find(real: str) -> Path | None:
    with os.scandir(qemu.run_base()) as entries:
        for entry in entries:
            if not entry.name.startswith(PREFIX):
                continue
            try:
                state = json.loads(Path(entry.path, STATE).read_text())
            except (OSError, ValueError):
                continue
            if isinstance(state, dict) and state.get("mountpoint") == real:
                return Path(entry.path)
    return None


def umount(mountpoint: Path, log: LogFunction | None = None) -> str:
    """Take down what `mount` set up on a mount point."""
    log = resolve_log(log)
    real = os.path.realpath(mountpoint)
    rundir = _find(real)  # also a killed mount's, whatever it had done
    if rundir is not None:
        _teardown(rundir, json.loads((rundir / STATE).read_text()))
        return f"unmounted {mountpoint}"
    record = _squashfs_record(real)
    if record.is_file():
        SquashfsMount(Path(), Path(real), log=log).unmount()  # either way it was mounted
        record.unlink()
        return f"unmounted {mountpoint}"
    raise DirbackupError(f"{mountpoint} is not mounted by dirbackup mount")


def _teardown(rundir: Path, state: dict[str, Any]) -> None:
    """Unmount the file system, then the FUSE file, stop the helpers and
    remove the run directory; DirbackupError if the file system is busy."""
    real = os.path.realpath(rundir)
    point = state.get("mountpoint")
    if point and point in loop_mounts_over(real):
        try:
            run_tool(["umount", point], name="umount", log=lambda level, message: None)
        except DirbackupError as exc:
            if not is_mount_point(point):
                raise
            raise DirbackupError(
                f"{point} is in use: close what uses it and run dirbackup umount again"
            ) from exc
    for point in loop_mounts_over(real):  # mounted by a mount(8) that was being stopped
        run_tool(["umount", "-l", point], name="umount", log=lambda level, message: None)
    quiet: LogFunction = lambda level, message: None  # noqa: E731
    fuse = os.path.join(real, "fuse")
    if is_mount_point(fuse):
        try:
            run_tool(["fusermount3", "-u", fuse], name="fusermount3", log=quiet)
        except DirbackupError:  # held by a loop device a stopped mount(8) left, say
            for loop in loop_devices_over(real):
                run_tool(["losetup", "-d", loop], name="losetup", log=quiet, ok=(0, 1))
            time.sleep(0.1)  # a detached loop device lets go of its file soon after
            if is_mount_point(fuse):
                run_tool(["fusermount3", "-u", "-z", fuse], name="fusermount3", log=quiet)
    for helper in ("nbdfuse", "qemu-nbd"):  # each exits by itself once unmounted / unused
        if state.get(helper):
            qemu.stop_owner(state[helper], wait_first=10.0)
    qemu.stop_helpers_of(real)  # started, but stopped before they were recorded
    if not mounts_below(real):
        shutil.rmtree(rundir, ignore_errors=True)
