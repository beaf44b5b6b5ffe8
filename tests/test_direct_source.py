"""The host's direct source (api.DIRECT_KEY): the provider reads local disks
itself, and what it stores is what reading through qemu-nbd stores.

Every case backs the same disk up twice: into one store through the direct
path, into another with a provider that drops the key (the NBD path, as a
provider that does not know the extension reads).  The manifests' per-chunk
digests must be equal and both restores must equal the disk."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from conftest import KiB, MiB, assert_same

from dirbackup import qcow2, qemu
from dirbackup.api import DIRECT_KEY
from dirbackup.errors import DirbackupError
from dirbackup.host import Disk, Host
from dirbackup.provider import DirectoryBackupProvider
from dirbackup.storage import DirectoryStorage

GiB = 1 << 30
TiB = 1 << 40
FALLBACK = "DEV: reading through qemu-nbd: "


class NbdOnlyProvider(DirectoryBackupProvider):
    """A provider that ignores the direct source, as one that does not know it."""

    def backup_vm(
        self, vmid: int, guest_config: str, volumes: Mapping[str, Any], info: Any
    ) -> None:
        assert all(DIRECT_KEY in v for v in volumes.values()), "the host passed no direct source"
        stripped = {d: {k: v for k, v in v.items() if k != DIRECT_KEY} for d, v in volumes.items()}
        super().backup_vm(vmid, guest_config, stripped, info)


class Side:
    """One store and the host that backs up into it, with its log."""

    def __init__(self, root: Path, direct: bool) -> None:
        root.mkdir()
        self.storage = DirectoryStorage("st", {"path": str(root)})
        self.lines: list[str] = []
        factory = None
        if not direct:

            def factory(log: Any) -> DirectoryBackupProvider:
                return NbdOnlyProvider(self.storage, self.storage.scfg, "st", log)

        self.host = Host(
            self.storage,
            "st",
            log=lambda level, msg: self.lines.append(f"{level}: {msg}"),
            new_provider=factory,
        )
        self.volids: list[str] = []

    def backup(self, disks: list[Disk], t: int) -> None:
        self.lines.clear()
        report = self.host.backup_vm(100, disks, start_time=1_700_000_000 + t)
        self.volids.append(report.volid)

    def manifest(self, volid: str) -> dict[str, Any]:
        path = self.storage.store.backup_dir(self.storage.backup_id(volid)) / "manifest.json"
        return json.loads(path.read_text())

    def fallbacks(self) -> list[str]:
        return [line for line in self.lines if FALLBACK in line]

    def restore(self, volid: str, device: str, out: Path) -> Path:
        self.host.restore_vm(volid, {device: out}, force=True)
        return out


def both(tmp_path: Path) -> tuple[Side, Side]:
    return Side(tmp_path / "direct", True), Side(tmp_path / "nbd", False)


def assert_equal_backups(
    tmp_path: Path, d: Side, n: Side, disk: Disk, fmt: str, index: int = -1
) -> None:
    """Same digests, same mode, same cluster size; both restores equal the disk."""
    md = d.manifest(d.volids[index])["disks"][disk.device]
    mn = n.manifest(n.volids[index])["disks"][disk.device]
    for key in ("digests", "mode", "cluster_size", "digest_chunk", "size"):
        assert md[key] == mn[key], key
    for side, name in ((d, "d"), (n, "n")):
        out = side.restore(side.volids[index], disk.device, tmp_path / f"restored-{name}.raw")
        assert_same(disk.path, out, fmt, "raw")
        assert out.stat().st_size == md["size"]
        out.unlink()


def make_raw(path: Path, size: int, writes: list[tuple[int, bytes]]) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
        for off, data in writes:
            f.seek(off)
            f.write(data)
        f.flush()
        os.fsync(f.fileno())  # allocated now: an O_DIRECT read would flush it (st_blocks)
    return path


def test_host_passes_direct_source_and_export(tmp_path: Path) -> None:
    seen: dict[str, Any] = {}

    class Recording(DirectoryBackupProvider):
        def backup_vm(self, vmid: int, cfg: str, volumes: Mapping[str, Any], info: Any) -> None:
            seen.update(volumes)
            super().backup_vm(vmid, cfg, volumes, info)

    storage = DirectoryStorage("st", {"path": str(tmp_path)})
    host = Host(storage, "st", new_provider=lambda log: Recording(storage, storage.scfg, "st", log))
    img = make_raw(tmp_path / "disk.raw", 4 * MiB, [(0, b"x" * 4096)])
    host.backup_vm(100, [Disk("drive-scsi0", img)], start_time=1_700_000_000)
    vol = seen["drive-scsi0"]
    assert vol[DIRECT_KEY] == {"path": str(img), "format": "raw", "bitmap": None}
    assert vol["nbd-path"] and vol["size"] == 4 * MiB


@pytest.mark.parametrize(
    "kind",
    ["raw", "qcow2", "overlay", "qcow2-odd", "raw-1000", "raw-sparse-1t", "qcow2-sparse-1t"],
)
def test_direct_equals_nbd(tmp_path: Path, kind: str) -> None:
    src = tmp_path / "src"
    src.mkdir()
    pattern = [(0, b"\x01" * 70000), (5 * MiB + 123, b"\x02" * 3 * MiB), (40 * MiB, b"\x03")]
    if kind == "raw":
        img, fmt = make_raw(src / "d.raw", 64 * MiB, pattern), "raw"
    elif kind == "raw-1000":
        img, fmt = make_raw(src / "d.raw", 1000, [(0, b"\x07" * 999)]), "raw"
    elif kind == "raw-sparse-1t":
        writes = [(k * 100 * GiB + 12345, b"\x05" * MiB) for k in range(10)]
        img, fmt = make_raw(src / "d.raw", TiB, [*writes, (TiB - 4096, b"\x09" * 4096)]), "raw"
    else:
        fmt = "qcow2"
        img = src / "d.qcow2"
        size = {"qcow2-odd": MiB + 512, "qcow2-sparse-1t": TiB}.get(kind, 64 * MiB)
        if kind == "overlay":
            base = src / "base.qcow2"
            qemu.img_create(base, size)
            qemu.io(base, "write -P 0x11 0 8M", "write -P 0x12 30M 2M")
            subprocess.run(
                ["qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
                 str(img)], check=True,
            )  # fmt: skip
            qemu.io(img, "write -P 0x21 1M 64k", "write -z 30M 1M", "write -P 0x22 60M 3M")
        elif kind == "qcow2-odd":
            qemu.img_create(img, size)
            qemu.io(img, "write -P 0x31 0 64k", f"write -P 0x32 {MiB} 512")
        elif kind == "qcow2-sparse-1t":
            qemu.img_create(img, size)
            qemu.io(img, "write -P 0x41 0 1M", f"write -P 0x42 {TiB // 2} 2M",
                    f"write -P 0x43 {TiB - 64 * KiB} 64k")  # fmt: skip
        else:
            qemu.img_create(img, size)
            qemu.io(img, "write -P 0x51 0 1M", "write -P 0x52 10M 3M", "write -z 20M 1M")
    disk = Disk("drive-scsi0", img)
    before = (img.read_bytes() if img.stat().st_size < GiB else b"", img.stat().st_blocks)
    d, n = both(tmp_path)
    d.backup([disk], 0)
    assert d.fallbacks() == []
    assert any("to read directly" in line for line in d.lines), d.lines
    if fmt == "raw":  # read only: nothing discarded or changed (qcow2 images get bitmaps)
        assert (
            img.read_bytes() if img.stat().st_size < GiB else b"",
            img.stat().st_blocks,
        ) == before
    n.backup([disk], 0)
    assert not any("to read directly" in line for line in n.lines)
    assert_equal_backups(tmp_path, d, n, disk, fmt)


def test_incremental_direct_equals_nbd(tmp_path: Path) -> None:
    img = tmp_path / "d.qcow2"
    qemu.img_create(img, 32 * MiB)
    qemu.io(img, "write -P 0x01 0 16M", "write -P 0x02 30M 1M")
    disk = Disk("drive-scsi0", img)
    d, n = both(tmp_path)
    for t, cmds in enumerate(
        [
            (),
            ("write -P 0x21 1M 100k", "write -z 4M 1M", "discard 8M 2M", "write -P 0x22 31M 4k"),
            ("write -z 0 64k", "write -P 0x23 20M 3M"),
        ]
    ):
        if cmds:
            qemu.io(img, *cmds)
        d.backup([disk], t)
        n.backup([disk], t)
        assert d.fallbacks() == []
        if t:
            assert any("incremental backup" in line and "directly" in line for line in d.lines)
            assert d.manifest(d.volids[-1])["mode"] == "incremental"
        md, mn = (s.manifest(s.volids[-1])["disks"]["drive-scsi0"] for s in (d, n))
        for key in ("dirty_bytes", "written_bytes", "parent"):
            assert md[key] == mn[key], key
        assert_equal_backups(tmp_path, d, n, disk, "qcow2")


def set_in_use(img: Path, name: str) -> None:
    """Set QEMU's in_use flag of bitmap `name` in the image's bitmap directory,
    as a writer killed with the image open leaves it."""
    header = qcow2.read_header(img)
    assert header.bitmaps is not None
    start = header.bitmaps.directory_offset
    with open(img, "r+b") as f:
        f.seek(start)
        raw = f.read(header.bitmaps.directory_size)
        pos = 0
        while pos < len(raw):  # entries: table offset, size, flags, type, bits, name size, extra
            (flags,) = struct.unpack_from(">I", raw, pos + 12)
            name_size, extra = struct.unpack_from(">HI", raw, pos + 18)
            if raw[pos + 24 + extra : pos + 24 + extra + name_size].decode() == name:
                f.seek(start + pos + 12)
                f.write(struct.pack(">I", flags | 1))
                f.flush()
                os.fsync(f.fileno())
                return
            pos += (24 + extra + name_size + 7) & ~7
    raise AssertionError(f"no bitmap {name} in {img}")


def test_bitmap_left_in_use_gives_full_backups_on_both_paths(tmp_path: Path) -> None:
    """A bitmap a killed writer left in use: the host sees it before the
    export starts, and both paths take the same full backup."""
    img = tmp_path / "d.qcow2"
    qemu.img_create(img, 16 * MiB)
    qemu.io(img, "write -P 0x01 0 4M")
    disk = Disk("drive-scsi0", img)
    d, n = both(tmp_path)
    d.backup([disk], 0)
    n.backup([disk], 0)
    qemu.io(img, "write -P 0x02 1M 64k")
    for b in qemu.bitmaps(img):
        set_in_use(img, b["name"])
    assert all("in-use" in b["flags"] for b in qemu.bitmaps(img))
    d.backup([disk], 1)
    n.backup([disk], 1)
    for side in (d, n):
        assert side.manifest(side.volids[-1])["mode"] == "full"
        assert any(x.endswith(" is in-use; full backup") for x in side.lines), side.lines
    assert d.fallbacks() == []
    assert_equal_backups(tmp_path, d, n, disk, "qcow2")


def test_bitmap_in_use_behind_the_export_fails_the_backup(tmp_path: Path) -> None:
    """The image's bitmap marked in use after the host checked it and started
    the export (only a writer that ignores QEMU's lock can do that): no
    incremental from it, the backup fails; the next one is full and right."""
    img = tmp_path / "d.qcow2"
    qemu.img_create(img, 16 * MiB)
    qemu.io(img, "write -P 0x01 0 4M")
    disk = Disk("drive-scsi0", img)
    d = Side(tmp_path / "direct", True)

    class Poking(DirectoryBackupProvider):
        def backup_vm(self, vmid: int, cfg: str, volumes: Mapping[str, Any], info: Any) -> None:
            src = volumes["drive-scsi0"][DIRECT_KEY]
            if src["bitmap"]:
                set_in_use(Path(src["path"]), src["bitmap"])
            super().backup_vm(vmid, cfg, volumes, info)

    d.host = Host(
        d.storage,
        "st",
        log=lambda level, msg: d.lines.append(f"{level}: {msg}"),
        new_provider=lambda log: Poking(d.storage, d.storage.scfg, "st", log),
    )
    d.backup([disk], 0)  # full: no bitmap to continue, nothing poked
    qemu.io(img, "write -P 0x02 1M 64k")
    with pytest.raises(DirbackupError) as err:
        d.backup([disk], 1)
    assert str(err.value).startswith("drive-scsi0: the dirty bitmap cannot be trusted (")
    assert "is in use (QEMU did not close it cleanly)" in str(err.value)
    assert len(d.storage.list_volumes(100)) == 1
    qemu.io(img, "write -P 0x03 2M 64k")
    d.backup([disk], 2)
    assert d.manifest(d.volids[-1])["mode"] == "full"
    out = d.restore(d.volids[-1], "drive-scsi0", tmp_path / "restored.raw")
    assert_same(img, out, "qcow2", "raw")


@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
def test_compressed_image_is_read_directly(tmp_path: Path, ctype: str) -> None:
    """A guest image of compressed clusters (`qemu-img convert -c`): the chain
    reader maps them and the copy's workers decompress them, for a full and
    for an incremental whose dirty clusters are compressed too (QEMU writes
    compressed clusters only where nothing was allocated)."""
    plain = tmp_path / "plain.qcow2"
    qemu.img_create(plain, 16 * MiB)
    qemu.io(plain, "write -P 0x61 0 4M", "write -P 0x62 9M 1M", "write -z 12M 1M")
    img = tmp_path / "d.qcow2"
    options = ["-o", "compression_type=zstd"] if ctype == "zstd" else []
    subprocess.run(
        ["qemu-img", "convert", "-c", *options, "-f", "qcow2", "-O", "qcow2", str(plain),
         str(img)], check=True,
    )  # fmt: skip
    with qcow2.Chain(img, "/") as chain:
        assert chain.headers[0].compression_type == {"zlib": 0, "zstd": 1}[ctype]
        assert int((chain.map()[:, 2] == qcow2.MAP_COMPRESSED).sum()) >= 64
    disk = Disk("drive-scsi0", img)
    d, n = both(tmp_path)
    for t, cmds in enumerate(
        [(), ("write -c -P 0x63 5M 64k", "write -c -P 0x64 6M 128k", "write -P 0x65 9M 4k")]
    ):
        if cmds:
            qemu.io(img, *cmds)
        d.backup([disk], t)
        n.backup([disk], t)
        assert d.fallbacks() == []
        assert any("to read directly" in line for line in d.lines), d.lines
        md, mn = (s.manifest(s.volids[-1])["disks"]["drive-scsi0"] for s in (d, n))
        assert md["mode"] == ("incremental" if t else "full")
        for key in ("dirty_bytes", "written_bytes") if t else ():
            assert md[key] == mn[key], key
        assert_equal_backups(tmp_path, d, n, disk, "qcow2")
    with qcow2.Chain(img, "/") as chain:  # the incremental read compressed clusters
        rows = chain.map(5 * MiB, 64 * KiB)
        assert rows[:, 2].tolist() == [qcow2.MAP_COMPRESSED]


def test_raw_backing_falls_back_once(tmp_path: Path) -> None:
    base = make_raw(tmp_path / "base.raw", 8 * MiB, [(MiB, b"\x71" * MiB)])
    img = tmp_path / "d.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "raw", str(img)],
        check=True,
    )
    qemu.io(img, "write -P 0x72 4M 64k")
    disk = Disk("drive-scsi0", img)
    d, n = both(tmp_path)
    d.backup([disk], 0)
    n.backup([disk], 0)
    (line,) = d.fallbacks()
    assert "backing format 'raw' is not qcow2" in line
    assert_equal_backups(tmp_path, d, n, disk, "qcow2")


def test_small_clusters_fall_back(tmp_path: Path) -> None:
    img = tmp_path / "d.qcow2"
    qemu.img_create(img, 8 * MiB, cluster_size=4096)
    qemu.io(img, "write -P 0x81 4k 4k", "write -P 0x82 1M 8k")
    disk = Disk("drive-scsi0", img)
    d, n = both(tmp_path)
    d.backup([disk], 0)
    n.backup([disk], 0)
    (line,) = d.fallbacks()
    assert "finer than the backup's 65536-byte clusters" in line
    assert_equal_backups(tmp_path, d, n, disk, "qcow2")


def test_block_device(tmp_path: Path, loop_device: Any) -> None:
    dev = loop_device(16 * MiB)
    with open(dev, "r+b") as f:
        f.seek(3 * MiB)
        f.write(b"\x91" * 300 * KiB)
    disk = Disk("drive-scsi0", dev)
    d, n = both(tmp_path)
    d.backup([disk], 0)
    n.backup([disk], 0)
    assert d.fallbacks() == []
    assert any("to read directly" in line for line in d.lines)
    assert_equal_backups(tmp_path, d, n, disk, "raw")


def test_disk_in_use_is_refused(tmp_path: Path) -> None:
    img = tmp_path / "d.qcow2"
    qemu.img_create(img, 8 * MiB)
    server = qemu.start_nbd(img, str(tmp_path / "w.sock"), readonly=False)
    try:
        d = Side(tmp_path / "direct", True)
        with pytest.raises(DirbackupError, match="lock"):
            d.backup([Disk("drive-scsi0", img)], 0)
    finally:
        server.stop()
    assert d.storage.list_volumes(100) == []


def test_bandwidth_limit_holds_on_the_direct_path(tmp_path: Path) -> None:
    img = make_raw(tmp_path / "d.raw", 16 * MiB, [(0, b"\xa1" * 12 * MiB)])
    d = Side(tmp_path / "direct", True)
    start = time.monotonic()
    report = d.host.backup_vm(
        100, [Disk("drive-scsi0", img)], start_time=1_700_000_000, bandwidth_limit=4 * MiB
    )
    seconds = time.monotonic() - start
    assert any("to read directly" in line for line in d.lines)
    # 12 MiB at 4 MiB/s with one request's burst: at least 2 s
    assert seconds >= 1.9, seconds
    assert report.volid
