"""The hypervisor's backup provider API, as a Python base class.

Method names and argument order are those of Proxmox VE's
`PVE::BackupProvider::Plugin::Base` (storage plugin API 11+).  Where the
hypervisor passes hashes, the methods accept either such a mapping (with the
hypervisor's key names: 'bitmap-mode', 'nbd-path', ...) or the typed
dataclasses below, so integrators can drive a provider from Python without
building Perl-shaped dictionaries, and a host written for the hypervisor's
shapes keeps working.

Call order for a VM backup (the hypervisor's, which `dirbackup.host` plays):
job_init -> backup_init -> backup_get_mechanism -> backup_vm_query_incremental
-> backup_vm -> backup_cleanup(success) -> backup_handle_log_file ->
job_cleanup.  A container backup calls backup_container_prepare and
backup_container instead of the two VM steps.  On any failure after
backup_init the hypervisor calls backup_cleanup(success=False, {'error': msg}).
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from dirbackup.qcow2 import Chain

__all__ = [
    "BACKING_KEY",
    "BITMAPS_KEY",
    "DIRECT_KEY",
    "VM_MECHANISMS",
    "BackupInfo",
    "BackupProvider",
    "BitmapGenerations",
    "BitmapMode",
    "ChainAccess",
    "ContainerInfo",
    "DirectSource",
    "IncrementalChoice",
    "LogFunction",
    "Mechanism",
    "RestoreMechanism",
    "VmType",
    "VolumeInfo",
    "check_incremental_answer",
]

LogFunction = Callable[[str, str], None]
"""log(level, message) with level 'info', 'warn' or 'err'."""


class VmType(StrEnum):
    """Guest types, as the hypervisor names them and as they appear in backup names."""

    QEMU = "qemu"
    LXC = "lxc"


class Mechanism(StrEnum):
    """How the provider gets at a guest's data during backup."""

    NBD = "nbd"
    FILE_HANDLE = "file-handle"
    DIRECTORY = "directory"


#: The mechanisms a VM backup can use (the storage's `vm-backup-mechanism`);
#: `directory` is the containers' one.
VM_MECHANISMS = (Mechanism.NBD, Mechanism.FILE_HANDLE)


class BitmapMode(StrEnum):
    """What the hypervisor did with a disk's dirty bitmap for this backup.

    none: no bitmap, read everything; new: a bitmap was (re)created, read
    everything; reuse: the bitmap holds the changes since the last successful
    backup, read only its dirty parts."""

    NONE = "none"
    NEW = "new"
    REUSE = "reuse"


class IncrementalChoice(StrEnum):
    """The provider's answer per device in backup_vm_query_incremental."""

    NEW = "new"
    USE = "use"


INCREMENTAL_ANSWERS = ("new", "use", "none")
"""What the hypervisor accepts per device from backup_vm_query_incremental:
IncrementalChoice, or `none` (no bitmap, as a device left out)."""


def check_incremental_answer(answer: Any, devices: Iterable[str]) -> dict[str, str]:
    """The answer of backup_vm_query_incremental as the hypervisor checks it:
    nothing (None or empty: no bitmaps), or a mapping of devices to `new`,
    `use` or `none`.  Anything else is an error, never a silent `none`; a
    device that is not one of `devices` is an error too (a provider that
    names disks the host did not ask about has its wires crossed)."""
    if answer is None:
        return {}
    if not isinstance(answer, Mapping):
        raise ValueError(
            f"backup_vm_query_incremental returned {type(answer).__name__}, not a hash"
        )
    known = set(devices)
    out = {}
    for device, mode in answer.items():
        if device not in known:
            raise ValueError(f"backup_vm_query_incremental answered for unknown device {device!r}")
        if not isinstance(mode, str) or mode not in INCREMENTAL_ANSWERS:
            raise ValueError(
                f"invalid incremental mode {mode!r} for {device} returned by the backup provider"
            )
        out[str(device)] = str(mode)
    return out


class RestoreMechanism(StrEnum):
    QEMU_IMG = "qemu-img"
    TAR = "tar"
    DIRECTORY = "directory"


DirtyRegions = Callable[[], "tuple[int, int] | None"]


DIRECT_KEY = "dirbackup-direct"
"""Volume key of backup_vm (an extension: dirbackup's own host sets it for
local image files and block devices, the hypervisor never does): the disk as
a local file the provider may read itself, {'path': path of the image or
device, 'format': 'raw' or 'qcow2', 'bitmap': the name of the persistent
dirty bitmap in the qcow2 image that `nbd-path` exports for a 'reuse', or
None}.  The host passes `nbd-path` (or `file-handle`) exactly as without it
and keeps the read-only export running while backup_vm runs: the export
holds QEMU's image lock (a disk in use is refused before backup_vm), and it
is what a provider reads when it ignores this key or cannot read the image.
A provider that reads the file must only read it (never discard)."""


@dataclass(frozen=True)
class DirectSource:
    """The DIRECT_KEY of a volume: a local image the provider may read itself."""

    path: str
    format: str
    bitmap: str | None = None

    @classmethod
    def coerce(cls, value: DirectSource | Mapping[str, Any] | None) -> DirectSource | None:
        if value is None or isinstance(value, DirectSource):
            return value
        return cls(
            path=os.fspath(value["path"]),
            format=str(value.get("format") or "raw"),
            bitmap=value.get("bitmap"),
        )


