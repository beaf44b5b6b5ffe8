"""An entry-by-entry description of a directory tree, to compare an original with a restore.

Every entry (the root included, as b"") is described by what a restore must
keep: type, permission bits, numeric owner, whole-second mtime, content digest,
symlink target, device number, extended attributes (ACLs are the
system.posix_acl_* ones) and hard-link structure.  Hard links are described by
the smallest path of the group of names sharing an inode *within the compared
set*, so excluding one name of a pair changes the description as it should.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Callable, Collection
from dataclasses import dataclass, replace
from pathlib import Path

KINDS = {
    stat.S_IFREG: "file",
    stat.S_IFDIR: "dir",
    stat.S_IFLNK: "symlink",
    stat.S_IFIFO: "fifo",
    stat.S_IFCHR: "chardev",
    stat.S_IFBLK: "blockdev",
    stat.S_IFSOCK: "socket",
}


@dataclass(frozen=True)
class Entry:
    kind: str
    mode: int  # permission bits incl. setuid/setgid/sticky
    uid: int
    gid: int
    mtime: int
    size: int | None = None
    sha256: str | None = None
    target: bytes | None = None
    rdev: int | None = None
    xattrs: tuple[tuple[str, bytes], ...] = ()
    link_group: bytes | None = None  # smallest name sharing this inode, if shared


def _digest(path: bytes) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _xattrs(path: bytes, keep: Callable[[str], bool]) -> tuple[tuple[str, bytes], ...]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return ()
    return tuple(sorted((n, os.getxattr(path, n, follow_symlinks=False)) for n in names if keep(n)))


def describe(
    root: Path,
    *,
    skip: Collection[bytes] = (),
    keep_xattr: Callable[[str], bool] = lambda name: True,
) -> dict[bytes, Entry]:
    """Describe the tree under `root`, leaving out the paths in `skip` (and below)."""
    base = os.fsencode(root)
    entries: dict[bytes, Entry] = {}
    inodes: dict[bytes, tuple[int, int]] = {}

    def visit(rel: bytes) -> None:
        path = base + b"/" + rel if rel else base
        st = os.lstat(path)
        kind = KINDS[stat.S_IFMT(st.st_mode)]
        entry = Entry(
            kind,
            stat.S_IMODE(st.st_mode),
            st.st_uid,
            st.st_gid,
            int(st.st_mtime),
            xattrs=_xattrs(path, keep_xattr),
        )
        if kind == "file":
            entry = replace(entry, size=st.st_size, sha256=_digest(path))
            inodes[rel] = (st.st_dev, st.st_ino)
        elif kind == "symlink":
            entry = replace(entry, target=os.readlink(path))
        elif kind in ("chardev", "blockdev"):
            entry = replace(entry, rdev=st.st_rdev)
        entries[rel] = entry
        if kind == "dir":
            for name in sorted(os.listdir(path)):
                child = rel + b"/" + name if rel else name
                if child not in skip:
                    visit(child)

    visit(b"")
    groups: dict[tuple[int, int], list[bytes]] = {}
    for rel, key in inodes.items():
        groups.setdefault(key, []).append(rel)
    for names in groups.values():
        if len(names) > 1:
            for rel in names:
                entries[rel] = replace(entries[rel], link_group=min(names))
    return entries


def differences(expected: dict[bytes, Entry], actual: dict[bytes, Entry]) -> list[str]:
    """Readable differences, one line per path (empty when the trees match)."""
    out = []
    for rel in sorted(expected.keys() | actual.keys()):
        a, b = expected.get(rel), actual.get(rel)
        if a != b:
            out.append(f"{rel!r}: expected {a}, got {b}")
    return out


def allocated(path: Path) -> int:
    """Bytes the file system really holds for `path`."""
    return os.lstat(path).st_blocks * 512
