"""Reliability: whole histories in which the disk's identity changes between backups.

hypothesis draws guest changes interleaved with backups and identity changes:

* each backup goes into one of two stores that share the default storage id
  (so they would share one dirty bitmap if the bitmap were named after it);
* now and then a backup names the disk with a typo (`drive-scsci0`), and the
  next one uses the right name again;
* the disk file is replaced by a copy of itself (a new inode, the same
  bitmaps) or by a copy of itself taken at an earlier backup (older bitmaps);
* a second disk is added to the guest or removed from it.

At the end every restore point in both stores, restored with our engine and
through the provider's qemu-img-path, equals the guest as it was at that
backup, and both stores verify.  A wrong incremental -- one that builds on a
backup its bitmap does not continue -- fails the comparison."""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from faultlib import KiB, MiB, assert_store_sound, volids
from guests import STOREID, Guest, make_storage, restore_and_compare
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dirbackup.host import Disk, Host
from dirbackup.storage import DirectoryStorage

MAIN, EXTRA, TYPO = "drive-scsi0", "drive-scsi1", "drive-scsci0"
SIZES = {MAIN: 4 * MiB, EXTRA: 2 * MiB + 512}


@dataclass(frozen=True)
class Change:
    device: str
    command: str  # a qemu-io command


@dataclass(frozen=True)
class Backup:
    store: int  # which of the two stores
    mechanism: str
    typo: bool  # the main disk backed up as TYPO


@dataclass(frozen=True)
class Replace:
    older: int | None  # None: a copy of the disk as it is; k: the copy kept at backup k


@dataclass(frozen=True)
class Toggle:
    """Attach the second disk to the guest, or detach it."""


Step = Change | Backup | Replace | Toggle


@st.composite
def _change(draw: st.DrawFn) -> Change:
    dev = draw(st.sampled_from(sorted(SIZES)))
    size = SIZES[dev]
    unit = draw(st.sampled_from([64 * KiB, 4 * KiB, 1]))
    offset = draw(st.integers(0, size // unit - 1)) * unit
    length = min(draw(st.integers(1, max(1, MiB // unit))) * unit, size - offset)
    kind = draw(st.sampled_from(["write", "write", "zero", "discard"]))
    if kind == "write":
        return Change(dev, f"write -P 0x{draw(st.integers(1, 255)):02x} {offset} {length}")
    if kind == "zero":
        return Change(dev, f"write -z {offset} {length}")
    return Change(dev, f"discard {offset} {length}")


@st.composite
def histories(draw: st.DrawFn, max_backups: int) -> list[Step]:
    steps: list[Step] = []
    for _ in range(draw(st.integers(3, max_backups))):
        steps += draw(st.lists(_change(), max_size=3))
        event = draw(st.sampled_from(["none", "none", "replace", "older", "toggle"]))
        if event == "replace":
            steps.append(Replace(None))
        elif event == "older":
            steps.append(Replace(draw(st.integers(0, 100))))
        elif event == "toggle":
            steps.append(Toggle())
        steps += draw(st.lists(_change(), max_size=2))
        steps.append(
            Backup(
                draw(st.integers(0, 1)),
                draw(st.sampled_from(["nbd", "file-handle"])),
                draw(st.integers(0, 5)) == 0,
            )
        )
    return steps


class _Scene:
    """The guest, its kept copies and two stores with the same storage id."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.guest = Guest(tmp, dict(SIZES))
        self.attached = {MAIN}
        self.stores: list[DirectoryStorage] = []
        for i in range(2):
            (tmp / f"s{i}").mkdir()
            self.stores.append(make_storage(tmp / f"s{i}"))
        self.kept: list[Path] = []  # copies of the main disk, one per backup
        self.expected: list[dict[str, dict[str, Path]]] = [{}, {}]

    def image(self, dev: str) -> Path:
        return self.tmp / f"{dev}.qcow2"

    def replace(self, older: int | None) -> None:
        img = self.image(MAIN)
        if older is None or not self.kept:
            copy = img.with_suffix(".copy")
            shutil.copy2(img, copy)  # bitmaps come along: the same disk
        else:
            copy = img.with_suffix(".copy")
            shutil.copy2(self.kept[older % len(self.kept)], copy)
        copy.replace(img)  # a new inode at the same path

    def backup(self, n: int, step: Backup) -> None:
        disks = [Disk(TYPO if step.typo else MAIN, self.image(MAIN))]
        if EXTRA in self.attached:
            disks.append(Disk(EXTRA, self.image(EXTRA)))
        state = self.guest.snapshot()
        storage = self.stores[step.store]
        report = Host(storage, STOREID).backup_vm(
            100, disks, mechanism=step.mechanism, start_time=1000 + n
        )
        raws = {TYPO if step.typo else MAIN: state[MAIN]}
        if EXTRA in self.attached:
            raws[EXTRA] = state[EXTRA]
        self.expected[step.store][report.volid] = raws
        kept = self.tmp / f"kept{len(self.kept)}.qcow2"
        shutil.copy2(self.image(MAIN), kept)
        self.kept.append(kept)


def run_history(steps: list[Step]) -> None:
    with tempfile.TemporaryDirectory(prefix="dbident-", dir="/var/tmp") as tmp_name:
        scene = _Scene(Path(tmp_name))
        for n, step in enumerate(steps):
            if isinstance(step, Change):
                scene.guest.change(step.device, step.command)
            elif isinstance(step, Replace):
                scene.replace(step.older)
            elif isinstance(step, Toggle):
                scene.attached ^= {EXTRA}
            else:
                scene.backup(n, step)
        for storage, expected in zip(scene.stores, scene.expected, strict=True):
            assert volids(storage) == sorted(expected, key=lambda v: int(v.rsplit("-", 1)[1]))
            assert_store_sound(storage)
            for volid, state in expected.items():
                restore_and_compare(storage, volid, state, scene.tmp)


def test_two_stores_typo_and_copies_fixed_history(tmp_path: Path) -> None:
    """The issue's cases in one fixed history: alternate stores, a typo, the disk
    replaced by an older copy of itself, a second disk added and removed."""
    w = "write -P 0x{:02x} {} 65536"
    steps: list[Step] = [
        Backup(0, "nbd", False),
        Change(MAIN, w.format(0x11, 0)),
        Backup(1, "nbd", False),
        Change(MAIN, w.format(0x22, 65536)),
        Backup(0, "nbd", False),  # must not miss 0x11 (store 1 cleared a shared bitmap)
        Change(MAIN, w.format(0x33, 2 * 65536)),
        Backup(0, "file-handle", True),
        Change(MAIN, w.format(0x44, 3 * 65536)),
        Backup(0, "nbd", False),  # must not miss 0x33 (the typo's backup cleared it)
        Replace(1),
        Toggle(),
        Change(EXTRA, w.format(0x55, 0)),
        Backup(1, "nbd", False),
        Toggle(),
        Change(MAIN, w.format(0x66, 4 * 65536)),
        Backup(1, "file-handle", False),
        Replace(None),
        Change(MAIN, w.format(0x77, 0)),
        Backup(1, "nbd", False),
    ]
    run_history(steps)


@settings(
    max_examples=5,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(steps=histories(5))
def test_identity_changes_never_give_a_wrong_restore(steps: list[Step]) -> None:
    run_history(steps)


@pytest.mark.slow
@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(steps=histories(10))
def test_identity_changes_never_give_a_wrong_restore_long(steps: list[Step]) -> None:
    run_history(steps)
