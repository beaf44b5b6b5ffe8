# Taking the raw libnbd handle out of a python-libnbd `nbd.NBD` object.
from cpython.pycapsule cimport PyCapsule_GetPointer

from libnbd cimport nbd_handle


cdef inline nbd_handle *handle_of(object h) except NULL:
    """The `struct nbd_handle *` inside a python-libnbd handle.

    The caller must keep `h` alive for as long as it uses the pointer: the
    python-libnbd object closes the handle when it is collected.
    """
    capsule = getattr(h, "_o", None)
    if capsule is None:
        raise TypeError(f"expected a python-libnbd nbd.NBD handle, got {type(h).__name__}")
    return <nbd_handle *>PyCapsule_GetPointer(capsule, "nbd_handle")