@dataclass
class VolumeInfo:
    """One disk handed to backup_vm.

    For the `nbd` mechanism: `nbd_path` (Unix socket; the export name is the
    device name) and, with a bitmap, `bitmap_name` (read through the NBD meta
    context `qemu:dirty-bitmap:NAME`).  For `file-handle`: `file_handle` (a
    file descriptor or file object, possibly O_DIRECT) and `next_dirty_region`
    (returns (offset, length) per call, then None; (0, size) once without a
    bitmap).  `direct`: dirbackup's extension DIRECT_KEY, when the host sets it."""

    size: int
    bitmap_mode: BitmapMode = BitmapMode.NONE
    nbd_path: str | None = None
    bitmap_name: str | None = None
    file_handle: Any = None
    next_dirty_region: DirtyRegions | None = None
    direct: DirectSource | None = None

    @classmethod
    def coerce(cls, value: VolumeInfo | Mapping[str, Any]) -> VolumeInfo:
        """Accept the typed form or the hypervisor's hash."""
        if isinstance(value, VolumeInfo):
            return value
        return cls(
            size=int(value["size"]),
            bitmap_mode=BitmapMode(value.get("bitmap-mode") or BitmapMode.NONE),
            nbd_path=value.get("nbd-path"),
            bitmap_name=value.get("bitmap-name"),
            file_handle=value.get("file-handle"),
            next_dirty_region=value.get("next-dirty-region"),
            direct=DirectSource.coerce(value.get(DIRECT_KEY)),
        )

    def fileno(self) -> int:
        """The file descriptor of `file_handle`."""
        fh = self.file_handle
        return fh if isinstance(fh, int) else int(fh.fileno())

    def dirty_regions(self) -> Iterator[tuple[int, int]]:
        """Iterate `next_dirty_region` until it is exhausted."""
        if self.next_dirty_region is None:
            yield (0, self.size)
            return
        while (region := self.next_dirty_region()) is not None:
            yield region


@dataclass
class BackupInfo:
    """The `info` of backup_vm: bandwidth limit in bytes/s (0: none) and the
    guest's firewall configuration, if it has one."""

    bandwidth_limit: int = 0
    firewall_config: str | None = None

    @classmethod
    def coerce(cls, value: BackupInfo | Mapping[str, Any] | None) -> BackupInfo:
        if isinstance(value, BackupInfo):
            return value
        value = value or {}
        return cls(
            bandwidth_limit=int(value.get("bandwidth-limit") or 0),
            firewall_config=value.get("firewall-config"),
        )


@dataclass
class ContainerInfo:
    """The `info` of backup_container_prepare and backup_container."""

    directory: str
    sources: Sequence[str] = field(default_factory=lambda: ["."])
    backup_user_id: int = 0
    bandwidth_limit: int = 0
    firewall_config: str | None = None

    @classmethod
    def coerce(cls, value: ContainerInfo | Mapping[str, Any]) -> ContainerInfo:
        if isinstance(value, ContainerInfo):
            return value
        return cls(
            directory=os.fspath(value["directory"]),
            sources=list(value.get("sources") or ["."]),
            backup_user_id=int(value.get("backup-user-id") or 0),
            bandwidth_limit=int(value.get("bandwidth-limit") or 0),
            firewall_config=value.get("firewall-config"),
        )


