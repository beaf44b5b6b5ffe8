"""Verify backups, and check the layers a merge or a restore is about to trust.

A VM backup's disk is a chain of qcow2 layers: its own image on top of the
images of the backups it builds on.  Each layer is checked against the
manifest of the backup that holds it: the image is that record's file, of its
size, backed by exactly the image of the same disk in the record's parent (by
nothing for a full backup), and its own clusters add up to the per-chunk
digests the copy loop recorded while writing them.  A backup is only as good
as its chain: a base that fails fails every backup built on it, and their
results say which base is bad.  A `Checker` reads each layer once, however
many backups of one verify run share it.

Failures are recorded in the failing backup (`Store.mark_check_failed`), so
that no incremental is built on it; a verify of it that succeeds clears that.
Removal checks both layers of a merge before anything is written and the
merged image afterwards (`check_merge`, `check_merged`); `require_chain`
checks a whole chain before it is served to a reader that checks nothing
itself (qemu-img).
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from dirbackup import qcow2
from dirbackup.api import VmType
from dirbackup.errors import DirbackupError, IntegrityError, StoreError
from dirbackup.fsutil import sha256_file
from dirbackup.manifest import DiskRecord, Manifest, digest_map
from dirbackup.store import (
    BackupEntry,
    BackupId,
    Store,
)

Digests = npt.NDArray[np.uint64]


#: Verifier's progress callback: (item, bytes done, bytes in all) of one item.
VerifyProgress = Callable[[str, int, int], object]


@dataclass(frozen=True)
class VerifyResult:
    """The outcome of verifying one backup."""

    volid: str
    ok: bool
    problems: tuple[str, ...] = ()
    checked_bytes: int = 0


@dataclass(frozen=True)
class LayerProblem:
    """What is wrong with layer `layer` of a chain (0: the top image), and the
    backup that holds that layer (None where it is no backup's image)."""

    layer: int
    bid: BackupId | None
    text: str


def _first_chunk(keys: set[str]) -> int:
    return min((int(k) for k in keys if k.isascii() and k.isdigit()), default=0)


def digest_problem(digests: Digests, record: DiskRecord) -> str | None:
    """How a layer's digests differ from those its record holds, or None."""
    got = digest_map(digests)
    if got == record.digests:
        return None
    differ = {k for k, _v in set(got.items()) ^ set(record.digests.items())}
    first = _first_chunk(differ) * record.digest_chunk
    return f"data does not match its digests (first difference in the chunk at offset {first})"


class Checker:
    """Checks chain layers against their backups' manifests; each manifest is
    read once and each layer's data once (per Checker: make one per run, as
    a layer's file does not change its identity when a bit of it rots)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._manifests: dict[BackupId, Manifest | str | None] = {}
        self._digests: dict[tuple[object, ...], str | None] = {}

    def manifest(self, bid: BackupId) -> Manifest | None:
        """A backup's manifest (None: made without one); StoreError if unreadable."""
        if bid not in self._manifests:
            try:
                self._manifests[bid] = self.store.read_manifest(bid)
            except (DirbackupError, OSError) as exc:
                self._manifests[bid] = str(exc)
        m = self._manifests[bid]
        if isinstance(m, str):
            raise StoreError(m)
        return m

    def layer_backup(self, chain: qcow2.Chain, i: int, vmid: int) -> BackupId:
        """The backup whose directory holds layer i of a chain of guest `vmid`."""
        path = Path(chain.paths[i])
        try:
            bid = BackupId.parse(f"{vmid}/{path.parent.name}")
        except DirbackupError:
            raise IntegrityError(f"{path} is not the image of a backup") from None
        if path.parent != self.store.backup_dir(bid).resolve():
            raise IntegrityError(f"{path} is not the image of a backup")
        return bid

    def structure(
        self, chain: qcow2.Chain, i: int, device: str, bid: BackupId, rec: DiskRecord | None
    ) -> str | None:
        """What is wrong with layer i as its record describes it, short of its
        data: which file it is, its size, its backing file, its digest chunk."""
        if rec is None:
            return None  # made without a manifest: nothing to hold it against
        path = Path(chain.paths[i])
        if path.parent != self.store.backup_dir(bid).resolve() or path.name != rec.file:
            return f"the image read is {path}, not {bid.volname}'s {rec.file}"
        header = chain.headers[i]
        if header.virtual_size != qcow2.virtual_size_for(rec.size):
            return f"virtual size {header.virtual_size} differs from the manifest's {rec.size}"
        below = Path(chain.paths[i + 1]) if i + 1 < chain.depth else None
        if rec.parent:
            parent = BackupId.parse(rec.parent)
            if below is None or below.parent != self.store.backup_dir(parent).resolve():
                return f"backing file is not {rec.parent}"
            try:
                pm = self.manifest(parent)
            except StoreError:
                pm = None  # the layer beneath reports its own manifest
            if pm is not None and (device not in pm.disks or pm.disks[device].file != below.name):
                return f"backing file is not {rec.parent}'s image of {device}"
        elif below is not None:
            return "a full backup image has a backing file"
        if rec.digest_chunk <= 0 or rec.digest_chunk % header.cluster_size:
            return f"invalid digest chunk {rec.digest_chunk}"
        return None

    def data(
        self,
        chain: qcow2.Chain,
        i: int,
        device: str,
        bid: BackupId,
        rec: DiskRecord,
        progress: Callable[[int], object] | None = None,
    ) -> str | None:
        """Whether layer i's own clusters match its record's digests (read
        through the chain's open file, once per Checker; `progress(n)`: n more
        bytes read)."""
        st = os.fstat(chain.fds[i])
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, bid, device)
        if key not in self._digests:
            own, _view = qcow2.layer_views(
                chain, i, rec.digest_chunk, rec.size, progress=progress
            )
            self._digests[key] = digest_problem(own, rec)
        return self._digests[key]

    def chain(
        self,
        chain: qcow2.Chain,
        device: str,
        top: BackupId,
        record: DiskRecord | None,
        progress: Callable[[int], object] | None = None,
    ) -> list[LayerProblem]:
        """The problems of every layer of the chain of disk `device` of backup
        `top` (`record`: its manifest's record, None without a manifest;
        `progress(n)`: n more bytes of the layers' data read).  A
        layer whose link to the next one is wrong ends the walk: what lies
        beneath is not the chain the manifests describe."""
        problems: list[LayerProblem] = []
        bid: BackupId | None = top
        rec = record
        for i in range(chain.depth):
            try:
                if i:
                    bid = None
                    if record is None and not _backup_named(chain.paths[i]):
                        continue  # the seed's layout: no manifests to hold it against
                    bid = self.layer_backup(chain, i, top.vmid)
                    m = self.manifest(bid)
                    rec = None if m is None else m.disks.get(device)
                    if m is not None and rec is None:
                        raise IntegrityError(f"its manifest has no disk {device}")
                assert bid is not None
                text = self.structure(chain, i, device, bid, rec)
                if text is None and rec is not None:
                    problem = self.data(chain, i, device, bid, rec, progress)
                    if problem is not None:
                        problems.append(LayerProblem(i, bid, problem))
                    continue
            except (DirbackupError, OSError, ValueError) as exc:
                text = str(exc)
            if text is not None:
                problems.append(LayerProblem(i, bid, text))
                break
        return problems

    def mark(self, bid: BackupId | None, reason: str) -> str | None:
        """Record a check failure; returns why it could not be recorded, if so."""
        if bid is None:
            return None
        try:
            if self.store.check_failure(bid) != " ".join(reason.split()):
                self.store.mark_check_failed(bid, reason)
        except (DirbackupError, OSError) as exc:
            return str(exc)
        return None


