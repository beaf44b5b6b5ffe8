# cython: language_level=3
"""Extent kernels: collect NBD block status, find data in files, and the
region arithmetic the copy engine needs.  (The `nbdinfo --map` parsers are
in _maptext.pyx.)

Extents are numpy arrays of shape (N, 3), dtype uint64, one row per extent:
(offset, length, flags).  Nothing here builds Python lists per extent.
"""
from libc.errno cimport EINVAL, ENXIO, EOPNOTSUPP, errno
from libc.stdint cimport UINT64_MAX, uint32_t, uint64_t
from libc.stdlib cimport free, realloc
from libc.string cimport memset, strcmp
from posix.unistd cimport lseek

from _capsule cimport handle_of
from _errors cimport check_nbd, os_error
from libnbd cimport nbd_block_status, nbd_extent_callback, nbd_get_errno, nbd_get_error, nbd_handle
from sysdeps cimport SEEK_DATA, SEEK_HOLE

import numpy as np

from dirbackup.errors import ProtocolError

# Block status requests stay below 4 GiB: the NBD protocol carries 32-bit lengths
# (this is the largest 64 KiB-aligned length that fits).
cdef uint64_t MAX_STATUS_REQUEST = 0xFFFF0000

OFFSET = 0
LENGTH = 1
FLAGS = 2


include "extbuf.pxi"


cdef inline uint64_t[:, ::1] as_rows(object ext) except *:
    arr = np.ascontiguousarray(ext, dtype=np.uint64)
    if arr.ndim != 2 or arr.shape[1] != 3:
        raise ValueError(f"extents must have shape (N, 3), got {arr.shape}")
    return arr


def empty():
    """An extent array with no rows."""
    return np.empty((0, 3), dtype=np.uint64)


# ----------------------------------------------------------------------------
# Block status from a libnbd handle

cdef int on_extents(void *user_data, const char *metacontext, uint64_t offset,
                    uint32_t *entries, size_t nr_entries, int *error) noexcept nogil:
    cdef ExtBuf *b = <ExtBuf *>user_data
    cdef size_t i
    cdef uint64_t length
    if strcmp(metacontext, b.context) != 0:
        return 0
    if offset != b.pos:
        b.bad = 1
        b.bad_offset = offset
        return 0
    i = 0
    while i + 1 < nr_entries and b.pos < b.end:
        length = entries[i]
        if length == 0:
            b.bad = 2
            b.bad_offset = b.pos
            return 0
        if length > b.end - b.pos:
            length = b.end - b.pos     # the last extent may run past the request
        if buf_push(b, b.pos, length, entries[i + 1]) < 0:
            b.bad = 3
            return 0
        b.pos += length
        i += 2
    return 0


def block_status(h, str context, uint64_t offset=0, object length=None):
    """Collect the extents of meta context `context` (e.g. "base:allocation" or
    "qemu:dirty-bitmap:NAME") over [offset, offset+length) of a connected
    python-libnbd handle `h`; `length` defaults to the rest of the export.

    Requests stay below 4 GiB each and the loop follows partial replies until
    the whole range is covered.  Neighbouring extents with equal flags are
    merged.  The handle must have negotiated `context`.
    """
    cdef nbd_handle *ptr = handle_of(h)
    cdef uint64_t size = h.get_size()
    cdef uint64_t end
    if length is None:
        end = size
    else:
        end = offset + <uint64_t>length
    if offset > size or end > size or end < offset:
        raise ValueError(f"range {offset}+{length} is outside the export of {size} bytes")
    if not h.can_meta_context(context):
        raise ProtocolError(f"the server did not agree to meta context {context!r}")
    ctx_bytes = context.encode()
    cdef ExtBuf b
    buf_init(&b)
    b.context = ctx_bytes
    b.pos = offset
    b.bad = 0
    cdef nbd_extent_callback cb
    cb.callback = on_extents
    cb.user_data = &b
    cb.free = NULL
    cdef int rc = 0, err = 0
    cdef const char *msg = NULL
    cdef uint64_t before
    try:
        while b.pos < end:
            before = b.pos
            b.end = min(end, b.pos + MAX_STATUS_REQUEST)
            with nogil:
                rc = nbd_block_status(ptr, b.end - b.pos, b.pos, cb, 0)
                if rc < 0:
                    err = nbd_get_errno()
                    msg = nbd_get_error()
            check_nbd(rc, err, msg, f"block status ({context}) at offset {before}")
            if b.bad == 3:
                raise MemoryError()
            if b.bad:
                raise ProtocolError(
                    f"block status ({context}): bad reply at offset {b.bad_offset}")
            if b.pos == before:
                raise ProtocolError(
                    f"block status ({context}): no extents returned for offset {before}")
        return buf_to_array(&b)
    finally:
        free(b.rows)


# ----------------------------------------------------------------------------
# Data and holes of a file

