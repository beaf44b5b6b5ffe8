"""qcow2 images: our native writer, and safe reading of backing chains.

* `Writer` (the Cython `Qcow2Writer`) creates a version-3 image and is a sink
  for the copy engine: several threads append data clusters while it keeps
  the L2 tables in memory (only for the parts of the disk that were touched);
  `finish()` writes the metadata and, last, the header.
* `read_header()` parses and checks one image's header strictly.
* `Chain` opens a top image and its backing files after validating every
  layer: qcow2 only, inside the allowed directories (real paths), no protocol
  or `json:` names, no external data file, no unknown incompatible features,
  no cycles, bounded depth, equal virtual sizes.  It maps the guest address
  space to (layer, host offset) | zero | unallocated for the copy engine, and
  gives QEMU the validated layers explicitly (`image_opts`) so that QEMU never
  resolves a backing name on its own.
* `restore()`, `merge_into_child()` and `image_digests()` are built on those.

Format reference: QEMU's docs/interop/qcow2.txt.
"""

from __future__ import annotations

import os
import stat
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from dirbackup import _qcow2
from dirbackup import copy as copyengine
from dirbackup.errors import ImageError, UnsupportedImage

Writer = _qcow2.Qcow2Writer
MAP_DATA, MAP_ZERO, MAP_UNALLOCATED = _qcow2.MAP_DATA, _qcow2.MAP_ZERO, _qcow2.MAP_UNALLOCATED

MAGIC = b"QFI\xfb"
MAX_DEPTH = 64
MAX_L1_BYTES = 32 << 20
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
EXT_END = 0
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_ENCRYPTION = 0x0537BE77
EXT_DATA_FILE = 0x44415441


def virtual_size_for(size: int) -> int:
    """The virtual size of the image that holds a disk of `size` bytes: QEMU
    counts disks in 512-byte sectors, so a raw disk of any other size is
    exported with a zero tail up to the next sector, and a qcow2 header's size
    is read rounded.  The manifest keeps the exact size; restores cut the tail."""
    return (size + 511) & ~511


@dataclass(frozen=True)
class Header:
    """The fields of a qcow2 header that reading and validation need."""

    path: str
    file_size: int
    version: int
    cluster_bits: int
    virtual_size: int
    l1_offset: int
    l1_size: int
    refcount_table_offset: int
    incompatible: int
    backing_name: str | None
    backing_format: str | None

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits


def _bad(path: str, why: str) -> ImageError:
    return ImageError(f"{path}: {why}")


