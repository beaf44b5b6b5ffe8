"""Compressed backups (issue 14): zstd qcow2 clusters written by our writer
and read back by QEMU and by our chain reader; QEMU's own compressed images
(zlib and zstd) read by our reader; hostile compressed descriptors refused;
the storage option, the CLI flag and the manifest."""

from __future__ import annotations

import json
import os
import shutil
import struct
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import KiB, MiB, assert_same
from faultlib import backup_args
from faultlib import cli as dirbackup
from guests import STOREID, Guest, make_storage, restore_and_compare

from dirbackup import compression, copy, extents, qcow2, qemu
from dirbackup.errors import ImageError, StoreError
from dirbackup.host import Host


def source_image(path: Path, size: int) -> None:
    """Text-like compressible data, random data, written zeros and holes."""
    rng = np.random.default_rng(7)
    with open(path, "wb") as f:
        f.truncate(size)
        text = b"".join(b"line %d of a compressible log file\n" % i for i in range(40000))
        f.write(text[: size // 3])
        f.seek(size // 2)
        f.write(rng.bytes(min(size // 5, 2 * MiB)))
        f.seek(size * 3 // 4)
        f.write(bytes(64 * KiB))
        f.seek(size - 3 * KiB)
        f.write(b"\x5a" * 1024)  # the last, partial cluster


def write_image(
    src: Path,
    out: Path,
    cluster: int,
    compress: str,
    backing: str | None = None,
    regions: extents.Extents | None = None,
) -> qcow2.Writer:
    size = src.stat().st_size
    fd = os.open(src, os.O_RDONLY)
    try:
        with qcow2.Writer(out, size, cluster, backing=backing, compress=compress) as w:
            if regions is None:
                regions = extents.align(extents.file_extents(fd, 0, size), cluster, w.virtual_size)
            copy.copy_regions(copy.FileSource(fd, name=str(src)), w, regions, digest_size=size)
            w.finish()
    finally:
        os.close(fd)
    return w


def check_clean(path: Path) -> dict[str, object]:
    report = qemu.img_check(path)
    assert report.get("check-errors", 0) == 0, report
    assert report.get("leaks", 0) == 0, report
    assert report.get("corruptions", 0) == 0, report
    return report  # type: ignore[no-any-return]


def restore_raw(image: Path, root: Path, out: Path, **options: int) -> copy.CopyStats:
    out.unlink(missing_ok=True)
    with qcow2.Chain(image, root) as chain, open(out, "wb") as f:
        f.truncate(chain.virtual_size)
        return qcow2.restore(
            chain, copy.FileTarget(f.fileno(), str(out), fresh=True), copy.CopyOptions(**options)
        )


@pytest.mark.parametrize("cluster", [512, 4 * KiB, 64 * KiB, 2 * MiB])
def test_writer_images_qemu_reads(tmp_path: Path, cluster: int) -> None:
    size = 9 * MiB + 3 * 512  # odd: not a multiple of any cluster size but 512
    src = tmp_path / "src.raw"
    source_image(src, size)
    out = tmp_path / "z.qcow2"
    w = write_image(src, out, cluster, "zstd")
    report = check_clean(out)
    assert_same(src, out, "raw", "qcow2")
    # the header: version 3, 112 bytes, compression_type zstd, incompatible bit 3
    head = out.read_bytes()[:112]
    assert struct.unpack_from(">I", head, 4)[0] == 3
    assert struct.unpack_from(">Q", head, 72)[0] == 8
    assert struct.unpack_from(">I", head, 100)[0] == 112
    assert head[104] == 1
    assert "zstd" in qemu.run(["qemu-img", "info", str(out)])
    if cluster == 512:
        # a stream in whole sectors can never be smaller than one sector
        assert w.compressed_clusters == 0
    else:
        assert w.compressed_clusters > 0
        assert report.get("compressed-clusters", 0) == w.compressed_clusters
        plain = tmp_path / "plain.qcow2"
        write_image(src, plain, cluster, "none")
        assert out.stat().st_size < plain.stat().st_size
    qemu.io(out, f"read -P 0x5a {size - 3 * KiB} 1024", fmt="qcow2")
    qemu.io(out, f"read -P 0 {size * 3 // 4} 64k", fmt="qcow2")
    # and our own reader gives the same bytes back
    assert_same(src, out, "raw", "qcow2")
    restore_raw(out, tmp_path, tmp_path / "back.raw")
    assert (tmp_path / "back.raw").read_bytes() == src.read_bytes()


def test_none_writes_todays_images(tmp_path: Path) -> None:
    src = tmp_path / "src.raw"
    source_image(src, 4 * MiB)
    write_image(src, tmp_path / "a.qcow2", 64 * KiB, "none")
    old = tmp_path / "b.qcow2"
    with qcow2.Writer(old, 4 * MiB, 64 * KiB) as w:  # no compress argument: as before
        fd = os.open(src, os.O_RDONLY)
        copy.copy_regions(
            copy.FileSource(fd),
            w,
            extents.align(extents.file_extents(fd, 0, 4 * MiB), 64 * KiB, 4 * MiB),
        )
        os.close(fd)
        w.finish()
    assert (tmp_path / "a.qcow2").read_bytes() == old.read_bytes()
    assert struct.unpack_from(">QQQII", old.read_bytes(), 72)[0] == 0
    assert struct.unpack_from(">I", old.read_bytes(), 100)[0] == 104


def test_compress_values(tmp_path: Path) -> None:
    assert compression.normalize("zstd") == f"zstd:{compression.DEFAULT_ZSTD_LEVEL}"
    assert compression.normalize("ZSTD:7") == "zstd:7"
    assert compression.normalize("none") == "none"
    for bad in ("zstd:0", "zstd:20", "lz4", "zstd:", "zstd:x", ""):
        with pytest.raises(ValueError, match="invalid compression"):
            compression.normalize(bad)
    with pytest.raises(StoreError, match="invalid compression 'gzip'"):
        make_storage(tmp_path, compress="gzip")


@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
@pytest.mark.parametrize("cluster", ["4k", "64k", "2M"])
def test_reader_reads_qemu_compressed_images(tmp_path: Path, ctype: str, cluster: str) -> None:
    src = tmp_path / "src.raw"
    source_image(src, 7 * MiB + 512)
    img = tmp_path / "q.qcow2"
    qemu.run(
        [
            "qemu-img",
            "convert",
            "-c",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-o",
            f"compression_type={ctype},cluster_size={cluster}",
            str(src),
            str(img),
        ]
    )
    with qcow2.Chain(img, tmp_path) as chain:
        assert (chain.map()[:, 2] == qcow2.MAP_COMPRESSED).any()
    restore_raw(img, tmp_path, tmp_path / "back.raw", workers=2)
    assert (tmp_path / "back.raw").read_bytes() == src.read_bytes()


def test_bandwidth_limit_counts_compressed_bytes_read(tmp_path: Path) -> None:
    src = tmp_path / "src.raw"
    with open(src, "wb") as f:
        f.write(b"".join(b"record %08d\n" % i for i in range(4 * MiB // 16)))
    for compress in ("zstd", "none"):
        img = tmp_path / f"{compress}.qcow2"
        write_image(src, img, 64 * KiB, compress)
        t0 = time.monotonic()
        stats = restore_raw(
            img, tmp_path, tmp_path / "back.raw", bandwidth_limit=MiB, request_size=MiB, workers=1
        )
        seconds = time.monotonic() - t0
        assert (tmp_path / "back.raw").read_bytes() == src.read_bytes()
        if compress == "zstd":
            # about 0.5 MiB of streams for 4 MiB of data: under the 1 MiB burst
            assert stats.read_bytes < MiB, stats
            assert seconds < 2.0
        else:
            # the same limit on 4 MiB read: 3 s after the burst
            assert stats.read_bytes == 4 * MiB
            assert seconds > 2.5


# ----------------------------------------------------------------------------
# hostile descriptors


def first_compressed_entry(img: Path) -> tuple[int, int, int]:
    """(file offset of the L2 entry, the entry, cluster bits) of the first
    compressed cluster of a single-L2-table image."""
    data = img.read_bytes()
    bits = struct.unpack_from(">I", data, 20)[0]
    l1_offset = struct.unpack_from(">Q", data, 40)[0]
    l2 = struct.unpack_from(">Q", data, l1_offset)[0] & 0x00FFFFFFFFFFFE00
    for k in range((1 << bits) // 8):
        entry = struct.unpack_from(">Q", data, l2 + 8 * k)[0]
        if entry & (1 << 62):
            return l2 + 8 * k, entry, bits
    raise AssertionError("no compressed cluster")


def hostile_copy(
    img: Path,
    tmp_path: Path,
    name: str,
    entry: int | None = None,
    at: int | None = None,
    data: bytes = b"",
) -> Path:
    bad = tmp_path / name
    shutil.copy(img, bad)
    pos, _, _ = first_compressed_entry(img)
    with open(bad, "r+b") as f:
        if entry is not None:
            f.seek(pos)
            f.write(struct.pack(">Q", entry))
        if at is not None:
            f.seek(at)
            f.write(data)
    return bad


def test_hostile_compressed_descriptors(tmp_path: Path) -> None:
    src = tmp_path / "src.raw"
    source_image(src, 4 * MiB)
    img = tmp_path / "z.qcow2"
    write_image(src, img, 64 * KiB, "zstd")
    _pos, entry, bits = first_compressed_entry(img)
    x = 62 - (bits - 8)
    start = entry & ((1 << x) - 1)
    size = img.stat().st_size
    # a descriptor whose bytes run past the end of the file
    past = hostile_copy(img, tmp_path, "past.qcow2", (1 << 62) | (3 << x) | (size - 100))
    with qcow2.Chain(past, tmp_path) as chain, pytest.raises(ImageError) as err:
        chain.map()
    assert str(err.value).startswith(f"{past}: compressed cluster for guest offset ")
    assert f"at host offset {size - 100}" in str(err.value)
    # a compressed range inside a normal data cluster (or the metadata)
    with qcow2.Chain(img, tmp_path) as chain:
        rows = chain.map()
    normal = int(rows[rows[:, 2] == qcow2.MAP_DATA][0, 4])
    over = hostile_copy(img, tmp_path, "over.qcow2", (1 << 62) | normal + 512)
    with qcow2.Chain(over, tmp_path) as chain, pytest.raises(ImageError, match="overlaps"):
        chain.map()
    # a stream that does not decompress (its bytes overwritten)
    junk = hostile_copy(img, tmp_path, "junk.qcow2", at=start, data=b"\xff" * 64)
    with pytest.raises(ImageError) as err:
        restore_raw(junk, tmp_path, tmp_path / "junk.raw")
    assert str(err.value) == (
        f"{junk}: compressed cluster for guest offset 0 at host offset {start}: the stream "
        f"does not decompress to exactly one cluster (corrupt)"
    )
    # a stream cut short: the descriptor names fewer sectors than it has
    short = hostile_copy(img, tmp_path, "short.qcow2", (1 << 62) | start)
    with pytest.raises(ImageError, match="does not decompress to exactly one cluster"):
        restore_raw(short, tmp_path, tmp_path / "short.raw")
    # QEMU agrees that the stream is not readable
    with pytest.raises(qemu.ToolError, match="Input/output error"):
        qemu.img_compare(src, junk, "raw", "qcow2")


# ----------------------------------------------------------------------------
# whole backups


def test_compressed_chain_restore_verify_merge(tmp_path: Path) -> None:
    storage = make_storage(tmp_path, compress="zstd")
    guest = Guest(tmp_path, {"drive-scsi0": 32 * MiB})
    host = Host(storage, STOREID)
    changes = [
        [],
        ["write -P 0x21 1M 100k", "write -z 4M 1M", "discard 8M 2M"],
        ["write -z 0 64k", "write -P 0x22 31M 4k", "discard 12M 1M"],
    ]
    volids = []
    for i, cmds in enumerate(changes):
        if cmds:
            guest.change("drive-scsi0", *cmds)
        guest.snapshot()
        volids.append(
            host.backup_vm(100, guest.disks, config="", start_time=1_700_000_000 + i * 3600).volid
        )
    for volid, state in zip(volids, guest.states, strict=True):
        img = storage.store.backup_dir(storage.backup_id(volid)) / "drive-scsi0.qcow2"
        report = check_clean(img)
        if volid == volids[0]:
            assert report.get("compressed-clusters", 0) > 0
        assert qcow2.read_header(str(img), os.open(img, os.O_RDONLY)).compression_type == 1
        restore_and_compare(storage, volid, state, tmp_path)
    listing = storage.list_volumes(100)
    assert [v["compress"] for v in listing] == ["zstd:1"] * 3
    assert all(r.ok for r in storage.verify()), storage.verify()
    # removing the base merges it into its child: still compressed, still the
    # same, the streams of both copied as they were
    root = storage.store.guest_dir(100)
    child = storage.store.backup_dir(storage.backup_id(volids[1])) / "drive-scsi0.qcow2"
    base = storage.store.backup_dir(storage.backup_id(volids[0])) / "drive-scsi0.qcow2"
    before = compressed_streams(base, root) | compressed_streams(child, root)
    storage.free_image(volids[0])
    assert check_clean(child).get("compressed-clusters", 0) > 0
    after = compressed_streams(child, root)
    assert after and set(after) <= set(before)
    assert all(same_stream(after[g], before[g]) for g in after)
    assert all(r.ok for r in storage.verify())
    for volid, state in zip(volids[1:], guest.states[1:], strict=True):
        restore_and_compare(storage, volid, state, tmp_path)


def compressed_streams(img: Path, root: Path) -> dict[int, bytes]:
    """Guest offset -> the host bytes of each compressed cluster the image
    itself holds: from its stream's first byte to the end of its last sector
    (the stream, then whatever follows it in that sector)."""
    data = img.read_bytes()
    with qcow2.Chain(img, root) as chain:
        bits = chain.headers[0].cluster_bits
        rows = chain.map(depth=1)
    x = 62 - (bits - 8)
    out = {}
    for g, _length, kind, _layer, entry in rows.tolist():
        if kind != qcow2.MAP_COMPRESSED:
            continue
        start = entry & ((1 << x) - 1)
        end = (start & ~511) + (((entry >> x) & ((1 << (bits - 8)) - 1)) + 1) * 512
        out[g] = data[start:end]
    return out


def same_stream(a: bytes, b: bytes) -> bool:
    """Do two descriptor ranges hold the same stream?  A stream of L bytes
    ends in the last sector of each range, so L > len - 512 for both."""
    k = max(1, max(len(a), len(b)) - 511)
    return a[:k] == b[:k]


@pytest.mark.parametrize("base_type", ["ours", "zlib"])
def test_merge_copies_zstd_streams(tmp_path: Path, base_type: str) -> None:
    """A merge keeps the layers' zstd clusters as they are: written at level
    9, they come out of the merge byte for byte (a merge that compressed them
    again would write level-1 streams); zlib clusters (QEMU's default) are
    compressed again with zstd."""
    size = 6 * MiB + 512
    src = tmp_path / "src.raw"
    source_image(src, size)
    base = tmp_path / "base.qcow2"
    if base_type == "ours":
        write_image(src, base, 64 * KiB, "zstd:9")
    else:
        options = ["-f", "raw", "-O", "qcow2", "-o", "compression_type=zlib,cluster_size=64k"]
        qemu.run(["qemu-img", "convert", "-c", *options, str(src), str(base)])
    # the child: text over the base's text and over a hole, random data, a
    # cluster of the base's text zeroed
    new = tmp_path / "new.raw"
    shutil.copy(src, new)
    changed = [(128 * KiB, 192 * KiB), (3 * MiB - 256 * KiB, 128 * KiB), (MiB, 64 * KiB)]
    with open(new, "r+b") as f:
        f.seek(changed[0][0])
        f.write(b"".join(b"changed line %06d\n" % i for i in range(10000))[: changed[0][1]])
        f.seek(changed[1][0])
        f.write(b"".join(b"another %08d text\n" % i for i in range(10000))[: changed[1][1]])
        f.seek(changed[2][0])
        f.write(bytes(changed[2][1]))
    child = tmp_path / "child.qcow2"
    regions = extents.align(extents.from_pairs(sorted(changed)), 64 * KiB, size)
    write_image(new, child, 64 * KiB, "zstd:9", backing="base.qcow2", regions=regions)
    assert_same(new, child, "raw", "qcow2")
    base_streams = compressed_streams(base, tmp_path)
    child_streams = compressed_streams(child, tmp_path)
    assert base_streams and child_streams
    merged = tmp_path / "merged.qcow2"
    qcow2.merge_into_child(child, tmp_path, output=merged)
    report = check_clean(merged)
    assert_same(new, merged, "raw", "qcow2")
    assert qcow2.read_header(str(merged)).compression_type == qcow2.COMPRESSION_ZSTD
    merged_streams = compressed_streams(merged, tmp_path)
    assert report.get("compressed-clusters", 0) == len(merged_streams)
    # every compressed cluster the child holds, and every one of the base's it
    # does not hide, is in the merged image (but a zlib cluster that zstd does
    # not shrink by a sector: QEMU keeps any stream shorter than the cluster)
    hidden = {c for o, n in regions[:, :2].tolist() for c in range(o, o + n, 64 * KiB)}
    expected = set(child_streams) | (set(base_streams) - hidden)
    if base_type == "ours":
        assert set(merged_streams) == expected
    else:
        assert set(child_streams) < set(merged_streams) <= expected
    copied = [g for g in merged_streams if g in child_streams or base_type == "ours"]
    for g in copied:
        theirs = child_streams.get(g, base_streams.get(g, b""))
        assert merged_streams[g][:4] == b"\x28\xb5\x2f\xfd"  # zstd frame magic
        assert same_stream(merged_streams[g], theirs), g
    if base_type == "ours":
        # nothing compressed again: the streams take what they took
        source_bytes = sum(len(v) for g, v in child_streams.items()) + sum(
            len(v) for g, v in base_streams.items() if g not in hidden
        )
        assert sum(len(v) for v in merged_streams.values()) <= source_bytes + 512 * len(copied)
    else:
        # the base's zlib clusters became zstd ones
        for g in set(merged_streams) - set(child_streams):
            assert merged_streams[g][:4] == b"\x28\xb5\x2f\xfd"
    restore_raw(merged, tmp_path, tmp_path / "back.raw", workers=2)
    assert (tmp_path / "back.raw").read_bytes() == new.read_bytes()


def test_cli_compress_flag_and_list(tmp_path: Path) -> None:
    disk = tmp_path / "disk.qcow2"
    qemu.img_create(disk, 16 * MiB)
    qemu.io(disk, "write -P 0x61 0 6M")
    store = tmp_path / "store"
    store.mkdir()
    bad = dirbackup(*backup_args(store, 100, disk, "--compress", "lz4"), check=2)
    assert "invalid compression 'lz4'" in bad.stderr and "Traceback" not in bad.stderr
    dirbackup(*backup_args(store, 100, disk, "--compress", "none"))
    dirbackup(*backup_args(store, 100, disk, "--compress", "zstd:5"))
    listing = json.loads(dirbackup("list", "--store", store, "--json").stdout)
    assert [b["compress"] for b in listing] == ["none", "zstd:5"]
    images = sorted(store.rglob("*.qcow2"))
    assert images[0].stat().st_size > 4 * images[1].stat().st_size
    manifest = json.loads((images[1].parent / "manifest.json").read_text())
    assert [d["compress"] for d in manifest["disks"].values()] == ["zstd:5"]


def test_damaged_compressed_stream_never_restores_wrong_data(tmp_path: Path) -> None:
    """A flipped byte inside a compressed stream either breaks the stream or
    changes what it decompresses to: a restore and a verify say so either way."""
    storage = make_storage(tmp_path, compress="zstd")
    guest = Guest(tmp_path, {"drive-scsi0": 8 * MiB})
    volid = Host(storage, STOREID).backup_vm(100, guest.disks, config="").volid
    img = storage.store.backup_dir(storage.backup_id(volid)) / "drive-scsi0.qcow2"
    _pos, entry, bits = first_compressed_entry(img)
    x = 62 - (bits - 8)
    start = entry & ((1 << x) - 1)
    for flip, where in enumerate((start + 6, start + 12)):  # inside its first bytes
        data = bytearray(img.read_bytes())
        data[where] ^= 0x10
        img.write_bytes(bytes(data))
        provider = storage.new_backup_provider()
        out = tmp_path / f"r{flip}.raw"
        with (
            provider.open_chain(volid.split(":", 1)[1], "drive-scsi0") as chain,
            open(out, "wb") as f,
            pytest.raises(ImageError),  # IntegrityError is one
        ):
            qcow2.restore(chain, copy.FileTarget(f.fileno(), str(out)))
        assert not storage.verify(volid.split(":", 1)[1])[0].ok
        data[where] ^= 0x10
        img.write_bytes(bytes(data))
    assert storage.verify(volid.split(":", 1)[1])[0].ok
