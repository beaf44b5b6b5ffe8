"""The hypervisor's `next-dirty-region` for the file-handle mechanism.

With `file-handle`, the provider reads the disk through a file and learns
what to read by calling `next-dirty-region()` until it returns None.  The
host serves the disk through qemu-nbd anyway; this reads the disk's dirty
bitmap from that server once (block status on `qemu:dirty-bitmap:NAME`,
bounded by the I/O timeout) and hands the dirty regions out one per call.
"""

from __future__ import annotations

from collections.abc import Callable

from dirbackup import extents, nbd, watchdog


def next_dirty_region(
    uri: str, bitmap: str | None, size: int, io_timeout: float
) -> Callable[[], tuple[int, int] | None]:
    """(offset, length) per call, then None: the dirty regions of `bitmap`
    on the export at `uri`, or the whole disk (`size` bytes) without one."""
    if bitmap is None:
        regions = [(0, size)]
    else:
        context = extents.dirty_bitmap_context(bitmap)
        h = nbd.connect(uri, [context], timeout=io_timeout)
        try:
            dirty = extents.dirty(watchdog.block_status(h, context, io_timeout, uri))
        finally:
            nbd.close_all([h])
        regions = [(int(o), int(n)) for o, n, _ in dirty]
    it = iter(regions)
    return lambda: next(it, None)
