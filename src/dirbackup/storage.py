"""DirectoryStorage: the storage-plugin side of a dirbackup store.

The hypervisor sees a backup store through a storage plugin (type
`dirbackup`, plugin API 11+, feature `backup-provider`): it lists backups,
asks their sizes and parents, sets notes and protection, prunes with the
keep-last/hourly/daily/weekly/monthly/yearly rules and removes backups.  This
is the seed's `BackupProviderDirExamplePlugin` with its "a proper backup
storage should implement this" parts done: pruning and removal keep
incremental chains intact (a removed base is merged into its kept child
first), attributes are stored, and `verify` checks what was written.

This module is the adapter: the plugin's configuration and answers, volume
names, listing, attributes and the prune of a guest, calling out for the
rest -- removal with merge (removal.py), verify (verify.py), the store's
layout (store.py), the keep rules (prune.py).  It stays longer than most
because the plugin API is wide (some thirty methods, most a few lines) and
prune_backups, with its per-guest locking and error report, is one of them.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from dirbackup import compression, removal
from dirbackup.api import VM_MECHANISMS, LogFunction, Mechanism, VmType
from dirbackup.errors import DirbackupError, StoreError
from dirbackup.manifest import Manifest
from dirbackup.prune import KeepRules, Mark, PruneCandidate, mark
from dirbackup.store import (
    DEFAULT_LOCK_TIMEOUT,
    BackupEntry,
    BackupId,
    Store,
    StoreProblem,
    describe_error,
    future_horizon,
    split_volid,
)
from dirbackup.toolrun import call_in_child
from dirbackup.units import parse_seconds
from dirbackup.verify import Verifier, VerifyProgress, VerifyResult
from dirbackup.watchdog import DEFAULT_IO_TIMEOUT

PLUGIN_TYPE = "dirbackup"
PLUGIN_API = 11


class VmBackupMode(StrEnum):
    FULL = "full"
    INCREMENTAL = "incremental"


class LxcBackupMode(StrEnum):
    TAR = "tar"
    SQUASHFS = "squashfs"


class StorageOperationError(DirbackupError):
    """An operation a backup store cannot do (clone, allocate, resize, snapshot...)."""


def _vm_mechanism(value: str) -> Mechanism:
    if value not in VM_MECHANISMS:
        raise ValueError(f"{value!r} is not a valid vm-backup-mechanism")
    return Mechanism(value)


@dataclass(frozen=True)
class StorageConfig:
    """The storage's section of the hypervisor's storage.cfg (`scfg`).

    vm_backup_mechanism accepts the seed's name `block-device` for
    `file-handle`.  max_protected_backups < 0 means unlimited.  lock_timeout
    is how many seconds a backup, removal or prune waits for another one of
    the same guest; io_timeout how long a backup waits for a source that
    makes no progress (0: for ever)."""

    path: str
    vm_backup_mode: VmBackupMode = VmBackupMode.INCREMENTAL
    vm_backup_mechanism: Mechanism = Mechanism.NBD
    lxc_backup_mode: LxcBackupMode = LxcBackupMode.TAR
    prune_backups: KeepRules = field(default_factory=KeepRules)
    max_protected_backups: int = -1
    disable: bool = False
    nodes: tuple[str, ...] = ()
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT
    io_timeout: float = DEFAULT_IO_TIMEOUT
    compress: str = compression.DEFAULT_COMPRESS

    @classmethod
    def from_mapping(cls, scfg: Mapping[str, Any]) -> StorageConfig:
        """Build from a PVE-style hash (`{'path': ..., 'vm-backup-mode': ...}`),
        rejecting unknown options and values with a clear message."""
        known = {
            "path",
            "vm-backup-mode",
            "vm-backup-mechanism",
            "lxc-backup-mode",
            "prune-backups",
            "max-protected-backups",
            "lock-timeout",
            "io-timeout",
            "compress",
            "disable",
            "nodes",
            "type",
            "content",
            "shared",
        }
        unknown = set(scfg) - known
        if unknown:
            raise StoreError(f"unknown storage option(s): {', '.join(sorted(unknown))}")
        if not scfg.get("path"):
            raise StoreError("storage option 'path' is required")
        mechanism = str(scfg.get("vm-backup-mechanism", Mechanism.NBD))
        if mechanism == "block-device":
            mechanism = Mechanism.FILE_HANDLE
        try:
            prune = scfg.get("prune-backups", KeepRules())
            if isinstance(prune, str):
                prune = KeepRules.parse(prune)
            elif isinstance(prune, Mapping):
                prune = KeepRules.from_mapping(prune)
            nodes = scfg.get("nodes", ())
            if isinstance(nodes, str):
                nodes = tuple(n for n in nodes.split(",") if n)
            timeouts = {}
            for key, default in (
                ("lock-timeout", DEFAULT_LOCK_TIMEOUT),
                ("io-timeout", DEFAULT_IO_TIMEOUT),
            ):
                timeout = scfg.get(key, default)
                try:
                    timeouts[key] = parse_seconds(timeout)
                except ValueError:
                    raise ValueError(
                        f"{key} must be a number of seconds >= 0, not {timeout!r}"
                    ) from None
            compress = compression.normalize(
                str(scfg.get("compress", compression.DEFAULT_COMPRESS))
            )
            return cls(
                path=str(scfg["path"]),
                vm_backup_mode=VmBackupMode(scfg.get("vm-backup-mode", VmBackupMode.INCREMENTAL)),
                vm_backup_mechanism=_vm_mechanism(mechanism),
                lxc_backup_mode=LxcBackupMode(scfg.get("lxc-backup-mode", LxcBackupMode.TAR)),
                prune_backups=prune,
                max_protected_backups=int(scfg.get("max-protected-backups", -1)),
                disable=bool(int(scfg.get("disable", 0))),
                nodes=tuple(nodes),
                lock_timeout=timeouts["lock-timeout"],
                io_timeout=timeouts["io-timeout"],
                compress=compress,
            )
        except ValueError as exc:
            raise StoreError(f"invalid storage configuration: {exc}") from None


def _compress_of(m: Manifest | None) -> str:
    """How a backup's disks were stored (`none` for containers and backups
    older than the option; the values joined by commas if disks differ)."""
    values = sorted({d.compress for d in m.disks.values()}) if m else []
    return ",".join(values) if values else "none"


@dataclass(frozen=True)
class PruneEntry:
    """One row of prune_backups' answer, as the hypervisor expects it."""

    volid: str
    type: str
    ctime: int
    vmid: int
    mark: Mark
    future: bool = False  # stamped in the future: kept outside the rules

    def as_dict(self) -> dict[str, Any]:
        return {
            "volid": self.volid,
            "type": self.type,
            "ctime": self.ctime,
            "vmid": self.vmid,
            "mark": str(self.mark),
        }


