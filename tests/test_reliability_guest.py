"""Reliability: the guest changes between backups.

Disks grown and shrunk (qemu-img resize), added and removed; the dirty bitmap
removed, disabled, or left inconsistent by a process killed while it had the
disk open for writing (QEMU's "in-use" flag), and a bitmap lost just before a
backup that then fails or is killed.  The affected disk gets a full backup,
never a wrong incremental: every restore point is compared with the guest as
it was."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest
from faultlib import (
    MiB,
    assert_store_sound,
    cli,
    cli_killed_at,
    cli_popen,
    leftovers,
    partial_dirs,
    servers_for,
    wait_for,
)
from guests import STOREID, Guest, make_storage, restore_and_compare, store_bitmap

from dirbackup import qemu
from dirbackup.host import Disk, Host

S0, S1 = "drive-scsi0", "drive-scsi1"


class Scene:
    def __init__(self, tmp_path: Path, devices: dict[str, int]) -> None:
        self.tmp = tmp_path
        self.storage = make_storage(tmp_path)
        self.guest = Guest(tmp_path, devices)
        self.host = Host(self.storage, STOREID)
        self.points: list[tuple[str, dict[str, Path]]] = []

    def disk(self, dev: str) -> Path:
        return self.tmp / f"{dev}.qcow2"

    def backup(self, *devices: str) -> dict[str, str]:
        """Back up the given disks (all by default); returns the disks' modes."""
        disks = [Disk(d, self.disk(d)) for d in devices] if devices else self.guest.disks
        state = {d.device: self.snap(d.device) for d in disks}
        report = self.host.backup_vm(100, disks)
        self.points.append((report.volid, state))
        manifest = json.loads(
            (Path(self.storage.path(report.volid)[0]) / "manifest.json").read_text()
        )
        return {dev: rec["mode"] for dev, rec in manifest["disks"].items()}

    def snap(self, dev: str) -> Path:
        out = self.tmp / f"{dev}.p{len(self.points)}.raw"
        qemu.run(["qemu-img", "convert", "-U", "-O", "raw", str(self.disk(dev)), str(out)])
        return out

    def every_restore_point_is_exact(self) -> None:
        assert [v for v, _ in self.points] == assert_store_sound(self.storage)
        for volid, state in self.points:
            restore_and_compare(self.storage, volid, state, self.tmp)


def test_disk_grown_and_shrunk(tmp_path: Path) -> None:
    s = Scene(tmp_path, {S0: 16 * MiB, S1: 8 * MiB})
    assert s.backup() == {S0: "full", S1: "full"}
    s.guest.change(S1, "write -P 0x61 1M 64k")
    qemu.run(["qemu-img", "resize", "-q", str(s.disk(S0)), "+8M"])
    s.guest.change(S0, "write -P 0x62 20M 1M", "write -P 0x63 0 64k")
    assert s.backup() == {S0: "full", S1: "incremental"}
    s.guest.change(S0, "write -P 0x64 23M 512k")
    assert s.backup() == {S0: "incremental", S1: "incremental"}
    qemu.run(["qemu-img", "resize", "-q", "--shrink", str(s.disk(S0)), "4M"])
    s.guest.change(S0, "write -P 0x65 3M 4k")
    assert s.backup() == {S0: "full", S1: "incremental"}
    s.every_restore_point_is_exact()


def test_disks_added_and_removed(tmp_path: Path) -> None:
    s = Scene(tmp_path, {S0: 16 * MiB, S1: 8 * MiB})
    assert s.backup(S0) == {S0: "full"}
    s.guest.change(S0, "write -P 0x71 2M 1M")
    s.guest.change(S1, "write -P 0x72 0 1M")
    assert s.backup() == {S0: "incremental", S1: "full"}  # S1 added
    s.guest.change(S0, "write -P 0x73 5M 64k")
    s.guest.change(S1, "write -z 0 512k")
    assert s.backup(S1) == {S1: "incremental"}  # S0 removed...
    s.guest.change(S0, "write -P 0x74 6M 64k")
    s.guest.change(S1, "discard 4M 1M")
    # ...and back: its bitmap has tracked everything since its last backup
    assert s.backup() == {S0: "incremental", S1: "incremental"}
    s.every_restore_point_is_exact()


def test_bitmap_removed_or_disabled(tmp_path: Path) -> None:
    s = Scene(tmp_path, {S0: 16 * MiB, S1: 8 * MiB})
    s.backup()
    s.guest.change(S0, "write -P 0x81 1M 1M")
    s.guest.change(S1, "write -P 0x82 1M 1M")
    qemu.bitmap(s.disk(S0), "remove", store_bitmap(s.storage, S0))
    assert s.backup() == {S0: "full", S1: "incremental"}
    s.guest.change(S0, "write -P 0x83 3M 1M")
    qemu.bitmap(s.disk(S1), "disable", store_bitmap(s.storage, S1))
    s.guest.change(S1, "write -P 0x84 3M 1M")  # not tracked
    assert s.backup() == {S0: "incremental", S1: "full"}
    s.every_restore_point_is_exact()


