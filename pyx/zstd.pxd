# C declarations of the parts of libzstd (zstd.h) the kernels call: one
# compression context per copy worker, one-shot compression of a cluster, and
# streaming decompression (a qcow2 compressed cluster may be followed by
# unrelated bytes up to its last 512-byte sector).  Declarations only.

cdef extern from "<zstd.h>" nogil:
    ctypedef struct ZSTD_CCtx:
        pass
    ctypedef struct ZSTD_DCtx:
        pass
    ctypedef struct ZSTD_inBuffer:
        const void *src
        size_t size
        size_t pos
    ctypedef struct ZSTD_outBuffer:
        void *dst
        size_t size
        size_t pos
    ctypedef enum ZSTD_ResetDirective:
        ZSTD_reset_session_only
    ZSTD_CCtx *ZSTD_createCCtx()
    size_t ZSTD_freeCCtx(ZSTD_CCtx *cctx)
    size_t ZSTD_compressCCtx(ZSTD_CCtx *cctx, void *dst, size_t dst_capacity,
                             const void *src, size_t src_size, int level)
    ZSTD_DCtx *ZSTD_createDCtx()
    size_t ZSTD_freeDCtx(ZSTD_DCtx *dctx)
    size_t ZSTD_DCtx_reset(ZSTD_DCtx *dctx, ZSTD_ResetDirective reset)
    size_t ZSTD_decompressStream(ZSTD_DCtx *dctx, ZSTD_outBuffer *output,
                                 ZSTD_inBuffer *input)
    unsigned ZSTD_isError(size_t code)
    int ZSTD_minCLevel()
    int ZSTD_maxCLevel()
