"""The backup store on disk: layout, names, manifest, atomic publish, locking.

Layout (DESIGN.md §5)::

    <root>/store-id                             the store's identity (made once)
    <root>/<vmid>/previous-info                 last good backup per device
    <root>/<vmid>/.lock                         per-guest lock (flock)
    <root>/<vmid>/<type>-<epoch>/guest.conf     raw guest config
                                /firewall.conf  if any
                                /<device>.qcow2 per disk; backing file = previous backup's
                                /archive.tar | archive.sqfs   containers
                                /manifest.json  files, sizes, digests, parent, mode, notes...
                                /backup.log
                                /check-failed   why its last check failed, if it did
    <root>/<vmid>/.<type>-<epoch>.partial/      a backup being written (never listed)
    <root>/<vmid>/<type>-<epoch>.failed/        the log of a failed backup

A backup is written under its `.partial` name and renamed into place only
when complete and synced, so a crash never leaves a half-written backup that
lists as valid; the next writer removes partial directories whose owner is
gone.  Volume names are parsed strictly: nothing a caller passes can name a
path outside the store.

No other module names a file or directory of the store: they get handles
from Store -- PartialBackup (a backup being written), Backup and
BackupEntry (a published one), BackupRewrite (files of one replaced at
once).  That is why this module stays one, and larger than most: its names,
its ids, its handles and its Store all change together when the layout
does.  The records it keeps are in manifest.py, the file-system helpers it
uses in fsutil.py.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import secrets
import shutil
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dirbackup.api import VmType
from dirbackup.atomicfile import fsync_path, temporary_name, write_atomic
from dirbackup.errors import StoreError, VolumeNameError
from dirbackup.fsutil import (
    dir_usage,
    exchange,
    link_rest,
    read_json,
    read_regular,
    sha256_file,
)
from dirbackup.manifest import DiskRecord, FileRecord, Manifest, PreviousInfo
from dirbackup.procs import owner_alive, owner_line

# The names of the store's files and directories: private to this module (the
# rest of the package reaches them through Store and its handles).
_MANIFEST = "manifest.json"
_PREVIOUS_INFO = "previous-info"
_GUEST_CONFIG = "guest.conf"
_FIREWALL_CONFIG = "firewall.conf"
_LOG_FILE = "backup.log"
_TAR_ARCHIVE = "archive.tar"
_SQUASHFS_ARCHIVE = "archive.sqfs"
_OWNER_FILE = ".owner"
_LOCK_FILE = ".lock"
_PENDING_ATTRIBUTES = ".attributes.json"
_CHECK_FAILED = "check-failed"
_STORE_ID_FILE = "store-id"
_IMAGE_SUFFIX = ".qcow2"
_CONTAINER_RESULT = ".container-result.json"
MAX_VMID = 999_999_999  # the hypervisor's largest guest id
# Backup times have at most 11 digits (up to the year 5138): a time in
# milliseconds is refused, and every time is one the calendar (prune's
# periods, listings) can represent in any time zone.
MAX_EPOCH = 99_999_999_999
# A backup stamped more than this after now is "in the future" (a clock that
# was wrong when it was made): prune keeps it outside every rule, and new
# backups neither take ids after it nor build on it.
FUTURE_SLACK = 86_400

# guest directories whose lock a thread of this process holds:
# (real path, pid, thread id) -> depth
_HELD_LOCKS: dict[tuple[str, int, int], int] = {}
_STORE_ID_RE = re.compile(r"[0-9a-f]{16}")

_NAME_RE = re.compile(r"(qemu|lxc)-([0-9]{1,13})")
_DEVICE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}")


def check_device_name(device: str) -> str:
    """Device names become file names: letters, digits, `_.+-`, no leading dot."""
    if not _DEVICE_RE.fullmatch(device) or ".." in device:
        raise VolumeNameError(f"invalid device name {device!r}")
    return device


def _whole_number(value: object) -> int | None:
    """An int (not a bool) or a string of ASCII digits as an int, else None."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) < 20:
        return int(value)
    return None


def future_horizon(now: float | None = None) -> int:
    """Backups stamped later than this are in the future (FUTURE_SLACK)."""
    return int(time.time() if now is None else now) + FUTURE_SLACK


