"""dirbackup's side of each benchmark workload, one measurement per process.

The comparison runner times this script as a whole process, like it times
`qemu-img` and `nbdcopy`, so interpreter start-up and imports are part of our
figure.  The JSON line it prints also says how long the work itself took
("seconds", from after the imports to the end), which is what the interpreter
start-up would not change in a long-running host process.

Commands:

    ours.py full-file SRC.raw OUT.qcow2            raw file -> qcow2 (file_extents + Writer)
    ours.py full-qcow2 SRC.qcow2 OUT.qcow2         qcow2 image -> qcow2 (Chain + Writer)
    ours.py write-floor NBYTES OUT                 NBYTES from one buffer into a new file
    ours.py copy-raw SRC.raw OUT.raw               raw file -> sparse raw file (nbdcopy's job)
    ours.py full-nbd URI OUT.qcow2                 NBD export -> qcow2 (base:allocation)
    ours.py incremental URI BITMAP OUT.qcow2 BACKING   dirty clusters -> qcow2 over BACKING
    ours.py restore TOP.qcow2 ALLOWED_DIR OUT.raw  validated chain -> raw file
    ours.py parse MAPFILE                          parse `nbdinfo --map` text, keep dirty
    ours.py product-backup STORE STOREID VMID DEVICE DISK EPOCH   Host.backup_vm
    ours.py product-restore STORE STOREID VOLID DEVICE OUT.raw    Host.restore_vm

`--workers N` sets the copy threads (and NBD connections); 0 means the
library's default, min(4, CPUs).
"""

from __future__ import annotations

import time

_T0 = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import mmap  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

from dirbackup import copy, extents, nbd, qcow2  # noqa: E402

_IMPORTED = time.perf_counter()
CLUSTER = 64 * 1024


def _options(workers: int) -> copy.CopyOptions:
    return copy.CopyOptions(workers=workers)


def _stats(stats: copy.CopyStats) -> dict[str, Any]:
    return {
        "read_bytes": stats.read_bytes,
        "written_bytes": stats.written_bytes,
        "zero_bytes": stats.zero_bytes,
        "workers": stats.workers,
    }


def full_file(src: str, out: str, workers: int, compress: str = "none") -> dict[str, Any]:
    """Full backup of a raw file: only its data extents are read (SEEK_DATA),
    zero clusters are detected and left out of the qcow2 (`compress`: how data
    clusters are stored, workload 7)."""
    fd = os.open(src, os.O_RDONLY)
    try:
        size = copy.fd_size(fd)
        regions = extents.align(extents.data(extents.file_extents(fd, 0, size)), CLUSTER, size)
        with qcow2.Writer(out, size, CLUSTER, compress=compress) as writer:
            stats = copy.copy_regions(copy.FileSource(fd, src), writer, regions, _options(workers))
            writer.finish()
    finally:
        os.close(fd)
    return _stats(stats)


def full_qcow2(src: str, out: str, workers: int) -> dict[str, Any]:
    """Full backup of a qcow2 guest image (and its backing chain): the chain
    reader restores use maps it without QEMU, only its data clusters are read,
    zero clusters are detected and left out of the new qcow2."""
    with qcow2.Chain(src, os.path.dirname(os.path.abspath(src))) as chain:
        size = chain.virtual_size
        # the writer may not use larger clusters than the chain (qcow2.restore)
        with qcow2.Writer(out, size, chain.min_cluster_size) as writer:
            stats = qcow2.restore(chain, writer, _options(workers))
            writer.finish()
    return _stats(stats)


