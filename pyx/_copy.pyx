# cython: language_level=3
"""The copy loop.

(About 1,000 lines, past the ~900 of the rest of the core, for a reason: the
loop and CopyJob, which fills the Job struct the loop reads and checks every
request row, layer check and option the nogil code then trusts unchecked,
belong together; apart, the checks would drift from the code relying on them.
The operations of each kind of source and target are in copy_ops.pxi.)

A CopyJob moves a list of requests from a source to a target on C threads,
with the GIL released for the whole copy.  Every request is a row of five
uint64 values:

    (guest offset, length, kind, layer, source offset)

kind REQ_COPY reads the job's source (a file descriptor, or one libnbd handle
per worker with several reads in flight) at the source offset, finds the
clusters that read as zero and writes the rest; REQ_DATA takes the bytes from
layer file `layer` (a qcow2 image of a chain being restored) at the source
offset; REQ_ZERO says the range reads as zero.  A REQ_DATA row may carry the
flags REQ_HASH (hash each of the layer's clusters, as read, into the layer's
per-chunk sums: the restore's check against the backup's digests) and
REQ_NOWRITE (only read and hash); see rows.pxd.

Targets: a file descriptor (raw file or block device), one libnbd handle per
worker, or a sink (sink.pxd) such as the qcow2 writer, which maps guest
clusters to host clusters while this loop does the I/O.  Each job chooses its
source's and its target's operations once (SourceOps, TargetOps: tables of
function pointers after libnbd's nbdcopy `struct rw_ops`); the loop calls
through them and never asks what kind of source or target it has.

Workers record the first error (errno, operation, offset, libnbd message) and
stop everyone; the Python thread that called run() raises it.  Progress
counters are atomics that Python reads without stopping the copy.
"""
from cpython.pycapsule cimport PyCapsule_GetPointer
from cpython.ref cimport Py_INCREF
from libc.errno cimport (EBADF, EINTR, EINVAL, EIO, ENOSPC, ENOSYS, ENOTCONN, ENOTTY, EOPNOTSUPP,
                         EXDEV, errno)
from libc.stdint cimport int64_t, uint64_t
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memcmp, memset, strncpy
from posix.ioctl cimport ioctl
from posix.stdlib cimport posix_memalign
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, nanosleep, timespec
from posix.types cimport off_t
from posix.uio cimport iovec, pwritev
from posix.unistd cimport pread, pwrite

from _capsule cimport handle_of
from _hash cimport data_unit_digest, zero_unit_digest
from libnbd cimport (NBD_NULL_COMPLETION, nbd_aio_command_completed, nbd_aio_in_flight,
                     nbd_aio_is_dead, nbd_aio_pread, nbd_can_trim, nbd_can_zero, nbd_get_errno,
                     nbd_get_error, nbd_handle, nbd_poll, nbd_pwrite, nbd_trim, nbd_zero)
from rows cimport (ROW_COMPRESSED, ROW_COPY, ROW_DATA, ROW_HASH, ROW_KIND_MASK, ROW_NOWRITE,
                   ROW_UNALLOCATED, ROW_ZERO)
from sink cimport sink_ops
from unpack cimport (CTYPE_ZSTD, ZLIB_WINDOW_BITS, decompress_cluster, inflateEnd,
                     inflateInit2, z_stream)
from zstd cimport (ZSTD_CCtx, ZSTD_compressCCtx, ZSTD_createCCtx, ZSTD_createDCtx, ZSTD_DCtx,
                   ZSTD_freeCCtx, ZSTD_freeDCtx, ZSTD_isError)
from sysdeps cimport (BLKDISCARD, BLKZEROOUT, FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE,
                      FALLOC_FL_ZERO_RANGE, IOV_MAX, __ATOMIC_RELAXED, __ATOMIC_SEQ_CST,
                      atomic_add_u64, atomic_load_int, atomic_load_u64, atomic_store_int,
                      copy_file_range, fallocate, pthread_create, pthread_join,
                      pthread_mutex_destroy, pthread_mutex_init, pthread_mutex_lock,
                      pthread_mutex_t, pthread_mutex_unlock, pthread_t)

import numpy as np

from dirbackup.errors import Cancelled, ImageError

cdef extern from "<pthread.h>" nogil:
    int pthread_timedjoin_np(pthread_t thread, void **retval, const timespec *abstime)
    int pthread_detach(pthread_t thread)

cdef extern from "<time.h>" nogil:
    enum:
        CLOCK_REALTIME

cdef extern from "Python.h":
    int PyErr_CheckSignals() except -1


# Request kinds, and flags of REQ_DATA rows (rows.pxd)
REQ_COPY = ROW_COPY
REQ_DATA = ROW_DATA
REQ_ZERO = ROW_ZERO
REQ_COMPRESSED = ROW_COMPRESSED
REQ_KIND_MASK = ROW_KIND_MASK
REQ_HASH = ROW_HASH
REQ_NOWRITE = ROW_NOWRITE
# Target kinds
TGT_NULL = 0
TGT_FD = 1
TGT_NBD = 2
TGT_SINK = 3

cdef enum:
    OP_READ = 1
    OP_WRITE = 2
    OP_ZERO = 3
    OP_ALLOC = 4
    OP_EOF = 5
    OP_READ_LAYER = 6
    OP_DECOMPRESS = 7
    MAX_DEPTH = 64
    IN_FLIGHT = 4 << 20
    ALIGN = 4096
    ZERO_BUF = 1 << 20
    CANCEL_GRACE_NS = 5000000000
    ABANDON_NS = 7000000000

OPERATIONS = {OP_READ: "reading", OP_WRITE: "writing", OP_ZERO: "zeroing",
              OP_ALLOC: "allocating clusters in", OP_EOF: "reading",
              OP_READ_LAYER: "reading", OP_DECOMPRESS: "decompressing"}


cdef struct Worker


cdef struct TargetOps:
    # Write one request read into `buf` (guest offset and length): finds the
    # clusters that read as zero, adds the digests, and calls write and zero.
    int (*process)(Worker *w, const char *buf, uint64_t offset, uint64_t length,
                   bint detect_zero) noexcept nogil
    # Write `length` bytes at `offset` of the target.
    int (*write)(Worker *w, const char *buf, uint64_t offset, uint64_t length) noexcept nogil
    # Make [offset, offset + length) of the target read as zero.
    int (*zero)(Worker *w, uint64_t offset, uint64_t length) noexcept nogil
    # copy_file_range from a layer file to the target (see copy_range), or
    # NULL where the kernel cannot (not a file target).
    int (*copy_range)(Worker *w, int in_fd, uint64_t *src, uint64_t *dst,
                      uint64_t *length) noexcept nogil