def read_header(path: str | os.PathLike[str], fd: int | None = None) -> Header:
    """Parse and check the header of a qcow2 image; raise ImageError (or
    UnsupportedImage) naming the file for anything we will not read."""
    name = os.fspath(path)
    own = fd is None
    if fd is None:
        try:
            fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise ImageError(f"{name}: cannot open: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _bad(name, "not a regular file")
        head = os.pread(fd, 65536, 0)
        return _parse_header(name, st.st_size, head, fd)
    finally:
        if own:
            os.close(fd)


def _parse_header(name: str, file_size: int, head: bytes, fd: int) -> Header:
    if len(head) < 72 or head[:4] != MAGIC:
        raise _bad(name, "not a qcow2 image (bad magic)")
    (version, backing_offset, backing_size, bits, vsize, crypt, l1_size, l1_offset) = (
        struct.unpack_from(">IQIIQIIQ", head, 4)
    )
    rt_offset, rt_clusters, nb_snapshots, _snap_off = struct.unpack_from(">QIIQ", head, 48)
    if version not in (2, 3):
        raise UnsupportedImage(f"{name}: qcow2 version {version} is not supported")
    if not 9 <= bits <= 21:
        raise _bad(name, f"invalid cluster_bits {bits}")
    cs = 1 << bits
    incompatible = 0
    header_length = 72
    if version == 3:
        if len(head) < 104:
            raise _bad(name, "truncated header")
        incompatible, _compat, _autoclear, refcount_order, header_length = struct.unpack_from(
            ">QQQII", head, 72
        )
        if header_length < 104 or header_length % 8 or header_length > min(cs, len(head)):
            raise _bad(name, f"invalid header length {header_length}")
        if refcount_order > 6:
            raise _bad(name, f"invalid refcount order {refcount_order}")
    if crypt != 0:
        raise UnsupportedImage(f"{name}: encrypted images are not supported")
    if incompatible & INCOMPAT_CORRUPT:
        raise _bad(name, "QEMU marked the image corrupt")
    if incompatible & INCOMPAT_DATA_FILE:
        raise _bad(name, "the image has an external data file; refused")
    if incompatible & INCOMPAT_EXTL2:
        raise UnsupportedImage(f"{name}: extended L2 entries are not supported")
    unknown = incompatible & ~(
        INCOMPAT_DIRTY
        | INCOMPAT_CORRUPT
        | INCOMPAT_DATA_FILE
        | INCOMPAT_COMPRESSION
        | INCOMPAT_EXTL2
    )
    if unknown:
        raise UnsupportedImage(f"{name}: unknown incompatible features {unknown:#x}")
    if vsize == 0 or vsize > (1 << 60):
        raise _bad(name, f"invalid virtual size {vsize}")
    needed = _qcow2.l1_entries_for(vsize, bits)
    if l1_size < needed or l1_size * 8 > MAX_L1_BYTES:
        raise _bad(name, f"L1 table size {l1_size} does not fit the virtual size {vsize}")
    if l1_offset % cs or l1_offset == 0 or l1_offset + l1_size * 8 > file_size:
        raise _bad(name, f"invalid L1 table offset {l1_offset}")
    if rt_offset % cs or rt_offset == 0 or rt_offset + rt_clusters * cs > file_size:
        raise _bad(name, f"invalid refcount table offset {rt_offset}")
    del nb_snapshots  # internal snapshots do not change what the active L1 maps
    backing_format = None
    offset = header_length
    if version == 3:
        while True:
            if offset + 8 > len(head) or offset + 8 > cs:
                raise _bad(name, "header extensions run past the first cluster")
            ext_type, ext_len = struct.unpack_from(">II", head, offset)
            if ext_type == EXT_END:
                break
            data = head[offset + 8 : offset + 8 + ext_len]
            if len(data) != ext_len or offset + 8 + ext_len > cs:
                raise _bad(name, "header extension runs past the first cluster")
            if ext_type == EXT_BACKING_FORMAT:
                backing_format = data.decode("ascii", "replace")
            elif ext_type == EXT_DATA_FILE:
                raise _bad(name, "the image names an external data file; refused")
            elif ext_type == EXT_ENCRYPTION:
                raise UnsupportedImage(f"{name}: encrypted images are not supported")
            offset += 8 + ((ext_len + 7) & ~7)
    backing_name = None
    if backing_offset:
        if backing_size == 0 or backing_size > 1023:
            raise _bad(name, f"invalid backing file name length {backing_size}")
        if backing_offset + backing_size > file_size:
            raise _bad(name, "backing file name lies beyond the end of the file")
        raw = os.pread(fd, backing_size, backing_offset)
        if len(raw) != backing_size:
            raise _bad(name, "truncated backing file name")
        try:
            backing_name = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise _bad(name, "backing file name is not valid UTF-8") from None
    return Header(
        path=name,
        file_size=file_size,
        version=version,
        cluster_bits=bits,
        virtual_size=vsize,
        l1_offset=l1_offset,
        l1_size=l1_size,
        refcount_table_offset=rt_offset,
        incompatible=incompatible,
        backing_name=backing_name,
        backing_format=backing_format,
    )


def _layer(fd: int, h: Header) -> tuple[int, str, int, int, int, int, int, int]:
    """What the Cython ChainMap needs of one validated layer."""
    return (
        fd,
        h.path,
        h.version,
        h.cluster_bits,
        h.virtual_size,
        h.l1_offset,
        h.l1_size,
        h.file_size,
    )


def _inside(path: str, roots: Sequence[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


def resolve_backing(image: str, name: str, roots: Sequence[str]) -> str:
    """The real path of a backing file name, or ImageError if it is unsafe.

    Names are resolved like QEMU does (relative to the referring image's
    directory); protocol names (`nbd:...`, `json:{...}`, `file:...`) are never
    followed, and the result must be a regular file inside `roots`."""
    if "\0" in name or name.startswith("json:") or ":" in name:
        raise _bad(image, f"backing file {name!r} uses a protocol or json: name; refused")
    candidate = name if os.path.isabs(name) else os.path.join(os.path.dirname(image), name)
    real = os.path.realpath(candidate)
    if not _inside(real, roots):
        raise _bad(image, f"backing file {name!r} lies outside the allowed directory; refused")
    try:
        st = os.stat(real)
    except OSError as exc:
        raise _bad(image, f"backing file {name!r} cannot be opened: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise _bad(image, f"backing file {name!r} is not a regular file")
    return real


class Chain:
    """A validated qcow2 chain, top image first, with its files held open.

    Nothing is read from a layer before every layer's header has been
    checked; the open file descriptors are what is read afterwards, so a file
    swapped after validation is never used.
    """

    def __init__(
        self,
        top: str | os.PathLike[str],
        allowed: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        max_depth: int = MAX_DEPTH,
    ) -> None:
        roots_in = [allowed] if isinstance(allowed, (str, os.PathLike)) else list(allowed)
        roots = [os.path.realpath(os.fspath(r)) for r in roots_in]
        self.headers: list[Header] = []
        self.paths: list[str] = []
        self.fds: list[int] = []
        seen: set[tuple[int, int]] = set()
        try:
            path = os.path.realpath(os.fspath(top))
            if not _inside(path, roots):
                raise _bad(os.fspath(top), "lies outside the allowed directory; refused")
            while True:
                if len(self.paths) >= max_depth:
                    raise _bad(path, f"backing chain deeper than {max_depth} images")
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
                self.fds.append(fd)
                st = os.fstat(fd)
                if (st.st_dev, st.st_ino) in seen:
                    raise _bad(path, "backing chain has a cycle")
                seen.add((st.st_dev, st.st_ino))
                header = read_header(path, fd)
                if self.headers and header.virtual_size != self.headers[0].virtual_size:
                    raise _bad(
                        path,
                        f"virtual size {header.virtual_size} differs from the top image's "
                        f"{self.headers[0].virtual_size}",
                    )
                self.headers.append(header)
                self.paths.append(path)
                if header.backing_name is None:
                    break
                if header.backing_format not in (None, "qcow2"):
                    raise _bad(
                        path, f"backing format {header.backing_format!r} is not qcow2; refused"
                    )
                path = resolve_backing(path, header.backing_name, roots)
            self._map = _qcow2.ChainMap(
                [_layer(fd, h) for fd, h in zip(self.fds, self.headers, strict=True)]
            )
        except OSError as exc:
            self.close()
            raise ImageError(f"{exc.filename or top}: {exc.strerror}") from None
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Close the layers' file descriptors."""
        for fd in self.fds:
            os.close(fd)
        self.fds = []

    def __enter__(self) -> Chain:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def virtual_size(self) -> int:
        return self.headers[0].virtual_size

    @property
    def depth(self) -> int:
        return len(self.headers)

    @property
    def min_cluster_size(self) -> int:
        return min(h.cluster_size for h in self.headers)

    def map(
        self, offset: int = 0, length: int | None = None, depth: int = -1
    ) -> npt.NDArray[np.uint64]:
        """Rows (guest offset, length, kind, layer, host offset); kind is
        MAP_DATA, MAP_ZERO or MAP_UNALLOCATED (only past the first `depth`
        layers)."""
        return self._map.map(offset, length, depth)

    def plan(self) -> npt.NDArray[np.uint64]:
        """Copy requests that rebuild the whole guest disk: data rows read from
        their layer, everything else reads as zero."""
        rows = self.map()
        rows[rows[:, 2] == MAP_UNALLOCATED, 2] = MAP_ZERO
        return rows

    def image_opts(self) -> str:
        """A qemu `--image-opts` string naming every validated layer explicitly,
        so QEMU opens exactly these files and follows no name by itself."""
        parts = []
        prefix = ""
        for path in self.paths:
            escaped = path.replace(",", ",,")
            parts += [
                f"{prefix}driver=qcow2",
                f"{prefix}file.driver=file",
                f"{prefix}file.filename={escaped}",
            ]
            prefix += "backing."
        return ",".join(parts)


def image_digests(path: str | os.PathLike[str], chunk: int, size: int) -> npt.NDArray[np.uint64]:
    """Per-chunk digest sums of the clusters this one image holds (not its
    backing files), as the copy loop computed them while writing."""
    name = os.fspath(path)
    fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC)
    try:
        h = read_header(name, fd)
        cmap = _qcow2.ChainMap([_layer(fd, h)])
        return _qcow2.layer_digests(cmap, chunk, (size + chunk - 1) // chunk)
    finally:
        os.close(fd)


def restore(
    chain: Chain,
    target: copyengine.Target,
    options: copyengine.CopyOptions = copyengine.CopyOptions(),
    *,
    progress: copyengine.Progress | None = None,
    cancel_event: threading.Event | None = None,
) -> copyengine.CopyStats:
    """Copy the guest disk a chain describes into `target` (a raw file or
    device, an NBD export, or a fresh qcow2 Writer) without QEMU in the path."""
    return copyengine.copy_mapped(
        chain.fds, chain.plan(), target, options, progress=progress, cancel_event=cancel_event
    )


def merge_into_child(
    child: str | os.PathLike[str],
    allowed: str | os.PathLike[str],
    options: copyengine.CopyOptions = copyengine.CopyOptions(),
    output: str | os.PathLike[str] | None = None,
) -> None:
    """Fold the child's backing image into the child, so that the backing image
    can be removed: the new child holds every cluster that either held, keeps
    reading exactly as before, and backs onto the grandparent (or nothing).
    The child is replaced atomically by rename; with `output`, the merged image
    is written there instead (a new file in a directory next to the child's:
    its backing name stays relative to the child's directory)."""
    child_path = os.path.realpath(os.fspath(child))
    with Chain(child_path, allowed) as chain:
        if chain.depth < 2:
            raise ImageError(f"{child_path}: has no backing file to merge")
        if chain.depth > 2:
            backing: str | None = os.path.relpath(chain.paths[2], os.path.dirname(child_path))
        else:
            backing = None
        rows = chain.map(depth=2)
        plan = rows[rows[:, 2] != MAP_UNALLOCATED]
        if output is not None:
            tmp = Path(output)
        else:
            tmp = Path(child_path).with_name(f".{Path(child_path).name}.merge-{os.getpid()}")
            tmp.unlink(missing_ok=True)  # left over by a crashed merge
        writer = Writer(
            tmp,
            chain.virtual_size,
            min(h.cluster_size for h in chain.headers[:2]),
            backing=backing,
        )
        with writer:
            copyengine.copy_mapped(chain.fds[:2], plan, writer, options)
            writer.finish()
        if output is not None:
            return
        os.replace(tmp, child_path)
        _fsync_dir(os.path.dirname(child_path))


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