def write_floor(nbytes: int, out: str) -> dict[str, Any]:
    """The floor under every copy that writes `nbytes` of data into a new file
    on the same file system: those bytes written from one buffer, nothing read
    (on tmpfs, page allocation and copy is most of what a backup costs)."""
    block = b"\x5a" * (1 << 20)
    fd = os.open(out, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for off in range(0, nbytes, len(block)):
            os.pwrite(fd, block[: min(len(block), nbytes - off)], off)
    finally:
        os.close(fd)
    return {"written_bytes": nbytes}


def copy_raw(src: str, out: str, workers: int) -> dict[str, Any]:
    """Raw file -> fresh sparse raw file (what nbdcopy does): data extents only,
    zero clusters left as holes."""
    fd = os.open(src, os.O_RDONLY)
    dst = os.open(out, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        size = copy.fd_size(fd)
        os.ftruncate(dst, size)
        regions = extents.data(extents.file_extents(fd, 0, size))
        stats = copy.copy_regions(
            copy.FileSource(fd, src), copy.FileTarget(dst, out), regions, _options(workers)
        )
    finally:
        os.close(fd)
        os.close(dst)
    return _stats(stats)


def full_nbd(uri: str, out: str, workers: int) -> dict[str, Any]:
    """Full backup from an NBD export: base:allocation says what to read."""
    n = workers or copy.default_workers()
    handles = nbd.connect_many(uri, n, [extents.ALLOCATION])
    try:
        size = handles[0].get_size()
        regions = extents.align(
            extents.data(extents.block_status(handles[0], extents.ALLOCATION)), CLUSTER, size
        )
        with qcow2.Writer(out, size, CLUSTER) as writer:
            stats = copy.copy_regions(copy.NBDSource(handles, uri), writer, regions, _options(n))
            writer.finish()
    finally:
        nbd.close_all(handles)
    result = _stats(stats)
    result["connections"] = len(handles)
    return result


def incremental(uri: str, bitmap: str, out: str, backing: str, workers: int) -> dict[str, Any]:
    """Incremental backup: the dirty clusters of the bitmap, nothing else, into a
    qcow2 whose backing file is the previous backup (zero clusters recorded)."""
    n = workers or copy.default_workers()
    context = extents.dirty_bitmap_context(bitmap)
    handles = nbd.connect_many(uri, n, [context])
    try:
        nbd.require_context(handles[0], context)
        size = handles[0].get_size()
        dirty = extents.dirty(extents.block_status(handles[0], context))
        regions = extents.align(dirty, CLUSTER, size)
        with qcow2.Writer(out, size, CLUSTER, backing=backing) as writer:
            stats = copy.copy_regions(copy.NBDSource(handles, uri), writer, regions, _options(n))
            writer.finish()
    finally:
        nbd.close_all(handles)
    result = _stats(stats)
    result["dirty_bytes"] = extents.total(dirty)
    result["connections"] = len(handles)
    return result


def restore(top: str, allowed: str, out: str, workers: int) -> dict[str, Any]:
    """Restore a validated chain into a new raw file (what `dirbackup restore` does
    without the store around it)."""
    with qcow2.Chain(top, allowed) as chain:
        fd = os.open(out, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.ftruncate(fd, chain.virtual_size)
            stats = qcow2.restore(chain, copy.FileTarget(fd, out), _options(workers))
            os.fsync(fd)
        finally:
            os.close(fd)
    return _stats(stats)


def parse(mapfile: str) -> dict[str, Any]:
    """Parse `nbdinfo --map` text and keep the dirty extents, with the same
    summary the seed baseline prints (so the runner can check both agree)."""
    start = time.perf_counter()
    with open(mapfile, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        # one pass: every line checked, only the dirty rows kept (the seed's job)
        dirty = extents.parse_map_text(data, select=(extents.DIRTY, extents.DIRTY))
    seconds = time.perf_counter() - start
    # The seed yields each line's extent; ours merges neighbours, so count the
    # summary on offsets and lengths, which both keep exactly.
    return {
        "seconds": seconds,
        "bytes": extents.total(dirty),
        "merged_count": int(dirty.shape[0]),
        "offset_sum": int(np.sum(dirty[:, 0], dtype=np.uint64)) if dirty.size else 0,
    }


def product_backup(
    store: str, storeid: str, vmid: int, device: str, disk: str, epoch: int
) -> dict[str, Any]:
    """The whole product path: Host + DirectoryStorage + provider, as the CLI runs it."""
    from dirbackup.host import Disk, Host
    from dirbackup.storage import DirectoryStorage

    # workloads 1-6 compare uncompressed images with qemu-img's: compress=none
    storage = DirectoryStorage(storeid, {"path": store, "compress": "none"})
    report = Host(storage, storeid).backup_vm(vmid, [Disk(device, Path(disk))], start_time=epoch)
    return {
        "volid": report.volid,
        "archive": report.archive_name,
        "modes": report.bitmap_modes,
        "archive_size": report.archive_size,
    }


def product_restore(store: str, storeid: str, volid: str, device: str, out: str) -> dict[str, Any]:
    """Restore through Host.restore_vm (our own engine, straight from the chain)."""
    from dirbackup.host import Host
    from dirbackup.storage import DirectoryStorage

    storage = DirectoryStorage(storeid, {"path": store})
    report = Host(storage, storeid).restore_vm(volid, {device: Path(out)})
    return {"volid": report.volid}


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--compress", default="none", help="full-file: none, zstd or zstd:LEVEL")
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name, args in (
        ("full-file", ["src", "out"]),
        ("full-qcow2", ["src", "out"]),
        ("write-floor", ["nbytes", "out"]),
        ("copy-raw", ["src", "out"]),
        ("full-nbd", ["uri", "out"]),
        ("incremental", ["uri", "bitmap", "out", "backing"]),
        ("restore", ["top", "allowed", "out"]),
        ("parse", ["mapfile"]),
        ("product-backup", ["store", "storeid", "vmid", "device", "disk", "epoch"]),
        ("product-restore", ["store", "storeid", "volid", "device", "out"]),
    ):
        p = sub.add_parser(name)
        for a in args:
            p.add_argument(a)
    a = ap.parse_args(argv)
    w = a.workers
    start = time.perf_counter()
    if a.cmd == "full-file":
        result = full_file(a.src, a.out, w, a.compress)
    elif a.cmd == "full-qcow2":
        result = full_qcow2(a.src, a.out, w)
    elif a.cmd == "write-floor":
        result = write_floor(int(a.nbytes), a.out)
    elif a.cmd == "copy-raw":
        result = copy_raw(a.src, a.out, w)
    elif a.cmd == "full-nbd":
        result = full_nbd(a.uri, a.out, w)
    elif a.cmd == "incremental":
        result = incremental(a.uri, a.bitmap, a.out, a.backing, w)
    elif a.cmd == "restore":
        result = restore(a.top, a.allowed, a.out, w)
    elif a.cmd == "parse":
        result = parse(a.mapfile)
    elif a.cmd == "product-backup":
        result = product_backup(a.store, a.storeid, int(a.vmid), a.device, a.disk, int(a.epoch))
    else:
        result = product_restore(a.store, a.storeid, a.volid, a.device, a.out)
    result.setdefault("seconds", time.perf_counter() - start)
    result["import_seconds"] = _IMPORTED - _T0
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
