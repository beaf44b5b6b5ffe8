"""QEMU's persistent dirty bitmaps, read from a qcow2 image file itself.

When the core reads a local guest image directly (no qemu-nbd in the path),
an incremental backup still needs to know what changed: the dirty bitmap QEMU
keeps in the image.  This module reads it from the bitmaps extension
(QEMU's docs/interop/qcow2.txt, "Bitmaps extension", "Bitmaps"):

* `list_bitmaps()` names the bitmaps of an image with their flags;
* `dirty_extents()` turns one bitmap into the extents it marks dirty, in the
  form `extents.dirty()` gives for a `qemu:dirty-bitmap:NAME` NBD map, so
  that either source feeds the same copy plan.

A bitmap that cannot be trusted -- the extension is stale (a program without
bitmap support wrote the image), the bitmap is missing, or QEMU did not close
it cleanly (in_use) -- raises `BitmapUnusable`: the caller then makes a full
backup.  Metadata that breaks the format's rules or QEMU's limits (hostile
or damaged images) is an `ImageError` naming the file.  Every read is bounded
by QEMU's own limits and the file size, checked before anything is read.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from dirbackup import extents, qcow2
from dirbackup.errors import DirbackupError, ImageError


class BitmapUnusable(DirbackupError):
    """The named bitmap cannot be trusted: a full backup is needed (reason says why)."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


# QEMU's limits (block/qcow2.h, block/qcow2-bitmap.c): images beyond them are
# ones QEMU itself refuses to open.
MAX_BITMAPS = 65535
MAX_DIRECTORY_SIZE = 1024 * MAX_BITMAPS
MAX_NAME_SIZE = 1023
MIN_GRANULARITY_BITS = 9
MAX_GRANULARITY_BITS = 31
MAX_TABLE_SIZE = 0x8000000  # entries
MAX_PHYS_SIZE = 0x20000000  # bytes of bitmap data

EXTENSION_SIZE = 24
# table offset, table size, flags, type, granularity bits, name size, extra data size
ENTRY_HEADER = struct.Struct(">QIIBBHI")
FLAG_IN_USE = 1 << 0
FLAG_AUTO = 1 << 1
FLAG_EXTRA_DATA_COMPATIBLE = 1 << 2
KNOWN_FLAGS = FLAG_IN_USE | FLAG_AUTO | FLAG_EXTRA_DATA_COMPATIBLE
TYPE_DIRTY_TRACKING = 1
TABLE_ALL_ONES = 1
TABLE_OFFSET_MASK = 0x00FFFFFFFFFFFE00
TABLE_RESERVED_MASK = 0xFF000000000001FE

#: Bytes of bitmap data turned into runs at a time: bounds the memory of a
#: conversion (8 bits a byte unpacked) whatever the bitmap's size.
CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class BitmapInfo:
    """One bitmap directory entry.  `auto` is QEMU's "enabled" (it records
    writes); every bitmap in the file is persistent by nature."""

    name: str
    granularity: int
    in_use: bool
    auto: bool
    persistent: bool
    type: int
    flags: int
    table_offset: int
    table_size: int
    extra_data_size: int

    @property
    def usable_extra_data(self) -> bool:
        """Extra data we do not understand may be ignored only with the
        extra_data_compatible flag."""
        return self.extra_data_size == 0 or bool(self.flags & FLAG_EXTRA_DATA_COMPATIBLE)


def _bad(header: qcow2.Header, why: str) -> ImageError:
    return ImageError(f"{header.path}: {why}")


def _pread(fd: int, header: qcow2.Header, length: int, offset: int, what: str) -> bytes:
    """Exactly `length` bytes at `offset` (already checked against the file size)."""
    if length == 0:
        return b""
    try:
        data = os.pread(fd, length, offset)
    except OSError as exc:
        raise _bad(header, f"cannot read the {what} at offset {offset}: {exc.strerror}") from None
    if len(data) != length:
        raise _bad(header, f"the {what} at offset {offset} is truncated (the file shrank?)")
    return data


def _inside(header: qcow2.Header, offset: int, length: int) -> bool:
    """A region after the header cluster and inside the file."""
    return offset >= header.cluster_size and offset + length <= header.file_size


def list_bitmaps(fd: int, header: qcow2.Header) -> list[BitmapInfo]:
    """The bitmaps of the image open as `fd` (whose checked header is
    `header`), in directory order.  An image without the extension, or whose
    extension is stale (autoclear bit clear: QEMU ignores it), has none."""
    ext = header.bitmaps
    if ext is None or not header.autoclear & qcow2.AUTOCLEAR_BITMAPS:
        return []
    return _directory(fd, header, ext)


