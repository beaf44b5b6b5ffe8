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
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from faultlib import KiB, MiB, assert_store_sound, backup_args, cli, leftovers, volids
from guests import STOREID, Guest, make_storage, restore_and_compare

from dirbackup import qcow2, qemu
from dirbackup.api import BACKING_KEY, BITMAPS_KEY
from dirbackup.errors import DirbackupError, StoreError
from dirbackup.host import Disk, Host
from dirbackup.provider import DirectoryBackupProvider
from dirbackup.storage import DirectoryStorage
from dirbackup.store import Store

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
        self.snaps: list[Path] = []
        self.log: list[str] = []

    def store(self, name: str = "a") -> DirectoryStorage:
        if name not in self.stores:
            root = self.tmp / f"store-{name}"
            root.mkdir()
            self.stores[name] = DirectoryStorage(DEFAULT_STOREID, {"path": str(root)})
        return self.stores[name]

    def disk(self, dev: str = S0) -> Path:
        return self.tmp / f"{dev}.qcow2"

    def backup(
        self,
        store: str = "a",
        disks: dict[str, Path] | None = None,
        vmid: int = 100,
        host: type[Host] = Host,
    ) -> dict[str, str]:
        """Back up (all disks, or `disks` as device -> image); the disks' modes.
        `self.log` keeps the backup's log lines."""
        storage = self.store(store)
        chosen = [
            Disk(d, p) for d, p in (disks or {d.device: d.path for d in self.guest.disks}).items()
        ]
        state = self.snap(chosen)
        self.log = []
        runner = host(storage, DEFAULT_STOREID, log=lambda lvl, msg: self.log.append(msg))
        report = runner.backup_vm(vmid, chosen)
        self.points.append((storage, report.volid, state))
        manifest = json.loads((Path(storage.path(report.volid)[0]) / "manifest.json").read_text())
        return {dev: rec["mode"] for dev, rec in manifest["disks"].items()}

    def snap(self, disks: list[Disk]) -> dict[str, Path]:
        state = {}
        for d in disks:
            out = self.tmp / f"{d.device}.p{len(self.points)}-{len(self.snaps)}.raw"
            self.snaps.append(out)
            qemu.run(["qemu-img", "convert", "-U", "-O", "raw", str(d.path), str(out)])
            state[d.device] = out
        return state

    def generation(self, dev: str = S0, store: str = "a", vmid: int = 100) -> str:
        """The bitmap the next incremental of `dev` must continue from."""
        name = self.store(store).new_backup_provider().expected_bitmap(vmid, dev)
        assert name is not None
        return name

    def bitmaps(self, image: Path | None = None) -> dict[str, list[str]]:
        return {b["name"]: b["flags"] for b in qemu.bitmaps(image or self.disk())}

    def why_full(self) -> list[str]:
        """The lines of the last backup's log that say why a disk is full."""
        return [line for line in self.log if line.endswith("; full backup")]

    def every_restore_point_is_exact(self) -> None:
        for storage in self.stores.values():
            mine = sorted(v for s, v, _ in self.points if s is storage)
            assert mine == sorted(assert_store_sound(storage))
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
    gone = s.generation()
    assert s.backup() == {S0: "full"}
    assert s.why_full() == [
        f"{S0}: bitmap {gone} not found on the disk (found: {s.generation('drive-scsci0')}); "
        "full backup"
    ]
    s.every_restore_point_is_exact()


def test_disk_replaced_by_another_image(tmp_path: Path) -> None:
    s = Scene(tmp_path)
    s.backup()
    other = tmp_path / "other.qcow2"
    qemu.img_create(other, 16 * MiB)
    qemu.io(other, "write -P 0x51 0 4M")
    qemu.bitmap(other, "add", "someone-elses")
    gone = s.generation()
    other.replace(s.disk())
    assert s.backup() == {S0: "full"}
    assert s.why_full() == [f"{S0}: bitmap {gone} not found on the disk (found: none); full backup"]
    assert "someone-elses" in s.bitmaps()  # another tool's bitmap is left alone
    s.guest.change(S0, "write -P 0x52 2M 64k")
    assert s.backup() == {S0: "incremental"}
    s.every_restore_point_is_exact()


