# Decompression of one qcow2 compressed cluster, shared by the copy loop's
# workers (_copy.pyx) and the digests of verify (_qcow2.pyx): zlib raw deflate
# (QEMU's default, compression_type 0) and zstd (compression_type 1).  The
# declarations of zlib, and one inline nogil function.
from zstd cimport (ZSTD_DCtx, ZSTD_DCtx_reset, ZSTD_decompressStream, ZSTD_inBuffer,
                   ZSTD_isError, ZSTD_outBuffer, ZSTD_reset_session_only)


cdef extern from "<zlib.h>" nogil:
    ctypedef struct z_stream:
        const unsigned char *next_in
        unsigned int avail_in
        unsigned char *next_out
        unsigned int avail_out
        void *zalloc
        void *zfree
        void *opaque
    enum:
        Z_OK
        Z_STREAM_END
        Z_FINISH
    int inflateInit2(z_stream *strm, int window_bits)
    int inflateReset(z_stream *strm)
    int inflateEnd(z_stream *strm)
    int inflate_ "inflate"(z_stream *strm, int flush)


cdef enum:
    CTYPE_ZLIB = 0
    CTYPE_ZSTD = 1
    # QEMU's raw deflate: no zlib header, 4 KiB window
    ZLIB_WINDOW_BITS = -12


cdef inline int decompress_cluster(int ctype, const char *src, size_t n, char *dst,
                                   size_t cs, ZSTD_DCtx *dctx, z_stream *zs,
                                   size_t *used) noexcept nogil:
    """Decompress the stream at `src` (`n` bytes, possibly followed by
    unrelated bytes up to its last sector) into exactly `cs` bytes at `dst`.
    0 on success; -1 when it is corrupt or does not make exactly one cluster.
    `used` (may be NULL) gets the stream's own length: where its zstd frame
    ends, so that a merge can copy the stream as it is."""
    cdef ZSTD_inBuffer inb
    cdef ZSTD_outBuffer outb
    cdef size_t r = 1, last_in, last_out
    cdef int zr
    if ctype == CTYPE_ZSTD:
        if ZSTD_isError(ZSTD_DCtx_reset(dctx, ZSTD_reset_session_only)):
            return -1
        inb.src = src
        inb.size = n
        inb.pos = 0
        outb.dst = dst
        outb.size = cs
        outb.pos = 0
        while True:
            last_in = inb.pos
            last_out = outb.pos
            r = ZSTD_decompressStream(dctx, &outb, &inb)
            if ZSTD_isError(r):
                return -1
            if r == 0 or (inb.pos == last_in and outb.pos == last_out):
                break
        # the frame ended (r == 0) exactly at the end of the cluster
        if used != NULL:
            used[0] = inb.pos
        return 0 if r == 0 and outb.pos == cs else -1
    if ctype == CTYPE_ZLIB:
        if inflateReset(zs) != Z_OK:
            return -1
        zs.next_in = <const unsigned char *>src
        zs.avail_in = <unsigned int>n
        zs.next_out = <unsigned char *>dst
        zs.avail_out = <unsigned int>cs
        zr = inflate_(zs, Z_FINISH)
        if used != NULL:
            used[0] = n - zs.avail_in
        return 0 if zr == Z_STREAM_END and zs.avail_out == 0 else -1
    return -1
