"""Extents: which parts of a disk hold data, or changed since the last backup.

An extent array is a numpy array of shape (N, 3) and dtype uint64, one row
per extent: (offset, length, flags).  The flags are those of the NBD meta
context the extents came from:

* `base:allocation`: bit 0 = hole (HOLE), bit 1 = reads as zero (ZERO);
* `qemu:dirty-bitmap:NAME`: bit 0 = dirty (DIRTY).

The kernels live in the Cython module `dirbackup._extents`; this module is
their documented face plus small conveniences.  parse_map_text and
parse_map_json (maptext.py) are re-exported here.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from dirbackup import _extents
from dirbackup.maptext import parse_map_json as parse_map_json
from dirbackup.maptext import parse_map_text as parse_map_text

Extents = npt.NDArray[np.uint64]

OFFSET, LENGTH, FLAGS = 0, 1, 2
HOLE = 1
ZERO = 2
DIRTY = 1
ALLOCATION = "base:allocation"


def dirty_bitmap_context(bitmap: str) -> str:
    """The NBD meta context name under which QEMU exports a dirty bitmap."""
    return f"qemu:dirty-bitmap:{bitmap}"


def empty() -> Extents:
    """An extent array with no rows."""
    return _extents.empty()


def from_pairs(pairs: Any, flags: int = 0) -> Extents:
    """Build extents from (offset, length) pairs (tests, iterators); rows keep their order."""
    arr = np.asarray(list(pairs), dtype=np.uint64).reshape(-1, 2)
    out = np.empty((arr.shape[0], 3), dtype=np.uint64)
    out[:, :2] = arr
    out[:, 2] = flags
    return out


def block_status(h: Any, context: str, offset: int = 0, length: int | None = None) -> Extents:
    """Extents of meta context `context` over a range of a python-libnbd handle.

    The handle must have requested the context before connecting
    (`h.add_meta_context(context)`).  Loops over partial replies and keeps
    every request below 4 GiB, so exports of any size work.
    """
    return _extents.block_status(h, context, offset, length)


def file_extents(fd: int, offset: int, length: int) -> Extents:
    """Data (flags 0) and holes (flags HOLE|ZERO) of an open file, by SEEK_DATA/SEEK_HOLE."""
    return _extents.file_extents(fd, offset, length)


def select(ext: Extents, mask: int, value: int) -> Extents:
    """Rows with (flags & mask) == value, neighbours merged."""
    return _extents.select(ext, mask, value)


def dirty(ext: Extents) -> Extents:
    """The dirty extents of a `qemu:dirty-bitmap:*` map."""
    return select(ext, DIRTY, DIRTY)


def data(ext: Extents) -> Extents:
    """The extents of a `base:allocation` map that may hold non-zero data."""
    return select(ext, HOLE | ZERO, 0)


def coalesce(ext: Extents, gap: int = 0) -> Extents:
    """Merge sorted rows that touch, overlap, or lie at most `gap` bytes apart."""
    return _extents.coalesce(ext, gap)


def align(ext: Extents, granularity: int, size: int) -> Extents:
    """Widen rows outward to multiples of `granularity`, clamp to `size`, merge."""
    return _extents.align(ext, granularity, size)


def split(ext: Extents, max_length: int, boundary: int = 0) -> Extents:
    """Cut rows into pieces of at most `max_length` bytes not crossing multiples of `boundary`."""
    return _extents.split(ext, max_length, boundary)


def clip(ext: Extents, start: int, end: int) -> Extents:
    """The parts of the rows inside [start, end)."""
    return _extents.clip(ext, start, end)


def total(ext: Extents) -> int:
    """Sum of the lengths in bytes."""
    return int(_extents.total(ext))
