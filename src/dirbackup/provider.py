"""DirectoryBackupProvider: backups of VMs and containers into a dirbackup store.

The seed's `DirectoryExample`, done properly:

* VM disks become qcow2 images written by our own writer (no qemu-nbd on the
  target side); an incremental image is backed by the previous backup of the
  same disk and holds exactly what the dirty bitmap says changed, with
  clusters that now read as zero stored as zero clusters.
* Only the dirty parts of a source with a bitmap are read or queried; each
  copied range is discarded on the source afterwards where the source allows
  it; the bandwidth limit is honoured; digests are summed while copying.
* A VM backup is published (renamed into place, `previous-info` updated) at
  the end of backup_vm, because the hypervisor treats its dirty bitmap as
  advanced as soon as backup_vm returns.  A container backup is published in
  backup_cleanup by the privileged process (backup_container may run in an
  unprivileged child that cannot rename in the guest directory, so it leaves
  its results on disk, never only in memory).
* A failure removes the partial backup and keeps its log as
  `<name>.failed/backup.log`.  `previous-info` is only ever written for a
  published backup; if a published backup has to be removed again because
  the hypervisor reports a later failure, `previous-info` forgets it and the
  next backup of those disks is full -- never a wrong incremental.
* Restores serve a chain only after validating it (qcow2 only, inside the
  guest's directory, no protocol names, no cycles) and hand QEMU the layers
  explicitly.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dirbackup import copy, extents, nbd, qcow2, qemu, watchdog
from dirbackup.api import (
    BackupInfo,
    BackupProvider,
    BitmapMode,
    ContainerInfo,
    IncrementalChoice,
    LogFunction,
    Mechanism,
    RestoreMechanism,
    VolumeInfo,
)
from dirbackup.errors import DirbackupError, StoreError
from dirbackup.store import (
    DEFAULT_LOCK_TIMEOUT,
    FIREWALL_CONFIG,
    GUEST_CONFIG,
    LOG_FILE,
    PENDING_ATTRIBUTES,
    SQUASHFS_ARCHIVE,
    TAR_ARCHIVE,
    BackupId,
    DiskRecord,
    FileRecord,
    Manifest,
    PreviousDevice,
    PreviousInfo,
    Store,
    VmType,
    check_device_name,
    digest_map,
    dir_usage,
    disk_file,
    read_json,
    read_regular,
    sha256_file,
    write_atomic,
)
from dirbackup.units import human
from dirbackup.watchdog import DEFAULT_IO_TIMEOUT

DEFAULT_CLUSTER = 64 * 1024
MIN_CLUSTER = 512
DIGEST_CHUNK = 16 << 20
CONTAINER_RESULT = ".container-result.json"
PROGRESS_INTERVAL = 10.0
DeviceProgress = Callable[[str, copy.CopyStats], None]


@dataclass
class _GuestBackup:
    """What the provider remembers about one guest's backup in this job."""

    bid: BackupId
    lock: contextlib.ExitStack
    published: bool = False
    returned: bool = False  # backup_vm returned: the hypervisor advances its bitmap
    disks: dict[str, DiskRecord] = field(default_factory=dict)
    files: dict[str, FileRecord] = field(default_factory=dict)
    old_previous: PreviousInfo | None = None
    old_previous_raw: bytes | None = None
    started: float = field(default_factory=time.monotonic)


@dataclass
class _VolumeRestore:
    """The processes serving one disk of a restore."""

    rundir: Path
    server: qemu.NbdServer | None = None
    fuse: qemu.FuseFile | None = None
    mountpoint: Path | None = None