def test_bitmap_left_in_use_by_a_killed_writer(tmp_path: Path) -> None:
    """A process killed with the disk open for writing leaves QEMU's "in-use"
    flag on the bitmap: it may miss writes, so it is not trusted."""
    s = Scene(tmp_path, {S0: 16 * MiB})
    s.backup()
    qemu_io = ["stdbuf", "-oL", "qemu-io", "-f", "qcow2", "-c", "write -P 0x91 2M 1M"]
    writer = subprocess.Popen(
        [*qemu_io, "-c", "sleep 20000", str(s.disk(S0))], stdout=subprocess.PIPE
    )
    try:
        assert writer.stdout is not None
        assert b"wrote" in writer.stdout.readline()
        writer.send_signal(signal.SIGKILL)
    finally:
        writer.wait()
    flags = {b["name"]: b["flags"] for b in qemu.bitmaps(s.disk(S0))}[store_bitmap(s.storage, S0)]
    assert "in-use" in flags, flags
    assert s.backup() == {S0: "full"}
    s.guest.change(S0, "write -P 0x92 4M 64k")
    assert s.backup() == {S0: "incremental"}
    s.every_restore_point_is_exact()


@pytest.mark.parametrize("how", ["killed", "failed"])
def test_backup_after_a_lost_bitmap_dies(tmp_path: Path, how: str) -> None:
    """The bitmap is gone, so the host starts a new one and a full backup; that
    backup is killed (or fails).  The changes made before it must not be lost
    to the next backup: it may not build on the old base with the new bitmap."""
    s = Scene(tmp_path, {S0: 16 * MiB})
    s.backup()
    s.guest.change(S0, "write -P 0xa1 1M 1M")  # made while the bitmap is lost
    qemu.bitmap(s.disk(S0), "remove", store_bitmap(s.storage, S0))
    store = ["--store", s.storage.scfg.path, "--storeid", STOREID]
    args = ["backup", *store, "--vmid", "100", "--disk", f"{S0}={s.disk(S0)}"]
    if how == "killed":
        proc = cli_killed_at("rename", 3, *args)  # before the publishing rename
        assert proc.returncode in (137, -9), proc.stderr
        wait_for(lambda: not servers_for(str(tmp_path)), timeout=10)
    else:
        popen = cli_popen(*args, "--bwlimit", "4M")
        try:
            wait_for(
                lambda: [p for p in partial_dirs(s.storage, 100) if (p / f"{S0}.qcow2").exists()]
            )
            for server in servers_for(str(s.disk(S0))):
                subprocess.run(["kill", "-9", server.split()[0]], check=True)
            _out, err = popen.communicate(timeout=60)
        finally:
            if popen.poll() is None:
                popen.kill()
                popen.wait()
        assert popen.returncode == 1, err
    assert len(assert_store_sound(s.storage)) == 1
    s.guest.change(S0, "write -P 0xa2 8M 64k")
    s.backup()
    assert not leftovers(Path(s.storage.scfg.path))
    s.every_restore_point_is_exact()


def test_cli_run_after_a_resize(tmp_path: Path) -> None:
    """The same through the command line, with a raw disk next to it."""
    s = Scene(tmp_path, {S0: 8 * MiB})
    raw = tmp_path / "data.raw"
    raw.write_bytes(bytes(range(256)) * (4 * MiB // 256))
    store = ["--store", s.storage.scfg.path, "--storeid", STOREID]
    disks = ["--disk", f"{S0}={s.disk(S0)}", "--disk", f"{S1}={raw}"]
    cli("backup", *store, "--vmid", "100", *disks)
    qemu.run(["qemu-img", "resize", "-q", str(s.disk(S0)), "12M"])
    s.guest.change(S0, "write -P 0xb1 10M 1M")
    with open(raw, "r+b") as f:
        f.seek(MiB)
        f.write(b"\xb2" * 4096)
    out = cli("backup", *store, "--vmid", "100", *disks).stdout
    assert f"{S0} full, {S1} full" in out, out
    volid = out.split(":")[0] + ":" + out.split(":")[1]
    state = {S0: s.snap(S0), S1: raw}
    restore_and_compare(s.storage, volid, state, tmp_path)


@pytest.mark.parametrize("first", ["full", "incremental"])
def test_write_right_after_the_export_stops(tmp_path: Path, first: str) -> None:
    """A VM that writes its disk in the moment between the end of the
    snapshot access (the export stops, the image is unlocked) and the bitmap
    being advanced: that write must be in the next incremental."""
    s = Scene(tmp_path, {S0: 16 * MiB})
    if first == "incremental":
        s.backup()
        s.guest.change(S0, "write -P 0xc1 1M 64k")
    state = s.snap(S0)

    class WriteInTheGap(Host):
        def _advance_bitmaps(self, marks):  # type: ignore[no-untyped-def]
            s.guest.change(S0, "write -P 0xc2 6M 64k")  # the VM, in the gap
            super()._advance_bitmaps(marks)

    report = WriteInTheGap(s.storage, STOREID).backup_vm(100, s.guest.disks)
    s.points.append((report.volid, {S0: state}))
    s.backup()  # must carry the write made in the gap
    s.every_restore_point_is_exact()
