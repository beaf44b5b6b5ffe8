"""Container archives: a root directory as a tar archive or a squashfs image, and back.

This is the low-level layer of container backup and restore.  The provider
decides where archives go and logs through its `log(level, message)`; here we
run the tools and make sure that what they produce is complete, verified and
means the same thing whichever format is chosen.  Both formats stay in one
module (about 680 lines, longer than most) for that reason: what tar leaves
out decides what mksquashfs gets, and their restores share one set of checks.

tar
    GNU tar with the flags of Proxmox's own container backups (vzdump): ACLs,
    `user.*` and `security.capability` xattrs, numeric owners, sparse files, one
    file system.  Exclude patterns have vzdump's meaning: a pattern with a
    leading `/` is anchored at the container's root, any other matches at any
    depth; `lost+found` is always left out.  tar writes to a pipe and *our* loop
    copies the stream into the archive: it applies the bandwidth limit, computes
    the SHA-256 on the way (no second read of a large file) and fsyncs at the
    end.  tar's exit status 1 ("file changed as we read it") is a warning, as in
    vzdump; anything else fails the backup and removes the partial archive.

squashfs
    mksquashfs reads the directory itself (feeding it a tar stream would be
    neater, but squashfs-tools 4.5.1 then loses the root directory's owner and
    mangles long symlink targets).  Its own exclude patterns mean something else
    than tar's (see `dirbackup.tarnames`), so tar decides what is left out and
    mksquashfs receives those paths as literal names: both formats exclude the
    same entries by construction.  mksquashfs cannot be rate-limited through a
    pipe; the bandwidth limit pauses it instead (`ratelimit.ProcessReadThrottle`).
    squashfs has no POSIX ACLs: they are reported, not silently dropped.

restore
    `extract_tar` undoes a tar archive with owners, modes, ACLs and all stored
    xattrs; `copy_tree` copies a mounted squashfs image (or any directory)
    keeping owners, modes, times, xattrs, ACLs, hard links and holes;
    `SquashfsMount` mounts an image read-only, by loop device or squashfuse.

Errors a user can act on raise `ContainerError` with one line; cancellation
raises `Cancelled`.  Neither leaves a partial archive behind.  `log` is called
from a helper thread that reads the tool's messages while it runs.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import select
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from dirbackup.api import LogFunction
from dirbackup.errors import Cancelled, ContainerError
from dirbackup.mount import SquashfsMount
from dirbackup.ratelimit import ProcessReadThrottle, TokenBucket
from dirbackup.tarnames import excluded_entries
from dirbackup.toolrun import PIPE, Tool, resolve_log, run_tool

__all__ = [
    "ArchiveResult",
    "ContainerError",
    "SquashfsMount",
    "copy_tree",
    "create_squashfs",
    "create_tar",
    "extract_tar",
    "squashfs_command",
    "squashfs_exclusions",
    "tar_command",
    "verify_archive",
]

#: The flags of PVE::Storage::Plugin::COMMON_TAR_FLAGS plus vzdump's
#: --one-file-system: what a container backup keeps, and the warnings it mutes
#: (sockets are skipped on purpose; xattrs outside the list are not an error).
TAR_FLAGS = (
    "--one-file-system",
    "-p",
    "--sparse",
    "--numeric-owner",
    "--acls",
    "--xattrs",
    "--xattrs-include=user.*",
    "--xattrs-include=security.capability",
    "--warning=no-file-ignored",
    "--warning=no-xattr-write",
)

#: tar's closing lines that never say what went wrong.
_TAR_TRAILERS = ("Exiting with failure status", "Error is not recoverable", "Total bytes")

#: Chunk size of the tar stream loop; the pipe is widened to match.
_CHUNK = 1 << 20

#: Longest exclude line we hand mksquashfs in a file (its limit is 16384 bytes).
_MAX_EXCLUDE_LINE = 16000

#: Archives hold a whole container's files (/etc/shadow...): private by default.
_ARCHIVE_MODE = 0o600

_SQUASHFS_MAGIC = b"hsqs"
_TAR_MAGIC_OFFSET = 257


@dataclass(frozen=True)
class ArchiveResult:
    """What was written: enough for the manifest without reading the archive again."""

    path: Path  # the archive written
    size: int  # bytes
    sha256: str  # hex digest of the archive file
    warnings: tuple[str, ...]  # tool warnings (also sent to log)


# ----------------------------------------------------------------------------
# Commands


def _check_text(value: str, what: str) -> None:
    """A NUL cannot be passed to a program; say so instead of a traceback."""
    if "\0" in value:
        raise ContainerError(f"{what} {value!r} contains a NUL byte")


def _split_patterns(patterns: Sequence[str]) -> tuple[list[str], list[str]]:
    """vzdump's rule: a leading `/` anchors a pattern at the root, else it floats."""
    floating: list[str] = []
    anchored: list[str] = []
    for pattern in patterns:
        _check_text(pattern, "exclude pattern")
        if not pattern:
            raise ContainerError("empty exclude pattern")
        (anchored if pattern.startswith("/") else floating).append(pattern)
    return floating, anchored


