"""Reads outside the dirty areas, found in qemu-nbd's request trace.

The hypervisor's snapshot access refuses a provider's read of an incremental
disk outside the dirty bitmap's areas (and any read of a disk whose bitmap is
clean).  qemu-nbd cannot refuse them, and a checking proxy between provider
and server would have to relay the `qemu:dirty-bitmap:` meta context, which
nbdkit does not.  So the standalone host, with `check_reads`, does the
simplest honest thing: each export logs every NBD request it receives
(`qemu-nbd --trace nbd_receive_request,file=...`), and once backup_vm has
returned and the servers are stopped, every read of a disk read through its
bitmap must lie inside that bitmap's dirty extents.  One that does not fails
the backup (before it counts and before the bitmaps advance), naming the
read.  Unlike the hypervisor, the provider sees the error after the fact,
not at the read; block-status queries are not checked.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from dirbackup import extents

#: NBD command types that read data: NBD_CMD_READ and NBD_CMD_CACHE.
READ_TYPES = (0, 5)

_REQUEST = re.compile(r"\.type = 0x([0-9a-f]+), from = (\d+), len = (\d+)")


def trace_args(trace: Path) -> list[str]:
    """qemu-nbd options that log each received request into `trace`."""
    if "," in str(trace):
        raise ValueError(f"a trace file name cannot hold a comma: {trace}")
    return [f"--trace=nbd_receive_request,file={trace}"]


def reads(trace: Path) -> list[tuple[int, int]]:
    """(offset, length) of every read request in a trace file (none if the
    server never wrote one: no request came)."""
    try:
        text = trace.read_text(errors="replace")
    except FileNotFoundError:
        return []
    out = []
    for m in _REQUEST.finditer(text):
        if int(m.group(1), 16) in READ_TYPES:
            out.append((int(m.group(2)), int(m.group(3))))
    return out


def first_outside(
    requests: list[tuple[int, int]], dirty: extents.Extents
) -> tuple[int, int] | None:
    """The first read not wholly inside one run of `dirty` (sorted, coalesced
    (offset, length, flags) rows), or None."""
    starts = dirty[:, 0].astype(np.int64) if len(dirty) else np.zeros(0, np.int64)
    ends = starts + (dirty[:, 1].astype(np.int64) if len(dirty) else 0)
    for offset, length in requests:
        i = int(np.searchsorted(starts, offset, side="right")) - 1
        if i < 0 or offset + length > int(ends[i]):
            return offset, length
    return None