def check_vmid(vmid: object) -> int:
    """A guest id as the hypervisor's: a whole number from 1 to MAX_VMID (an
    int or its decimal digits).  Anything else raises VolumeNameError: it
    would name a backup that no volume name can address."""
    number = _whole_number(vmid)
    if number is None or not 1 <= number <= MAX_VMID:
        raise VolumeNameError(f"invalid guest id {vmid!r}: a whole number from 1 to {MAX_VMID}")
    return number


def check_start_time(start_time: object) -> int:
    """A backup's start time: whole seconds since 1970, at most MAX_EPOCH (a
    time in milliseconds is refused).  Anything else raises VolumeNameError."""
    number = _whole_number(start_time)
    if number is None or not 1 <= number <= MAX_EPOCH:
        raise VolumeNameError(
            f"invalid start time {start_time!r}: whole seconds since 1970, at most "
            f"{MAX_EPOCH} (not milliseconds)"
        )
    return number


@dataclass(frozen=True, order=True)
class BackupId:
    """One backup of one guest: `<vmid>/<type>-<epoch>`.  Only ids that a
    volume name can address exist (VolumeNameError otherwise)."""

    vmid: int
    vmtype: VmType
    epoch: int

    def __post_init__(self) -> None:
        check_vmid(self.vmid)
        if _whole_number(self.epoch) != self.epoch or not 0 <= self.epoch <= MAX_EPOCH:
            raise VolumeNameError(f"invalid backup time {self.epoch!r} of guest {self.vmid}")

    @property
    def name(self) -> str:
        """The backup directory's name, e.g. `qemu-1700000000`."""
        return f"{self.vmtype}-{self.epoch}"

    @property
    def archive(self) -> str:
        """The archive name the hypervisor sees: `<vmid>/<type>-<epoch>`."""
        return f"{self.vmid}/{self.name}"

    @property
    def volname(self) -> str:
        """The storage volume name: `backup/<vmid>/<type>-<epoch>`."""
        return f"backup/{self.archive}"

    def volid(self, storeid: str) -> str:
        return f"{storeid}:{self.volname}"

    @classmethod
    def parse(cls, text: str) -> BackupId:
        """Parse `backup/<vmid>/<type>-<epoch>` or `<vmid>/<type>-<epoch>`, strictly.

        Anything else -- `..`, absolute paths, NUL bytes, extra components,
        absurd numbers -- raises VolumeNameError."""
        if not isinstance(text, str) or "\0" in text or len(text) > 256:
            raise VolumeNameError(f"invalid volume name {text!r}")
        parts = text.split("/")
        if parts and parts[0] == "backup":
            parts = parts[1:]
        if len(parts) != 2 or not parts[0].isascii() or not parts[0].isdigit():
            raise VolumeNameError(
                f"invalid volume name {text!r}: expected backup/<vmid>/<qemu|lxc>-<epoch>"
            )
        m = _NAME_RE.fullmatch(parts[1])
        if not m:
            raise VolumeNameError(
                f"invalid volume name {text!r}: expected backup/<vmid>/<qemu|lxc>-<epoch>"
            )
        vmid, epoch = int(parts[0]), int(m.group(2))
        if parts[0] != str(vmid) or not 1 <= vmid <= MAX_VMID or epoch > MAX_EPOCH:
            raise VolumeNameError(f"invalid volume name {text!r}: number out of range")
        return cls(vmid, VmType(m.group(1)), epoch)


def split_volid(text: str) -> tuple[str | None, str]:
    """`STOREID:backup/...` -> (storeid, volname); a bare name -> (None, name)."""
    if ":" in text:
        storeid, _, rest = text.partition(":")
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9._-]*", storeid):
            raise VolumeNameError(f"invalid storage id in {text!r}")
        return storeid, rest
    return None, text


def _stale_temporary(name: str, mark: str) -> bool:
    """`.<name><mark><pid>` made by a process that is gone."""
    if not name.startswith(".") or mark not in name:
        return False
    pid = name.rsplit(mark, 1)[1]
    return pid.isdigit() and not os.path.exists(f"/proc/{pid}")