def _check_sources(sources: Sequence[str]) -> None:
    """Sources are paths inside the container root; never outside it."""
    if not sources:
        raise ContainerError("no sources to archive")
    for source in sources:
        _check_text(source, "source")
        if not source or source.startswith("/") or ".." in source.split("/"):
            raise ContainerError(f"source {source!r} must be a relative path inside the directory")


def _tar_create_argv(
    directory: Path,
    sources: Sequence[str],
    exclude_patterns: Sequence[str],
    *,
    archive: str,
    extra: Sequence[str] = (),
) -> list[str]:
    floating, anchored = _split_patterns(exclude_patterns)
    _check_sources(sources)
    _check_text(os.fspath(directory), "directory")
    return [
        "tar",
        "--create",
        f"--file={archive}",
        *extra,
        *TAR_FLAGS,
        f"--directory={os.fspath(directory)}",
        "--no-anchored",
        "--exclude=lost+found",
        *(f"--exclude={p}" for p in floating),
        "--anchored",
        *(f"--exclude=.{p}" for p in anchored),
        "--",
        *sources,
    ]


def tar_command(
    directory: Path, sources: Sequence[str], exclude_patterns: Sequence[str]
) -> list[str]:
    """The tar command that writes the archive of `directory` to stdout.

    `sources` are relative to `directory` ("." for all of it, "./mnt/data" for a
    mount point of the container); `exclude_patterns` have vzdump's meaning
    (leading `/`: anchored at the root; otherwise: at any depth)."""
    return _tar_create_argv(directory, sources, exclude_patterns, archive="-", extra=("--totals",))


def _mksquashfs_literal(path: bytes) -> bytes:
    """A path as an mksquashfs -wildcards pattern that matches only itself.

    Every byte that is not plainly literal gets a backslash: glob characters,
    extended-glob parentheses, and spaces (an unescaped "... " prefix would mean
    "at any depth")."""
    return re.sub(rb"[^A-Za-z0-9._/-]", lambda m: b"\\" + m.group(), path)


def squashfs_command(
    directory: Path,
    target: Path,
    exclude_file: Path | None = None,
    excluded: Sequence[bytes] = (),
) -> list[str]:
    """The mksquashfs command that writes `directory` as the image `target`.

    Exclusions are literal paths, not patterns: `exclude_file` holds them one a
    line as `create_squashfs` writes them, `excluded` (relative paths) go on the
    command line (for names a line cannot hold, e.g. with a newline).  Use
    `squashfs_exclusions` to turn vzdump patterns into paths.

    -exit-on-error: by default mksquashfs stores an unreadable file as an empty
    one and carries on, a silently broken backup."""
    argv = [
        "mksquashfs",
        os.path.abspath(directory),
        os.path.abspath(target),
        "-quiet",
        "-no-progress",
        "-noappend",
        "-xattrs",
        "-exit-on-error",
        "-wildcards",
    ]
    if exclude_file is not None:
        argv += ["-ef", os.fspath(exclude_file)]
    if excluded:
        argv += ["-e", *(os.fsdecode(_mksquashfs_literal(p)) for p in excluded)]
    return argv


# ----------------------------------------------------------------------------
# Checks shared by the entry points


