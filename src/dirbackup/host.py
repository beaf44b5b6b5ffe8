"""A standalone host: drives any backup provider the way the hypervisor does.

Integrators call a provider from their own hypervisor; everyone else needs a
program that plays the hypervisor's part.  `Host` sets up the "snapshot
access" each mechanism needs -- a read-only qemu-nbd export per disk on a
private Unix socket (export name = device name) with the disk's persistent
dirty bitmap (for `nbd` also the image itself as api.DIRECT_KEY, which our
provider reads directly while the export holds QEMU's lock and serves as the
fallback), and for `file-handle` an nbdfuse file opened with O_DIRECT --
manages the bitmaps (per store and backup generation with our provider, see
`dirbackup.bitmaps`; one per store, like the hypervisor's
`snapshot-access:<storeid>`, with any other), calls the provider in the hypervisor's order
with its abort paths, and stops and unmounts everything it started on every
exit path, Ctrl-C included.

Where a provider can tell, it does what Proxmox VE does: `bitmap-name` comes
whenever a disk has a bitmap (also in mode `new`); the guest config carries
the `#qmdump#map:` drive map (drivemap.py) that a restore checks; a guest
whose disk check fails after job_init still gets backup_cleanup and its task
log.  With `check_reads`, a read outside an incremental's dirty areas fails
the backup (readcheck.py).

It drives any `api.BackupProvider` (and a provider with the seed's POC v3
method names through `compat.from_v3`).  With our own provider it restores a
VM disk straight from the validated qcow2 chain; with any other, from the
provider's `qemu-img-path`.  The targets themselves are checked and written
by `restore_target`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from dirbackup import (
    bitmaps,
    copy,
    dirtyregions,
    drivemap,
    extents,
    qcow2,
    qcow2bitmaps,
    qemu,
    readcheck,
    restore_target,
    timings,
    toolrun,
    watchdog,
)
from dirbackup.api import (
    DIRECT_KEY,
    BackupProvider,
    BitmapMode,
    ChainAccess,
    LogFunction,
    VmType,
    check_incremental_answer,
)
from dirbackup.errors import DirbackupError, HostError, Terminated
from dirbackup.store import check_device_name


def bitmap_name(storeid: str) -> str:
    """The single bitmap per store the host keeps for a provider without
    bitmap generations (api.BitmapGenerations)."""
    return bitmaps.legacy_name(storeid)


@dataclass(frozen=True)
class Disk:
    """A guest disk to back up: a raw or qcow2 image file, or a block device."""

    device: str
    path: Path

    @property
    def format(self) -> str:
        return _image_format(self.path)


def _image_format(path: Path) -> str:
    with open(path, "rb") as f:
        return "qcow2" if f.read(4) == qcow2.MAGIC else "raw"


@dataclass
class _Outcome:
    """What to do to the guest once its backup's data is stored, or once the
    backup failed before that."""

    stored: Callable[[], None] = lambda: None
    failed: Callable[[], None] = lambda: None


class RestoreEngine(StrEnum):
    OURS = "dirbackup"
    QEMU_IMG = "qemu-img"


@dataclass
class BackupReport:
    """What a backup did."""

    volid: str
    archive_name: str
    seconds: float
    archive_size: int = 0
    bitmap_modes: dict[str, str] = field(default_factory=dict)
    log_lines: list[str] = field(default_factory=list)


@dataclass
class RestoreReport:
    """What a restore did, per device."""

    volid: str
    seconds: float
    devices: dict[str, copy.CopyStats | None] = field(default_factory=dict)


class _Log:
    """Collects the task log (as the hypervisor does) and forwards each line."""

    def __init__(self, forward: LogFunction | None) -> None:
        self.forward = forward
        self.lines: list[str] = []
        self._lock = threading.Lock()
        self.redirect: LogFunction | None = None  # in a forked child: to the parent

    def __call__(self, level: str, message: str) -> None:
        if self.redirect is not None:
            self.redirect(level, message)
            return
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        with self._lock:
            self.lines.append(f"{stamp} {level}: {message}")
        if self.forward is not None:
            self.forward(level, message)

    def write(self, path: Path, first_line: int = 0) -> None:
        path.write_text("\n".join(self.lines[first_line:]) + "\n")


class Host:
    """Plays the hypervisor for one store.

    `storage` is the storage plugin (DirectoryStorage or anything with the
    same methods); `provider` is created from it unless one is given (any
    BackupProvider, e.g. a v3 provider wrapped by compat.from_v3), or made by
    `new_provider(log)` from the host's task log, so that what the provider
    logs goes into the task log too."""

    def __init__(
        self,
        storage: Any,
        storeid: str,
        *,
        log: LogFunction | None = None,
        provider: BackupProvider | None = None,
        new_provider: Callable[[LogFunction], BackupProvider] | None = None,
        progress: Callable[[str, copy.CopyStats], None] | None = None,
        io_timeout: float | None = None,
        check_reads: bool = False,
    ) -> None:
        """`io_timeout` (default: the storage's `io-timeout`, 60 s) bounds the
        host's own wait for a disk's dirty map (the file-handle mechanism).
        `check_reads` (for tests of a provider): a backup whose provider read
        an incremental disk outside its bitmap's dirty areas fails, as the
        hypervisor refuses such reads -- found after the fact from the
        exports' request traces (readcheck.py)."""
        self.check_reads = check_reads
        self._traces: Path | None = None
        self.storage = storage
        self.storeid = storeid
        self.log = _Log(log)
        self.provider = provider or (new_provider or storage.new_backup_provider)(self.log)
        self.progress = progress
        if io_timeout is None:
            scfg = getattr(storage, "scfg", None)
            io_timeout = float(getattr(scfg, "io_timeout", watchdog.DEFAULT_IO_TIMEOUT))
        self.io_timeout = io_timeout
        self._job = False

    @contextlib.contextmanager
    def job(self, start_time: int | None = None) -> Iterator[None]:
        """One backup job of several guests, as the hypervisor runs one:
        job_init once, then each backup_vm / backup_container made inside
        the `with` block, then job_cleanup (also after a failure).  Outside
        a job each backup is a job of its own."""
        if self._job:
            raise HostError("a backup job is already running on this host")
        self.provider.job_init(int(time.time()) if start_time is None else start_time)
        self._job = True
        try:
            yield
        finally:
            self._job = False
            self.provider.job_cleanup()

    # ------------------------------------------------------------------ VM backup

    def backup_vm(
        self,
        vmid: int,
        disks: Sequence[Disk],
        *,
        config: str = "",
        firewall: str | None = None,
        bandwidth_limit: int = 0,
        notes: str | None = None,
        protected: bool = False,
        start_time: int | None = None,
        mechanism: str | None = None,
    ) -> BackupReport:
        """Back up a VM's disks in the hypervisor's order of calls."""
        if not disks:
            raise HostError("a VM backup needs at least one disk")
        for d in disks:
            check_device_name(d.device)
        twice = duplicate_disks(disks)
        if twice is not None:
            raise HostError(twice)

        def prepare() -> None:  # after job_init, as the hypervisor's prepare step
            for d in disks:
                _check_disk(d.path)

        return self._run_backup(
            vmid,
            VmType.QEMU,
            start_time,
            notes,
            protected,
            lambda p, report, outcome: self._backup_vm_body(
                p, vmid, disks, config, firewall, bandwidth_limit, mechanism, report, outcome
            ),
            prepare,
        )

    def _run_backup(
        self,
        vmid: int,
        vmtype: VmType,
        start_time: int | None,
        notes: str | None,
        protected: bool,
        body: Callable[[BackupProvider, BackupReport, _Outcome], None],
        prepare: Callable[[], None] = lambda: None,
    ) -> BackupReport:
        """The hypervisor's frame around one guest's backup: job and backup init,
        the guest-type specific `body`, then -- still under the provider's
        guest lock -- what the guest needs once its data is stored (the VM's
        bitmaps advance), attributes, cleanup with success or with the error,
        the task log, job cleanup.  A failing backup_init still gets the
        cleanup with the error and the task log, as the hypervisor does."""
        start = int(time.time()) if start_time is None else start_time
        began = time.monotonic()
        p = self.provider
        own_job = not self._job
        first_line = len(self.log.lines)
        try:
            if own_job:
                p.job_init(start)  # failed, it is still followed by job_cleanup (vzdump)
            try:
                prepare()  # the guest's checks: failed, the provider hears of it too
                with timings.phase("backup init (store lock, partial dir)"):
                    archive = p.backup_init(vmid, vmtype, start)["archive-name"]
            except BaseException as exc:  # as the hypervisor: cleanup and the log, even so
                self.log("err", f"backup of guest {vmid} failed: {_describe(exc)}")
                with contextlib.suppress(Exception):
                    p.backup_cleanup(vmid, vmtype, False, {"error": _describe(exc)})
                with contextlib.suppress(Exception):
                    self._hand_over_log(p, vmid, first_line)
                raise
            volid = f"{self.storeid}:backup/{archive}"
            report = BackupReport(volid, archive, 0.0)
            outcome = _Outcome()
            ok = stored = False
            try:
                body(p, report, outcome)
                with timings.phase("bitmaps advance"):
                    outcome.stored()
                stored = True
                self._set_attributes(volid, notes, protected)
                with timings.phase("backup cleanup"):
                    stats = p.backup_cleanup(vmid, vmtype, True, {})
                report.archive_size = int((stats or {}).get("stats", {}).get("archive-size", 0))
                ok = True
            except BaseException as exc:
                if not stored:
                    outcome.failed()
                if not ok:
                    with contextlib.suppress(Exception):
                        p.backup_cleanup(vmid, vmtype, False, {"error": _describe(exc)})
                raise
            finally:
                report.seconds = time.monotonic() - began
                report.log_lines = self.log.lines[first_line:]
                self._hand_over_log(p, vmid, first_line)
            return report
        finally:
            if own_job:
                p.job_cleanup()

    def _backup_vm_body(
        self,
        p: BackupProvider,
        vmid: int,
        disks: Sequence[Disk],
        config: str,
        firewall: str | None,
        bwlimit: int,
        mechanism_override: str | None,
        report: BackupReport,
        outcome: _Outcome,
    ) -> None:
        marks = bitmaps.Bitmaps(p, self.storeid, vmid, self.log)
        # backup_vm returned: the bitmaps advance (while the provider still
        # holds the guest's lock, so a second backup waiting for it finds them
        # advanced); before that, a failure drops the bitmaps made for this one
        outcome.stored = lambda: self._advance_bitmaps(marks)
        outcome.failed = marks.drop
        with contextlib.ExitStack() as outer:
            self._traces = Path(outer.enter_context(_private_dir())) if self.check_reads else None
            sizes = self._backup_vm_exports(
                p, vmid, disks, config, firewall, bwlimit, mechanism_override, report, marks
            )
            if self._traces is not None:  # the servers are stopped: their traces are complete
                self._check_reads(self._traces, disks, marks)
        _check_sizes(disks, sizes)

    def _backup_vm_exports(
        self,
        p: BackupProvider,
        vmid: int,
        disks: Sequence[Disk],
        config: str,
        firewall: str | None,
        bwlimit: int,
        mechanism_override: str | None,
        report: BackupReport,
        marks: bitmaps.Bitmaps,
    ) -> dict[str, dict[str, int]]:
        """Bitmap modes, the snapshot access, backup_vm; every export stopped
        on return.  The disks' sizes as the provider was told them."""
        with contextlib.ExitStack() as stack:
            mechanism = mechanism_override or p.backup_get_mechanism(vmid, VmType.QEMU)
            if mechanism not in ("nbd", "file-handle"):
                raise HostError(f"provider chose unknown VM mechanism {mechanism!r}")
            with timings.phase("disk sizes and bitmaps"):
                sizes = {d.device: {"size": _disk_size(d.path)} for d in disks}
                formats = {d.device: d.format for d in disks}
                query = {
                    d.device: {**sizes[d.device], **marks.query_facts(d.path, formats[d.device])}
                    for d in disks
                }
                try:
                    choices = check_incremental_answer(
                        p.backup_vm_query_incremental(vmid, query), query
                    )
                except ValueError as exc:
                    raise HostError(str(exc)) from None
                disks_in = [(d.device, d.path, formats[d.device]) for d in disks]
                modes = marks.prepare(disks_in, choices)
            report.bitmap_modes = {dev: str(m) for dev, m in modes.items()}
            rundir = Path(stack.enter_context(_private_dir()))
            with timings.phase("snapshot access"):
                volumes = self._snapshot_access(stack, rundir, disks, marks, sizes, mechanism)
            info: dict[str, Any] = {"bandwidth-limit": bwlimit}
            if firewall is not None:
                info["firewall-config"] = firewall
            config = drivemap.with_map(
                config, drivemap.mappings([(d.device, formats[d.device]) for d in disks])
            )
            p.backup_vm(vmid, config, volumes, info)
        return sizes

    def _trace_args(self, index: int) -> list[str]:
        """qemu-nbd options for disk `index`'s request trace, with check_reads."""
        if self._traces is None:
            return []
        return readcheck.trace_args(self._traces / f"disk{index}.trace")

    def _check_reads(self, traces: Path, disks: Sequence[Disk], marks: bitmaps.Bitmaps) -> None:
        """With check_reads: no read of a disk read through its bitmap lies
        outside the bitmap's dirty extents (readcheck.py), else the backup
        is void."""
        for i, d in enumerate(disks):
            name = marks.reading(d.device)
            if name is None:
                continue  # no bitmap reused: the whole disk may be read
            fd = os.open(d.path, os.O_RDONLY)
            try:
                dirty = qcow2bitmaps.dirty_extents(fd, qcow2.read_header(d.path, fd), name)
            finally:
                os.close(fd)
            bad = readcheck.first_outside(readcheck.reads(traces / f"disk{i}.trace"), dirty)
            if bad is not None:
                raise HostError(
                    f"{d.device}: the provider read {bad[1]} bytes at offset {bad[0]}, outside "
                    f"the dirty areas of bitmap {name}; the hypervisor refuses such reads "
                    "(the backup is void)"
                )

    def _set_attributes(self, volid: str, notes: str | None, protected: bool) -> None:
        if notes:
            try:
                self.storage.update_volume_attribute(volid, "notes", notes)
            except DirbackupError as exc:
                self.log("warn", f"could not set notes: {exc}")
        if protected:
            self.storage.update_volume_attribute(volid, "protected", 1)

    def _hand_over_log(self, p: BackupProvider, vmid: int, first_line: int = 0) -> None:
        """The guest's task log: the lines since its backup began."""
        with tempfile.NamedTemporaryFile("w", suffix=".log", delete=False) as f:
            name = f.name
        try:
            self.log.write(Path(name), first_line)
            p.backup_handle_log_file(vmid, name)
        except (DirbackupError, OSError) as exc:  # the backup stands or falls without it
            if self.log.forward:
                self.log.forward("warn", f"could not store the task log: {exc}")
        finally:
            os.unlink(name)

    # -- bitmaps

    def _advance_bitmaps(self, marks: bitmaps.Bitmaps) -> None:
        """After backup_vm returned: the bitmaps start the new generation."""
        marks.advance()

    # -- snapshot access

    def _snapshot_access(
        self,
        stack: contextlib.ExitStack,
        rundir: Path,
        disks: Sequence[Disk],
        marks: bitmaps.Bitmaps,
        sizes: Mapping[str, Mapping[str, int]],
        mechanism: str,
    ) -> dict[str, dict[str, Any]]:
        volumes: dict[str, dict[str, Any]] = {}
        socket = rundir / "nbd.sock"
        for i, d in enumerate(disks):
            mode = marks.disks[d.device].mode
            name = marks.reading(d.device)
            sock = socket if mechanism == "nbd" and len(disks) == 1 else rundir / f"nbd{i}.sock"
            server = qemu.start_nbd(
                d.path,
                str(sock),
                export=d.device,
                fmt=d.format,
                readonly=True,
                bitmap=name if mode == BitmapMode.REUSE else None,
                extra=self._trace_args(i),  # check_reads (readcheck.py)
            )
            stack.callback(server.stop)
            vol: dict[str, Any] = {"size": sizes[d.device]["size"], "bitmap-mode": str(mode)}
            if mechanism == "nbd":
                vol["nbd-path"] = str(sock)
                if mode != BitmapMode.NONE:  # also for `new`, as PVE (see Bitmaps.passed_name)
                    vol["bitmap-name"] = marks.passed_name(d.device)
                # the provider may read the image itself (api.DIRECT_KEY); the
                # read-only export above still holds QEMU's lock and is the
                # fallback.  (file-handle is the hypervisor's other path, kept
                # as it is for those who choose it.)
                vol[DIRECT_KEY] = {
                    "path": os.path.abspath(d.path),
                    "format": d.format,
                    "bitmap": vol.get("bitmap-name") if mode == BitmapMode.REUSE else None,
                }
            else:
                mount = rundir / f"fuse{i}"
                mount.mkdir()
                fuse = qemu.start_nbdfuse(mount, d.device, server.uri)
                stack.callback(fuse.stop)
                fd = _open_direct(fuse.path)
                stack.callback(os.close, fd)
                vol["file-handle"] = fd
                vol["next-dirty-region"] = dirtyregions.next_dirty_region(
                    server.uri,
                    name if mode == BitmapMode.REUSE else None,
                    vol["size"],
                    self.io_timeout,
                )
            volumes[d.device] = vol
        return volumes

    # ------------------------------------------------------------------ container backup

    def backup_container(
        self,
        vmid: int,
        rootfs: Path,
        *,
        config: str = "",
        firewall: str | None = None,
        exclude: Sequence[str] = (),
        bandwidth_limit: int = 0,
        notes: str | None = None,
        protected: bool = False,
        start_time: int | None = None,
    ) -> BackupReport:
        """Back up a directory holding a container's root file system."""
        rootfs = Path(rootfs)

        def prepare() -> None:
            if not rootfs.is_dir():
                raise HostError(f"container root {rootfs} does not exist or is not a directory")

        def body(p: BackupProvider, report: BackupReport, outcome: _Outcome) -> None:
            mechanism = p.backup_get_mechanism(vmid, VmType.LXC)
            if mechanism != "directory":
                raise HostError(f"provider chose unknown container mechanism {mechanism!r}")
            info: dict[str, Any] = {
                "directory": str(rootfs),
                "sources": ["."],
                "backup-user-id": os.geteuid(),
                "bandwidth-limit": bandwidth_limit,
            }
            if firewall is not None:
                info["firewall-config"] = firewall
            p.backup_container_prepare(vmid, info)

            def child(log: LogFunction) -> None:  # in a forked child, as the hypervisor
                self.log.redirect = log  # (the child's copy of the task log)
                p.backup_container(vmid, config, list(exclude), info)

            toolrun.run_forked(child, self.log)

        return self._run_backup(vmid, VmType.LXC, start_time, notes, protected, body, prepare)

    # ------------------------------------------------------------------ restore

    def restore_vm(
        self,
        volid: str,
        targets: Mapping[str, Path],
        *,
        target_format: str = "raw",
        engine: RestoreEngine = RestoreEngine.OURS,
        force: bool = False,
    ) -> RestoreReport:
        """Restore disks of a VM backup into files or block devices.

        A target that exists is only overwritten with `force`; a missing file
        is created with the disk's size.  `target_format` is raw or qcow2."""
        p = self.provider
        volname = volid.split(":", 1)[1] if ":" in volid else volid
        began = time.monotonic()
        mechanism, vmtype = p.restore_get_mechanism(volname)
        if vmtype != VmType.QEMU or mechanism != "qemu-img":
            raise HostError(f"{volid} is not a VM backup")
        sizes = p.restore_vm_init(volname)
        report = RestoreReport(volid, 0.0)
        try:
            targets = _by_device(targets, self._drive_map(p, volname, volid, sizes))
            unknown = sorted(set(targets) - set(sizes))
            if unknown:
                raise HostError(
                    f"backup {volid} has no disk {', '.join(unknown)} "
                    f"(it has: {', '.join(sorted(sizes)) or 'none'})"
                )
            restore_target.check(
                {d: (Path(t), int(sizes[d]["size"])) for d, t in targets.items()},
                target_format,
                force,
                self._store_root(),
            )
            for device, target in targets.items():
                report.devices[device] = self._restore_disk(
                    p,
                    volname,
                    device,
                    int(sizes[device]["size"]),
                    Path(target),
                    target_format,
                    engine,
                    force,
                )
        finally:
            p.restore_vm_cleanup(volname)
        report.seconds = time.monotonic() - began
        return report

    def _drive_map(
        self, p: BackupProvider, volname: str, volid: str, sizes: Mapping[str, Any]
    ) -> dict[str, str]:
        """{drive key: device} from the guest config's `#qmdump#map:` lines,
        each checked against the disks the backup holds (as the hypervisor's
        restore refuses a map line without data).  A backup without a guest
        config (or one that cannot be read: logged), or with no map lines,
        maps nothing."""
        try:
            config = p.archive_get_guest_config(volname)
        except DirbackupError:  # none kept (or refused by the store): the disks stand alone
            return {}
        except OSError as exc:
            self.log("warn", f"{volid}: guest config not readable ({exc}); no drive map")
            return {}
        mapping = {}
        for m in drivemap.parse(config):
            if m.device not in sizes:
                raise HostError(
                    f"backup {volid}: its guest config maps {m.virtdev} to {m.device}, "
                    f"but the backup holds no disk {m.device} "
                    f"(it has: {', '.join(sorted(sizes)) or 'none'})"
                )
            mapping[m.virtdev] = m.device
        return mapping

    def _store_root(self) -> Path | None:
        """The store's directory, when the storage has one (ours has)."""
        store = getattr(self.storage, "store", None)
        root = getattr(store, "root", None)
        return Path(root) if root is not None else None

    def _restore_disk(
        self,
        p: BackupProvider,
        volname: str,
        device: str,
        size: int,
        target: Path,
        target_format: str,
        engine: RestoreEngine,
        force: bool,
    ) -> copy.CopyStats | None:
        progress = None
        if self.progress is not None:
            report = self.progress

            def progress(stats: copy.CopyStats) -> None:
                report(device, stats)

        if engine == RestoreEngine.OURS and isinstance(p, ChainAccess):
            with timings.phase("open and validate chain"):
                opened = p.open_chain(volname, device)
            with opened as chain:
                if chain.unchecked:
                    names = ", ".join(Path(chain.paths[i]).parent.name for i in chain.unchecked)
                    self.log(
                        "warn",
                        f"{device}: {names} recorded no digests (written without a manifest): "
                        "their data is restored unchecked",
                    )
                with timings.phase("restore copy (incl. fsync, rename)"):
                    return restore_target.write(
                        target,
                        size,
                        target_format,
                        lambda t: qcow2.restore(chain, t, progress=progress),
                        chain.min_cluster_size,
                    )
        path = p.restore_vm_volume_init(volname, device, {})["qemu-img-path"]
        try:
            if engine == RestoreEngine.QEMU_IMG:
                restore_target.qemu_img_convert(path, target, size, target_format)
                return None
            fd = os.open(path, os.O_RDONLY)
            try:
                source = copy.FileSource(fd, path)
                whole = extents.from_pairs([(0, size)])
                return restore_target.write(
                    target,
                    size,
                    target_format,
                    lambda t: copy.copy_regions(source, t, whole, progress=progress),
                )
            finally:
                os.close(fd)
        finally:
            p.restore_vm_volume_cleanup(volname, device, {})

    def restore_container(self, volid: str, target: Path, *, force: bool = False) -> float:
        """Restore a container backup into a directory (extracted tar, or the
        squashfs image's tree copied with owners, modes and xattrs).

        A non-empty target needs `force`; it then holds exactly the backed-up
        tree.  The tree is built beside the target and swapped in only when
        complete (treeswap): a failed restore leaves the old tree."""
        from dirbackup import container, treeswap

        p = self.provider
        volname = volid.split(":", 1)[1] if ":" in volid else volid
        began = time.monotonic()
        mechanism, vmtype = p.restore_get_mechanism(volname)
        if vmtype != VmType.LXC:
            raise HostError(f"{volid} is not a container backup")
        target = Path(target)
        restore_target.check_directory(target, force)
        info = p.restore_container_init(volname, {})
        try:
            if mechanism == "tar":
                tar = Path(info["tar-path"])
                treeswap.replace_tree(target, lambda d: container.extract_tar(tar, d, log=self.log))
            else:
                tree = Path(info["archive-directory"])
                treeswap.replace_tree(target, lambda d: container.copy_tree(tree, d, log=self.log))
        finally:
            p.restore_container_cleanup(volname, {})
        return time.monotonic() - began


# ---------------------------------------------------------------------- helpers


def _describe(exc: BaseException) -> str:
    if isinstance(exc, Terminated):
        return "terminated (SIGTERM)"
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    return str(exc) or type(exc).__name__


def _by_device(targets: Mapping[str, Path], mapping: Mapping[str, str]) -> dict[str, Path]:
    """Restore targets keyed by device, where the caller may name a disk by
    its device (`drive-scsi0`) or by its drive key from the map (`scsi0`)."""
    out: dict[str, Path] = {}
    for key, target in targets.items():
        device = key if key not in mapping or key in mapping.values() else mapping[key]
        if device in out:
            raise HostError(f"disk {device} is given twice (as {key} and by its other name)")
        out[device] = target
    return out


def duplicate_disks(disks: Sequence[Disk]) -> str | None:
    """The first device given twice, or image given for two devices (one
    image, one bitmap chain: the same file by st_dev/st_ino, so also through a
    symlink or a hard link), as one line; None if there is none.  A path that
    cannot be examined is left to the backup's own checks."""
    devices: set[str] = set()
    images: dict[tuple[int, int], Disk] = {}
    for d in disks:
        if d.device in devices:
            return f"device {d.device} given twice"
        devices.add(d.device)
        try:
            st = os.stat(d.path)
        except OSError:
            continue
        other = images.setdefault((st.st_dev, st.st_ino), d)
        if other.device != d.device:
            same = "" if str(other.path) == str(d.path) else f" (the same image as {other.path})"
            return f"{d.path}{same} is given as both {other.device} and {d.device}"
    return None


def _check_disk(path: Path) -> None:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise HostError(f"disk image {path} does not exist") from None
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise HostError(f"{path} is neither an image file nor a block device")


def _check_sizes(disks: Sequence[Disk], sizes: Mapping[str, Mapping[str, int]]) -> None:
    """A disk whose size changed while it was read was being written: QEMU
    reads a raw file cut short as zeros.  Such a backup is void."""
    for d in disks:
        now = _disk_size(d.path)
        if now != sizes[d.device]["size"]:
            raise HostError(
                f"{d.device}: {d.path} changed size during the backup "
                f"({sizes[d.device]['size']} -> {now} bytes); the backup is void"
            )


def _disk_size(path: Path) -> int:
    """The guest's disk size: a raw file's or device's size, a qcow2 image's
    virtual size from its header, as QEMU reads it (whole 512-byte sectors),
    without a `qemu-img info` process for it (taken before and after every
    backup; what else is wrong with the image the export's start finds)."""
    with open(path, "rb") as f:
        head = f.read(32)
    if head[:4] != qcow2.MAGIC:
        return restore_target.raw_size(path)
    if len(head) < 32:
        raise HostError(f"{path}: not a qcow2 image (its header is cut short)")
    return int.from_bytes(head[24:32], "big") // 512 * 512


@contextlib.contextmanager
def _private_dir() -> Iterator[str]:
    path = qemu.make_rundir("host-")
    try:
        yield str(path)
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _open_direct(path: Path) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        return os.open(path, os.O_RDONLY)  # FUSE without direct I/O support
