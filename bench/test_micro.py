"""Micro-benchmarks of the core (pytest-benchmark): `make bench-micro`.

They time one kernel at a time, in this process, so that a regression shows
up as a number that moved rather than as a few percent of a whole backup:
map parsing (against the seed's regex loop), block status collection from a
real qemu-nbd export (against a python-libnbd callback loop), zero detection,
the file-to-file copy loop, qcow2 metadata (writer finish, chain map) and a
persistent dirty bitmap read from the image file.
Each checks its result before it is timed.  Not part of `make test`: the
tests directory is `tests/`; run with `make bench-micro`, or e.g.
`.venv/bin/python -m pytest bench/test_micro.py -k parse --benchmark-columns=min,median`.

Images live on /dev/shm (falls back to the temporary directory), made once per
module and removed afterwards.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import images
import numpy as np
import pytest
import seed_baseline
from images import CLUSTER, GiB, MiB, TiB

from dirbackup import _copy, copy, extents, nbd, qcow2, qcow2bitmaps, qemu

MAP_LINES = 1_000_000


@pytest.fixture(scope="module")
def work() -> Iterator[Path]:
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    path = Path(tempfile.mkdtemp(prefix="dbb-micro-", dir=base))
    yield path
    shutil.rmtree(path, ignore_errors=True)


# ----------------------------------------------------------------------------
# Map parsing


@pytest.fixture(scope="module")
def map_text(work: Path) -> tuple[bytes, tuple[int, int, int]]:
    path = work / "map.txt"
    expected = images.map_text(path, MAP_LINES, seed=5)
    data = path.read_bytes()
    path.unlink()
    return data, expected


def _summary(dirty: np.ndarray) -> tuple[int, int, int]:
    return (
        int(dirty.shape[0]),
        int(dirty[:, 1].sum()),
        int(np.sum(dirty[:, 0], dtype=np.uint64)),
    )


@pytest.mark.benchmark(group="map-parse")
def test_parse_map_text_ours(benchmark: Any, map_text: tuple[bytes, tuple[int, int, int]]) -> None:
    data, expected = map_text
    assert _summary(extents.dirty(extents.parse_map_text(data))) == expected
    benchmark(lambda: extents.dirty(extents.parse_map_text(data)))


@pytest.mark.benchmark(group="map-parse")
def test_parse_map_text_seed_regex(
    benchmark: Any, map_text: tuple[bytes, tuple[int, int, int]]
) -> None:
    data, expected = map_text
    lines = data.splitlines(keepends=True)

    def seed() -> list[tuple[int, int]]:
        return list(seed_baseline.next_dirty_region(lines))

    got = seed()
    assert (len(got), sum(n for _, n in got), sum(o for o, _ in got) % (1 << 64)) == expected
    benchmark.pedantic(seed, rounds=3, iterations=1)


@pytest.mark.benchmark(group="map-parse")
def test_parse_map_json_ours(benchmark: Any, map_text: tuple[bytes, tuple[int, int, int]]) -> None:
    data, expected = map_text
    rows = extents.parse_map_text(data)
    descr = np.array([b"clean", b"dirty"])[rows[:, 2].astype(np.intp)]
    json_text = (
        b"[\n"
        + b",\n".join(
            b'{ "offset": %d, "length": %d, "type": %d, "description": "%s" }' % (o, n, t, d)
            for (o, n, t), d in zip(rows.tolist(), descr.tolist(), strict=True)
        )
        + b"\n]\n"
    )
    assert _summary(extents.dirty(extents.parse_map_json(json_text))) == expected
    benchmark(lambda: extents.dirty(extents.parse_map_json(json_text)))


# ----------------------------------------------------------------------------
# Block status from a qemu-nbd export


@pytest.fixture(scope="module")
def fragmented_export(work: Path) -> Iterator[tuple[str, int]]:
    """A 4 GiB qcow2 whose every other 64 KiB cluster was written after the bitmap
    was added: 65,536 allocation extents and as many dirty-bitmap extents."""
    image = work / "frag.qcow2"
    size = 4 * GiB
    images.qemu_img("create", "-q", "-f", "qcow2", str(image), str(size))
    images.qemu_img("bitmap", "--add", "--enable", str(image), "b")
    clusters = np.arange(0, 2 * 32768, 2)
    images.qemu_io_batch(image, images.dirty_commands(clusters, seed=1, zero_every=0), batch=8192)
    server = qemu.start_nbd(image, str(work / "frag.sock"), bitmap="b")
    try:
        yield server.uri, clusters.size
    finally:
        server.stop()


@pytest.mark.benchmark(group="block-status")
@pytest.mark.parametrize("context", [extents.ALLOCATION, "qemu:dirty-bitmap:b"])
def test_block_status_ours(
    benchmark: Any, fragmented_export: tuple[str, int], context: str
) -> None:
    uri, n = fragmented_export
    h = nbd.connect(uri, [context])
    try:
        select = extents.data if context == extents.ALLOCATION else extents.dirty
        assert select(extents.block_status(h, context)).shape[0] == n
        benchmark(lambda: extents.block_status(h, context))
    finally:
        nbd.close_all([h])


@pytest.mark.benchmark(group="block-status")
def test_block_status_python_callback(benchmark: Any, fragmented_export: tuple[str, int]) -> None:
    """What a pure-Python client does: python-libnbd's block_status with a callback
    that appends (offset, length, flags) per extent."""
    uri, n = fragmented_export
    context = "qemu:dirty-bitmap:b"
    h = nbd.connect(uri, [context])
    size = h.get_size()

    def collect() -> list[tuple[int, int, int]]:
        out: list[tuple[int, int, int]] = []
        pos = 0
        while pos < size:
            start = len(out)

            def cb(meta: str, offset: int, entries: list[int], err: Any) -> int:
                if meta == context:
                    o = offset
                    for k in range(0, len(entries), 2):
                        out.append((o, entries[k], entries[k + 1]))
                        o += entries[k]
                return 0

            h.block_status(min(size - pos, 1 << 31), pos, cb)
            last = out[-1]
            pos = last[0] + last[1]
            assert len(out) > start
        return out

    try:
        assert sum(1 for e in collect() if e[2] & 1) == n
        benchmark.pedantic(collect, rounds=5, iterations=1)
    finally:
        nbd.close_all([h])


# ----------------------------------------------------------------------------
# Zero detection and the copy loop


@pytest.fixture(scope="module")
def zero_and_data(work: Path) -> tuple[Path, Path]:
    """256 MiB of written zeros, and 256 MiB of random data (both allocated)."""
    size = 256 * MiB
    zeros, data = work / "zeros.raw", work / "data.raw"
    with open(zeros, "wb") as f:
        for _ in range(size // (16 * MiB)):
            f.write(bytes(16 * MiB))
    images.write_pieces(data, size, np.zeros(size // MiB, dtype=np.uint8), seed=2)
    return zeros, data


def _scan(path: Path) -> Any:
    """Read a whole file through the copy engine into a null target: the work is
    pread + zero detection per 64 KiB cluster."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        requests = copy.requests_from_regions(extents.from_pairs([(0, size)]), 4 * MiB)
        job = _copy.CopyJob(
            requests, workers=1, src_fd=fd, target_kind=_copy.TGT_NULL, tgt_fresh=True
        )
        job.run()
        return job
    finally:
        os.close(fd)


