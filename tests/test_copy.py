"""The copy core against real files and real qemu-nbd exports."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import KiB, MiB, assert_same, write_pattern_image

from dirbackup import copy, extents, nbd, qemu
from dirbackup.errors import Cancelled


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def fresh_target(path: Path, size: int) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    os.ftruncate(fd, size)
    return fd


@pytest.fixture
def raw_image(tmp_path: Path) -> Path:
    img = tmp_path / "source.raw"
    write_pattern_image(img, 24 * MiB + 12 * KiB, seed=7)  # odd size on purpose
    return img


def test_file_to_file_copy_is_exact_and_sparse(raw_image: Path, tmp_path: Path) -> None:
    size = raw_image.stat().st_size
    out = tmp_path / "out.raw"
    src = os.open(raw_image, os.O_RDONLY)
    dst = fresh_target(out, size)
    try:
        regions = extents.data(extents.file_extents(src, 0, size))
        stats = copy.copy_regions(
            copy.FileSource(src, str(raw_image)),
            copy.FileTarget(dst, str(out)),
            regions,
            copy.CopyOptions(request_size=1 * MiB, workers=2),
        )
    finally:
        os.close(src)
        os.close(dst)
    assert_same(raw_image, out)
    assert stats.done_bytes == extents.total(regions)
    assert stats.zero_bytes > 0  # the written zeros were found...
    assert allocated(out) <= stats.written_bytes + 64 * KiB  # ...and not written
    assert stats.written_bytes + stats.zero_bytes == stats.done_bytes


def test_nbd_export_to_file_multi_conn(raw_image: Path, tmp_path: Path, nbd_server) -> None:
    qcow = tmp_path / "guest.qcow2"
    qemu.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw_image), str(qcow)])
    server = nbd_server(qcow, export="drive-scsi0")
    handles = nbd.connect_many(server.uri, 2, ["base:allocation"])
    assert len(handles) == 2  # read-only qemu-nbd with --shared allows multi-conn
    size = handles[0].get_size()
    regions = extents.data(extents.block_status(handles[0], "base:allocation"))
    out = tmp_path / "out.raw"
    dst = fresh_target(out, size)
    try:
        stats = copy.copy_regions(
            copy.NBDSource(handles, server.uri),
            copy.FileTarget(dst, str(out)),
            regions,
            copy.CopyOptions(request_size=256 * KiB, depth=8, workers=2),
        )
    finally:
        os.close(dst)
    assert stats.workers == 2
    assert_same(raw_image, out)


def test_bitmap_driven_copy_onto_old_copy(tmp_path: Path, nbd_server) -> None:
    """Only dirty regions are copied, and zero writes and discards reach a non-fresh target."""
    guest = tmp_path / "guest.qcow2"
    qemu.img_create(guest, 32 * MiB)
    qemu.io(guest, "write -P 0x11 0 16M", "write -P 0x22 20M 4M")
    old = tmp_path / "old.raw"
    qemu.run(["qemu-img", "convert", "-O", "raw", str(guest), str(old)])
    qemu.bitmap(guest, "add", "b0")
    qemu.io(
        guest,
        "write -P 0x33 1M 100k",  # unaligned write
        "write -z 4M 1M",  # zero write over data
        "discard 8M 2M",  # discard over data
        "write -P 0x44 31M 1M",
    )
    ctx = extents.dirty_bitmap_context("b0")
    server = nbd_server(guest, bitmap="b0")
    h = nbd.connect(server.uri, [ctx])
    dirty = extents.dirty(extents.block_status(h, ctx))
    assert extents.total(dirty) < 6 * MiB
    fd = os.open(old, os.O_RDWR)
    try:
        stats = copy.copy_regions(
            copy.NBDSource([h], server.uri),
            copy.FileTarget(fd, str(old), fresh=False),
            dirty,
        )
    finally:
        os.close(fd)
    assert stats.read_bytes == extents.total(dirty)
    assert_same(old, guest, "raw", "qcow2")


def test_odirect_source(tmp_path: Path) -> None:
    img = tmp_path / "direct.raw"
    write_pattern_image(img, 9 * MiB + 4096, seed=3)
    size = img.stat().st_size
    try:
        src = os.open(img, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        pytest.skip("file system without O_DIRECT")
    out = tmp_path / "out.raw"
    dst = fresh_target(out, size)
    try:
        # unaligned regions: widened to 4096 for O_DIRECT
        regions = extents.from_pairs([(100, 5000), (3 * MiB + 7, MiB), (9 * MiB, 4096)])
        copy.copy_regions(copy.FileSource(src), copy.FileTarget(dst), regions)
    finally:
        os.close(src)
        os.close(dst)
    with open(img, "rb") as a, open(out, "rb") as b:
        want, got = a.read(), b.read()
    for off, n in [(0, 8192), (3 * MiB, MiB + 4096), (9 * MiB, 4096)]:
        assert got[off : off + n] == want[off : off + n]


def test_nbd_target(raw_image: Path, tmp_path: Path, nbd_server) -> None:
    size = raw_image.stat().st_size
    target = tmp_path / "target.qcow2"
    qemu.img_create(target, size)
    server = nbd_server(target, readonly=False, shared=1)
    h = nbd.connect(server.uri)
    src = os.open(raw_image, os.O_RDONLY)
    try:
        copy.copy_regions(
            copy.FileSource(src),
            copy.NBDTarget([h], server.uri, fresh=False),
            extents.from_pairs([(0, size)]),
        )
    finally:
        os.close(src)
    h.flush()
    nbd.close_all([h])
    server.stop()
    assert_same(raw_image, target, "raw", "qcow2")


def test_discard_file_source(raw_image: Path, tmp_path: Path) -> None:
    work = tmp_path / "fleece.raw"
    shutil.copy(raw_image, work)
    size = work.stat().st_size
    out = tmp_path / "out.raw"
    src = os.open(work, os.O_RDWR)
    dst = fresh_target(out, size)
    try:
        stats = copy.copy_regions(
            copy.FileSource(src),
            copy.FileTarget(dst),
            extents.from_pairs([(0, size)]),
            copy.CopyOptions(discard=True),
        )
        remaining = extents.data(extents.file_extents(src, 0, size))
    finally:
        os.close(src)
        os.close(dst)
    assert_same(raw_image, out)
    assert stats.discarded_bytes == size
    assert extents.total(remaining) == 0


def test_discard_unsupported_is_a_note_not_an_error(
    raw_image: Path, tmp_path: Path, nbd_server
) -> None:
    size = raw_image.stat().st_size
    out = tmp_path / "out.raw"
    # a read-only fd: fallocate fails with EBADF
    src = os.open(raw_image, os.O_RDONLY)
    dst = fresh_target(out, size)
    try:
        stats = copy.copy_regions(
            copy.FileSource(src),
            copy.FileTarget(dst),
            extents.from_pairs([(0, size)]),
            copy.CopyOptions(discard=True),
        )
    finally:
        os.close(src)
        os.close(dst)
    assert stats.discarded_bytes == 0 and stats.discard_note
    assert_same(raw_image, out)
    # a read-only NBD export: no trim offered
    server = nbd_server(raw_image, fmt="raw")
    h = nbd.connect(server.uri)
    dst = fresh_target(out, size)
    try:
        stats = copy.copy_regions(
            copy.NBDSource([h]),
            copy.FileTarget(dst),
            extents.from_pairs([(0, size)]),
            copy.CopyOptions(discard=True),
        )
    finally:
        os.close(dst)
    assert stats.discard_note and stats.discarded_bytes == 0


def test_bandwidth_limit_progress_and_cancel(raw_image: Path, tmp_path: Path) -> None:
    size = 8 * MiB
    out = tmp_path / "out.raw"
    src = os.open(raw_image, os.O_RDONLY)
    dst = fresh_target(out, size)
    seen: list[int] = []
    try:
        start = time.monotonic()
        copy.copy_regions(
            copy.FileSource(src),
            copy.FileTarget(dst),
            extents.from_pairs([(0, size)]),
            copy.CopyOptions(
                request_size=256 * KiB, bandwidth_limit=16 * MiB, progress_interval=0.05
            ),
            progress=lambda s: seen.append(s.done_bytes),
        )
        elapsed = time.monotonic() - start
        # 8 MiB at 16 MiB/s, less one request of burst: at least ~0.45 s
        assert elapsed >= 0.4
        assert len(seen) >= 3 and seen == sorted(seen) and seen[-1] == size
        # cancellation through an event stops a slow copy quickly
        event = threading.Event()
        threading.Timer(0.2, event.set).start()
        start = time.monotonic()
        with pytest.raises(Cancelled):
            copy.copy_regions(
                copy.FileSource(src),
                copy.FileTarget(dst),
                extents.from_pairs([(0, size)]),
                copy.CopyOptions(request_size=256 * KiB, bandwidth_limit=1 * MiB),
                cancel_event=event,
            )
        assert time.monotonic() - start < 1.5
    finally:
        os.close(src)
        os.close(dst)


def test_ctrl_c_stops_workers(raw_image: Path, tmp_path: Path) -> None:
    script = f"""
