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
* `restore()`, `merge_into_child()` / `merge_layers()`, `image_digests()` and
  `layer_views()` are built on those.  A layer given the digests its backup
  recorded (`Chain.expect`) is checked by every copy of the chain, in the copy
  loop: each cluster it holds is hashed once, as read, and a mismatch is an
  `IntegrityError`.

Format reference: QEMU's docs/interop/qcow2.txt.
"""

from __future__ import annotations

import os
import stat
import struct
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from dirbackup import _qcow2
from dirbackup import copy as copyengine
from dirbackup.atomicfile import temporary_name
from dirbackup.errors import ImageError, IntegrityError, UnsupportedImage
from dirbackup.units import human

Writer = _qcow2.Qcow2Writer
MAP_DATA, MAP_ZERO, MAP_UNALLOCATED = _qcow2.MAP_DATA, _qcow2.MAP_ZERO, _qcow2.MAP_UNALLOCATED
MAP_COMPRESSED = _qcow2.MAP_COMPRESSED

MAGIC = b"QFI\xfb"
MAX_DEPTH = 64
MAX_L1_BYTES = _qcow2.MAX_L1_BYTES  # QEMU refuses larger L1 tables
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
COMPRESSION_ZLIB = 0  # header field compression_type: raw deflate, QEMU's default
COMPRESSION_ZSTD = 1
EXT_END = 0
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_ENCRYPTION = 0x0537BE77
EXT_DATA_FILE = 0x44415441
AUTOCLEAR_BITMAPS = 1 << 0  # the bitmaps extension is consistent


def virtual_size_for(size: int) -> int:
    """The virtual size of the image that holds a disk of `size` bytes: QEMU
    counts disks in 512-byte sectors, so a raw disk of any other size is
    exported with a zero tail up to the next sector, and a qcow2 header's size
    is read rounded.  The manifest keeps the exact size; restores cut the tail."""
    return (size + 511) & ~511


@dataclass(frozen=True)
class BitmapsExtension:
    """The bitmaps header extension as stored, unchecked (qcow2bitmaps checks
    it when a bitmap is read): `length` is the extension's data length (24 in
    a valid image), missing bytes read as zero."""

    length: int
    nb_bitmaps: int
    reserved: int
    directory_size: int
    directory_offset: int


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
    autoclear: int = 0
    bitmaps: BitmapsExtension | None = None
    compression_type: int = COMPRESSION_ZLIB

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits


@dataclass(frozen=True)
class LayerDigests:
    """What one layer of a chain must hash to: the per-chunk sums of its own
    clusters' digests (as `image_digests` computes them, mod 2**64) recorded
    when the image was written, and how an error names the layer (its backup
    and device)."""

    label: str
    chunk: int
    sums: npt.NDArray[np.uint64]
    on_mismatch: Callable[[str], None] | None = None  # told before IntegrityError is raised


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
    incompatible = autoclear = 0
    header_length = 72
    if version == 3:
        if len(head) < 104:
            raise _bad(name, "truncated header")
        incompatible, _compat, autoclear, refcount_order, header_length = struct.unpack_from(
            ">QQQII", head, 72
        )
        if header_length < 104 or header_length % 8 or header_length > min(cs, len(head)):
            raise _bad(name, f"invalid header length {header_length}")
        if refcount_order > 6:
            raise _bad(name, f"invalid refcount order {refcount_order}")
    compression_type = COMPRESSION_ZLIB
    if header_length > 104:
        compression_type = head[104]
        if compression_type not in (COMPRESSION_ZLIB, COMPRESSION_ZSTD):
            raise UnsupportedImage(f"{name}: unknown compression type {compression_type}")
        if (compression_type != COMPRESSION_ZLIB) != bool(incompatible & INCOMPAT_COMPRESSION):
            raise _bad(name, "compression type and incompatible bit 3 disagree")
    elif incompatible & INCOMPAT_COMPRESSION:
        raise _bad(name, "incompatible bit 3 is set without a compression type field")
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
    bitmaps = None
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
            elif ext_type == EXT_BITMAPS:
                if bitmaps is not None:
                    raise _bad(name, "two bitmaps extensions in the header")
                fields = struct.unpack(">IIQQ", data[:24].ljust(24, b"\0"))
                bitmaps = BitmapsExtension(ext_len, *fields)
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
        autoclear=autoclear,
        bitmaps=bitmaps,
        compression_type=compression_type,
    )


def smallest_cluster_size(virtual_size: int) -> int:
    """The smallest cluster size (512 B .. 2 MiB) whose L1 table fits in
    MAX_L1_BYTES for an image of `virtual_size` bytes: with smaller clusters
    the image would be one that neither QEMU nor our reader opens."""
    for bits in range(9, 22):
        if _qcow2.l1_entries_for(virtual_size, bits) * 8 <= MAX_L1_BYTES:
            return 1 << bits
    raise ImageError(f"a disk of {virtual_size} bytes is too large for a qcow2 image")


def _layer(fd: int, h: Header) -> tuple[int, str, int, int, int, int, int, int, int]:
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
        h.compression_type,
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
            self.expected: list[LayerDigests | None] = [None] * len(self.paths)
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

    def expect(self, layer: int, digests: LayerDigests) -> None:
        """Check `layer` (0: the top image) against `digests` whenever this
        chain is copied; digests that cannot belong to it are an ImageError."""
        cs = self.headers[layer].cluster_size
        if digests.chunk <= 0 or digests.chunk % cs:
            raise ImageError(
                f"{digests.label}: digest chunk {digests.chunk} is not a multiple of the "
                f"image's cluster size {cs}"
            )
        chunks = -(-self.virtual_size // digests.chunk)
        if digests.sums.shape != (chunks,):
            raise ImageError(f"{digests.label}: {digests.sums.size} digests for {chunks} chunks")
        self.expected[layer] = digests

    @property
    def unchecked(self) -> list[int]:
        """The layers no copy checks (no digests known for them)."""
        return [i for i, e in enumerate(self.expected) if e is None]

    def map(
        self, offset: int = 0, length: int | None = None, depth: int = -1
    ) -> npt.NDArray[np.uint64]:
        """Rows (guest offset, length, kind, layer, host offset); kind is
        MAP_DATA, MAP_ZERO, MAP_COMPRESSED (one compressed cluster or part of
        one; the host column then holds its L2 descriptor) or MAP_UNALLOCATED
        (only past the first `depth` layers)."""
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
    return image_views(path, chunk, size)[0]


def image_views(
    path: str | os.PathLike[str], chunk: int, size: int, unit: int = 0, *, bottom: bool = False
) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint64] | None]:
    """image_digests(), and with `unit` the image's view digests (see
    layer_views), from one read of the image."""
    name = os.fspath(path)
    fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC)
    try:
        h = read_header(name, fd)
        cmap = _qcow2.ChainMap([_layer(fd, h)])
        return _qcow2.layer_views(cmap, chunk, (size + chunk - 1) // chunk, unit, bottom)
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
    device, an NBD export, or a fresh qcow2 Writer whose cluster size is at most
    the chain's smallest) without QEMU in the path.

    Every layer with digests (`Chain.expect`) is checked on the way; a mismatch
    raises IntegrityError once the copy is over, and the target then holds
    data that must not be used: write to a temporary name, rename on success."""
    return copy_chain(chain, target, options, progress=progress, cancel_event=cancel_event)


