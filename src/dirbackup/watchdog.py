"""No progress for N seconds: give up instead of hanging.

A backup reads what the hypervisor (or our host) serves.  A server that stops
answering leaves a read blocked for ever -- while the backup holds the
guest's lock and its snapshot access.  A Watchdog thread watches a progress
value; once it has not moved for `timeout` seconds, it calls `on_stall` once:
cancel the copy, and shut down the NBD connections' sockets (nbd.shut_down),
which makes every libnbd call blocked on them fail at once.  The caller then
raises IOTimeout.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any

import numpy as np

from dirbackup import extents
from dirbackup.errors import IOTimeout
from dirbackup.nbd import shut_down, socket_fds

DEFAULT_IO_TIMEOUT = 60.0
#: block status is asked in pieces of this size; each piece must come back in time
STATUS_PIECE = 64 << 30


class Watchdog:
    """Calls `on_stall()` once if `progress()` stays the same for `timeout`
    seconds while the block runs (0: never).  `fired` says whether it did."""

    def __init__(
        self, timeout: float, progress: Callable[[], int], on_stall: Callable[[], None]
    ) -> None:
        self.timeout = timeout
        self.progress = progress
        self.on_stall = on_stall
        self.fired = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Watchdog:
        if self.timeout > 0:
            self._thread = threading.Thread(target=self._watch, name="io-watchdog", daemon=True)
            self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _watch(self) -> None:
        step = min(1.0, max(self.timeout / 8, 0.02))
        last = self.progress()
        since = time.monotonic()
        while not self._stop.wait(step):
            now = self.progress()
            if now != last:
                last, since = now, time.monotonic()
            elif time.monotonic() - since >= self.timeout:
                self.fired = True
                self.on_stall()
                return


def block_status(
    h: Any, context: str, timeout: float, name: str, others: Sequence[Any] = ()
) -> extents.Extents:
    """extents.block_status of the whole export of `h`, in pieces; a piece
    that does not come back within `timeout` seconds shuts down the sockets of
    `h` and of its `others` (the same server's other connections, which would
    hang too) and raises IOTimeout.  Rows are not merged across pieces
    (select, dirty and data merge them)."""
    size = int(h.get_size())
    done = [0]
    fds = socket_fds([h, *others]) if timeout > 0 else []
    pieces = []
    with Watchdog(timeout, lambda: done[0], lambda: shut_down(fds)) as guard:
        try:
            for offset in range(0, size, STATUS_PIECE):
                length = min(STATUS_PIECE, size - offset)
                pieces.append(extents.block_status(h, context, offset, length))
                done[0] += 1
        except Exception:
            if not guard.fired:
                raise
    if guard.fired:  # also when the last piece came just as the socket went down
        raise IOTimeout(
            f"no progress for {timeout:g} s querying {context} of {name}: the NBD "
            "server stopped answering (I/O timeout)"
        )
    return np.concatenate(pieces) if pieces else extents.empty()
