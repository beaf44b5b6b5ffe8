"""QEMU's tools as processes: qemu-img, qemu-io, qemu-nbd and nbdfuse.

Everything here runs the real programs from Debian's qemu-utils and
libnbd-bin; errors carry the program's own message.  This module and
toolrun.py (every other tool) are the only ones that start processes
(tests/test_layout.py keeps it so).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dirbackup import timings
from dirbackup.errors import DirbackupError
from dirbackup.procs import owner_alive, owner_line, processes_naming


class ToolError(DirbackupError):
    """A QEMU or libnbd tool failed; the message holds its stderr."""


def run(cmd: Sequence[str], *, input: bytes | None = None, timeout: float | None = 600) -> str:
    """Run a tool, return its stdout; raise ToolError with its stderr on failure."""
    try:
        with timings.phase(" ".join(os.path.basename(c) for c in cmd[:2])):
            proc = subprocess.run(
                list(cmd), input=input, capture_output=True, timeout=timeout, check=False
            )
    except FileNotFoundError:
        raise ToolError(f"{cmd[0]} is not installed (make setup installs it)") from None
    except subprocess.TimeoutExpired:
        raise ToolError(f"{cmd[0]} did not finish within {timeout} s") from None
    if proc.returncode != 0:
        raise tool_error(cmd[:2], proc.stderr.decode(errors="replace"), proc.returncode)
    return proc.stdout.decode(errors="replace")


# "Could not open 'IMAGE': Failed to get "write" lock" (qemu-img, qemu-io) or
# "Failed to get shared "write" lock" (qemu-nbd)
_LOCKED = re.compile(r"Could not open '(?P<path>[^']*)': Failed to get [^;]*lock")


def tool_error(what: Sequence[str], stderr: str, status: int) -> ToolError:
    """A failed tool's error as one line: `what` (the tool and its command, e.g.
    "qemu-img bitmap"), then what it said without its own "qemu-img: " prefix,
    its lines joined; an image another process holds is said in plain words."""
    tool = os.path.basename(what[0])
    lines = (line.strip().removeprefix(f"{tool}: ").strip() for line in stderr.splitlines())
    text = "; ".join(line for line in lines if line) or f"exit status {status}"
    locked = _LOCKED.search(text)
    if locked:
        return ToolError(
            f"disk image {locked['path']} is in use by another process (a VM, qemu-nbd "
            "or qemu-img holds its image lock)"
        )
    return ToolError(f"{' '.join(what)}: {text}")


# ----------------------------------------------------------------------------
# qemu-img


def img_info(path: str | os.PathLike[str], *, fmt: str | None = None, chain: bool = False) -> Any:
    """`qemu-img info --output=json` (a list for the whole chain with `chain`)."""
    cmd = ["qemu-img", "info", "--output=json", "-U"]
    if fmt:
        cmd += ["-f", fmt]
    if chain:
        cmd.append("--backing-chain")
    return json.loads(run([*cmd, os.fspath(path)]))


def img_create(
    path: str | os.PathLike[str],
    size: int,
    fmt: str = "qcow2",
    *,
    backing: str | None = None,
    cluster_size: int | None = None,
) -> None:
    """Create an image (qcow2 by default) of `size` bytes."""
    cmd = ["qemu-img", "create", "-q", "-f", fmt]
    if backing:
        cmd += ["-b", backing, "-F", "qcow2"]
    if cluster_size:
        cmd += ["-o", f"cluster_size={cluster_size}"]
    run([*cmd, os.fspath(path), str(size)])


def overlay_create(path: str | os.PathLike[str], backing_uri: str) -> None:
    """A new qcow2 overlay over a raw NBD export (`nbd+unix://...`), of the
    export's size: QEMU opens nothing but the export for its backing."""
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", backing_uri, "-F", "raw",
         os.fspath(path)])  # fmt: skip


def img_compare(
    a: str | os.PathLike[str],
    b: str | os.PathLike[str],
    fmt_a: str | None = None,
    fmt_b: str | None = None,
    strict: bool = False,
) -> tuple[bool, str]:
    """`qemu-img compare`: (identical?, message).  `strict` also compares sizes."""
    cmd = ["qemu-img", "compare", "-U"]
    if fmt_a:
        cmd += ["-f", fmt_a]
    if fmt_b:
        cmd += ["-F", fmt_b]
    if strict:
        cmd.append("-s")
    proc = subprocess.run(
        [*cmd, os.fspath(a), os.fspath(b)], capture_output=True, check=False, timeout=600
    )
    out = (proc.stdout + proc.stderr).decode(errors="replace").strip()
    if proc.returncode > 1:
        raise ToolError(f"qemu-img compare: {out}")
    return proc.returncode == 0, out


