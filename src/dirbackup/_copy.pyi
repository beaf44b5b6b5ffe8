# Type stubs of the Cython module pyx/_copy.pyx.
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

REQ_COPY: int
REQ_DATA: int
REQ_ZERO: int
REQ_COMPRESSED: int
REQ_KIND_MASK: int
REQ_HASH: int
REQ_NOWRITE: int
TGT_NULL: int
TGT_FD: int
TGT_NBD: int
TGT_SINK: int

class CopyJob:
    source_name: str
    target_name: str
    ran: bool
    def __init__(
        self,
        requests: npt.NDArray[np.uint64],
        *,
        workers: int = ...,
        src_fd: int = ...,
        src_direct: bool = ...,
        src_blockdev: bool = ...,
        src_handles: Sequence[Any] = ...,
        layer_fds: Sequence[int] = ...,
        target_kind: int = ...,
        tgt_fd: int = ...,
        tgt_blockdev: bool = ...,
        tgt_handles: Sequence[Any] = ...,
        sink: Any = ...,
        tgt_fresh: bool = ...,
        cluster_size: int = ...,
        request_size: int = ...,
        slice_size: int = ...,
        depth: int = ...,
        discard: bool = ...,
        bandwidth_limit: int = ...,
        digest_chunk: int = ...,
        digest_size: int = ...,
        digest_zero: bool = ...,
        layer_checks: Sequence[tuple[int, int, int] | None] = ...,
        layer_formats: Sequence[tuple[int, int]] = ...,
        layer_names: Sequence[str] = ...,
        serialize_writes: bool = ...,
        source_name: str = ...,
        target_name: str = ...,
    ) -> None: ...
    def cancel(self) -> None: ...
    @property
    def total_bytes(self) -> int: ...
    @property
    def done_bytes(self) -> int: ...
    @property
    def read_bytes(self) -> int: ...
    @property
    def written_bytes(self) -> int: ...
    @property
    def zero_bytes(self) -> int: ...
    @property
    def discarded_bytes(self) -> int: ...
    @property
    def discard_errno(self) -> int: ...
    @property
    def workers_used(self) -> int: ...
    @property
    def digests(self) -> npt.NDArray[np.uint64] | None: ...
    @property
    def layer_sums(self) -> list[npt.NDArray[np.uint64] | None] | None: ...
    def run(
        self,
        progress: Callable[[CopyJob], None] | None = ...,
        interval: float = ...,
        cancel_event: threading.Event | None = ...,
    ) -> None: ...