import os, sys, time
from dirbackup import copy, extents
src = os.open({str(raw_image)!r}, os.O_RDONLY)
dst = os.open({str(tmp_path / "o.raw")!r}, os.O_RDWR | os.O_CREAT, 0o644)
print("ready", flush=True)
try:
    copy.copy_regions(copy.FileSource(src), copy.FileTarget(dst),
                      extents.from_pairs([(0, 8 << 20)]),
                      copy.CopyOptions(request_size=256 << 10, bandwidth_limit=1 << 20))
except KeyboardInterrupt:
    import threading
    print("interrupted", threading.active_count(), flush=True)
    sys.exit(3)
"""
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(0.5)
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=10)
    assert time.monotonic() - sent < 2
    assert proc.returncode == 3 and out.strip() == "interrupted 1"


def test_source_shorter_than_declared(raw_image: Path, tmp_path: Path) -> None:
    size = raw_image.stat().st_size
    src = os.open(raw_image, os.O_RDONLY)
    dst = fresh_target(tmp_path / "out.raw", size + MiB)
    try:
        with pytest.raises(OSError, match=r"reading .*source.raw at offset \d+: premature end"):
            copy.copy_regions(
                copy.FileSource(src, str(raw_image)),
                copy.FileTarget(dst),
                extents.from_pairs([(0, size + MiB)]),
            )
    finally:
        os.close(src)
        os.close(dst)


def test_unwritable_target(raw_image: Path, tmp_path: Path) -> None:
    out = tmp_path / "ro.raw"
    out.write_bytes(b"")
    src = os.open(raw_image, os.O_RDONLY)
    dst = os.open(out, os.O_RDONLY)
    try:
        with pytest.raises(OSError, match=r"writing .*ro.raw at offset \d+") as exc:
            copy.copy_regions(
                copy.FileSource(src), copy.FileTarget(dst, str(out)), extents.from_pairs([(0, MiB)])
            )
        assert exc.value.errno == 9  # EBADF
    finally:
        os.close(src)
        os.close(dst)


def test_dead_nbd_server(tmp_path: Path, sock_dir: Path) -> None:
    """nbdkit with a delay filter, killed during the copy: a clear error, no hang."""
    sock = sock_dir / "kit.sock"
    proc = subprocess.Popen(
        ["nbdkit", "-f", "-U", str(sock), "--filter=delay", "memory", "64M", "rdelay=200ms"],
    )
    try:
        for _ in range(100):
            if sock.exists():
                break
            time.sleep(0.05)
        h = nbd.connect(nbd.unix_uri(str(sock)))
        out = tmp_path / "out.raw"
        dst = fresh_target(out, 64 * MiB)
        threading.Timer(0.5, proc.kill).start()
        start = time.monotonic()
        try:
            with pytest.raises(OSError, match=r"reading .*kit\.sock"):
                copy.copy_regions(
                    copy.NBDSource([h], nbd.unix_uri(str(sock))),
                    copy.FileTarget(dst),
                    extents.from_pairs([(0, 64 * MiB)]),
                    copy.CopyOptions(request_size=1 * MiB),
                )
        finally:
            os.close(dst)
        assert time.monotonic() - start < 5
    finally:
        proc.kill()
        proc.wait()


def test_digests_match_recomputation(raw_image: Path, tmp_path: Path) -> None:
    xxhash = pytest.importorskip("xxhash")
    size = raw_image.stat().st_size
    src = os.open(raw_image, os.O_RDONLY)
    dst = fresh_target(tmp_path / "out.raw", size)
    chunk = 4 * MiB
    try:
        stats = copy.copy_regions(
            copy.FileSource(src),
            copy.FileTarget(dst),
            extents.from_pairs([(0, size)]),
            copy.CopyOptions(digest_chunk=chunk, workers=2),
            digest_size=size,
        )
    finally:
        os.close(src)
        os.close(dst)
    data = raw_image.read_bytes()
    want = [0] * ((size + chunk - 1) // chunk)
    for off in range(0, size, 64 * KiB):
        unit = data[off : off + 64 * KiB]
        if unit.count(0) != len(unit):
            want[off // chunk] = (
                want[off // chunk] + xxhash.xxh64_intdigest(unit, seed=off)
            ) % 2**64
    assert stats.digests is not None
    assert stats.digests.tolist() == want


def test_requests_must_fit(tmp_path: Path) -> None:
    from dirbackup import _copy

    with pytest.raises(ValueError, match="longer than request_size"):
        _copy.CopyJob(
            np.array([[0, 8 << 20, 0, 0, 0]], dtype=np.uint64), src_fd=0, target_kind=_copy.TGT_NULL
        )