# ----------------------------------------------------------------------------
# The store


@dataclass(frozen=True)
class StoreProblem:
    """Something in the store that looks like a guest or a backup but cannot
    be listed as one (a symlink, a file, an unreadable directory, a time or id
    out of range): verify and prune report it and go on."""

    path: Path
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


_ARCHIVES = {"tar": _TAR_ARCHIVE, "squashfs": _SQUASHFS_ARCHIVE}


@dataclass(frozen=True)
class PartialBackup:
    """A backup being written (its `.partial` directory): where each of its
    files goes.  Everything a writer leaves for the publisher -- possibly
    from another, unprivileged process -- is on disk here, never only in
    memory."""

    id: BackupId
    path: Path

    def image_path(self, device: str) -> Path:
        """Where the qcow2 image of `device` is written."""
        return self.path / _disk_file(device)

    def write_configs(self, guest_config: str, firewall: str | None) -> dict[str, FileRecord]:
        """Write the guest's configuration and firewall (if any); their records.
        The bytes as the user gave them: text read with errors="surrogateescape"
        (a file that is not UTF-8) is written back byte for byte."""
        files = {}
        for name, text in ((_GUEST_CONFIG, guest_config), (_FIREWALL_CONFIG, firewall)):
            if text is None:
                continue
            data = text.encode("utf-8", "surrogateescape") if isinstance(text, str) else bytes(text)
            write_atomic(self.path / name, data)
            files[name] = FileRecord(len(data), sha256_file(self.path / name))
        return files

    def archive_path(self, mode: str) -> Path:
        """Where a container archive of `mode` (tar or squashfs) is written."""
        return self.path / _ARCHIVES[mode]

    def pending_attributes(self) -> dict[str, Any]:
        """Attributes (notes, protected) set before the backup is published."""
        return read_json(self.path / _PENDING_ATTRIBUTES)

    def set_pending_attribute(self, attribute: str, value: object) -> None:
        pending = self.pending_attributes()
        pending[attribute] = value
        write_atomic(self.path / _PENDING_ATTRIBUTES, json.dumps(pending))

    def take_pending_attributes(self) -> dict[str, Any]:
        """The pending attributes, removed from the partial backup (the
        manifest takes them over)."""
        pending = self.pending_attributes()
        (self.path / _PENDING_ATTRIBUTES).unlink(missing_ok=True)
        return pending

    def save_container_result(self, files: dict[str, FileRecord]) -> None:
        """Record the files a container backup wrote, for the publisher."""
        write_atomic(
            self.path / _CONTAINER_RESULT,
            json.dumps({name: {"size": r.size, "sha256": r.sha256} for name, r in files.items()}),
        )

    def take_container_result(self) -> dict[str, FileRecord] | None:
        """The files a container backup recorded (removed from the partial
        backup), or None if it recorded none."""
        result = read_json(self.path / _CONTAINER_RESULT)
        if not result:
            return None
        (self.path / _CONTAINER_RESULT).unlink()
        return {name: FileRecord(**rec) for name, rec in result.items()}


@dataclass(frozen=True)
class Backup:
    """A published backup's directory: where its files are."""

    id: BackupId
    path: Path

    def image_path(self, device: str, record: DiskRecord | None = None) -> Path:
        """The image of `device`: the file its manifest record names, or the
        seed's name for it (callers check the record's file name)."""
        return self.path / (record.file if record is not None else f"{device}{_IMAGE_SUFFIX}")

    def seed_images(self) -> dict[str, Path]:
        """The images of a backup without a manifest (the seed's layout), by device."""
        return {p.stem: p for p in sorted(self.path.glob(f"*{_IMAGE_SUFFIX}"))}

    def file(self, name: str) -> Path:
        """A file a manifest names (callers check the name is a plain one)."""
        return self.path / name

    def is_archive(self, name: str) -> bool:
        """Whether a file of the backup is a container archive."""
        return name in _ARCHIVES.values()

    def archive(self) -> tuple[str, Path] | None:
        """The container archive, as (mode, path): tar or squashfs; None if none."""
        for mode, name in _ARCHIVES.items():
            if (self.path / name).exists():
                return mode, self.path / name
        return None

    def guest_config(self) -> str | None:
        """The guest's configuration, or None if the backup has none."""
        return self._text(_GUEST_CONFIG)

    def firewall_config(self) -> str | None:
        """The guest's firewall configuration, or None if it had none."""
        return self._text(_FIREWALL_CONFIG)

    def _text(self, name: str) -> str | None:
        try:
            return read_regular(self.path / name).decode("utf-8", "replace")
        except FileNotFoundError:
            return None

    def missing_seed_files(self) -> list[str]:
        """Files every backup without a manifest has, that this one lacks."""
        return [] if (self.path / _GUEST_CONFIG).exists() else [_GUEST_CONFIG]

    def usage(self) -> tuple[int, int]:
        """(apparent size, allocated bytes) of the backup's files."""
        return dir_usage(self.path)

    def keep_log(self, data: bytes) -> None:
        write_atomic(self.path / _LOG_FILE, data)


