"""python-libnbd helpers: connecting to exports the way the copy core wants.

The core takes the raw `struct nbd_handle *` out of each python-libnbd handle
and drives it from C; Python only connects, negotiates meta contexts and
checks what the server allows (multi-conn, trim).
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterable
from typing import Any

import nbd  # python3-libnbd (Debian)

from dirbackup.errors import ProtocolError


def unix_uri(socket: str, export: str = "") -> str:
    """The NBD URI of an export on a Unix socket."""
    return f"nbd+unix:///{export}?socket={socket}"


def connect(uri: str, meta_contexts: Iterable[str] = (), name: str = "dirbackup") -> Any:
    """Open one connection to `uri`, asking for `meta_contexts`.

    Raises OSError (ENOENT, ECONNREFUSED, ...) when the server cannot be reached.
    """
    h = nbd.NBD()
    h.set_handle_name(name)
    for context in meta_contexts:
        h.add_meta_context(context)
    try:
        h.connect_uri(uri)
    except nbd.Error as exc:
        raise _os_error(exc, f"connecting to {uri}") from None
    return h


def connect_many(
    uri: str, count: int, meta_contexts: Iterable[str] = (), name: str = "dirbackup"
) -> list[Any]:
    """Up to `count` connections to `uri`: more than one only when the server
    advertises multi-conn (consistent results across connections)."""
    contexts = tuple(meta_contexts)
    first = connect(uri, contexts, name)
    handles = [first]
    if count > 1 and first.can_multi_conn():
        handles += [connect(uri, contexts, f"{name}-{i}") for i in range(1, count)]
    return handles


def require_context(h: Any, context: str) -> None:
    """Fail clearly when the server did not agree to a meta context."""
    if not h.can_meta_context(context):
        raise ProtocolError(f"the NBD server does not offer meta context {context!r}")


def close_all(handles: Iterable[Any]) -> None:
    """Disconnect handles, ignoring servers that are already gone."""
    for h in handles:
        with contextlib.suppress(nbd.Error):
            h.shutdown()
        close = getattr(h, "close", None)  # python-libnbd >= 1.16; older ones close on GC
        if close is not None:
            close()


def _os_error(exc: Any, what: str) -> OSError:
    errnum = exc.errnum or errno.EIO
    return OSError(errnum, f"{what}: {exc.string}")