def _directory(fd: int, header: qcow2.Header, ext: qcow2.BitmapsExtension) -> list[BitmapInfo]:
    cs = header.cluster_size
    if ext.length != EXTENSION_SIZE:
        raise _bad(header, f"bitmaps extension of {ext.length} bytes (not {EXTENSION_SIZE})")
    if ext.reserved:
        raise _bad(header, "bitmaps extension has reserved bits set")
    if not 1 <= ext.nb_bitmaps <= MAX_BITMAPS:
        raise _bad(header, f"invalid number of bitmaps {ext.nb_bitmaps}")
    size, offset = ext.directory_size, ext.directory_offset
    if not ENTRY_HEADER.size * ext.nb_bitmaps <= size <= MAX_DIRECTORY_SIZE:
        raise _bad(header, f"bitmap directory size {size} does not fit {ext.nb_bitmaps} bitmaps")
    if offset % cs:
        raise _bad(header, f"bitmap directory at offset {offset} is not cluster-aligned")
    if not _inside(header, offset, size):
        raise _bad(header, f"bitmap directory at offset {offset} lies outside the image")
    raw = _pread(fd, header, size, offset, "bitmap directory")
    out: list[BitmapInfo] = []
    names: set[str] = set()
    pos = 0
    while pos < size:
        if len(out) == ext.nb_bitmaps:
            raise _bad(header, f"the bitmap directory holds more than {ext.nb_bitmaps} bitmaps")
        if pos + ENTRY_HEADER.size > size:
            raise _bad(header, f"bitmap directory entry {len(out)} runs past the directory")
        t_off, t_size, flags, kind, gbits, name_size, extra = ENTRY_HEADER.unpack_from(raw, pos)
        used = ENTRY_HEADER.size + extra + name_size
        end = pos + ((used + 7) & ~7)
        if end > size:
            raise _bad(header, f"bitmap directory entry {len(out)} runs past the directory")
        if any(raw[pos + used : end]):
            raise _bad(header, f"bitmap directory entry {len(out)} has non-zero padding")
        if not 1 <= name_size <= MAX_NAME_SIZE:
            raise _bad(header, f"bitmap directory entry {len(out)}: name size {name_size}")
        name_at = pos + ENTRY_HEADER.size + extra
        try:
            name = raw[name_at : name_at + name_size].decode("utf-8")
        except UnicodeDecodeError:
            raise _bad(header, f"bitmap directory entry {len(out)}: name is not UTF-8") from None
        if name in names:
            raise _bad(header, f"two bitmaps named {name!r}")
        names.add(name)
        if flags & ~KNOWN_FLAGS:
            raise _bad(header, f"bitmap {name!r} has reserved flags {flags:#x}")
        if not MIN_GRANULARITY_BITS <= gbits <= MAX_GRANULARITY_BITS:
            raise _bad(header, f"bitmap {name!r} has invalid granularity 2**{gbits}")
        if not 1 <= t_size <= MAX_TABLE_SIZE or t_size * cs > MAX_PHYS_SIZE:
            raise _bad(header, f"bitmap {name!r} has invalid table size {t_size}")
        if t_off % cs:
            raise _bad(header, f"bitmap {name!r}: table at offset {t_off} is not cluster-aligned")
        if not _inside(header, t_off, t_size * 8):
            raise _bad(header, f"bitmap {name!r}: table at offset {t_off} lies outside the image")
        out.append(
            BitmapInfo(
                name=name,
                granularity=1 << gbits,
                in_use=bool(flags & FLAG_IN_USE),
                auto=bool(flags & FLAG_AUTO),
                persistent=True,
                type=kind,
                flags=flags,
                table_offset=t_off,
                table_size=t_size,
                extra_data_size=extra,
            )
        )
        pos = end
    if len(out) != ext.nb_bitmaps:
        raise _bad(header, f"the bitmap directory holds {len(out)} bitmaps, not {ext.nb_bitmaps}")
    return out


