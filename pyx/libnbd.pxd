# C declarations of the part of libnbd's API that the core calls.
# Declarations only: no code lives here (see _extents.pyx and _copy.pyx).
from libc.stdint cimport int64_t, uint32_t, uint64_t


cdef extern from "libnbd.h" nogil:
    # The header declares a struct, not a typedef.
    cdef struct nbd_handle:
        pass

    ctypedef struct nbd_completion_callback:
        int (*callback)(void *user_data, int *error) noexcept nogil
        void *user_data
        void (*free)(void *user_data) noexcept nogil

    ctypedef struct nbd_extent_callback:
        int (*callback)(void *user_data, const char *metacontext,
                        uint64_t offset, uint32_t *entries, size_t nr_entries,
                        int *error) noexcept nogil
        void *user_data
        void (*free)(void *user_data) noexcept nogil

    nbd_completion_callback NBD_NULL_COMPLETION

    enum:
        LIBNBD_CMD_FLAG_FUA
        LIBNBD_CMD_FLAG_NO_HOLE
        LIBNBD_CMD_FLAG_DF
        LIBNBD_CMD_FLAG_REQ_ONE
        LIBNBD_CMD_FLAG_FAST_ZERO

    const char *nbd_get_error()
    int nbd_get_errno()

    int64_t nbd_get_size(nbd_handle *h)
    int nbd_can_trim(nbd_handle *h)
    int nbd_can_zero(nbd_handle *h)
    int nbd_can_multi_conn(nbd_handle *h)
    int nbd_can_meta_context(nbd_handle *h, const char *metacontext)
    int nbd_is_read_only(nbd_handle *h)

    int nbd_pread(nbd_handle *h, void *buf, size_t count, uint64_t offset, uint32_t flags)
    int nbd_pwrite(nbd_handle *h, const void *buf, size_t count, uint64_t offset,
                   uint32_t flags)
    int nbd_trim(nbd_handle *h, uint64_t count, uint64_t offset, uint32_t flags)
    int nbd_zero(nbd_handle *h, uint64_t count, uint64_t offset, uint32_t flags)
    int nbd_flush(nbd_handle *h, uint32_t flags)
    int nbd_block_status(nbd_handle *h, uint64_t count, uint64_t offset,
                         nbd_extent_callback extent_callback, uint32_t flags)

    int64_t nbd_aio_pread(nbd_handle *h, void *buf, size_t count, uint64_t offset,
                          nbd_completion_callback completion_callback, uint32_t flags)
    int64_t nbd_aio_pwrite(nbd_handle *h, const void *buf, size_t count, uint64_t offset,
                           nbd_completion_callback completion_callback, uint32_t flags)
    int64_t nbd_aio_trim(nbd_handle *h, uint64_t count, uint64_t offset,
                         nbd_completion_callback completion_callback, uint32_t flags)
    int nbd_poll(nbd_handle *h, int timeout)
    int nbd_aio_command_completed(nbd_handle *h, uint64_t cookie)
    int nbd_aio_in_flight(nbd_handle *h)
    int nbd_aio_is_dead(nbd_handle *h)
