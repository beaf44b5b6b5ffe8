# cython: language_level=3
"""qcow2 kernels: a writer that the copy loop fills from several threads,
and the mapping of a validated backing chain's guest address space.

(About 1,000 lines, past the ~900 of the rest of the core, for a reason: the
writer, the chain reader and the per-image digests share the table layout
(entry flags and masks, refcount order), the C helpers and the error paths
that say which image and which table is wrong; one module keeps one reading
of the format.)

Format: QEMU's docs/interop/qcow2.txt (version 3, 16-bit refcounts, standard
64-bit L2 entries).  Header parsing and chain validation are policy and live
in dirbackup/qcow2.py; this module only walks tables and writes them.

Writer layout: cluster 0 is the header (zeros until finish(), so a crash
leaves a file that no tool accepts as qcow2); data clusters are appended from
cluster 1 on by an atomic counter; finish() appends the L2 tables, the L1
table, the refcount blocks and the refcount table, syncs, then writes the
header and syncs again.  Every host cluster in the file is referenced exactly
once, so refcounts are all 1 -- except with compression (a zstd level given):
the copy loop's workers then compress each data cluster (or, merging, take
a layer's zstd stream as it is) and hand the streams to alloc_compressed(),
which packs them back to back (a stream may cross a host cluster boundary,
as QEMU allows); a host cluster holding compressed data is referenced once
by every compressed cluster touching it.  Both allocators then take one
lock, and whole clusters start at the next host cluster boundary.
"""
from cpython.pycapsule cimport PyCapsule_New
from libc.errno cimport EEXIST, EINTR, EINVAL, EIO, ENOMEM, errno
from libc.stdint cimport int64_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memcmp, memset
from posix.fcntl cimport O_CREAT, O_EXCL, O_RDWR, open as c_open
from posix.unistd cimport close, fdatasync, ftruncate, pread, pwrite

from _errors cimport os_error
from _hash cimport data_unit_digest, zero_unit_digest
from rows cimport (ROW_COMPRESSED, ROW_DATA, ROW_HASH, ROW_KIND_MASK, ROW_NOWRITE, ROW_UNALLOCATED,
                   ROW_ZERO)
from sink cimport sink_ops
from unpack cimport ZLIB_WINDOW_BITS, decompress_cluster, inflateEnd, inflateInit2, z_stream
from zstd cimport ZSTD_createDCtx, ZSTD_DCtx, ZSTD_freeDCtx
from sysdeps cimport (__ATOMIC_ACQUIRE, __ATOMIC_RELAXED, __ATOMIC_SEQ_CST, atomic_add_u64,
                      atomic_cas_ptr, atomic_load_ptr, atomic_load_u64, be64toh, htobe64,
                      pthread_mutex_destroy, pthread_mutex_init, pthread_mutex_lock,
                      pthread_mutex_t, pthread_mutex_unlock)

import os

import numpy as np

from dirbackup.compression import compress_level
from dirbackup.errors import ImageError

cdef extern from *:
    """
    #define DB_QCOW_OFLAG_COPIED     (1ULL << 63)
    #define DB_QCOW_OFLAG_COMPRESSED (1ULL << 62)
    #define DB_QCOW_OFLAG_ZERO       1ULL
    #define DB_L1E_OFFSET_MASK       0x00fffffffffffe00ULL
    #define DB_L2E_OFFSET_MASK       0x00fffffffffffe00ULL
    #define DB_L1E_RESERVED          0x7f000000000001ffULL
    #define DB_L2E_RESERVED          0x3f000000000001feULL
    """
    const uint64_t OFLAG_COPIED "DB_QCOW_OFLAG_COPIED"
    const uint64_t OFLAG_COMPRESSED "DB_QCOW_OFLAG_COMPRESSED"
    const uint64_t OFLAG_ZERO "DB_QCOW_OFLAG_ZERO"
    const uint64_t L1E_OFFSET_MASK "DB_L1E_OFFSET_MASK"
    const uint64_t L2E_OFFSET_MASK "DB_L2E_OFFSET_MASK"
    const uint64_t L1E_RESERVED "DB_L1E_RESERVED"
    const uint64_t L2E_RESERVED "DB_L2E_RESERVED"

cdef extern from *:
    """
    #include <errno.h>
    static void db_set_errno(int e) { errno = e; }
    """
    void set_errno "db_set_errno"(int e) noexcept nogil

# Kinds of mapped ranges (rows.pxd: the first two are also copy request kinds).
MAP_DATA = ROW_DATA
MAP_ZERO = ROW_ZERO
MAP_UNALLOCATED = ROW_UNALLOCATED
MAP_COMPRESSED = ROW_COMPRESSED
# Flags of check_plan() rows (rows.pxd)
PLAN_HASH = ROW_HASH
PLAN_NOWRITE = ROW_NOWRITE

cdef enum:
    REFCOUNT_ORDER = 4
    SECTOR = 512
    # header field compression_type: QEMU's value for zstd
    COMPRESSION_ZSTD = 1
    INCOMPAT_COMPRESSION = 8

# QEMU's own limit on an L1 table (QCOW_MAX_L1_SIZE): it refuses larger ones
MAX_L1_BYTES = 32 << 20