def _backup_named(path: str) -> bool:
    try:
        BackupId.parse(f"1/{Path(path).parent.name}")
    except DirbackupError:
        return False
    return True


def describe(device: str, p: LayerProblem) -> str:
    """One problem line of a backup's result: its own layer, or which base is bad."""
    if p.layer == 0 or p.bid is None:
        return f"{device}: {p.text}"
    return f"{device}: its base {p.bid.volname} fails its check: {p.text}"


# ---------------------------------------------------------------------------- verify


class Verifier:
    """Verifies backups of one store (a run: layers shared by several backups
    are read once).  A bad backup is reported in its result, never raised,
    so one never stops the verify of the others."""

    def __init__(
        self, store: Store, storeid: str, progress: VerifyProgress | None = None
    ) -> None:
        """`progress(item, done, total)`: of what a bar calls `item` (a disk of
        a backup, "VMID/DEVICE", or its files, "VMID/files"), `done` of
        `total` bytes are checked; done == total once the item is."""
        self.checker = Checker(store)
        self.storeid = storeid
        self.progress: VerifyProgress = progress or (lambda item, done, total: None)

    def verify(self, entry: BackupEntry) -> VerifyResult:
        """Re-read one backup and check every digest, archive and chain; record
        the outcome in the backup (a failure marks it, success clears that)."""
        bases: dict[BackupId, str] = {}
        try:
            problems, checked = self._check(entry, bases)
        except (DirbackupError, OSError, ValueError) as exc:
            problems, checked = [str(exc)], 0
        for base, reason in bases.items():
            self.checker.mark(base, reason)
        if problems:
            failed = self.checker.mark(entry.id, problems[0])
            if failed is not None:
                problems.append(f"(this failure could not be recorded in the store: {failed})")
        else:
            # where it cannot be cleared it stays marked: the next backup is full
            with contextlib.suppress(DirbackupError, OSError):
                self.checker.store.clear_check_failure(entry.id)
        volid = entry.id.volid(self.storeid)
        return VerifyResult(volid, not problems, tuple(problems), checked)

    def _check(self, entry: BackupEntry, bases: dict[BackupId, str]) -> tuple[list[str], int]:
        if entry.problem is not None:
            return [entry.problem], 0
        gdir = self.checker.store.guest_dir(entry.id.vmid)
        m = entry.manifest
        problems: list[str] = []
        checked = 0
        disks: dict[str, DiskRecord | None]
        disks = dict.fromkeys(entry.seed_images()) if m is None else dict(m.disks)
        for device, disk in disks.items():
            if disk is not None and (
                Path(disk.file).name != disk.file or disk.file in ("", ".", "..")
            ):
                problems.append(f"{device}: the manifest names {disk.file!r}, not a file here")
                continue
            image = entry.image_path(device, disk)
            item = f"{entry.id.vmid}/{device}"
            try:
                with qcow2.Chain(image, gdir) as chain:
                    chain.map()
                    # at most every layer is read (a layer checked before is not)
                    total = sum(os.fstat(fd).st_size for fd in chain.fds)
                    done = 0

                    def read(n: int, item: str = item, total: int = total) -> None:
                        nonlocal done
                        done = min(done + n, total - 1)
                        self.progress(item, done, total)

                    self.progress(item, 0, total)
                    found = self.checker.chain(chain, device, entry.id, disk, read)
                    self.progress(item, total, total)
                if disk is not None:
                    checked += image.stat().st_size
            except (DirbackupError, OSError) as exc:
                problems.append(str(exc) if disk is None else f"{device}: {exc}")
                continue
            for p in found:
                problems.append(describe(device, p))
                if p.layer and p.bid is not None:
                    bases.setdefault(p.bid, f"{device}: {p.text}")
        if m is None:
            if entry.id.vmtype == VmType.QEMU and not disks:
                problems.append("no disk images")
            problems += [f"{name} is missing" for name in entry.missing_seed_files()]
            return problems, 0
        files_total, files_done = max(sum(r.size for r in m.files.values()), 1), 0
        for name, rec in m.files.items():
            path = entry.file(name)
            if Path(name).name != name or name in ("", ".", ".."):
                problems.append(f"the manifest names {name!r}, not a file here")
                continue
            try:
                st = path.lstat()
            except FileNotFoundError:
                problems.append(f"{name} is missing")
                continue
            if not stat.S_ISREG(st.st_mode):
                problems.append(f"{name} is not a regular file (a symlink?); refused")
                continue
            if st.st_size != rec.size:
                problems.append(f"{name}: size {st.st_size} differs from the manifest's {rec.size}")
                continue
            if rec.sha256 and rec.sha256 != sha256_file(path):
                problems.append(f"{name}: content does not match its sha256")
            elif entry.is_archive(name):
                from dirbackup import container

                try:
                    container.verify_archive(path)
                except DirbackupError as exc:
                    problems.append(str(exc))
            checked += st.st_size
            files_done += st.st_size
            self.progress(f"{entry.id.vmid}/files", files_done, files_total)
        return problems, checked