cdef struct SourceOps:
    # The worker's loop: take requests until none are left or the job stops.
    void (*run)(Worker *w) noexcept nogil
    # Give [offset, offset + length) back to the source; 0, or the errno
    # (never 0) of the refusal.
    int (*discard)(Worker *w, uint64_t offset, uint64_t length) noexcept nogil


cdef struct Job:
    # requests (rows of 5 uint64) and the next one to take
    uint64_t *req
    uint64_t n_req
    uint64_t next_req
    # source: its operations, set once per job
    SourceOps src
    int src_fd
    int src_direct
    int src_nbd
    int *layer_fds
    int n_layers
    # per layer: cluster bits and compression type (REQ_COMPRESSED rows)
    int *layer_bits
    int *layer_ctype
    # target: its operations, set once per job
    TargetOps tgt
    int tgt_fd
    int tgt_blockdev
    sink_ops *sink
    int cfr_ok
    # options
    uint64_t cluster
    uint64_t bufsize
    uint64_t slice
    int depth
    int discard
    int discard_errno
    uint64_t bw_limit
    uint64_t bw_burst
    int64_t t0_ns
    uint64_t bw_used
    # digests: one sum per chunk of guest address space
    uint64_t *digests
    uint64_t digest_chunk
    uint64_t n_digests
    int digest_zero
    # per-layer sums of REQ_HASH rows: layer i's chunk k is lsums[lfirst[i] + k]
    uint64_t *lsums
    uint64_t *lfirst
    uint64_t *lchunk
    uint64_t *lunit
    # progress
    uint64_t done_bytes
    uint64_t read_bytes
    uint64_t written_bytes
    uint64_t zero_bytes
    uint64_t discarded_bytes
    # control
    int cancel
    int64_t cancel_ns
    const char *zeros
    # writes to one regular file, one at a time
    int serialize_writes
    pthread_mutex_t write_lock
    # first error
    pthread_mutex_t err_lock
    int err_set
    int err
    int err_op
    uint64_t err_offset
    uint64_t err_layer
    uint64_t err_host
    char err_msg[512]


cdef struct Worker:
    Job *job
    nbd_handle *src_h
    nbd_handle *tgt_h
    char *buf               # depth slots of bufsize + ALIGN bytes
    uint64_t slot_size
    iovec *iov
    uint64_t *clusters
    uint64_t max_units
    # compressing sinks: this worker's zstd context, the buffer its streams
    # are packed into, and per stream its guest cluster, offset and length
    ZSTD_CCtx *cctx
    # REQ_COMPRESSED rows: decompression contexts, the compressed bytes read
    # and the cluster they make
    ZSTD_DCtx *dctx
    z_stream *zs
    char *zbuf
    char *dbuf
    char *cbuf
    uint64_t *cclusters
    uint64_t *coffsets
    uint64_t *clengths
    int leak                # buffers may still be in use by libnbd: never free
    pthread_t tid
    int started


# ----------------------------------------------------------------------------
# Small nogil helpers

cdef inline int64_t now_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <int64_t>ts.tv_sec * 1000000000 + ts.tv_nsec


cdef inline void sleep_ns(int64_t ns) noexcept nogil:
    cdef timespec ts
    ts.tv_sec = ns // 1000000000
    ts.tv_nsec = ns % 1000000000
    nanosleep(&ts, NULL)


cdef inline bint cancelled(Job *j) noexcept nogil:
    return atomic_load_int(&j.cancel, __ATOMIC_RELAXED) != 0


cdef void set_cancel(Job *j) noexcept nogil:
    if not cancelled(j):
        j.cancel_ns = now_ns()
        atomic_store_int(&j.cancel, 1, __ATOMIC_SEQ_CST)


cdef void fail(Job *j, int err, int op, uint64_t offset, const char *msg) noexcept nogil:
    """Record the first error and stop every worker."""
    pthread_mutex_lock(&j.err_lock)
    if not j.err_set:
        j.err_set = 1
        j.err = err
        j.err_op = op
        j.err_offset = offset
        if msg != NULL:
            strncpy(j.err_msg, msg, sizeof(j.err_msg) - 1)
            j.err_msg[sizeof(j.err_msg) - 1] = 0
    pthread_mutex_unlock(&j.err_lock)
    set_cancel(j)


cdef inline void fail_nbd(Job *j, int op, uint64_t offset) noexcept nogil:
    fail(j, nbd_get_errno(), op, offset, nbd_get_error())


cdef inline void fail_nbd_on(Job *j, nbd_handle *h, int op, uint64_t offset) noexcept nogil:
    """fail_nbd for a call on `h`; a connection that died is ENOTCONN, not the
    EINVAL ("invalid state: DEAD") libnbd gives calls on a dead handle."""
    if nbd_aio_is_dead(h) > 0:
        fail(j, ENOTCONN, op, offset, b"the NBD server closed the connection")
    else:
        fail_nbd(j, op, offset)


cdef inline bint is_zero(const char *p, uint64_t n) noexcept nogil:
    """All bytes zero?  The first 16 bytes are checked directly, then the
    buffer is compared with itself shifted by 16, which glibc does with SIMD."""
    cdef uint64_t i
    if n <= 16:
        for i in range(n):
            if p[i]:
                return False
        return True
    for i in range(16):
        if p[i]:
            return False
    return memcmp(p, p + 16, n - 16) == 0


cdef void throttle(Job *j, uint64_t n) noexcept nogil:
    """Token bucket as a virtual clock: the bytes taken so far may not run
    ahead of `bw_limit` bytes per second plus one burst."""
    if j.bw_limit == 0:
        return
    cdef uint64_t used = atomic_add_u64(&j.bw_used, n, __ATOMIC_RELAXED) + n
    cdef int64_t due, wait
    if used <= j.bw_burst:
        return
    due = j.t0_ns + <int64_t>((<double>(used - j.bw_burst) / j.bw_limit) * 1e9)
    while not cancelled(j):
        wait = due - now_ns()
        if wait <= 0:
            return
        sleep_ns(wait if wait < 100000000 else 100000000)


cdef inline void account(uint64_t *counter, uint64_t n) noexcept nogil:
    atomic_add_u64(counter, n, __ATOMIC_RELAXED)


include "copy_ops.pxi"


# ----------------------------------------------------------------------------
# A request read into a buffer: zero detection, digests, then the target

cdef inline int target_zero(Worker *w, uint64_t offset, uint64_t length) noexcept nogil:
    account(&w.job.zero_bytes, length)
    return w.job.tgt.zero(w, offset, length)


