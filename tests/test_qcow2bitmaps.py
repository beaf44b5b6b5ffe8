"""Persistent dirty bitmaps read from the qcow2 file (qcow2bitmaps), with
QEMU as the oracle: images made and written by qemu-img / qemu-io, the
bitmap's map read back through a read-only `qemu-nbd -B NAME` export."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import KiB, MiB
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dirbackup import extents, nbd, qcow2, qcow2bitmaps, qemu
from dirbackup.errors import ImageError
from dirbackup.qcow2bitmaps import (
    TABLE_OFFSET_MASK,
    BitmapInfo,
    BitmapUnusable,
    dirty_extents,
    list_bitmaps,
)

GiB = 1024 * MiB


# ----------------------------------------------------------------------------
# helpers


def header_of(path: Path) -> qcow2.Header:
    return qcow2.read_header(path)


def ours(path: Path, name: str) -> list[list[int]]:
    fd = os.open(path, os.O_RDONLY)
    try:
        return dirty_extents(fd, qcow2.read_header(path, fd), name).tolist()
    finally:
        os.close(fd)


def infos(path: Path) -> list[BitmapInfo]:
    fd = os.open(path, os.O_RDONLY)
    try:
        return list_bitmaps(fd, qcow2.read_header(path, fd))
    finally:
        os.close(fd)


@pytest.fixture
def qemu_map(nbd_server: Callable[..., qemu.NbdServer]) -> Callable[[Path, str], list[list[int]]]:
    """The dirty extents QEMU exports for bitmap `name` of an image."""

    def read(path: Path, name: str) -> list[list[int]]:
        server = nbd_server(path, bitmap=name)
        context = extents.dirty_bitmap_context(name)
        h = nbd.connect(server.uri, [context])
        try:
            return extents.dirty(extents.block_status(h, context)).tolist()
        finally:
            h.shutdown()
            server.stop()

    return read


def add(path: Path, name: str, granularity: int | None = None, enable: bool = True) -> None:
    cmd = ["qemu-img", "bitmap", "--add"]
    if granularity:
        cmd += ["-g", str(granularity)]
    cmd.append("--enable" if enable else "--disable")
    qemu.run([*cmd, str(path), name])


def image(tmp_path: Path, size: int, cluster: int = 64 * KiB, name: str = "g.qcow2") -> Path:
    path = tmp_path / name
    qemu.img_create(path, size, cluster_size=cluster)
    return path


def bitmaps_ext_offset(path: Path) -> int:
    """File offset of the bitmaps extension's data."""
    head = path.read_bytes()[:65536]
    (length,) = struct.unpack_from(">I", head, 100)
    off = length
    while True:
        kind, n = struct.unpack_from(">II", head, off)
        assert kind != 0, "no bitmaps extension"
        if kind == qcow2.EXT_BITMAPS:
            return off + 8
        off += 8 + ((n + 7) & ~7)