# ---------------------------------------------------------------------------- restore


def require_chain(checker: Checker, chain: qcow2.Chain, top: BackupId, device: str) -> list[str]:
    """Check every layer of a disk's chain (one read of each) before it is
    served to a reader that checks nothing itself; IntegrityError naming the
    bad layer, which is marked.  Returns the images that have no digests to
    check (backups made without a manifest)."""
    m = checker.manifest(top)
    record = None if m is None else m.disks.get(device)
    if m is not None and record is None:
        raise IntegrityError(f"{top.volname} has no disk {device}")
    problems = checker.chain(chain, device, top, record)
    if problems:
        p = problems[0]
        checker.mark(p.bid, f"{device}: {p.text}")
        if p.bid != top:
            checker.mark(top, describe(device, p))
        raise IntegrityError(f"{top.volname}: {describe(device, p)}; refused")
    unchecked = []
    for i, path in enumerate(chain.paths):
        try:
            bid = top if i == 0 else checker.layer_backup(chain, i, top.vmid)
            if checker.manifest(bid) is None:
                unchecked.append(path)
        except DirbackupError:
            unchecked.append(path)
    return unchecked


# ---------------------------------------------------------------------------- merge


@dataclass(frozen=True)
class MergeCheck:
    """What merging a checked base into its checked child must give: the
    merged image's view digests (see qcow2.layer_views), in `unit`-byte
    pieces (its cluster size), summed per `chunk`."""

    device: str
    unit: int
    chunk: int
    size: int
    bottom: bool
    view: Digests


