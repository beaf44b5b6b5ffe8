"""The copy engine: move regions of a disk from a source to a target, fast.

The loop itself is C (`dirbackup._copy`): it runs on its own threads with the
GIL released, reads with pread or libnbd aio (several requests in flight per
connection), skips or records clusters that read as zero, optionally
discards the source behind itself, honours a bandwidth limit, sums per-chunk
digests, and publishes progress counters.  This module gives it typed inputs:

* sources: `FileSource` (a file descriptor: raw image, block device, file
  opened with O_DIRECT) and `NBDSource` (python-libnbd handles, one per
  worker);
* targets: `FileTarget`, `NBDTarget`, or a `Sink` such as `qcow2.Writer`.

Example::

    with open("disk.raw", "rb") as src, open("copy.raw", "wb") as dst:
        size = os.fstat(src.fileno()).st_size
        os.ftruncate(dst.fileno(), size)
        regions = extents.data(extents.file_extents(src.fileno(), 0, size))
        stats = copy_regions(FileSource(src.fileno(), "disk.raw"),
                             FileTarget(dst.fileno(), "copy.raw"), regions)
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import stat
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from dirbackup import _copy
from dirbackup import extents as ext
from dirbackup.errors import Cancelled, IOTimeout
from dirbackup.nbd import shut_down, socket_fds
from dirbackup.watchdog import DEFAULT_IO_TIMEOUT, Watchdog

MiB = 1 << 20
DEFAULT_REQUEST_SIZE = 4 * MiB
DEFAULT_CLUSTER_SIZE = 64 * 1024
DEFAULT_SLICE_SIZE = 1 * MiB
SMALL_REGIONS = 256 * 1024
DIRECT_ALIGNMENT = 4096

REQ_COPY, REQ_DATA, REQ_ZERO = _copy.REQ_COPY, _copy.REQ_DATA, _copy.REQ_ZERO
REQ_COMPRESSED = _copy.REQ_COMPRESSED
REQ_HASH, REQ_NOWRITE = _copy.REQ_HASH, _copy.REQ_NOWRITE
REQ_KIND_MASK = _copy.REQ_KIND_MASK


def default_workers() -> int:
    """min(4, CPUs): more threads than cores only adds contention."""
    return max(1, min(4, os.cpu_count() or 1))


# ----------------------------------------------------------------------------
# Sources and targets


def _is_blockdev(fd: int) -> bool:
    return stat.S_ISBLK(os.fstat(fd).st_mode)


@dataclass(frozen=True)
class FileSource:
    """Read from an open file descriptor: a raw image, a block device, or a file
    opened with O_DIRECT (buffers are 4096-aligned and reads are widened)."""

    fd: int
    name: str = "source"

    @property
    def direct(self) -> bool:
        return bool(fcntl.fcntl(self.fd, fcntl.F_GETFL) & os.O_DIRECT)

    @property
    def blockdev(self) -> bool:
        return _is_blockdev(self.fd)


@dataclass(frozen=True)
class NBDSource:
    """Read through connected python-libnbd handles, one per worker thread.

    Open more than one only when the server allows multi-conn
    (`nbd.connect_many` does that check)."""

    handles: Sequence[Any]
    name: str = "nbd"


@dataclass(frozen=True)
class FileTarget:
    """Write into an open file descriptor (a raw file or a block device).

    `fresh` says the target already reads as zero where nothing is written
    (a new sparse file): zero clusters are then skipped; otherwise they are
    punched or zeroed."""

    fd: int
    name: str = "target"
    fresh: bool = True


@dataclass(frozen=True)
class NBDTarget:
    """Write through connected python-libnbd handles, one per worker thread."""

    handles: Sequence[Any]
    name: str = "nbd"
    fresh: bool = True


class Sink(Protocol):
    """A target that keeps its own metadata (qcow2.Writer): the engine writes
    the data clusters, the sink decides where they go."""

    @property
    def name(self) -> str: ...

    @property
    def cluster_size(self) -> int: ...

    @property
    def virtual_size(self) -> int: ...

    def sink_capsule(self) -> Any: ...


Source = FileSource | NBDSource
Target = FileTarget | NBDTarget | Sink


# ----------------------------------------------------------------------------
# Options and results


@dataclass(frozen=True)
class CopyOptions:
    """How to copy.

    request_size: bytes per request (default 4 MiB): the unit of work handed to a
        thread.
    slice_size: sources are read in slices of this size (default 1 MiB): a file
        request slice by slice, an NBD source in reads of this size, so that each
        slice is still in the CPU cache when it is checked, hashed and written.
    cluster_size: unit of zero detection and of the digests (64 KiB); a sink's own
        cluster size wins.
    workers: threads (0: min(4, CPUs)); with NBD, at most one per handle.
    depth: reads in flight per NBD connection.
    discard: discard (trim / punch hole) each source range once it is written.
    bandwidth_limit: bytes per second read from the source (0: unlimited).
    digest_chunk: size of the guest address chunks digests are summed over (0: none).
    progress_interval: seconds between progress callbacks.
    io_timeout: seconds without any progress after which the copy gives up with
        IOTimeout instead of hanging on a source that stopped answering (0: never);
        waits for the bandwidth limit do not count.
    """

    request_size: int = DEFAULT_REQUEST_SIZE
    slice_size: int = DEFAULT_SLICE_SIZE
    cluster_size: int = DEFAULT_CLUSTER_SIZE
    workers: int = 0
    depth: int = 4
    discard: bool = False
    bandwidth_limit: int = 0
    digest_chunk: int = 0
    progress_interval: float = 0.5
    io_timeout: float = DEFAULT_IO_TIMEOUT


@dataclass(frozen=True)
class CopyStats:
    """What a copy did (also the progress snapshot given to callbacks)."""

    total_bytes: int
    done_bytes: int
    read_bytes: int
    written_bytes: int
    zero_bytes: int
    discarded_bytes: int
    seconds: float
    workers: int
    discard_errno: int = 0
    digests: npt.NDArray[np.uint64] | None = field(default=None, repr=False)
    layer_sums: list[npt.NDArray[np.uint64] | None] | None = field(default=None, repr=False)

    @property
    def rate(self) -> float:
        """Bytes handled per second."""
        return self.done_bytes / self.seconds if self.seconds > 0 else 0.0

    @property
    def discard_note(self) -> str | None:
        """Why discarding the source stopped, if it did."""
        if not self.discard_errno:
            return None
        return f"source discard not supported ({os.strerror(self.discard_errno)}); skipped"


Progress = Callable[[CopyStats], None]


def _snapshot(job: Any, start: float, final: bool = False) -> CopyStats:
    return CopyStats(
        total_bytes=job.total_bytes,
        done_bytes=job.done_bytes,
        read_bytes=job.read_bytes,
        written_bytes=job.written_bytes,
        zero_bytes=job.zero_bytes,
        discarded_bytes=job.discarded_bytes,
        seconds=time.monotonic() - start,
        workers=job.workers_used,
        discard_errno=job.discard_errno,
        digests=job.digests if final else None,
        layer_sums=job.layer_sums if final else None,
    )


# ----------------------------------------------------------------------------
# Requests


def requests_from_regions(regions: ext.Extents, request_size: int) -> npt.NDArray[np.uint64]:
    """REQ_COPY rows for regions, cut at multiples of `request_size`."""
    pieces = ext.split(regions, request_size, request_size)
    rows = np.zeros((pieces.shape[0], 5), dtype=np.uint64)
    rows[:, 0] = pieces[:, 0]
    rows[:, 1] = pieces[:, 1]
    rows[:, 2] = REQ_COPY
    rows[:, 4] = pieces[:, 0]
    return rows


def _target_args(target: Target, options: CopyOptions) -> dict[str, Any]:
    if isinstance(target, FileTarget):
        blockdev = _is_blockdev(target.fd)
        return {
            "target_kind": _copy.TGT_FD,
            "tgt_fd": target.fd,
            "tgt_blockdev": blockdev,
            "serialize_writes": not blockdev,
            "tgt_fresh": target.fresh,
            "target_name": target.name,
            "cluster_size": options.cluster_size,
        }
    if isinstance(target, NBDTarget):
        return {
            "target_kind": _copy.TGT_NBD,
            "tgt_handles": tuple(target.handles),
            "tgt_fresh": target.fresh,
            "target_name": target.name,
            "cluster_size": options.cluster_size,
        }
    return {
        "target_kind": _copy.TGT_SINK,
        "serialize_writes": True,
        "sink": target.sink_capsule(),
        "target_name": target.name,
        "cluster_size": target.cluster_size,
    }


def _run(
    requests: npt.NDArray[np.uint64],
    args: dict[str, Any],
    options: CopyOptions,
    progress: Progress | None,
    cancel_event: threading.Event | None,
) -> CopyStats:
    job = _copy.CopyJob(
        requests,
        workers=options.workers or default_workers(),
        request_size=options.request_size,
        slice_size=options.slice_size,
        depth=options.depth,
        discard=options.discard,
        bandwidth_limit=options.bandwidth_limit,
        **args,
    )
    start = time.monotonic()
    callback = None
    if progress is not None:
        report = progress

        def callback(j: Any) -> None:
            report(_snapshot(j, start))

    with _watchdog(job, args, options) as guard:
        try:
            job.run(callback, options.progress_interval, cancel_event)
        except (OSError, Cancelled):
            if not guard.fired:
                raise
    if guard.fired:
        raise IOTimeout(
            f"no progress for {options.io_timeout:g} s reading {job.source_name} into "
            f"{job.target_name}: it stopped answering (I/O timeout)"
        )
    return _snapshot(job, start, final=True)


def _watchdog(job: Any, args: dict[str, Any], options: CopyOptions) -> Watchdog:
    """A watchdog that cancels the job when its counters stop moving (and shuts
    the NBD sockets down, so that requests stuck in flight fail at once; a
    worker stuck in a file read is abandoned by the job itself).  Waits for the
    bandwidth limit are allowed for: each worker may wait a request's worth."""
    timeout = options.io_timeout
    if timeout > 0 and options.bandwidth_limit:
        timeout += job.workers_used * options.request_size / options.bandwidth_limit
    handles = [*args.get("src_handles", ()), *args.get("tgt_handles", ())]
    fds = socket_fds(handles) if timeout > 0 else []

    def progress() -> int:
        return int(job.read_bytes + job.written_bytes + job.zero_bytes + job.done_bytes)

    def stall() -> None:
        job.cancel()
        shut_down(fds)

    return Watchdog(timeout, progress, stall)