@pytest.mark.benchmark(group="zero-detection")
@pytest.mark.parametrize("kind", ["all-zero", "random"])
def test_zero_detection(benchmark: Any, zero_and_data: tuple[Path, Path], kind: str) -> None:
    """all-zero: every byte is compared; random: the check stops at the first
    byte, so the difference between the two is the cost of the scan."""
    path = zero_and_data[0] if kind == "all-zero" else zero_and_data[1]
    job = _scan(path)
    size = path.stat().st_size
    assert job.zero_bytes == (size if kind == "all-zero" else 0)
    benchmark.extra_info["bytes"] = size
    benchmark(_scan, path)


@pytest.fixture(scope="module")
def mixed_small(work: Path) -> Path:
    path = work / "mixed.raw"
    images.mixed_raw(path, 64 * MiB, seed=3)
    return path


@pytest.mark.benchmark(group="copy-file")
@pytest.mark.parametrize("workers", [1, 2])
def test_copy_file_to_file(benchmark: Any, mixed_small: Path, work: Path, workers: int) -> None:
    """64 MiB mixed raw image (1/2 data, 1/4 zeros, 1/4 holes) to a fresh sparse file."""
    out = work / "copy-out.raw"
    size = mixed_small.stat().st_size

    def run() -> copy.CopyStats:
        src = os.open(mixed_small, os.O_RDONLY)
        dst = os.open(out, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.ftruncate(dst, size)
            regions = extents.data(extents.file_extents(src, 0, size))
            return copy.copy_regions(
                copy.FileSource(src),
                copy.FileTarget(dst),
                regions,
                copy.CopyOptions(workers=workers),
            )
        finally:
            os.close(src)
            os.close(dst)

    run()
    same, msg = qemu.img_compare(mixed_small, out, "raw", "raw")
    assert same, msg
    benchmark(run)
    out.unlink()


@pytest.mark.benchmark(group="copy-file")
def test_write_floor(benchmark: Any, mixed_small: Path, work: Path) -> None:
    """The floor under every copy of this image: writing just its data bytes
    (half of it) into a new file on the same file system, from one buffer,
    reading nothing.  On tmpfs this page allocation and copy is most of what a
    full backup costs, for every tool."""
    out = work / "floor.raw"
    block = b"\x5a" * MiB
    nbytes = mixed_small.stat().st_size // 2

    def run() -> None:
        fd = os.open(out, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for off in range(0, nbytes, MiB):
                os.pwrite(fd, block, off)
        finally:
            os.close(fd)

    benchmark(run)
    assert out.stat().st_size == nbytes
    out.unlink()


@pytest.mark.benchmark(group="copy-file")
def test_copy_file_to_qcow2(benchmark: Any, mixed_small: Path, work: Path) -> None:
    """The same image into our qcow2 writer (what a full backup of a file does)."""
    out = work / "copy-out.qcow2"
    size = mixed_small.stat().st_size

    def run() -> None:
        out.unlink(missing_ok=True)
        src = os.open(mixed_small, os.O_RDONLY)
        try:
            regions = extents.align(extents.data(extents.file_extents(src, 0, size)), CLUSTER, size)
            with qcow2.Writer(out, size) as writer:
                copy.copy_regions(copy.FileSource(src), writer, regions, copy.CopyOptions())
                writer.finish()
        finally:
            os.close(src)

    run()
    same, msg = qemu.img_compare(mixed_small, out, "raw", "qcow2")
    assert same, msg
    benchmark(run)
    out.unlink()


# ----------------------------------------------------------------------------
# qcow2 metadata


SCATTERED = 10_000  # clusters spread over a 1 TiB disk: thousands of L2 tables


@pytest.fixture(scope="module")
def scattered_source(work: Path) -> tuple[Path, np.ndarray]:
    path = work / "scattered.raw"
    clusters = images.scattered_clusters(TiB, SCATTERED, seed=8)
    images.raw_with_clusters(path, TiB, clusters, seed=9)
    return path, clusters


@pytest.mark.benchmark(group="qcow2-metadata")
def test_writer_finish_1tib_scattered(
    benchmark: Any, scattered_source: tuple[Path, np.ndarray], work: Path
) -> None:
    """finish() of a 1 TiB image holding 10,000 clusters scattered over it: L2
    tables, L1, refcounts and header; the data copy is setup, not timed."""
    src_path, clusters = scattered_source
    out = work / "finish.qcow2"
    regions = extents.from_pairs([(int(c) * CLUSTER, CLUSTER) for c in clusters])
    state: dict[str, Any] = {}

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        out.unlink(missing_ok=True)
        writer = qcow2.Writer(out, TiB)
        src = os.open(src_path, os.O_RDONLY)
        try:
            copy.copy_regions(copy.FileSource(src), writer, regions, copy.CopyOptions())
        finally:
            os.close(src)
        state["writer"] = writer
        return (writer,), {}

    def finish(writer: Any) -> None:
        writer.finish(sync=False)

    benchmark.pedantic(finish, setup=setup, rounds=5, iterations=1)
    same, msg = qemu.img_compare(src_path, out, "raw", "qcow2")
    assert same, msg
    qemu.img_check(out)
    out.unlink()


@pytest.fixture(scope="module")
def chain(work: Path, scattered_source: tuple[Path, np.ndarray]) -> Path:
    """A full + 5 incrementals of a 1 TiB disk made with our writer: 10,000
    scattered clusters in the full, 2,000 more (some zero) in each link."""
    src_path, clusters = scattered_source
    store = work / "chain"
    store.mkdir()
    src = os.open(src_path, os.O_RDONLY)
    try:
        previous = None
        for link in range(6):
            picks = clusters if link == 0 else images.scattered_clusters(TiB, 2000, seed=20 + link)
            path = store / f"link{link}.qcow2"
            with qcow2.Writer(path, TiB, backing=previous) as writer:
                regions = extents.from_pairs([(int(c) * CLUSTER, CLUSTER) for c in picks])
                copy.copy_regions(copy.FileSource(src), writer, regions, copy.CopyOptions())
                writer.finish(sync=False)
            previous = path.name
    finally:
        os.close(src)
    return store / "link5.qcow2"


@pytest.mark.benchmark(group="qcow2-metadata")
def test_chain_map_1tib_depth6(benchmark: Any, chain: Path) -> None:
    """Open and validate a 6-deep chain of a 1 TiB disk and map all of it."""

    def run() -> np.ndarray:
        with qcow2.Chain(chain, chain.parent) as c:
            return c.map()

    rows = run()
    assert rows[:, 1].sum() == TiB
    benchmark(run)


@pytest.fixture(scope="module")
def bitmap_image(work: Path) -> tuple[Path, np.ndarray]:
    """A 1 TiB qcow2 image (64 KiB clusters) whose 64 KiB-granularity bitmap
    recorded 400 scattered zero writes (no data clusters), and QEMU's map of
    it from a read-only qemu-nbd export."""
    path = work / "bitmap.qcow2"
    qemu.img_create(path, TiB, cluster_size=CLUSTER)
    qemu.run(["qemu-img", "bitmap", "--add", "-g", str(CLUSTER), "--enable", str(path), "b"])
    picks = images.scattered_clusters(TiB, 400, seed=31)
    qemu.io(path, *(f"write -z {int(c) * CLUSTER} {CLUSTER}" for c in picks))
    context = extents.dirty_bitmap_context("b")
    with qemu.serve_nbd(path, str(work / "bitmap.sock"), bitmap="b") as server:
        h = nbd.connect(server.uri, [context])
        try:
            want = extents.dirty(extents.block_status(h, context))
        finally:
            h.shutdown()
    return path, want


@pytest.mark.benchmark(group="qcow2-metadata")
def test_dirty_bitmap_1tib_sparse(benchmark: Any, bitmap_image: tuple[Path, np.ndarray]) -> None:
    """Read a sparse persistent bitmap of a 1 TiB disk (16 Mi bits, 2 MiB of
    bitmap data) into dirty extents, from the image file."""
    path, want = bitmap_image

    def run() -> np.ndarray:
        fd = os.open(path, os.O_RDONLY)
        try:
            return qcow2bitmaps.dirty_extents(fd, qcow2.read_header(path, fd), "b")
        finally:
            os.close(fd)

    got = run()
    assert np.array_equal(got, want) and got.shape[0] > 300
    benchmark(run)