class BackupProvider(ABC):
    """Base class of backup providers; subclasses implement every method.

    The constructor takes the storage plugin the provider belongs to, the
    storage's configuration, the storage id and the hypervisor's log function.
    """

    def __init__(
        self, storage_plugin: Any, scfg: Any, storeid: str, log: LogFunction | None = None
    ) -> None:
        self.storage_plugin = storage_plugin
        self.scfg = scfg
        self.storeid = storeid
        self.log_function: LogFunction = log or (lambda level, msg: None)

    def log(self, level: str, message: str) -> None:
        self.log_function(level, message)

    # -- job

    @abstractmethod
    def provider_name(self) -> str: ...

    @abstractmethod
    def job_init(self, start_time: int) -> None: ...

    @abstractmethod
    def job_cleanup(self) -> None: ...

    # -- backup

    @abstractmethod
    def backup_init(self, vmid: int, vmtype: str, start_time: int) -> dict[str, str]:
        """Return {'archive-name': ...}."""

    @abstractmethod
    def backup_cleanup(
        self, vmid: int, vmtype: str | None, success: bool, info: Mapping[str, Any] | None
    ) -> dict[str, Any]:
        """On success return {'stats': {'archive-size': bytes}}."""

    @abstractmethod
    def backup_get_mechanism(self, vmid: int, vmtype: str) -> str: ...

    @abstractmethod
    def backup_vm_query_incremental(
        self, vmid: int, volumes: Mapping[str, Mapping[str, Any]]
    ) -> dict[str, str]: ...

    @abstractmethod
    def backup_vm(
        self,
        vmid: int,
        guest_config: str,
        volumes: Mapping[str, VolumeInfo | Mapping[str, Any]],
        info: BackupInfo | Mapping[str, Any] | None,
    ) -> None: ...

    @abstractmethod
    def backup_container_prepare(
        self, vmid: int, info: ContainerInfo | Mapping[str, Any]
    ) -> None: ...

    @abstractmethod
    def backup_container(
        self,
        vmid: int,
        guest_config: str,
        exclude_patterns: Sequence[str],
        info: ContainerInfo | Mapping[str, Any],
    ) -> None: ...

    @abstractmethod
    def backup_handle_log_file(self, vmid: int, filename: str) -> None: ...

    # -- restore

    @abstractmethod
    def restore_get_mechanism(self, volname: str, *storeid: str) -> tuple[str, str]:
        """Return (mechanism, vmtype)."""

    @abstractmethod
    def archive_get_guest_config(self, volname: str, *storeid: str) -> str: ...

    @abstractmethod
    def archive_get_firewall_config(self, volname: str, *storeid: str) -> str | None: ...

    @abstractmethod
    def restore_vm_init(self, volname: str, *storeid: str) -> dict[str, dict[str, int]]:
        """Return {device: {'size': bytes}}."""

    @abstractmethod
    def restore_vm_cleanup(self, volname: str, *storeid: str) -> None: ...

    @abstractmethod
    def restore_vm_volume_init(
        self, volname: str, device_name: str, info: Mapping[str, Any] | None = None
    ) -> dict[str, str]:
        """Return {'qemu-img-path': path}."""

    @abstractmethod
    def restore_vm_volume_cleanup(
        self, volname: str, device_name: str, info: Mapping[str, Any] | None = None
    ) -> None: ...

    @abstractmethod
    def restore_container_init(self, volname: str, *args: Any) -> dict[str, str]:
        """Return {'tar-path': path} or {'archive-directory': path}."""

    @abstractmethod
    def restore_container_cleanup(self, volname: str, *args: Any) -> None: ...


@runtime_checkable
class ChainAccess(Protocol):
    """Optional for a provider (not part of the hypervisor's API): the validated
    qcow2 chain of one VM disk of a backup, each layer with the digests its
    backup recorded (`qcow2.Chain.expect`).  A host then restores with its own
    copy engine, which checks every chunk of every layer as it copies, rather
    than through `restore_vm_volume_init`'s `qemu-img-path`.  The caller closes
    the chain."""

    def open_chain(self, volname: str, device: str) -> Chain: ...


# ---------------------------------------------------------------------- extension

BITMAPS_KEY = "dirbackup-bitmaps"
"""Volume key of backup_vm_query_incremental (BitmapGenerations hosts only):
{bitmap name: state} for every bitmap of this store on the disk (names that
start with bitmap_prefix() + '-'), state 'usable' (enabled and consistent),
'disabled' or 'in-use' (left inconsistent by a writer that died)."""

BACKING_KEY = "dirbackup-backing"
"""Volume key of backup_vm_query_incremental (BitmapGenerations hosts only):
the identity of the disk below its top image, one mapping per backing layer
from the top down ({'path': real path, 'format', 'dev', 'ino', 'size',
'mtime_ns', 'ctime_ns'}); [] for a disk without a backing file; None when a
layer cannot be identified (not a local regular file)."""


@runtime_checkable
class BitmapGenerations(Protocol):
    """An optional extension of the API, offered by dirbackup's provider and
    used by dirbackup's own host: it proves that a disk's dirty bitmap holds
    every change since exactly the backup an incremental builds on.

    The hypervisor's API leaves the bitmap to the host (one bitmap per
    storage, whose name the provider never checks), so a bitmap cleared by a
    backup into another store, or under another device name, or a disk
    replaced under the same path, still looks usable.  With this extension
    each store names its bitmaps itself, and each successful backup starts a
    new generation:

    1. The host lists the bitmaps whose names start with bitmap_prefix() on
       each qcow2 disk and passes them, and the identity of the layers below
       the top image, in backup_vm_query_incremental (BITMAPS_KEY,
       BACKING_KEY).
    2. The provider answers 'use' only if expected_bitmap() is among them and
       usable, the identity and size are those recorded with the disk's last
       backup, and that backup can be built on; otherwise 'new', with a log
       line saying why.
    3. For 'use' the host exports expected_bitmap() as the bitmap to read.
    4. Once backup_vm returned, expected_bitmap() names the generation that
       starts with this backup: the host creates it from the bitmap it
       started at the snapshot point (`<prefix>.next`) and removes the old one.

    A host without the extension gets today's answers; a provider without it
    gets the host's single bitmap per storage."""

    def bitmap_prefix(self) -> str:
        """The prefix of this store's bitmap names (holds the store's
        identity): generations are `<prefix>-<token>`, the bitmap of a
        running backup `<prefix>.next`.  Bitmaps of other prefixes are not
        this store's and are left alone."""

    def expected_bitmap(self, vmid: int, device: str) -> str | None:
        """The exact bitmap an incremental of `device` must continue from (after
        backup_vm returned: the one starting with that backup), or None."""