def img_check(path: str | os.PathLike[str]) -> Any:
    """`qemu-img check --output=json` of a qcow2 image (raises on corruption)."""
    proc = subprocess.run(
        ["qemu-img", "check", "-U", "--output=json", "-f", "qcow2", os.fspath(path)],
        capture_output=True,
        check=False,
        timeout=600,
    )
    try:
        report = json.loads(proc.stdout)
    except json.JSONDecodeError:
        raise ToolError(f"qemu-img check {path}: {proc.stderr.decode().strip()}") from None
    return report


def bitmap(path: str | os.PathLike[str], action: str, name: str) -> None:
    """qemu-img bitmap --add/--remove/--clear/--enable/--disable NAME."""
    if action == "add":
        run(["qemu-img", "bitmap", "--add", "--enable", os.fspath(path), name])
    else:
        run(["qemu-img", "bitmap", f"--{action}", os.fspath(path), name])


def bitmaps(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The persistent bitmaps of a qcow2 image, as `qemu-img info` lists them."""
    info = img_info(path, fmt="qcow2")
    data = info.get("format-specific", {}).get("data", {})
    return list(data.get("bitmaps", []))


# QEMU's image locking (file-posix): open file description locks on byte 100 +
# each permission the opener uses and on byte 200 + each one it does not share
_LOCK_RANGES = ((100, 64), (200, 64))
_FLOCK = "hhqqi4x"  # struct flock: l_type, l_whence, l_start, l_len, l_pid


def image_locked(path: str | os.PathLike[str]) -> bool:
    """Whether a QEMU process (a VM, qemu-nbd, qemu-img, qemu-io) has the image
    (a file or block device) open: it holds its lock bytes."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        for start, length in _LOCK_RANGES:
            probe = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, start, length, 0)
            answer = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, probe)
            if struct.unpack(_FLOCK, answer)[0] != fcntl.F_UNLCK:
                return True
    finally:
        os.close(fd)
    return False


def io(path: str | os.PathLike[str], *commands: str, fmt: str = "qcow2") -> str:
    """Run qemu-io commands (e.g. "write -P 1 0 64k", "write -z 1M 64k") on an image."""
    cmd = ["qemu-io", "-f", fmt]
    for c in commands:
        cmd += ["-c", c]
    return run([*cmd, os.fspath(path)])


# ----------------------------------------------------------------------------
# Helper processes die with us

_libc = ctypes.CDLL(None, use_errno=True)
_PR_SET_PDEATHSIG = 1


def _die_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None]:
    """A preexec_fn: the child gets `sig` when the thread that started it dies,
    even by SIGKILL, so that no server is left holding a guest's disk (and its
    image lock) or a mount point after a crash.  Start such children from a
    thread that outlives them."""
    parent = os.getpid()

    def preexec() -> None:
        _libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl
            os._exit(1)

    return preexec


# ----------------------------------------------------------------------------
# Private run directories (sockets, pid files, mount points)

RUN_BASE = "/run/dirbackup"
RUN_DIR_VARIABLE = "DIRBACKUP_RUN_DIR"
OWNER = ".owner"


def run_base() -> str:
    """Where private sockets and mount points go: $DIRBACKUP_RUN_DIR if set
    (made if missing; keep it short: socket paths are limited to 107 bytes),
    /run/dirbackup as root, the temporary directory otherwise."""
    chosen = os.environ.get(RUN_DIR_VARIABLE)
    if chosen:
        os.makedirs(chosen, mode=0o700, exist_ok=True)
        return chosen
    if os.geteuid() == 0 and os.path.isdir("/run"):
        os.makedirs(RUN_BASE, mode=0o700, exist_ok=True)
        return RUN_BASE
    return tempfile.gettempdir()


def make_rundir(prefix: str) -> Path:
    """A new private directory owned by this process; the ones left by dead
    processes are removed first."""
    base = run_base()
    clean_stale_rundirs(base)
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=base))
    (path / OWNER).write_text(owner_line())
    return path


def clean_stale_rundirs(base: str | None = None) -> list[str]:
    """Remove private directories whose owner is gone (killed, say), after
    detaching what is still mounted in them -- a FUSE mount whose nbdfuse was
    killed too is dead (stat fails with ENOTCONN) but still mounted.  Only
    directories with an owner file of ours are touched, and only mounts inside
    them; the owner file goes last, so that a directory that could not be
    emptied is retried by the next run instead of being left for good."""
    from dirbackup.mount import loop_mounts_over, mounts_below

    base = base or run_base()
    removed = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(base):
            if not entry.is_dir(follow_symlinks=False):
                continue
            try:
                owner = Path(entry.path, OWNER).read_text()
            except OSError:
                continue  # not one of ours, or not ours to judge
            if not owner.strip() or owner_alive(owner):
                continue  # empty: being written by its (live) owner just now
            real = os.path.realpath(entry.path)
            for point in loop_mounts_over(real):  # `dirbackup mount`'s file system first
                subprocess.run(["umount", "-l", point], capture_output=True, check=False)
            for point in mounts_below(real):
                for cmd in (["fusermount3", "-u", "-z"], ["umount", "-l"]):
                    done = subprocess.run([*cmd, point], capture_output=True, check=False)
                    if done.returncode == 0:
                        break
            if mounts_below(real):
                continue  # never delete through a mount: the next run tries again
            stop_helpers_of(real)
            if _remove_rundir(Path(entry.path)):
                removed.append(entry.path)
    return removed