def _require_directory(path: Path, what: str = "source directory") -> None:
    if not path.exists():
        raise ContainerError(f"{what} {path} does not exist")
    if not path.is_dir():
        raise ContainerError(f"{what} {path} is not a directory")


def _require_new_target(target: Path, directory: Path) -> None:
    """The archive goes to a new file outside the tree being archived.

    Inside the tree, tar would read the archive while writing it; an existing
    file may be a good archive that a retry must not destroy."""
    parent = target.parent
    if not parent.is_dir():
        raise ContainerError(f"target directory {parent} does not exist")
    if os.path.lexists(target):
        raise ContainerError(f"target {target} already exists")
    real_target = Path(os.path.realpath(parent)) / target.name
    if real_target.is_relative_to(os.path.realpath(directory)):
        raise ContainerError(f"target {target} is inside the directory being archived")


def _create_new(target: Path) -> int:
    try:
        return os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, _ARCHIVE_MODE)
    except OSError as e:
        raise ContainerError(f"cannot create {target}: {e.strerror}") from None


def _remove_partial(target: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(target)


# ----------------------------------------------------------------------------
# tar


class _TargetWriteError(Exception):
    """The archive file refused a write (ENOSPC, EIO, ...): not tar's fault."""

    def __init__(self, error: OSError) -> None:
        super().__init__(error.strerror)
        self.error = error


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        try:
            n = os.write(fd, data)
        except OSError as e:
            raise _TargetWriteError(e) from None
        data = data[n:]


def _widen_pipe(pipe: IO[bytes]) -> None:
    """Ask for a 1 MiB pipe: fewer, larger reads than the 64 KiB default."""
    # capped by /proc/sys/fs/pipe-max-size for non-root: smaller is still correct
    with contextlib.suppress(OSError):
        fcntl.fcntl(pipe.fileno(), fcntl.F_SETPIPE_SZ, _CHUNK)


def _wait(cancel_event: threading.Event | None, seconds: float) -> None:
    """Sleep for the bandwidth limit, but wake at once on cancellation."""
    if cancel_event is not None:
        cancel_event.wait(seconds)
    else:
        threading.Event().wait(seconds)


def _pump(
    source: IO[bytes],
    fd: int,
    *,
    bandwidth_limit: int,
    cancel_event: threading.Event | None,
    what: str,
    progress: Callable[[int], None] | None = None,
) -> tuple[int, str]:
    """Copy the tar stream into the archive: rate limit, SHA-256, cancellation,
    `progress(bytes so far)` about every 0.25 s.

    Returns (bytes written, hex digest).  Polls with a timeout so that a cancel
    is seen within a fraction of a second even while tar is quiet (scanning)."""
    bucket = TokenBucket(bandwidth_limit) if bandwidth_limit > 0 else None
    chunk = _CHUNK if bucket is None else max(4096, min(_CHUNK, bandwidth_limit // 10))
    buf = bytearray(chunk)
    view = memoryview(buf)
    digest = hashlib.sha256()
    total = 0
    src = source.fileno()
    poller = select.poll()
    poller.register(src, select.POLLIN | select.POLLHUP | select.POLLERR)
    reported = time.monotonic()
    while True:
        if cancel_event is not None:
            if cancel_event.is_set():
                raise Cancelled(f"{what} cancelled")
            if not poller.poll(200):
                continue
        n = os.readv(src, [buf])
        if n == 0:
            return total, digest.hexdigest()
        data = view[:n]
        digest.update(data)
        _write_all(fd, data)
        total += n
        if progress is not None and time.monotonic() - reported >= 0.25:
            reported = time.monotonic()
            progress(total)
        if bucket is not None:
            delay = bucket.consume(n)
            if delay > 0:
                _wait(cancel_event, delay)


def _classify_tar(line: str) -> str:
    return "info" if line.startswith("Total bytes") else "warn"


def _fsync(fd: int, target: Path) -> None:
    try:
        os.fsync(fd)
    except OSError as e:
        raise ContainerError(f"cannot write {target}: {e.strerror}") from None


def create_tar(
    directory: Path,
    target: Path,
    *,
    sources: Sequence[str] = (".",),
    exclude_patterns: Sequence[str] = (),
    bandwidth_limit: int = 0,
    log: LogFunction | None = None,
    cancel_event: threading.Event | None = None,
    progress: Callable[[int], None] | None = None,
) -> ArchiveResult:
    """Write `directory` as a tar archive `target` (a new file, mode 0600).

    `bandwidth_limit` is in bytes/s of archive (0: none); `progress` gets the
    bytes of the tar stream written so far, a few times a second.  tar's messages go to
    `log` as "tar: ..." and into `warnings`.  Raises ContainerError (missing
    directory, tar failure, a full or read-only target...) or Cancelled when
    `cancel_event` is set; the partial archive is removed in every such case."""
    logf = resolve_log(log)
    directory, target = Path(directory), Path(target)
    argv = tar_command(directory, sources, exclude_patterns)
    _require_directory(directory)
    _require_new_target(target, directory)
    fd = _create_new(target)
    try:
        with Tool(argv, name="tar", log=logf, classify=_classify_tar, stdout=PIPE) as tar:
            _widen_pipe(tar.stdout)
            try:
                size, digest = _pump(
                    tar.stdout,
                    fd,
                    bandwidth_limit=bandwidth_limit,
                    cancel_event=cancel_event,
                    what=f"archiving {directory}",
                    progress=progress,
                )
            except _TargetWriteError as e:
                raise ContainerError(f"cannot write {target}: {e.error.strerror}") from None
            returncode = tar.wait()
        if returncode not in (0, 1):
            raise ContainerError(tar.failure(returncode, ignore=_TAR_TRAILERS))
        _fsync(fd, target)
    except BaseException:
        os.close(fd)
        _remove_partial(target)
        raise
    os.close(fd)
    warnings = tar.warnings()
    if returncode == 1 and not warnings:
        warnings.append("tar: some files differ from what was read (exit status 1)")
        logf("warn", warnings[-1])
    return ArchiveResult(target, size, digest, tuple(warnings))


# ----------------------------------------------------------------------------
# squashfs


def squashfs_exclusions(
    directory: Path, exclude_patterns: Sequence[str], *, log: LogFunction | None = None
) -> list[bytes]:
    """The entries of `directory` that a tar backup with `exclude_patterns` leaves out.

    Top-most entries only (an excluded directory stands for its contents), as
    paths relative to `directory`.  Asks tar itself (see `dirbackup.tarnames`),
    so the answer is tar's by construction: patterns, lost+found, other file
    systems, sockets."""
    logf = resolve_log(log)
    directory = Path(directory)
    _require_directory(directory)
    argv = _tar_create_argv(
        directory,
        ["."],
        exclude_patterns,
        archive="/dev/null",
        extra=("--verbose", "--quoting-style=escape"),
    )
    with Tool(argv, name="tar", log=logf, stdout=PIPE) as tar:
        excluded = excluded_entries(os.fsencode(directory), tar.stdout)
        returncode = tar.wait()
    if returncode not in (0, 1):
        raise ContainerError(tar.failure(returncode, ignore=_TAR_TRAILERS))
    return excluded


def _write_exclusions(file: IO[bytes], excluded: Sequence[bytes]) -> list[bytes]:
    """Write the exclusions that fit a line; return those for the command line.

    mksquashfs strips one leading backslash from each line (so that names may
    start with a space or `#`): every line gets one, in front of the escaped path."""
    rest: list[bytes] = []
    for path in excluded:
        literal = _mksquashfs_literal(path)
        if b"\n" in path or len(literal) >= _MAX_EXCLUDE_LINE:
            rest.append(path)
        else:
            file.write(b"\\" + literal + b"\n")
    file.flush()
    return rest


class _MksquashfsMessages:
    """Sorts mksquashfs's lines: POSIX ACLs, which squashfs cannot hold, are
    counted and reported once; everything else is a warning."""

    def __init__(self) -> None:
        self.acls = 0

    def __call__(self, line: str) -> str | None:
        if "xattr prefix system.posix_acl" in line:
            self.acls += 1
            return None
        return "warn"


def _run_mksquashfs(
    argv: list[str], bandwidth_limit: int, logf: LogFunction, messages: _MksquashfsMessages
) -> Tool:
    with Tool(argv, name="mksquashfs", log=logf, classify=messages, merge_stdout=True) as tool:
        throttle: ProcessReadThrottle | None = None
        if bandwidth_limit > 0:
            try:
                throttle = ProcessReadThrottle(tool.proc.pid, bandwidth_limit)
            except OSError as e:
                if tool.proc.poll() is None:  # else it is already done: nothing to limit
                    logf("warn", f"mksquashfs: bandwidth limit not applied: no I/O counters ({e})")
        try:
            while tool.proc.poll() is None:
                if throttle is not None:
                    try:
                        throttle.step()
                    except OSError:
                        throttle = None  # the process is exiting
                tool.wait_for(ProcessReadThrottle.INTERVAL if throttle else 1.0)
        finally:
            if throttle is not None:
                throttle.release()
        returncode = tool.wait()
    if returncode != 0:
        raise ContainerError(tool.failure(returncode))
    return tool


def _digest_and_sync(path: Path) -> tuple[int, str]:
    """Size and SHA-256 of a finished file, and make it durable."""
    digest = hashlib.sha256()
    size = 0
    try:
        with open(path, "rb") as f:
            buf = bytearray(_CHUNK)
            while n := f.readinto(buf):
                digest.update(memoryview(buf)[:n])
                size += n
            os.fsync(f.fileno())
    except OSError as e:
        raise ContainerError(f"cannot read back {path}: {e.strerror}") from None
    return size, digest.hexdigest()


def create_squashfs(
    directory: Path,
    target: Path,
    *,
    exclude_patterns: Sequence[str] = (),
    bandwidth_limit: int = 0,
    log: LogFunction | None = None,
) -> ArchiveResult:
    """Write `directory` as a squashfs image `target` (a new file, mode 0600).

    `exclude_patterns` mean exactly what they mean for `create_tar`.
    `bandwidth_limit` (bytes/s, 0: none) caps what mksquashfs reads from the
    container, by pausing it; it is not a limit on the (compressed) image
    written.  POSIX ACLs cannot be stored in squashfs: a warning says how many
    were left out.  Raises ContainerError; the partial image is removed."""
    logf = resolve_log(log)
    directory, target = Path(directory), Path(target)
    _split_patterns(exclude_patterns)
    _require_directory(directory)
    _require_new_target(target, directory)
    excluded = squashfs_exclusions(directory, exclude_patterns, log=logf)
    os.close(_create_new(target))  # claim the name with our mode; -noappend rewrites it
    messages = _MksquashfsMessages()
    try:
        with tempfile.NamedTemporaryFile(prefix="dirbackup-exclude-") as exclude_file:
            on_command_line = _write_exclusions(exclude_file, excluded)
            argv = squashfs_command(directory, target, Path(exclude_file.name), on_command_line)
            tool = _run_mksquashfs(argv, bandwidth_limit, logf, messages)
        size, digest = _digest_and_sync(target)
    except BaseException:
        _remove_partial(target)
        raise
    warnings = tool.warnings()
    if messages.acls:
        warnings.append(
            f"mksquashfs: squashfs cannot store POSIX ACLs: {messages.acls} ACL(s) "
            "were left out (the tar format keeps them)"
        )
        logf("warn", warnings[-1])
    return ArchiveResult(target, size, digest, tuple(warnings))


# ----------------------------------------------------------------------------
# Restore


def extract_tar(archive: Path, target_dir: Path, *, log: LogFunction | None = None) -> None:
    """Extract a tar archive into the existing directory `target_dir`, as root.

    Everything tar stored comes back: numeric owners, modes (setuid included),
    times, ACLs and all stored xattrs (`security.capability` is not extracted
    unless asked for), hard links, symlinks, devices, FIFOs, holes.  The root
    directory's own attributes are applied to `target_dir`."""
    logf = resolve_log(log)
    archive, target_dir = Path(archive), Path(target_dir)
    if not archive.is_file():
        raise ContainerError(f"archive {archive} does not exist")
    _require_directory(target_dir, "target directory")
    argv = [
        "tar",
        "--extract",
        f"--file={os.fspath(archive)}",
        f"--directory={os.fspath(target_dir)}",
        "--same-owner",
        "--same-permissions",
        "--numeric-owner",
        "--acls",
        "--xattrs",
        "--xattrs-include=*",
    ]
    run_tool(argv, name="tar", log=logf, ignore=_TAR_TRAILERS)


def copy_tree(source_dir: Path, target_dir: Path, *, log: LogFunction | None = None) -> None:
    """Copy `source_dir` (e.g. a mounted squashfs image) onto `target_dir`.

    Keeps numeric owners, modes, times, xattrs, ACLs, hard links (within the
    tree), symlinks as they are, devices and FIFOs; zero runs become holes
    (`--sparse=always`: a squashfuse mount reports sparse files as fully
    allocated, so only reading for zeros finds the holes).  `target_dir` may
    exist (the contents are merged into it and it takes the source root's
    attributes) or not (it is created; its parent must exist).  Attributes the
    target file system cannot hold are reported as warnings by cp."""
    logf = resolve_log(log)
    source_dir, target_dir = Path(source_dir), Path(target_dir)
    _require_directory(source_dir)
    if not target_dir.parent.is_dir():
        raise ContainerError(f"target directory {target_dir.parent} does not exist")
    argv = [
        "cp",
        "--recursive",
        "--no-dereference",
        "--preserve=all",
        "--sparse=always",
        "--no-target-directory",
        "--",
        os.fspath(source_dir),
        os.fspath(target_dir),
    ]
    run_tool(argv, name="cp", log=logf)


# ----------------------------------------------------------------------------
# Verify


def _archive_kind(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            head = f.read(_TAR_MAGIC_OFFSET + 8)
    except FileNotFoundError:
        raise ContainerError(f"archive {path} does not exist") from None
    except OSError as e:
        raise ContainerError(f"cannot read {path}: {e.strerror}") from None
    if head[:4] == _SQUASHFS_MAGIC:
        return "squashfs"
    if head[_TAR_MAGIC_OFFSET : _TAR_MAGIC_OFFSET + 5] == b"ustar":
        return "tar"
    raise ContainerError(f"{path} is neither a tar archive nor a squashfs image")


def _verify_tar(path: Path, logf: LogFunction) -> None:
    """List every member; require the end-of-archive blocks.

    GNU tar lists an archive cut at a member boundary without complaint; with
    --block-number it reports how the archive ended: '** Block of NULs **' for
    a proper end, '** End of File **' for a truncated one."""
    argv = [
        "tar",
        "--list",
        "--block-number",
        "--quoting-style=escape",
        f"--file={os.fspath(path)}",
    ]
    last = b""
    with Tool(argv, name="tar", log=logf, stdout=PIPE) as tar:
        for line in tar.stdout:
            last = line
        returncode = tar.wait()
    if returncode != 0:
        raise ContainerError(f"{path} is damaged: " + tar.failure(returncode, ignore=_TAR_TRAILERS))
    if any("lone zero block" in w for w in tar.warnings()) or b"** Block of NULs **" not in last:
        raise ContainerError(f"{path} is damaged: tar archive is truncated (no end-of-archive)")


def _verify_squashfs(path: Path, logf: LogFunction) -> None:
    """Superblock, then every directory and inode (`-lln` reads them all).

    Data blocks are not decompressed here; the SHA-256 in the manifest covers them."""
    for option in ("-s", "-lln"):
        argv = ["unsquashfs", option, os.fspath(path)]
        with Tool(argv, name="unsquashfs", log=logf) as tool:
            returncode = tool.wait()
        if returncode != 0:
            raise ContainerError(f"{path} is damaged: {tool.failure(returncode)}")


def verify_archive(path: Path, *, log: LogFunction | None = None) -> None:
    """Check that a tar archive or squashfs image reads completely; ContainerError if not.

    The format is recognised by content, not by name."""
    logf = resolve_log(log)
    path = Path(path)
    kind = _archive_kind(path)
    (_verify_tar if kind == "tar" else _verify_squashfs)(path, logf)
