"""The drive map of a VM's guest config: PVE's `#qmdump#map:` lines.

The hypervisor appends to the guest config it hands to the provider one line
per backed-up disk,

    #qmdump#map:VIRTDEV:DEVICE:STOREID:FORMAT:

(VIRTDEV the config's drive key, e.g. `scsi0`; DEVICE the backup's device
name, `drive-scsi0`; STOREID the storage the disk was on, empty for a plain
path; FORMAT the disk's format), after dropping any such line the config
already had.  A restore reads them back to know which of the backup's
devices is which drive of the guest.  The standalone host writes them the
same way and honours them on restore (`Host.restore_vm`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from dirbackup.errors import HostError

PREFIX = "#qmdump#map:"
_LINE = re.compile(r"^#qmdump#map:([^:\s]+):([^:\s]+):([^:\s]*):([^:\s]*):$")
_DRIVE = "drive-"


@dataclass(frozen=True)
class DriveMapping:
    """One `#qmdump#map:` line."""

    virtdev: str
    device: str
    storeid: str = ""
    format: str = ""

    def line(self) -> str:
        return f"{PREFIX}{self.virtdev}:{self.device}:{self.storeid}:{self.format}:"


def virtdev_of(device: str) -> str:
    """The guest config's drive key of a backup device: `drive-scsi0` ->
    `scsi0` (the hypervisor's naming); a device named otherwise is its own key."""
    return (
        device[len(_DRIVE) :] if device.startswith(_DRIVE) and len(device) > len(_DRIVE) else device
    )


def mappings(disks: Iterable[tuple[str, str]]) -> list[DriveMapping]:
    """The map of a VM's disks, given as (device, format), on a plain path
    (no storage id).  Each drive key is unique: a device whose key would be
    another device's name (`drive-scsi0` beside a device `scsi0`) is its own
    key, so that every backup the host writes can be restored."""
    disks = list(disks)
    names = {device for device, _ in disks}
    out = []
    for device, fmt in disks:
        key = virtdev_of(device)
        out.append(
            DriveMapping(key if key == device or key not in names else device, device, "", fmt)
        )
    return out


def with_map(config: str, mappings: Iterable[DriveMapping]) -> str:
    """`config` without its `#qmdump#`/`#vzdump#` lines (the hypervisor drops
    them "just to be sure"), then one map line per disk.  Every other line is
    kept as it was, byte for byte (lines end at "\n" only)."""
    lines = config.split("\n")
    if lines[-1] == "":
        lines.pop()
    kept = [line for line in lines if not line.startswith(("#qmdump#", "#vzdump#"))]
    return "".join(f"{line}\n" for line in [*kept, *(m.line() for m in mappings)])


def parse(config: str) -> list[DriveMapping]:
    """The map lines of a guest config (none in a config written without
    them).  A malformed map line, or a drive or device mapped twice, is an
    error: a restore must not guess which disk is which."""
    found: list[DriveMapping] = []
    for number, line in enumerate(config.split("\n"), 1):
        if not line.startswith(PREFIX):
            continue
        m = _LINE.match(line)
        if m is None:
            raise HostError(f"guest config line {number}: malformed drive map line {line!r}")
        mapping = DriveMapping(*m.groups())
        for other in found:
            if other.virtdev == mapping.virtdev or other.device == mapping.device:
                raise HostError(
                    f"guest config line {number}: {mapping.virtdev} ({mapping.device}) "
                    "is mapped twice"
                )
        found.append(mapping)
    return found
