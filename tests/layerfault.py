"""Damage one qcow2 layer of a backup chain the ways that change what it reads
without breaking its structure: a flipped byte in a data cluster, a cleared
L2 entry (the cluster falls through to the layer beneath), a zero flag set on
a data entry (the cluster reads as zeros).  The L1/L2 tables are parsed here
(QEMU's docs/interop/qcow2.txt), so that the damage lands exactly on the
guest offset it is meant for and every tool still accepts the image."""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path

from dirbackup import qcow2

OFFSET_MASK = 0x00FFFFFFFFFFFE00
ZERO_FLAG = 1


def l2_entries(image: Path) -> list[tuple[int, int, int]]:
    """(guest offset, file offset of the entry, entry) of every non-empty L2
    entry of one image (its own clusters, not its backing file's)."""
    h = qcow2.read_header(image)
    cs = h.cluster_size
    per_table = cs // 8
    out = []
    with open(image, "rb") as f:
        f.seek(h.l1_offset)
        l1 = struct.unpack(f">{h.l1_size}Q", f.read(8 * h.l1_size))
        for i, l1e in enumerate(l1):
            table = l1e & OFFSET_MASK
            if not table:
                continue
            f.seek(table)
            for j, entry in enumerate(struct.unpack(f">{per_table}Q", f.read(cs))):
                guest = (i * per_table + j) * cs
                if entry and guest < h.virtual_size:
                    out.append((guest, table + 8 * j, entry))
    return out


def data_entry(image: Path, guest: int) -> tuple[int, int, int]:
    """The L2 entry of the data cluster holding `guest` (ValueError if that
    cluster is no data cluster of this image)."""
    cs = qcow2.read_header(image).cluster_size
    for offset, where, entry in l2_entries(image):
        if offset <= guest < offset + cs and entry & OFFSET_MASK and not entry & ZERO_FLAG:
            return offset, where, entry
    raise ValueError(f"{image}: no data cluster at guest offset {guest}")


def _put_entry(image: Path, where: int, entry: int) -> None:
    with open(image, "r+b") as f:
        f.seek(where)
        f.write(struct.pack(">Q", entry))


def flip_data_byte(image: Path, guest: int) -> None:
    """Flip one bit of the byte at `guest` in its data cluster."""
    offset, _where, entry = data_entry(image, guest)
    host = (entry & OFFSET_MASK) + (guest - offset)
    with open(image, "r+b") as f:
        f.seek(host)
        byte = f.read(1)[0]
        f.seek(host)
        f.write(bytes([byte ^ 0x10]))


def clear_l2_entry(image: Path, guest: int) -> None:
    """Unmap the data cluster holding `guest`."""
    _offset, where, _entry = data_entry(image, guest)
    _put_entry(image, where, 0)


def set_zero_flag(image: Path, guest: int) -> None:
    """Set the zero flag on the data entry of `guest`: it now reads as zeros."""
    _offset, where, entry = data_entry(image, guest)
    _put_entry(image, where, entry | ZERO_FLAG)


FAULTS: dict[str, Callable[[Path, int], None]] = {
    "flipped-byte": flip_data_byte,
    "cleared-l2-entry": clear_l2_entry,
    "zero-flag": set_zero_flag,
}