def test_disk_replaced_by_an_older_copy_of_itself(tmp_path: Path) -> None:
    """A copy taken before the last backup carries the bitmap generation of
    the backup before: it must not be read on top of the last one."""
    s = Scene(tmp_path)
    s.backup()
    s.guest.change(S0, "write -P 0x61 1M 1M")
    old = tmp_path / "old-copy.qcow2"
    shutil.copyfile(s.disk(), old)
    s.guest.change(S0, "write -P 0x62 3M 1M")
    assert s.backup() == {S0: "incremental"}
    s.guest.change(S0, "write -P 0x63 5M 64k")
    stale, last = next(iter(s.bitmaps(old))), s.generation()
    old.replace(s.disk())  # the old copy comes back
    assert s.backup() == {S0: "full"}
    assert s.why_full() == [
        f"{S0}: bitmap {last} not found on the disk (found: {stale}); full backup"
    ]
    s.guest.change(S0, "write -P 0x64 7M 64k")
    assert s.backup() == {S0: "incremental"}
    s.every_restore_point_is_exact()


@pytest.mark.parametrize("how", ["recreated", "forged", "disabled"])
def test_bitmap_recreated_by_another_tool_or_disabled(tmp_path: Path, how: str) -> None:
    """qemu-img bitmap removes the store's bitmap and adds one under another
    name (`forged`: one that looks like the store's), or disables it."""
    s = Scene(tmp_path)
    s.backup()
    s.guest.change(S0, "write -P 0x71 1M 1M")  # only the store's bitmap knows it
    gen = s.generation()
    if how == "disabled":
        qemu.bitmap(s.disk(), "disable", gen)
        reason = f"bitmap {gen} is disabled"
    else:
        qemu.bitmap(s.disk(), "remove", gen)
        name = f"{gen.rsplit('-', 1)[0]}-00000000" if how == "forged" else "recreated"
        qemu.bitmap(s.disk(), "add", name)
        found = name if how == "forged" else "none"
        reason = f"bitmap {gen} not found on the disk (found: {found})"
    s.guest.change(S0, "write -P 0x72 4M 64k")
    assert s.backup() == {S0: "full"}
    assert s.why_full() == [f"{S0}: {reason}; full backup"]
    # the store keeps one bitmap of the disk: the new generation
    assert [n for n in s.bitmaps() if n.startswith("dirbackup-")] == [s.generation()]
    s.guest.change(S0, "write -P 0x73 6M 64k")
    assert s.backup() == {S0: "incremental"}
    s.every_restore_point_is_exact()


def test_another_disk_at_the_same_path(tmp_path: Path) -> None:
    """Guest 200's disk, with a usable bitmap of the same store, put where
    guest 100's disk was: its bitmap continues guest 200's backup, not 100's."""
    s = Scene(tmp_path)
    (tmp_path / "g200").mkdir()
    other = Guest(tmp_path / "g200", {S0: 16 * MiB})
    s.backup()
    other.change(S0, "write -P 0x81 2M 1M")
    assert s.backup(disks={S0: other.disks[0].path}, vmid=200) == {S0: "full"}
    other.change(S0, "write -P 0x82 3M 64k")
    ours = s.disk().rename(tmp_path / "away.qcow2")
    other.disks[0].path.rename(s.disk())
    gone, found = s.generation(), s.generation(vmid=200)
    assert s.backup() == {S0: "full"}
    assert s.why_full() == [
        f"{S0}: bitmap {gone} not found on the disk (found: {found}); full backup"
    ]
    s.disk().rename(other.disks[0].path)
    ours.rename(s.disk())  # and back
    assert s.backup() == {S0: "full"}
    s.every_restore_point_is_exact()


