"""The standalone host's dirty bitmaps on qcow2 guest disks.

With a provider that offers api.BitmapGenerations (ours), each store names its
own bitmaps, `<prefix>-<generation>`, the prefix holding the store's identity,
and each successful backup starts a new generation.  Before a backup the host
reports to the provider which of the store's bitmaps are on each disk and
what lies below the disk's top image; the provider decides.  With any other
provider the host keeps the hypervisor's single bitmap per storage,
`dirbackup-<storeid>`.

The lifecycle, per qcow2 disk (raw disks have no bitmap and are read whole):

* prepare: `reuse` when the provider said `use` and the bitmap to continue
  is there and usable, else `new` (`use`/`new` asked) or `none`.  Every other
  bitmap of the store goes: a full backup starts a new chain.  For `reuse`
  and `new` the bitmap `<prefix>.next` starts now, before the export: it
  records every write after the snapshot point, also those made between the
  end of the export and `advance`.
* advance (the backup is stored): `.next` becomes the generation the provider
  names for the new backup, and the old generation goes.
* drop (the backup failed before that): `.next` goes; the old generation
  still holds everything since the last good backup.

Every crash window ends in a full backup, never a wrong incremental: killed
before `advance`, the disk keeps the old generation while the provider
expects the new one; killed inside `advance`, the next prepare removes
whichever generation is not expected.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dirbackup import qemu
from dirbackup.api import (
    BACKING_KEY,
    BITMAPS_KEY,
    BackupProvider,
    BitmapGenerations,
    BitmapMode,
    LogFunction,
)
from dirbackup.errors import DirbackupError

USABLE, DISABLED, IN_USE = "usable", "disabled", "in-use"


def legacy_name(storeid: str) -> str:
    """The single bitmap per storage the host keeps for a provider without
    generations (and dirbackup kept before them)."""
    return f"dirbackup-{storeid}"


def state(bitmap: Mapping[str, Any]) -> str:
    """usable (enabled and consistent), disabled, or in-use (left inconsistent
    by a writer that died: it may miss writes)."""
    flags = bitmap.get("flags", [])
    if "in-use" in flags:
        return IN_USE
    return USABLE if "auto" in flags else DISABLED


def backing_identity(chain: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]] | None:
    """What lies below a qcow2 disk's top image, layer by layer (`chain` is
    `qemu-img info --backing-chain` of the disk): real path, format, device,
    inode, size, mtime and ctime.  Writes into a backing file are in no
    bitmap of the top image; they change its mtime and ctime.  None when a
    layer is not a local regular file (its changes cannot be seen)."""
    layers = []
    for entry in chain[1:]:
        name = str(entry.get("filename", ""))
        if not name.startswith("/") and not os.path.exists(name):
            return None  # json:, protocol or otherwise not a local file
        try:
            st = os.stat(name)
        except OSError:
            return None
        if not stat.S_ISREG(st.st_mode):
            return None
        layers.append(
            {
                "path": os.path.realpath(name),
                "format": str(entry.get("format", "")),
                "dev": st.st_dev,
                "ino": st.st_ino,
                "size": st.st_size,
                "mtime_ns": st.st_mtime_ns,
                "ctime_ns": st.st_ctime_ns,
            }
        )
    return layers


@dataclass
class _Disk:
    path: Path
    mode: BitmapMode = BitmapMode.NONE
    read: str | None = None  # the bitmap the backup reads (reuse)


@dataclass
class Bitmaps:
    """The bitmaps of one VM backup's disks, for one store."""

    provider: BackupProvider
    storeid: str
    vmid: int
    log: LogFunction
    disks: dict[str, _Disk] = field(default_factory=dict)
    # per image path: its bitmaps as query_facts' `qemu-img info` found them,
    # so that prepare, right after the provider's answer, needs no second
    # call (nothing writes the image in between: a writer holding its lock
    # would make the `--add` of prepare and the export fail)
    _seen: dict[Path, list[dict[str, Any]]] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        self.generations = isinstance(self.provider, BitmapGenerations)
        if self.generations:
            self.prefix = self.provider.bitmap_prefix()  # type: ignore[attr-defined]
        else:
            self.prefix = legacy_name(self.storeid)
        self.next = f"{self.prefix}.next"

    def _ours(self, name: str) -> bool:
        if name == self.next:
            return True
        if self.generations:
            return name.startswith(f"{self.prefix}-")
        return name == self.prefix

    def _expected(self, device: str) -> str | None:
        if self.generations:
            return self.provider.expected_bitmap(self.vmid, device)  # type: ignore[attr-defined]
        return self.prefix

    def query_facts(self, path: Path, fmt: str) -> dict[str, Any]:
        """The extension keys of backup_vm_query_incremental for one disk."""
        if not self.generations or fmt != "qcow2":
            return {}
        chain = qemu.img_info(path, fmt="qcow2", chain=True)
        top = list(chain[0].get("format-specific", {}).get("data", {}).get("bitmaps", []))
        self._seen[path] = top
        found = {b["name"]: state(b) for b in top if self._ours(b["name"])}
        found.pop(self.next, None)
        return {
            BITMAPS_KEY: dict(sorted(found.items())),
            BACKING_KEY: backing_identity(chain),
        }

    def prepare(
        self, disks: Sequence[tuple[str, Path, str]], choices: Mapping[str, str]
    ) -> dict[str, BitmapMode]:
        """Decide each disk's bitmap mode (see the module doc) and start the
        `.next` bitmaps; `disks` are (device, path, format)."""
        for device, path, fmt in disks:
            disk = self.disks[device] = _Disk(path)
            choice = choices.get(device)
            if fmt != "qcow2":
                continue
            seen = self._seen.pop(path, None)
            listed = seen if seen is not None else qemu.bitmaps(path)
            present = {b["name"]: state(b) for b in listed}
            expected = self._expected(device) if choice == "use" else None
            if expected is not None and present.get(expected) == USABLE:
                disk.mode, disk.read = BitmapMode.REUSE, expected
            elif choice in ("use", "new"):
                disk.mode = BitmapMode.NEW
                if choice == "use":
                    self.log(
                        "info",
                        f"{device}: dirty bitmap {expected or self.prefix} "
                        f"{_how(present.get(expected or ''))}; full backup, a new bitmap "
                        "starts with it",
                    )
            for name in present:
                if self._ours(name) and name != disk.read:
                    qemu.bitmap(path, "remove", name)
            legacy = legacy_name(self.storeid)
            if self.generations and legacy in present and not self._ours(legacy):
                # the single bitmap of dirbackup before generations: no longer read
                qemu.bitmap(path, "remove", legacy)
            if disk.mode != BitmapMode.NONE:
                qemu.bitmap(path, "add", self.next)
        return {device: d.mode for device, d in self.disks.items()}

    def reading(self, device: str) -> str | None:
        """The bitmap the backup of `device` reads, if it is incremental."""
        return self.disks[device].read

    def passed_name(self, device: str) -> str:
        """The `bitmap-name` the provider gets with the nbd mechanism whenever
        the disk has a bitmap, as the hypervisor passes it also for mode
        `new`: the bitmap read (reuse), or the one that starts with this
        backup (new).  Only a `reuse` bitmap is on the export (as the NBD
        meta context `qemu:dirty-bitmap:NAME`); in mode `new` the provider
        reads everything, and a provider that asks the export for the new
        bitmap's map gets an error, never an empty map."""
        disk = self.disks[device]
        return disk.read if disk.read is not None else self.next

    def advance(self) -> None:
        """The backup is stored: the `.next` bitmap becomes the generation that
        starts with it (or, without generations, the store's one bitmap)."""
        for device, disk in self.disks.items():
            if disk.mode == BitmapMode.NONE:
                continue
            target = self._expected(device)
            if target is not None and target != disk.read:
                bitmap_cmd(disk.path, "--add", "--enable", "--merge", self.next, target)
            elif target is not None:  # the one bitmap without generations
                bitmap_cmd(disk.path, "--clear", "--merge", self.next, target)
            if disk.read is not None and disk.read != target:
                qemu.bitmap(disk.path, "remove", disk.read)
            qemu.bitmap(disk.path, "remove", self.next)

    def drop(self) -> None:
        """The backup failed before it was stored: the bitmaps stay as they were."""
        for disk in self.disks.values():
            if disk.mode != BitmapMode.NONE:
                with contextlib.suppress(DirbackupError):
                    qemu.bitmap(disk.path, "remove", self.next)


def bitmap_cmd(path: Path, *ops: str) -> None:
    """`qemu-img bitmap OPS... PATH NAME` (the last of `ops` is the bitmap's name)."""
    *options, name = ops
    qemu.run(["qemu-img", "bitmap", *options, "-f", "qcow2", str(path), name])


def _how(found: str | None) -> str:
    if found is None:
        return "is not on the disk"
    return {DISABLED: "is disabled", IN_USE: "was left inconsistent (in-use)"}.get(
        found, "is not usable"
    )
