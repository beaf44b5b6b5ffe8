"""Removing a backup without breaking the chains built on it.

An incremental backup's images are backed by its parent's.  Removing a
backup that others build on first folds it into each child (qcow2.merge_layers):
both layers are checked against their digests before anything changes
(verify.check_merge), each merged image must read exactly as the two layers
did (verify.check_merged), and the child's merged images and manifest take
its place at once (store.Store.rewrite).  Here too: which backup a backup
builds on (parent_of), from its manifest or, for the seed's layout, from its
images' backing files.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from dirbackup import qcow2
from dirbackup.api import LogFunction
from dirbackup.errors import DirbackupError, ImageError, IntegrityError, StoreError
from dirbackup.manifest import DiskRecord, digest_map
from dirbackup.store import BackupEntry, BackupId, Store
from dirbackup.verify import Checker, MergeCheck, check_merge, check_merged


@dataclass(frozen=True)
class _Merge:
    """One image of a child to merge its base into, with the checked outcome."""

    device: str
    record: DiskRecord | None
    image: Path
    base_record: DiskRecord | None
    check: MergeCheck


def parent_of(entry: BackupEntry) -> BackupId | None:
    """The backup an incremental builds on (the newest one its disks name)."""
    if entry.manifest is not None:
        parents = [d.parent for d in entry.manifest.disks.values() if d.parent]
        if not parents:
            return None
        try:
            return max(BackupId.parse(p) for p in parents)
        except DirbackupError:
            return None  # a damaged manifest (verify reports it)
    return _seed_parent(entry)


def _seed_parent(entry: BackupEntry) -> BackupId | None:
    """For a backup without manifest: follow the first image's backing file."""
    for img in entry.seed_images().values():
        try:
            header = qcow2.read_header(img)
        except ImageError:
            continue
        if not header.backing_name:
            continue
        backing = Path(header.backing_name)
        if not backing.is_absolute():
            backing = img.parent / backing
        try:
            return BackupId.parse(f"{entry.id.vmid}/{backing.parent.name}")
        except DirbackupError:
            return None
    return None


def children_of(bid: BackupId, entries: list[BackupEntry]) -> list[BackupEntry]:
    """The backups among `entries` whose images build on `bid`."""
    out = []
    for entry in entries:
        if entry.id == bid:
            continue
        if entry.manifest is not None:
            if any(d.parent == bid.volname for d in entry.manifest.disks.values()):
                out.append(entry)
        elif _seed_parent(entry) == bid:
            out.append(entry)
    return out


def remove(store: Store, entry: BackupEntry, log: LogFunction | None) -> None:
    """Remove a published backup.  Protected backups are refused, and so is
    one a later backup that cannot be read may build on; a backup that is the
    base of others is first merged into each of them, so they stay whole.
    Every merge is planned and checked before the first one starts."""
    bid = entry.id
    if entry.manifest is not None and entry.manifest.protected:
        raise StoreError(f"backup {bid.archive} is protected; unprotect it first")
    entries = store.backups(bid.vmid)
    for later in entries:
        if later.problem and later.id.epoch > bid.epoch:
            # it may build on this one: removing it could break its chain
            raise StoreError(
                f"the later backup {later.id.volname} cannot be read and may build "
                f"on {bid.volname} ({later.problem})"
            )
    checker = Checker(store)
    # every merge is checked before the first one starts: a refusal changes nothing
    merges = [(c, _merge_plan(store, bid, entry, c, checker)) for c in children_of(bid, entries)]
    for child, todo in merges:
        _merge_into(store, bid, entry, child, todo, checker, log)
    store.remove_backup(bid)


def _merge_plan(
    store: Store, bid: BackupId, entry: BackupEntry, child: BackupEntry, checker: Checker
) -> list[_Merge]:
    """The child's images that build on `bid`'s, each with both layers
    checked against their digests (IntegrityError if one fails)."""
    gdir = store.guest_dir(bid.vmid)
    m = child.manifest
    disks = m.disks if m is not None else dict.fromkeys(child.seed_images())
    todo = []
    for device, record in disks.items():
        if record is not None and record.parent != bid.volname:
            continue
        image = child.image_path(device, record)
        with qcow2.Chain(image, gdir) as chain:
            if chain.depth < 2 or Path(chain.paths[1]).parent != entry.path.resolve():
                continue
            base_record = None
            if entry.manifest is not None:
                base_record = entry.manifest.disks.get(device)
                if base_record is None:
                    raise IntegrityError(
                        f"{child.id.volname}: {device} builds on {bid.volname}, whose "
                        f"manifest has no disk {device}; nothing was changed"
                    )
            check = check_merge(checker, chain, device, child.id, record, bid, base_record)
        todo.append(_Merge(device, record, image, base_record, check))
    return todo


def _merge_into(
    store: Store,
    bid: BackupId,
    entry: BackupEntry,
    child: BackupEntry,
    todo: list[_Merge],
    checker: Checker,
    log: LogFunction | None,
) -> None:
    """Fold `bid`'s images into the child's that build on them.

    Each merged image must read exactly as the two checked layers did
    (check_merged) before it is used, and the child's new digests are
    those of the merged image as written.  The merged images and the
    updated manifest replace the child's at once (Store.rewrite): a crash
    at any point leaves either the old child or the new one."""
    if not todo:
        return
    gdir = store.guest_dir(bid.vmid)
    m = child.manifest
    if log:
        log("info", f"merging {bid.volname} into {child.id.volname} before removal")
    with store.rewrite(child.id) as rewrite:
        for job in todo:
            merged = rewrite.new_path(job.image.name)
            with qcow2.Chain(job.image, gdir) as chain:
                if chain.depth < 2 or Path(chain.paths[1]).parent != entry.path.resolve():
                    raise IntegrityError(f"{job.image} no longer builds on {bid.volname}")
                qcow2.merge_layers(chain, merged)
            digests = check_merged(checker, merged, job.check, bid, child.id)
            if m is not None and job.record is not None:
                grand = job.base_record.parent if job.base_record is not None else None
                m.disks[job.device] = replace(
                    job.record,
                    parent=grand,
                    mode="incremental" if grand else "full",
                    digests=digest_map(digests),
                )
        if m is not None:
            parents = [d.parent for d in m.disks.values() if d.parent]
            m = replace(
                m,
                parent=max(parents) if parents else None,
                mode="incremental" if parents else "full",
            )
        rewrite.commit([job.image.name for job in todo], m)