def l1_entries_for(uint64_t virtual_size, int cluster_bits):
    """Number of L1 entries an image of this size needs."""
    cdef uint64_t per_l2 = (<uint64_t>1 << cluster_bits) * ((<uint64_t>1 << cluster_bits) // 8)
    return (virtual_size + per_l2 - 1) // per_l2


# ----------------------------------------------------------------------------
# Writer

cdef struct WriterState:
    int fd
    uint64_t cs
    int bits
    uint64_t l2_entries
    uint64_t virtual_size
    uint64_t l1_size
    uint64_t **tables           # L2 tables by L1 index, native endian, made on first use
    uint64_t next_host          # next free host byte (atomic; under `lock` when compressing)
    uint64_t zero_clusters      # (atomic)
    uint64_t data_clusters      # uncompressed data clusters (atomic)
    uint64_t compressed_clusters    # (atomic)
    uint64_t compressed_bytes   # bytes of compressed streams, padding included (atomic)
    int records_zero
    int compressing
    pthread_mutex_t lock
    sink_ops ops


cdef uint64_t *table_for(WriterState *w, uint64_t l1_index) noexcept nogil:
    """The L2 table of an L1 index, allocated by whichever thread needs it first."""
    cdef void **slot = <void **>&w.tables[l1_index]
    cdef void *table = atomic_load_ptr(slot, __ATOMIC_ACQUIRE)
    cdef void *expected = NULL
    cdef void *fresh
    if table != NULL:
        return <uint64_t *>table
    fresh = calloc(w.l2_entries, sizeof(uint64_t))
    if fresh == NULL:
        return NULL
    if atomic_cas_ptr(slot, &expected, fresh, False, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST):
        return <uint64_t *>fresh
    free(fresh)                 # another thread won; `expected` holds its table
    return <uint64_t *>expected


cdef uint64_t *entry_for(WriterState *w, uint64_t g) noexcept nogil:
    """The free L2 entry of guest cluster `g`, or NULL with errno set."""
    cdef uint64_t *table
    if g >= w.l1_size * w.l2_entries or (g << w.bits) >= w.virtual_size:
        set_errno(EINVAL)
        return NULL
    table = table_for(w, g // w.l2_entries)
    if table == NULL:
        set_errno(ENOMEM)
        return NULL
    if table[g % w.l2_entries] != 0:
        set_errno(EEXIST)      # a guest cluster written twice would leak a host cluster
        return NULL
    return &table[g % w.l2_entries]


cdef int64_t writer_alloc(void *ctx, const uint64_t *clusters, size_t n) noexcept nogil:
    cdef WriterState *w = <WriterState *>ctx
    cdef uint64_t host
    cdef size_t k
    cdef uint64_t *entry
    if w.compressing:
        # whole clusters start at the next host cluster boundary after the
        # packed compressed streams
        pthread_mutex_lock(&w.lock)
        host = (w.next_host + w.cs - 1) & ~(w.cs - 1)
        w.next_host = host + n * w.cs
        pthread_mutex_unlock(&w.lock)
    else:
        host = atomic_add_u64(&w.next_host, n * w.cs, __ATOMIC_RELAXED)
    for k in range(n):
        entry = entry_for(w, clusters[k])
        if entry == NULL:
            return -1
        entry[0] = (host + k * w.cs) | OFLAG_COPIED
    atomic_add_u64(&w.data_clusters, n, __ATOMIC_RELAXED)
    return <int64_t>host


cdef int64_t writer_alloc_compressed(void *ctx, const uint64_t *clusters,
                                     const uint64_t *offsets, const uint64_t *lengths,
                                     size_t n, uint64_t total) noexcept nogil:
    """Append `total` bytes of packed streams; point each cluster's L2 entry at
    its stream with QEMU's compressed cluster descriptor: bits 0 .. x-1 the
    host byte offset, bits x .. 61 the number of 512-byte sectors after the
    one holding the first byte, x = 62 - (cluster_bits - 8)."""
    cdef WriterState *w = <WriterState *>ctx
    cdef uint64_t host, start, last, x = 62 - (w.bits - 8)
    cdef size_t k
    cdef uint64_t *entry
    if not w.compressing or total == 0:
        set_errno(EINVAL)
        return -1
    for k in range(n):
        if lengths[k] == 0 or lengths[k] > w.cs - SECTOR or offsets[k] + lengths[k] > total:
            set_errno(EINVAL)
            return -1
    pthread_mutex_lock(&w.lock)
    host = w.next_host
    w.next_host = host + total
    pthread_mutex_unlock(&w.lock)
    for k in range(n):
        entry = entry_for(w, clusters[k])
        if entry == NULL:
            return -1
        start = host + offsets[k]
        last = start + lengths[k] - 1
        entry[0] = OFLAG_COMPRESSED | (((last >> 9) - (start >> 9)) << x) | start
    atomic_add_u64(&w.compressed_clusters, n, __ATOMIC_RELAXED)
    atomic_add_u64(&w.compressed_bytes, total, __ATOMIC_RELAXED)
    return <int64_t>host


cdef int writer_zero(void *ctx, uint64_t offset, uint64_t length) noexcept nogil:
    cdef WriterState *w = <WriterState *>ctx
    cdef uint64_t g, end
    cdef uint64_t *table
    if not w.records_zero:
        return 0
    if offset % w.cs or offset + length > w.virtual_size:
        set_errno(EINVAL)
        return -1
    end = (offset + length + w.cs - 1) >> w.bits
    g = offset >> w.bits
    while g < end:
        table = table_for(w, g // w.l2_entries)
        if table == NULL:
            set_errno(ENOMEM)
            return -1
        if table[g % w.l2_entries] & ~OFLAG_ZERO:
            set_errno(EEXIST)
            return -1
        table[g % w.l2_entries] = OFLAG_ZERO
        g += 1
    atomic_add_u64(&w.zero_clusters, end - (offset >> w.bits), __ATOMIC_RELAXED)
    return 0


cdef int write_all(int fd, const char *buf, uint64_t length, uint64_t offset) noexcept nogil:
    """pwrite everything or return -1 with errno."""
    cdef ssize_t r
    while length:
        r = pwrite(fd, buf, length, offset)
        if r < 0:
            if errno == EINTR:
                continue
            return -1
        if r == 0:
            set_errno(EIO)
            return -1
        buf += r
        length -= r
        offset += r
    return 0


cdef class Qcow2Writer:
    """A new qcow2 (version 3) image, filled by the copy engine as a sink.

    The file at `path` must not exist (it is created exclusively: callers
    write under a temporary name and publish by rename).  `backing` is the
    backing file name stored in the image, relative to the image's directory;
    with a backing file, clusters that read as zero are recorded as zero
    clusters (so a restore never resurrects the old data); without one they
    are simply left out.  `compress` is "none" (the default) or "zstd" /
    "zstd:LEVEL": data clusters are then stored as zstd-compressed clusters
    (header compression_type zstd, incompatible bit 3), compressed by the copy
    loop's workers.  Use as a context manager: leaving it with an exception
    removes the file; finish() completes it.
    """

    cdef WriterState w
    cdef readonly object path
    cdef readonly object backing
    cdef readonly str backing_format
    cdef readonly bint finished
    cdef readonly str compress
    cdef bint _open

    def __cinit__(self):
        memset(&self.w, 0, sizeof(WriterState))
        self.w.fd = -1
        pthread_mutex_init(&self.w.lock, NULL)

    def __init__(self, path, uint64_t virtual_size, uint64_t cluster_size=65536, backing=None,
                 str backing_format="qcow2", records_zero=None, compress="none"):
        cdef int bits = 0
        cdef int level = compress_level(compress)
        if cluster_size < 512 or cluster_size > (2 << 20) or cluster_size & (cluster_size - 1):
            raise ValueError("cluster size must be a power of two from 512 bytes to 2 MiB")
        if virtual_size == 0:
            raise ValueError("virtual size must be positive")
        # QEMU counts qcow2 sizes in 512-byte sectors (qemu-img create rounds up too)
        virtual_size = (virtual_size + 511) & ~(<uint64_t>511)
        while (<uint64_t>1 << bits) < cluster_size:
            bits += 1
        self.path = os.fspath(path)
        self.backing = None if backing is None else os.fspath(backing)
        self.backing_format = backing_format
        if self.backing is not None:
            name = self.backing.encode()
            if len(name) > 1023 or len(name) == 0:
                raise ValueError("backing file name must have 1 to 1023 bytes")
            if (self._header_length(level) + 8 + ((len(backing_format) + 7) // 8) * 8 + 8
                    + len(name) > cluster_size):
                raise ValueError("backing file name does not fit in the header cluster")
        self.w.cs = cluster_size
        self.w.bits = bits
        self.w.l2_entries = cluster_size // 8
        self.w.virtual_size = virtual_size
        self.w.l1_size = l1_entries_for(virtual_size, bits)
        if self.w.l1_size * 8 > MAX_L1_BYTES:
            # an image no reader (ours or QEMU's) would open: never make one
            raise ValueError(f"a virtual size of {virtual_size} bytes needs an L1 table larger "
                             f"than {MAX_L1_BYTES >> 20} MiB with {cluster_size}-byte clusters")
        self.w.records_zero = (self.backing is not None) if records_zero is None else records_zero
        self.w.compressing = level != 0
        self.compress = "none" if level == 0 else f"zstd:{level}"
        self.w.next_host = cluster_size
        self.w.tables = <uint64_t **>calloc(self.w.l1_size, sizeof(uint64_t *))
        if self.w.tables == NULL:
            raise MemoryError()
        cdef bytes cpath = os.fsencode(self.path)
        cdef const char *cpath_p = cpath
        cdef int fd, err = 0, rc
        with nogil:
            fd = c_open(cpath_p, O_RDWR | O_CREAT | O_EXCL, 0o644)
            if fd < 0:
                err = errno
        if fd < 0:
            raise os_error(err, "creating", self.path)
        self.w.fd = fd
        self._open = True
        # cluster 0 stays zero until finish(): an unfinished file is not qcow2
        with nogil:
            rc = ftruncate(fd, cluster_size)
            if rc < 0:
                err = errno
        if rc < 0:
            self.abort()
            raise os_error(err, "sizing", self.path)
        self.w.ops.ctx = &self.w
        self.w.ops.fd = fd
        self.w.ops.cluster_size = cluster_size
        self.w.ops.virtual_size = virtual_size
        self.w.ops.records_zero = self.w.records_zero
        self.w.ops.alloc = writer_alloc
        self.w.ops.zero = writer_zero
        self.w.ops.compress_level = level
        self.w.ops.alloc_compressed = writer_alloc_compressed

    @staticmethod
    def _header_length(int level):
        """104 bytes; 112 with the compression_type field (and its padding)."""
        return 112 if level else 104

    def __dealloc__(self):
        cdef uint64_t i
        if self.w.tables != NULL:
            for i in range(self.w.l1_size):
                free(self.w.tables[i])
            free(self.w.tables)
        if self.w.fd >= 0:
            close(self.w.fd)
        pthread_mutex_destroy(&self.w.lock)

    @property
    def name(self):
        return self.path

    @property
    def cluster_size(self):
        return self.w.cs

    @property
    def virtual_size(self):
        return self.w.virtual_size

    @property
    def records_zero(self):
        return bool(self.w.records_zero)

    @property
    def data_clusters(self):
        """Guest clusters stored with data (compressed or not)."""
        return (atomic_load_u64(&self.w.data_clusters, __ATOMIC_RELAXED)
                + atomic_load_u64(&self.w.compressed_clusters, __ATOMIC_RELAXED))

    @property
    def compressed_clusters(self):
        return atomic_load_u64(&self.w.compressed_clusters, __ATOMIC_RELAXED)

    @property
    def compressed_bytes(self):
        """Bytes the compressed streams take in the file."""
        return atomic_load_u64(&self.w.compressed_bytes, __ATOMIC_RELAXED)

    @property
    def zero_clusters(self):
        return atomic_load_u64(&self.w.zero_clusters, __ATOMIC_RELAXED)

    def sink_capsule(self):
        """The sink_ops the copy engine writes through (valid while this writer lives)."""
        if not self._open or self.finished:
            raise ValueError("the image is not open for writing")
        return PyCapsule_New(&self.w.ops, "dirbackup.sink", NULL)

    def zero(self, uint64_t offset, uint64_t length):
        """Record cluster-aligned guest bytes as reading zero (images with a backing file)."""
        if writer_zero(&self.w, offset, length) < 0:
            raise os_error(errno, f"recording zero clusters at offset {offset} in", self.path)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None or not self.finished:
            self.abort()
        return False

    def abort(self):
        """Close and remove an unfinished image."""
        if self.w.fd >= 0:
            close(self.w.fd)
            self.w.fd = -1
        if self._open and not self.finished:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
        self._open = False

    def finish(self, bint sync=True):
        """Write the metadata and the header; return the image's file size.

        Data and metadata are synced before the header is written, and the
        header after, so that a crash at any point leaves either a complete
        image or one that is rejected."""
        if not self._open or self.finished:
            raise ValueError("the image is not open for writing")
        cdef WriterState *w = &self.w
        cdef uint64_t cs = w.cs, i, pos, l2_count = 0
        cdef uint64_t *l1 = NULL
        cdef uint64_t *be = NULL
        cdef uint64_t l1_clusters, used, rb, rt, rb_new, rt_new, total, per_block, k
        cdef uint64_t l1_offset, rt_offset, hdr_len
        cdef const char *hdr
        cdef uint16_t one
        cdef uint16_t *blocks = NULL
        cdef uint64_t *rtable = NULL
        cdef uint32_t *shared = NULL
        cdef uint64_t data_end
        cdef int err = 0, rc = 0
        try:
            l1 = <uint64_t *>calloc(w.l1_size if w.l1_size else 1, sizeof(uint64_t))
            be = <uint64_t *>malloc(cs)
            if l1 == NULL or be == NULL:
                raise MemoryError()
            # metadata starts at the host cluster after the last data byte
            pos = (w.next_host + cs - 1) & ~(cs - 1)
            data_end = pos // cs
            if w.compressing:
                shared = compressed_refcounts(w, data_end)
            with nogil:
                for i in range(w.l1_size):
                    if w.tables[i] == NULL:
                        continue
                    for k in range(w.l2_entries):
                        be[k] = htobe64(w.tables[i][k])
                    if write_all(w.fd, <char *>be, cs, pos) < 0:
                        rc = -1
                        err = errno
                        break
                    l1[i] = htobe64(pos | OFLAG_COPIED)
                    pos += cs
                    l2_count += 1
            if rc < 0:
                raise os_error(err, "writing L2 tables of", self.path)
            l1_offset = pos
            l1_clusters = (w.l1_size * 8 + cs - 1) // cs
            if l1_clusters == 0:
                l1_clusters = 1
            with nogil:
                rc = write_all(w.fd, <char *>l1, w.l1_size * 8, pos)
                if rc < 0:
                    err = errno
            if rc < 0:
                raise os_error(err, "writing the L1 table of", self.path)
            pos += l1_clusters * cs
            # refcounts: the blocks and the table count themselves too
            used = pos // cs
            per_block = cs * 8 // (1 << REFCOUNT_ORDER)
            rb = 0
            rt = 0
            while True:
                total = used + rb + rt
                rb_new = (total + per_block - 1) // per_block
                rt_new = (rb_new * 8 + cs - 1) // cs
                if rb_new == rb and rt_new == rt:
                    break
                rb = rb_new
                rt = rt_new
            blocks = <uint16_t *>calloc(rb * cs, 1)
            rtable = <uint64_t *>calloc(rt * cs, 1)
            if blocks == NULL or rtable == NULL:
                raise MemoryError()
            one = htobe16_(1)
            for k in range(total):
                blocks[k] = one
            if shared != NULL:
                for k in range(data_end):
                    if shared[k]:
                        blocks[k] = htobe16_(<uint16_t>shared[k])
            for k in range(rb):
                rtable[k] = htobe64(pos + k * cs)
            rt_offset = pos + rb * cs
            with nogil:
                rc = write_all(w.fd, <char *>blocks, rb * cs, pos)
                if rc == 0:
                    rc = write_all(w.fd, <char *>rtable, rt * cs, rt_offset)
                if rc == 0:
                    rc = ftruncate(w.fd, rt_offset + rt * cs)
                if rc == 0 and sync:
                    rc = fdatasync(w.fd)
                if rc < 0:
                    err = errno
            if rc < 0:
                raise os_error(err, "writing refcounts of", self.path)
            header = self._header(l1_offset, rt_offset, rt)
            hdr = header
            hdr_len = len(header)
            with nogil:
                rc = write_all(w.fd, hdr, hdr_len, 0)
                if rc == 0 and sync:
                    rc = fdatasync(w.fd)
                if rc < 0:
                    err = errno
            if rc < 0:
                raise os_error(err, "writing the header of", self.path)
        except BaseException:
            self.abort()
            raise
        finally:
            free(l1)
            free(be)
            free(blocks)
            free(rtable)
            free(shared)
        self.finished = True
        close(w.fd)
        w.fd = -1
        self._open = False
        return rt_offset + rt * cs

    cdef bytes _header(self, uint64_t l1_offset, uint64_t rt_offset, uint64_t rt_clusters):
        import struct
        ext = b""
        if self.backing is not None:
            fmt = self.backing_format.encode()
            ext += struct.pack(">II", 0xE2792ACA, len(fmt)) + fmt + bytes((8 - len(fmt) % 8) % 8)
        ext += struct.pack(">II", 0, 0)
        name = b"" if self.backing is None else os.fsencode(self.backing)
        hlen = 112 if self.w.compressing else 104
        backing_offset = hlen + len(ext) if name else 0
        header = struct.pack(
            ">4sIQIIQIIQQIIQQQQII",
            b"QFI\xfb", 3, backing_offset, len(name), self.w.bits, self.w.virtual_size,
            0, self.w.l1_size, l1_offset, rt_offset, rt_clusters, 0, 0,
            INCOMPAT_COMPRESSION if self.w.compressing else 0, 0, 0, REFCOUNT_ORDER, hlen)
        if self.w.compressing:
            # byte 104: compression_type, then padding to a multiple of 8
            header += bytes((COMPRESSION_ZSTD, 0, 0, 0, 0, 0, 0, 0))
        assert len(header) == hlen
        return header + ext + name


cdef uint32_t *compressed_refcounts(WriterState *w, uint64_t data_end) except NULL:
    """Per host cluster below `data_end`: how many compressed clusters touch
    it (0 for the others), counting each stream's bytes up to the end of its
    last 512-byte sector, as QEMU's check does."""
    cdef uint32_t *counts = <uint32_t *>calloc(data_end if data_end else 1, sizeof(uint32_t))
    cdef uint64_t i, k, e, start, end, c, x = 62 - (w.bits - 8)
    cdef uint64_t sectors_mask = (<uint64_t>1 << (w.bits - 8)) - 1
    if counts == NULL:
        raise MemoryError()
    for i in range(w.l1_size):
        if w.tables[i] == NULL:
            continue
        for k in range(w.l2_entries):
            e = w.tables[i][k]
            if not e & OFLAG_COMPRESSED:
                continue
            start = e & ((<uint64_t>1 << x) - 1)
            end = (start & ~(<uint64_t>SECTOR - 1)) + (((e >> x) & sectors_mask) + 1) * SECTOR
            for c in range(start >> w.bits, ((end - 1) >> w.bits) + 1):
                if c >= data_end:
                    free(counts)
                    raise AssertionError("compressed stream beyond the data area")
                counts[c] += 1
                if counts[c] > 0xFFFF:
                    free(counts)
                    raise OverflowError("more than 65535 compressed clusters in one host "
                                        "cluster (16-bit refcounts)")
    return counts


cdef inline void compressed_range(uint64_t entry, int bits, uint64_t *start,
                                  uint64_t *end) noexcept nogil:
    """The host bytes [start, end) a compressed cluster descriptor names: from
    its offset to the end of its last 512-byte sector."""
    cdef uint64_t x = 62 - (bits - 8)
    start[0] = entry & ((<uint64_t>1 << x) - 1)
    end[0] = ((start[0] & ~(<uint64_t>SECTOR - 1))
              + (((entry >> x) & ((<uint64_t>1 << (bits - 8)) - 1)) + 1) * SECTOR)


cdef inline uint16_t htobe16_(uint16_t x) noexcept nogil:
    return <uint16_t>((x >> 8) | (x << 8))


# ----------------------------------------------------------------------------
# Chain reader

cdef struct Layer:
    int fd
    int version
    int bits
    uint64_t cs
    uint64_t l2_entries
    uint64_t virtual_size
    uint64_t file_size
    uint64_t l1_size
    uint64_t *l1                # native endian
    uint64_t *l2                # one cached L2 table
    int64_t l2_index
    uint64_t l1_offset
    int ctype                   # compression type: 0 zlib (raw deflate), 1 zstd
    int compressed_checked      # compressed ranges checked against the rest


cdef struct RowBuf:
    uint64_t *rows              # rows of 5
    size_t n
    size_t cap


cdef int rows_push(RowBuf *b, uint64_t off, uint64_t length, uint64_t kind, uint64_t layer,
                   uint64_t host) except -1:
    """Append a row, merging with the previous one when it continues it (same
    kind and flags; for data, the same layer and the next host bytes)."""
    cdef uint64_t *last
    cdef uint64_t *grown
    cdef bint data = (kind & ROW_KIND_MASK) == ROW_DATA
    cdef bint compressed = (kind & ROW_KIND_MASK) == ROW_COMPRESSED
    if b.n and not compressed:
        last = b.rows + 5 * (b.n - 1)
        if (last[2] == kind and last[0] + last[1] == off and
                (not data or (last[3] == layer and last[4] + last[1] == host))):
            last[1] += length
            return 0
    if b.n == b.cap:
        b.cap = b.cap * 2 if b.cap else 256
        grown = <uint64_t *>realloc_(b.rows, b.cap * 5 * sizeof(uint64_t))
        if grown == NULL:
            raise MemoryError()
        b.rows = grown
    last = b.rows + 5 * b.n
    last[0] = off
    last[1] = length
    last[2] = kind
    last[3] = layer if data or compressed else 0
    last[4] = host if data or compressed else 0
    b.n += 1
    return 0


cdef extern from "<stdlib.h>" nogil:
    void *realloc_ "realloc"(void *p, size_t n)


cdef extern from "<stdlib.h>" nogil:
    void qsort(void *base, size_t nmemb, size_t size,
               int (*compar)(const void *, const void *) noexcept nogil)


cdef int cmp_u64(const void *a, const void *b) noexcept nogil:
    cdef uint64_t x = (<const uint64_t *>a)[0], y = (<const uint64_t *>b)[0]
    return (x > y) - (x < y)


cdef int check_distinct_tables(Layer *L, object name) except -1:
    """Refuse L1 entries that share an L2 table: QEMU never writes that, and a
    few shared tables would make a tiny file map to more rows than memory
    holds.  With distinct tables the work is bounded by the file's size."""
    cdef uint64_t *tables = <uint64_t *>malloc((L.l1_size if L.l1_size else 1) * 8)
    cdef uint64_t i, n = 0
    if tables == NULL:
        raise MemoryError()
    try:
        for i in range(L.l1_size):
            if L.l1[i] & L1E_OFFSET_MASK:
                tables[n] = L.l1[i] & L1E_OFFSET_MASK
                n += 1
        qsort(tables, n, 8, cmp_u64)
        for i in range(1, n):
            if tables[i] == tables[i - 1]:
                raise ImageError(f"{name}: several L1 entries point to the L2 table at offset "
                                 f"{tables[i]} (corrupt)")
    finally:
        free(tables)
    return 0


cdef class ChainMap:
    """The L1/L2 tables of a validated chain, top image first.

    Built by dirbackup.qcow2.Chain from headers it has checked; every table
    offset is checked again here before it is read, so a lying header or a
    corrupt table is an ImageError, never a wild read.
    """

    cdef Layer *layers
    cdef int n
    cdef list names

    def __cinit__(self):
        self.layers = NULL
        self.n = 0

    def __init__(self, layers):
        """`layers`: sequence of (fd, name, version, cluster_bits, virtual_size,
        l1_offset, l1_size, file_size[, compression type]), top image first."""
        cdef Layer *L
        cdef uint64_t i, need
        cdef ssize_t r
        self.names = []
        self.layers = <Layer *>calloc(len(layers), sizeof(Layer))
        if self.layers == NULL:
            raise MemoryError()
        for spec in layers:
            fd, name, version, bits, vsize, l1_offset, l1_size, file_size = spec[:8]
            L = &self.layers[self.n]
            self.n += 1
            self.names.append(name)
            L.fd = fd
            L.version = version
            L.bits = bits
            L.cs = <uint64_t>1 << bits
            L.l2_entries = L.cs // 8
            L.virtual_size = vsize
            L.file_size = file_size
            L.l1_size = l1_size
            L.l2_index = -1
            L.l1_offset = l1_offset
            L.ctype = spec[8] if len(spec) > 8 else 0
            need = l1_entries_for(vsize, bits)
            if l1_size < need:
                raise ImageError(f"{name}: L1 table has {l1_size} entries, "
                                 f"the virtual size needs {need}")
            if l1_size > MAX_L1_BYTES // 8:
                raise ImageError(f"{name}: L1 table of {l1_size} entries is too large")
            if l1_offset % L.cs or l1_offset + l1_size * 8 > file_size:
                raise ImageError(f"{name}: L1 table offset {l1_offset} is invalid "
                                 f"(misaligned or beyond the end of the file)")
            L.l1 = <uint64_t *>calloc(l1_size if l1_size else 1, 8)
            L.l2 = <uint64_t *>malloc(L.cs)
            if L.l1 == NULL or L.l2 == NULL:
                raise MemoryError()
            r = pread(fd, L.l1, l1_size * 8, l1_offset)
            if r != <ssize_t>(l1_size * 8):
                raise os_error(errno if r < 0 else EIO, "reading the L1 table of", name)
            for i in range(l1_size):
                L.l1[i] = be64toh(L.l1[i])
                if L.l1[i] & L1E_RESERVED:
                    raise ImageError(f"{name}: L1 entry {i} has reserved bits set (corrupt)")
                if (L.l1[i] & L1E_OFFSET_MASK) and (
                        (L.l1[i] & L1E_OFFSET_MASK) % L.cs
                        or (L.l1[i] & L1E_OFFSET_MASK) + L.cs > file_size):
                    raise ImageError(f"{name}: L1 entry {i} points to an invalid L2 table offset "
                                     f"{L.l1[i] & L1E_OFFSET_MASK}")
            check_distinct_tables(L, name)

    def __dealloc__(self):
        cdef int i
        if self.layers != NULL:
            for i in range(self.n):
                free(self.layers[i].l1)
                free(self.layers[i].l2)
            free(self.layers)

    cdef int load_l2(self, int li, uint64_t l1_index) except -1:
        cdef Layer *L = &self.layers[li]
        cdef uint64_t off = L.l1[l1_index] & L1E_OFFSET_MASK
        cdef ssize_t r
        cdef uint64_t k
        if L.l2_index == <int64_t>l1_index:
            return 0
        with nogil:
            r = pread(L.fd, L.l2, L.cs, off)
        if r != <ssize_t>L.cs:
            L.l2_index = -1
            raise os_error(errno if r < 0 else EIO, "reading an L2 table of", self.names[li])
        for k in range(L.l2_entries):
            L.l2[k] = be64toh(L.l2[k])
        L.l2_index = l1_index
        return 0

    cdef int resolve(self, int li, int depth, uint64_t off, uint64_t end,
                     RowBuf *out) except -1:
        """Map guest [off, end) through layers li.. of the chain into `out`."""
        cdef Layer *L
        cdef uint64_t pos, cluster, l1i, cend, entry, host, run_start = 0
        cdef int kind, run_kind = 0
        if li >= depth:
            rows_push(out, off, end - off, ROW_UNALLOCATED, 0, 0)
            return 0
        L = &self.layers[li]
        pos = off
        while pos < end:
            if pos >= L.virtual_size:
                # a shorter backing file reads as zero beyond its end
                if run_kind == ROW_UNALLOCATED:
                    self.resolve(li + 1, depth, run_start, pos, out)
                run_kind = 0
                rows_push(out, pos, end - pos, ROW_ZERO, 0, 0)
                return 0
            cluster = pos >> L.bits
            cend = (cluster + 1) << L.bits
            if cend > end:
                cend = end
            l1i = cluster // L.l2_entries
            entry = 0
            if l1i >= L.l1_size or not (L.l1[l1i] & L1E_OFFSET_MASK):
                # no L2 table: the whole range it would map is unallocated here
                cend = (l1i + 1) * L.l2_entries << L.bits
                if cend > end:
                    cend = end
            else:
                self.load_l2(li, l1i)
                entry = L.l2[cluster % L.l2_entries]
            if entry & OFLAG_COMPRESSED:
                self.check_compressed(li, cluster, entry)
                if run_kind == ROW_UNALLOCATED:
                    self.resolve(li + 1, depth, run_start, pos, out)
                run_kind = ROW_COMPRESSED
                rows_push(out, pos, cend - pos, ROW_COMPRESSED, li, entry)
                pos = cend
                continue
            if entry & L2E_RESERVED or (L.version < 3 and entry & OFLAG_ZERO):
                raise ImageError(f"{self.names[li]}: L2 entry for guest offset "
                                 f"{cluster << L.bits} has reserved bits set (corrupt)")
            host = entry & L2E_OFFSET_MASK
            if entry & OFLAG_ZERO:
                kind = ROW_ZERO
            elif host:
                if host % L.cs or host >= L.file_size:
                    raise ImageError(f"{self.names[li]}: data cluster for guest offset "
                                     f"{cluster << L.bits} at invalid host offset {host}")
                kind = ROW_DATA
            else:
                kind = ROW_UNALLOCATED
            if kind != ROW_UNALLOCATED:
                if run_kind == ROW_UNALLOCATED:
                    self.resolve(li + 1, depth, run_start, pos, out)
                run_kind = kind
                rows_push(out, pos, cend - pos, kind, li, host + (pos - (cluster << L.bits)))
            elif run_kind != ROW_UNALLOCATED:
                run_kind = ROW_UNALLOCATED
                run_start = pos
            pos = cend
        if run_kind == ROW_UNALLOCATED:
            self.resolve(li + 1, depth, run_start, end, out)
        return 0

    cdef int check_compressed(self, int li, uint64_t cluster, uint64_t entry) except -1:
        """Refuse a compressed cluster whose bytes run past the end of the
        file or into the header; the first one seen in a layer also checks
        the whole layer (check_compressed_layer)."""
        cdef Layer *L = &self.layers[li]
        cdef uint64_t start, end
        compressed_range(entry, L.bits, &start, &end)
        # QEMU writes the last stream up to the end of the file, not of its sector
        if start < L.cs or end > ((L.file_size + SECTOR - 1) & ~(<uint64_t>SECTOR - 1)):
            raise ImageError(f"{self.names[li]}: compressed cluster for guest offset "
                             f"{cluster << L.bits} at host offset {start}: its {end - start} "
                             f"bytes lie outside the file's data (corrupt)")
        if not L.compressed_checked:
            self.check_compressed_layer(li)
            L.compressed_checked = 1
        return 0

    def check_compressed_layer(self, int li):
        """Refuse a layer whose compressed clusters share host clusters with its
        header, L1 or L2 tables or normal data clusters: QEMU never writes that,
        and a write through one would corrupt the other."""
        cdef Layer *L = &self.layers[li]
        name = self.names[li]
        bits = L.bits
        normal = [np.array([0], dtype=np.uint64),
                  np.arange(L.l1_offset >> bits,
                            ((L.l1_offset + max(L.l1_size * 8, 1) - 1) >> bits) + 1,
                            dtype=np.uint64)]
        starts = []
        ends = []
        x = 62 - (bits - 8)
        for i in range(L.l1_size):
            off = L.l1[i] & L1E_OFFSET_MASK
            if not off:
                continue
            normal.append(np.array([off >> bits], dtype=np.uint64))
            raw = os.pread(L.fd, L.cs, off)
            if len(raw) != L.cs:
                raise ImageError(f"{name}: truncated L2 table at offset {off}")
            e = np.frombuffer(raw, dtype=">u8").astype(np.uint64)
            comp = (e >> np.uint64(62)) & np.uint64(1) == 1
            plain = e[~comp] & np.uint64(L2E_OFFSET_MASK)
            normal.append(plain[plain != 0] >> np.uint64(bits))
            c = e[comp]
            s = c & np.uint64((1 << x) - 1)
            n = ((c >> np.uint64(x)) & np.uint64((1 << (bits - 8)) - 1)) + np.uint64(1)
            starts.append(s)
            ends.append((s & ~np.uint64(SECTOR - 1)) + n * np.uint64(SECTOR))
        if not starts:
            return
        s = np.concatenate(starts)
        e = np.concatenate(ends)
        used = np.unique(np.concatenate(normal))
        first = s >> np.uint64(bits)
        last = (e - np.uint64(1)) >> np.uint64(bits)
        for touched in (first, last, np.minimum(first + np.uint64(1), last)):
            hit = np.isin(touched, used)
            if hit.any():
                k = int(np.argmax(hit))
                raise ImageError(f"{name}: compressed data at host offset {int(s[k])} overlaps "
                                 f"the normal cluster at host offset "
                                 f"{int(touched[k]) << bits} (corrupt)")

    def map(self, uint64_t offset=0, length=None, int depth=-1):
        """Rows (guest offset, length, kind, layer, host offset) covering the range,
        kind MAP_DATA / MAP_ZERO / MAP_UNALLOCATED, through the first `depth`
        layers (all by default); neighbouring rows that continue each other
        are merged."""
        cdef RowBuf out
        out.rows = NULL
        out.n = 0
        out.cap = 0
        cdef uint64_t end = self.layers[0].virtual_size if length is None else offset + length
        if depth < 0 or depth > self.n:
            depth = self.n
        if end > self.layers[0].virtual_size or end < offset:
            raise ValueError("range outside the image")
        try:
            if end > offset:
                self.resolve(0, depth, offset, end, &out)
            return rows_array(&out)
        finally:
            free(out.rows)

    def layer_map(self, int layer):
        """Rows of what layer `layer` itself holds (data and zero clusters; the
        rest unallocated), whatever the layers above it hold."""
        cdef RowBuf out
        if layer < 0 or layer >= self.n:
            raise IndexError("no such layer")
        out.rows = NULL
        out.n = 0
        out.cap = 0
        try:
            self.resolve(layer, layer + 1, 0, self.layers[layer].virtual_size, &out)
            return rows_array(&out)
        finally:
            free(out.rows)

    def check_plan(self, checks, int depth=-1):
        """Copy requests for the guest disk the first `depth` layers (all by
        default) describe, which also check layers against their digests.

        `checks` has one entry per layer: None, or (digest chunk, number of
        chunks) for a layer to check.  The rows are those of map() (unallocated
        ranges kept), cut so that every data cluster of a checked layer is
        hashed exactly once and whole, in the layer's own cluster size: a
        cluster seen whole is hashed as it is copied (ROW_HASH); the visible
        part of a cluster that layers above partly hide is written unhashed,
        and every cluster they hide, wholly or partly, gets an extra row that
        reads and hashes it without writing (ROW_HASH | ROW_NOWRITE).  Zero
        clusters are not read: their digests depend only on where they are.

        Returns (rows, zero_sums): zero_sums[i] holds the per-chunk sums of the
        zero cluster digests of checked layer i (None for the others), to add
        to what the copy sums for its data clusters."""
        cdef int li
        cdef Py_ssize_t i
        cdef uint64_t vsize = self.layers[0].virtual_size
        cdef uint64_t off, length, kind, host, u, a, b, lo, hi
        cdef uint64_t[:, ::1] vis
        cdef RowBuf out
        cdef RowBuf own
        cdef RowBuf *covered = NULL
        cdef uint64_t *chunk = NULL
        cdef uint64_t *count = NULL
        if depth < 0 or depth > self.n:
            depth = self.n
        if len(checks) != self.n:
            raise ValueError("one check entry per layer is needed")
        out.rows = own.rows = NULL
        out.n = own.n = out.cap = own.cap = 0
        zero_sums = [None] * self.n
        try:
            covered = <RowBuf *>calloc(self.n, sizeof(RowBuf))
            chunk = <uint64_t *>calloc(self.n, sizeof(uint64_t))
            count = <uint64_t *>calloc(self.n, sizeof(uint64_t))
            if covered == NULL or chunk == NULL or count == NULL:
                raise MemoryError()
            for li in range(depth):
                if checks[li] is None:
                    continue
                chunk[li], count[li] = checks[li]
                if chunk[li] == 0 or chunk[li] % self.layers[li].cs:
                    raise ValueError(f"{self.names[li]}: digest chunk {chunk[li]} is not a "
                                     f"multiple of the cluster size {self.layers[li].cs}")
                if count[li] < (vsize + chunk[li] - 1) // chunk[li]:
                    raise ValueError(f"{self.names[li]}: {count[li]} digest chunks do not "
                                     f"cover the virtual size")
            vis = self.map(0, None, depth)
            for i in range(vis.shape[0]):
                off, length, kind, li, host = vis[i, 0], vis[i, 1], vis[i, 2], vis[i, 3], vis[i, 4]
                if kind == ROW_COMPRESSED and chunk[li]:
                    # one cluster: hashed as it is copied when seen whole
                    u = self.layers[li].cs
                    if off % u == 0 and (length == u or off + length == vsize):
                        rows_push(&out, off, length, ROW_COMPRESSED | ROW_HASH, li, host)
                        rows_push(&covered[li], off, length, ROW_ZERO, 0, 0)
                    else:
                        rows_push(&out, off, length, ROW_COMPRESSED, li, host)
                    continue
                if kind != ROW_DATA or chunk[li] == 0:
                    rows_push(&out, off, length, kind, li, host)
                    continue
                # the whole clusters of this row are hashed as they are copied
                u = self.layers[li].cs
                a = off
                b = off + length
                lo = (a + u - 1) // u * u
                hi = b if b == vsize else b // u * u
                if lo >= hi:
                    rows_push(&out, a, length, ROW_DATA, li, host)
                    continue
                if a < lo:
                    rows_push(&out, a, lo - a, ROW_DATA, li, host)
                rows_push(&out, lo, hi - lo, ROW_DATA | ROW_HASH, li, host + (lo - a))
                if hi < b:
                    rows_push(&out, hi, b - hi, ROW_DATA, li, host + (hi - a))
                rows_push(&covered[li], lo, hi - lo, ROW_ZERO, 0, 0)
            for li in range(depth):
                if chunk[li] == 0:
                    continue
                sums = np.zeros(count[li], dtype=np.uint64)
                own.n = 0
                self.resolve(li, li + 1, 0, vsize, &own)
                self.hidden_rows(li, &own, &covered[li], &out, sums, chunk[li])
                zero_sums[li] = sums
            return rows_array(&out), zero_sums
        finally:
            free(out.rows)
            free(own.rows)
            if covered != NULL:
                for li in range(self.n):
                    free(covered[li].rows)
            free(covered)
            free(chunk)
            free(count)

    cdef int hidden_rows(self, int li, RowBuf *own, RowBuf *covered, RowBuf *out,
                         uint64_t[::1] sums, uint64_t chunk) except -1:
        """For layer li: a read-and-hash row for each run of its data clusters
        that `covered` (the runs hashed as they are copied, sorted) leaves out,
        and the digests of its zero clusters summed into `sums`."""
        cdef uint64_t u = self.layers[li].cs
        cdef uint64_t r, k = 0, s, e, pos, nxt, ue, cs_, ce
        cdef uint64_t *row
        for r in range(own.n):
            row = own.rows + 5 * r
            s = row[0]
            e = s + row[1]
            pos = s
            if row[2] == ROW_ZERO:
                while pos < e:
                    ue = pos - pos % u + u
                    if ue > e:
                        ue = e
                    sums[pos // chunk] += zero_unit_digest(pos, ue - pos)
                    pos = ue
                continue
            if row[2] == ROW_COMPRESSED:
                # a whole cluster: covered whole or not at all
                while k < covered.n and covered.rows[5 * k] + covered.rows[5 * k + 1] <= s:
                    k += 1
                if not (k < covered.n and covered.rows[5 * k] <= s):
                    rows_push(out, s, e - s, ROW_COMPRESSED | ROW_HASH | ROW_NOWRITE, li, row[4])
                continue
            if row[2] != ROW_DATA:
                continue
            while pos < e:
                while k < covered.n and covered.rows[5 * k] + covered.rows[5 * k + 1] <= pos:
                    k += 1
                if k < covered.n:
                    cs_ = covered.rows[5 * k]
                    ce = cs_ + covered.rows[5 * k + 1]
                    if cs_ <= pos:
                        pos = ce if ce < e else e
                        continue
                    nxt = cs_ if cs_ < e else e
                else:
                    nxt = e
                rows_push(out, pos, nxt - pos, ROW_DATA | ROW_HASH | ROW_NOWRITE, li,
                          row[4] + (pos - s))
                pos = nxt
        return 0


cdef extern from "<string.h>" nogil:
    void *memcpy_ "memcpy"(void *d, const void *s, size_t n)


cdef object rows_array(RowBuf *b):
    """The rows of a RowBuf as a new (n, 5) uint64 array."""
    result = np.empty((b.n, 5), dtype=np.uint64)
    if b.n:
        memcpy_(<void *>np_data(result), b.rows, b.n * 5 * sizeof(uint64_t))
    return result


cdef inline size_t np_data(object arr) except 0:
    cdef uint64_t[:, ::1] v = arr
    return <size_t>&v[0, 0]


# ----------------------------------------------------------------------------
# Digests of one image's own clusters

def layer_digests(ChainMap chain, uint64_t chunk, uint64_t n_chunks):
    """Per-chunk digest sums of the clusters the top image itself holds
    (data clusters hashed, zero clusters as their marker), computed exactly as
    the copy loop computes them while writing.  Used by verify."""
    return layer_views(chain, chunk, n_chunks)[0]


cdef inline bint all_zero(const char *p, uint64_t n) noexcept nogil:
    cdef uint64_t i
    for i in range(n if n < 16 else 16):
        if p[i]:
            return False
    return n <= 16 or memcmp(p, p + 16, n - 16) == 0


cdef inline uint64_t view_unit_digest(const char *p, uint64_t pos, uint64_t n,
                                      bint bottom) noexcept nogil:
    """What `n` bytes at guest offset `pos` read as: nothing where they read as
    zero at the bottom of a chain, else the zero marker or the data's digest."""
    if p == NULL or all_zero(p, n):
        return 0 if bottom else zero_unit_digest(pos, n)
    return data_unit_digest(p, pos, n)


cdef class Unpacker:
    """Decompression of single compressed clusters outside the copy loop."""

    cdef ZSTD_DCtx *dctx
    cdef z_stream zs
    cdef bint zs_ready
    cdef char *src
    cdef uint64_t cs

    def __cinit__(self, uint64_t cs):
        self.cs = cs
        self.dctx = ZSTD_createDCtx()
        self.src = <char *>malloc(2 * cs)
        memset(&self.zs, 0, sizeof(z_stream))
        if self.dctx == NULL or self.src == NULL or inflateInit2(&self.zs, ZLIB_WINDOW_BITS) != 0:
            raise MemoryError()
        self.zs_ready = True

    def __dealloc__(self):
        if self.dctx != NULL:
            ZSTD_freeDCtx(self.dctx)
        if self.zs_ready:
            inflateEnd(&self.zs)
        free(self.src)

    cdef int unpack(self, Layer *L, object name, uint64_t entry, uint64_t guest,
                    char *dst) except -1:
        """Decompress the cluster `entry` describes into `dst` (L.cs bytes)."""
        cdef uint64_t start, end
        cdef ssize_t r
        cdef int rc
        compressed_range(entry, L.bits, &start, &end)
        with nogil:
            r = pread(L.fd, self.src, end - start, start)
        if r < 0:
            raise os_error(errno, "reading", name)
        if <uint64_t>r < end - start:
            memset(self.src + r, 0, end - start - r)
        with nogil:
            rc = decompress_cluster(L.ctype, self.src, end - start, dst, L.cs, self.dctx,
                                    &self.zs, NULL)
        if rc < 0:
            raise ImageError(f"{name}: compressed cluster for guest offset {guest} at host "
                             f"offset {start}: the stream does not decompress to exactly one "
                             f"cluster (corrupt)")
        return 0


#: How often layer_views reports progress: every 32 MiB of data read.
cdef uint64_t PROGRESS_STEP = 32 << 20


def layer_views(ChainMap chain, uint64_t chunk, uint64_t n_chunks, uint64_t unit=0,
                bint bottom=False, shadow=None, progress=None):
    """Read the top image's own clusters once; return (own, view).

    `own` is layer_digests().  `view` (None without `unit`) sums, per chunk,
    what the image shows of the guest disk in `unit`-byte pieces, whatever
    its clusters: a piece that reads as zero counts as the zero marker (or
    nothing if `bottom`: no image lies beneath, so zero and unallocated read
    the same), any other piece as its data's digest; pieces inside the sorted
    (offset, length) ranges of `shadow` (hidden by images above) count
    nothing.  Two layers whose views add up to the view of one image read,
    together, exactly as that image does: a merge is checked that way.
    `progress(n)`, if given, is told every PROGRESS_STEP bytes read (and the
    rest at the end): n more bytes of the image's data were read."""
    cdef Layer *L = &chain.layers[0]
    cdef uint64_t since = 0
    cdef uint64_t cs = L.cs, pos, end, step, idx, sub, slen
    cdef uint64_t[:, ::1] rows
    cdef uint64_t[:, ::1] hidden
    cdef Py_ssize_t i, j = 0, n_hidden = 0
    cdef ssize_t r
    cdef char *buf
    cdef bint zero
    out = np.zeros(n_chunks, dtype=np.uint64)
    view = np.zeros(n_chunks, dtype=np.uint64) if unit else None
    cdef uint64_t[::1] d = out
    cdef uint64_t[::1] v = view if unit else out
    if chunk % cs:
        raise ValueError("digest chunk must be a multiple of the cluster size")
    if unit and (cs % unit or chunk % unit):
        raise ValueError("the view unit must divide the cluster size")
    if unit and shadow is not None and len(shadow):
        hidden = np.ascontiguousarray(shadow, dtype=np.uint64).reshape(-1, 2)
        n_hidden = hidden.shape[0]
    rows = chain.map(depth=1)
    buf = <char *>malloc(cs)
    if buf == NULL:
        raise MemoryError()
    cdef Unpacker unpacker = None
    try:
        for i in range(rows.shape[0]):
            if rows[i, 2] == ROW_UNALLOCATED:
                continue
            zero = rows[i, 2] == ROW_ZERO
            pos = rows[i, 0]
            end = pos + rows[i, 1]
            while pos < end:
                step = cs if end - pos > cs else end - pos
                idx = pos // chunk
                if idx >= n_chunks:
                    raise ImageError(f"{chain.names[0]}: cluster beyond the digested size")
                if zero:
                    d[idx] += zero_unit_digest(pos, step)
                elif rows[i, 2] == ROW_COMPRESSED:
                    if unpacker is None:
                        unpacker = Unpacker(cs)
                    unpacker.unpack(L, chain.names[0], rows[i, 4], pos - pos % cs, buf)
                    d[idx] += data_unit_digest(buf, pos, step)
                else:
                    with nogil:
                        r = pread(L.fd, buf, step, rows[i, 4] + (pos - rows[i, 0]))
                    if r < 0:
                        raise os_error(errno, "reading", chain.names[0])
                    if <uint64_t>r < step:
                        memset(buf + r, 0, step - r)
                    d[idx] += data_unit_digest(buf, pos, step)
                sub = pos
                while unit and sub < pos + step:
                    slen = unit if pos + step - sub > unit else pos + step - sub
                    while j < n_hidden and hidden[j, 0] + hidden[j, 1] <= sub:
                        j += 1
                    if not (j < n_hidden and hidden[j, 0] <= sub):
                        v[sub // chunk] += view_unit_digest(
                            NULL if zero else buf + (sub - pos), sub, slen, bottom)
                    sub += slen
                pos += step
                if not zero:
                    since += step
                    if since >= PROGRESS_STEP and progress is not None:
                        progress(since)
                        since = 0
    finally:
        free(buf)
    if since and progress is not None:
        progress(since)
    return out, view