@pytest.mark.parametrize("base_format", ["qcow2", "raw"])
def test_overlay_whose_backing_file_changed(tmp_path: Path, base_format: str) -> None:
    """Writes into an overlay's backing file are in no bitmap of the overlay."""
    s = Scene(tmp_path)
    base = tmp_path / f"base.{base_format}"
    qemu.img_create(base, 16 * MiB, fmt=base_format)
    qemu.io(base, "write -P 0x91 0 8M", fmt=base_format)
    top = tmp_path / "overlay.qcow2"
    qemu.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", base_format, str(top)]
    )
    qemu.io(top, "write -P 0x92 1M 64k")
    disks = {S0: top}
    assert s.backup(disks=disks) == {S0: "full"}
    qemu.io(top, "write -P 0x93 2M 64k")
    assert s.backup(disks=disks) == {S0: "incremental"}  # the base untouched: proven
    qemu.io(base, "write -P 0x94 4M 1M", fmt=base_format)  # underneath the overlay
    qemu.io(top, "write -P 0x95 6M 64k")
    assert s.backup(disks=disks) == {S0: "full"}
    assert s.why_full() == [
        f"{S0}: the disk below its top image changed since its last backup; full backup"
    ]
    qemu.io(top, "write -P 0x96 7M 64k")
    assert s.backup(disks=disks) == {S0: "incremental"}
    s.every_restore_point_is_exact()


# ---------------------------------------------------------------------- crash windows

KILLED_IN_ADVANCE = """
import os, signal, sys
from pathlib import Path
from dirbackup import bitmaps
from dirbackup.host import Disk, Host
from dirbackup.storage import DirectoryStorage

store, image, where = sys.argv[1:4]

class Killed(Host):
    def _advance_bitmaps(self, marks):
        if where == "inside":  # the new generation is made, the old one still there
            new = marks.provider.expected_bitmap(100, "drive-scsi0")
            bitmaps.bitmap_cmd(Path(image), "--add", "--enable", "--merge", marks.next, new)
        os.kill(os.getpid(), signal.SIGKILL)

storage = DirectoryStorage("dirbackup", {"path": store})
Killed(storage, "dirbackup").backup_vm(100, [Disk("drive-scsi0", Path(image))])
"""


