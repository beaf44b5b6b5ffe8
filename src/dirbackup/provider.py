"""DirectoryBackupProvider: backups of VMs and containers into a dirbackup store.

The seed's `DirectoryExample`, done properly:

* VM disks become qcow2 images written by our own writer (no qemu-nbd on the
  target side); an incremental image is backed by the previous backup of the
  same disk and holds exactly what the dirty bitmap says changed, with
  clusters that now read as zero stored as zero clusters.
* A local disk the host passes as api.DIRECT_KEY is read by the core from its
  image file (directread: raw files, block devices, qcow2 chains; an
  incremental's dirty map from the bitmap in the image itself), with the
  same images and digests as through the export; what the core cannot read
  goes through the export, with one log line saying why.
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
* An incremental is taken only when the chain is proven (with a host that
  offers the bitmap generations of api.BitmapGenerations, as ours does): the
  disk's bitmap is the generation recorded with its last backup in this
  store, usable, the disk below its top image and its size are unchanged,
  and the last backup is a valid chain short enough for one more layer.
  Anything else is a full backup, with a log line saying why.
* No incremental builds on a backup whose last check failed.
* Restores are the base class's (RestoringProvider, provider_restore.py).

This module is the backup side, and one module although longer than most:
choosing the base of an incremental, copying a disk, publishing and undoing
a publish share one per-guest state (_GuestBackup) and one order of events
that the hypervisor dictates; split, each part would need the others'
internals.  Where the backup's files go is the store's (store.PartialBackup).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dirbackup import (
    compression,
    copy,
    directread,
    extents,
    nbd,
    qcow2,
    qcow2bitmaps,
    timings,
    watchdog,
)
from dirbackup.api import (
    BACKING_KEY,
    BITMAPS_KEY,
    BackupInfo,
    BitmapMode,
    ContainerInfo,
    IncrementalChoice,
    LogFunction,
    Mechanism,
    VmType,
    VolumeInfo,
)
from dirbackup.errors import DirbackupError, IOTimeout, StoreError
from dirbackup.manifest import (
    DiskRecord,
    FileRecord,
    Manifest,
    PreviousDevice,
    PreviousInfo,
    digest_map,
)
from dirbackup.provider_restore import RestoringProvider
from dirbackup.store import (
    DEFAULT_LOCK_TIMEOUT,
    BackupId,
    Store,
    check_device_name,
    check_start_time,
    check_vmid,
)
from dirbackup.units import human
from dirbackup.watchdog import DEFAULT_IO_TIMEOUT

DEFAULT_CLUSTER = 64 * 1024
DIGEST_CHUNK = 16 << 20
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
    # per device, when the host takes part in the bitmap generations: the
    # generation that starts with this backup, the bitmap it must read (if
    # incremental), and the identity of the disk below its top image
    generations: dict[str, str] = field(default_factory=dict)
    reads: dict[str, str] = field(default_factory=dict)
    backing: dict[str, list[dict[str, Any]] | None] = field(default_factory=dict)


class DirectoryBackupProvider(RestoringProvider):
    """Back up into, and restore from, a dirbackup store (see the module doc).

    It offers the bitmap generations of api.BitmapGenerations."""

    max_chain_depth = qcow2.MAX_DEPTH
    """An incremental is taken only while its chain stays this short: a
    restore follows no deeper chain."""

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
        compress: str | None = None,
    ) -> None:
        """`progress(device, stats)` is called a few times a second while a disk
        is copied (for progress bars); the log gets a line every 10 s.
        `lock_timeout` (default: the storage's `lock-timeout`, 60 s) is how
        long backup_init waits for another backup or prune of the guest;
        `io_timeout` (default: the storage's `io-timeout`, 60 s) how long a
        backup waits for a source that makes no progress -- connecting,
        querying its map or copying -- before it fails (0: for ever).
        `compress` (default: the storage's `compress`) is how disk images
        store data clusters: `none`, `zstd` or `zstd:LEVEL`."""
        super().__init__(storage_plugin, scfg, storeid, log)
        self.progress = progress
        if lock_timeout is None:
            lock_timeout = float(getattr(scfg, "lock_timeout", DEFAULT_LOCK_TIMEOUT))
        if io_timeout is None:
            io_timeout = float(getattr(scfg, "io_timeout", DEFAULT_IO_TIMEOUT))
        self.io_timeout = io_timeout
        if compress is None:
            compress = str(getattr(scfg, "compress", compression.DEFAULT_COMPRESS))
        self.compress = compression.normalize(compress)
        self.store = Store(scfg.path, lock_timeout)
        self.copy_options = copy_options or copy.CopyOptions()
        self._guests: dict[int, _GuestBackup] = {}
        self._finished: dict[int, tuple[BackupId, bool]] = {}
        self._restores = {}
        self._mounts = {}

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
        """Lock the guest and start its backup's partial directory.  A guest
        id, type or start time that no volume name could address is refused
        before anything is written."""
        vmid = check_vmid(vmid)
        start_time = check_start_time(start_time)
        if vmtype not in tuple(VmType):
            raise DirbackupError(f"unsupported guest type {vmtype!r}")
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

    def _previous_base(
        self, vmid: int, device: str, size: int, why: list[str] | None = None
    ) -> tuple[BackupId, Path] | None:
        """The image the next incremental of `device` can build on, if any:
        the last good backup of that device, still present, of the same size,
        with room for one more layer.  Without one, `why` gets the reason
        (nothing when the device has no record at all)."""
        why = [] if why is None else why
        prev = self.store.read_previous(vmid, VmType.QEMU)
        if device in prev.devices:
            rec = prev.devices[device]
            if rec.size != size:
                why.append(f"its size changed since its last backup ({rec.size} -> {size} bytes)")
                return None
            name, file = rec.backup, rec.file
        elif prev.backup and not prev.devices:
            name, file = prev.backup, None  # the seed's previous-info: the image's usual name
        else:
            return None
        try:
            bid = BackupId.parse(f"{vmid}/{name}")
        except DirbackupError:
            why.append(f"its previous-info names no backup ({name!r})")
            return None
        image = self.store.image_path(bid, device)
        if (file is not None and file != image.name) or not self.store.exists(bid):
            why.append(f"its last backup {name} is gone")
            return None  # a record naming anything else is no base
        g = self._guests.get(vmid)
        if g is not None and bid.epoch >= g.bid.epoch:  # stamped in the future
            self.log("info", f"{device}: {bid.name} is stamped after this backup; full backup")
            return None  # (an incremental would sort before its base)
        try:  # a base is a chain a restore accepts: valid, and what its manifests say
            with self.open_chain(bid.volname, device) as chain:
                if chain.virtual_size != qcow2.virtual_size_for(size):
                    why.append(f"its last backup {name} holds another size")
                    return None
                if chain.depth >= self.max_chain_depth:
                    why.append(
                        f"the chain of its last backup {name} is {chain.depth} images deep, "
                        f"the most a restore follows is {self.max_chain_depth}"
                    )
                    return None
                failed = self._failed_check(vmid, chain)
        except (DirbackupError, OSError) as exc:
            why.append(f"its last backup {name} is no valid base ({exc})")
            return None
        if failed is not None:
            self.log("warn", f"{device}: {failed}; no incremental on it, this backup is full")
            return None
        return bid, image

    def _failed_check(self, vmid: int, chain: qcow2.Chain) -> str | None:
        """Why no incremental may build on a chain: a backup in it whose last
        check (verify, a restore's or a merge's) failed."""
        for path in chain.paths:
            try:
                bid = BackupId.parse(f"{vmid}/{Path(path).parent.name}")
            except DirbackupError:
                continue
            reason = self.store.check_failure(bid)
            if reason is not None:
                return f"{bid.volname} failed its last check ({reason})"
        return None

    def _unproven(self, vmid: int, device: str, vol: Mapping[str, Any]) -> str | None:
        """Why the disk's bitmap is not proven to hold every change since its
        last backup in this store (BitmapGenerations hosts), or None."""
        rec = self.store.read_previous(vmid, VmType.QEMU).devices.get(device)
        found = vol.get(BITMAPS_KEY)
        if rec is None or rec.bitmap is None:
            return (
                "its last backup started no bitmap generation of this store "
                "(made by another host or an older dirbackup)"
            )
        if not isinstance(found, Mapping):
            return f"the host passed no list of bitmaps ({BITMAPS_KEY})"
        if rec.bitmap not in found:
            others = ", ".join(sorted(found)) or "none"
            return f"bitmap {rec.bitmap} not found on the disk (found: {others})"
        if found[rec.bitmap] != "usable":
            return f"bitmap {rec.bitmap} is {found[rec.bitmap]}"
        backing = vol.get(BACKING_KEY)
        if backing is None:
            return "a layer below its top image cannot be identified (not a local file)"
        if _canonical(backing) != _canonical(rec.backing):
            return "the disk below its top image changed since its last backup"
        return None

    def backup_vm_query_incremental(
        self, vmid: int, volumes: Mapping[str, Mapping[str, Any]]
    ) -> dict[str, str]:
        """`use` where an incremental can build on the device's last backup:
        see _previous_base, and, when the host passes the bitmap generation
        keys (api.BitmapGenerations), _unproven.  `new` otherwise, with a log
        line saying why."""
        if str(self.storage_plugin.vm_backup_mode()) != "incremental":
            return {}
        g = self._guests.get(int(vmid))
        answer = {}
        for device, vol in volumes.items():
            check_device_name(device)
            why: list[str] = []
            base = self._previous_base(int(vmid), device, int(vol["size"]), why)
            proving = BITMAPS_KEY in vol
            if base is not None and proving:
                reason = self._unproven(int(vmid), device, vol)
                if reason is not None:
                    base = None
                    why.append(reason)
            if g is not None and proving:
                token = f"{g.bid.name}-{secrets.token_hex(4)}"
                g.generations[device] = f"{self.bitmap_prefix()}-{token}"
                g.backing[device] = vol.get(BACKING_KEY)
                expected = self.expected_bitmap(int(vmid), device)
                if base is not None and expected is not None:
                    g.reads[device] = expected
            if base is None and why:
                self.log("info", f"{device}: {why[0]}; full backup")
            answer[device] = (IncrementalChoice.USE if base else IncrementalChoice.NEW).value
        return answer

    # -- api.BitmapGenerations

    def bitmap_prefix(self) -> str:
        """`dirbackup-<store identity>` (the identity is made on first use)."""
        return f"dirbackup-{self.store.identity()}"

    def expected_bitmap(self, vmid: int, device: str) -> str | None:
        rec = self.store.read_previous(int(vmid), VmType.QEMU).devices.get(device)
        return rec.bitmap if rec is not None else None

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
        g.files.update(self.store.partial(g.bid).write_configs(guest_config, binfo.firewall_config))
        for device in sorted(volumes):
            check_device_name(device)
            g.disks[device] = self._backup_volume(
                g, device, VolumeInfo.coerce(volumes[device]), binfo.bandwidth_limit
            )
        with timings.phase("publish (fsync, rename)"):
            self._publish(g, "incremental" if any(d.parent for d in g.disks.values()) else "full")
        g.returned = True

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
            if device in g.generations and (
                device not in g.reads or (vol.nbd_path and vol.bitmap_name != g.reads[device])
            ):
                raise DirbackupError(
                    f"{device}: the host reuses bitmap {vol.bitmap_name or '(unnamed)'}, but "
                    f"an incremental may only continue {g.reads.get(device) or 'none'}"
                )
        if vol.bitmap_mode == BitmapMode.NONE:
            g.generations.pop(device, None)  # the host keeps no bitmap of this disk
        handles: list[Any] = []
        source: copy.Source | None = None
        vsize = qcow2.virtual_size_for(size)  # the image reads a sector's zero tail
        direct = None
        try:
            if vol.direct is not None and vol.nbd_path:
                direct = self._direct_read(device, vol, base is not None, vsize)
            if direct is not None:
                read, cluster, dirty = direct
                handles = self._export_witness(device, vol)
            else:
                read = None
                if vol.nbd_path:
                    source, regions, handles = self._nbd_source(device, vol, base is not None)
                else:
                    source = copy.FileSource(vol.fileno(), f"{device} (file handle)")
                    regions = self._regions_from_iterator(device, vol)
                dirty = extents.total(regions)
                if base:
                    cluster = _cluster_size_for(device, regions, vsize)
                else:
                    cluster = max(DEFAULT_CLUSTER, qcow2.smallest_cluster_size(vsize))
                regions = extents.align(regions, cluster, vsize)
            image = self.store.partial(g.bid).image_path(device)
            backing = os.path.relpath(base[1], image.parent) if base else None
            mode = "incremental" if base else "full"
            via = " directly" if read is not None else ""  # from the image (api.DIRECT_KEY)
            self.log(
                "info", f"{device}: {mode} backup of {human(size)}, {human(dirty)} to read{via}"
            )
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
            with qcow2.Writer(
                image, size, cluster, backing=backing, compress=self.compress
            ) as writer:
                with timings.phase("copy"):
                    if read is not None:
                        stats = read.copy(
                            writer,
                            options,
                            progress=self._progress_logger(device),
                            size=size,
                            digest_zero=writer.records_zero,
                            name=f"{device} ({read.name})",
                        )
                        self._check_witness(device, vol, handles, image)
                    else:
                        assert source is not None
                        stats = copy.copy_regions(
                            source,
                            writer,
                            regions,
                            options,
                            progress=self._progress_logger(device),
                            digest_size=size,
                            digest_zero=writer.records_zero,
                        )
                with timings.phase("qcow2 finish"):
                    writer.finish()
        finally:
            nbd.close_all(handles)
            if direct is not None:
                direct[0].close()
        if stats.discard_note:
            self.log("info", f"{device}: {stats.discard_note}")
        self.log(
            "info",
            f"{device}: read {human(stats.read_bytes)}, wrote "
            f"{human(stats.written_bytes)} ({human(stats.zero_bytes)} zero) in "
            f"{stats.seconds:.1f} s, {human(stats.rate)}/s",
        )
        if writer.compress != "none":
            self.log(
                "info",
                f"{device}: {writer.compressed_clusters} of {writer.data_clusters} data "
                f"clusters compressed ({writer.compress}) into "
                f"{human(writer.compressed_bytes)}",
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
            compress=writer.compress,
        )

    def _direct_read(
        self, device: str, vol: VolumeInfo, incremental: bool, vsize: int
    ) -> tuple[directread.DirectRead, int, int] | None:
        """The disk read by the core from its image file (api.DIRECT_KEY):
        the open image with its copy plan, the backup's cluster size and the
        bytes to read (as _nbd_source would count them).  None, with one log
        line saying why, when the core cannot read the image: the caller
        then reads through the export."""
        src = vol.direct
        assert src is not None
        try:
            if not incremental:
                cluster = max(DEFAULT_CLUSTER, qcow2.smallest_cluster_size(vsize))
                read = directread.open_direct(src, vol.size, cluster)
                return read, cluster, read.data_bytes
            if src.bitmap is None or src.bitmap != vol.bitmap_name:
                raise directread.DirectUnusable(
                    f"the image's bitmap {src.bitmap} is not the exported {vol.bitmap_name}"
                )
            try:
                return directread.open_incremental(
                    src, vol.size, lambda dirty: _cluster_size_for(device, dirty, vsize)
                )
            except qcow2bitmaps.BitmapUnusable as exc:
                # the host found it usable and its export holds QEMU's lock:
                # the image changed behind that lock.  Never an incremental
                # from it; the export would have refused it at its start.
                raise DirbackupError(
                    f"{device}: the dirty bitmap cannot be trusted ({exc}); "
                    "a full backup of the disk is needed"
                ) from None
        except directread.DirectUnusable as exc:
            self.log("info", f"{device}: DEV: reading through qemu-nbd: {exc}")
            return None

    def _export_witness(self, device: str, vol: VolumeInfo) -> list[Any]:
        """A connection to the disk's export, held while the image is read
        directly: the export's server holds QEMU's image lock, so the copy is
        only good if that server is still there and answering at its end."""
        uri = nbd.unix_uri(str(vol.nbd_path), device)
        return nbd.connect_many(uri, 1, [extents.ALLOCATION], timeout=self.io_timeout)

    def _check_witness(self, device: str, vol: VolumeInfo, handles: list[Any], image: Path) -> None:
        """After a direct copy: one request the export must answer, given up
        after the I/O timeout.  A server that died may have let a writer in
        (its lock went with it), one that does not answer may be stuck for
        good: either way the backup fails, as it would reading through it.
        The request is a block-status query of the first sector, not a read:
        the hypervisor refuses an incremental's reads outside its dirty areas."""
        uri = nbd.unix_uri(str(vol.nbd_path), device)
        fds = nbd.socket_fds(handles) if self.io_timeout > 0 else []
        with watchdog.Watchdog(self.io_timeout, lambda: 0, lambda: nbd.shut_down(fds)) as guard:
            try:
                nbd.probe(handles[0], extents.ALLOCATION, f"querying {uri} at offset 0")
            except OSError as exc:
                if not guard.fired:
                    raise OSError(
                        exc.errno,
                        f"{exc.strerror} (the export that holds the image's lock while the "
                        "image is read directly)",
                    ) from None
        if guard.fired:
            raise IOTimeout(
                f"no progress for {self.io_timeout:g} s reading {uri} into {image}: the export "
                "that holds the image's lock stopped answering (I/O timeout)"
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
        """The copy's progress callback: to `progress` (a bar) each time, to
        the log every PROGRESS_INTERVAL seconds."""
        logged = time.monotonic()

        def report(s: copy.CopyStats) -> None:
            nonlocal logged
            if self.progress is not None:
                self.progress(device, s)
            now = time.monotonic()
            if now - logged < PROGRESS_INTERVAL - 0.1:
                return
            logged = now
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
        pending = self.store.partial(g.bid).take_pending_attributes()
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
            g.old_previous_raw = self.store.read_previous_raw(g.bid.vmid)
            old = self.store.read_previous(g.bid.vmid, VmType.QEMU)
            g.old_previous = old
            new = PreviousInfo(devices=dict(old.devices), backup=g.bid.name)
            for device, disk in g.disks.items():
                new.devices[device] = PreviousDevice(
                    g.bid.name,
                    disk.size,
                    disk.file,
                    bitmap=g.generations.get(device),
                    backing=g.backing.get(device) if device in g.generations else None,
                )
            self.store.write_previous(g.bid.vmid, new)
        self.log("info", f"backup {g.bid.volid(self.storeid)} complete")

    # ------------------------------------------------------------------ backup: container

    def backup_container_prepare(self, vmid: int, info: ContainerInfo | Mapping[str, Any]) -> None:
        """Privileged: let the container's mapped root user write the partial backup."""
        g = self._guest(vmid)
        cinfo = ContainerInfo.coerce(info)
        os.chown(self.store.partial(g.bid).path, cinfo.backup_user_id, -1)

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
        part = self.store.partial(g.bid)
        g.files.update(part.write_configs(guest_config, cinfo.firewall_config))
        directory = Path(cinfo.directory)
        if not directory.is_dir():
            raise DirbackupError(f"container root {directory} does not exist or is not a directory")
        mode = str(self.storage_plugin.lxc_backup_mode())
        if mode == "squashfs":
            result = container.create_squashfs(
                directory,
                part.archive_path(mode),
                exclude_patterns=list(exclude_patterns),
                bandwidth_limit=cinfo.bandwidth_limit,
                log=self.log_function,
            )
        else:
            report = self._stream_progress("rootfs")
            result = container.create_tar(
                directory,
                part.archive_path(mode),
                sources=list(cinfo.sources),
                exclude_patterns=list(exclude_patterns),
                bandwidth_limit=cinfo.bandwidth_limit,
                log=self.log_function,
                progress=report,
            )
            report(result.size, final=True)
        g.files[result.path.name] = FileRecord(result.size, result.sha256)
        part.save_container_result(g.files)
        self.log("info", f"archive {result.path.name}: {human(result.size)}")

    def _stream_progress(self, item: str) -> Callable[..., None]:
        """`progress` of a stream of unknown length (a tar archive): bytes so
        far as CopyStats with no total, then (final) its size as the total."""
        start = time.monotonic()

        def report(done: int, final: bool = False) -> None:
            if self.progress is not None:
                seconds = time.monotonic() - start
                total = done if final else 0
                self.progress(item, copy.CopyStats(total, done, done, done, 0, 0, seconds, 1))

        return report

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
                size, _used = self.store.backup(g.bid).usage()
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
        files = self.store.partial(g.bid).take_container_result()
        if files is None:
            raise DirbackupError(f"backup {g.bid.archive}: the container archive was not written")
        g.files = files
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
            if self.store.read_previous_raw(g.bid.vmid) != g.old_previous_raw:
                self.store.restore_previous_raw(g.bid.vmid, g.old_previous_raw)
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

    def backup_handle_log_file(self, vmid: Any, filename: str) -> None:
        """Keep the task log with the backup (or with the failed one's leftovers).

        Never raises: the hypervisor calls this also when backup_init never
        ran (a failure before it) and outside any error handling, so a
        problem here is a warning in the task log, not a second failure."""
        try:
            vmid = int(vmid)
            done = self._finished.get(vmid)
            g = self._guests.get(vmid)
            if done is None and g is None:
                # (a failure before backup_init: the error is in the hypervisor's log)
                self.log("info", f"no backup of guest {vmid} in this job; its task log is not kept")
                return
            bid, ok = done if done is not None else (g.bid, False)  # type: ignore[union-attr]
            data = Path(filename).read_bytes()
            if ok and self.store.exists(bid):
                self.store.backup(bid).keep_log(data)
            else:
                self.store.keep_failed_log(bid, data)
        except Exception as exc:  # see the docstring
            self.log("warn", f"could not keep the task log {filename}: {exc}")


def _canonical(value: Any) -> str:
    """A JSON value in one spelling, to compare what the host passed with
    what previous-info recorded."""
    return json.dumps(value, sort_keys=True, default=repr)


def _cluster_size_for(device: str, regions: extents.Extents, size: int) -> int:
    """The largest cluster size up to 64 KiB that every dirty region's bounds
    are aligned to, so an incremental never reads clean parts of the source
    (the hypervisor forbids that).  Never below the smallest size whose L1
    table QEMU accepts for this disk: dirty regions finer than that cannot be
    stored in a readable image, and the backup fails rather than publish one."""
    smallest = qcow2.smallest_cluster_size(size)
    cluster = max(DEFAULT_CLUSTER, smallest)
    if regions.shape[0]:
        bounds = np.concatenate([regions[:, 0], regions[:, 0] + regions[:, 1]])
        bounds = bounds[bounds != np.uint64(size)]
        while cluster > smallest and bounds.size and bool((bounds % np.uint64(cluster)).any()):
            cluster //= 2
        odd = bounds[(bounds % np.uint64(cluster)) != 0]
        if odd.size:
            raise DirbackupError(
                f"{device}: the dirty bitmap marks a region that starts or ends at offset "
                f"{int(odd.min())}, not a multiple of {human(cluster)}, the smallest qcow2 "
                f"cluster size a disk of {human(size)} can have (QEMU limits its L1 table); "
                "an incremental backup of it could not be read back; use a dirty bitmap "
                f"granularity of at least {human(cluster)}, or take a full backup (storage option "
                "vm-backup-mode full, or --mode full on the command line)"
            )
    return cluster
