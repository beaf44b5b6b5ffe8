# Included (not cimported) by _extents.pyx and _maptext.pyx, which both build
# their results in it: a growable C array of (offset, length, flags) triples,
# handed to numpy without a copy.  The including module cimports uint64_t,
# free, realloc and memset, and imports numpy as np.  (An include, because a
# cdef class cannot be shared through a .pxd without a module of its own.)

cdef struct ExtBuf:
    uint64_t *rows
    size_t n
    size_t cap
    # block status collection state
    const char *context
    uint64_t pos          # next expected offset
    uint64_t end          # end of the current request
    int bad               # protocol violation seen
    uint64_t bad_offset


cdef inline void buf_init(ExtBuf *b) noexcept nogil:
    memset(b, 0, sizeof(ExtBuf))


cdef int buf_append(ExtBuf *b, uint64_t off, uint64_t length, uint64_t flags) noexcept nogil:
    """Append a row as it is."""
    cdef uint64_t *grown
    cdef uint64_t *row
    cdef size_t cap
    if b.n == b.cap:
        cap = b.cap * 2 if b.cap else 1024
        grown = <uint64_t *>realloc(b.rows, cap * 3 * sizeof(uint64_t))
        if grown == NULL:
            return -1
        b.rows = grown
        b.cap = cap
    row = b.rows + 3 * b.n
    row[0] = off
    row[1] = length
    row[2] = flags
    b.n += 1
    return 0


cdef int buf_reserve(ExtBuf *b, size_t more) noexcept nogil:
    """Make room for `more` rows."""
    cdef uint64_t *grown
    if b.n + more <= b.cap:
        return 0
    grown = <uint64_t *>realloc(b.rows, (b.n + more) * 3 * sizeof(uint64_t))
    if grown == NULL:
        return -1
    b.rows = grown
    b.cap = b.n + more
    return 0


cdef int buf_push(ExtBuf *b, uint64_t off, uint64_t length, uint64_t flags) noexcept nogil:
    """Append a row, merging it into the previous one when contiguous with equal flags."""
    cdef uint64_t *last
    if b.n:
        last = b.rows + 3 * (b.n - 1)
        if last[2] == flags and last[0] + last[1] == off:
            last[1] += length
            return 0
    return buf_append(b, off, length, flags)


cdef class RowBuffer:
    """Owns a malloc'ed block of rows and lends it to numpy without a copy."""

    cdef uint64_t *rows
    cdef Py_ssize_t n
    cdef Py_ssize_t shape[2]
    cdef Py_ssize_t strides[2]

    def __dealloc__(self):
        free(self.rows)

    def __getbuffer__(self, Py_buffer *view, int flags):
        self.shape[0] = self.n
        self.shape[1] = 3
        self.strides[0] = 3 * sizeof(uint64_t)
        self.strides[1] = sizeof(uint64_t)
        view.buf = self.rows
        view.obj = self
        view.len = self.n * 3 * sizeof(uint64_t)
        view.readonly = 0
        view.itemsize = sizeof(uint64_t)
        view.format = "Q"
        view.ndim = 2
        view.shape = self.shape
        view.strides = self.strides
        view.suboffsets = NULL
        view.internal = NULL

    def __releasebuffer__(self, Py_buffer *view):
        pass


cdef object buf_to_array(ExtBuf *b):
    """Hand the rows of `b` to a numpy array (b is left empty)."""
    cdef RowBuffer owner
    cdef uint64_t *shrunk
    if b.n == 0:
        return np.empty((0, 3), dtype=np.uint64)
    shrunk = <uint64_t *>realloc(b.rows, b.n * 3 * sizeof(uint64_t))
    owner = RowBuffer.__new__(RowBuffer)
    owner.rows = shrunk if shrunk != NULL else b.rows
    owner.n = b.n
    b.rows = NULL
    b.n = 0
    b.cap = 0
    return np.asarray(owner)
