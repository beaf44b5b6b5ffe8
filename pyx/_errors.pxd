# Error-checking helpers shared by the kernels: each blocking C call runs in a
# tiny `with nogil:` block that captures its return code and errno (and, for
# libnbd, the thread-local message), then one of these turns the failure into
# the matching OSError subclass (ENOENT -> FileNotFoundError, ...).
from libc.errno cimport EIO
from libc.string cimport strerror


cdef inline object os_error(int err, str what, object path=None):
    """Build the OSError subclass for `err`, naming the operation and path."""
    if err == 0:
        err = EIO
    reason = strerror(err).decode("utf-8", "replace")
    text = f"{what}: {reason}" if path is None else f"{what} {path}: {reason}"
    return OSError(err, text, path)


cdef inline int check_errno(long rc, int err, str what, object path=None) except -1:
    """Raise the OSError for `err` when a libc call returned a negative `rc`."""
    if rc < 0:
        raise os_error(err, what, path)
    return 0


cdef inline int check_nbd(long rc, int err, const char *msg, str what,
                          object uri=None) except -1:
    """Raise for a failed libnbd call, keeping libnbd's own message."""
    if rc >= 0:
        return 0
    if err == 0:
        err = EIO
    detail = msg.decode("utf-8", "replace") if msg != NULL else strerror(err).decode()
    text = f"{what}: {detail}" if uri is None else f"{what} {uri}: {detail}"
    raise OSError(err, text, uri)
