"""The restore side of DirectoryBackupProvider: the backups of a store
served to the hypervisor.

Restores serve a chain only after validating it (qcow2 only, inside the
guest's directory, no protocol names, no cycles) and hand QEMU the layers
explicitly; `open_chain` gives every layer the digests its backup recorded,
so a reader checks each layer as it copies, and what qemu-img reads
(`qemu-img-path`) is checked against every layer's digests first.  A layer
that fails its check marks its backup (Store.mark_check_failed): no
incremental builds on it until a verify of it succeeds.  Container backups
are served as their tar archive or a read-only mount of their squashfs image.

DirectoryBackupProvider (provider.py) adds the backup side; this class holds
what only a restore needs.
"""

from __future__ import annotations

import functools
import os
import shutil
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from dirbackup import qcow2, qemu, verify
from dirbackup.api import BackupProvider, RestoreMechanism
from dirbackup.errors import DirbackupError, IntegrityError, StoreError
from dirbackup.manifest import DiskRecord, Manifest
from dirbackup.store import Backup, BackupId, Store, VmType, check_device_name


@dataclass
class _VolumeRestore:
    """The processes serving one disk of a restore."""

    rundir: Path
    server: qemu.NbdServer | None = None
    fuse: qemu.FuseFile | None = None
    mountpoint: Path | None = None