class PruneError(StoreError):
    """Prune removed what it could, but part of the store could not be pruned
    (reported one by one in the log); `entries` are its marks, as
    prune_backups returns them."""

    def __init__(
        self, message: str, entries: list[dict[str, Any]], failures: Sequence[str] = ()
    ) -> None:
        super().__init__(message)
        self.entries = entries
        self.failures = list(failures) or [message]


def _failed(failures: list[str], log: LogFunction | None, message: str) -> None:
    failures.append(message)
    if log:
        log("err", message)


def _date(epoch: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))


def _statvfs_probe(path: str) -> tuple[int, int, int] | None:
    """(total, free, used) bytes of the file system holding `path`, or None
    if `path` is not a directory."""
    if not os.path.isdir(path):
        return None
    st = os.statvfs(path)
    total = st.f_blocks * st.f_frsize
    return total, st.f_bavail * st.f_frsize, total - st.f_bfree * st.f_frsize


def _activate_probe(path: str) -> bool:
    return os.path.isdir(path)


class DirectoryStorage:
    """A dirbackup store seen as a hypervisor storage.

    Method names and arguments follow the hypervisor's storage plugin API;
    `scfg` is bound at construction instead of being passed to every call.
    """

    def __init__(self, storeid: str, scfg: StorageConfig | Mapping[str, Any]) -> None:
        self.storeid = storeid
        self.scfg = scfg if isinstance(scfg, StorageConfig) else StorageConfig.from_mapping(scfg)
        self.store = Store(self.scfg.path, self.scfg.lock_timeout)

    # ---------------------------------------------------------------- plugin description

    @staticmethod
    def api() -> int:
        return PLUGIN_API

    @staticmethod
    def type() -> str:
        return PLUGIN_TYPE

    @staticmethod
    def plugindata() -> dict[str, Any]:
        return {
            "content": [{"backup": 1, "none": 1}, {"backup": 1}],
            "features": {"backup-provider": 1},
        }

    @staticmethod
    def properties() -> dict[str, dict[str, Any]]:
        return {
            "vm-backup-mode": {
                "description": "full: always full VM backups; incremental: qcow2 images backed by "
                "the previous backup, holding what the dirty bitmap says changed (full when "
                "there is nothing to build on).",
                "type": "string",
                "enum": [m.value for m in VmBackupMode],
                "default": VmBackupMode.INCREMENTAL.value,
            },
            "vm-backup-mechanism": {
                "description": "nbd: read disks through NBD exports; file-handle: through file "
                "descriptors (`block-device` is accepted as the old name).",
                "type": "string",
                "enum": [m.value for m in VM_MECHANISMS],
                "default": Mechanism.NBD.value,
            },
            "lxc-backup-mode": {
                "description": "tar: a GNU tar archive; squashfs: a squashfs image (restored "
                "through the directory mechanism).",
                "type": "string",
                "enum": [m.value for m in LxcBackupMode],
                "default": LxcBackupMode.TAR.value,
            },
            "lock-timeout": {
                "description": "Seconds a backup, removal or prune waits for another one of "
                "the same guest before giving up.",
                "type": "number",
                "minimum": 0,
                "default": DEFAULT_LOCK_TIMEOUT,
            },
            "io-timeout": {
                "description": "Seconds a backup waits for a source that makes no progress "
                "(a server that stopped answering) before it fails; 0 waits for ever.",
                "type": "number",
                "minimum": 0,
                "default": DEFAULT_IO_TIMEOUT,
            },
            "compress": {
                "description": "How VM backups store data clusters: zstd-compressed qcow2 "
                "clusters (zstd, or zstd:LEVEL with LEVEL 1 to 19) or as they are (none).",
                "type": "string",
                "pattern": r"none|zstd(:\d+)?",
                "default": compression.DEFAULT_COMPRESS,
            },
        }

    @staticmethod
    def options() -> dict[str, dict[str, Any]]:
        return {
            "path": {"fixed": 1},
            "vm-backup-mode": {"optional": 1},
            "vm-backup-mechanism": {"optional": 1},
            "lxc-backup-mode": {"optional": 1},
            "prune-backups": {"optional": 1},
            "max-protected-backups": {"optional": 1},
            "lock-timeout": {"optional": 1},
            "io-timeout": {"optional": 1},
            "compress": {"optional": 1},
            "disable": {"optional": 1},
            "nodes": {"optional": 1},
        }

    # ---------------------------------------------------------------- names and paths

    def parse_volname(self, volname: str) -> tuple[str, str, int]:
        """('backup', '<vmid>/<type>-<epoch>', vmid); strict (see store.BackupId.parse)."""
        bid = BackupId.parse(volname if volname.startswith("backup/") else f"backup/{volname}")
        return "backup", bid.archive, bid.vmid

    def backup_id(self, volume: str) -> BackupId:
        """A BackupId from a volid or volume name of this storage."""
        storeid, volname = split_volid(volume)
        if storeid is not None and storeid != self.storeid:
            raise StoreError(
                f"volume {volume!r} belongs to storage {storeid!r}, not {self.storeid!r}"
            )
        return BackupId.parse(volname)

    def path(self, volname: str, snapname: str | None = None) -> tuple[str, int, str]:
        if snapname:
            raise StorageOperationError("volume snapshots are not possible on a dirbackup store")
        bid = self.backup_id(volname)
        return str(self.store.backup_dir(bid)), bid.vmid, "backup"

    def vm_backup_mode(self) -> VmBackupMode:
        return self.scfg.vm_backup_mode

    def vm_backup_mechanism(self) -> Mechanism:
        return self.scfg.vm_backup_mechanism

    def lxc_backup_mode(self) -> LxcBackupMode:
        return self.scfg.lxc_backup_mode

    # ---------------------------------------------------------------- activation

    def activate_storage(self, timeout: float = 2.0) -> bool:
        """Check that the store directory exists and answers within `timeout`
        seconds (a hung network mount must not hang the caller)."""
        try:
            ok = call_in_child(_activate_probe, (self.scfg.path,), timeout)
        except TimeoutError:
            raise StoreError(
                f"unable to activate storage '{self.storeid}' - directory "
                f"'{self.scfg.path}' does not answer within {timeout:g} s"
            ) from None
        if not ok:
            raise StoreError(
                f"unable to activate storage '{self.storeid}' - directory '{self.scfg.path}' "
                "does not exist"
            )
        return True

    def deactivate_storage(self) -> bool:
        return True

    def status(self, timeout: float = 2.0) -> tuple[int, int, int, bool]:
        """(total, free, used, active) in bytes, as the hypervisor's storage
        status: the file system holding the store.  A store directory that is
        missing, or does not answer within `timeout` seconds, is inactive
        (0, 0, 0, False) rather than an error, as the hypervisor lists it."""
        try:
            found = call_in_child(_statvfs_probe, (self.scfg.path,), timeout)
        except (TimeoutError, OSError):
            found = None
        if found is None:
            return 0, 0, 0, False
        total, free, used = found
        return total, free, used, True

    def activate_volume(self, volname: str, snapname: str | None = None) -> bool:
        self.path(volname, snapname)
        return True

    def deactivate_volume(self, volname: str, snapname: str | None = None) -> bool:
        self.path(volname, snapname)
        return True

    # ---------------------------------------------------------------- listing

    def _entry(self, volname: str) -> BackupEntry:
        bid = self.backup_id(volname)
        path = self.store.require(bid)
        return BackupEntry(bid, path, self.store.read_manifest(bid))

    def _entry_or_problem(self, volname: str) -> BackupEntry:
        """_entry(), but a damaged manifest becomes the entry's problem."""
        try:
            return self._entry(volname)
        except (StoreError, OSError) as exc:
            bid = self.backup_id(volname)
            return BackupEntry(bid, self.store.require(bid), None, describe_error(exc))

    def parent_of(self, entry: BackupEntry) -> BackupId | None:
        """The backup an incremental builds on (the newest one its disks name)."""
        return removal.parent_of(entry)

    def list_volumes(
        self, vmid: int | None = None, content_types: Iterable[str] = ("backup",)
    ) -> list[dict[str, Any]]:
        """Backups as the hypervisor lists them (volid, vmid, format, size, ctime,
        subtype, content, notes, protected, parent)."""
        if "backup" not in content_types:
            return []
        out = []
        for entry in self.store.backups(vmid):
            try:
                size, _used = entry.usage()
            except OSError:  # unreadable: still listed (verify says why)
                size = 0
            parent = self.parent_of(entry)
            m = entry.manifest
            out.append(
                {
                    "volid": entry.id.volid(self.storeid),
                    "vmid": entry.id.vmid,
                    "format": "directory",
                    "size": size,
                    "ctime": entry.id.epoch,
                    "subtype": str(entry.id.vmtype),
                    "content": "backup",
                    "notes": m.notes if m else "",
                    "protected": bool(m.protected) if m else False,
                    "parent": parent.volid(self.storeid) if parent else None,
                    "compress": _compress_of(m),
                }
            )
        return out

    def list_images(self, vmid: int | None = None) -> list[dict[str, Any]]:
        return []  # a backup store holds no guest images

    def volume_size_info(
        self, volname: str, timeout: float | None = None
    ) -> tuple[int, str, int, str | None, int]:
        """(size, format, used, parent volid, ctime)."""
        entry = self._entry(volname)
        size, used = entry.usage()
        parent = self.parent_of(entry)
        parent_volid = parent.volid(self.storeid) if parent else None
        return size, "directory", used, parent_volid, entry.id.epoch

    # ---------------------------------------------------------------- attributes

    def get_volume_attribute(self, volname: str, attribute: str) -> str | int | None:
        if attribute not in ("notes", "protected"):
            return None
        bid = self.backup_id(volname)
        part = self.store.being_written(bid)
        if part is not None:
            pending = part.pending_attributes()
            value = pending.get(attribute, "" if attribute == "notes" else 0)
            return str(value) if attribute == "notes" else int(bool(value))
        m = self._entry(volname).manifest
        if attribute == "notes":
            return m.notes if m else ""
        return 1 if (m and m.protected) else 0

    def update_volume_attribute(self, volname: str, attribute: str, value: Any) -> None:
        """Set `notes` (text) or `protected` (0/1); other attributes are errors.

        Protecting more than `max-protected-backups` backups of a guest is refused."""
        if attribute not in ("notes", "protected"):
            raise StorageOperationError(
                f"attribute '{attribute}' is not supported on a dirbackup store"
            )
        bid = self.backup_id(volname)
        with self.store.lock(bid.vmid, what=f"setting {attribute}"):
            part = self.store.being_written(bid)
            if part is not None:
                # being written (the hypervisor sets attributes before it is published)
                if attribute == "protected" and int(bool(value)):
                    self._check_protected_limit(bid.vmid)
                part.set_pending_attribute(
                    attribute, str(value) if attribute == "notes" else bool(int(value))
                )
                return
            entry = self._entry(volname)
            m = entry.manifest or self._legacy_manifest(entry)
            if attribute == "notes":
                text = "" if value is None else str(value)
                if "\0" in text or len(text.encode()) > 64 * 1024:
                    raise StoreError("notes must be text of at most 64 KiB")
                m = replace(m, notes=text)
            else:
                protect = bool(int(value)) if not isinstance(value, bool) else value
                if protect and not m.protected:
                    self._check_protected_limit(bid.vmid)
                m = replace(m, protected=protect)
            self.store.write_manifest(bid, m)

    def _check_protected_limit(self, vmid: int) -> None:
        limit = self.scfg.max_protected_backups
        if limit < 0:
            return
        count = sum(1 for e in self.store.backups(vmid) if e.manifest and e.manifest.protected)
        if count >= limit:
            raise StoreError(
                f"guest {vmid} has {count} protected backups already, the limit "
                f"(max-protected-backups) is {limit}"
            )

    def _legacy_manifest(self, entry: BackupEntry) -> Manifest:
        mode = "container" if entry.id.vmtype == VmType.LXC else "full"
        return Manifest(
            vmid=entry.id.vmid,
            vmtype=str(entry.id.vmtype),
            ctime=entry.id.epoch,
            mode=mode,
            legacy=True,
        )

    # ---------------------------------------------------------------- removal

    def children_of(
        self, bid: BackupId, entries: list[BackupEntry] | None = None
    ) -> list[BackupEntry]:
        """Backups whose images build on `bid` (among `entries`, default: the
        guest's backups)."""
        return removal.children_of(
            bid, self.store.backups(bid.vmid) if entries is None else entries
        )

    def free_image(self, volname: str, log: LogFunction | None = None) -> None:
        """Remove a backup.  Protected backups are refused; a backup that is the
        base of others is first merged into each of them, so they stay whole."""
        bid = self.backup_id(volname)
        with self.store.lock(bid.vmid, what="removal"):
            self.store.clean_stale(bid.vmid)
            self._remove(bid, log)

    def _remove(self, bid: BackupId, log: LogFunction | None) -> None:
        removal.remove(self.store, self._entry(bid.volname), log)
        if log:
            log("info", f"removed backup {bid.volid(self.storeid)}")

    def prune_backups(
        self,
        keep: KeepRules | Mapping[str, Any] | str | None = None,
        vmid: int | None = None,
        vmtype: str | None = None,
        dryrun: bool = False,
        log: LogFunction | None = None,
    ) -> list[dict[str, Any]]:
        """Mark (and unless `dryrun`, remove) backups by the hypervisor's keep rules.

        Groups are (guest, type); protected backups are never removed.  Backups
        stamped more than a day after now (a wrong clock) are kept, take no slot
        of any rule, and are logged.  Removal runs newest first, so a removed
        base with a kept child is merged into it.
        The kept logs of failed backups go with the backups around them: those
        older than the oldest backup kept in their group are removed too.
        Returns the hypervisor's entries: volid, type, ctime, vmid, mark."""
        if keep is None:
            rules = self.scfg.prune_backups
        elif isinstance(keep, KeepRules):
            rules = keep
        elif isinstance(keep, str):
            rules = KeepRules.parse(keep)
        else:
            rules = KeepRules.from_mapping(keep)
        if vmid is not None:
            self.store.check_guest_dir(vmid)
        failures: list[str] = []
        result = self._prune_marks(rules, vmid, vmtype, failures, log)
        if not dryrun:
            guests = {e.vmid for e in result if e.mark == Mark.REMOVE}
            guests.update(
                v
                for v in ([vmid] if vmid is not None else self.store.guest_ids())
                if self.store.failed_logs(v)
            )
            for gvmid in sorted(guests):
                try:
                    result = self._prune_guest(rules, gvmid, vmtype, result, failures, log)
                except (DirbackupError, OSError) as exc:  # e.g. locked: the other guests go on
                    _failed(failures, log, f"guest {gvmid} was not pruned: {describe_error(exc)}")
        result.sort(key=lambda e: (e.vmid, e.type, -e.ctime))
        entries = [e.as_dict() for e in result]
        if failures:
            more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
            raise PruneError(f"prune: {failures[0]}{more}", entries, failures)
        return entries

    def _prune_guest(
        self,
        rules: KeepRules,
        vmid: int,
        vmtype: str | None,
        result: list[PruneEntry],
        failures: list[str],
        log: LogFunction | None,
    ) -> list[PruneEntry]:
        """Remove what the rules mark in one guest, under its lock; a backup
        that cannot be removed is reported and the others still go."""
        with self.store.lock(vmid, what="prune"):
            # marked again under the lock: a backup or removal that ran
            # while we waited for it changes what keep-last means
            fresh = self._prune_marks(rules, vmid, vmtype)
            result = [e for e in result if e.vmid != vmid] + fresh
            self.store.clean_stale(vmid)
            doomed = [p for p in fresh if p.mark == Mark.REMOVE]
            for p in sorted(doomed, key=lambda p: -p.ctime):
                try:
                    self._remove(self.backup_id(p.volid), log)
                except (DirbackupError, OSError) as exc:
                    _failed(failures, log, f"{p.volid} could not be removed: {describe_error(exc)}")
            self._prune_failed_logs(vmid, vmtype, fresh, log)
        return result

    def _prune_failed_logs(
        self, vmid: int, vmtype: str | None, marks: list[PruneEntry], log: LogFunction | None
    ) -> None:
        """Remove the failed-backup logs older than the oldest kept backup of
        their group (one stamped in the future does not count); a group with
        no backup left keeps them all (they are all there is to read about it)."""
        oldest_kept: dict[str, int] = {}
        for e in marks:
            if e.mark != Mark.REMOVE and not e.future:
                oldest_kept[e.type] = min(oldest_kept.get(e.type, e.ctime), e.ctime)
        for bid in self.store.failed_logs(vmid):
            limit = oldest_kept.get(str(bid.vmtype))
            if (vmtype and str(bid.vmtype) != vmtype) or limit is None or bid.epoch >= limit:
                continue
            self.store.remove_failed_log(bid)
            if log:
                log("info", f"removed the log of failed backup {bid.archive}")

    def _prune_marks(
        self,
        rules: KeepRules,
        vmid: int | None,
        vmtype: str | None,
        failures: list[str] | None = None,
        log: LogFunction | None = None,
    ) -> list[PruneEntry]:
        """The marks of every group; what the listing could not read (and the
        backups kept because their manifest is unreadable) go to `failures`."""
        groups: dict[tuple[int, str], list[BackupEntry]] = {}
        problems: list[StoreProblem] = []
        for entry in self.store.backups(vmid, problems):
            if vmtype and str(entry.id.vmtype) != vmtype:
                continue
            if entry.problem and failures is not None:
                _failed(failures, log, f"{entry.id.volid(self.storeid)} kept: {entry.problem}")
            groups.setdefault((entry.id.vmid, str(entry.id.vmtype)), []).append(entry)
        result: list[PruneEntry] = []
        horizon = future_horizon()
        for (gvmid, gtype), entries in sorted(groups.items()):
            marks = mark(
                [
                    PruneCandidate(
                        e.id.volname,
                        e.id.epoch,
                        # an unreadable manifest may hide the protection: kept
                        bool(e.problem or (e.manifest and e.manifest.protected)),
                    )
                    for e in entries
                ],
                rules,
                future_after=horizon,
            )
            for e in sorted(entries, key=lambda e: -e.id.epoch):
                future = e.id.epoch > horizon
                volid = e.id.volid(self.storeid)
                if future and failures is not None and log:
                    log(
                        "warn",
                        f"{volid} is stamped {_date(e.id.epoch)}, in the future: kept, "
                        "and counted by no keep rule",
                    )
                result.append(
                    PruneEntry(volid, gtype, e.id.epoch, gvmid, marks[e.id.volname], future)
                )
        if failures is not None:
            for problem in problems:
                _failed(failures, log, str(problem))
        return result

    # ---------------------------------------------------------------- verify

    def verify(self, volname: str | None = None, vmid: int | None = None) -> list[VerifyResult]:
        """Re-read backups and check every digest, archive and chain (see
        dirbackup.verify: a bad base fails every backup built on it).

        Backups without a manifest (the seed's layout) are checked as far as
        possible: their chains are validated and their tables walked."""
        problems: list[StoreProblem] = []
        if volname is not None:
            entries = [self._entry_or_problem(volname)]
        else:
            entries = self.store.backups(vmid, problems)
        verifier = self.verifier()
        results = [verifier.verify(e) for e in entries]
        return results + [VerifyResult(str(p.path), False, (p.message,)) for p in problems]

    def verifier(self, progress: VerifyProgress | None = None) -> Verifier:
        """A verify run over this store: each image is read once, however many
        backups build on it; `progress(item, done, total)` per disk and per
        backup's files as they are checked (see Verifier)."""
        return Verifier(self.store, self.storeid, progress)

    # ---------------------------------------------------------------- not possible here

    def create_base(self, volname: str) -> None:
        raise StorageOperationError("cannot create a base image on a dirbackup store")

    def clone_image(self, volname: str, vmid: int, snap: str | None = None) -> None:
        raise StorageOperationError("cannot clone images on a dirbackup store")

    def alloc_image(self, vmid: int, fmt: str, name: str | None, size: int) -> None:
        raise StorageOperationError("cannot allocate images on a dirbackup store")

    def volume_resize(self, volname: str, size: int, running: bool = False) -> None:
        raise StorageOperationError("volume resize is not possible on a dirbackup store")

    def volume_snapshot(self, volname: str, snap: str) -> None:
        raise StorageOperationError("volume snapshots are not possible on a dirbackup store")

    def volume_snapshot_rollback(self, volname: str, snap: str) -> None:
        raise StorageOperationError("volume snapshots are not possible on a dirbackup store")

    def volume_snapshot_delete(self, volname: str, snap: str) -> None:
        raise StorageOperationError("volume snapshots are not possible on a dirbackup store")

    def volume_has_feature(self, feature: str, volname: str, snapname: str | None = None) -> bool:
        return False

    # ---------------------------------------------------------------- provider

    def new_backup_provider(self, log: LogFunction | None = None) -> Any:
        """The backup provider that writes into this store."""
        from dirbackup.provider import DirectoryBackupProvider

        return DirectoryBackupProvider(self, self.scfg, self.storeid, log)
