# The interface between the copy loop (_copy.pyx) and a target that keeps
# its own metadata, such as the qcow2 writer (_qcow2.pyx).  The copy loop does
# all data I/O on `fd`; the sink only decides where guest clusters go.
# Declarations only.
from libc.stdint cimport int64_t, uint64_t


cdef struct sink_ops:
    void *ctx
    # file the data clusters are written to, with pwrite/pwritev
    int fd
    # guest cluster size; requests given to a sink are aligned to it
    uint64_t cluster_size
    uint64_t virtual_size
    # non-zero when clusters reading as zero must be recorded (an image with a
    # backing file); zero when they are simply left out (self-contained image)
    int records_zero
    # Map the `n` guest clusters numbered in `clusters` to `n` new consecutive
    # host clusters; return the host offset of the first, or -1 with errno set.
    # Called by several threads at once.
    int64_t (*alloc)(void *ctx, const uint64_t *clusters, size_t n) noexcept nogil
    # Record guest bytes [offset, offset + length), cluster aligned, as zero.
    # Return 0, or -1 with errno set.
    int (*zero)(void *ctx, uint64_t offset, uint64_t length) noexcept nogil
    # zstd level the copy loop compresses whole data clusters with (0: none).
    # A cluster whose stream, in 512-byte sectors, would not be smaller than
    # the cluster is given to alloc() uncompressed.
    int compress_level
    # Place `n` compressed streams that the caller has packed into one buffer
    # of `total` bytes (stream k at byte `offsets[k]`, `lengths[k]` bytes, for
    # guest cluster `clusters[k]`); return the host offset to write the buffer
    # to, or -1 with errno set.  Called by several threads at once: with the
    # streams the copy loop compressed, and with one zstd stream read from a
    # layer of the same cluster size (a merge copies those as they are).
    int64_t (*alloc_compressed)(void *ctx, const uint64_t *clusters, const uint64_t *offsets,
                                const uint64_t *lengths, size_t n,
                                uint64_t total) noexcept nogil
