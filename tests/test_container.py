"""Container archives against the real tools: GNU tar, squashfs-tools, squashfuse, cp.

One source tree holds every kind of entry a container root has (and a few it
should not): it is archived once in each format (module-scoped fixtures), and
every restore path is compared with it entry by entry.  The exclude patterns are
chosen where tar's meaning and mksquashfs's own pattern language disagree.
"""

from __future__ import annotations

import base64
import hashlib
import os
import socket
import stat
import subprocess
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from treeinfo import Entry, allocated, describe, differences

import dirbackup.mount
from dirbackup import container
from dirbackup.container import (
    ArchiveResult,
    ContainerError,
    SquashfsMount,
    copy_tree,
    create_squashfs,
    create_tar,
    extract_tar,
    squashfs_command,
    squashfs_exclusions,
    tar_command,
    verify_archive,
)
from dirbackup.errors import Cancelled
from dirbackup.ratelimit import TokenBucket
from dirbackup.tarnames import ExclusionFinder, decode_escaped, parse_listing_line

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="container archives are made as root")

MiB = 1 << 20
T0 = 1_600_000_000  # mtimes in the source tree: fixed, distinct, in the past

# Where tar's exclusion semantics and mksquashfs's patterns differ (see tarnames.py).
PATTERNS = [
    "*.tmp",  # also .hidden.tmp: mksquashfs's own patterns would skip it (FNM_PERIOD)
    "cache",  # at any depth
    "/var/log",  # anchored: x/var/log stays
    "p*q",  # a tar * spans slashes: p/r/q goes
    "/opt/*/db",  # anchored, spanning: opt/a/b/db goes too
    "st\\*r",  # an escaped glob character: only the literal name
    "... x",  # mksquashfs would read "... " as "at any depth"
    " leading space",
    "#hash",  # '#' starts a comment in an mksquashfs exclude file
    "new?line",  # matches a name with a newline
]
EXCLUDED = {
    b"lost+found",
    b"x/lost+found",
    b"a.tmp",
    b".hidden.tmp",
    b"hl_drop.tmp",
    b"cache",
    b"home/u/cache",
    b"var/log",
    b"p/r/q",
    b"pxq",
    b"opt/a/db",
    b"opt/a/b/db",
    b"st*r",
    b"... x",
    b" leading space",
    b"#hash",
    b"new\nline",
    b"sock",  # tar skips sockets; so must squashfs
}
KEPT = [
    b"x/var/log/keep",
    b"var/lib/keep",
    b"cachet",
    b"keep.tmp.not",
    b"p/r/qz",
    b"x/opt/a/db",
    b"stXr",
    b"x",
    b"new\nline2",
    b"hl_keep",
]
CAPABILITY = base64.b64decode("AQAAAgAgAAAAAAAAAAAAAAAAAAA=")  # cap_net_raw+ep, VFS v2


@dataclass
class Tree:
    root: Path
    xattrs: bool = False
    acls: bool = False
    notes: list[str] = field(default_factory=list)