def copy_regions(
    source: Source,
    target: Target,
    regions: ext.Extents,
    options: CopyOptions = CopyOptions(),
    *,
    progress: Progress | None = None,
    cancel_event: threading.Event | None = None,
    digest_size: int = 0,
    digest_zero: bool = False,
) -> CopyStats:
    """Copy `regions` (an extent array) of `source` to the same offsets of `target`.

    Clusters that read as zero are left out of a fresh target, punched or
    zeroed in another one, and recorded as zero clusters by a sink that wants
    them.  For a sink the regions must be aligned to its clusters (the last one
    may end at the virtual size); for an O_DIRECT source they are widened to
    4096 bytes.  With `options.digest_chunk`, per-chunk digest sums over
    [0, digest_size) are returned in the stats (zero clusters count only with
    `digest_zero`).  Raises OSError (with the path or URI and the offset) on
    I/O errors, dirbackup.errors.Cancelled when cancelled, IOTimeout when
    nothing moved for `options.io_timeout` seconds, and re-raises
    KeyboardInterrupt after stopping the workers.
    """
    regions = ext.coalesce(regions)
    args = _target_args(target, options)
    if isinstance(source, FileSource):
        if source.direct:
            size = fd_size(source.fd)
            regions = ext.align(regions, DIRECT_ALIGNMENT, max(size, 1))
        args.update(
            src_fd=source.fd,
            src_direct=source.direct,
            src_blockdev=source.blockdev,
            source_name=source.name,
        )
    else:
        args.update(src_handles=tuple(source.handles), source_name=source.name)
    if args["target_kind"] == _copy.TGT_SINK:
        _check_sink_alignment(regions, target)  # type: ignore[arg-type]
    if options.digest_chunk:
        args.update(
            digest_chunk=options.digest_chunk,
            digest_size=digest_size,
            digest_zero=digest_zero,
        )
    # NBD reads are slice-sized like file reads: a reply is then still in the
    # CPU cache when it is checked, hashed and written (4 MiB reads measured
    # about 30% slower from a local qemu-nbd)
    read_size = options.request_size
    if isinstance(source, NBDSource):
        read_size = min(options.request_size, max(options.slice_size, DIRECT_ALIGNMENT))
    requests = requests_from_regions(regions, read_size)
    scattered = regions.shape[0] and ext.total(regions) // regions.shape[0] < SMALL_REGIONS
    if isinstance(source, NBDSource) and not options.workers and scattered:
        # scattered small reads (an incremental): one connection with many
        # requests in flight leaves the CPU to the server (measured faster)
        options = dataclasses.replace(options, workers=1)
    return _run(requests, args, options, progress, cancel_event)