def file_extents(int fd, uint64_t offset, uint64_t length):
    """Data and hole extents of [offset, offset+length) of an open file, from
    SEEK_DATA/SEEK_HOLE.  Flags follow NBD base:allocation: 0 for data, 3
    (hole|zero) for holes.  Where the file system cannot tell (block devices,
    old file systems), the whole range is reported as data.
    """
    cdef ExtBuf b
    buf_init(&b)
    cdef long long pos = offset, end = offset + length, data, hole
    cdef int err = 0
    try:
        while pos < end:
            with nogil:
                data = lseek(fd, pos, SEEK_DATA)
                err = errno
            if data < 0:
                if err == ENXIO:        # no data up to EOF
                    data = end
                elif err == EINVAL or err == EOPNOTSUPP:
                    free(b.rows)
                    b.rows = NULL
                    b.n = 0
                    if length:
                        buf_push(&b, offset, length, 0)
                    return buf_to_array(&b)
                else:
                    raise os_error(err, f"SEEK_DATA at offset {pos}")
            if data > end:
                data = end
            if data > pos and buf_push(&b, pos, data - pos, 3) < 0:
                raise MemoryError()
            if data >= end:
                break
            with nogil:
                hole = lseek(fd, data, SEEK_HOLE)
                err = errno
            if hole < 0:
                raise os_error(err, f"SEEK_HOLE at offset {data}")
            if hole > end:
                hole = end
            if buf_push(&b, data, hole - data, 0) < 0:
                raise MemoryError()
            pos = hole
        return buf_to_array(&b)
    finally:
        free(b.rows)


# ----------------------------------------------------------------------------
# Region arithmetic

def select(ext, uint64_t mask, uint64_t value):
    """Rows whose flags satisfy (flags & mask) == value, neighbours merged."""
    cdef uint64_t[:, ::1] r = as_rows(ext)
    cdef ExtBuf b
    buf_init(&b)
    cdef Py_ssize_t i
    try:
        for i in range(r.shape[0]):
            if r[i, 2] & mask == value:
                if buf_push(&b, r[i, 0], r[i, 1], r[i, 2] & mask) < 0:
                    raise MemoryError()
        return buf_to_array(&b)
    finally:
        free(b.rows)


def coalesce(ext, uint64_t gap=0):
    """Merge rows that touch, overlap or are at most `gap` bytes apart.

    Rows must be sorted by offset.  Flags of merged rows are OR-ed.
    """
    cdef uint64_t[:, ::1] r = as_rows(ext)
    cdef ExtBuf b
    buf_init(&b)
    cdef Py_ssize_t i
    cdef uint64_t off, end, last_end
    cdef uint64_t *last
    try:
        for i in range(r.shape[0]):
            off = r[i, 0]
            end = off + r[i, 1]
            if r[i, 1] == 0:
                continue
            if b.n:
                last = b.rows + 3 * (b.n - 1)
                last_end = last[0] + last[1]
                if off < last[0]:
                    raise ValueError(f"extents are not sorted at row {i} (offset {off})")
                if off <= last_end + gap:
                    if end > last_end:
                        last[1] = end - last[0]
                    last[2] |= r[i, 2]
                    continue
            if buf_push(&b, off, end - off, r[i, 2]) < 0:
                raise MemoryError()
        return buf_to_array(&b)
    finally:
        free(b.rows)


def align(ext, uint64_t granularity, uint64_t size):
    """Widen every row outward to multiples of `granularity` (a power of two),
    clamp to `size`, and merge what then touches."""
    if granularity == 0 or granularity & (granularity - 1):
        raise ValueError(f"granularity must be a power of two, got {granularity}")
    cdef uint64_t[:, ::1] r = as_rows(ext)
    out = np.empty((r.shape[0], 3), dtype=np.uint64)
    cdef uint64_t[:, ::1] o = out
    cdef Py_ssize_t i
    cdef uint64_t mask = granularity - 1, off, end
    for i in range(r.shape[0]):
        off = r[i, 0] & ~mask
        end = r[i, 0] + r[i, 1]
        end = (end + mask) & ~mask if end <= UINT64_MAX - mask else end
        if end > size:
            end = size
        if off > end:
            off = end
        o[i, 0] = off
        o[i, 1] = end - off
        o[i, 2] = r[i, 2]
    return coalesce(out)


def split(ext, uint64_t max_length, uint64_t boundary=0):
    """Cut rows into pieces of at most `max_length` bytes that never cross a
    multiple of `boundary` (0: no boundary)."""
    if max_length == 0:
        raise ValueError("max_length must be positive")
    cdef uint64_t[:, ::1] r = as_rows(ext)
    cdef ExtBuf b
    buf_init(&b)
    cdef Py_ssize_t i
    cdef uint64_t off, end, piece, limit
    try:
        for i in range(r.shape[0]):
            off = r[i, 0]
            end = off + r[i, 1]
            while off < end:
                piece = min(end - off, max_length)
                if boundary:
                    limit = boundary - off % boundary
                    if piece > limit:
                        piece = limit
                if buf_append(&b, off, piece, r[i, 2]) < 0:
                    raise MemoryError()
                off += piece
        return buf_to_array(&b)
    finally:
        free(b.rows)


def total(ext):
    """Sum of the lengths."""
    cdef uint64_t[:, ::1] r = as_rows(ext)
    cdef uint64_t s = 0
    cdef Py_ssize_t i
    for i in range(r.shape[0]):
        s += r[i, 1]
    return s


def clip(ext, uint64_t start, uint64_t end):
    """The parts of the rows inside [start, end)."""
    cdef uint64_t[:, ::1] r = as_rows(ext)
    cdef ExtBuf b
    buf_init(&b)
    cdef Py_ssize_t i
    cdef uint64_t a, z
    try:
        for i in range(r.shape[0]):
            a = max(r[i, 0], start)
            z = min(r[i, 0] + r[i, 1], end)
            if a < z and buf_push(&b, a, z - a, r[i, 2]) < 0:
                raise MemoryError()
        return buf_to_array(&b)
    finally:
        free(b.rows)
