"""Which entries of a directory tar leaves out: the exclusion list for a squashfs image.

Why: a squashfs backup must exclude exactly what the tar backup of the same
container excludes, and tar's exclude patterns (vzdump's meaning) cannot be
written in mksquashfs's own pattern language:

* mksquashfs matches one path component at a time (FNM_PATHNAME), so a `*` never
  spans a `/`; tar's exclusion wildcards do (`p*q` also excludes `p/r/q`);
* mksquashfs sets FNM_PERIOD, so `*.tmp` skips `.x.tmp`; tar excludes it;
* mksquashfs's "... PATTERN" (match at any depth) uses only the first component
  of a multi-component pattern: "... var/cache" would exclude every `var`;
* mksquashfs's extended globs `@(...)`, `+(...)` mean nothing to tar.

So tar decides.  It walks the tree with the very options of the tar backup but
writes to /dev/null (GNU tar then reads no file data) and lists what it would
store.  Everything else a listed directory holds is excluded; mksquashfs gets
those paths as literal names.  The walk is streamed: tar lists depth first, so a
directory is complete as soon as a name outside it arrives; memory holds the
names of the directories on the current path only, not the whole tree.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator

from dirbackup.errors import ContainerError

_ESCAPES = {
    ord("\\"): ord("\\"),
    ord("a"): 0x07,
    ord("b"): 0x08,
    ord("f"): 0x0C,
    ord("n"): 0x0A,
    ord("r"): 0x0D,
    ord("t"): 0x09,
    ord("v"): 0x0B,
}
_OCTAL = frozenset(b"01234567")


def decode_escaped(text: bytes) -> bytes:
    """Undo GNU tar's `--quoting-style=escape` (C escapes, `\\ooo` for other bytes)."""
    if b"\\" not in text:
        return text
    out = bytearray()
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c != 0x5C or i + 1 == n:
            out.append(c)
            i += 1
            continue
        nxt = text[i + 1]
        if nxt in _OCTAL:
            j = i + 1
            while j < n and j < i + 4 and text[j] in _OCTAL:
                j += 1
            out.append(int(text[i + 1 : j], 8) & 0xFF)
            i = j
        else:
            out.append(_ESCAPES.get(nxt, nxt))
            i += 2
    return bytes(out)


def parse_listing_line(line: bytes) -> tuple[bytes, bool]:
    """A line of `tar -cv` for source `.` -> (path relative to the root, is a directory).

    The root itself ("./") comes back as b"".  tar marks directories with a
    trailing slash; no file name can contain one.
    """
    name = decode_escaped(line.rstrip(b"\n"))
    if name == b"./" or name == b".":
        return b"", True
    if not name.startswith(b"./"):
        raise ContainerError(f"unexpected name in tar's listing: {name!r}")
    is_dir = name.endswith(b"/")
    return name[2:].rstrip(b"/"), is_dir


class ExclusionFinder:
    """Feed it tar's listing in order; it returns the top-most entries tar left out.

    `add` returns the exclusions it can decide so far (the directories closed by
    the new name); `finish` returns the rest.  Paths are relative, as bytes.
    """

    def __init__(self, root: bytes) -> None:
        self._root = root.rstrip(b"/") or b"/"
        # (directory relative path, names tar listed in it); the root is always open
        self._open: list[tuple[bytes, set[bytes]]] = [(b"", set())]

    def add(self, rel: bytes, is_dir: bool) -> list[bytes]:
        if rel == b"":
            return []
        parent, _, base = rel.rpartition(b"/")
        closed: list[bytes] = []
        while self._open[-1][0] != parent:
            if len(self._open) == 1:
                raise ContainerError(
                    f"tar listed {rel!r} out of order; cannot derive the squashfs exclusions"
                )
            closed.extend(self._close(*self._open.pop()))
        self._open[-1][1].add(base)
        if is_dir:
            self._open.append((rel, set()))
        return closed

    def finish(self) -> list[bytes]:
        closed: list[bytes] = []
        while self._open:
            closed.extend(self._close(*self._open.pop()))
        return closed

    def _close(self, rel: bytes, listed: set[bytes]) -> Iterator[bytes]:
        path = self._root + b"/" + rel if rel else self._root
        try:
            with os.scandir(path) as it:
                names = [entry.name for entry in it]
        except (FileNotFoundError, NotADirectoryError):
            return  # gone since tar saw it: mksquashfs will not see it either
        except OSError as e:
            raise ContainerError(
                f"cannot read directory {os.fsdecode(path)}: {e.strerror}"
            ) from None
        for name in names:
            if name not in listed:
                yield rel + b"/" + name if rel else name


def excluded_entries(root: bytes, listing: Iterable[bytes]) -> list[bytes]:
    """All top-most entries under `root` that are not in tar's `listing` (one name a line)."""
    finder = ExclusionFinder(root)
    out: list[bytes] = []
    for line in listing:
        if line.strip():
            out.extend(finder.add(*parse_listing_line(line)))
    out.extend(finder.finish())
    return out
