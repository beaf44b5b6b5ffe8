"""Mount a squashfs image read-only for a 'directory' restore, and always unmount it.

Why two ways: the kernel's squashfs driver over a loop device is the fast one and
needs root plus a free loop device; inside a container or as another user it is
not available, and squashfuse (FUSE, user space) is.  squashfuse_ll is preferred
over squashfuse: the high-level squashfuse invents inode numbers, so hard links
in the image look like separate files and a copy would duplicate them.

The mount point belongs to the caller.  We create nothing else: if the mount
point does not exist it is created (its parent must) and removed again on
unmount.  The mount is `nodev,nosuid`: a backup image must not grant device
access or privileges; modes are still reported as stored.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path
from types import TracebackType

from dirbackup.api import LogFunction
from dirbackup.errors import ContainerError
from dirbackup.toolrun import capture, resolve_log, run_tool

_MOUNT_OPTIONS = "ro,nodev,nosuid"

#: How long unmount keeps retrying a busy mount before detaching it lazily.
_BUSY_RETRY_SECONDS = 2.0


def _unescape_mountinfo(field: str) -> str:
    r"""/proc/self/mountinfo writes space, tab, newline and backslash as \040 etc."""
    out: list[str] = []
    i = 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def is_mount_point(path: str) -> bool:
    """Whether something is mounted on `path` (a real path), per mountinfo.

    Unlike os.path.ismount this works on a FUSE mount whose daemon died (stat
    then fails with ENOTCONN), which is exactly when unmounting matters."""
    with open("/proc/self/mountinfo", "rb") as f:
        for raw in f:
            fields = raw.decode("utf-8", "surrogateescape").split(" ")
            if len(fields) > 4 and _unescape_mountinfo(fields[4]) == path:
                return True
    return False


def mounts_below(path: str) -> list[str]:
    """Mount points at `path` (a real path) or below it, deepest first, per
    mountinfo (also the dead FUSE mounts that os.path.ismount cannot see)."""
    prefix = path.rstrip("/") + "/"
    found = []
    with open("/proc/self/mountinfo", "rb") as f:
        for raw in f:
            fields = raw.decode("utf-8", "surrogateescape").split(" ")
            if len(fields) > 4:
                point = _unescape_mountinfo(fields[4])
                if point == path or point.startswith(prefix):
                    found.append(point)
    return sorted(set(found), key=len, reverse=True)


def loop_mounts_over(path: str) -> list[str]:
    """Mount points of file systems on loop devices (or their partitions)
    whose backing file lies at or below `path` (a real path): what `dirbackup
    mount` mounted from a file of its run directory."""
    prefix = path.rstrip("/") + "/"
    found = []
    with open("/proc/self/mountinfo", "rb") as f:
        for raw in f:
            fields = raw.decode("utf-8", "surrogateescape").split(" ")
            if " - " not in raw.decode("utf-8", "surrogateescape") or len(fields) < 5:
                continue
            source = fields[fields.index("-") + 2]
            match = re.fullmatch(r"/dev/(loop\d+)(?:p\d+)?", source)
            if match is None:
                continue
            try:
                with open(f"/sys/block/{match.group(1)}/loop/backing_file") as b:
                    backing = b.read().strip()
            except OSError:
                continue
            if backing == path or backing.startswith(prefix):
                found.append(_unescape_mountinfo(fields[4]))
    return sorted(set(found), key=len, reverse=True)


def loop_devices_over(path: str) -> list[str]:
    """Loop devices whose backing file lies at or below `path` (a real path)."""
    prefix = path.rstrip("/") + "/"
    found = []
    with os.scandir("/sys/block") as entries:
        for entry in entries:
            if not entry.name.startswith("loop"):
                continue
            try:
                with open(f"/sys/block/{entry.name}/loop/backing_file") as b:
                    backing = b.read().strip()
            except OSError:
                continue
            if backing == path or backing.startswith(prefix):
                found.append(f"/dev/{entry.name}")
    return sorted(found)


def fuse_version(program: str) -> tuple[int, ...] | None:
    """squashfuse's version from `-V` (None if it does not say).

    Needed because squashfuse before 0.2.0 swaps the security and trusted xattr
    namespaces (vasi/squashfuse#83); Debian 12 ships such a version."""
    said = capture([program, "-V"], timeout=10)
    if said is None:
        return None
    match = re.search(rb"squashfuse\S* (\d+)\.(\d+)(?:\.(\d+))?", said)
    if match is None:
        return None
    return tuple(int(part) for part in match.groups(b"0"))


class SquashfsMount:
    """A squashfs image mounted read-only on `mountpoint`; a context manager.

    `use_fuse`: None (default) mounts with a loop device when root and falls
    back to squashfuse when that fails (or when not root); True forces
    squashfuse; False forces the loop device.  `mount()`/`unmount()` can also
    be called directly (the provider mounts in restore init and unmounts in
    cleanup).  `unmount()` is idempotent and works after a failed mount too.
    """

    def __init__(
        self,
        image: Path,
        mountpoint: Path,
        *,
        use_fuse: bool | None = None,
        log: LogFunction | None = None,
    ) -> None:
        self.image = Path(image)
        self.mountpoint = Path(mountpoint)
        self.use_fuse = use_fuse
        self.method: str | None = None  # "loop" or "fuse" while mounted
        #: True when the FUSE driver misreports security.*/trusted.* xattrs (logged).
        self.xattr_namespaces_swapped = False
        self._log = resolve_log(log)
        self._created_mountpoint = False
        self._real = os.path.realpath(self.mountpoint)

    @property
    def mounted(self) -> bool:
        return is_mount_point(self._real)

    # -- mounting ----------------------------------------------------------

    def _prepare_mountpoint(self) -> None:
        if not self.image.is_file():
            raise ContainerError(f"squashfs image {self.image} does not exist")
        if self.mounted:
            raise ContainerError(f"{self.mountpoint} is already a mount point")
        try:
            self.mountpoint.mkdir()
            self._created_mountpoint = True
        except FileExistsError:
            if not self.mountpoint.is_dir():
                raise ContainerError(f"mount point {self.mountpoint} is not a directory") from None
            if any(self.mountpoint.iterdir()):
                raise ContainerError(f"mount point {self.mountpoint} is not empty") from None
        except OSError as e:
            raise ContainerError(
                f"cannot create mount point {self.mountpoint}: {e.strerror}"
            ) from None
        self._real = os.path.realpath(self.mountpoint)

    def _mount_loop(self) -> None:
        run_tool(
            [
                "mount",
                "-t",
                "squashfs",
                "-o",
                f"{_MOUNT_OPTIONS},loop",
                os.path.abspath(self.image),
                self._real,
            ],
            name="mount",
            log=self._log,
        )
        self.method = "loop"

    def _mount_fuse(self) -> None:
        program = shutil.which("squashfuse_ll")
        if program is None:
            program = shutil.which("squashfuse")
            if program is None:
                raise ContainerError("squashfuse is not installed")
            self._log(
                "warn",
                "squashfuse_ll not found: hard links in the image will look like separate files",
            )
        run_tool(
            [program, "-o", _MOUNT_OPTIONS, os.path.abspath(self.image), self._real],
            name=os.path.basename(program),
            log=self._log,
        )
        self.method = "fuse"
        version = fuse_version(program)
        self.xattr_namespaces_swapped = version is not None and version < (0, 2)
        if self.xattr_namespaces_swapped:
            self._log(
                "warn",
                f"{os.path.basename(program)} {'.'.join(map(str, version or ()))} "
                "shows security.* xattrs as trusted.* and the reverse (fixed in "
                "squashfuse 0.2.0): file capabilities read from this mount are wrong",
            )

    def mount(self) -> Path:
        """Mount the image; return the mount point.  ContainerError if neither way works."""
        if self.method is not None:
            return self.mountpoint
        self._prepare_mountpoint()  # before the try: a foreign mount there is not ours to undo
        try:
            if self.use_fuse is not True and os.geteuid() == 0:
                try:
                    self._mount_loop()
                except ContainerError as e:
                    if self.use_fuse is False:
                        raise
                    self._log("warn", f"loop mount of {self.image} failed ({e}); using squashfuse")
            elif self.use_fuse is False:
                raise ContainerError("a loop mount needs root")
            if self.method is None:
                self._mount_fuse()
            if not self.mounted:
                raise ContainerError(f"{self.image} did not appear on {self.mountpoint}")
        except BaseException:
            self.unmount()
            raise
        self._log("info", f"mounted {self.image} on {self.mountpoint} ({self.method})")
        return self.mountpoint

    # -- unmounting --------------------------------------------------------

    def _unmount_commands(self, lazy: bool) -> list[list[str]]:
        commands: list[list[str]] = []
        if self.method != "loop":
            for program in ("fusermount3", "fusermount"):
                if shutil.which(program):
                    commands.append([program, "-u", *(["-z"] if lazy else []), self._real])
                    break
        if os.geteuid() == 0:
            commands.append(["umount", *(["--lazy"] if lazy else []), self._real])
        return commands

    def _try_unmount(self, lazy: bool) -> str:
        """Try each way once; return the last error message ('' when unmounted)."""
        error = ""
        for argv in self._unmount_commands(lazy):
            try:
                run_tool(argv, name=argv[0], log=lambda level, message: None)
            except ContainerError as e:
                error = str(e)
            if not self.mounted:
                return ""
        return error or "no unmount command available"

    def unmount(self) -> None:
        """Unmount (idempotent).  A busy mount is retried, then detached lazily."""
        if self.mounted:
            deadline = time.monotonic() + _BUSY_RETRY_SECONDS
            error = self._try_unmount(lazy=False)
            while error and time.monotonic() < deadline:
                time.sleep(0.1)
                error = self._try_unmount(lazy=False) if self.mounted else ""
            if error and self.mounted:
                self._log("warn", f"{self.mountpoint} is busy ({error}); detaching it lazily")
                error = self._try_unmount(lazy=True)
            if self.mounted:
                raise ContainerError(f"cannot unmount {self.mountpoint}: {error}")
            self._log("info", f"unmounted {self.mountpoint}")
        self.method = None
        if self._created_mountpoint:
            try:
                self.mountpoint.rmdir()
                self._created_mountpoint = False
            except OSError:
                pass

    def __enter__(self) -> SquashfsMount:
        self.mount()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.unmount()
