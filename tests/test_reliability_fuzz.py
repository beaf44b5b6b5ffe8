"""Reliability: fuzzing the parsers of untrusted bytes with hypothesis.

* the qcow2 header, L1 and L2 reader (qcow2.Chain, ChainMap, image_digests,
  restore): real images -- ours (plain and zstd-compressed), QEMU's (plain and
  zlib-compressed), a chain, 512-byte and 2 MiB clusters -- with header
  fields, table entries and bytes overwritten, and truncated.  Each ends in
  a clean dirbackup error (DirbackupError/OSError), or in a map that covers
  exactly the virtual size with data (or compressed streams) read from
  inside the files; never a crash, a hang, a MemoryError or a read outside.
* `nbdinfo --map` text and JSON from a real export, mutated: a clean
  MapFormatError, or extents that are sorted, contiguous and cover the size.
* crafted images that used to hang or exhaust memory.

Budgets: ~200 examples per test in `make test`, thousands under `slow`."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from faultlib import KiB, MiB
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dirbackup import copy, extents, qcow2, qemu
from dirbackup.errors import DirbackupError, MapFormatError

FAST = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
LONG = settings(
    max_examples=3000,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
TIME_LIMIT = 5.0  # seconds per example: a hang shows up as a failure, not a stuck run

# ---------------------------------------------------------------------- real images


@dataclass(frozen=True)
class Sample:
    """A real image (and the layers below it) to mutate."""

    name: str
    data: bytes  # the top image's bytes
    lower: tuple[Path, ...]  # its backing files, left intact


def _qemu_image(path: Path, size: int, cluster: int, backing: str | None = None) -> Path:
    qemu.img_create(path, size, cluster_size=cluster, backing=backing)
    return path


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Sample]:
    d = tmp_path_factory.mktemp("fuzz")
    out = {}
    # ours: a full image from a raw disk with data, zeros and holes
    raw = d / "src.raw"
    with open(raw, "wb") as f:
        f.truncate(4 * MiB)
        f.write(os.urandom(300 * KiB))
        f.seek(MiB)
        f.write(bytes(128 * KiB))
        f.seek(3 * MiB + 5000)
        f.write(os.urandom(70 * KiB))
    ours = d / "ours.qcow2"
    fd = os.open(raw, os.O_RDONLY)
    try:
        regions = extents.align(extents.data(extents.file_extents(fd, 0, 4 * MiB)), 65536, 4 * MiB)
        with qcow2.Writer(ours, 4 * MiB, 65536) as w:
            copy.copy_regions(copy.FileSource(fd, str(raw)), w, regions)
            w.finish()
    finally:
        os.close(fd)
    out["ours"] = Sample("ours", ours.read_bytes(), ())
    # QEMU's, with small clusters (many L2 entries) and with big ones
    for name, cluster in (("qemu-512", 512), ("qemu-2M", 2 * MiB)):
        img = _qemu_image(d / f"{name}.qcow2", 4 * MiB, cluster)
        qemu.io(img, "write -P 1 0 200k", "write -z 1M 64k", "write -P 2 3M 4k", "discard 100k 8k")
        out[name] = Sample(name, img.read_bytes(), ())
    # a chain: QEMU's top over our base
    base = d / "base.qcow2"
    shutil.copy(ours, base)
    top = _qemu_image(d / "top.qcow2", 4 * MiB, 65536, backing="base.qcow2")
    qemu.io(top, "write -P 3 64k 64k", "write -z 2M 128k", "write -P 4 3M 1")
    out["chain"] = Sample("chain", top.read_bytes(), (base,))
    # compressed clusters: ours (zstd) and QEMU's (zlib), from compressible data
    text = d / "text.raw"
    with open(text, "wb") as f:
        f.truncate(4 * MiB)
        f.write(b"".join(b"fuzz line %06d\n" % i for i in range(20000)))
        f.seek(2 * MiB)
        f.write(os.urandom(64 * KiB))
    zstd = d / "ours-zstd.qcow2"
    fd = os.open(text, os.O_RDONLY)
    try:
        regions = extents.align(extents.data(extents.file_extents(fd, 0, 4 * MiB)), 65536, 4 * MiB)
        with qcow2.Writer(zstd, 4 * MiB, 65536, compress="zstd") as w:
            copy.copy_regions(copy.FileSource(fd, str(text)), w, regions)
            w.finish()
    finally:
        os.close(fd)
    out["ours-zstd"] = Sample("ours-zstd", zstd.read_bytes(), ())
    zlib = d / "qemu-zlib.qcow2"
    qemu.run(["qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", str(text), str(zlib)])
    out["qemu-zlib"] = Sample("qemu-zlib", zlib.read_bytes(), ())
    return out


HEADER_FIELDS = [  # (offset, width) of qcow2 v3 header fields
    (0, 4), (4, 4), (8, 8), (16, 4), (20, 4), (24, 8), (32, 4), (36, 4), (40, 8), (48, 8),
    (56, 4), (60, 4), (64, 8), (72, 8), (80, 8), (88, 8), (96, 4), (100, 4),
]  # fmt: skip


def interesting(width: int) -> st.SearchStrategy[int]:
    top = (1 << (8 * width)) - 1
    return st.one_of(
        st.integers(0, 64),
        st.sampled_from([top, top >> 1, 1 << (8 * width - 1)]),
        st.integers(0, 62).map(lambda k: min(top, 1 << k)),
        st.integers(0, 62).map(lambda k: min(top, (1 << k) + 512)),
        st.integers(0, top),
    )


def entry_values() -> st.SearchStrategy[int]:
    """Values for L1/L2 entries: offsets in and beyond small files, flags."""
    flags = st.sampled_from([0, 1 << 63, 1 << 62, 1, (1 << 63) | 1, 0x7F << 56])
    offset = st.one_of(
        st.integers(0, 64).map(lambda c: c * 65536),
        st.integers(0, 1 << 24).map(lambda c: c * 512),
        st.integers(0, (1 << 56) - 1),
    )
    return st.one_of(st.builds(lambda f, o: f | o, flags, offset), st.integers(0, (1 << 64) - 1))


@st.composite
def mutations(draw: st.DrawFn) -> list[tuple[str, int, int]]:
    ops = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["field", "l1", "l2", "byte", "truncate", "ext"]))
        if kind == "field":
            off, width = draw(st.sampled_from(HEADER_FIELDS))
            ops.append(("field", off * 16 + width, draw(interesting(width))))
        elif kind in ("l1", "l2"):
            ops.append((kind, draw(st.integers(0, 1 << 14)), draw(entry_values())))
        elif kind == "byte":
            ops.append(("byte", draw(st.integers(0, 1 << 22)), draw(st.integers(0, 255))))
        elif kind == "truncate":
            ops.append(("truncate", draw(st.integers(0, 1 << 22)), 0))
        else:
            ops.append(("ext", draw(st.integers(0, 64)), draw(st.integers(0, (1 << 64) - 1))))
    return ops


def mutate(data: bytes, ops: list[tuple[str, int, int]]) -> bytes:
    buf = bytearray(data)

    def put(off: int, value: bytes) -> None:
        if off + len(value) > len(buf):
            buf.extend(bytes(off + len(value) - len(buf)))
        buf[off : off + len(value)] = value

    for kind, a, value in ops:
        if len(buf) < 104:
            break
        bits = struct.unpack_from(">I", buf, 20)[0]
        cs = 1 << bits if 9 <= bits <= 21 else 65536
        l1_off, l1_size = struct.unpack_from(">Q", buf, 40)[0], struct.unpack_from(">I", buf, 36)[0]
        if kind == "field":
            off, width = divmod(a, 16)
            put(off, value.to_bytes(width, "big"))
        elif kind == "l1":
            if l1_off < len(buf):
                put(l1_off + 8 * (a % max(1, l1_size + 1)), value.to_bytes(8, "big"))
        elif kind == "l2":
            tables = [
                e & 0x00FFFFFFFFFFFE00
                for i in range(min(l1_size, 64))
                if l1_off + 8 * i + 8 <= len(buf)
                for e in struct.unpack_from(">Q", buf, l1_off + 8 * i)
                if e & 0x00FFFFFFFFFFFE00 and (e & 0x00FFFFFFFFFFFE00) < len(buf)
            ]
            if tables:
                table = tables[a % len(tables)]
                put(table + 8 * ((a // len(tables)) % (cs // 8)), value.to_bytes(8, "big"))
        elif kind == "byte":
            buf[a % len(buf)] = value
        elif kind == "truncate":
            del buf[a % (len(buf) + 1) :]
        else:
            hlen = struct.unpack_from(">I", buf, 100)[0] if len(buf) >= 104 else 104
            put(min(hlen, 4096) + a, value.to_bytes(8, "big"))
    return bytes(buf)


def check_image(path: Path, allowed: Path) -> str:
    """Read a (damaged) image the ways the store does; return how it ended."""
    started = time.monotonic()
    try:
        with qcow2.Chain(path, allowed) as chain:
            rows = chain.map()
            vsize = chain.virtual_size
            assert rows.shape[1] == 5 and rows.shape[0] > 0
            assert int(rows[0, 0]) == 0
            ends = rows[:, 0] + rows[:, 1]
            assert (rows[:, 1] > 0).all()
            assert (rows[1:, 0] == ends[:-1]).all(), "rows not contiguous"
            assert int(ends[-1]) == vsize, "rows do not cover the virtual size"
            assert set(np.unique(rows[:, 2]).tolist()) <= {1, 2, 3, 4}
            data = rows[rows[:, 2] == qcow2.MAP_DATA]
            sizes = [h.file_size for h in chain.headers]
            for layer, host in zip(data[:, 3].tolist(), data[:, 4].tolist(), strict=True):
                assert layer < chain.depth and host < sizes[layer], "data outside its file"
            packed = rows[rows[:, 2] == qcow2.MAP_COMPRESSED]
            for layer, entry in zip(packed[:, 3].tolist(), packed[:, 4].tolist(), strict=True):
                x = 62 - (chain.headers[layer].cluster_bits - 8)
                start = entry & ((1 << x) - 1)
                assert layer < chain.depth and start < sizes[layer], "stream outside its file"
            chain.map(depth=1)
            if vsize <= 64 * MiB:
                out = path.with_suffix(".out")
                fd = os.open(out, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
                try:
                    os.ftruncate(fd, vsize)
                    qcow2.restore(chain, copy.FileTarget(fd, str(out)))
                finally:
                    os.close(fd)
                    out.unlink()
                if chain.depth == 1 and chain.headers[0].cluster_size <= 2 * MiB:
                    qcow2.image_digests(path, 2 * MiB, vsize)
        outcome = "ok"
    except (DirbackupError, OSError) as exc:
        assert str(exc), "an error without a message"
        outcome = type(exc).__name__
    elapsed = time.monotonic() - started
    assert elapsed < TIME_LIMIT, f"took {elapsed:.1f} s"
    return outcome


def _fuzz_images(samples: dict[str, Sample], tmp_path: Path, name: str, ops: list) -> None:  # type: ignore[type-arg]
    sample = samples[name]
    work = tmp_path / "w"
    work.mkdir(exist_ok=True)
    for lower in sample.lower:
        if not (work / lower.name).exists():
            shutil.copy(lower, work / lower.name)
    img = work / "top.qcow2"
    img.write_bytes(mutate(sample.data, ops))
    check_image(img, work)


SAMPLE_NAMES = st.sampled_from(["ours", "qemu-512", "qemu-2M", "chain", "ours-zstd", "qemu-zlib"])


@FAST
@given(name=SAMPLE_NAMES, ops=mutations())
def test_fuzz_qcow2_reader(
    samples: dict[str, Sample], tmp_path: Path, name: str, ops: list
) -> None:  # type: ignore[type-arg]
    _fuzz_images(samples, tmp_path, name, ops)


@pytest.mark.slow
@LONG
@given(name=SAMPLE_NAMES, ops=mutations())
def test_fuzz_qcow2_reader_long(
    samples: dict[str, Sample],
    tmp_path: Path,
    name: str,
    ops: list,  # type: ignore[type-arg]
) -> None:
    _fuzz_images(samples, tmp_path, name, ops)


def test_unmutated_samples_read_fine(samples: dict[str, Sample], tmp_path: Path) -> None:
    for name in samples:
        assert _outcome(samples, tmp_path / name, name) == "ok"


def _outcome(samples: dict[str, Sample], work: Path, name: str) -> str:
    work.mkdir()
    for lower in samples[name].lower:
        shutil.copy(lower, work / lower.name)
    img = work / "top.qcow2"
    img.write_bytes(samples[name].data)
    return check_image(img, work)


# ---------------------------------------------------------------------- crafted images


def _grown(samples: dict[str, Sample], tmp_path: Path, vsize: int, bits: int) -> Path:
    """Our image re-headed to a huge virtual size with an empty L1 table."""
    img = tmp_path / "huge.qcow2"
    with qcow2.Writer(img, 4 * MiB, 1 << bits) as w:
        w.finish()
    l1 = qcow2._qcow2.l1_entries_for(vsize, bits)
    size = img.stat().st_size
    l1_off = -(-size // (1 << bits)) * (1 << bits)
    with open(img, "r+b") as f:
        f.truncate(l1_off + l1 * 8)
        f.seek(24)
        f.write(struct.pack(">Q", vsize))
        f.seek(36)
        f.write(struct.pack(">IQ", l1, l1_off))
    return img


@pytest.mark.parametrize(("vsize", "bits"), [(1 << 60, 21), (1 << 50, 16), (1 << 36, 9)])
def test_huge_virtual_size_with_empty_tables_maps_at_once(
    samples: dict[str, Sample], tmp_path: Path, vsize: int, bits: int
) -> None:
    img = _grown(samples, tmp_path, vsize, bits)
    started = time.monotonic()
    with qcow2.Chain(img, tmp_path) as chain:
        rows = chain.map()
    assert rows.tolist() == [[0, vsize, qcow2.MAP_UNALLOCATED, 0, 0]]
    assert time.monotonic() - started < 2


def test_l1_entries_sharing_one_l2_table_are_refused(tmp_path: Path) -> None:
    """Thousands of L1 entries pointing at one L2 table of scattered data
    clusters: a 1 MiB file that would map to tens of millions of rows."""
    img = tmp_path / "shared.qcow2"
    src = tmp_path / "src.raw"
    src.write_bytes(os.urandom(MiB))
    fd = os.open(src, os.O_RDONLY)
    try:
        with qcow2.Writer(img, MiB, 65536) as w:
            for off in range(MiB - 65536, -1, -65536):  # backwards: nothing merges
                copy.copy_regions(
                    copy.FileSource(fd), w, extents.from_pairs([(off, 65536)]),
                    copy.CopyOptions(workers=1),
                )  # fmt: skip
            w.finish()
    finally:
        os.close(fd)
    h = qcow2.read_header(img)
    with open(img, "rb") as f:
        f.seek(h.l1_offset)
        entry = f.read(8)
    n = qcow2._qcow2.l1_entries_for(1 << 45, 16)
    l1_off = -(-img.stat().st_size // 65536) * 65536
    with open(img, "r+b") as f:
        f.truncate(l1_off + 8 * n)
        f.seek(l1_off)
        f.write(entry * n)
        f.seek(24)
        f.write(struct.pack(">Q", 1 << 45))
        f.seek(36)
        f.write(struct.pack(">IQ", n, l1_off))
    started = time.monotonic()
    with pytest.raises(DirbackupError, match="L2 table"):
        qcow2.Chain(img, tmp_path)
    assert time.monotonic() - started < 2


# ---------------------------------------------------------------------- nbdinfo --map


@pytest.fixture(scope="module")
def real_maps(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[bytes, int]]:
    """Text and JSON maps (allocation and a dirty bitmap) of a real export."""
    tmp = tmp_path_factory.mktemp("maps")
    img = tmp / "g.qcow2"
    size = 16 * MiB
    qemu.img_create(img, size)
    qemu.io(img, "write -P 1 0 1M", "write -z 2M 1M", "write -P 2 5M 64k")
    qemu.bitmap(img, "add", "b0")
    qemu.io(img, "write -P 3 7M 192k", "write -P 4 15M 1M", "discard 5M 64k")
    sock = Path("/tmp") / f"dbfuzz-{os.getpid()}.sock"
    out = {}
    with qemu.serve_nbd(img, str(sock), bitmap="b0") as server:
        for ctx in ("base:allocation", "qemu:dirty-bitmap:b0"):
            for fmt in ("text", "json"):
                cmd = ["nbdinfo", f"--map={ctx}", *(["--json"] if fmt == "json" else [])]
                text = subprocess.run([*cmd, server.uri], check=True, capture_output=True).stdout
                out[f"{ctx}/{fmt}"] = (text, size)
    return out


@st.composite
def text_mutations(draw: st.DrawFn) -> list[tuple[str, int, bytes]]:
    ops = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["drop", "dup", "swap", "num", "cut", "insert", "byte"]))
        pos = draw(st.integers(0, 1 << 16))
        if kind == "num":
            value = draw(
                st.one_of(
                    st.integers(-5, 1 << 70).map(lambda n: str(n).encode()),
                    st.sampled_from([b"", b"-0", b"0x10", b"1e3", b"18446744073709551616"]),
                )
            )
        elif kind in ("insert", "byte"):
            value = draw(st.binary(min_size=1, max_size=12))
        else:
            value = b""
        ops.append((kind, pos, value))
    return ops


def mutate_text(text: bytes, ops: list[tuple[str, int, bytes]]) -> bytes:
    lines = text.split(b"\n")
    for kind, pos, value in ops:
        i = pos % len(lines)
        if kind == "drop" and len(lines) > 1:
            del lines[i]
        elif kind == "dup":
            lines.insert(i, lines[i])
        elif kind == "swap":
            j = (pos // len(lines)) % len(lines)
            lines[i], lines[j] = lines[j], lines[i]
        elif kind == "num":
            words = lines[i].split(b" ")
            k = (pos // len(lines)) % len(words)
            words[k] = value
            lines[i] = b" ".join(words)
        elif kind == "cut":
            joined = b"\n".join(lines)
            lines = joined[: pos % (len(joined) + 1)].split(b"\n")
        elif kind == "insert":
            lines.insert(i, value)
        else:
            line = lines[i]
            k = (pos // len(lines)) % (len(line) + 1)
            lines[i] = line[:k] + value[:1] + line[k + 1 :]
    return b"\n".join(lines)


def check_map(rows: np.ndarray, size: int) -> None:
    assert rows.dtype == np.uint64 and rows.shape[1] == 3
    assert rows.shape[0] > 0
    assert int(rows[0, 0]) == 0 and (rows[:, 1] > 0).all()
    ends = rows[:, 0] + rows[:, 1]
    assert (rows[1:, 0] == ends[:-1]).all()
    assert int(ends[-1]) == size
    assert (rows[:, 2] < (1 << 32)).all()


MAP_KINDS = st.sampled_from(
    [
        "base:allocation/text",
        "base:allocation/json",
        "qemu:dirty-bitmap:b0/text",
        "qemu:dirty-bitmap:b0/json",
    ]
)


def _fuzz_map(real_maps: dict[str, tuple[bytes, int]], kind: str, ops: list) -> None:  # type: ignore[type-arg]
    text, size = real_maps[kind]
    parse = extents.parse_map_json if kind.endswith("json") else extents.parse_map_text
    bad = mutate_text(text, ops)
    started = time.monotonic()
    try:
        rows = parse(bad, size=size)
    except MapFormatError as exc:
        assert str(exc)
    else:
        check_map(rows, size)
    try:
        loose = parse(bad, contiguous=False)
    except MapFormatError:
        pass
    else:
        assert (loose[:, 1] > 0).all()
        assert all(int(o) + int(n) <= 1 << 64 for o, n, _ in loose.tolist())
    assert time.monotonic() - started < TIME_LIMIT


@FAST
@given(kind=MAP_KINDS, ops=text_mutations())
def test_fuzz_map_parsers(real_maps: dict[str, tuple[bytes, int]], kind: str, ops: list) -> None:  # type: ignore[type-arg]
    _fuzz_map(real_maps, kind, ops)


@pytest.mark.slow
@LONG
@given(kind=MAP_KINDS, ops=text_mutations())
def test_fuzz_map_parsers_long(
    real_maps: dict[str, tuple[bytes, int]],
    kind: str,
    ops: list,  # type: ignore[type-arg]
) -> None:
    _fuzz_map(real_maps, kind, ops)


def test_real_maps_parse(real_maps: dict[str, tuple[bytes, int]]) -> None:
    for kind, (text, size) in real_maps.items():
        parse = extents.parse_map_json if kind.endswith("json") else extents.parse_map_text
        check_map(parse(text, size=size), size)