def copy_chain(
    chain: Chain,
    target: copyengine.Target,
    options: copyengine.CopyOptions = copyengine.CopyOptions(),
    *,
    depth: int = -1,
    progress: copyengine.Progress | None = None,
    cancel_event: threading.Event | None = None,
) -> copyengine.CopyStats:
    """Copy what the first `depth` layers (all by default) hold into `target`,
    checking the layers with digests among them.  Through the whole chain,
    ranges no layer holds are written as zero; through part of it (a merge),
    they are left out."""
    whole = depth < 0 or depth >= chain.depth
    depth = chain.depth if whole else depth
    checks = chain.expected[:depth] + [None] * (chain.depth - depth)
    if not any(checks):
        rows = chain.map(depth=depth)
        zero_sums: list[npt.NDArray[np.uint64] | None] = []
    else:
        rows, zero_sums = chain._map.check_plan(
            [(e.chunk, e.sums.size) if e else None for e in checks], depth
        )
    if whole:
        rows[rows[:, 2] == MAP_UNALLOCATED, 2] = MAP_ZERO
    else:
        rows = rows[rows[:, 2] != MAP_UNALLOCATED]
    _check_sink(target, rows, chain.virtual_size)
    stats = copyengine.copy_mapped(
        chain.fds,
        rows,
        target,
        options,
        progress=progress,
        cancel_event=cancel_event,
        layer_sums=[
            (h.cluster_size, e.chunk, e.sums.size) if e else None
            for h, e in zip(chain.headers, checks, strict=True)
        ]
        if any(checks)
        else (),
        size=chain.virtual_size,
        layer_formats=[(h.cluster_bits, h.compression_type) for h in chain.headers],
        layer_names=chain.paths,
    )
    if any(checks):
        _compare_sums(checks, stats.layer_sums or [], zero_sums)
    return stats


def _check_sink(target: copyengine.Target, rows: npt.NDArray[np.uint64], size: int) -> None:
    """A qcow2 writer takes whole clusters only: refuse, before anything is
    written, a chain whose pieces are smaller than the writer's clusters."""
    if isinstance(target, (copyengine.FileTarget, copyengine.NBDTarget)):
        return
    cs = np.uint64(target.cluster_size)
    written = rows[(rows[:, 2] & np.uint64(copyengine.REQ_NOWRITE)) == 0]
    ends = written[:, 0] + written[:, 1]
    if ((written[:, 0] % cs != 0) | ((ends % cs != 0) & (ends != np.uint64(size)))).any():
        raise ValueError(
            f"{target.name}: its {int(cs)}-byte clusters are larger than the pieces the "
            f"chain is made of; write it with a smaller cluster size (Chain.min_cluster_size)"
        )