@dataclass(frozen=True)
class BackupEntry(Backup):
    """A published backup as listing sees it.  `problem` says why its
    manifest could not be read (the backup is then listed, and fails verify)."""

    manifest: Manifest | None
    problem: str | None = None


def real_dir(path: Path) -> bool:
    """A directory, and not through a symlink: what the store is made of.  A
    symlink placed in the store never leads a listing or a restore outside."""
    return path.is_dir() and not path.is_symlink()


@dataclass(frozen=True)
class BackupRewrite:
    """Files of a published backup being replaced (Store.rewrite): new files
    are written at `new_path(name)`, then `commit` puts them in place."""

    store: Store
    id: BackupId
    _final: Path
    _staging: Path

    def new_path(self, name: str) -> Path:
        """Where the new content of the backup's file `name` is written."""
        return self._staging / name

    def commit(self, names: Iterable[str], manifest: Manifest | None) -> None:
        """Put the new files `names` (and the manifest, if given) in place.

        The staging directory gets the backup's other files hard-linked and
        then takes the backup's place in one atomic exchange: a crash at any
        point leaves either the old backup or the new one, never new images
        with the old manifest.  Where the file system cannot exchange
        directories (or link files), the files are replaced one by one and
        the manifest last."""
        if manifest is not None:
            write_atomic(self._staging / _MANIFEST, manifest.to_json())
        if link_rest(self._final, self._staging) and exchange(self._staging, self._final):
            fsync_path(self._final.parent)
            return
        for name in names:
            os.replace(self._staging / name, self._final / name)
        fsync_path(self._final)
        if manifest is not None:
            self.store.write_manifest(self.id, manifest)


DEFAULT_LOCK_TIMEOUT = 60.0


