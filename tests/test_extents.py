"""Extents: nbdinfo map parsing, block status from real qemu-nbd exports, region arithmetic."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import GiB, KiB, MiB
from hypothesis import given, settings
from hypothesis import strategies as st

from dirbackup import extents, nbd, qemu
from dirbackup.errors import MapFormatError


def rows(*triples: tuple[int, int, int]) -> np.ndarray:
    return np.array(triples, dtype=np.uint64).reshape(-1, 3)


# ---------------------------------------------------------------- text parser


def test_parse_text_tolerates_spacing_and_descriptions() -> None:
    text = (
        b"         0     1048576    0  data\n\t1048576\t66060288 3 hole,zero\n\n  67108864 4096 1\n"
    )
    got = extents.parse_map_text(text, size=67108864 + 4096)
    assert got.dtype == np.uint64
    assert got.tolist() == [[0, 1048576, 0], [1048576, 66060288, 3], [67108864, 4096, 1]]


def test_parse_text_merges_nothing_but_equal_neighbours() -> None:
    got = extents.parse_map_text("0 10 1\n10 10 1\n20 5 0\n")
    assert got.tolist() == [[0, 20, 1], [20, 5, 0]]


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("0 10 0 data\n10 x 0\n", "line 2: malformed map entry: '10 x 0'"),
        ("0 10\n", "line 1: malformed"),
        ("0 10 0data\n", "line 1: malformed"),
        ("-5 10 0\n", "line 1: malformed"),
        ("0 99999999999999999999999 0\n", "line 1: number out of range"),
        ("0 10 4294967296\n", "line 1: number out of range"),
        ("0 10 0\n5 10 0\n", "line 2: extent at offset 5 overlaps"),
        ("0 10 0\n20 10 0\n", "line 2: extent at offset 20 leaves a gap"),
        ("10 10 0\n0 10 0\n", "line 1: extent at offset 10 leaves a gap"),
        ("0 0 0\n", "line 1: zero-length extent"),
        ("0 18446744073709551615 0\n18446744073709551615 1 0\n", "runs past 2^64"),
    ],
)
def test_parse_text_rejects_malformed(text: str, needle: str) -> None:
    with pytest.raises(MapFormatError) as exc:
        extents.parse_map_text(text)
    assert str(exc.value).startswith(needle) or needle in str(exc.value).split(": ", 1)[1]
    assert not str(exc.value).startswith("line line")


def test_parse_text_rejects_truncated_map() -> None:
    with pytest.raises(MapFormatError, match="map ends at offset 10 but the export has 20 bytes"):
        extents.parse_map_text("0 10 0\n", size=20)
    with pytest.raises(MapFormatError, match="empty"):
        extents.parse_map_text("", size=20)


def test_parse_text_non_contiguous_allowed_when_asked() -> None:
    got = extents.parse_map_text("0 10 1\n100 10 1\n", contiguous=False)
    assert got.tolist() == [[0, 10, 1], [100, 10, 1]]


# ---------------------------------------------------------------- JSON parser


def test_parse_json() -> None:
    text = (
        '[\n{ "offset": 0, "length": 1048576, "type": 1, "description": "dirty"},\n'
        '{ "description": "cl\\"ean", "type": 0, "length": 3145728, "offset": 1048576,'
        ' "zero": false}\n]\n'
    )
    assert extents.parse_map_json(text, size=4194304).tolist() == [
        [0, 1048576, 1],
        [1048576, 3145728, 0],
    ]
    assert extents.parse_map_json("[]").shape == (0, 3)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('[{"offset": 0, "length": 10}]', "entry 1: entry needs integer offset, length and type"),
        ('[{"offset": 0, "length": 10, "type": 0}', "entry 1: expected ',' or ']'"),
        ('[{"offset": 0 "length": 10, "type": 0}]', "expected ',' or '}'"),
        ('{"offset": 0}', "expected '['"),
        ('[{"offset": 0, "length": 10, "type": 0}] x', "trailing data"),
        (
            '[{"offset": 0, "length": 10, "type": 0},\n{"offset": 5, "length": 10, "type": 0}]',
            "line 2, entry 2",
        ),
    ],
)
def test_parse_json_rejects_malformed(text: str, needle: str) -> None:
    with pytest.raises(MapFormatError) as exc:
        extents.parse_map_json(text)
    assert needle in str(exc.value)


# ---------------------------------------------------------------- real exports


@pytest.fixture
def guest(tmp_path: Path) -> Path:
    """A qcow2 guest with a persistent bitmap and writes, zero writes and discards."""
    img = tmp_path / "guest.qcow2"
    qemu.img_create(img, 64 * MiB)
    qemu.io(img, "write -P 0x11 0 4M", "write -P 0x22 8M 1M")
    qemu.bitmap(img, "add", "b0")
    qemu.io(
        img,
        "write -P 0x33 1M 64k",
        "write -z 8M 128k",
        "discard 2M 64k",
        "write -P 0x44 30M 4k",
        "write -P 0x55 63M 1M",
    )
    return img


def nbdinfo_map(uri: str, context: str | None = None, json: bool = False) -> str:
    cmd = ["nbdinfo"]
    if json:
        cmd.append("--json")
    cmd.append(f"--map={context}" if context else "--map")
    return subprocess.run([*cmd, uri], check=True, capture_output=True, text=True).stdout


@pytest.mark.parametrize("context", ["base:allocation", "qemu:dirty-bitmap:b0"])
def test_parsers_and_block_status_agree_on_real_export(guest: Path, nbd_server, context) -> None:
    server = nbd_server(guest, bitmap="b0", export="drive0")
    size = 64 * MiB
    text = extents.parse_map_text(nbdinfo_map(server.uri, context), size=size)
    js = extents.parse_map_json(nbdinfo_map(server.uri, context, json=True), size=size)
    h = nbd.connect(server.uri, [context])
    got = extents.block_status(h, context)
    assert np.array_equal(text, js)
    assert np.array_equal(got, text)
    if context.startswith("qemu:dirty"):
        dirty = extents.dirty(got)
        # every write/zero/discard since the bitmap was added, at 64 KiB granularity
        assert dirty.tolist() == [
            [1 * MiB, 64 * KiB, 1],
            [2 * MiB, 64 * KiB, 1],
            [8 * MiB, 128 * KiB, 1],
            [30 * MiB, 64 * KiB, 1],
            [63 * MiB, 1 * MiB, 1],
        ]


def test_block_status_range_and_export_over_4gib(tmp_path: Path, nbd_server) -> None:
    img = tmp_path / "big.qcow2"
    qemu.img_create(img, 10 * GiB)
    qemu.bitmap(img, "add", "b0")
    qemu.io(img, "write -P 1 5G 64k", "write -P 2 9G 128k", "write -P 3 4095M 2M")
    server = nbd_server(img, bitmap="b0")
    ctx = extents.dirty_bitmap_context("b0")
    h = nbd.connect(server.uri, [ctx])
    full = extents.block_status(h, ctx)
    assert extents.total(full) == 10 * GiB
    assert extents.dirty(full).tolist() == [
        [4095 * MiB, 2 * MiB, 1],
        [5 * GiB, 64 * KiB, 1],
        [9 * GiB, 128 * KiB, 1],
    ]
    part = extents.block_status(h, ctx, 4 * GiB, 2 * GiB)
    assert extents.dirty(part).tolist() == [[4 * GiB, 1 * MiB, 1], [5 * GiB, 64 * KiB, 1]]
    assert int(part[0, 0]) == 4 * GiB and extents.total(part) == 2 * GiB
    with pytest.raises(ValueError, match="outside the export"):
        extents.block_status(h, ctx, 9 * GiB, 2 * GiB)


def test_block_status_needs_negotiated_context(guest: Path, nbd_server) -> None:
    server = nbd_server(guest)
    h = nbd.connect(server.uri, ["base:allocation"])
    with pytest.raises(Exception, match="did not agree to meta context"):
        extents.block_status(h, "qemu:dirty-bitmap:nope")


def test_file_extents(tmp_path: Path) -> None:
    p = tmp_path / "sparse"
    with open(p, "wb") as f:
        f.truncate(8 * MiB)
        f.seek(1 * MiB)
        f.write(b"x" * MiB)
        f.seek(6 * MiB)
        f.write(b"y" * 4096)
    fd = os.open(p, os.O_RDONLY)
    try:
        got = extents.file_extents(fd, 0, 8 * MiB)
    finally:
        os.close(fd)
    assert extents.total(got) == 8 * MiB
    data = extents.data(got)
    assert data[0].tolist() == [1 * MiB, 1 * MiB, 0]
    assert int(data[1, 0]) <= 6 * MiB < int(data[1, 0] + data[1, 1])


# ---------------------------------------------------------------- region arithmetic


def test_region_operations() -> None:
    e = rows((0, 10, 1), (10, 10, 0), (20, 5, 1), (100, 1, 1))
    assert extents.dirty(e).tolist() == [[0, 10, 1], [20, 5, 1], [100, 1, 1]]
    assert extents.coalesce(rows((0, 10, 1), (10, 5, 1), (12, 10, 2))).tolist() == [[0, 22, 3]]
    assert extents.coalesce(rows((0, 10, 0), (15, 5, 0)), gap=5).tolist() == [[0, 20, 0]]
    assert extents.align(rows((1, 2, 1), (70000, 10, 1)), 65536, 100000).tolist() == [
        [0, 100000, 1]
    ]
    assert extents.align(rows((1, 2, 1)), 4096, 3).tolist() == [[0, 3, 1]]
    assert extents.split(rows((0, 10, 1)), 4, 6).tolist() == [[0, 4, 1], [4, 2, 1], [6, 4, 1]]
    assert extents.total(e) == 26
    assert extents.clip(e, 5, 22).tolist() == [[5, 5, 1], [10, 10, 0], [20, 2, 1]]
    with pytest.raises(ValueError, match="not sorted"):
        extents.coalesce(rows((10, 1, 0), (0, 1, 0)))
    with pytest.raises(ValueError, match="power of two"):
        extents.align(e, 3, 100)


def covered(e: np.ndarray) -> set[int]:
    return {b for off, n, _ in e.tolist() for b in range(off, off + n)}


region_lists = st.lists(st.tuples(st.integers(0, 2000), st.integers(1, 300)), max_size=30).map(
    lambda xs: sorted(xs)
)


@settings(max_examples=200, deadline=None)
@given(region_lists, st.sampled_from([1, 2, 16, 64, 512]), st.integers(1, 700))
def test_region_properties(pairs, gran, maxlen) -> None:
    e = extents.from_pairs(pairs, 1)
    merged = extents.coalesce(e)
    assert covered(merged) == covered(e)
    assert all(
        int(merged[i, 0] + merged[i, 1]) < int(merged[i + 1, 0]) for i in range(len(merged) - 1)
    )
    size = 2400
    aligned = extents.align(e, gran, size)
    assert covered(e) <= covered(aligned)
    for off, n, _ in aligned.tolist():
        assert off % gran == 0 and ((off + n) % gran == 0 or off + n == size)
    pieces = extents.split(merged, maxlen, 256)
    assert covered(pieces) == covered(merged)
    assert extents.total(pieces) == extents.total(merged)
    for off, n, _ in pieces.tolist():
        assert 0 < n <= maxlen and off // 256 == (off + n - 1) // 256


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_map_parser_never_drops_a_line(blob: bytes) -> None:
    """Fuzz: either every non-blank line becomes (part of) an extent, or an error."""
    try:
        got = extents.parse_map_text(blob, contiguous=False)
    except MapFormatError:
        return
    lines = [ln for ln in blob.split(b"\n") if ln.strip(b" \t\r")]
    assert extents.total(got) == sum(int(ln.split()[1]) for ln in lines)


def big_map(lines: int) -> tuple[bytes, list[list[int]]]:
    """nbdinfo-style text of `lines` alternating extents (more than the size at
    which the parser splits the work between two threads)."""
    rows, off, out = [], 0, []
    for i in range(lines):
        n = 65536 * (1 + i % 7)
        out.append(f"{off:10d}  {n:10d}  {i % 2:3d}  {'dirty' if i % 2 else 'clean'}\n")
        rows.append([off, n, i % 2])
        off += n
    return "".join(out).encode(), rows


def test_big_map_parsed_in_two_halves() -> None:
    text, rows = big_map(200_000)
    assert len(text) > 4 << 20
    size = rows[-1][0] + rows[-1][1]
    got = extents.parse_map_text(text, size=size)
    assert got.tolist() == rows
    # equal flags across the split are merged like anywhere else
    same = text.replace(b"  1  dirty", b"  0  clean")
    merged = extents.parse_map_text(same, size=size)
    assert merged.tolist() == [[0, size, 0]]
    assert extents.parse_map_text(text, contiguous=False).tolist() == rows


@pytest.mark.parametrize("where", [0.25, 0.5, 0.75])
def test_big_map_errors_name_the_right_line(where: float) -> None:
    text, rows = big_map(200_000)
    lines = text.split(b"\n")
    k = int(len(rows) * where)
    bad = [*lines[:k], b"   12345 zork 0", *lines[k + 1 :]]
    with pytest.raises(MapFormatError, match=rf"^line {k + 1}: malformed map entry"):
        extents.parse_map_text(b"\n".join(bad))
    gap = lines[:k] + lines[k + 1 :]  # a missing line: the next one leaves a gap
    with pytest.raises(MapFormatError, match=rf"^line {k + 1}: extent at offset \d+ leaves a gap"):
        extents.parse_map_text(b"\n".join(gap))
    swapped = [*lines[:k], lines[k + 1], lines[k], *lines[k + 2 :]]
    with pytest.raises(MapFormatError, match=rf"^line {k + 1}: extent at offset \d+ leaves"):
        extents.parse_map_text(b"\n".join(swapped))
    size = rows[-1][0] + rows[-1][1]
    with pytest.raises(MapFormatError, match="truncated"):
        extents.parse_map_text(b"\n".join(lines[: len(rows) - 1]), size=size)


def test_parse_with_selection_matches_select() -> None:
    text, rows = big_map(200_000)
    size = rows[-1][0] + rows[-1][1]
    full = extents.parse_map_text(text, size=size)
    fused = extents.parse_map_text(text, size=size, select=(extents.DIRTY, extents.DIRTY))
    assert np.array_equal(fused, extents.dirty(full))
    small = extents.parse_map_text("0 10 0\n10 5 1\n15 5 1\n20 1 3\n",
                                   select=(extents.DIRTY, extents.DIRTY))
    assert small.tolist() == [[10, 11, 1]]
    with pytest.raises(MapFormatError, match="line 2"):  # unselected lines are checked too
        extents.parse_map_text("0 10 1\n10 x 0\n", select=(extents.DIRTY, extents.DIRTY))