def _write(path: Path, data: bytes, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.chmod(path, mode)


def _try_xattrs(root: Path) -> bool:
    probe = root / ".probe"
    probe.write_bytes(b"")
    try:
        os.setxattr(probe, "user.probe", b"1")
        os.setxattr(probe, "security.capability", CAPABILITY)
        return True
    except OSError:
        return False
    finally:
        probe.unlink()


def build_tree(root: Path) -> Tree:
    """Everything a container root may hold, with owners, modes and attributes set."""
    root.mkdir()
    tree = Tree(root)
    b = os.fsencode(root)

    _write(root / "file.txt", b"hello\n")
    _write(root / "secret", b"s3cret\n", 0o600)
    _write(root / "data" / "big.bin", os.urandom(256 * 1024))
    os.link(root / "data" / "big.bin", root / "hardlink")
    _write(root / "hl_keep", b"one inode, two names\n")
    os.link(root / "hl_keep", root / "hl_drop.tmp")  # the excluded name must not take the other

    with open(root / "sparse.img", "wb") as f:  # 64 MiB with three written blocks
        f.truncate(64 * MiB)
        for offset, size in ((0, 4096), (32 * MiB, 65536), (64 * MiB - 4096, 4096)):
            f.seek(offset)
            f.write(os.urandom(size))

    (root / "tmpdir").mkdir()
    os.chmod(root / "tmpdir", 0o1777)
    (root / "emptydir").mkdir()
    os.symlink("/etc/passwd", root / "abs_link")
    os.symlink("../file.txt", root / "data" / "rel_link")
    os.symlink("nowhere/at/all", root / "dangling")
    os.symlink("../" * 40 + "long/target", root / "long_link")  # > 100 bytes: a pax linkpath
    os.mkfifo(root / "fifo")
    try:
        os.mknod(root / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    except OSError as e:
        tree.notes.append(f"no device node: {e}")
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(os.fsdecode(b + b"/sock"))

    _write(root / ("L" * 255), b"long name\n")
    _write(Path(os.fsdecode(b + b"/bad\xff\xfename")), b"not utf-8\n")
    for name in ("back\\slash", "new\nline2", "stXr", "keep.tmp.not", "cachet", "q?[x]"):
        _write(root / name, name.encode() + b"\n")

    # the excluded and the nearly excluded
    for rel in sorted(EXCLUDED - {b"sock", b"hl_drop.tmp"}):
        path = Path(os.fsdecode(b + b"/" + rel))
        if rel in (b"lost+found", b"x/lost+found", b"cache", b"home/u/cache", b"var/log"):
            _write(path / "inside", b"excluded\n")
        else:
            _write(path, b"excluded\n")
    for rel in KEPT:
        path = Path(os.fsdecode(b + b"/" + rel))
        if not os.path.lexists(path):
            _write(path, b"kept\n")
    _write(root / "x" / "opt" / "a" / "db", b"kept\n")  # KEPT lists it; make sure it is a file

    # owners and modes (chown clears setuid and capabilities: set them after)
    os.chown(root / "data", 1234, 5678)
    os.chown(root / "secret", 1234, 5678)
    _write(root / "setuid", b"#!/bin/sh\n", 0o755)
    os.chown(root / "setuid", 1234, 5678)
    os.chmod(root / "setuid", 0o4755)
    os.lchown(root / "abs_link", 4321, 8765)
    os.chown(root, 100000, 100000)  # an unprivileged container's root
    os.chmod(root, 0o755)

    tree.xattrs = _try_xattrs(root)
    if tree.xattrs:
        os.setxattr(root / "file.txt", "user.comment", b"hello xattr")
        os.setxattr(root / "setuid", "user.binary", b"\x00\xff\x01")
        os.setxattr(root / "data" / "big.bin", "security.capability", CAPABILITY)
        os.setxattr(root / "tmpdir", "user.dir", b"on a directory")
    else:
        tree.notes.append("no user xattrs on this file system")

    (root / "acl_dir").mkdir()
    _write(root / "acl_dir" / "f", b"acl\n")
    try:
        subprocess.run(
            ["setfacl", "-m", "u:4321:rwx", os.fspath(root / "acl_dir" / "f")],
            check=True,
            capture_output=True,
        )
        subprocess.run(
            ["setfacl", "-d", "-m", "u:4321:rx", os.fspath(root / "acl_dir")],
            check=True,
            capture_output=True,
        )
        tree.acls = True
    except (OSError, subprocess.CalledProcessError) as e:
        tree.notes.append(f"no ACLs: {e}")

    # fixed mtimes, children before parents (creating an entry changes its parent's)
    stamp = T0
    for dirpath, dirnames, filenames in os.walk(b, topdown=False):
        for name in sorted(filenames + dirnames):
            stamp += 1
            os.utime(dirpath + b"/" + name, ns=(stamp * 10**9,) * 2, follow_symlinks=False)
    os.utime(b, ns=(T0 * 10**9,) * 2)
    return tree


def expected_tree(tree: Tree, *, acls: bool = True) -> dict[bytes, Entry]:
    """The source as a restore must reproduce it: without the excluded entries
    (and without ACLs for squashfs, which cannot store them)."""
    return describe(tree.root, skip=EXCLUDED, keep_xattr=_xattr_filter(acls))


def _xattr_filter(acls: bool) -> Callable[[str], bool]:
    return lambda name: acls or not name.startswith("system.posix_acl_")


def assert_same_tree(expected: dict[bytes, Entry], actual: dict[bytes, Entry]) -> None:
    diff = differences(expected, actual)
    assert not diff, "\n".join(diff[:20])


class Log:
    """Collects what the code under test sends to the provider's log."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []

    def __call__(self, level: str, message: str) -> None:
        assert level in ("info", "warn", "err")
        self.lines.append((level, message))

    def warnings(self) -> list[str]:
        return [m for level, m in self.lines if level == "warn"]


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------
# Fixtures: one tree, one archive per format, for the whole module


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Tree:
    return build_tree(tmp_path_factory.mktemp("tree") / "root")


@pytest.fixture(scope="module")
def tar_archive(tree: Tree, tmp_path_factory: pytest.TempPathFactory) -> tuple[ArchiveResult, Log]:
    log = Log()
    target = tmp_path_factory.mktemp("tar") / "archive.tar"
    return create_tar(tree.root, target, exclude_patterns=PATTERNS, log=log), log


@pytest.fixture(scope="module")
def sqfs_archive(tree: Tree, tmp_path_factory: pytest.TempPathFactory) -> tuple[ArchiveResult, Log]:
    log = Log()
    target = tmp_path_factory.mktemp("sqfs") / "archive.sqfs"
    return create_squashfs(tree.root, target, exclude_patterns=PATTERNS, log=log), log


@pytest.fixture
def small_tree(tmp_path: Path) -> Path:
    root = tmp_path / "small"
    _write(root / "a" / "file", b"x" * 1000)
    _write(root / "b", b"y")
    return root


# ----------------------------------------------------------------------------
# Commands


def test_tar_command_has_vzdump_flags_and_pattern_anchoring() -> None:
    argv = tar_command(Path("/ct/root"), [".", "./mnt/data"], ["*.tmp", "/var/log", "cache"])
    assert argv[:2] == ["tar", "--create"] and "--file=-" in argv and "--totals" in argv
    for flag in container.TAR_FLAGS:
        assert flag in argv
    assert "--directory=/ct/root" in argv
    floating = argv.index("--no-anchored")
    anchored = argv.index("--anchored")
    assert floating < argv.index("--exclude=lost+found") < anchored
    assert floating < argv.index("--exclude=*.tmp") < anchored
    assert floating < argv.index("--exclude=cache") < anchored
    assert anchored < argv.index("--exclude=./var/log")
    assert argv[-3:] == ["--", ".", "./mnt/data"]


@pytest.mark.parametrize(
    ("sources", "patterns", "message"),
    [
        (["/etc"], [], "relative path"),
        (["../other"], [], "relative path"),
        ([], [], "no sources"),
        (["."], [""], "empty exclude pattern"),
        (["."], ["a\0b"], "NUL"),
    ],
)
def test_tar_command_rejects_bad_arguments(
    sources: list[str], patterns: list[str], message: str
) -> None:
    with pytest.raises(ContainerError, match=message):
        tar_command(Path("/ct"), sources, patterns)


def test_squashfs_command_takes_literal_exclusions(tmp_path: Path) -> None:
    argv = squashfs_command(
        Path("/ct"), Path("/b/archive.sqfs"), tmp_path / "ex", [b"new\nline", b"a b*"]
    )
    assert argv[:3] == ["mksquashfs", "/ct", "/b/archive.sqfs"]
    for option in (
        "-quiet",
        "-no-progress",
        "-noappend",
        "-xattrs",
        "-exit-on-error",
        "-wildcards",
    ):
        assert option in argv
    assert argv[argv.index("-ef") + 1] == os.fspath(tmp_path / "ex")
    assert argv[-3:] == ["-e", "new\\\nline", "a\\ b\\*"]


# ----------------------------------------------------------------------------
# Round trips


def test_tar_archive_result_and_log(tar_archive: tuple[ArchiveResult, Log]) -> None:
    result, log = tar_archive
    assert result.size == result.path.stat().st_size > 0
    assert result.sha256 == sha256_of(result.path)
    assert stat.S_IMODE(result.path.stat().st_mode) == 0o600
    assert result.warnings == ()
    assert ("info", "tar: Total bytes written") in [(lv, m[:24]) for lv, m in log.lines]
    verify_archive(result.path)


def test_tar_round_trip_keeps_everything(
    tree: Tree, tar_archive: tuple[ArchiveResult, Log], tmp_path: Path
) -> None:
    target = tmp_path / "restore"
    target.mkdir()
    extract_tar(tar_archive[0].path, target)
    restored = describe(target)
    assert_same_tree(expected_tree(tree), restored)
    # a few facts spelt out, so that a regression reads clearly
    assert restored[b""].uid == 100000 and restored[b""].mode == 0o755
    assert restored[b"setuid"].mode == 0o4755 and restored[b"setuid"].uid == 1234
    assert restored[b"hardlink"].link_group == b"data/big.bin"
    assert restored[b"hl_keep"].link_group is None  # its other name was excluded
    assert restored[b"fifo"].kind == "fifo"
    assert restored[b"dangling"].target == b"nowhere/at/all"
    assert b"bad\xff\xfename" in restored and b"L" * 255 in restored
    if tree.xattrs:
        assert dict(restored[b"data/big.bin"].xattrs)["security.capability"] == CAPABILITY
    if tree.acls:
        assert "system.posix_acl_access" in dict(restored[b"acl_dir/f"].xattrs)
        assert "system.posix_acl_default" in dict(restored[b"acl_dir"].xattrs)
    assert allocated(target / "sparse.img") < 4 * MiB


def test_exclusions_are_tars(tree: Tree, tar_archive: tuple[ArchiveResult, Log]) -> None:
    with tarfile.open(tar_archive[0].path) as tf:
        names = {os.fsencode(m.name).removeprefix(b"./") for m in tf.getmembers()}
    for rel in EXCLUDED:
        assert rel not in names
    for rel in KEPT:
        assert rel in names
    assert set(squashfs_exclusions(tree.root, PATTERNS)) == EXCLUDED


def test_squashfs_result_and_acl_warning(
    tree: Tree, sqfs_archive: tuple[ArchiveResult, Log]
) -> None:
    result, log = sqfs_archive
    assert result.size == result.path.stat().st_size > 0
    assert result.sha256 == sha256_of(result.path)
    assert stat.S_IMODE(result.path.stat().st_mode) == 0o600
    verify_archive(result.path)
    acl_warnings = [w for w in result.warnings if "POSIX ACLs" in w]
    assert len(acl_warnings) == (1 if tree.acls else 0)
    assert acl_warnings == [w for w in log.warnings() if "POSIX ACLs" in w]


def test_squashfs_loop_mount_and_copy_keep_everything_but_acls(
    tree: Tree, sqfs_archive: tuple[ArchiveResult, Log], tmp_path: Path
) -> None:
    expected = expected_tree(tree, acls=False)
    with SquashfsMount(sqfs_archive[0].path, tmp_path / "mnt", use_fuse=False) as mnt:
        assert mnt.method == "loop"
        assert_same_tree(expected, describe(mnt.mountpoint))
        copy_tree(mnt.mountpoint, tmp_path / "copy")  # a new directory
    assert not (tmp_path / "mnt").exists()  # we created the mount point, we removed it
    copied = describe(tmp_path / "copy")
    assert_same_tree(expected, copied)
    assert copied[b"hardlink"].link_group == b"data/big.bin"
    assert allocated(tmp_path / "copy" / "sparse.img") < 4 * MiB


def test_squashfuse_mount_and_copy(
    tree: Tree, sqfs_archive: tuple[ArchiveResult, Log], tmp_path: Path
) -> None:
    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse")
    log = Log()
    target = tmp_path / "copy"
    target.mkdir()  # an existing directory: contents merged, root attributes taken
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    with SquashfsMount(sqfs_archive[0].path, mountpoint, use_fuse=True, log=log) as mnt:
        assert mnt.method == "fuse" and mnt.mounted
        copy_tree(mnt.mountpoint, target)
    assert mountpoint.is_dir() and not os.path.ismount(mountpoint)  # the caller's: kept
    keep: Callable[[str], bool] = _xattr_filter(acls=False)
    if mnt.xattr_namespaces_swapped:  # squashfuse < 0.2.0: said so, compare the rest
        assert any("shows security.* xattrs as trusted.*" in m for m in log.warnings())
        keep = lambda name: name.startswith("user.")  # noqa: E731
    expected = describe(tree.root, skip=EXCLUDED, keep_xattr=keep)
    copied = describe(target, keep_xattr=keep)
    assert_same_tree(expected, copied)
    assert copied[b"hardlink"].link_group == b"data/big.bin"
    # squashfuse reports every block allocated: only --sparse=always finds the holes
    assert allocated(target / "sparse.img") < 4 * MiB


def test_both_formats_exclude_the_same_paths(
    tree: Tree,
    tar_archive: tuple[ArchiveResult, Log],
    sqfs_archive: tuple[ArchiveResult, Log],
    tmp_path: Path,
) -> None:
    from_tar = tmp_path / "from_tar"
    from_tar.mkdir()
    extract_tar(tar_archive[0].path, from_tar)
    with SquashfsMount(sqfs_archive[0].path, tmp_path / "mnt") as mnt:
        in_sqfs = set(describe(mnt.mountpoint))
    in_tar = set(describe(from_tar))
    assert in_tar == in_sqfs
    assert in_tar == set(describe(tree.root, skip=EXCLUDED))


def test_exclusions_handle_every_byte_in_names(tmp_path: Path) -> None:
    root = tmp_path / "bytes"
    root.mkdir()
    rb = os.fsencode(root)
    names = [bytes([c]) + b"name" for c in range(1, 256) if c != ord("/")]
    for name in names:
        with open(rb + b"/" + name, "wb"):
            pass
    excluded = squashfs_exclusions(root, ["?name"])
    assert sorted(excluded) == sorted(names)
    image = tmp_path / "b.sqfs"
    create_squashfs(root, image, exclude_patterns=["?name"])
    with SquashfsMount(image, tmp_path / "mnt") as mnt:
        assert os.listdir(mnt.mountpoint) == []


# ----------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize("create", [create_tar, create_squashfs])
def test_missing_source_directory(create: Callable[..., ArchiveResult], tmp_path: Path) -> None:
    target = tmp_path / "archive"
    with pytest.raises(ContainerError, match=r"source directory .*missing does not exist"):
        create(tmp_path / "missing", target)
    assert not target.exists()


def test_tar_failure_removes_the_partial_archive(small_tree: Path, tmp_path: Path) -> None:
    target = tmp_path / "archive.tar"
    log = Log()
    message = r"tar failed \(exit status 2\): tar: nothing: Cannot stat"
    with pytest.raises(ContainerError, match=message):
        create_tar(small_tree, target, sources=[".", "nothing"], log=log)
    assert not target.exists()
    assert any("Cannot stat" in m for m in log.warnings())


@pytest.mark.parametrize("create", [create_tar, create_squashfs])
def test_existing_target_is_never_overwritten(
    create: Callable[..., ArchiveResult], small_tree: Path, tmp_path: Path
) -> None:
    target = tmp_path / "archive"
    target.write_bytes(b"a previous good archive")
    with pytest.raises(ContainerError, match="already exists"):
        create(small_tree, target)
    assert target.read_bytes() == b"a previous good archive"


def test_target_inside_the_source_is_refused(small_tree: Path) -> None:
    with pytest.raises(ContainerError, match="inside the directory being archived"):
        create_tar(small_tree, small_tree / "a" / "archive.tar")


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """Mount small tmpfs file systems (skip when mounting is not allowed here)."""
    mounted: list[Path] = []

    def mount(options: str) -> Path:
        path = tmp_path / f"tmpfs{len(mounted)}"
        path.mkdir()
        proc = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", path], capture_output=True
        )
        if proc.returncode != 0:
            pytest.skip(f"cannot mount tmpfs: {proc.stderr.decode().strip()}")
        mounted.append(path)
        return path

    yield mount
    for path in mounted:
        subprocess.run(["umount", path], check=False)


@pytest.mark.parametrize("create", [create_tar, create_squashfs])
def test_full_target_file_system(
    create: Callable[..., ArchiveResult], tmpfs: Callable[[str], Path], tmp_path: Path
) -> None:
    source = tmp_path / "src"
    _write(source / "random", os.urandom(4 * MiB))  # incompressible, larger than the fs
    full = tmpfs("size=1m")
    target = full / "archive"
    with pytest.raises(ContainerError, match="No space left on device"):
        create(source, target)
    assert os.listdir(full) == []


@pytest.mark.parametrize("create", [create_tar, create_squashfs])
def test_read_only_target_file_system(
    create: Callable[..., ArchiveResult], small_tree: Path, tmpfs: Callable[[str], Path]
) -> None:
    read_only = tmpfs("ro,size=1m")
    with pytest.raises(ContainerError, match="Read-only file system"):
        create(small_tree, read_only / "archive")
    assert os.listdir(read_only) == []


# ----------------------------------------------------------------------------
# Bandwidth, changing files, cancellation


@pytest.fixture
def four_mib(tmp_path: Path) -> Path:
    source = tmp_path / "src"
    _write(source / "random", os.urandom(4 * MiB))
    return source


@pytest.mark.parametrize("create", [create_tar, create_squashfs])
def test_bandwidth_limit(
    create: Callable[..., ArchiveResult], four_mib: Path, tmp_path: Path
) -> None:
    start = time.monotonic()
    result = create(four_mib, tmp_path / "archive", bandwidth_limit=4 * MiB)
    assert time.monotonic() - start >= 0.5
    verify_archive(result.path)


def test_file_changed_while_read_is_a_warning(four_mib: Path, tmp_path: Path) -> None:
    growing = four_mib / "random"

    def grow() -> None:
        time.sleep(0.2)  # tar is still reading: the limit holds it back
        with open(growing, "ab") as f:
            f.write(b"more")

    log = Log()
    writer = threading.Thread(target=grow)
    writer.start()
    result = create_tar(four_mib, tmp_path / "archive.tar", bandwidth_limit=4 * MiB, log=log)
    writer.join()
    assert any("file changed as we read it" in w for w in result.warnings)
    assert any(w.startswith("tar: ./random: file changed") for w in log.warnings())
    verify_archive(result.path)


def test_cancel_stops_tar_and_removes_the_archive(four_mib: Path, tmp_path: Path) -> None:
    cancel = threading.Event()
    threading.Timer(0.2, cancel.set).start()
    target = tmp_path / "archive.tar"
    start = time.monotonic()
    with pytest.raises(Cancelled):
        create_tar(four_mib, target, bandwidth_limit=1 * MiB, cancel_event=cancel)
    assert time.monotonic() - start < 2
    assert not target.exists()


# ----------------------------------------------------------------------------
# Verify


@pytest.fixture
def small_tar(small_tree: Path, tmp_path: Path) -> Path:
    return create_tar(small_tree, tmp_path / "small.tar").path


@pytest.fixture
def small_sqfs(small_tree: Path, tmp_path: Path) -> Path:
    return create_squashfs(small_tree, tmp_path / "small.sqfs").path


def test_verify_detects_a_tar_cut_between_members(small_tar: Path) -> None:
    with tarfile.open(small_tar) as tf:
        last = tf.getmembers()[-1]
    end = last.offset_data + -(-last.size // 512) * 512
    os.truncate(small_tar, end)
    with pytest.raises(ContainerError, match="truncated"):
        verify_archive(small_tar)


def test_verify_detects_a_tar_cut_inside_a_member(small_tar: Path) -> None:
    with tarfile.open(small_tar) as tf:
        member = next(m for m in tf.getmembers() if m.size >= 1000)
    os.truncate(small_tar, member.offset_data + 700)
    with pytest.raises(ContainerError, match=r"damaged.*Unexpected EOF"):
        verify_archive(small_tar)


def test_verify_detects_damaged_squashfs(small_sqfs: Path) -> None:
    data = bytearray(small_sqfs.read_bytes())
    inode_table = int.from_bytes(data[64:72], "little")  # superblock: inode_table_start
    data[inode_table + 2 : inode_table + 34] = b"\xa5" * 32
    small_sqfs.write_bytes(bytes(data))
    with pytest.raises(ContainerError, match="damaged"):
        verify_archive(small_sqfs)


def test_verify_detects_truncated_squashfs(small_sqfs: Path) -> None:
    with open(small_sqfs, "rb") as f:
        bytes_used = int.from_bytes(f.read(48)[40:48], "little")  # superblock; the rest is padding
    os.truncate(small_sqfs, bytes_used // 2)
    with pytest.raises(ContainerError, match="damaged"):
        verify_archive(small_sqfs)


def test_verify_rejects_what_is_no_archive(tmp_path: Path) -> None:
    junk = tmp_path / "junk"
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(ContainerError, match="neither a tar archive nor a squashfs image"):
        verify_archive(junk)
    with pytest.raises(ContainerError, match="does not exist"):
        verify_archive(tmp_path / "missing")


# ----------------------------------------------------------------------------
# Mounting


def test_mount_is_idempotent_and_unmounts_on_error(small_sqfs: Path, tmp_path: Path) -> None:
    mount = SquashfsMount(small_sqfs, tmp_path / "mnt")
    mount.unmount()  # nothing mounted: fine
    assert mount.mount() == tmp_path / "mnt"
    assert mount.mount() == tmp_path / "mnt"  # already mounted: same
    assert (tmp_path / "mnt" / "b").read_bytes() == b"y"
    mount.unmount()
    mount.unmount()
    assert not mount.mounted and not (tmp_path / "mnt").exists()

    with pytest.raises(RuntimeError), SquashfsMount(small_sqfs, tmp_path / "mnt") as m:
        assert m.mounted
        raise RuntimeError("restore failed")
    assert not m.mounted


def test_unmount_detaches_a_busy_mount(
    small_sqfs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dirbackup.mount, "_BUSY_RETRY_SECONDS", 0.3)
    log = Log()
    mount = SquashfsMount(small_sqfs, tmp_path / "mnt", log=log)
    mount.mount()
    with open(tmp_path / "mnt" / "b", "rb"):  # keeps the file system busy
        mount.unmount()
        assert not mount.mounted
    assert any("busy" in m for m in log.warnings())


@pytest.mark.parametrize("use_fuse", [False, True])
def test_mount_refuses_bad_mount_points(small_sqfs: Path, tmp_path: Path, use_fuse: bool) -> None:
    busy = tmp_path / "busy"
    _write(busy / "file", b"")
    with pytest.raises(ContainerError, match="not empty"):
        SquashfsMount(small_sqfs, busy, use_fuse=use_fuse).mount()
    with pytest.raises(ContainerError, match="does not exist"):
        SquashfsMount(tmp_path / "none.sqfs", tmp_path / "mnt", use_fuse=use_fuse).mount()
    assert not (tmp_path / "mnt").exists()
    with (
        SquashfsMount(small_sqfs, tmp_path / "mnt", use_fuse=use_fuse),
        pytest.raises(ContainerError, match="already a mount point"),
    ):
        SquashfsMount(small_sqfs, tmp_path / "mnt", use_fuse=use_fuse).mount()


def test_mount_of_a_damaged_image_fails_cleanly(tmp_path: Path) -> None:
    junk = tmp_path / "junk.sqfs"
    junk.write_bytes(b"hsqs" + os.urandom(8192))
    log = Log()
    with pytest.raises(ContainerError):
        SquashfsMount(junk, tmp_path / "mnt", log=log).mount()
    assert not (tmp_path / "mnt").exists()
    assert any("using squashfuse" in m for m in log.warnings())


# ----------------------------------------------------------------------------
# Building blocks


def test_token_bucket_debt() -> None:
    now = [0.0]
    bucket = TokenBucket(100.0, burst=10.0, clock=lambda: now[0])
    assert bucket.consume(10) == 0.0
    assert bucket.consume(100) == pytest.approx(1.0)
    now[0] = 1.0
    assert bucket.consume(0) == 0.0
    now[0] = 100.0  # idle time does not bank more than the burst
    assert bucket.consume(10) == 0.0
    assert bucket.consume(50) == pytest.approx(0.5)


def test_tar_listing_names() -> None:
    assert decode_escaped(b"a\\\\b\\nc\\377d\\001") == b"a\\b\nc\xffd\x01"
    assert decode_escaped(b"plain name") == b"plain name"
    assert parse_listing_line(b"./\n") == (b"", True)
    assert parse_listing_line(b"./dir/sub/\n") == (b"dir/sub", True)
    assert parse_listing_line(b"./new\\nline\n") == (b"new\nline", False)
    with pytest.raises(ContainerError):
        parse_listing_line(b"/absolute\n")


def test_exclusion_finder_refuses_out_of_order_listings(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    finder = ExclusionFinder(os.fsencode(tmp_path))
    finder.add(b"a", True)
    finder.add(b"b", True)
    with pytest.raises(ContainerError, match="out of order"):
        finder.add(b"a/late", False)