class Store:
    """A backup store rooted at a directory.

    `lock_timeout` is how long a writer waits for another backup, removal or
    prune of the same guest before giving up (see `lock`)."""

    def __init__(
        self, root: str | os.PathLike[str], lock_timeout: float = DEFAULT_LOCK_TIMEOUT
    ) -> None:
        self.root = Path(root)
        self.lock_timeout = lock_timeout

    # -- paths

    def guest_dir(self, vmid: int) -> Path:
        """`<root>/<vmid>`; a guest id out of range raises VolumeNameError."""
        return self.root / str(check_vmid(vmid))

    def backup_dir(self, bid: BackupId) -> Path:
        return self.guest_dir(bid.vmid) / bid.name

    def partial_dir(self, bid: BackupId) -> Path:
        return self.guest_dir(bid.vmid) / f".{bid.name}.partial"

    def failed_dir(self, bid: BackupId) -> Path:
        return self.guest_dir(bid.vmid) / f"{bid.name}.failed"

    def previous_info_path(self, vmid: int) -> Path:
        return self.guest_dir(vmid) / _PREVIOUS_INFO

    # -- checks

    def check(self) -> None:
        """Fail clearly when the store directory is missing or not a directory."""
        if not self.root.is_dir():
            raise StoreError(f"backup store {self.root} does not exist or is not a directory")

    # -- identity

    def identity(self, create: bool = True) -> str | None:
        """The store's identity: 16 random hex digits, made once (by its
        first backup that needs it) and kept in `<root>/store-id`.

        It names the store's dirty bitmaps on guest disks, so that two stores
        -- even opened with the same storage id -- never share one.  A copy
        of the store keeps it; a store without the file gets a new one, and
        every disk's next backup into it is then full.  Two processes
        creating it at once agree: the file appears whole, by a hard link
        that fails if another process linked its file first."""
        path = self.root / _STORE_ID_FILE
        try:
            return self._read_identity(path)
        except FileNotFoundError:
            if not create:
                return None
        self.check()
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
            try:
                os.write(fd, (secrets.token_hex(8) + "\n").encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            with contextlib.suppress(FileExistsError):  # another process was first: use theirs
                os.link(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        fsync_path(self.root)
        return self._read_identity(path)

    @staticmethod
    def _read_identity(path: Path) -> str:
        text = read_regular(path).decode("ascii", "replace").strip()
        if not _STORE_ID_RE.fullmatch(text):
            raise StoreError(
                f"{path} is damaged (it holds no store identity); remove it to give the "
                "store a new one (the next backup of every disk is then full)"
            )
        return text

    def check_guest_dir(self, vmid: int) -> Path:
        """The guest's directory, which must be a real directory or absent: a
        symlink (or a file) in its place is refused with StoreError, so that
        nothing is written, locked, cleaned or removed through it."""
        gdir = self.guest_dir(vmid)
        if (gdir.is_symlink() or gdir.exists()) and not real_dir(gdir):
            raise StoreError(f"{gdir} is not a directory of this store (a symbolic link?); refused")
        return gdir

    # -- locking

    @contextlib.contextmanager
    def lock(self, vmid: int, timeout: float | None = None, what: str = "backup") -> Iterator[None]:
        """Serialise writers and pruning of one guest (flock on <vmid>/.lock).

        Waits up to `timeout` seconds (default: the store's `lock_timeout`),
        then raises StoreError naming the guest.
        Re-entrant within a thread: the hypervisor prunes and sets attributes
        from the thread whose backup of the guest holds the lock.  Another
        thread of the same process waits like another process would (each
        opens the lock file itself, and flock excludes open files, not
        processes).  A guest directory that is a symlink is refused
        (check_guest_dir)."""
        gdir = self.check_guest_dir(vmid)
        try:
            gdir.mkdir(parents=True)
        except FileExistsError:
            self.check_guest_dir(vmid)  # made by another process: a directory, or refused
        key = (os.path.realpath(gdir), os.getpid(), threading.get_ident())
        if key in _HELD_LOCKS:
            _HELD_LOCKS[key] += 1
            try:
                yield
            finally:
                _HELD_LOCKS[key] -= 1
            return
        if timeout is None:
            timeout = self.lock_timeout
        fd = os.open(gdir / _LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise StoreError(
                            f"guest {vmid} is locked by another backup or prune; "
                            f"gave up after {timeout:.0f} s ({what})"
                        ) from None
                    time.sleep(0.05)
            _HELD_LOCKS[key] = 1
            try:
                yield
            finally:
                del _HELD_LOCKS[key]
        finally:
            os.close(fd)

    # -- writing a backup

    def new_backup_id(self, vmid: int, vmtype: VmType, epoch: int) -> BackupId:
        """The first free id at or after `epoch` and after the guest's newest
        backup: two backups of a guest within the same second never share (and
        so never overwrite) a directory, and a new backup never sorts before
        the one it builds on -- not after a clock step back, nor when a backup
        whose time was moved up has been removed -- so that `keep-last` and
        listings keep the newest.  Backups stamped in the future (see
        future_horizon) are passed over: one wrong clock must not push every
        later id past it (and no incremental builds on such a backup)."""
        horizon = min(future_horizon(max(epoch, int(time.time()))), MAX_EPOCH)
        gdir = self.guest_dir(vmid)
        if gdir.is_dir():
            for p in gdir.iterdir():
                m = _NAME_RE.fullmatch(p.name)
                # (names beyond the valid range are no backup of ours)
                if m and epoch <= int(m.group(2)) <= horizon:
                    epoch = int(m.group(2)) + 1
        while True:
            bid = BackupId(vmid, vmtype, epoch)
            if not (
                self.backup_dir(bid).exists()
                or self.partial_dir(bid).exists()
                or self.failed_dir(bid).exists()
            ):
                return bid
            epoch += 1

    def begin(self, bid: BackupId) -> PartialBackup:
        """Create the partial directory of a new backup, owned by this process."""
        self.guest_dir(bid.vmid).mkdir(parents=True, exist_ok=True)
        part = self.partial_dir(bid)
        try:
            part.mkdir(mode=0o755)
        except FileExistsError:
            raise StoreError(f"backup {bid.archive} is already being written") from None
        (part / _OWNER_FILE).write_text(owner_line())
        return PartialBackup(bid, part)

    def partial(self, bid: BackupId) -> PartialBackup:
        """The backup being written under `bid` (see begin)."""
        return PartialBackup(bid, self.partial_dir(bid))

    def being_written(self, bid: BackupId) -> PartialBackup | None:
        """The partial backup of `bid` if it is being written and not published."""
        if self.exists(bid) or not self.partial_dir(bid).is_dir():
            return None
        return self.partial(bid)

    def publish(self, bid: BackupId, manifest: Manifest) -> Path:
        """Make a partial backup visible: sync every file, write the manifest,
        sync, and rename the directory into place."""
        part = self.partial_dir(bid)
        final = self.backup_dir(bid)
        (part / _OWNER_FILE).unlink(missing_ok=True)
        for p in part.iterdir():
            if p.is_file():
                fsync_path(p)
        write_atomic(part / _MANIFEST, manifest.to_json())
        if final.exists():
            raise StoreError(f"backup {bid.archive} exists already; not overwritten")
        os.rename(part, final)
        fsync_path(final.parent)
        return final

    def discard(self, bid: BackupId, keep_log: str | None = None) -> None:
        """Remove a partial backup; keep its log as `<name>.failed/backup.log`."""
        part = self.partial_dir(bid)
        if keep_log is not None:
            self.keep_failed_log(bid, keep_log)
        shutil.rmtree(part, ignore_errors=True)

    def keep_failed_log(self, bid: BackupId, data: str | bytes) -> None:
        """Keep the log of a backup that failed (`<name>.failed/backup.log`)."""
        failed = self.failed_dir(bid)
        failed.mkdir(parents=True, exist_ok=True)
        write_atomic(failed / _LOG_FILE, data)

    def clean_stale(self, vmid: int) -> list[str]:
        """Remove what interrupted writers of a guest left behind, once they are
        gone: partial backups, directories being removed, and the temporary
        files of an atomic write or a merge (in the guest's directory and in
        its published and failed backups)."""
        removed: list[str] = []
        gdir = self.guest_dir(vmid)
        if not gdir.is_dir():
            return removed
        for p in gdir.iterdir():
            if p.is_symlink():
                continue
            if p.name.startswith(".") and p.name.endswith(".partial") and p.is_dir():
                try:
                    alive = owner_alive((p / _OWNER_FILE).read_text())
                except OSError:
                    alive = False
                if not alive:
                    shutil.rmtree(p, ignore_errors=True)
                    removed.append(p.name)
            elif (
                _stale_temporary(p.name, ".removing-") or _stale_temporary(p.name, ".merge-")
            ) and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p.name)
            elif _stale_temporary(p.name, ".tmp-"):
                p.unlink(missing_ok=True)
                removed.append(p.name)
            elif p.is_dir() and (_NAME_RE.fullmatch(p.name) or p.name.endswith(".failed")):
                try:
                    inside = list(p.iterdir())
                except OSError:
                    continue  # unreadable: verify reports it, the rest is cleaned
                for q in inside:
                    if _stale_temporary(q.name, ".tmp-") or _stale_temporary(q.name, ".merge-"):
                        q.unlink(missing_ok=True)
                        removed.append(f"{p.name}/{q.name}")
        return removed

    # -- reading

    def exists(self, bid: BackupId) -> bool:
        return real_dir(self.guest_dir(bid.vmid)) and real_dir(self.backup_dir(bid))

    def require(self, bid: BackupId) -> Path:
        """The directory of a published backup, or StoreError."""
        path = self.backup_dir(bid)
        self.check_guest_dir(bid.vmid)
        if not self.exists(bid):
            raise StoreError(f"backup {bid.archive} does not exist in {self.root}")
        return path

    def image_path(self, bid: BackupId, device: str) -> Path:
        """Where the image of `device` is in backup `bid` (published or not)."""
        return self.backup_dir(bid) / _disk_file(device)

    def backup(self, bid: BackupId) -> Backup:
        """The published backup `bid`, or StoreError."""
        return Backup(bid, self.require(bid))

    def read_manifest(self, bid: BackupId) -> Manifest | None:
        """The manifest, or None for a backup in the seed's layout (no manifest)."""
        path = self.backup_dir(bid) / _MANIFEST
        try:
            text = read_regular(path).decode("utf-8", "replace")
        except FileNotFoundError:
            return None
        return Manifest.from_json(text, str(path))

    def write_manifest(self, bid: BackupId, manifest: Manifest) -> None:
        write_atomic(self.require(bid) / _MANIFEST, manifest.to_json())

    # -- check failures

    def mark_check_failed(self, bid: BackupId, reason: str) -> None:
        """Record that a check of a backup's data failed (verify, a restore's or
        a merge's check): no incremental is built on it, or on anything built
        on it, until a verify of it succeeds (clear_check_failure)."""
        text = " ".join(reason.split()) or "check failed"
        write_atomic(self.require(bid) / _CHECK_FAILED, text[:4096] + "\n")

    def check_failure(self, bid: BackupId) -> str | None:
        """Why the backup's last check failed, or None if it did not (or none
        ran).  A marker that is not a regular file counts as a failure."""
        try:
            text = read_regular(self.backup_dir(bid) / _CHECK_FAILED)
        except FileNotFoundError:
            return None
        except (StoreError, OSError) as exc:
            return str(exc)
        return text.decode("utf-8", "replace").strip() or "check failed"

    def clear_check_failure(self, bid: BackupId) -> None:
        """Forget a recorded check failure (after a verify that succeeded)."""
        path = self.require(bid) / _CHECK_FAILED
        if os.path.lexists(path):
            path.unlink()
            fsync_path(path.parent)

    def guest_ids(self, problems: list[StoreProblem] | None = None) -> list[int]:
        """Guests with a directory in the store.  Entries named like a guest
        that are no directory of ours (a symlink, a file, an id out of range)
        are left out, and described in `problems` if given."""
        self.check()
        out = []
        for p in self.root.iterdir():
            if not (p.name.isascii() and p.name.isdigit()):
                continue
            if str(int(p.name)) != p.name or not 1 <= int(p.name) <= MAX_VMID:
                _note(problems, p, "named like a guest, but not a guest id in range")
            elif not real_dir(p):
                _note(problems, p, "named like a guest, but not a directory (a symbolic link?)")
            else:
                out.append(int(p.name))
        return sorted(out)

    def backups(
        self, vmid: int | None = None, problems: list[StoreProblem] | None = None
    ) -> list[BackupEntry]:
        """Published backups (oldest first), with their manifests.

        One damaged backup hides no other: one whose manifest cannot be read
        is listed with its `problem`; what cannot be listed at all (an
        unreadable guest directory, an entry named like a backup that is a
        symlink, a file or out of range) is left out and described in
        `problems` if given."""
        self.check()
        vmids = [vmid] if vmid is not None else self.guest_ids(problems)
        entries = []
        for v in vmids:
            gdir = self.guest_dir(v)
            if not real_dir(gdir):
                if vmid is not None and (gdir.exists() or gdir.is_symlink()):
                    _note(
                        problems, gdir, "named like a guest, but not a directory (a symbolic link?)"
                    )
                continue
            try:
                names = sorted(p.name for p in gdir.iterdir())
            except OSError as exc:
                _note(problems, gdir, f"cannot be read: {exc.strerror}")
                continue
            for name in names:
                m = _NAME_RE.fullmatch(name)
                if not m:
                    continue
                p = gdir / name
                if int(m.group(2)) > MAX_EPOCH:
                    _note(
                        problems,
                        p,
                        "named like a backup, but its time is beyond the supported range",
                    )
                    continue
                if not real_dir(p):
                    _note(
                        problems, p, "named like a backup, but not a directory (a symbolic link?)"
                    )
                    continue
                bid = BackupId(v, VmType(m.group(1)), int(m.group(2)))
                try:
                    entries.append(BackupEntry(bid, p, self.read_manifest(bid)))
                except (StoreError, OSError) as exc:  # one damaged backup hides no other
                    entries.append(BackupEntry(bid, p, None, describe_error(exc)))
        entries.sort(key=lambda e: (e.id.vmid, e.id.epoch, e.id.vmtype))
        return entries

    def read_previous(self, vmid: int, vmtype: VmType) -> PreviousInfo:
        try:
            text = read_regular(self.previous_info_path(vmid)).decode("utf-8", "replace")
        except (FileNotFoundError, StoreError):
            return PreviousInfo()  # no record: the next backup is full
        return PreviousInfo.parse(text, vmtype)

    def write_previous(self, vmid: int, info: PreviousInfo) -> None:
        write_atomic(self.previous_info_path(vmid), info.to_json())

    def read_previous_raw(self, vmid: int) -> bytes | None:
        """previous-info as it is on disk (None: none, or not a regular file)."""
        try:
            return read_regular(self.previous_info_path(vmid))
        except (FileNotFoundError, StoreError):
            return None

    def restore_previous_raw(self, vmid: int, raw: bytes | None) -> None:
        """Put previous-info back as read_previous_raw found it (None: none)."""
        path = self.previous_info_path(vmid)
        if raw is None:
            path.unlink()
        else:
            write_atomic(path, raw)

    @contextlib.contextmanager
    def rewrite(self, bid: BackupId) -> Iterator[BackupRewrite]:
        """New content for some files of a published backup, made aside in a
        staging directory (`.<name>.merge-<pid>`, which clean_stale removes
        after a crash) and put in place at once by BackupRewrite.commit."""
        final = self.require(bid)
        staging = temporary_name(final, "merge")
        shutil.rmtree(staging, ignore_errors=True)  # left over by a crashed merge of ours
        staging.mkdir()
        try:
            yield BackupRewrite(self, bid, final, staging)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def failed_logs(self, vmid: int) -> list[BackupId]:
        """The failed backups of a guest whose logs are kept (oldest first)."""
        gdir = self.guest_dir(vmid)
        if not real_dir(gdir):
            return []
        out = []
        for p in gdir.iterdir():
            name, dot, suffix = p.name.partition(".")
            m = _NAME_RE.fullmatch(name)
            if m and dot and suffix == "failed" and int(m.group(2)) <= MAX_EPOCH and real_dir(p):
                out.append(BackupId(vmid, VmType(m.group(1)), int(m.group(2))))
        return sorted(out, key=lambda b: (b.epoch, b.vmtype))

    def remove_failed_log(self, bid: BackupId) -> None:
        """Delete the kept log of a failed backup."""
        _remove_tree(self.failed_dir(bid))

    def remove_backup(self, bid: BackupId) -> None:
        """Delete a published backup directory (callers handle chains first)."""
        _remove_tree(self.require(bid))


def _note(problems: list[StoreProblem] | None, path: Path, message: str) -> None:
    if problems is not None:
        problems.append(StoreProblem(path, message))


def describe_error(exc: BaseException) -> str:
    """An error as one line, naming its file (OSError's str() is clumsy)."""
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    return " ".join(str(exc).split()) or type(exc).__name__


def _remove_tree(path: Path) -> None:
    """Remove a directory of the store: renamed first, so it disappears from
    listings at once and a crash leaves a `.removing-` name that clean_stale
    finishes."""
    doomed = path.with_name(f".{path.name}.removing-{os.getpid()}")
    os.rename(path, doomed)
    shutil.rmtree(doomed)
    fsync_path(path.parent)


def _disk_file(device: str) -> str:
    """The file name of a disk's image in a backup."""
    return f"{check_device_name(device)}{_IMAGE_SUFFIX}"