LayerSums = tuple[int, int, int]
"""(cluster size, digest chunk, number of chunks) of a layer whose hashed rows are summed."""


def copy_mapped(
    layers: Sequence[int],
    plan: npt.NDArray[np.uint64],
    target: Target,
    options: CopyOptions = CopyOptions(),
    *,
    progress: Progress | None = None,
    cancel_event: threading.Event | None = None,
    layer_sums: Sequence[LayerSums | None] = (),
    size: int = 0,
    layer_formats: Sequence[tuple[int, int]] = (),
    layer_names: Sequence[str] = (),
    digest_zero: bool = False,
    source_name: str = "backup chain",
) -> CopyStats:
    """Copy a mapped image (a qcow2 chain) into `target`.

    `plan` has rows (guest offset, length, kind, layer, host offset) as made by
    qcow2.Chain.plan(): REQ_DATA rows are read from `layers[layer]` at the
    host offset, REQ_ZERO rows read as zero.  A file target gets the data with
    copy_file_range where the kernel can.

    With `layer_sums` (one entry per layer, None for a layer not summed), REQ_DATA
    rows flagged REQ_HASH (as qcow2.Chain.check_plan() makes them) are hashed
    cluster by cluster as they are read, and REQ_NOWRITE rows only read and
    hashed; the per-chunk sums come back in the stats' `layer_sums`.  `size` is
    the virtual size (the last cluster may end there).

    With `options.digest_chunk`, per-chunk digest sums over [0, size) of what
    is written come back in the stats' `digests`, exactly as copy_regions sums
    them (REQ_ZERO rows count as zero clusters only with `digest_zero`): a
    backup read from a mapped image records the digests of one read through
    a source.  `source_name` names the layers in error messages.

    REQ_COMPRESSED rows (one compressed cluster, or part of one; the host
    column holds its L2 descriptor) need `layer_formats`: per layer its
    (cluster_bits, compression type); the workers read and decompress them.
    A stream that does not decompress to exactly one cluster is an ImageError
    naming the layer (from `layer_names`) and the offsets.
    """
    args = _target_args(target, options)
    args.update(layer_fds=tuple(layers), source_name=source_name)
    if layer_formats:
        args.update(layer_formats=tuple(layer_formats), layer_names=tuple(layer_names))
    if options.digest_chunk:
        args.update(digest_chunk=options.digest_chunk, digest_size=size, digest_zero=digest_zero)
    request_size = options.request_size
    if any(s is not None for s in layer_sums):
        # every piece of a hashed row must hold whole clusters of its layer
        unit = max(s[0] for s in layer_sums if s is not None)
        request_size = -(-request_size // unit) * unit
        options = dataclasses.replace(options, request_size=request_size)
        args.update(layer_checks=tuple(layer_sums), digest_size=size)
    rows = _split_plan(plan, request_size)
    if not options.workers and args.get("serialize_writes") and isinstance(target, FileTarget):
        # copy_file_range does the whole copy under the file's write lock: a
        # second thread would only wait (measured: one is faster)
        options = dataclasses.replace(options, workers=1)
    return _run(rows, args, options, progress, cancel_event)


def _split_plan(plan: npt.NDArray[np.uint64], request_size: int) -> npt.NDArray[np.uint64]:
    """Cut plan rows so that none is longer than `request_size`."""
    plan = np.ascontiguousarray(plan, dtype=np.uint64).reshape(-1, 5)
    lengths = plan[:, 1]
    if lengths.size == 0 or int(lengths.max()) <= request_size:
        return plan
    counts = ((lengths + np.uint64(request_size - 1)) // np.uint64(request_size)).astype(np.int64)
    rows = np.repeat(plan, counts, axis=0)
    first = np.repeat(np.cumsum(counts) - counts, counts)
    index = (np.arange(rows.shape[0]) - first).astype(np.uint64)
    shift = index * np.uint64(request_size)
    rows[:, 0] += shift
    data = (rows[:, 2] & np.uint64(REQ_KIND_MASK)) == REQ_DATA
    rows[:, 4] += np.where(data, shift, np.uint64(0))
    rows[:, 1] = np.minimum(rows[:, 1] - shift, np.uint64(request_size))
    return rows


def _check_sink_alignment(regions: ext.Extents, sink: Sink) -> None:
    cs = sink.cluster_size
    if regions.shape[0] == 0:
        return
    offsets = regions[:, 0]
    ends = regions[:, 0] + regions[:, 1]
    bad = (offsets % np.uint64(cs) != 0) | (
        (ends % np.uint64(cs) != 0) & (ends != np.uint64(sink.virtual_size))
    )
    if bad.any():
        row = regions[int(np.argmax(bad))]
        raise ValueError(
            f"region {int(row[0])}+{int(row[1])} is not aligned to the {cs}-byte clusters of "
            f"{sink.name}; align the regions first (extents.align)"
        )
    if int(ends.max()) > sink.virtual_size:
        raise ValueError(f"regions run past the virtual size of {sink.name}")


def fd_size(fd: int) -> int:
    """Size in bytes of an open regular file or block device."""
    st = os.fstat(fd)
    if stat.S_ISBLK(st.st_mode):
        return os.lseek(fd, 0, os.SEEK_END)
    return st.st_size
