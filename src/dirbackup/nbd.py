"""python-libnbd helpers: connecting to exports the way the copy core wants.

The core takes the raw `struct nbd_handle *` out of each python-libnbd handle
and drives it from C; Python only connects, negotiates meta contexts and
checks what the server allows (multi-conn, trim).
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import time
from collections.abc import Iterable
from typing import Any

import nbd  # python3-libnbd (Debian)

from dirbackup.errors import IOTimeout, ProtocolError


def unix_uri(socket: str, export: str = "") -> str:
    """The NBD URI of an export on a Unix socket."""
    return f"nbd+unix:///{export}?socket={socket}"


def connect(
    uri: str, meta_contexts: Iterable[str] = (), name: str = "dirbackup", timeout: float = 0
) -> Any:
    """Open one connection to `uri`, asking for `meta_contexts`.

    Raises OSError (ENOENT, ECONNREFUSED, ...) when the server cannot be
    reached, and IOTimeout when the handshake has not finished after `timeout`
    seconds (0: wait for ever) -- a server that stopped answering.
    """
    h = nbd.NBD()
    h.set_handle_name(name)
    for context in meta_contexts:
        h.add_meta_context(context)
    try:
        if timeout <= 0:
            h.connect_uri(uri)
            return h
        h.aio_connect_uri(uri)
        deadline = time.monotonic() + timeout
        while h.aio_is_connecting():
            left = deadline - time.monotonic()
            if left <= 0:
                _close(h)
                raise IOTimeout(
                    f"no answer for {timeout:g} s connecting to {uri}: the NBD server "
                    "stopped answering (I/O timeout)"
                )
            h.poll(max(1, int(min(left, 1.0) * 1000)))
    except nbd.Error as exc:
        raise _os_error(exc, f"connecting to {uri}") from None
    if not h.aio_is_ready():
        _close(h)
        raise OSError(errno.ENOTCONN, f"connecting to {uri}: the server closed the connection")
    return h


def connect_many(
    uri: str,
    count: int,
    meta_contexts: Iterable[str] = (),
    name: str = "dirbackup",
    timeout: float = 0,
) -> list[Any]:
    """Up to `count` connections to `uri`: more than one only when the server
    advertises multi-conn (consistent results across connections)."""
    contexts = tuple(meta_contexts)
    first = connect(uri, contexts, name, timeout)
    handles = [first]
    try:
        if count > 1 and first.can_multi_conn():
            for i in range(1, count):
                handles.append(connect(uri, contexts, f"{name}-{i}", timeout))
    except BaseException:
        close_all(handles, abrupt=True)
        raise
    return handles


def require_context(h: Any, context: str) -> None:
    """Fail clearly when the server did not agree to a meta context."""
    if not h.can_meta_context(context):
        raise ProtocolError(f"the NBD server does not offer meta context {context!r}")


def close_all(handles: Iterable[Any], abrupt: bool = False) -> None:
    """Disconnect handles, ignoring servers that are already gone.  `abrupt`
    drops the connections without the disconnect handshake, which waits for
    the server: the way out when it may have stopped answering."""
    handles = list(handles)
    if abrupt:
        shut_down(socket_fds(handles))
    for h in handles:
        with contextlib.suppress(nbd.Error):
            h.shutdown()
        _close(h)


def socket_fds(handles: Iterable[Any]) -> list[int]:
    """The socket of each connected handle.  Ask before anything may hang: a
    handle blocked in a synchronous call holds its lock."""
    fds = []
    for h in handles:
        with contextlib.suppress(nbd.Error):
            fds.append(int(h.aio_get_fd()))
    return fds


def shut_down(fds: Iterable[int]) -> None:
    """Shut NBD sockets down: every libnbd call waiting on them then fails at
    once instead of waiting for a server that does not answer (synchronous
    calls of python-libnbd cannot be cancelled otherwise)."""
    for fd in fds:
        with contextlib.suppress(OSError):
            sock = socket.socket(fileno=os.dup(fd))
            try:
                sock.shutdown(socket.SHUT_RDWR)
            finally:
                sock.close()


def pread(h: Any, length: int, offset: int, what: str) -> bytes:
    """h.pread(), a failure raised as OSError starting with `what`."""
    try:
        return bytes(h.pread(length, offset))
    except nbd.Error as exc:
        raise _os_error(exc, what) from None


def probe(h: Any, context: str, what: str) -> None:
    """One request the server must answer without reading data: block status
    of the first sector in meta context `context` (a handle that did not get
    that context reads the sector instead).  A failure is raised as OSError
    starting with `what`."""
    if not h.can_meta_context(context):
        pread(h, 512, 0, what)
        return
    try:
        h.block_status(512, 0, lambda *_args: 0)
    except nbd.Error as exc:
        raise _os_error(exc, what) from None


def _close(h: Any) -> None:
    close = getattr(h, "close", None)  # python-libnbd >= 1.16; older ones close on GC
    if close is not None:
        close()


def _os_error(exc: Any, what: str) -> OSError:
    errnum = exc.errnum or errno.EIO
    return OSError(errnum, f"{what}: {exc.string}")