class DirectoryBackupProvider(BackupProvider):
    """Back up into, and restore from, a dirbackup store (see the module doc)."""

    def __init__(
        self,
        storage_plugin: Any,
        scfg: Any,
        storeid: str,
        log: LogFunction | None = None,
        *,
        lock_timeout: float | None = None,
        copy_options: copy.CopyOptions | None = None,
        progress: DeviceProgress | None = None,
        io_timeout: float | None = None,
    ) -> None:
        """`progress(device, stats)` is called a few times a second while a disk
        is copied (for progress bars); the log gets a line every 10 s.
        `lock_timeout` (default: the storage's `lock-timeout`, 60 s) is how
        long backup_init waits for another backup or prune of the guest;
        `io_timeout` (default: the storage's `io-timeout`, 60 s) how long a
        backup waits for a source that makes no progress -- connecting,
        querying its map or copying -- before it fails (0: for ever)."""
        super().__init__(storage_plugin, scfg, storeid, log)
        self.progress = progress
        if lock_timeout is None:
            lock_timeout = float(getattr(scfg, "lock_timeout", DEFAULT_LOCK_TIMEOUT))
        if io_timeout is None:
            io_timeout = float(getattr(scfg, "io_timeout", DEFAULT_IO_TIMEOUT))
        self.io_timeout = io_timeout
        self.store = Store(scfg.path, lock_timeout)
        self.copy_options = copy_options or copy.CopyOptions()
        self._guests: dict[int, _GuestBackup] = {}
        self._finished: dict[int, tuple[BackupId, bool]] = {}
        self._restores: dict[tuple[str, str], _VolumeRestore] = {}
        self._mounts: dict[str, tuple[Any, Path]] = {}

    # ------------------------------------------------------------------ job

    def provider_name(self) -> str:
        return "dirbackup"

    def job_init(self, start_time: int) -> None:
        self.store.check()
        self.log("info", f"dirbackup: job started at {start_time}, store {self.store.root}")

    def job_cleanup(self) -> None:
        for vmid in list(self._guests):
            self.backup_cleanup(vmid, None, False, {"error": "job ended"})
        self.log("info", "dirbackup: job finished")

    # ------------------------------------------------------------------ backup: setup

    def backup_init(self, vmid: int, vmtype: str, start_time: int) -> dict[str, str]:
        vmid = int(vmid)
        kind = VmType(vmtype)
        if vmid in self._guests:
            raise StoreError(f"a backup of guest {vmid} is already running in this job")
        stack = contextlib.ExitStack()
        stack.enter_context(self.store.lock(vmid))
        try:
            for name in self.store.clean_stale(vmid):
                self.log("info", f"removed leftover {name} of an interrupted backup")
            bid = self.store.new_backup_id(vmid, kind, int(start_time))
            if bid.epoch != int(start_time):
                self.log(
                    "info", f"a backup of guest {vmid} exists for {start_time}; using {bid.epoch}"
                )
            self.store.begin(bid)
        except BaseException:
            stack.close()
            raise
        self._guests[vmid] = _GuestBackup(bid, stack)
        self._finished.pop(vmid, None)
        return {"archive-name": bid.archive}

    def _guest(self, vmid: int) -> _GuestBackup:
        try:
            return self._guests[int(vmid)]
        except KeyError:
            raise StoreError(f"backup_init was not called for guest {vmid}") from None

    def backup_get_mechanism(self, vmid: int, vmtype: str) -> str:
        if vmtype == VmType.LXC:
            return Mechanism.DIRECTORY.value
        if vmtype == VmType.QEMU:
            return str(self.storage_plugin.vm_backup_mechanism())
        raise DirbackupError(f"unsupported guest type '{vmtype}'")

    def _previous_base(self, vmid: int, device: str, size: int) -> tuple[BackupId, Path] | None:
        """The image the next incremental of `device` can build on, if any:
        the last good backup of that device, still present, of the same size."""
        prev = self.store.read_previous(vmid, VmType.QEMU)
        if device in prev.devices:
            rec = prev.devices[device]
            if rec.size != size:
                return None
            name, file = rec.backup, rec.file
        elif prev.backup and not prev.devices:
            name, file = prev.backup, disk_file(device)  # the seed's previous-info
        else:
            return None
        try:
            bid = BackupId.parse(f"{vmid}/{name}")
        except DirbackupError:
            return None
        if file != disk_file(device) or not self.store.exists(bid):
            return None  # a record naming anything else is no base
        image = self.store.backup_dir(bid) / file
        try:  # a base is a valid chain inside the guest's directory
            with qcow2.Chain(image, self.store.guest_dir(vmid)) as chain:
                if chain.virtual_size != size:
                    return None
        except (DirbackupError, OSError):
            return None
        return bid, image

    def backup_vm_query_incremental(
        self, vmid: int, volumes: Mapping[str, Mapping[str, Any]]
    ) -> dict[str, str]:
        if str(self.storage_plugin.vm_backup_mode()) != "incremental":
            return {}
        answer = {}
        for device, vol in volumes.items():
            check_device_name(device)
            base = self._previous_base(int(vmid), device, int(vol["size"]))
            answer[device] = (IncrementalChoice.USE if base else IncrementalChoice.NEW).value
        return answer

    # ------------------------------------------------------------------ backup: VM

    def backup_vm(
        self,
        vmid: int,
        guest_config: str,
        volumes: Mapping[str, VolumeInfo | Mapping[str, Any]],
        info: BackupInfo | Mapping[str, Any] | None,
    ) -> None:
        g = self._guest(vmid)
        binfo = BackupInfo.coerce(info)
        part = self.store.partial_dir(g.bid)
        self._write_configs(g, part, guest_config, binfo.firewall_config)
        for device in sorted(volumes):
            check_device_name(device)
            g.disks[device] = self._backup_volume(
                g, device, VolumeInfo.coerce(volumes[device]), binfo.bandwidth_limit
            )
        self._publish(g, "incremental" if any(d.parent for d in g.disks.values()) else "full")
        g.returned = True

    def _write_configs(
        self, g: _GuestBackup, part: Path, guest_config: str, firewall: str | None
    ) -> None:
        for name, text in ((GUEST_CONFIG, guest_config), (FIREWALL_CONFIG, firewall)):
            if text is None:
                continue
            data = text.encode() if isinstance(text, str) else bytes(text)
            write_atomic(part / name, data)
            g.files[name] = FileRecord(len(data), sha256_file(part / name))

    def _backup_volume(
        self, g: _GuestBackup, device: str, vol: VolumeInfo, bwlimit: int
    ) -> DiskRecord:
        size = vol.size
        base = None
        if vol.bitmap_mode == BitmapMode.REUSE:
            base = self._previous_base(g.bid.vmid, device, size)
            if base is None:
                raise DirbackupError(
                    f"{device}: the hypervisor reuses a dirty bitmap, but there is no previous "
                    "backup of this disk (of the same size) to build on"
                )
        handles: list[Any] = []
        source: copy.Source
        try:
            if vol.nbd_path:
                source, regions, handles = self._nbd_source(device, vol, base is not None)
            else:
                source = copy.FileSource(vol.fileno(), f"{device} (file handle)")
                regions = self._regions_from_iterator(device, vol)
            dirty = extents.total(regions)
            vsize = qcow2.virtual_size_for(size)  # the image reads a sector's zero tail
            cluster = _cluster_size_for(regions, vsize) if base else DEFAULT_CLUSTER
            regions = extents.align(regions, cluster, vsize)
            image = self.store.partial_dir(g.bid) / disk_file(device)
            backing = os.path.relpath(base[1], image.parent) if base else None
            mode = "incremental" if base else "full"
            self.log("info", f"{device}: {mode} backup of {human(size)}, {human(dirty)} to read")
            options = copy.CopyOptions(
                request_size=self.copy_options.request_size,
                workers=self.copy_options.workers,
                depth=self.copy_options.depth,
                discard=True,
                bandwidth_limit=bwlimit,
                digest_chunk=DIGEST_CHUNK,
                progress_interval=0.25 if self.progress else PROGRESS_INTERVAL,
                io_timeout=self.io_timeout,
            )
            with qcow2.Writer(image, size, cluster, backing=backing) as writer:
                stats = copy.copy_regions(
                    source,
                    writer,
                    regions,
                    options,
                    progress=self._progress_logger(device),
                    digest_size=size,
                    digest_zero=writer.records_zero,
                )
                writer.finish()
        finally:
            nbd.close_all(handles)
        if stats.discard_note:
            self.log("info", f"{device}: {stats.discard_note}")
        self.log(
            "info",
            f"{device}: read {human(stats.read_bytes)}, wrote "
            f"{human(stats.written_bytes)} ({human(stats.zero_bytes)} zero) in "
            f"{stats.seconds:.1f} s, {human(stats.rate)}/s",
        )
        return DiskRecord(
            file=image.name,
            size=size,
            mode=mode,
            parent=base[0].volname if base else None,
            cluster_size=cluster,
            digest_chunk=DIGEST_CHUNK,
            digests=digest_map(stats.digests if stats.digests is not None else []),
            dirty_bytes=dirty,
            written_bytes=stats.written_bytes,
        )

    def _nbd_source(
        self, device: str, vol: VolumeInfo, incremental: bool
    ) -> tuple[copy.NBDSource, extents.Extents, list[Any]]:
        """Connect to the device's export and find what to read: the dirty
        parts of the bitmap for an incremental (nothing else is queried), the
        allocated parts otherwise (everything if the server cannot tell)."""
        uri = nbd.unix_uri(str(vol.nbd_path), device)
        workers = self.copy_options.workers or copy.default_workers()
        if incremental:
            if not vol.bitmap_name:
                raise DirbackupError(f"{device}: bitmap mode 'reuse' without a bitmap name")
            context = extents.dirty_bitmap_context(vol.bitmap_name)
        else:
            context = extents.ALLOCATION
        handles = nbd.connect_many(uri, workers, [context], timeout=self.io_timeout)
        try:
            export_size = handles[0].get_size()
            if export_size not in (vol.size, qcow2.virtual_size_for(vol.size)):
                raise DirbackupError(
                    f"{device}: the export has {export_size} bytes, the hypervisor said {vol.size}"
                )
            if incremental:
                nbd.require_context(handles[0], context)
                regions = extents.dirty(self._block_status(device, handles, context))
            elif handles[0].can_meta_context(context):
                regions = extents.data(self._block_status(device, handles, context))
            else:
                regions = extents.from_pairs([(0, vol.size)])
        except BaseException:
            nbd.close_all(handles)
            raise
        return copy.NBDSource(handles, uri), regions, handles

    def _block_status(self, device: str, handles: list[Any], context: str) -> extents.Extents:
        """The map of `context`, given up after the I/O timeout without an answer."""
        return watchdog.block_status(handles[0], context, self.io_timeout, device, handles[1:])

    def _regions_from_iterator(self, device: str, vol: VolumeInfo) -> extents.Extents:
        pairs = []
        for offset, length in vol.dirty_regions():
            offset, length = int(offset), int(length)
            if offset < 0 or length <= 0 or offset + length > vol.size:
                raise DirbackupError(
                    f"{device}: next-dirty-region returned ({offset}, {length}) "
                    f"outside the disk of {vol.size} bytes"
                )
            pairs.append((offset, length))
        pairs.sort()
        return extents.coalesce(extents.from_pairs(pairs, 1))

    def _progress_logger(self, device: str) -> copy.Progress:
        def report(s: copy.CopyStats) -> None:
            if s.total_bytes and s.done_bytes < s.total_bytes:
                pct = 100.0 * s.done_bytes / s.total_bytes
                self.log(
                    "info",
                    f"{device}: {pct:.0f}% ({human(s.done_bytes)} of "
                    f"{human(s.total_bytes)}), {human(s.rate)}/s",
                )

        return report

    # ------------------------------------------------------------------ publish

    def _publish(self, g: _GuestBackup, mode: str) -> None:
        part = self.store.partial_dir(g.bid)
        pending = read_json(part / PENDING_ATTRIBUTES)
        (part / PENDING_ATTRIBUTES).unlink(missing_ok=True)
        parents = [d.parent for d in g.disks.values() if d.parent]
        manifest = Manifest(
            vmid=g.bid.vmid,
            vmtype=str(g.bid.vmtype),
            ctime=g.bid.epoch,
            mode=mode,
            parent=max(parents) if parents else None,
            disks=g.disks,
            files=g.files,
            notes=str(pending.get("notes", "")),
            protected=bool(pending.get("protected", False)),
        )
        self.store.publish(g.bid, manifest)
        g.published = True
        if g.bid.vmtype == VmType.QEMU:
            g.old_previous_raw = self._previous_raw(g.bid.vmid)
            old = self.store.read_previous(g.bid.vmid, VmType.QEMU)
            g.old_previous = old
            new = PreviousInfo(devices=dict(old.devices), backup=g.bid.name)
            for device, disk in g.disks.items():
                new.devices[device] = PreviousDevice(g.bid.name, disk.size, disk.file)
            self.store.write_previous(g.bid.vmid, new)
        self.log("info", f"backup {g.bid.volid(self.storeid)} complete")

    # ------------------------------------------------------------------ backup: container

    def backup_container_prepare(self, vmid: int, info: ContainerInfo | Mapping[str, Any]) -> None:
        """Privileged: let the container's mapped root user write the partial backup."""
        g = self._guest(vmid)
        cinfo = ContainerInfo.coerce(info)
        part = self.store.partial_dir(g.bid)
        os.chown(part, cinfo.backup_user_id, -1)

    def backup_container(
        self,
        vmid: int,
        guest_config: str,
        exclude_patterns: Sequence[str],
        info: ContainerInfo | Mapping[str, Any],
    ) -> None:
        """May run in an unprivileged child: everything it learns goes to disk."""
        from dirbackup import container

        g = self._guest(vmid)
        cinfo = ContainerInfo.coerce(info)
        part = self.store.partial_dir(g.bid)
        self._write_configs(g, part, guest_config, cinfo.firewall_config)
        directory = Path(cinfo.directory)
        if not directory.is_dir():
            raise DirbackupError(f"container root {directory} does not exist or is not a directory")
        mode = str(self.storage_plugin.lxc_backup_mode())
        if mode == "squashfs":
            result = container.create_squashfs(
                directory,
                part / SQUASHFS_ARCHIVE,
                exclude_patterns=list(exclude_patterns),
                bandwidth_limit=cinfo.bandwidth_limit,
                log=self.log_function,
            )
        else:
            result = container.create_tar(
                directory,
                part / TAR_ARCHIVE,
                sources=list(cinfo.sources),
                exclude_patterns=list(exclude_patterns),
                bandwidth_limit=cinfo.bandwidth_limit,
                log=self.log_function,
            )
        g.files[result.path.name] = FileRecord(result.size, result.sha256)
        write_atomic(
            part / CONTAINER_RESULT,
            json.dumps(
                {name: {"size": rec.size, "sha256": rec.sha256} for name, rec in g.files.items()}
            ),
        )
        self.log("info", f"archive {result.path.name}: {human(result.size)}")

    # ------------------------------------------------------------------ backup: end

    def backup_cleanup(
        self, vmid: int, vmtype: str | None, success: bool, info: Mapping[str, Any] | None
    ) -> dict[str, Any]:
        vmid = int(vmid)
        g = self._guests.pop(vmid, None)
        if g is None:
            if not success:
                self.log("info", f"guest {vmid}: nothing to clean up")
            return {}
        try:
            if success:
                if not g.published:
                    try:
                        self._publish_container(g)
                    except BaseException:
                        self._abort(g)  # e.g. ENOSPC writing the manifest
                        raise
                size, _used = dir_usage(self.store.backup_dir(g.bid))
                self._finished[vmid] = (g.bid, True)
                return {"stats": {"archive-size": size}}
            error = (info or {}).get("error", "unknown error")
            self.log("err", f"backup of guest {vmid} failed: {error}")
            self._abort(g)
            self._finished[vmid] = (g.bid, False)
            return {}
        finally:
            g.lock.close()

    def _publish_container(self, g: _GuestBackup) -> None:
        part = self.store.partial_dir(g.bid)
        result = read_json(part / CONTAINER_RESULT)
        if not result:
            raise DirbackupError(f"backup {g.bid.archive}: the container archive was not written")
        (part / CONTAINER_RESULT).unlink()
        g.files = {name: FileRecord(**rec) for name, rec in result.items()}
        self._publish(g, "container")

    def _abort(self, g: _GuestBackup) -> None:
        if not g.published:
            self.store.discard(g.bid)
            return
        if not g.returned:
            # Published, but backup_vm itself failed after that (previous-info
            # could not be written, say): the hypervisor keeps its bitmap as it
            # was, so the old record is still right.  Put it back as it was.
            self.store.remove_backup(g.bid)
            path = self.store.previous_info_path(g.bid.vmid)
            if self._previous_raw(g.bid.vmid) != g.old_previous_raw:
                if g.old_previous_raw is None:
                    path.unlink()
                else:
                    write_atomic(path, g.old_previous_raw)
            return
        # Published, but the hypervisor failed the backup afterwards: remove it.
        # Its dirty bitmap may already have advanced past this backup, so the
        # disks it held get no incremental base until the next full backup.
        self.store.remove_backup(g.bid)
        if g.old_previous is not None:
            prev = PreviousInfo(
                devices={k: v for k, v in g.old_previous.devices.items() if k not in g.disks},
                backup=None,
            )
            self.store.write_previous(g.bid.vmid, prev)
            self.log("warn", "the next backup of the removed backup's disks will be full")

    def _previous_raw(self, vmid: int) -> bytes | None:
        """previous-info as it is on disk (None: none, or not a regular file)."""
        try:
            return read_regular(self.store.previous_info_path(vmid))
        except (FileNotFoundError, StoreError):
            return None

    def backup_handle_log_file(self, vmid: int, filename: str) -> None:
        vmid = int(vmid)
        done = self._finished.get(vmid)
        g = self._guests.get(vmid)
        if done is None and g is None:
            raise StoreError(f"no backup of guest {vmid} to attach a log to")
        bid, ok = done if done is not None else (g.bid, False)  # type: ignore[union-attr]
        data = Path(filename).read_bytes()
        if ok and self.store.exists(bid):
            write_atomic(self.store.backup_dir(bid) / LOG_FILE, data)
        else:
            target = self.store.failed_dir(bid)
            target.mkdir(parents=True, exist_ok=True)
            write_atomic(target / LOG_FILE, data)

    # ------------------------------------------------------------------ restore

    def _backup(self, volname: str) -> tuple[BackupId, Path]:
        bid = self.storage_plugin.backup_id(volname)
        return bid, self.store.require(bid)

    def restore_get_mechanism(self, volname: str, *storeid: str) -> tuple[str, str]:
        bid, path = self._backup(volname)
        if bid.vmtype == VmType.QEMU:
            return RestoreMechanism.QEMU_IMG.value, bid.vmtype.value
        if (path / TAR_ARCHIVE).exists():
            return RestoreMechanism.TAR.value, bid.vmtype.value
        if (path / SQUASHFS_ARCHIVE).exists():
            return RestoreMechanism.DIRECTORY.value, bid.vmtype.value
        raise StoreError(f"backup {volname} holds no container archive")

    def archive_get_guest_config(self, volname: str, *storeid: str) -> str:
        _bid, path = self._backup(volname)
        try:
            return read_regular(path / GUEST_CONFIG).decode("utf-8", "replace")
        except FileNotFoundError:
            raise StoreError(f"backup {volname} has no guest configuration") from None

    def archive_get_firewall_config(self, volname: str, *storeid: str) -> str | None:
        _bid, path = self._backup(volname)
        try:
            return read_regular(path / FIREWALL_CONFIG).decode("utf-8", "replace")
        except FileNotFoundError:
            return None

    def restore_vm_init(self, volname: str, *storeid: str) -> dict[str, dict[str, int]]:
        bid, path = self._backup(volname)
        manifest = self.store.read_manifest(bid)
        if manifest is not None:
            return {dev: {"size": d.size} for dev, d in sorted(manifest.disks.items())}
        out = {}
        for image in sorted(path.glob("*.qcow2")):
            out[image.stem] = {"size": qcow2.read_header(image).virtual_size}
        return out

    def open_chain(self, volname: str, device: str) -> qcow2.Chain:
        """The validated qcow2 chain of one disk of a backup (for our own fast
        restore); nothing outside the guest's directory is ever opened."""
        bid, path = self._backup(volname)
        manifest = self.store.read_manifest(bid)
        check_device_name(device)
        size = None
        if manifest is not None:
            if device not in manifest.disks:
                raise StoreError(
                    f"backup {volname} has no disk {device!r} "
                    f"(it has: {', '.join(sorted(manifest.disks)) or 'none'})"
                )
            record = manifest.disks[device]
            if Path(record.file).name != record.file or record.file in ("", ".", ".."):
                raise StoreError(f"backup {volname}: its manifest names {record.file!r}; refused")
            image, size = path / record.file, record.size
        else:
            image = path / disk_file(device)
            if not image.exists():
                raise StoreError(f"backup {volname} has no disk {device!r}")
        chain = qcow2.Chain(image, self.store.guest_dir(bid.vmid))
        if size is not None and chain.virtual_size != qcow2.virtual_size_for(size):
            chain.close()
            raise StoreError(
                f"{image}: virtual size {chain.virtual_size} differs from the "
                f"{size} bytes the backup's manifest records; refused"
            )
        return chain

    def restore_vm_volume_init(
        self, volname: str, device_name: str, info: Mapping[str, Any] | None = None
    ) -> dict[str, str]:
        key = (volname, device_name)
        if key in self._restores:
            raise StoreError(f"{device_name} of {volname} is already being restored")
        with self.open_chain(volname, device_name) as chain:
            chain.map()  # every table checked: QEMU would read what lies as zeros
            rundir = qemu.make_rundir("dirbackup-")
            job = _VolumeRestore(rundir)
            self._restores[key] = job
            try:
                job.server = qemu.start_nbd(
                    None,
                    str(rundir / "nbd.sock"),
                    export=device_name,
                    fmt=None,
                    image_opts=chain.image_opts(),
                    shared=4,
                )
                job.mountpoint = rundir / "fuse"
                job.mountpoint.mkdir()
                job.fuse = qemu.start_nbdfuse(job.mountpoint, device_name, job.server.uri)
            except BaseException:
                self.restore_vm_volume_cleanup(volname, device_name, info)
                raise
        return {"qemu-img-path": str(job.fuse.path)}

    def restore_vm_volume_cleanup(
        self, volname: str, device_name: str, info: Mapping[str, Any] | None = None
    ) -> None:
        job = self._restores.pop((volname, device_name), None)
        if job is None:
            return
        if job.fuse is not None:
            job.fuse.stop()
        if job.server is not None:
            job.server.stop()
        shutil.rmtree(job.rundir, ignore_errors=True)

    def restore_vm_cleanup(self, volname: str, *storeid: str) -> None:
        for vol, dev in list(self._restores):
            if vol == volname:
                self.restore_vm_volume_cleanup(vol, dev)

    def restore_container_init(self, volname: str, *args: Any) -> dict[str, str]:
        from dirbackup import container

        mechanism, _ = self.restore_get_mechanism(volname)
        _bid, path = self._backup(volname)
        if mechanism not in (RestoreMechanism.TAR, RestoreMechanism.DIRECTORY):
            raise StoreError(f"backup {volname} is not a container backup")
        archive = path / (TAR_ARCHIVE if mechanism == RestoreMechanism.TAR else SQUASHFS_ARCHIVE)
        if not stat.S_ISREG(os.lstat(archive).st_mode):
            raise StoreError(f"{archive} is not a regular file (a symlink?); refused")
        if mechanism == RestoreMechanism.TAR:
            return {"tar-path": str(archive)}
        if volname in self._mounts:
            raise StoreError(f"{volname} is already mounted for restore")
        rundir = qemu.make_rundir("dirbackup-")
        mountpoint = rundir / "root"
        mountpoint.mkdir()
        try:
            mount = container.SquashfsMount(path / SQUASHFS_ARCHIVE, mountpoint)
            mount.__enter__()
        except BaseException:
            shutil.rmtree(rundir, ignore_errors=True)
            raise
        self._mounts[volname] = (mount, rundir)
        return {"archive-directory": str(mountpoint)}

    def restore_container_cleanup(self, volname: str, *args: Any) -> None:
        entry = self._mounts.pop(volname, None)
        if entry is None:
            return
        mount, rundir = entry
        try:
            mount.unmount()
        finally:
            shutil.rmtree(rundir, ignore_errors=True)


def _cluster_size_for(regions: extents.Extents, size: int) -> int:
    """The largest cluster size up to 64 KiB that every dirty region's bounds
    are aligned to, so an incremental never reads clean parts of the source."""
    cluster = DEFAULT_CLUSTER
    if regions.shape[0]:
        bounds = np.concatenate([regions[:, 0], regions[:, 0] + regions[:, 1]])
        bounds = bounds[bounds != np.uint64(size)]
        while cluster > MIN_CLUSTER and bounds.size and bool((bounds % np.uint64(cluster)).any()):
            cluster //= 2
    return cluster