def _data_bytes(header: qcow2.Header, granularity: int) -> int:
    """Bytes of bitmap data for the whole virtual disk."""
    bits = -(-header.virtual_size // granularity)
    return -(-bits // 8)


def dirty_extents(fd: int, header: qcow2.Header, name: str) -> extents.Extents:
    """The extents bitmap `name` marks dirty: sorted, coalesced
    (offset, length, extents.DIRTY) rows clipped to the virtual size, as
    `extents.dirty()` of the bitmap's NBD map.  BitmapUnusable when the
    bitmap cannot be trusted, ImageError when the metadata is invalid."""
    ext = header.bitmaps
    if ext is None:
        raise BitmapUnusable(header.path, f"no bitmap {name} in the image")
    if not header.autoclear & qcow2.AUTOCLEAR_BITMAPS:
        raise BitmapUnusable(
            header.path,
            "the image's bitmaps are stale (written by a program without bitmap support)",
        )
    found = [b for b in _directory(fd, header, ext) if b.name == name]
    if not found:
        raise BitmapUnusable(header.path, f"no bitmap {name} in the image")
    bm = found[0]
    if bm.in_use:
        raise BitmapUnusable(
            header.path, f"bitmap {name} is in use (QEMU did not close it cleanly): inconsistent"
        )
    if bm.type != TYPE_DIRTY_TRACKING:
        raise BitmapUnusable(header.path, f"bitmap {name} is not a dirty bitmap (type {bm.type})")
    if not bm.usable_extra_data:
        raise BitmapUnusable(header.path, f"bitmap {name} has extra data we cannot interpret")
    return _read_bitmap(fd, header, bm)


def _read_bitmap(fd: int, header: qcow2.Header, bm: BitmapInfo) -> extents.Extents:
    cs = header.cluster_size
    data_bytes = _data_bytes(header, bm.granularity)
    clusters = -(-data_bytes // cs)
    if bm.table_size != clusters:
        raise _bad(
            header,
            f"bitmap {bm.name!r}: table of {bm.table_size} entries for {clusters} clusters "
            f"of bitmap data",
        )
    raw = _pread(fd, header, bm.table_size * 8, bm.table_offset, f"table of bitmap {bm.name!r}")
    table = np.frombuffer(raw, dtype=">u8").astype(np.uint64)
    host = table & np.uint64(TABLE_OFFSET_MASK)
    bad = np.flatnonzero(
        ((table & np.uint64(TABLE_RESERVED_MASK)) != 0)
        | ((host != 0) & ((table & np.uint64(TABLE_ALL_ONES)) != 0))
        | (host % np.uint64(cs) != 0)
        | (host > np.uint64(max(header.file_size - cs, 0)))
    )
    if bad.size:
        i = int(bad[0])
        raise _bad(header, f"bitmap {bm.name!r}: invalid table entry {i} ({int(table[i]):#x})")
    per_chunk = max(1, CHUNK_BYTES // cs)
    runs: list[npt.NDArray[np.uint64]] = []
    for first in range(0, clusters, per_chunk):
        last = min(first + per_chunk, clusters)
        if not (table[first:last] != 0).any():
            continue
        buf = _chunk(fd, header, bm, host[first:last], table[first:last])
        rows = _runs(buf, first * cs * 8, bm.granularity)
        if rows.size:
            runs.append(rows)
    if not runs:
        return extents.empty()
    return extents.clip(extents.coalesce(np.concatenate(runs)), 0, header.virtual_size)


def _chunk(
    fd: int,
    header: qcow2.Header,
    bm: BitmapInfo,
    host: npt.NDArray[np.uint64],
    table: npt.NDArray[np.uint64],
) -> npt.NDArray[np.uint8]:
    """The bitmap data of a slice of the table (`table`, and `host`: its
    entries' host offsets): zeros, ones and data clusters, runs of
    neighbouring host clusters read with one pread."""
    cs = header.cluster_size
    buf = np.zeros(host.size * cs, dtype=np.uint8)
    ones = np.flatnonzero((host == 0) & (table != 0))
    for k in ones.tolist():
        buf[k * cs : (k + 1) * cs] = 0xFF
    stored = np.flatnonzero(host != 0)
    if stored.size:
        # split where either index or host offset is not consecutive
        breaks = np.flatnonzero((np.diff(stored) != 1) | (np.diff(host[stored]) != np.uint64(cs)))
        starts = np.concatenate(([0], breaks + 1))
        ends = np.concatenate((breaks + 1, [stored.size]))
        for a, z in zip(starts.tolist(), ends.tolist(), strict=True):
            i, n = int(stored[a]), z - a
            off = int(host[stored[a]])
            data = _pread(fd, header, n * cs, off, f"data of bitmap {bm.name!r}")
            buf[i * cs : (i + n) * cs] = np.frombuffer(data, dtype=np.uint8)
    return buf


def _runs(buf: npt.NDArray[np.uint8], first_bit: int, granularity: int) -> extents.Extents:
    """Rows (offset, length, DIRTY) of the runs of set bits in `buf`, whose
    bit 0 is bitmap bit `first_bit`; bit k of a byte is its 2**k bit.

    A sparse buffer (few non-zero bytes: the usual incremental) is read from
    the positions of its set bits; a dense one from the edges of all bits."""
    nz = np.flatnonzero(buf)
    if not nz.size:
        return extents.empty()
    if nz.size * 8 <= buf.size:
        set_bits = np.unpackbits(buf[nz], bitorder="little").reshape(-1, 8).view(bool)
        pos = ((nz[:, None] << 3) + np.arange(8))[set_bits]
        breaks = np.flatnonzero(np.diff(pos) != 1)
        starts = pos[np.concatenate(([0], breaks + 1))].astype(np.uint64)
        ends = pos[np.concatenate((breaks, [pos.size - 1]))].astype(np.uint64) + np.uint64(1)
        base = np.uint64(first_bit)
    else:
        lo, hi = int(nz[0]), int(nz[-1]) + 1
        bits = np.unpackbits(buf[lo:hi], bitorder="little").view(np.int8)
        edges = np.diff(bits, prepend=np.int8(0), append=np.int8(0))
        starts = np.flatnonzero(edges == 1).astype(np.uint64)
        ends = np.flatnonzero(edges == -1).astype(np.uint64)
        base = np.uint64(first_bit + lo * 8)
    out = np.empty((starts.size, 3), dtype=np.uint64)
    g = np.uint64(granularity)
    out[:, 0] = (starts + base) * g
    out[:, 1] = (ends - starts) * g
    out[:, 2] = extents.DIRTY
    return out
