"""The provider process behind the Perl plugins of a Proxmox VE node.

A PVE node loads storage plugins and backup providers written in Perl
(`perl/PVE/...`).  Those stay thin: each call is forwarded here, to a
dirbackup process that holds a DirectoryBackupProvider and a
DirectoryStorage, so all policy stays in Python.

Protocol, over one connected Unix stream socket (the Perl side makes a
socketpair and starts `dirbackup pve-serve --fd N`; `--socket PATH` listens
instead): one JSON request per line, {"method": NAME, "args": [...]}; any
number of {"log": [level, message]} lines (the provider's log function, for
the task log) and then exactly one reply line, {"result": VALUE} or
{"error": "one line"}.

What cannot travel as JSON is translated by the Perl side and turned back
here:
* a `file-handle` of backup_vm arrives as {"pid": P, "fd": N} and is opened
  as /proc/P/fd/N (read-write where allowed, so that copied ranges can be
  discarded; read-only otherwise);
* `next-dirty-region` arrives as the list of its regions, "regions":
  [[offset, length], ...], all read before the call.

The process ends after job_cleanup, at the end of the connection (the Perl
side died: running backups are aborted, restores stopped) and on SIGTERM.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from dirbackup.api import LogFunction
from dirbackup.errors import DirbackupError
from dirbackup.provider import DirectoryBackupProvider
from dirbackup.storage import DirectoryStorage

__all__ = ["PROVIDER_METHODS", "STORAGE_METHODS", "PveServer", "serve_fd", "serve_socket"]

#: The backup provider API (PVE::BackupProvider::Plugin::Base), forwarded as is.
PROVIDER_METHODS = frozenset(
    {
        "provider_name",
        "job_init",
        "job_cleanup",
        "backup_init",
        "backup_cleanup",
        "backup_get_mechanism",
        "backup_vm_query_incremental",
        "backup_vm",
        "backup_container_prepare",
        "backup_container",
        "backup_handle_log_file",
        "restore_get_mechanism",
        "archive_get_guest_config",
        "archive_get_firewall_config",
        "restore_vm_init",
        "restore_vm_cleanup",
        "restore_vm_volume_init",
        "restore_vm_volume_cleanup",
        "restore_container_init",
        "restore_container_cleanup",
    }
)

#: The storage plugin methods the Perl storage plugin forwards (prefixed
#: "storage." on the wire); those that take a log function get the task log.
STORAGE_METHODS = frozenset(
    {
        "activate_storage",
        "status",
        "list_volumes",
        "volume_size_info",
        "get_volume_attribute",
        "update_volume_attribute",
        "free_image",
        "prune_backups",
        "parse_volname",
        "path",
    }
)
_STORAGE_LOGGING = frozenset({"free_image", "prune_backups"})

MAX_LINE = 16 << 20
"""A request line longer than this is refused (a guest config is small;
the regions of a fragmented 64 TiB disk are not larger)."""


def _jsonable(value: Any) -> Any:
    """Replies as JSON: tuples become lists, enums their value."""
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        text = exc.strerror + (f": {exc.filename}" if exc.filename else "")
    else:
        text = str(exc)
    if not isinstance(exc, (DirbackupError, OSError)):
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return " ".join(text.split()) or type(exc).__name__


def _regions(device: str, value: Any) -> Callable[[], tuple[int, int] | None]:
    """`next-dirty-region` back from the list of regions the Perl side read."""
    if not isinstance(value, list) or not all(
        isinstance(r, list) and len(r) == 2 and all(type(x) is int for x in r) for r in value
    ):
        raise DirbackupError(f"{device}: 'regions' must be a list of [offset, length] pairs")
    it: Iterator[list[int]] = iter(value)

    def next_dirty_region() -> tuple[int, int] | None:
        region = next(it, None)
        return None if region is None else (region[0], region[1])

    return next_dirty_region


def _open_handle(device: str, value: Any) -> int:
    """The caller's open file, reopened through /proc/PID/fd/N."""
    if (
        not isinstance(value, Mapping)
        or type(value.get("pid")) is not int
        or type(value.get("fd")) is not int
        or value["pid"] <= 0
        or value["fd"] < 0
    ):
        raise DirbackupError(f'{device}: \'file-handle\' must be {{"pid": P, "fd": N}}')
    path = f"/proc/{value['pid']}/fd/{value['fd']}"
    for flags in (os.O_RDWR, os.O_RDONLY):
        try:
            return os.open(path, flags | os.O_CLOEXEC)
        except OSError as exc:
            if flags == os.O_RDWR and exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
                continue  # a read-only source: discards are skipped
            raise DirbackupError(
                f"{device}: cannot open the file handle {path}: {exc.strerror}"
            ) from None
    raise AssertionError("unreachable")