class RestoringProvider(BackupProvider):
    """The restore methods of the provider API over a dirbackup store."""

    store: Store
    _restores: dict[tuple[str, str], _VolumeRestore]
    _mounts: dict[str, tuple[Any, Path]]

    # ------------------------------------------------------------------ restore

    def _backup(self, volname: str) -> Backup:
        return self.store.backup(self.storage_plugin.backup_id(volname))

    def restore_get_mechanism(self, volname: str, *storeid: str) -> tuple[str, str]:
        backup = self._backup(volname)
        bid = backup.id
        if bid.vmtype == VmType.QEMU:
            return RestoreMechanism.QEMU_IMG.value, bid.vmtype.value
        archive = backup.archive()
        if archive is not None and archive[0] == "tar":
            return RestoreMechanism.TAR.value, bid.vmtype.value
        if archive is not None:
            return RestoreMechanism.DIRECTORY.value, bid.vmtype.value
        raise StoreError(f"backup {bid.archive} holds no container archive")

    def archive_get_guest_config(self, volname: str, *storeid: str) -> str:
        backup = self._backup(volname)
        config = backup.guest_config()
        if config is None:
            raise StoreError(f"backup {backup.id.archive} has no guest configuration")
        return config

    def archive_get_firewall_config(self, volname: str, *storeid: str) -> str | None:
        return self._backup(volname).firewall_config()

    def restore_vm_init(self, volname: str, *storeid: str) -> dict[str, dict[str, int]]:
        backup = self._backup(volname)
        manifest = self.store.read_manifest(backup.id)
        if manifest is not None:
            return {dev: {"size": d.size} for dev, d in sorted(manifest.disks.items())}
        out = {}
        for device, image in backup.seed_images().items():
            out[device] = {"size": qcow2.read_header(image).virtual_size}
        return out

    def open_chain(self, volname: str, device: str) -> qcow2.Chain:
        """The validated qcow2 chain of one disk of a backup, with the digests
        each layer's backup recorded (`Chain.expect`), so that a restore checks
        every layer as it copies.

        Nothing outside the guest's directory is ever opened, and each backing
        file must be the image of the disk in the backup its layer's manifest
        names as parent (a backing name changed to point at another backup is
        refused).  Layers of backups without a manifest (the seed's layout)
        have no digests: `Chain.unchecked` lists them."""
        backup = self._backup(volname)
        bid = backup.id
        manifest = self.store.read_manifest(bid)
        check_device_name(device)
        if manifest is not None:
            image = backup.image_path(device, self._disk_record(bid, manifest, device))
        else:
            image = backup.image_path(device)
            if not image.exists():
                raise StoreError(f"backup {bid.archive} has no disk {device!r}")
        chain = qcow2.Chain(image, self.store.guest_dir(bid.vmid))
        try:
            self._expect_layers(chain, bid, manifest, device)
        except BaseException:
            chain.close()
            raise
        return chain

    def _disk_record(self, bid: BackupId, manifest: Manifest, device: str) -> DiskRecord:
        if device not in manifest.disks:
            raise StoreError(
                f"backup {bid.archive} has no disk {device!r} "
                f"(it has: {', '.join(sorted(manifest.disks)) or 'none'})"
            )
        record = manifest.disks[device]
        if Path(record.file).name != record.file or record.file in ("", ".", ".."):
            raise StoreError(f"backup {bid.archive}: its manifest names {record.file!r}; refused")
        return record

    def _expect_layers(
        self, chain: qcow2.Chain, bid: BackupId, manifest: Manifest | None, device: str
    ) -> None:
        """Walk the chain with the backups it belongs to: layer i is the image
        of `device` in backup `bid`, whose manifest names the backup of layer
        i + 1 (a backup without a manifest is named by its directory)."""
        gdir = os.path.realpath(self.store.guest_dir(bid.vmid))
        for i, layer in enumerate(chain.paths):
            label = f"backup {bid.volid(self.storeid)} {device}"
            last = i + 1 == chain.depth
            if manifest is None:
                if last:
                    return
                bid = self._seed_parent(chain.paths[i + 1], gdir, bid, label)
                manifest = self.store.read_manifest(bid)
                continue
            record = self._disk_record(bid, manifest, device)
            if layer != os.path.join(gdir, bid.name, record.file):
                raise self._mismatch(
                    bid, f"{label}: {layer} is not the image its manifest names; refused"
                )
            if qcow2.virtual_size_for(record.size) != chain.virtual_size:
                raise self._mismatch(
                    bid,
                    f"{label}: virtual size {chain.virtual_size} differs from the "
                    f"{record.size} bytes the backup's manifest records; refused",
                )
            sums = _sums(record, chain.headers[i].cluster_size, label)
            chain.expect(
                i,
                qcow2.LayerDigests(
                    label, record.digest_chunk, sums, functools.partial(self._mark_failed, bid)
                ),
            )
            if record.parent is None:
                if not last:
                    raise self._mismatch(
                        bid,
                        f"{label}: the image has a backing file, but the manifest records no "
                        "parent backup; refused",
                    )
                return
            if last:
                raise self._mismatch(
                    bid,
                    f"{label}: the manifest names the parent {record.parent}, but the image has "
                    "no backing file; refused",
                )
            try:
                parent = BackupId.parse(record.parent)
            except DirbackupError:
                raise self._mismatch(
                    bid, f"{label}: the manifest names no valid parent; refused"
                ) from None
            if (parent.vmid, parent.vmtype) != (bid.vmid, bid.vmtype) or not self.store.exists(
                parent
            ):
                raise self._mismatch(
                    bid, f"{label}: parent {record.parent} is not a backup here; refused"
                )
            if os.path.dirname(chain.paths[i + 1]) != os.path.join(gdir, parent.name):
                raise self._mismatch(
                    bid,
                    f"{label}: the backing file {chain.headers[i].backing_name!r} does not lie "
                    f"in {parent.volname}, the parent its manifest names; refused",
                )
            bid, manifest = parent, self.store.read_manifest(parent)

    def _mark_failed(self, bid: BackupId, reason: str) -> None:
        """Record a failed check of a backup's data (no incremental builds on it)."""
        try:
            self.store.mark_check_failed(bid, reason)
        except (DirbackupError, OSError) as exc:
            self.log("warn", f"could not record the failed check of {bid.volname}: {exc}")

    def _mismatch(self, bid: BackupId, message: str) -> IntegrityError:
        """A chain that is not what its manifests describe: recorded, refused."""
        self._mark_failed(bid, message)
        return IntegrityError(message)

    def _seed_parent(self, backing: str, gdir: str, bid: BackupId, label: str) -> BackupId:
        """The backup a backing file of the seed's layout lies in."""
        where = os.path.dirname(backing)
        try:
            parent = BackupId.parse(f"{bid.vmid}/{os.path.basename(where)}")
        except DirbackupError:
            parent = None
        if (
            parent is None
            or os.path.dirname(where) != gdir
            or parent.vmtype != bid.vmtype
            or not self.store.exists(parent)
        ):
            raise StoreError(f"{label}: the backing file {backing} lies in no backup; refused")
        return parent

    def restore_vm_volume_init(
        self, volname: str, device_name: str, info: Mapping[str, Any] | None = None
    ) -> dict[str, str]:
        key = (volname, device_name)
        if key in self._restores:
            raise StoreError(f"{device_name} of {volname} is already being restored")
        rundir = qemu.make_rundir("dirbackup-")
        job = _VolumeRestore(rundir)
        self._restores[key] = job
        try:
            job.server = self.serve_checked(volname, device_name, str(rundir / "nbd.sock"))
            job.mountpoint = rundir / "fuse"
            job.mountpoint.mkdir()
            job.fuse = qemu.start_nbdfuse(job.mountpoint, device_name, job.server.uri)
        except BaseException:
            self.restore_vm_volume_cleanup(volname, device_name, info)
            raise
        return {"qemu-img-path": str(job.fuse.path)}

    def serve_checked(
        self,
        volname: str,
        device: str,
        socket: str,
        *,
        shared: int = 4,
        persistent: bool = True,
        detached: bool = False,
    ) -> qemu.NbdServer:
        """A read-only NBD export (named `device`, on `socket`) of one disk of
        a backup, served only once its chain is validated and every layer's
        data checked against its digests (one read): what QEMU reads from it
        is checked.  The qemu-img restore and `dirbackup map` serve this."""
        with self.open_chain(volname, device) as chain:
            chain.map()  # every table checked: QEMU would read what lies as zeros
            # qemu-img checks nothing: every layer's data is checked first (one read)
            bid = self.storage_plugin.backup_id(volname)
            for path in verify.require_chain(verify.Checker(self.store), chain, bid, device):
                self.log("warn", f"{path} has no digests (made without a manifest); not checked")
            return qemu.start_nbd(
                None,
                socket,
                export=device,
                fmt=None,
                image_opts=chain.image_opts(),
                shared=shared,
                persistent=persistent,
                detached=detached,
            )

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
        backup = self._backup(volname)
        found = backup.archive()
        if mechanism not in (RestoreMechanism.TAR, RestoreMechanism.DIRECTORY) or found is None:
            raise StoreError(f"backup {backup.id.archive} is not a container backup")
        archive = found[1]
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
            mount = container.SquashfsMount(archive, mountpoint)
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


def _sums(record: DiskRecord, cluster_size: int, label: str) -> npt.NDArray[np.uint64]:
    """The manifest's sparse digests of a disk as one sum per chunk."""
    chunk = record.digest_chunk
    if (
        not isinstance(chunk, int)
        or chunk <= 0
        or chunk % cluster_size
        or not isinstance(record.digests, dict)
    ):
        raise StoreError(f"{label}: the manifest's digests are damaged; refused")
    sums = np.zeros(-(-record.size // chunk), dtype=np.uint64)
    for key, value in record.digests.items():
        try:
            index, total = int(key), int(value, 16)
        except (TypeError, ValueError):
            index, total = -1, -1
        if not 0 <= index < sums.size or not 0 <= total < 1 << 64:
            raise StoreError(f"{label}: the manifest's digests are damaged; refused")
        sums[index] = total
    return sums