def _compare_sums(
    checks: Sequence[LayerDigests | None],
    copied: Sequence[npt.NDArray[np.uint64] | None],
    zero_sums: Sequence[npt.NDArray[np.uint64] | None],
) -> None:
    """Tell every layer that does not match (`on_mismatch`), then raise
    IntegrityError for the mismatch at the lowest guest offset."""
    worst: tuple[int, str] | None = None
    for want, got, zeros in zip(checks, copied, zero_sums, strict=False):
        if want is None or got is None or zeros is None:
            continue
        bad = np.flatnonzero(got + zeros != want.sums)
        if not bad.size:
            continue
        offset = int(bad[0]) * want.chunk
        message = (
            f"{want.label}: the data in the chunk at offset {offset} ({human(want.chunk)}) "
            f"does not match its digest: the backup is damaged"
        )
        if want.on_mismatch is not None:
            want.on_mismatch(message)
        if worst is None or offset < worst[0]:
            worst = (offset, message)
    if worst is not None:
        raise IntegrityError(worst[1])


def layer_views(
    chain: Chain,
    layer: int,
    chunk: int,
    size: int,
    unit: int = 0,
    *,
    bottom: bool = False,
    shadow: npt.NDArray[np.uint64] | None = None,
    progress: Callable[[int], object] | None = None,
) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint64] | None]:
    """One read of layer `layer` of a chain (its own clusters, through the
    chain's open file): its digests as image_digests() gives them, and with
    `unit` its view digests (see _qcow2.layer_views), leaving out the
    (offset, length) ranges of `shadow`, which must be `unit`-aligned.
    `progress(n)`: n more bytes of the layer's data were read."""
    if unit and shadow is not None and shadow.size:
        u = np.uint64(unit)
        ends = shadow[:, 0] + shadow[:, 1]
        if bool((shadow[:, 0] % u).any() or ((ends % u != 0) & (ends != np.uint64(size))).any()):
            raise ValueError("shadow ranges must be aligned to the view unit")
    cmap = _qcow2.ChainMap([_layer(chain.fds[layer], chain.headers[layer])])
    return _qcow2.layer_views(
        cmap, chunk, (size + chunk - 1) // chunk, unit, bottom, shadow, progress
    )


def allocated(chain: Chain, layer: int = 0) -> npt.NDArray[np.uint64]:
    """(offset, length) rows of what one layer of a chain holds itself
    (data or zero clusters): what it hides of the layers beneath."""
    cmap = _qcow2.ChainMap([_layer(chain.fds[layer], chain.headers[layer])])
    rows = cmap.map(0, None, 1)
    return np.ascontiguousarray(rows[rows[:, 2] != MAP_UNALLOCATED][:, :2])


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
        if output is not None:
            merge_layers(chain, output, options)
            return
        tmp = temporary_name(Path(child_path), "merge")
        tmp.unlink(missing_ok=True)  # left over by a crashed merge
        merge_layers(chain, tmp, options)
        os.replace(tmp, child_path)
        _fsync_dir(os.path.dirname(child_path))


def merge_layers(
    chain: Chain,
    output: str | os.PathLike[str],
    options: copyengine.CopyOptions = copyengine.CopyOptions(),
) -> int:
    """Write the top two layers of an open chain as one new image at `output`,
    backed by the chain's third layer (named relative to the top image's
    directory) or by nothing; returns its cluster size.  Reads through the
    chain's open files: what a caller checked through them is what is merged."""
    if chain.depth < 2:
        raise ImageError(f"{chain.paths[0]}: has no backing file to merge")
    top_dir = os.path.dirname(chain.paths[0])
    backing = os.path.relpath(chain.paths[2], top_dir) if chain.depth > 2 else None
    cluster = min(h.cluster_size for h in chain.headers[:2])
    # a merge of compressed layers stays compressed.  A zstd cluster of a
    # layer with the merged image's cluster size is copied as it is (its
    # stream is still decompressed on the way, to be checked and hashed);
    # zlib clusters (QEMU's default type), and clusters of a layer with larger
    # clusters, are decompressed and compressed again with zstd at the default
    # level (an image does not record the level it was written with)
    compressed = any(h.compression_type == COMPRESSION_ZSTD for h in chain.headers[:2]) or bool(
        (chain.map(depth=2)[:, 2] == MAP_COMPRESSED).any()
    )
    writer = Writer(
        Path(output),
        chain.virtual_size,
        cluster,
        backing=backing,
        compress="zstd" if compressed else "none",
    )
    with writer:
        copy_chain(chain, writer, options, depth=2)
        writer.finish()
    return cluster


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