def check_merge(
    checker: Checker,
    chain: qcow2.Chain,
    device: str,
    child: BackupId,
    child_rec: DiskRecord | None,
    base: BackupId,
    base_rec: DiskRecord | None,
) -> MergeCheck:
    """Check both layers a merge will read (the child's image, layer 0, and
    its base's, layer 1) against their manifests in one read of each, and
    note what the merged image must then read as.  A layer that fails is
    marked and the merge refused (IntegrityError) before anything is written:
    merging bad data would recompute the child's digests from it, and the
    damage would pass every later verify."""
    unit = min(h.cluster_size for h in chain.headers[:2])
    size = chain.virtual_size
    bottom = chain.depth == 2
    chunk = next((r.digest_chunk for r in (child_rec, base_rec) if r is not None), 16 << 20)
    view = np.zeros((size + chunk - 1) // chunk, dtype=np.uint64)
    shadow = None
    for i, (bid, rec) in enumerate(((child, child_rec), (base, base_rec))):
        problem = checker.structure(chain, i, device, bid, rec)
        if problem is None:
            own_chunk = rec.digest_chunk if rec is not None else chunk
            same = own_chunk == chunk  # else a second read for the view (never seen)
            own, part = qcow2.layer_views(
                chain, i, own_chunk, size, unit if same else 0, bottom=bottom, shadow=shadow
            )
            if part is None:
                _, part = qcow2.layer_views(
                    chain, i, chunk, size, unit, bottom=bottom, shadow=shadow
                )
            assert part is not None
            view += part
            problem = digest_problem(own, rec) if rec is not None else None
        if problem is not None:
            checker.mark(bid, f"{device}: {problem}")
            raise IntegrityError(
                f"refusing to merge {base.volname} into {child.volname}: {bid.volname} "
                f"fails its check ({device}: {problem}); nothing was changed"
            )
        shadow = qcow2.allocated(chain, 0)
    return MergeCheck(device, unit, chunk, size, bottom, view)


def check_merged(
    checker: Checker, image: Path, check: MergeCheck, base: BackupId, child: BackupId
) -> Digests:
    """Check a merged image before it replaces the child's: it must read
    exactly as the two checked layers did, and its own digests (returned,
    for the child's manifest) must be what a second read of it gives."""
    own, view = qcow2.image_views(image, check.chunk, check.size, check.unit, bottom=check.bottom)
    problem = None
    if view is None or not np.array_equal(view, check.view):
        differ = np.flatnonzero(view != check.view) if view is not None else np.array([0])
        first = int(differ[0]) * check.chunk if differ.size else 0
        problem = f"the merged image reads differently (first in the chunk at offset {first})"
    elif not np.array_equal(qcow2.image_digests(image, check.chunk, check.size), own):
        problem = "the merged image does not read the same twice"
    if problem is None:
        return own
    reason = (
        f"{check.device}: merging {base.volname} into {child.volname} failed its check: {problem}"
    )
    checker.mark(base, reason)
    checker.mark(child, reason)
    raise IntegrityError(f"{reason}; the merge was discarded")