def _remove_rundir(path: Path) -> bool:
    """Remove a run directory, its owner file last; False if anything stays."""
    with contextlib.suppress(OSError):
        for sub in os.scandir(path):
            if sub.name == OWNER:
                continue
            if sub.is_dir(follow_symlinks=False):
                shutil.rmtree(sub.path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.unlink(sub.path)
    try:
        if any(sub.name != OWNER for sub in os.scandir(path)):
            return False
        (path / OWNER).unlink(missing_ok=True)
        path.rmdir()
    except OSError:
        return False
    return True


# ----------------------------------------------------------------------------
# qemu-nbd


@dataclass
class NbdServer:
    """A qemu-nbd process serving one image on a Unix socket (a child of ours
    that dies with us)."""

    socket: str
    export: str
    pid: int
    pidfile: str = field(repr=False)
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def uri(self) -> str:
        return f"nbd+unix:///{self.export}?socket={self.socket}"

    def kill(self, sig: int = signal.SIGTERM) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, sig)

    def stop(self, timeout: float = 10.0) -> None:
        """Terminate the server and wait until it is gone."""
        with timings.phase("qemu-nbd stop"):
            self._stop(timeout)

    def _stop(self, timeout: float) -> None:
        self.kill(signal.SIGTERM)
        self.kill(signal.SIGCONT)  # a stopped server acts on the SIGTERM
        deadline = time.monotonic() + timeout
        again = time.monotonic() + 0.5
        while _alive(self.pid):
            now = time.monotonic()
            if now > deadline:
                self.kill(signal.SIGKILL)
                deadline = now + timeout
            elif now > again:  # qemu-nbd can miss a SIGTERM that comes early
                self.kill(signal.SIGTERM)
                again = now + 0.5
            time.sleep(0.01)
        if self.process is not None:
            self.process.wait()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.pidfile)


def stop_owner(line: str, timeout: float = 10.0, *, wait_first: float = 0.0) -> None:
    """Stop the process an owner line names (procs.owner_line), if it still
    runs: given `wait_first` seconds to exit by itself, then SIGTERM, then
    SIGKILL after `timeout`.  A process of another start time (a reused pid)
    is never signalled."""
    deadline = time.monotonic() + wait_first
    while owner_alive(line) and time.monotonic() < deadline:
        time.sleep(0.01)
    pid = int(line.split()[0])
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not owner_alive(line):
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
            os.kill(pid, signal.SIGCONT)  # a stopped process acts on the SIGTERM
        deadline = time.monotonic() + timeout
        while owner_alive(line) and time.monotonic() < deadline:
            time.sleep(0.01)


_HELPERS = ("qemu-nbd", "nbdfuse")