@dataclass
class PveServer:
    """Answers requests for one storage: a DirectoryStorage, and the
    DirectoryBackupProvider made on the first provider call."""

    storeid: str
    scfg: Mapping[str, Any]
    storage: DirectoryStorage = field(init=False)
    provider: DirectoryBackupProvider | None = field(init=False, default=None)
    finished: bool = field(init=False, default=False)
    config_error: str | None = field(init=False, default=None)
    _log: LogFunction = field(init=False)
    _job: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        """A storage configuration dirbackup refuses is the answer to every
        request (the caller sees why, not a process that died)."""
        self._log = lambda level, msg: None
        try:
            self.storage = DirectoryStorage(self.storeid, self.scfg)
        except DirbackupError as exc:
            self.config_error = f"storage '{self.storeid}': {_one_line(exc)}"

    def _provider(self) -> DirectoryBackupProvider:
        if self.provider is None:
            self.provider = DirectoryBackupProvider(
                self.storage, self.storage.scfg, self.storeid, lambda lv, m: self._log(lv, m)
            )
        return self.provider

    def handle(self, request: Any, log: LogFunction) -> dict[str, Any]:
        """One request to its reply ({"result": ...} or {"error": ...}); the
        provider's log lines go to `log` meanwhile."""
        self._log = log
        try:
            if not isinstance(request, Mapping) or not isinstance(request.get("method"), str):
                raise DirbackupError('a request is {"method": NAME, "args": [...]}')
            if self.config_error is not None and request["method"] != "exit":
                raise DirbackupError(self.config_error)
            args = request.get("args", [])
            if not isinstance(args, list):
                raise DirbackupError(f"{request['method']}: 'args' must be a list")
            return {"result": _jsonable(self._call(request["method"], args))}
        except Exception as exc:  # every failure is the caller's one-line error
            return {"error": _one_line(exc)}
        finally:
            self._log = lambda level, msg: None

    def _call(self, method: str, args: list[Any]) -> Any:
        if method == "exit":
            self.finished = True
            return None
        if method.startswith("storage."):
            name = method.removeprefix("storage.")
            if name not in STORAGE_METHODS:
                raise DirbackupError(f"unknown storage method {name!r}")
            if name == "status":
                return self.storage_status()
            kwargs = {"log": self._log} if name in _STORAGE_LOGGING else {}
            return getattr(self.storage, name)(*args, **kwargs)
        if method not in PROVIDER_METHODS:
            raise DirbackupError(f"unknown method {method!r}")
        p = self._provider()
        if method == "backup_vm":
            return self._backup_vm(p, args)
        result = getattr(p, method)(*args)
        if method == "job_init":
            self._job = True
        elif method == "job_cleanup":
            self._job = False
            self.finished = True
        elif method == "restore_get_mechanism":
            return list(result)
        return result

    def storage_status(self) -> list[int]:
        """(total, free, used, active) of the storage, in bytes."""
        return list(self.storage.status())

    def _backup_vm(self, p: DirectoryBackupProvider, args: list[Any]) -> None:
        if len(args) not in (3, 4) or not isinstance(args[2], Mapping):
            raise DirbackupError("backup_vm takes (vmid, guest_config, volumes, info)")
        vmid, config, raw = args[0], args[1], args[2]
        info = args[3] if len(args) == 4 else None
        fds: list[int] = []
        volumes: dict[str, dict[str, Any]] = {}
        try:
            for device, vol in raw.items():
                if not isinstance(vol, Mapping):
                    raise DirbackupError(f"{device}: a volume is a hash")
                vol = dict(vol)
                if "file-handle" in vol:
                    fds.append(_open_handle(device, vol["file-handle"]))
                    vol["file-handle"] = fds[-1]
                    vol["next-dirty-region"] = _regions(device, vol.pop("regions", None))
                volumes[device] = vol
            p.backup_vm(vmid, config, volumes, info)
        finally:
            for fd in fds:
                os.close(fd)

    def shutdown(self) -> None:
        """The connection is gone (or the process is told to stop): abort
        what runs and stop what restores started.  Nothing is left to tell
        of a failure here."""
        p = self.provider
        if p is None:
            return
        for volname, device in list(p._restores):
            with contextlib.suppress(Exception):
                p.restore_vm_volume_cleanup(volname, device)
        for volname in list(p._mounts):
            with contextlib.suppress(Exception):
                p.restore_container_cleanup(volname)
        if self._job or p._guests:
            with contextlib.suppress(Exception):
                p.job_cleanup()
            self._job = False


class _Connection:
    """Line-oriented JSON over one stream socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.reader = sock.makefile("rb")
        self.lock = threading.Lock()  # log lines may come from the copy's threads

    def send(self, obj: Mapping[str, Any]) -> None:
        data = json.dumps(obj, separators=(",", ":")).encode() + b"\n"
        with self.lock:
            self.sock.sendall(data)

    def log(self, level: str, message: str) -> None:
        with contextlib.suppress(OSError):  # the caller is gone; the request's end tells
            self.send({"log": [str(level), str(message)]})

    def requests(self) -> Iterator[Any]:
        while True:
            line = self.reader.readline(MAX_LINE + 1)
            if not line:
                return
            if len(line) > MAX_LINE:
                raise DirbackupError("request line too long")
            try:
                yield json.loads(line)
            except ValueError as exc:
                yield {"invalid": str(exc)}


def _serve(server: PveServer, sock: socket.socket) -> None:
    conn = _Connection(sock)
    for request in conn.requests():
        if isinstance(request, Mapping) and "invalid" in request:
            reply: dict[str, Any] = {"error": f"request is not JSON: {request['invalid']}"}
        else:
            reply = server.handle(request, conn.log)
        conn.send(reply)
        if server.finished:
            return


def serve_fd(storeid: str, scfg: Mapping[str, Any], fd: int) -> None:
    """Serve the connected socket `fd` (inherited from the Perl side) until
    job_cleanup, "exit" or its end."""
    server = PveServer(storeid, scfg)
    sock = socket.socket(fileno=fd)
    try:
        _serve(server, sock)
    finally:
        server.shutdown()
        sock.close()


def serve_socket(storeid: str, scfg: Mapping[str, Any], path: str) -> None:
    """Listen on the Unix socket `path` and serve one connection after the
    other until job_cleanup or "exit"."""
    server = PveServer(storeid, scfg)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(path)
        os.chmod(path, 0o600)
        listener.listen(1)
        while not server.finished:
            sock, _ = listener.accept()
            with sock:
                _serve(server, sock)
    finally:
        server.shutdown()
        listener.close()
        with contextlib.suppress(OSError):
            os.unlink(path)
