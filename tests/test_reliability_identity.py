"""Reliability: an incremental is taken only when the chain is proven.

A disk's dirty bitmap must hold every change since exactly the backup the
incremental builds on: same store, same device, same image.  Each way to
break that -- two stores sharing a disk, a mistyped device name, the disk
replaced (by another image, or by an older copy of itself), its bitmap
re-created or disabled by another tool, another disk at the same path, an
overlay whose backing file changed underneath, a chain as deep as a restore
follows -- must end in a full backup, never a wrong incremental: every
restore point is compared with the guest as it was, by qemu-img compare."""

from __future__ import annotations

import json
from pathlib import Path

from faultlib import MiB, assert_store_sound
from guests import Guest, restore_and_compare

from dirbackup import qemu
from dirbackup.host import Disk, Host
from dirbackup.storage import DirectoryStorage

S0 = "drive-scsi0"
DEFAULT_STOREID = "dirbackup"  # the command line's default: two stores share it


class Scene:
    """One guest, any number of stores (all with the default storage id), and
    every restore point taken, with the guest's state at that time."""

    def __init__(self, tmp_path: Path, devices: dict[str, int] | None = None) -> None:
        self.tmp = tmp_path
        self.guest = Guest(tmp_path, devices or {S0: 16 * MiB})
        self.stores: dict[str, DirectoryStorage] = {}
        self.points: list[tuple[DirectoryStorage, str, dict[str, Path]]] = []
        self.logs: list[str] = []

    def store(self, name: str = "a") -> DirectoryStorage:
        if name not in self.stores:
            root = self.tmp / f"store-{name}"
            root.mkdir()
            self.stores[name] = DirectoryStorage(DEFAULT_STOREID, {"path": str(root)})
        return self.stores[name]

    def disk(self, dev: str = S0) -> Path:
        return self.tmp / f"{dev}.qcow2"

    def backup(self, store: str = "a", disks: dict[str, Path] | None = None) -> dict[str, str]:
        """Back up (all disks, or `disks` as device -> image); the disks' modes."""
        storage = self.store(store)
        chosen = [
            Disk(d, p) for d, p in (disks or {d.device: d.path for d in self.guest.disks}).items()
        ]
        state = {}
        for d in chosen:
            out = self.tmp / f"{d.device}.p{len(self.points)}.raw"
            qemu.run(["qemu-img", "convert", "-U", "-O", "raw", str(d.path), str(out)])
            state[d.device] = out
        host = Host(storage, DEFAULT_STOREID, log=lambda lvl, msg: self.logs.append(msg))
        report = host.backup_vm(100, chosen)
        self.points.append((storage, report.volid, state))
        manifest = json.loads((Path(storage.path(report.volid)[0]) / "manifest.json").read_text())
        return {dev: rec["mode"] for dev, rec in manifest["disks"].items()}

    def every_restore_point_is_exact(self) -> None:
        for storage in self.stores.values():
            assert [v for s, v, _ in self.points if s is storage] == assert_store_sound(storage)
        for storage, volid, state in self.points:
            restore_and_compare(storage, volid, state, self.tmp)


def test_two_stores_with_the_default_storeid_keep_two_chains(tmp_path: Path) -> None:
    """One disk backed up alternately into two stores opened with the same
    (default) storage id: each store's bitmap is its own."""
    s = Scene(tmp_path)
    assert s.backup("a") == {S0: "full"}
    s.guest.change(S0, "write -P 0x31 1M 1M")  # only store b's first backup sees it...
    assert s.backup("b") == {S0: "full"}
    s.guest.change(S0, "write -P 0x32 4M 64k")
    assert s.backup("a") == {S0: "incremental"}  # ...store a's second must carry it too
    s.guest.change(S0, "write -P 0x33 6M 64k")
    assert s.backup("b") == {S0: "incremental"}
    s.guest.change(S0, "write -P 0x34 8M 64k")
    assert s.backup("a") == {S0: "incremental"}
    s.every_restore_point_is_exact()


def test_a_mistyped_device_name_in_between(tmp_path: Path) -> None:
    """A backup under a mistyped device name starts a chain of its own; the
    next backup under the right name must not build on the backup before the
    typo with the bitmap the typo started."""
    s = Scene(tmp_path)
    assert s.backup() == {S0: "full"}
    s.guest.change(S0, "write -P 0x41 1M 1M")  # before the typo
    assert s.backup(disks={"drive-scsci0": s.disk()}) == {"drive-scsci0": "full"}
    s.guest.change(S0, "write -P 0x42 5M 64k")
    s.backup()
    s.every_restore_point_is_exact()