def stop_helpers_of(rundir: str, wait_first: float = 1.0) -> None:
    """Stop what still names a run directory (a real path) on its command
    line: helpers started for it but never recorded (their starter was killed
    in between), given `wait_first` seconds to exit by themselves -- nbdfuse
    exits once unmounted, qemu-nbd once its client has gone."""
    for line in reversed(processes_naming(rundir, _HELPERS)):  # the client before its server
        stop_owner(line, wait_first=wait_first)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def start_nbd(
    image: str | os.PathLike[str] | None,
    socket: str,
    *,
    export: str = "",
    fmt: str | None = "qcow2",
    readonly: bool = True,
    bitmap: str | None = None,
    shared: int = 8,
    image_opts: str | None = None,
    extra: Sequence[str] = (),
    persistent: bool = True,
    detached: bool = False,
) -> NbdServer:
    """Start qemu-nbd on `socket` and return once it accepts connections.

    `image_opts` (a QEMU option string) replaces `image` + `fmt`, so that a
    validated chain can be given layer by layer.  `shared` > 1 lets clients
    open several connections (and makes a read-only export multi-conn).
    `persistent=False`: the server exits when its (last) client disconnects.
    `detached`: the server outlives us (its own session, not killed when we
    die) -- for `dirbackup mount`, whose servers stay until `umount`.
    """
    fd, pidfile = tempfile.mkstemp(prefix="qemu-nbd-", suffix=".pid", dir=os.path.dirname(socket))
    os.close(fd)
    cmd = ["qemu-nbd", *(["--persistent"] if persistent else []), f"--pid-file={pidfile}"]
    cmd.append(f"--socket={socket}")
    cmd += [f"--export-name={export}", f"--shared={shared}"]
    if readonly:
        cmd.append("--read-only")
    if bitmap:
        cmd.append(f"--bitmap={bitmap}")
    cmd += list(extra)
    if image_opts is not None:
        cmd += ["--image-opts", image_opts]
    else:
        if fmt:
            cmd.append(f"--format={fmt}")
        cmd.append(os.fspath(image or ""))
    # Not --fork: a daemon would outlive us if we were killed, keeping the
    # guest's image open and locked.  Ready when it has written its pid file.
    # A read-only server is killed outright when we die: qemu-nbd loses a
    # SIGTERM that comes while it starts up, and has nothing to write back.
    with tempfile.TemporaryFile() as err:
        try:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                start_new_session=detached,
                preexec_fn=None
                if detached
                else _die_with_parent(signal.SIGKILL if readonly else signal.SIGTERM),
            )
        except FileNotFoundError:
            os.unlink(pidfile)
            raise ToolError("qemu-nbd is not installed (make setup installs it)") from None
        deadline = time.monotonic() + 60
        while Path(pidfile).read_text().strip() != str(proc.pid):
            late = time.monotonic() > deadline
            if proc.poll() is not None or late:
                if late:
                    proc.kill()
                proc.wait()
                err.seek(0)
                msg = err.read().decode(errors="replace").strip()
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(pidfile)
                if late:
                    msg = f"did not start within 60 s {msg}".strip()
                raise tool_error(["qemu-nbd"], msg, proc.returncode or 0)
            time.sleep(0.002)
    pid = proc.pid
    return NbdServer(socket=socket, export=export, pid=pid, pidfile=pidfile, process=proc)


@contextlib.contextmanager
def serve_nbd(
    image: str | os.PathLike[str] | None, socket: str, **kwargs: Any
) -> Iterator[NbdServer]:
    """start_nbd() as a context manager that always stops the server."""
    server = start_nbd(image, socket, **kwargs)
    try:
        yield server
    finally:
        server.stop()


# ----------------------------------------------------------------------------
# nbdfuse


@dataclass
class FuseFile:
    """An NBD export exposed as a read-only file by nbdfuse."""

    mountpoint: Path
    path: Path
    pid: int
    process: subprocess.Popen[bytes] = field(repr=False)

    def stop(self, timeout: float = 10.0) -> None:
        """Unmount and wait for nbdfuse to exit (killed if it does not).  A
        mount that is still busy is one whose reads hang (a reader's file
        descriptors are closed by now): nbdfuse is killed at once, which ends
        those reads, and the dead mount detached."""
        done = subprocess.run(
            ["fusermount3", "-u", str(self.mountpoint)], capture_output=True, check=False
        )
        try:
            self.process.wait(timeout if done.returncode == 0 else 0)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            subprocess.run(
                ["fusermount3", "-u", "-z", str(self.mountpoint)],
                capture_output=True,
                check=False,
            )


def start_nbdfuse(
    mountpoint: Path, filename: str, uri: str, timeout: float = 30.0, *, detached: bool = False
) -> FuseFile:
    """Mount `uri` read-only as mountpoint/filename; return once the file
    exists.  `detached`: nbdfuse outlives us (until unmounted)."""
    pidfile = mountpoint.parent / f".{mountpoint.name}.pid"
    pidfile.unlink(missing_ok=True)
    errfile = mountpoint.parent / f".{mountpoint.name}.err"  # a pipe would outlive its reader
    try:
        with open(errfile, "wb") if detached else contextlib.nullcontext() as errors:
            proc = subprocess.Popen(
                ["nbdfuse", "-r", "-P", str(pidfile), f"{mountpoint}/{filename}", uri],
                stdout=subprocess.DEVNULL,
                stderr=errors if detached else subprocess.PIPE,
                start_new_session=True,
                preexec_fn=None if detached else _die_with_parent(),  # unmounts on SIGTERM
            )
    except FileNotFoundError:
        raise ToolError("nbdfuse is not installed (Debian package libnbd-bin)") from None
    deadline = time.monotonic() + timeout
    while not pidfile.exists():
        if proc.poll() is not None:
            if detached:
                err = errfile.read_text(errors="replace").strip()
            else:
                err = proc.stderr.read().decode(errors="replace").strip() if proc.stderr else ""
            raise ToolError(f"nbdfuse: {err or f'exited with status {proc.returncode}'}")
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise ToolError(f"nbdfuse did not mount {uri} within {timeout:.0f} s")
        time.sleep(0.02)
    pidfile.unlink(missing_ok=True)
    return FuseFile(mountpoint, mountpoint / filename, proc.pid, proc)
