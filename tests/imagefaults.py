"""Damage qcow2 images as bit rot or a careless hand would, at places found by
parsing the image (header, L1 and L2 tables), never at guessed offsets.

`entries(path)` lists every L2 entry of the image's allocated L2 tables (clean
ones included) with the guest offset it maps and the file offset it lies at;
`data_entries`, `zero_entries` and `clean_entries` pick by kind.  `set_entry`,
`flip_bit` and `set_backing_name` change the file in place; `FAULTS` are the
damages by guest offset that keep the image well-formed (a flipped byte in a
data cluster, a cleared L2 entry, a zero flag on a data entry).  Only the standard
layout dirbackup and QEMU write is understood (64-bit L2 entries, no
compression, no extended L2), which is all the tests need: stores whose
images these tests damage are made with `LAYOUT` (uncompressed images; the
damage of compressed clusters is tested in test_compress.py).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dirbackup import qcow2

OFFSET_MASK = 0x00FFFFFFFFFFFE00
# the storage options of the layout understood here: data clusters as they are
LAYOUT = {"compress": "none"}
ZERO_FLAG = 1
COPIED = 1 << 63
COMPRESSED = 1 << 62


@dataclass(frozen=True)
class Entry:
    """One L2 entry: the guest cluster it maps and where in the file it lies."""

    guest: int  # guest offset of the cluster
    where: int  # file offset of the 8-byte entry
    value: int  # the raw entry
    cluster_size: int

    @property
    def host(self) -> int:
        """File offset of the cluster's data (0: none)."""
        return self.value & OFFSET_MASK

    @property
    def zero(self) -> bool:
        return bool(self.value & ZERO_FLAG)

    @property
    def compressed(self) -> bool:
        """A compressed cluster's descriptor (not understood here: `host` is no
        file offset then; see LAYOUT)."""
        return bool(self.value & COMPRESSED)

    @property
    def data(self) -> bool:
        return bool(self.host) and not self.zero and not self.compressed

    @property
    def clean(self) -> bool:
        """Unallocated here: reads from the backing file."""
        return self.value == 0


def entries(path: Path) -> list[Entry]:
    """Every entry of every L2 table the image has, in guest order, up to its
    virtual size."""
    h = qcow2.read_header(path)
    cs = h.cluster_size
    per_table = cs // 8
    out = []
    with open(path, "rb") as f:
        f.seek(h.l1_offset)
        l1 = struct.unpack(f">{h.l1_size}Q", f.read(8 * h.l1_size))
        for i, l1e in enumerate(l1):
            table = l1e & OFFSET_MASK
            if not table:
                continue
            f.seek(table)
            values = struct.unpack(f">{per_table}Q", f.read(cs))
            for k, value in enumerate(values):
                guest = (i * per_table + k) * cs
                if guest >= h.virtual_size:
                    break
                out.append(Entry(guest, table + 8 * k, value, cs))
    return out


def data_entries(path: Path) -> list[Entry]:
    return [e for e in entries(path) if e.data]


def zero_entries(path: Path) -> list[Entry]:
    return [e for e in entries(path) if e.zero]


def clean_entries(path: Path) -> list[Entry]:
    return [e for e in entries(path) if e.clean]


def entry_at(path: Path, guest: int) -> Entry:
    """The entry of the cluster holding guest offset `guest` (its L2 table must exist)."""
    for e in entries(path):
        if e.guest <= guest < e.guest + e.cluster_size:
            return e
    raise LookupError(f"{path}: no L2 entry for guest offset {guest}")


def set_entry(path: Path, entry: Entry, value: int) -> None:
    with open(path, "r+b") as f:
        f.seek(entry.where)
        f.write(struct.pack(">Q", value))


def flip_bit(path: Path, offset: int, bit: int = 0) -> None:
    """Flip one bit of the byte at file offset `offset`."""
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ (1 << bit)]))


def backing_name(path: Path) -> str | None:
    return qcow2.read_header(path).backing_name


def set_backing_name(path: Path, name: str) -> None:
    """Overwrite the backing file name in place (a name of the same length)."""
    with open(path, "r+b") as f:
        f.seek(8)
        offset, length = struct.unpack(">QI", f.read(12))
        raw = name.encode()
        if not offset or len(raw) != length:
            raise ValueError(f"{path}: the new backing name must have {length} bytes")
        f.seek(offset)
        f.write(raw)


def data_bytes(path: Path) -> int:
    """Bytes of guest data the image itself holds (its data clusters)."""
    size = qcow2.read_header(path).virtual_size
    return sum(min(e.cluster_size, size - e.guest) for e in data_entries(path))


def data_entry(path: Path, guest: int) -> Entry:
    """The entry of the data cluster holding `guest` (ValueError if that
    cluster is no data cluster of this image)."""
    e = entry_at(path, guest)
    if not e.data:
        raise ValueError(f"{path}: no data cluster at guest offset {guest}")
    return e


def flip_data_byte(path: Path, guest: int) -> None:
    """Flip one bit of the byte at `guest` in its data cluster."""
    e = data_entry(path, guest)
    flip_bit(path, e.host + guest - e.guest, 4)


def clear_l2_entry(path: Path, guest: int) -> None:
    """Unmap the data cluster holding `guest` (it falls through to the layer beneath)."""
    set_entry(path, data_entry(path, guest), 0)


def set_zero_flag(path: Path, guest: int) -> None:
    """Set the zero flag on the data entry of `guest`: it now reads as zeros."""
    e = data_entry(path, guest)
    set_entry(path, e, e.value | ZERO_FLAG)


FAULTS: dict[str, Callable[[Path, int], None]] = {
    "flipped-byte": flip_data_byte,
    "cleared-l2-entry": clear_l2_entry,
    "zero-flag": set_zero_flag,
}