cdef inline void add_digest(Job *j, uint64_t offset, uint64_t value) noexcept nogil:
    atomic_add_u64(&j.digests[offset // j.digest_chunk], value, __ATOMIC_RELAXED)


cdef void add_zero_digests(Job *j, uint64_t offset, uint64_t length) noexcept nogil:
    """A mapped REQ_ZERO row with `digest_zero`: each cluster counts as a
    cluster read as zero would in process_sink, so a backup copied from a
    mapped plan sums the same digests as one read through a source."""
    cdef uint64_t cs = j.cluster
    cdef uint64_t pos = offset, end = offset + length, ue
    while pos < end:
        ue = pos - pos % cs + cs
        if ue > end:
            ue = end
        add_digest(j, pos, zero_unit_digest(pos, ue - pos))
        pos = ue


cdef void hash_layer_units(Job *j, uint64_t layer, const char *buf, uint64_t offset,
                           uint64_t length) noexcept nogil:
    """Add the digest of each of the layer's clusters in `buf` (read from guest
    `offset`, cluster aligned) to the layer's chunk sums."""
    cdef uint64_t unit = j.lunit[layer], chunk = j.lchunk[layer]
    cdef uint64_t *sums = j.lsums + j.lfirst[layer]
    cdef uint64_t pos = offset, end = offset + length, ue
    while pos < end:
        ue = pos - pos % unit + unit
        if ue > end:
            ue = end
        atomic_add_u64(&sums[pos // chunk], data_unit_digest(buf + (pos - offset), pos, ue - pos),
                       __ATOMIC_RELAXED)
        pos = ue


cdef inline bint compress_cluster(Worker *w, const char *p, uint64_t cluster,
                                  uint64_t *packed) noexcept nogil:
    """Compress one whole cluster onto the worker's packed streams; False
    when it does not shrink by at least one 512-byte sector (stored as is)."""
    cdef sink_ops *s = w.job.sink
    cdef uint64_t cs = s.cluster_size, k = w.cclusters[0]
    cdef size_t r = ZSTD_compressCCtx(w.cctx, w.cbuf + packed[0], cs - 512, p, cs,
                                      s.compress_level)
    cdef uint64_t room
    if ZSTD_isError(r) or r == 0 or r > cs - 512:
        return False
    # streams take at least cs/65535 bytes, so that no host cluster is touched
    # by more compressed clusters than a 16-bit refcount counts
    room = cs // 65535 + 1
    if r < room:
        memset(w.cbuf + packed[0] + r, 0, room - r)
    k = w.cclusters[0] + 1
    w.cclusters[k] = cluster
    w.coffsets[k] = packed[0]
    w.clengths[k] = r
    w.cclusters[0] = k
    packed[0] += r if r >= room else room
    return True


cdef int process_sink(Worker *w, const char *buf, uint64_t offset,
                      uint64_t length, bint detect_zero) noexcept nogil:
    """Hand one cluster-aligned request to a sink: data clusters go to newly
    allocated host clusters with one pwritev, zero clusters are recorded.
    A compressing sink gets each whole data cluster that shrinks as a zstd
    stream instead, all of the request's streams packed into one write."""
    cdef Job *j = w.job
    cdef sink_ops *s = j.sink
    cdef uint64_t cs = s.cluster_size
    cdef uint64_t pos = offset, end = offset + length, ue, n = 0, packed = 0
    cdef uint64_t zstart = 0, zend = 0
    cdef int64_t host
    cdef const char *p
    cdef bint compress = w.cctx != NULL
    if compress:
        w.cclusters[0] = 0      # count of streams; entries from 1 on
    while pos < end:
        ue = pos - pos % cs + cs
        if ue > end:
            ue = end
        p = buf + (pos - offset)
        if is_zero(p, ue - pos):
            if j.digests != NULL and j.digest_zero:
                add_digest(j, pos, zero_unit_digest(pos, ue - pos))
            if zend != pos:
                if zend > zstart and target_zero(w, zstart, zend - zstart) < 0:
                    return -1
                zstart = pos
            zend = ue
        else:
            if j.digests != NULL:
                add_digest(j, pos, data_unit_digest(p, pos, ue - pos))
            if not (compress and ue - pos == cs and compress_cluster(w, p, pos // cs, &packed)):
                w.clusters[n] = pos // cs
                w.iov[n].iov_base = <void *>p
                w.iov[n].iov_len = ue - pos
                n += 1
        pos = ue
    if zend > zstart and target_zero(w, zstart, zend - zstart) < 0:
        return -1
    if compress and w.cclusters[0]:
        host = s.alloc_compressed(s.ctx, w.cclusters + 1, w.coffsets + 1, w.clengths + 1,
                                  w.cclusters[0], packed)
        if host < 0:
            fail(j, errno, OP_ALLOC, offset, NULL)
            return -1
        if write_fd(j, s.fd, w.cbuf, packed, <uint64_t>host) < 0:
            return -1
    if n:
        host = s.alloc(s.ctx, w.clusters, n)
        if host < 0:
            fail(j, errno, OP_ALLOC, offset, NULL)
            return -1
        if writev_fd(j, s.fd, w.iov, n, <uint64_t>host, offset) < 0:
            return -1
    return 0


cdef int process_runs(Worker *w, const char *buf, uint64_t offset, uint64_t length,
                      bint detect_zero) noexcept nogil:
    """Write one request that has been read into `buf` as runs of data and
    of zero clusters (every target but a sink)."""
    cdef Job *j = w.job
    cdef uint64_t cs = j.cluster
    cdef uint64_t pos = offset, end = offset + length, ue, run_start = offset
    cdef int run_zero = -1, z
    if not detect_zero:
        if j.digests != NULL:
            add_digest(j, offset, data_unit_digest(buf, offset, length))
        return j.tgt.write(w, buf, offset, length)
    while pos < end:
        ue = pos - pos % cs + cs
        if ue > end:
            ue = end
        z = is_zero(buf + (pos - offset), ue - pos)
        if j.digests != NULL and (not z or j.digest_zero):
            add_digest(j, pos, zero_unit_digest(pos, ue - pos) if z
                       else data_unit_digest(buf + (pos - offset), pos, ue - pos))
        if z != run_zero:
            if run_zero == 1 and target_zero(w, run_start, pos - run_start) < 0:
                return -1
            if run_zero == 0 and j.tgt.write(w, buf + (run_start - offset), run_start,
                                             pos - run_start) < 0:
                return -1
            run_zero = z
            run_start = pos
        pos = ue
    if run_zero == 1:
        return target_zero(w, run_start, end - run_start)
    if run_zero == 0:
        return j.tgt.write(w, buf + (run_start - offset), run_start, end - run_start)
    return 0


# ----------------------------------------------------------------------------
# Source discard

cdef void discard_source(Worker *w, uint64_t offset, uint64_t length) noexcept nogil:
    """Give the copied range back to the source (fleecing images stay small).
    Any refusal is remembered once and discarding stops; it is never fatal."""
    cdef Job *j = w.job
    cdef int err
    if not atomic_load_int(&j.discard, __ATOMIC_RELAXED):
        return
    err = j.src.discard(w, offset, length)
    if err:
        j.discard_errno = err
        atomic_store_int(&j.discard, 0, __ATOMIC_RELAXED)
        return
    account(&j.discarded_bytes, length)


# ----------------------------------------------------------------------------
# Workers

cdef int compressed_request(Worker *w, uint64_t *row, uint64_t flags) noexcept nogil:
    """Read one compressed cluster of a layer (the chain reader checked the
    descriptor: its bytes lie inside the file), decompress it, then hash and
    write the part of it the row covers.  A compressing sink of the same
    cluster size gets a whole zstd cluster's stream as it is (copy_stream).
    The bandwidth limit counts the compressed bytes: those are what is read."""
    cdef Job *j = w.job
    cdef uint64_t off = row[0], length = row[1], entry = row[4], layer = row[3]
    cdef int bits
    cdef uint64_t cs, x, start, end, skip
    cdef size_t used = 0
    if <int>layer >= j.n_layers or j.layer_bits == NULL:
        fail(j, EINVAL, OP_READ_LAYER, off, b"compressed request without its layer's format")
        return -1
    bits = j.layer_bits[layer]
    cs = <uint64_t>1 << bits
    x = 62 - (bits - 8)
    start = entry & ((<uint64_t>1 << x) - 1)
    end = ((start & ~(<uint64_t>511))
           + (((entry >> x) & ((<uint64_t>1 << (bits - 8)) - 1)) + 1) * 512)
    skip = off & (cs - 1)
    if skip + length > cs:
        fail(j, EINVAL, OP_READ_LAYER, off, b"compressed request crosses its cluster")
        return -1
    throttle(j, end - start)
    # QEMU reads the missing tail of the file's last sector as zeros
    if read_fd(j, j.layer_fds[layer], w.zbuf, end - start, start, False, True,
               OP_READ_LAYER) < 0:
        return -1
    if cancelled(j):
        return -1
    if decompress_cluster(j.layer_ctype[layer], w.zbuf, end - start, w.dbuf, cs,
                          w.dctx, w.zs, &used) < 0:
        pthread_mutex_lock(&j.err_lock)
        if not j.err_set:
            j.err_layer = layer
            j.err_host = start
        pthread_mutex_unlock(&j.err_lock)
        fail(j, EIO, OP_DECOMPRESS, off - skip,
             b"the stream does not decompress to exactly one cluster (corrupt)")
        return -1
    if flags & ROW_HASH:
        hash_layer_units(j, layer, w.dbuf + skip, off, length)
    if flags & ROW_NOWRITE:
        return 0
    if (w.cctx != NULL and j.layer_ctype[layer] == CTYPE_ZSTD and cs == j.sink.cluster_size
            and skip == 0 and (length == cs or off + length == j.sink.virtual_size)
            and used <= cs - 512 and not is_zero(w.dbuf, length)):
        return copy_stream(w, off, length, used)
    return j.tgt.process(w, w.dbuf + skip, off, length, True)


cdef int copy_stream(Worker *w, uint64_t off, uint64_t length, uint64_t used) noexcept nogil:
    """Give a compressing sink the zstd stream just read into w.zbuf (`used`
    bytes, for the whole guest cluster at `off`) as it is: a merge keeps its
    layers' compressed clusters without compressing them again.  The stream
    was decompressed first all the same: it is checked, hashed like any
    other data cluster, and one that reads as zero stays a zero cluster."""
    cdef Job *j = w.job
    cdef sink_ops *s = j.sink
    cdef uint64_t cs = s.cluster_size, g = off // cs, at = 0, total = used
    # the same minimum length as compress_cluster's streams (16-bit refcounts)
    cdef uint64_t room = cs // 65535 + 1
    cdef int64_t host
    if used < room:
        memset(w.zbuf + used, 0, room - used)
        total = room
    if j.digests != NULL:
        add_digest(j, off, data_unit_digest(w.dbuf, off, length))
    host = s.alloc_compressed(s.ctx, &g, &at, &used, 1, total)
    if host < 0:
        fail(j, errno, OP_ALLOC, off, NULL)
        return -1
    return write_fd(j, s.fd, w.zbuf, total, <uint64_t>host)


cdef int one_request(Worker *w, uint64_t *row) noexcept nogil:
    """Do one request synchronously (file sources and chain layers)."""
    cdef Job *j = w.job
    cdef uint64_t off = row[0], length = row[1], src = row[4]
    cdef uint64_t kind = row[2] & ROW_KIND_MASK, flags = row[2] & ~(<uint64_t>ROW_KIND_MASK)
    cdef int fd, rc
    if kind == ROW_ZERO:
        if j.digests != NULL and j.digest_zero:
            add_zero_digests(j, off, length)
        return target_zero(w, off, length)
    if kind == ROW_COMPRESSED:
        return compressed_request(w, row, flags)
    throttle(j, length)
    if kind == ROW_DATA:
        if <int>row[3] >= j.n_layers:
            fail(j, EINVAL, OP_READ_LAYER, off, b"request names a layer that does not exist")
            return -1
        fd = j.layer_fds[row[3]]
        if flags == 0 and j.tgt.copy_range != NULL and j.cfr_ok:
            rc = j.tgt.copy_range(w, fd, &src, &off, &length)
            if rc <= 0:
                return rc
        return read_and_process(w, fd, off, src, length, False, True, OP_READ_LAYER,
                                row[3], flags)
    if read_and_process(w, j.src_fd, off, src, row[1], j.src_direct, False, OP_READ, 0, 0) < 0:
        return -1
    discard_source(w, off, row[1])
    return 0


cdef int read_and_process(Worker *w, int fd, uint64_t off, uint64_t src, uint64_t length,
                          bint direct, bint eof_is_zero, int op, uint64_t layer,
                          uint64_t flags) noexcept nogil:
    """Read and write a request slice by slice, so that each slice is still in
    the CPU cache when it is checked for zeros, hashed and written.  Slices
    are multiples of every checked layer's cluster size, so that a REQ_HASH
    row's clusters are hashed whole."""
    cdef Job *j = w.job
    cdef uint64_t piece
    while length:
        piece = length if length <= j.slice else j.slice
        if read_fd(j, fd, w.buf, piece, src, direct, eof_is_zero, op) < 0:
            return -1
        if cancelled(j):    # the read may have returned long after run() gave up
            return -1
        if flags & ROW_HASH:
            hash_layer_units(j, layer, w.buf, off, piece)
        if not (flags & ROW_NOWRITE) and j.tgt.process(w, w.buf, off, piece, True) < 0:
            return -1
        off += piece
        src += piece
        length -= piece
    return 0


cdef void sync_worker(Worker *w) noexcept nogil:
    cdef Job *j = w.job
    cdef uint64_t i
    cdef uint64_t *row
    while not cancelled(j):
        i = atomic_add_u64(&j.next_req, 1, __ATOMIC_RELAXED)
        if i >= j.n_req:
            break
        row = j.req + 5 * i
        if one_request(w, row) < 0:
            break
        account(&j.done_bytes, row[1])


cdef void nbd_worker(Worker *w) noexcept nogil:
    """Reads from one libnbd connection with up to `depth` requests in
    flight; completed reads are written while the next ones travel."""
    cdef Job *j = w.job
    cdef int64_t cookie[MAX_DEPTH]
    cdef uint64_t *rows[MAX_DEPTH]
    cdef int busy[MAX_DEPTH]
    cdef int k, inflight = 0, r, exhausted = 0, failed = 0, poll_failed
    cdef uint64_t i, poll_off = 0
    cdef uint64_t *row
    cdef char *buf
    for k in range(j.depth):
        busy[k] = 0
    while True:
        # keep the pipeline full
        while not exhausted and inflight < j.depth and not cancelled(j):
            i = atomic_add_u64(&j.next_req, 1, __ATOMIC_RELAXED)
            if i >= j.n_req:
                exhausted = 1
                break
            row = j.req + 5 * i
            if row[2] == ROW_ZERO:
                if target_zero(w, row[0], row[1]) < 0:
                    break
                account(&j.done_bytes, row[1])
                continue
            throttle(j, row[1])
            for k in range(j.depth):
                if not busy[k]:
                    break
            buf = w.buf + <uint64_t>k * w.slot_size
            cookie[k] = nbd_aio_pread(w.src_h, buf, row[1], row[4], NBD_NULL_COMPLETION, 0)
            if cookie[k] < 0:
                fail_nbd_on(j, w.src_h, OP_READ, row[4])
                break
            rows[k] = row
            busy[k] = 1
            inflight += 1
        if inflight == 0:
            break
        if cancelled(j) and now_ns() - j.cancel_ns > CANCEL_GRACE_NS:
            w.leak = 1          # the server does not answer: keep the buffers
            break
        r = nbd_poll(w.src_h, 1000)
        poll_failed = r < 0 and not failed
        if poll_failed:
            # recorded after the completions: when the server is gone, the
            # commands in flight carry the real error (ENOTCONN), the poll
            # only "nothing to poll for in state DEAD" (EINVAL)
            poll_off = rows[0][4] if busy[0] else 0
            failed = 1
        for k in range(j.depth):
            if not busy[k]:
                continue
            r = nbd_aio_command_completed(w.src_h, cookie[k])
            if r == 0:
                continue
            busy[k] = 0
            inflight -= 1
            if r < 0:
                fail_nbd(j, OP_READ, rows[k][4])
                continue
            if cancelled(j):
                continue
            account(&j.read_bytes, rows[k][1])
            buf = w.buf + <uint64_t>k * w.slot_size
            if j.tgt.process(w, buf, rows[k][0], rows[k][1], True) < 0:
                continue
            discard_source(w, rows[k][4], rows[k][1])
            account(&j.done_bytes, rows[k][1])
        if poll_failed:
            fail_nbd_on(j, w.src_h, OP_READ, poll_off)
        if failed and inflight:
            # a dead connection fails everything in flight; do not spin
            if nbd_aio_in_flight(w.src_h) <= 0:
                for k in range(j.depth):
                    busy[k] = 0
                inflight = 0


cdef void *worker_main(void *arg) noexcept nogil:
    cdef Worker *w = <Worker *>arg
    w.job.src.run(w)
    return NULL


# ----------------------------------------------------------------------------
# Python face

cdef class CopyJob:
    """One copy, configured from plain values (see dirbackup.copy for the
    typed interface).  run() blocks the calling thread, not the GIL."""

    cdef Job job
    cdef Worker *workers
    cdef int n_workers
    cdef object _requests
    cdef uint64_t _total         # bytes the requests cover (read by every progress snapshot)
    cdef object _keep            # Python objects whose C resources the job uses
    cdef object _layer_array
    cdef object _digests
    cdef object _lsums
    cdef object _lmeta
    cdef object _layer_formats
    cdef object _layer_bits
    cdef object _layer_ctype
    cdef tuple _layer_names
    cdef char *_zeros
    cdef readonly str source_name
    cdef readonly str target_name
    cdef readonly bint ran

    def __cinit__(self):
        memset(&self.job, 0, sizeof(Job))
        pthread_mutex_init(&self.job.err_lock, NULL)
        pthread_mutex_init(&self.job.write_lock, NULL)
        self.workers = NULL
        self._zeros = NULL

    def __init__(self, requests, *, int workers=1, int src_fd=-1, bint src_direct=False,
                 bint src_blockdev=False, src_handles=(), layer_fds=(),
                 int target_kind=TGT_NULL, int tgt_fd=-1, bint tgt_blockdev=False,
                 tgt_handles=(), sink=None, bint tgt_fresh=True,
                 uint64_t cluster_size=65536, uint64_t request_size=4 << 20,
                 uint64_t slice_size=1 << 20, int depth=4,
                 bint discard=False, uint64_t bandwidth_limit=0, uint64_t digest_chunk=0,
                 bint serialize_writes=False,
                 uint64_t digest_size=0, bint digest_zero=False, layer_checks=(),
                 layer_formats=(), layer_names=(),
                 str source_name="source", str target_name="target"):
        cdef uint64_t[:, ::1] rows
        cdef int i, k
        cdef void *mem
        cdef uint64_t nbd_slot
        cdef Worker *w
        self._requests = np.ascontiguousarray(requests, dtype=np.uint64)
        if self._requests.ndim != 2 or self._requests.shape[1] != 5:
            raise ValueError("requests must have shape (N, 5)")
        rows = self._requests
        self._total = int(self._requests[:, 1].sum()) if self._requests.shape[0] else 0
        if cluster_size == 0 or cluster_size & (cluster_size - 1):
            raise ValueError("cluster_size must be a power of two")
        if request_size < cluster_size or request_size % ALIGN:
            raise ValueError("request_size must be a multiple of 4096 and >= cluster_size")
        if depth < 1 or depth > MAX_DEPTH:
            raise ValueError(f"depth must be between 1 and {MAX_DEPTH}")
        if workers < 1:
            raise ValueError("workers must be at least 1")
        self.source_name = source_name
        self.target_name = target_name
        self._keep = [src_handles, tgt_handles, sink]
        cdef Job *j = &self.job
        j.req = &rows[0, 0] if rows.shape[0] else NULL
        j.n_req = rows.shape[0]
        for i in range(rows.shape[0]):
            if rows[i, 1] > request_size:
                raise ValueError(f"request {i} is longer than request_size")
            if ((rows[i, 2] & ROW_KIND_MASK) > ROW_COMPRESSED
                    or (rows[i, 2] & ROW_KIND_MASK) == ROW_UNALLOCATED) or (
                    rows[i, 2] & ~(<uint64_t>(ROW_KIND_MASK | ROW_HASH | ROW_NOWRITE))):
                raise ValueError(f"request {i} has unknown kind {rows[i, 2]}")
        j.src_fd = src_fd
        j.src_direct = src_direct
        j.src_nbd = len(src_handles) > 0
        self._layer_array = np.ascontiguousarray(layer_fds, dtype=np.intc)
        cdef int[::1] lview = self._layer_array
        j.layer_fds = &lview[0] if lview.shape[0] else NULL
        j.n_layers = lview.shape[0]
        self._layer_names = tuple(layer_names)
        cdef uint64_t max_layer_cs = 0
        cdef bint compressed_rows = False
        for i in range(rows.shape[0]):
            if (rows[i, 2] & ROW_KIND_MASK) == ROW_COMPRESSED:
                compressed_rows = True
                if rows[i, 3] >= <uint64_t>j.n_layers:
                    raise ValueError(f"request {i} names a layer that does not exist")
        if compressed_rows and len(layer_formats) != j.n_layers:
            raise ValueError("compressed requests need layer_formats, one per layer file")
        if len(layer_formats):
            self._layer_formats = np.ascontiguousarray(layer_formats, dtype=np.intc).reshape(-1, 2)
            if self._layer_formats.shape[0] != j.n_layers:
                raise ValueError("layer_formats needs one entry per layer file")
            for bits, ctype in layer_formats:
                if not 9 <= bits <= 21 or ctype not in (0, 1):
                    raise ValueError(f"invalid layer format {(bits, ctype)}")
                max_layer_cs = max(max_layer_cs, <uint64_t>1 << bits)
            self._layer_bits = np.ascontiguousarray(self._layer_formats[:, 0])
            self._layer_ctype = np.ascontiguousarray(self._layer_formats[:, 1])
            lview = self._layer_bits
            j.layer_bits = &lview[0]
            lview = self._layer_ctype
            j.layer_ctype = &lview[0]
        j.tgt_fd = tgt_fd
        j.tgt_blockdev = tgt_blockdev
        j.cfr_ok = 1
        j.serialize_writes = serialize_writes
        if target_kind == TGT_SINK:
            if sink is None:
                raise ValueError("a sink target needs the sink capsule")
            j.sink = <sink_ops *>PyCapsule_GetPointer(sink, "dirbackup.sink")
            if cluster_size != j.sink.cluster_size:
                raise ValueError("cluster_size must be the sink's cluster size")
        elif target_kind == TGT_FD and tgt_fd < 0:
            raise ValueError("a file target needs a file descriptor")
        elif target_kind == TGT_NBD and len(tgt_handles) == 0:
            raise ValueError("an NBD target needs handles")
        cdef uint64_t max_unit = self._bind_layer_checks(layer_checks, rows, digest_size)
        if j.src_nbd and len(src_handles) < workers:
            workers = len(src_handles)
        if target_kind == TGT_NBD and len(tgt_handles) < workers:
            workers = len(tgt_handles)
        j.cluster = cluster_size
        j.bufsize = request_size
        # slices: a multiple of the cluster and of the O_DIRECT alignment
        j.slice = max(slice_size, cluster_size, <uint64_t>ALIGN)
        j.slice = (j.slice + cluster_size - 1) // cluster_size * cluster_size
        if j.slice > request_size:
            j.slice = request_size
        if max_unit:
            # hashed rows are read in slices of whole clusters of their layer
            if request_size % max_unit:
                raise ValueError("request_size must be a multiple of every checked layer's "
                                 "cluster size")
            j.slice = (j.slice + max_unit - 1) // max_unit * max_unit
            if j.slice > request_size:
                j.slice = request_size
        j.depth = depth if j.src_nbd else 1
        # NBD slots only need to hold the longest request; when requests are
        # small (scattered dirty clusters), keep more of them in flight so that
        # about IN_FLIGHT bytes travel per connection
        cdef uint64_t longest = 0
        for i in range(rows.shape[0]):
            if rows[i, 2] != ROW_ZERO and rows[i, 1] > longest:
                longest = rows[i, 1]
        if j.src_nbd and longest:
            nbd_slot = (min(longest, request_size) + ALIGN - 1) // ALIGN * ALIGN
            j.depth = max(depth, min(<int>(IN_FLIGHT // nbd_slot), MAX_DEPTH))
        else:
            nbd_slot = request_size
        j.discard = discard
        j.bw_limit = bandwidth_limit
        j.bw_burst = request_size if bandwidth_limit > request_size else bandwidth_limit
        if digest_chunk:
            if digest_chunk % cluster_size:
                raise ValueError("digest_chunk must be a multiple of cluster_size")
            self._digests = np.zeros((digest_size + digest_chunk - 1) // digest_chunk,
                                     dtype=np.uint64)
            j.digest_chunk = digest_chunk
            j.n_digests = self._digests.shape[0]
            j.digest_zero = digest_zero
            self._bind_digests()
            for i in range(rows.shape[0]):
                if rows[i, 1] and (rows[i, 0] + rows[i, 1] - 1) // digest_chunk >= j.n_digests:
                    raise ValueError(f"request {i} lies beyond digest_size")
        self._zeros = <char *>calloc(ZERO_BUF, 1)
        if self._zeros == NULL:
            raise MemoryError()
        j.zeros = self._zeros

        self.workers = <Worker *>calloc(workers, sizeof(Worker))
        if self.workers == NULL:
            raise MemoryError()
        self.n_workers = workers
        cdef uint64_t max_units = request_size // cluster_size + 2
        for i in range(workers):
            w = &self.workers[i]
            w.job = j
            # NBD slots hold whole requests; file reads go slice by slice
            w.slot_size = (nbd_slot if j.src_nbd else j.slice) + ALIGN
            if posix_memalign(&mem, ALIGN, w.slot_size * j.depth) != 0:
                raise MemoryError()
            w.buf = <char *>mem
            w.max_units = max_units
            w.iov = <iovec *>calloc(max_units, sizeof(iovec))
            w.clusters = <uint64_t *>calloc(max_units, sizeof(uint64_t))
            if w.iov == NULL or w.clusters == NULL:
                raise MemoryError()
            if compressed_rows:
                w.dctx = ZSTD_createDCtx()
                w.zs = <z_stream *>calloc(1, sizeof(z_stream))
                w.zbuf = <char *>malloc(2 * max_layer_cs)
                w.dbuf = <char *>malloc(max_layer_cs)
                if w.dctx == NULL or w.zs == NULL or w.zbuf == NULL or w.dbuf == NULL:
                    raise MemoryError()
                if inflateInit2(w.zs, ZLIB_WINDOW_BITS) != 0:
                    free(w.zs)
                    w.zs = NULL
                    raise MemoryError()
            if target_kind == TGT_SINK and j.sink.compress_level and cluster_size > 512:
                w.cctx = ZSTD_createCCtx()
                w.cbuf = <char *>malloc(max_units * cluster_size)
                w.cclusters = <uint64_t *>calloc(max_units + 1, sizeof(uint64_t))
                w.coffsets = <uint64_t *>calloc(max_units + 1, sizeof(uint64_t))
                w.clengths = <uint64_t *>calloc(max_units + 1, sizeof(uint64_t))
                if (w.cctx == NULL or w.cbuf == NULL or w.cclusters == NULL
                        or w.coffsets == NULL or w.clengths == NULL):
                    raise MemoryError()
            if j.src_nbd:
                w.src_h = handle_of(src_handles[i])
            if target_kind == TGT_NBD:
                w.tgt_h = handle_of(tgt_handles[i])
        if j.src_nbd and discard:
            for k in range(len(src_handles)):
                if nbd_can_trim(handle_of(src_handles[k])) != 1:
                    j.discard = 0
                    j.discard_errno = EOPNOTSUPP
        self._bind_ops(target_kind, tgt_fresh, src_blockdev)

    cdef void _bind_ops(self, int target_kind, bint fresh, bint src_blockdev):
        """Choose the source's and the target's operations, once for the job."""
        cdef Job *j = &self.job
        cdef TargetOps *t = &j.tgt
        if j.src_nbd:
            j.src.run = nbd_worker
            j.src.discard = discard_nbd
        else:
            j.src.run = sync_worker
            j.src.discard = discard_blockdev if src_blockdev else discard_file
        t.process = process_runs
        t.write = write_nothing
        t.zero = zero_nothing
        t.copy_range = NULL
        if target_kind == TGT_FD:
            t.write = write_file
            t.copy_range = copy_range
            if not fresh:
                t.zero = zero_file
        elif target_kind == TGT_NBD:
            t.write = write_nbd
            if not fresh:
                t.zero = (zero_nbd if nbd_can_zero(self.workers[0].tgt_h) == 1
                          else zero_nbd_by_writing)
        elif target_kind == TGT_SINK:
            t.process = process_sink
            if j.sink.records_zero:
                t.zero = zero_sink

    cdef uint64_t _bind_layer_checks(self, layer_checks, uint64_t[:, ::1] rows,
                                     uint64_t size) except? 0:
        """Set up the per-layer sums of REQ_HASH rows and check those rows;
        return the largest checked cluster size (0: no checks)."""
        cdef Job *j = &self.job
        cdef Py_ssize_t i
        cdef uint64_t layer, unit, chunk, end, max_unit = 0, total = 0
        cdef uint64_t[:, ::1] meta
        cdef uint64_t[::1] sums
        layer_checks = list(layer_checks)
        for i in range(rows.shape[0]):
            if rows[i, 2] & ~(<uint64_t>ROW_KIND_MASK) and not layer_checks:
                raise ValueError(f"request {i} is hashed, but no layer is checked")
        if not layer_checks:
            return 0
        if len(layer_checks) != j.n_layers or j.src_nbd:
            raise ValueError("layer_checks needs one entry per layer file")
        self._lmeta = np.zeros((4, j.n_layers), dtype=np.uint64)
        meta = self._lmeta
        for i, spec in enumerate(layer_checks):
            if spec is None:
                continue
            unit, chunk, count = spec
            if unit == 0 or unit & (unit - 1) or chunk == 0 or chunk % unit:
                raise ValueError(f"layer {i}: the digest chunk must be a multiple of the "
                                 f"cluster size, a power of two")
            if count < (size + chunk - 1) // chunk:
                raise ValueError(f"layer {i}: {count} digest chunks do not cover {size} bytes")
            meta[0, i] = total
            meta[1, i] = chunk
            meta[2, i] = unit
            meta[3, i] = count
            total += count
            max_unit = max(max_unit, unit)
        self._lsums = np.zeros(max(total, 1), dtype=np.uint64)
        sums = self._lsums
        j.lsums = &sums[0]
        j.lfirst = &meta[0, 0]
        j.lchunk = &meta[1, 0]
        j.lunit = &meta[2, 0]
        for i in range(rows.shape[0]):
            if not rows[i, 2] & ~(<uint64_t>ROW_KIND_MASK) or rows[i, 1] == 0:
                continue
            layer = rows[i, 3]
            end = rows[i, 0] + rows[i, 1]
            if (((rows[i, 2] & ROW_KIND_MASK) != ROW_DATA
                 and (rows[i, 2] & ROW_KIND_MASK) != ROW_COMPRESSED) or not rows[i, 2] & ROW_HASH
                    or layer >= <uint64_t>j.n_layers or meta[2, layer] == 0):
                raise ValueError(f"request {i}: only data rows of a checked layer are hashed")
            if rows[i, 0] % meta[2, layer] or (end % meta[2, layer] and end != size):
                raise ValueError(f"request {i} does not cover whole clusters of layer {layer}")
            if end > size or (end - 1) // meta[1, layer] >= meta[3, layer]:
                raise ValueError(f"request {i} lies beyond the checked size")
        return max_unit

    @property
    def layer_sums(self):
        """Per layer: the per-chunk sums of its REQ_HASH rows (a copy), or None
        for a layer that is not checked; None without layer checks."""
        if self._lsums is None:
            return None
        meta = self._lmeta
        return [None if meta[2, i] == 0 else
                self._lsums[meta[0, i]:meta[0, i] + meta[3, i]].copy()
                for i in range(meta.shape[1])]

    cdef int _bind_digests(self) except -1:
        cdef uint64_t[::1] d = self._digests
        self.job.digests = &d[0] if d.shape[0] else NULL
        return 0

    def __dealloc__(self):
        cdef int i
        if self.workers != NULL:
            for i in range(self.n_workers):
                if self.workers[i].leak:
                    continue
                free(self.workers[i].buf)
                free(self.workers[i].iov)
                free(self.workers[i].clusters)
                if self.workers[i].cctx != NULL:
                    ZSTD_freeCCtx(self.workers[i].cctx)
                free(self.workers[i].cbuf)
                free(self.workers[i].cclusters)
                free(self.workers[i].coffsets)
                free(self.workers[i].clengths)
                if self.workers[i].dctx != NULL:
                    ZSTD_freeDCtx(self.workers[i].dctx)
                if self.workers[i].zs != NULL:
                    inflateEnd(self.workers[i].zs)
                    free(self.workers[i].zs)
                free(self.workers[i].zbuf)
                free(self.workers[i].dbuf)
            free(self.workers)
        free(self._zeros)
        pthread_mutex_destroy(&self.job.err_lock)
        pthread_mutex_destroy(&self.job.write_lock)

    # -- control and progress, safe to call from any thread while run() runs

    def cancel(self):
        """Ask the workers to stop; run() then raises Cancelled."""
        set_cancel(&self.job)

    @property
    def total_bytes(self):
        """Bytes the requests cover."""
        return self._total

    @property
    def done_bytes(self):
        return atomic_load_u64(&self.job.done_bytes, __ATOMIC_RELAXED)

    @property
    def read_bytes(self):
        return atomic_load_u64(&self.job.read_bytes, __ATOMIC_RELAXED)

    @property
    def written_bytes(self):
        return atomic_load_u64(&self.job.written_bytes, __ATOMIC_RELAXED)

    @property
    def zero_bytes(self):
        return atomic_load_u64(&self.job.zero_bytes, __ATOMIC_RELAXED)

    @property
    def discarded_bytes(self):
        return atomic_load_u64(&self.job.discarded_bytes, __ATOMIC_RELAXED)

    @property
    def discard_errno(self):
        """errno of the refusal that stopped source discards, or 0."""
        return self.job.discard_errno

    @property
    def workers_used(self):
        return self.n_workers

    @property
    def digests(self):
        """Per-chunk digest sums (a copy), or None without digests."""
        return None if self._digests is None else self._digests.copy()

    def run(self, progress=None, double interval=0.5, cancel_event=None):
        """Copy everything.  Calls progress(job) about every `interval`
        seconds from this thread; a set `cancel_event` or Ctrl-C stops the
        workers within a second.  Raises the first worker error as OSError."""
        if self.ran:
            raise RuntimeError("a CopyJob runs once")
        self.ran = True
        cdef Job *j = &self.job
        cdef int i, rc = 0, started = 0
        cdef timespec deadline
        cdef int64_t last = now_ns(), step = <int64_t>(min(interval, 0.2) * 1e9)
        cdef int64_t tick = <int64_t>(interval * 1e9)
        interrupt = None
        j.t0_ns = now_ns()
        try:
            for i in range(self.n_workers):
                rc = pthread_create(&self.workers[i].tid, NULL, worker_main, &self.workers[i])
                if rc != 0:
                    fail(j, rc, OP_READ, 0, b"cannot start a worker thread")
                    break
                self.workers[i].started = 1
                started += 1
            i = 0
            while i < started:
                with nogil:
                    clock_gettime(CLOCK_REALTIME, &deadline)
                    deadline.tv_nsec += step
                    if deadline.tv_nsec >= 1000000000:
                        deadline.tv_sec += deadline.tv_nsec // 1000000000
                        deadline.tv_nsec %= 1000000000
                    rc = pthread_timedjoin_np(self.workers[i].tid, NULL, &deadline)
                if rc == 0:
                    self.workers[i].started = 0
                    i += 1
                    continue
                if cancelled(j) and now_ns() - j.cancel_ns > ABANDON_NS:
                    self._abandon()
                    break
                try:
                    PyErr_CheckSignals()
                except KeyboardInterrupt as exc:
                    # stop the workers, wait for them below, then re-raise
                    interrupt = exc
                    set_cancel(j)
                if cancel_event is not None and cancel_event.is_set():
                    set_cancel(j)
                if progress is not None and now_ns() - last >= tick:
                    last = now_ns()
                    progress(self)
        except BaseException:
            set_cancel(j)
            raise
        finally:
            # never leave a worker running, whatever happened above
            for i in range(self.n_workers):
                if self.workers[i].started:
                    with nogil:
                        pthread_join(self.workers[i].tid, NULL)
                    self.workers[i].started = 0
        if interrupt is not None:
            raise interrupt
        if j.err_set:
            raise self._error()
        if cancelled(j):
            raise Cancelled("copy cancelled")
        if progress is not None:
            progress(self)

    cdef void _abandon(self):
        """Give up on workers still running long after a cancel: each is stuck
        in a read that does not return (a FUSE file whose server stopped
        answering; only killing that server ends the read).  They are
        detached, and the job and its buffers are never freed, since such a
        worker still owns them when its read returns; it then sees the cancel
        and ends without touching the target."""
        cdef int i
        Py_INCREF(self)
        for i in range(self.n_workers):
            if self.workers[i].started:
                pthread_detach(self.workers[i].tid)
                self.workers[i].started = 0
                self.workers[i].leak = 1

    cdef object _error(self):
        cdef Job *j = &self.job
        op = OPERATIONS.get(j.err_op, "copying")
        target_side = j.err_op in (OP_WRITE, OP_ZERO, OP_ALLOC)
        name = self.target_name if target_side else self.source_name
        err = j.err if j.err else EIO
        if j.err_op == OP_DECOMPRESS:
            layer = (self._layer_names[j.err_layer] if j.err_layer < len(self._layer_names)
                     else f"layer {j.err_layer}")
            return ImageError(f"{layer}: compressed cluster for guest offset {j.err_offset} at "
                              f"host offset {j.err_host}: "
                              f"{j.err_msg.decode('utf-8', 'replace')}")
        detail = j.err_msg.decode("utf-8", "replace") if j.err_msg[0] else None
        if detail is None:
            import os
            detail = os.strerror(err)
        return OSError(err, f"{op} {name} at offset {j.err_offset}: {detail}", name)
