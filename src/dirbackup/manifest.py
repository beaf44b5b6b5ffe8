"""The records a backup store keeps as JSON: a backup's manifest (its files,
disks, digests, parent and attributes) and a guest's previous-info (the last
good backup of each disk, to build the next incremental on).

They are plain data with their parsing and typing rules; where they live on
disk is store.py's business.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, fields
from typing import Any, TypeVar

from dirbackup import __version__
from dirbackup.errors import StoreError

_R = TypeVar("_R")

# ----------------------------------------------------------------------------
# Manifest


@dataclass
class DiskRecord:
    """One VM disk of a backup."""

    file: str
    size: int  # virtual size in bytes
    mode: str  # "full" or "incremental"
    parent: str | None  # volname of the backup holding the backing image
    cluster_size: int
    digest_chunk: int
    digests: dict[str, str]  # chunk index -> hex XXH64 sum, non-zero sums only
    dirty_bytes: int = 0
    written_bytes: int = 0
    compress: str = "none"  # how data clusters are stored: none or zstd:LEVEL


@dataclass
class FileRecord:
    """A plain file of a backup (configs, archives)."""

    size: int
    sha256: str | None = None


@dataclass
class Manifest:
    """What a backup holds, and its attributes (notes, protected)."""

    vmid: int
    vmtype: str
    ctime: int
    mode: str  # "full", "incremental" or "container"
    parent: str | None = None
    disks: dict[str, DiskRecord] = field(default_factory=dict)
    files: dict[str, FileRecord] = field(default_factory=dict)
    notes: str = ""
    protected: bool = False
    tool: str = f"dirbackup {__version__}"
    format: int = 1
    legacy: bool = False  # made for a backup written without a manifest (the seed's layout)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str = "manifest") -> Manifest:
        """Parse a manifest; one whose JSON or field types are wrong raises
        StoreError (a listing reports it as that backup's problem, and no
        later check trips over a list where a table belongs)."""
        try:
            raw = json.loads(text)
            if not isinstance(raw, dict):
                raise TypeError("not a JSON object")
            disks = {k: _typed(DiskRecord(**v), k) for k, v in _table(raw.pop("disks", {}))}
            files = {k: _typed(FileRecord(**v), k) for k, v in _table(raw.pop("files", {}))}
            return _typed(cls(disks=disks, files=files, **raw), "manifest")
        except (ValueError, TypeError) as exc:
            raise StoreError(f"{where}: unreadable manifest ({exc})") from None


def _table(value: object) -> list[tuple[str, dict[str, Any]]]:
    """The items of a JSON object of objects (disks, files), or TypeError."""
    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
        raise TypeError("disks and files must be objects of objects")
    return list(value.items())


_FIELD_TYPES: dict[str, Callable[[object], bool]] = {
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "str": lambda v: isinstance(v, str),
    "bool": lambda v: isinstance(v, bool),
    "str | None": lambda v: v is None or isinstance(v, str),
    "dict[str, str]": lambda v: isinstance(v, dict) and all(isinstance(x, str) for x in v.values()),
}


def _typed(record: _R, what: str) -> _R:
    """`record`, after checking that its fields hold the JSON types they are
    declared with (fields of other types are checked where they are made)."""
    for f in fields(record):  # type: ignore[arg-type]
        check = _FIELD_TYPES.get(str(f.type))
        if check is not None and not check(getattr(record, f.name)):
            raise TypeError(f"{what}: {f.name} is not of type {f.type}")
    return record


# ----------------------------------------------------------------------------
# previous-info


@dataclass
class PreviousDevice:
    """The last good backup of one device, to build the next incremental on.

    `bitmap` and `backing` are recorded when the host takes part in the
    bitmap generations (api.BitmapGenerations): the name of the dirty bitmap
    that starts with this backup, and the identity of the disk's layers below
    its top image.  The next incremental needs both to match the disk."""

    backup: str  # backup directory name, e.g. qemu-1700000000
    size: int
    file: str
    bitmap: str | None = None
    backing: list[dict[str, Any]] | None = None


@dataclass
class PreviousInfo:
    """The provider's record of the last good backup per device of a guest.

    The seed wrote `"<bitmap-id> <backup-time>"`; that form is still read."""

    devices: dict[str, PreviousDevice] = field(default_factory=dict)
    backup: str | None = None  # newest good backup of the guest

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True) + "\n"

    @classmethod
    def parse(cls, text: str, vmtype: str = "qemu") -> PreviousInfo:
        text = text.strip()
        if not text:
            return cls()
        legacy = re.fullmatch(r"(\d+)\s+(\d+)", text)
        if legacy:
            return cls(backup=f"{vmtype}-{legacy.group(2)}")
        try:
            raw = json.loads(text)
            devices = {k: PreviousDevice(**v) for k, v in raw.get("devices", {}).items()}
            return cls(devices=devices, backup=raw.get("backup"))
        except (ValueError, TypeError, AttributeError):
            return cls()  # unreadable: no incremental, next backup is full


def digest_map(digests: Iterable[int]) -> dict[str, str]:
    """Non-zero per-chunk digest sums as {chunk index: 16 hex digits}, the
    manifest's sparse form (an incremental touches few chunks)."""
    return {str(i): f"{int(v):016x}" for i, v in enumerate(digests) if int(v)}