@pytest.mark.parametrize("where", ["before", "inside"])
def test_killed_between_publish_and_bitmap_advance(tmp_path: Path, where: str) -> None:
    """kill -9 once the backup is published but before (or while) the disk's
    bitmap advances: the next backup is full (before), or a correct
    incremental on the published backup (inside)."""
    s = Scene(tmp_path)
    s.backup()
    s.guest.change(S0, "write -P 0xa1 1M 1M")
    state = s.snap(s.guest.disks)
    store = s.store().scfg.path
    proc = subprocess.run(
        [sys.executable, "-c", KILLED_IN_ADVANCE, store, str(s.disk()), where],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    volid = volids(s.store())[-1]
    s.points.append((s.store(), volid, state))  # published: a restore point
    assert not leftovers(Path(store))
    s.guest.change(S0, "write -P 0xa2 4M 64k")
    if where == "before":
        assert s.backup() == {S0: "full"}
        [line] = s.why_full()
        assert line.startswith(f"{S0}: bitmap {store_prefix(s)}-qemu-"), line
    else:
        assert s.backup() == {S0: "incremental"}
        assert s.store().list_volumes(100)[-1]["parent"] == volid
    assert [n for n in s.bitmaps() if n.startswith("dirbackup-")] == [s.generation()]
    s.every_restore_point_is_exact()


def test_failed_cleanup_after_publish(tmp_path: Path) -> None:
    """backup_cleanup fails once the backup is published and the bitmap has
    advanced: the backup goes, and the next one is full."""

    class CleanupFails(DirectoryBackupProvider):
        def backup_cleanup(self, vmid, vmtype, success, info):  # type: ignore[no-untyped-def]
            if success:
                raise StoreError("the storage went away")
            return super().backup_cleanup(vmid, vmtype, success, info)

    class FailingHost(Host):
        def __init__(self, storage, storeid, **kw):  # type: ignore[no-untyped-def]
            provider = CleanupFails(storage, storage.scfg, storeid, kw.get("log"))
            super().__init__(storage, storeid, provider=provider, **kw)

    s = Scene(tmp_path)
    s.backup()
    s.guest.change(S0, "write -P 0xb1 1M 1M")
    with pytest.raises(StoreError, match="the storage went away"):
        s.backup(host=FailingHost)
    assert len(volids(s.store())) == 1
    s.guest.change(S0, "write -P 0xb2 4M 64k")
    assert s.backup() == {S0: "full"}
    s.every_restore_point_is_exact()


# ---------------------------------------------------------------------- the extension


def test_a_host_that_reads_another_bitmap_is_refused(tmp_path: Path) -> None:
    """With the extension the provider knows which bitmap an incremental must
    read: a host that exports another one (or reuses where the answer was
    `new`) gets an error, not a backup."""
    s = Scene(tmp_path)
    s.backup()
    gen = s.generation()
    p = s.store().new_backup_provider()
    p.job_init(5000)
    p.backup_init(100, "qemu", 5000)
    usable = {S0: {"size": 16 * MiB, BITMAPS_KEY: {gen: "usable"}, BACKING_KEY: []}}
    assert p.backup_vm_query_incremental(100, usable) == {S0: "use"}
    vol = {"size": 16 * MiB, "bitmap-mode": "reuse", "nbd-path": "/nonexistent", "bitmap-name": "x"}
    with pytest.raises(
        DirbackupError, match=f"reuses bitmap x, but an incremental may only continue {gen}"
    ):
        p.backup_vm(100, "", {S0: vol}, {})
    p.backup_cleanup(100, "qemu", False, {"error": "refused"})
    p.backup_init(100, "qemu", 5001)
    missing = {S0: {"size": 16 * MiB, BITMAPS_KEY: {}, BACKING_KEY: []}}
    assert p.backup_vm_query_incremental(100, missing) == {S0: "new"}
    with pytest.raises(DirbackupError, match="may only continue none"):
        p.backup_vm(100, "", {S0: {**vol, "bitmap-name": gen}}, {})
    p.backup_cleanup(100, "qemu", False, {"error": "refused"})
    p.job_cleanup()
    # the hypervisor's API without the extension: answered as before
    assert p.backup_vm_query_incremental(100, {S0: {"size": 16 * MiB}}) == {S0: "use"}
    assert volids(s.store()) == [s.points[0][1]]


def store_prefix(s: Scene, store: str = "a") -> str:
    return s.store(store).new_backup_provider().bitmap_prefix()


def test_store_identity(tmp_path: Path) -> None:
    """Made once by the first backup, kept, shared by every thread that asks at
    once; a damaged one is one clear error, never silently replaced."""
    root = tmp_path / "store"
    root.mkdir()
    assert Store(root).identity(create=False) is None
    found: list[str | None] = []
    threads = [
        threading.Thread(target=lambda: found.append(Store(root).identity())) for _ in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(found) == 8 and len(set(found)) == 1
    ident = found[0]
    assert ident is not None and len(ident) == 16
    assert (root / "store-id").read_text() == ident + "\n"
    assert sorted(p.name for p in root.iterdir()) == ["store-id"]
    storage = DirectoryStorage(DEFAULT_STOREID, {"path": str(root)})
    assert storage.new_backup_provider().bitmap_prefix() == f"dirbackup-{ident}"
    (root / "store-id").write_text("garbage\n")
    image = tmp_path / "d.qcow2"
    qemu.img_create(image, MiB)
    res = cli(*backup_args(root, 100, image), check=1)
    assert res.stderr.strip().splitlines()[-1] == (
        f"error: {root / 'store-id'} is damaged (it holds no store identity); remove it to give "
        "the store a new one (the next backup of every disk is then full)"
    )
    assert "Traceback" not in res.stderr
    assert (root / "store-id").read_text() == "garbage\n"


# ---------------------------------------------------------------------- chain depth


def test_a_chain_never_grows_deeper_than_a_restore_follows(tmp_path: Path) -> None:
    """The hypervisor's way, 1 MiB disk, one 64 KiB change per backup: backup 65
    of a chain would be an image restore refuses ("backing chain deeper than
    64 images"); it is full instead, and every backup verifies and restores."""
    storage = make_storage(tmp_path)
    src = tmp_path / "disk.raw"
    src.write_bytes(bytes(range(256)) * (MiB // 256))
    lines: list[str] = []
    modes, states = [], {}
    total = qcow2.MAX_DEPTH + 2
    for i in range(total):
        offset = (i * 64 * KiB) % MiB
        with open(src, "r+b") as f:
            f.seek(offset)
            f.write(bytes([i + 1]) * 64 * KiB)
        p = DirectoryBackupProvider(storage, storage.scfg, STOREID, lambda _lvl, m: lines.append(m))
        p.job_init(1000 + i)
        p.backup_init(100, "qemu", 1000 + i)
        choice = p.backup_vm_query_incremental(100, {S0: {"size": MiB}})[S0]
        regions = iter([(offset, 64 * KiB)] if choice == "use" else [(0, MiB)])
        fd = os.open(src, os.O_RDONLY)
        try:
            vol = {
                "size": MiB,
                "bitmap-mode": "reuse" if choice == "use" else "new",
                "file-handle": fd,
                "next-dirty-region": lambda it=regions: next(it, None),
            }
            p.backup_vm(100, "", {S0: vol}, {})
            p.backup_cleanup(100, "qemu", True, {})
        finally:
            os.close(fd)
            p.job_cleanup()
        modes.append(choice)
        if i in (0, total - 3, total - 2, total - 1):
            states[i] = tmp_path / f"state{i}.raw"
            shutil.copyfile(src, states[i])
    depth = qcow2.MAX_DEPTH
    assert modes == ["new"] + ["use"] * (depth - 1) + ["new", "use"]
    listing = volids(storage)
    assert [ln for ln in lines if ln.endswith("; full backup")] == [
        f"{S0}: the chain of its last backup {listing[depth - 1].split('/')[-1]} is {depth} "
        f"images deep, the most a restore follows is {depth}; full backup"
    ]
    assert_store_sound(storage)  # every backup verifies
    for i, state in states.items():
        restore_and_compare(storage, listing[i], {S0: state}, tmp_path)


def test_chain_depth_limit_through_the_host(tmp_path: Path) -> None:
    """The same with bitmaps and generations, the limit lowered to 3 images."""
    s = Scene(tmp_path)

    class ShortChains(Host):
        def __init__(self, storage, storeid, **kw):  # type: ignore[no-untyped-def]
            provider = DirectoryBackupProvider(storage, storage.scfg, storeid, kw.get("log"))
            provider.max_chain_depth = 3
            super().__init__(storage, storeid, provider=provider, **kw)

    modes = []
    for i in range(6):
        s.guest.change(S0, f"write -P 0x{0xC0 + i:02x} {i}M 64k")
        modes.append(s.backup(host=ShortChains)[S0])
        if i == 3:
            assert s.why_full() == [
                f"{S0}: the chain of its last backup {volids(s.store())[2].split('/')[-1]} is 3 "
                "images deep, the most a restore follows is 3; full backup"
            ]
    assert modes == ["full", "incremental", "incremental", "full", "incremental", "incremental"]
    assert [n for n in s.bitmaps() if n.startswith("dirbackup-")] == [s.generation()]
    s.every_restore_point_is_exact()


def test_one_image_under_two_device_names_is_refused(tmp_path: Path) -> None:
    """Two devices would fight over one image's bitmaps: refused before anything."""
    s = Scene(tmp_path)
    link = tmp_path / "link.qcow2"
    link.symlink_to(s.disk())
    root = s.store().scfg.path
    res = cli(*backup_args(root, 100, s.disk(), "--disk", f"drive-scsi1={link}"), check=2)
    assert res.stderr.strip().splitlines()[-1] == (
        f"dirbackup backup: error: {link} (the same image as {s.disk()}) is given as both "
        f"{S0} and drive-scsi1"
    ), res.stderr
    assert not volids(s.store()) and s.bitmaps() == {}