def poke(path: Path, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        assert os.pwrite(fd, data, offset) == len(data)
    finally:
        os.close(fd)


def entry_offset(path: Path, index: int = 0) -> int:
    """File offset of directory entry `index`."""
    ext = header_of(path).bitmaps
    assert ext is not None
    raw = path.read_bytes()[ext.directory_offset : ext.directory_offset + ext.directory_size]
    pos = 0
    for _ in range(index):
        name_size, extra = struct.unpack_from(">HI", raw, pos + 18)
        pos += (24 + name_size + extra + 7) & ~7
    return ext.directory_offset + pos


def table_offset(path: Path, name: str) -> int:
    return next(b.table_offset for b in infos(path) if b.name == name)


# ----------------------------------------------------------------------------
# QEMU's maps


@pytest.mark.parametrize(
    ("cluster", "granularity"),
    [
        (512, 512),
        (4 * KiB, 512),
        (64 * KiB, 64 * KiB),
        (64 * KiB, 4 * KiB),
        (2 * MiB, 1 * MiB),
        (64 * KiB, 4 * MiB),
    ],
)
def test_matches_qemu_for_granularities_and_cluster_sizes(
    tmp_path: Path, qemu_map, cluster: int, granularity: int
) -> None:
    size = 96 * MiB + 3 * 512  # odd: not a multiple of any granularity above 512
    img = image(tmp_path, size, cluster)
    add(img, "b", granularity)
    qemu.io(
        img,
        "write -P 1 0 512",
        "write -P 2 1000k 700k",
        "write -P 3 8M 64k",
        "write -z 20M 1M",
        f"write -P 4 {size - 1024} 1024",
        "write -P 5 40M 3M",
    )
    got = ours(img, "b")
    assert got == qemu_map(img, "b")
    assert got and got[-1][0] + got[-1][1] == size  # the tail is dirty, clipped
    (info,) = infos(img)
    assert (info.name, info.granularity, info.auto, info.in_use) == ("b", granularity, True, False)
    bits = -(-size // granularity)
    assert info.table_size == -(-bits // (8 * cluster))


def test_bit_order_within_a_byte(tmp_path: Path, qemu_map) -> None:
    """One write per bit of the first byte, each its own run: bit k of a
    byte is guest granule k (least significant first), as QEMU has it."""
    img = image(tmp_path, 16 * MiB)
    add(img, "b", 64 * KiB)
    qemu.io(img, "write -P 1 64k 64k", "write -P 1 448k 64k", "write -P 1 576k 1k")
    got = ours(img, "b")
    assert got == [[64 * KiB, 64 * KiB, 1], [448 * KiB, 64 * KiB, 1], [576 * KiB, 64 * KiB, 1]]
    assert got == qemu_map(img, "b")


def test_several_bitmaps_disabled_cleared_merged_empty(tmp_path: Path, qemu_map) -> None:
    img = image(tmp_path, 64 * MiB)
    add(img, "early", 64 * KiB)
    add(img, "empty", 128 * KiB)
    qemu.io(img, "write -P 1 1M 64k")
    add(img, "late", 4 * KiB)
    qemu.run(["qemu-img", "bitmap", "--disable", str(img), "early"])
    qemu.io(img, "write -P 2 10M 5k", "write -P 3 63M 1M")
    add(img, "cleared", 64 * KiB)
    qemu.io(img, "write -P 4 30M 1M")
    qemu.run(["qemu-img", "bitmap", "--clear", str(img), "cleared"])
    qemu.run(["qemu-img", "bitmap", "--clear", str(img), "empty"])
    add(img, "merged", 64 * KiB, enable=False)
    qemu.run(["qemu-img", "bitmap", "--merge", "early", str(img), "merged"])
    qemu.run(["qemu-img", "bitmap", "--merge", "late", str(img), "merged"])
    listed = {b.name: b for b in infos(img)}
    assert sorted(listed) == ["cleared", "early", "empty", "late", "merged"]
    assert not listed["early"].auto and listed["late"].auto and not listed["merged"].auto
    assert listed["late"].granularity == 4 * KiB
    assert all(not b.in_use and b.persistent for b in listed.values())
    want = {
        "early": [[1 * MiB, 64 * KiB, 1]],
        "late": [[10 * MiB, 8 * KiB, 1], [30 * MiB, 1 * MiB, 1], [63 * MiB, 1 * MiB, 1]],
        "cleared": [],
        "empty": [],
        "merged": [
            [1 * MiB, 64 * KiB, 1],
            [10 * MiB, 64 * KiB, 1],
            [30 * MiB, 1 * MiB, 1],
            [63 * MiB, 1 * MiB, 1],
        ],
    }
    for name, rows in want.items():
        assert ours(img, name) == rows, name
        assert qemu_map(img, name) == rows, name


def test_all_dirty_and_an_all_ones_table_entry(tmp_path: Path, qemu_map) -> None:
    size = 8 * MiB + 512
    img = image(tmp_path, size, 4 * KiB)
    add(img, "all", 512)
    add(img, "ones", 512)
    qemu.io(img, f"write -P 9 0 {size}")
    assert ours(img, "all") == [[0, size, 1]] == qemu_map(img, "all")
    # 8 MiB / 512 = 16384 bits = 2048 bytes: half a 4 KiB cluster plus one
    # bit; an unallocated table entry with bit 0 reads as all ones (QEMU never
    # writes one, but reads it)
    qemu.run(["qemu-img", "bitmap", "--clear", str(img), "ones"])
    poke(img, table_offset(img, "ones"), struct.pack(">Q", 1))
    assert ours(img, "ones") == [[0, size, 1]] == qemu_map(img, "ones")


def test_large_sparse_disk(tmp_path: Path, qemu_map) -> None:
    size = 1 << 40  # 1 TiB: 16 Mi bits at 64 KiB, several table entries
    img = image(tmp_path, size, 64 * KiB)
    add(img, "b", 64 * KiB)
    # 1 MiB of bitmap data (qcow2bitmaps.CHUNK_BYTES) covers 512 GiB here:
    # the write at 512 GiB - 64 KiB crosses from one chunk into the next
    qemu.io(
        img,
        "write -P 1 0 1",
        "write -P 1 300G 128k",
        f"write -z {512 * GiB - 64 * KiB} 192k",
        f"write -P 1 {size - 4096} 4k",
    )
    want = [
        [0, 64 * KiB, 1],
        [300 * GiB, 128 * KiB, 1],
        [512 * GiB - 64 * KiB, 192 * KiB, 1],
        [size - 64 * KiB, 64 * KiB, 1],
    ]
    assert ours(img, "b") == want == qemu_map(img, "b")


def test_bitmap_in_the_top_image_of_a_chain(tmp_path: Path, qemu_map) -> None:
    base = image(tmp_path, 32 * MiB, name="base.qcow2")
    qemu.io(base, "write -P 1 0 32M")
    add(base, "b")
    top = tmp_path / "top.qcow2"
    qemu.img_create(top, 32 * MiB, backing="base.qcow2", cluster_size=4 * KiB)
    add(top, "b", 16 * KiB)
    qemu.io(top, "write -P 2 5M 40k", "write -z 9M 1M")
    assert ours(top, "b") == [[5 * MiB, 48 * KiB, 1], [9 * MiB, 1 * MiB, 1]]
    assert ours(top, "b") == qemu_map(top, "b")
    assert ours(base, "b") == []


@settings(max_examples=200, deadline=None)
@given(
    raw=st.binary(min_size=1, max_size=96),
    dense=st.booleans(),
    first=st.integers(0, 1 << 20),
    gbits=st.integers(9, 31),
)
def test_runs_match_a_bit_by_bit_reading(raw: bytes, dense: bool, first: int, gbits: int) -> None:
    """Both ways of reading runs (sparse: set bit positions; dense: edges)
    agree with the spec's bit_offset formula read one bit at a time."""
    data = bytes(b | 0x5A for b in raw) if dense else raw
    if not dense:
        data = bytes(1024) + data + bytes(1000)  # few non-zero bytes: the sparse path
    buf = np.frombuffer(data, dtype=np.uint8).copy()
    g = 1 << gbits
    want: list[list[int]] = []
    for bit in (b for b in range(len(data) * 8) if data[b // 8]):
        if data[bit // 8] >> (bit % 8) & 1:
            offset = (first + bit) * g
            if want and want[-1][0] + want[-1][1] == offset:
                want[-1][1] += g
            else:
                want.append([offset, g, 1])
    assert qcow2bitmaps._runs(buf, first, g).tolist() == want


# ----------------------------------------------------------------------------
# Bitmaps that cannot be trusted


def test_missing_bitmap_and_image_without_bitmaps(tmp_path: Path) -> None:
    img = image(tmp_path, 8 * MiB)
    assert infos(img) == []
    with pytest.raises(BitmapUnusable, match="no bitmap b in the image") as err:
        ours(img, "b")
    assert err.value.reason == "no bitmap b in the image"
    add(img, "a")
    with pytest.raises(BitmapUnusable, match="no bitmap b in the image"):
        ours(img, "b")


def test_in_use_flag(tmp_path: Path) -> None:
    img = image(tmp_path, 8 * MiB)
    add(img, "b")
    add(img, "c")
    flags_at = entry_offset(img, 1) + 12
    poke(img, flags_at, struct.pack(">I", 3))  # in_use | auto
    assert [b.in_use for b in infos(img)] == [False, True]
    with pytest.raises(BitmapUnusable, match="bitmap c is in use") as err:
        ours(img, "c")
    assert "inconsistent" in err.value.reason
    assert ours(img, "b") == []


def test_writer_killed_leaves_the_bitmap_in_use(tmp_path: Path) -> None:
    """A qemu-io that had the image open read-write and is killed -9: QEMU
    marked the bitmap in_use when it opened the image and never cleared it."""
    img = image(tmp_path, 8 * MiB)
    add(img, "b")
    proc = subprocess.Popen(
        ["qemu-io", "-f", "qcow2", "-c", "write -P 1 0 64k", "-c", "sleep 60000", str(img)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if infos(img)[0].in_use:
                    break
            except ImageError:
                pass  # caught while QEMU rewrites the directory in place
            assert time.monotonic() < deadline, "qemu-io never marked the bitmap in use"
            assert proc.poll() is None
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    with pytest.raises(BitmapUnusable, match="bitmap b is in use"):
        ours(img, "b")
    assert set(qemu.bitmaps(img)[0]["flags"]) == {"in-use", "auto"}


def test_autoclear_bit_cleared_means_stale(tmp_path: Path) -> None:
    img = image(tmp_path, 8 * MiB)
    add(img, "b")
    qemu.io(img, "write -P 1 0 64k")
    autoclear = struct.unpack_from(">Q", img.read_bytes(), 88)[0]
    assert autoclear & 1
    poke(img, 88, struct.pack(">Q", autoclear & ~1))
    assert infos(img) == []  # QEMU ignores a stale extension too
    assert qemu.bitmaps(img) == []
    with pytest.raises(BitmapUnusable, match="stale"):
        ours(img, "b")


def test_unknown_type(tmp_path: Path) -> None:
    img = image(tmp_path, 8 * MiB)
    add(img, "b")
    poke(img, entry_offset(img) + 16, b"\x02")
    assert infos(img)[0].type == 2
    with pytest.raises(BitmapUnusable, match="bitmap b is not a dirty bitmap"):
        ours(img, "b")


@pytest.mark.parametrize("compatible", [False, True])
def test_extra_data(tmp_path: Path, compatible: bool) -> None:
    """Extra data we do not know: usable only when flagged compatible."""
    img = image(tmp_path, 8 * MiB)
    add(img, "b")
    qemu.io(img, "write -P 1 1M 64k")
    at = entry_offset(img)
    ext = bitmaps_ext_offset(img)
    t_off, t_size, flags, kind, gbits, _name, _extra = struct.unpack_from(
        ">QIIBBHI", img.read_bytes(), at
    )
    flags |= 4 if compatible else 0
    entry = struct.pack(">QIIBBHI", t_off, t_size, flags, kind, gbits, 1, 8)
    entry += b"EXTRADAT" + b"b" + bytes(7)
    poke(img, at, entry)
    poke(img, ext + 8, struct.pack(">Q", len(entry)))
    assert infos(img)[0].extra_data_size == 8
    if compatible:
        assert ours(img, "b") == [[1 * MiB, 64 * KiB, 1]]
    else:
        with pytest.raises(BitmapUnusable, match="extra data"):
            ours(img, "b")


# ----------------------------------------------------------------------------
# Hostile metadata


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    """Bitmap b: one table entry; c: four (64 MiB / 512 / 8 = 16 KiB of bits)."""
    img = image(tmp_path, 64 * MiB, 4 * KiB)
    add(img, "b", 64 * KiB)
    add(img, "c", 512)
    qemu.io(img, "write -P 1 1M 64k", "write -P 1 50M 4M")
    return img


def field_cases(img: Path) -> list[tuple[int, bytes, str, str]]:
    """(file offset, bytes written there, bitmap asked for, message)."""
    ext = bitmaps_ext_offset(img)
    e0 = entry_offset(img, 0)
    e1 = entry_offset(img, 1)
    size = img.stat().st_size
    hdr = header_of(img)
    assert hdr.bitmaps is not None
    dsize, doff = hdr.bitmaps.directory_size, hdr.bitmaps.directory_offset
    past = -(-size // 4096) * 4096 + 4096
    return [
        (ext, struct.pack(">I", 3), "c", "directory size 64 does not fit 3 bitmaps"),
        (ext, struct.pack(">I", 1), "c", "holds more than 1 bitmaps"),
        (ext, struct.pack(">I", 0), "c", "invalid number of bitmaps 0"),
        (ext, struct.pack(">I", 70000), "c", "invalid number of bitmaps 70000"),
        (ext + 4, struct.pack(">I", 1), "c", "bitmaps extension has reserved bits set"),
        (ext - 4, struct.pack(">I", 16), "c", "bitmaps extension of 16 bytes"),
        (ext + 8, struct.pack(">Q", 8), "c", "directory size 8 does not fit 2 bitmaps"),
        (ext + 8, struct.pack(">Q", 1 << 40), "c", "does not fit 2 bitmaps"),
        (ext + 8, struct.pack(">Q", dsize + 8), "c", "(holds more than 2 bitmaps|lies outside)"),
        (ext + 16, struct.pack(">Q", past), "c", f"directory at offset {past} lies outside"),
        (ext + 16, struct.pack(">Q", 0), "c", "bitmap directory at offset 0 lies outside"),
        (ext + 16, struct.pack(">Q", doff + 8), "c", "is not cluster-aligned"),
        (e0, struct.pack(">Q", past), "b", f"table at offset {past} lies outside"),
        (e0, struct.pack(">Q", 0), "b", "table at offset 0 lies outside"),
        (e0, struct.pack(">Q", 4096 + 8), "b", "table at offset 4104 is not cluster-aligned"),
        (e0, struct.pack(">Q", 1 << 62), "c", "'b': table at offset"),
        (e0 + 8, struct.pack(">I", 2), "b", "table of 2 entries for 1 clusters"),
        (e1 + 8, struct.pack(">I", 1), "c", "table of 1 entries for 4 clusters"),
        (e0 + 8, struct.pack(">I", 0), "b", "invalid table size 0"),
        (e0 + 8, struct.pack(">I", 0xFFFFFFFF), "c", "'b' has invalid table size 4294967295"),
        (e0 + 12, struct.pack(">I", 1 << 3), "b", "reserved flags 0x8"),
        (e0 + 17, b"\x08", "b", "invalid granularity 2\\*\\*8"),
        (e0 + 17, b"\x20", "b", "invalid granularity 2\\*\\*32"),
        (e0 + 18, struct.pack(">H", 0), "b", "name size 0"),
        (e0 + 18, struct.pack(">H", 2000), "b", "entry 0 runs past the directory"),
        (e1 + 25, b"x", "c", "entry 1 has non-zero padding"),
        (e0 + 24, b"c", "c", "two bitmaps named 'c'"),
        (e0 + 24, b"\xff", "c", "entry 0: name is not UTF-8"),
    ]


def test_hostile_directory_fields(victim: Path) -> None:
    pristine = victim.read_bytes()
    for offset, data, name, message in field_cases(victim):
        victim.write_bytes(pristine)
        poke(victim, offset, data)
        with pytest.raises(ImageError, match=f"^{victim}: .*{message}"):
            ours(victim, name)


def test_two_bitmaps_extensions(victim: Path) -> None:
    """Each extension appears at most once: a second one is refused as the
    header is read (either could be the one QEMU trusts)."""
    ext = bitmaps_ext_offset(victim) - 8
    head = victim.read_bytes()[:4096]
    end = ext
    while struct.unpack_from(">I", head, end)[0] != 0:
        end += 8 + ((struct.unpack_from(">I", head, end + 4)[0] + 7) & ~7)
    poke(victim, end, head[ext : ext + 32] + bytes(8))
    with pytest.raises(ImageError, match=f"^{victim}: two bitmaps extensions in the header$"):
        qcow2.read_header(victim)


def test_hostile_table_entries(victim: Path) -> None:
    table = table_offset(victim, "c")
    size = victim.stat().st_size
    cases = [
        1 << 1,  # reserved bit 1
        1 << 60,  # reserved high bits
        (1 << 16) | 1,  # offset with the all-ones bit
        65536 + 512,  # not cluster-aligned
        -(-size // 4096) * 4096,  # past the end of the file
        4096 * 4096 * 4096,
    ]
    pristine = victim.read_bytes()
    for entry in cases:
        victim.write_bytes(pristine)
        poke(victim, table, struct.pack(">Q", entry))
        with pytest.raises(ImageError, match=f"^{victim}: bitmap 'c': invalid table entry 0"):
            ours(victim, "c")


def test_truncated_file(victim: Path) -> None:
    """A file cut short after its header was read: reads come back short."""
    fd = os.open(victim, os.O_RDWR)
    try:
        header = qcow2.read_header(victim, fd)
        bm = next(b for b in list_bitmaps(fd, header) if b.name == "c")
        os.truncate(victim, bm.table_offset + 4)
        with pytest.raises(ImageError, match="truncated"):
            dirty_extents(fd, header, "c")
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------
# Fuzz: flipped bytes give a result that looks right or one of our two errors


@pytest.fixture(scope="module")
def fuzz_image(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, list[tuple[int, int]]]:
    tmp = tmp_path_factory.mktemp("fuzz")
    img = image(tmp, 32 * MiB + 512, 4 * KiB)
    add(img, "b", 4 * KiB)
    add(img, "c", 512)
    qemu.io(img, "write -P 1 1M 64k", "write -P 1 20M 300k", "write -P 1 32M 512")
    hdr = header_of(img)
    assert hdr.bitmaps is not None
    regions = [(bitmaps_ext_offset(img) - 8, 32), (88, 8)]
    regions.append((hdr.bitmaps.directory_offset, hdr.bitmaps.directory_size))
    raw = img.read_bytes()
    for b in infos(img):
        regions.append((b.table_offset, b.table_size * 8))
        for i in range(b.table_size):
            (entry,) = struct.unpack_from(">Q", raw, b.table_offset + 8 * i)
            if entry & TABLE_OFFSET_MASK:  # a data cluster: flips change the map
                regions.append((entry & TABLE_OFFSET_MASK, 4096))
    return raw, regions


def flip(data: st.DataObject, pristine: bytes, regions: list[tuple[int, int]]) -> bytes:
    raw = bytearray(pristine)
    for _ in range(data.draw(st.integers(1, 4))):
        start, length = data.draw(st.sampled_from(regions))
        at = start + data.draw(st.integers(0, length - 1))
        raw[at] ^= 1 << data.draw(st.integers(0, 7))
    return bytes(raw)


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_fuzzed_metadata(
    fuzz_image: tuple[bytes, list[tuple[int, int]]], tmp_path: Path, data: st.DataObject
) -> None:
    raw = flip(data, *fuzz_image)
    path = tmp_path / "fuzzed.qcow2"
    path.write_bytes(raw)
    size = len(raw)
    reads: list[tuple[int, int]] = []
    real_pread = os.pread

    def pread(fd: int, n: int, off: int) -> bytes:
        reads.append((off, n))
        return real_pread(fd, n, off)

    os.pread = pread  # type: ignore[assignment]
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            header = qcow2.read_header(path, fd)
            for name in ("b", "c"):
                try:
                    got = dirty_extents(fd, header, name)
                except (ImageError, BitmapUnusable):
                    continue
                assert got.dtype == np.uint64 and got.shape[1] == 3
                ends = got[:, 0] + got[:, 1]
                assert (got[:, 1] > 0).all() and (ends <= np.uint64(header.virtual_size)).all()
                assert (got[1:, 0] > ends[:-1]).all()  # sorted, coalesced
        except ImageError:
            pass
        finally:
            os.close(fd)
    finally:
        os.pread = real_pread  # type: ignore[assignment]
    for off, n in reads:
        assert off >= 0 and off + n <= size and n <= 64 * MiB, (off, n)


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_fuzzed_metadata_against_qemu(
    fuzz_image: tuple[bytes, list[tuple[int, int]]],
    tmp_path: Path,
    qemu_map: Callable[[Path, str], list[list[int]]],
    data: st.DataObject,
) -> None:
    """Where both QEMU and we read a damaged bitmap, we read the same."""
    path = tmp_path / "fuzzed.qcow2"
    path.write_bytes(flip(data, *fuzz_image))
    for name in ("b", "c"):
        try:
            got = ours(path, name)
        except (ImageError, BitmapUnusable):
            continue
        try:
            want = qemu_map(path, name)
        except (qemu.ToolError, OSError):
            # QEMU opens all bitmaps at once: a damaged other bitmap (or
            # header bit) makes it refuse the image; we read this one alone
            continue
        assert got == want, name
