"""QEMU's tools as processes: qemu-img, qemu-io, qemu-nbd and nbdfuse.

Everything here runs the real programs from Debian's qemu-utils and
libnbd-bin; errors carry the program's own message.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dirbackup.errors import DirbackupError


class ToolError(DirbackupError):
    """A QEMU or libnbd tool failed; the message holds its stderr."""


def run(cmd: Sequence[str], *, input: bytes | None = None, timeout: float | None = 600) -> str:
    """Run a tool, return its stdout; raise ToolError with its stderr on failure."""
    try:
        proc = subprocess.run(
            list(cmd), input=input, capture_output=True, timeout=timeout, check=False
        )
    except FileNotFoundError:
        raise ToolError(f"{cmd[0]} is not installed (make setup installs it)") from None
    except subprocess.TimeoutExpired:
        raise ToolError(f"{cmd[0]} did not finish within {timeout} s") from None
    if proc.returncode != 0:
        msg = proc.stderr.decode(errors="replace").strip() or f"exit status {proc.returncode}"
        raise ToolError(f"{' '.join(cmd[:2])}: {msg}")
    return proc.stdout.decode(errors="replace")


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


def io(path: str | os.PathLike[str], *commands: str, fmt: str = "qcow2") -> str:
    """Run qemu-io commands (e.g. "write -P 1 0 64k", "write -z 1M 64k") on an image."""
    cmd = ["qemu-io", "-f", fmt]
    for c in commands:
        cmd += ["-c", c]
    return run([*cmd, os.fspath(path)])


# ----------------------------------------------------------------------------
# qemu-nbd


@dataclass
class NbdServer:
    """A qemu-nbd process serving one image on a Unix socket."""

    socket: str
    export: str
    pid: int
    pidfile: str = field(repr=False)

    @property
    def uri(self) -> str:
        return f"nbd+unix:///{self.export}?socket={self.socket}"

    def kill(self, sig: int = signal.SIGTERM) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, sig)

    def stop(self, timeout: float = 10.0) -> None:
        """Terminate the server and wait until it is gone."""
        self.kill(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _alive(self.pid):
            if time.monotonic() > deadline:
                self.kill(signal.SIGKILL)
                deadline = time.monotonic() + timeout
            time.sleep(0.01)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.pidfile)


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
) -> NbdServer:
    """Start qemu-nbd on `socket` and return once it accepts connections.

    `image_opts` (a QEMU option string) replaces `image` + `fmt`, so that a
    validated chain can be given layer by layer.  `shared` > 1 lets clients
    open several connections (and makes a read-only export multi-conn).
    """
    fd, pidfile = tempfile.mkstemp(prefix="qemu-nbd-", suffix=".pid", dir=os.path.dirname(socket))
    os.close(fd)
    cmd = ["qemu-nbd", "--fork", "--persistent", f"--pid-file={pidfile}", f"--socket={socket}"]
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
    try:
        run(cmd, timeout=60)
    except ToolError:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(pidfile)
        raise
    pid = int(Path(pidfile).read_text().strip())
    return NbdServer(socket=socket, export=export, pid=pid, pidfile=pidfile)


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
        """Unmount and wait for nbdfuse to exit (killed if it does not)."""
        subprocess.run(
            ["fusermount3", "-u", str(self.mountpoint)], capture_output=True, check=False
        )
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            subprocess.run(
                ["fusermount3", "-u", "-z", str(self.mountpoint)],
                capture_output=True,
                check=False,
            )


def start_nbdfuse(mountpoint: Path, filename: str, uri: str, timeout: float = 30.0) -> FuseFile:
    """Mount `uri` read-only as mountpoint/filename; return once the file exists."""
    pidfile = mountpoint.parent / f".{mountpoint.name}.pid"
    pidfile.unlink(missing_ok=True)
    try:
        proc = subprocess.Popen(
            ["nbdfuse", "-r", "-P", str(pidfile), f"{mountpoint}/{filename}", uri],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
    except FileNotFoundError:
        raise ToolError("nbdfuse is not installed (Debian package libnbd-bin)") from None
    deadline = time.monotonic() + timeout
    while not pidfile.exists():
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace").strip() if proc.stderr else ""
            raise ToolError(f"nbdfuse: {err or f'exited with status {proc.returncode}'}")
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise ToolError(f"nbdfuse did not mount {uri} within {timeout:.0f} s")
        time.sleep(0.02)
    pidfile.unlink(missing_ok=True)
    return FuseFile(mountpoint, mountpoint / filename, proc.pid, proc)
