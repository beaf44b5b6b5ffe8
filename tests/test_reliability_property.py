"""Reliability: a property test of the whole backup/restore cycle.

hypothesis draws a history: guest changes (qemu-io writes, zero writes and
discards over random ranges, unaligned ones included) interleaved with
backups (either mechanism) and, now and then, the removal of a backup (merged into
its child first; the newest one too).  At the end every restore point that is left,
restored with our engine (Host.restore_vm) and through the provider's
qemu-img-path with `qemu-img convert`, equals the guest as it was at that
backup (qemu-img compare); every backup verifies.

The default run is small (8 MiB disk, up to 6 backups, a few histories); the
long variant (slow) uses two disks of different sizes and longer histories."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from faultlib import KiB, MiB, assert_store_sound, leftovers, volids
from guests import STOREID, Guest, make_storage, restore_and_compare
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dirbackup.host import Host


@dataclass(frozen=True)
class Change:
    device: str
    command: str  # a qemu-io command


@dataclass(frozen=True)
class Backup:
    mechanism: str


@dataclass(frozen=True)
class Remove:
    which: int  # index among the backups


Step = Change | Backup | Remove


def changes(devices: dict[str, int]) -> st.SearchStrategy[Change]:
    @st.composite
    def change(draw: st.DrawFn) -> Change:
        dev = draw(st.sampled_from(sorted(devices)))
        size = devices[dev]
        aligned = draw(st.booleans())
        unit = 64 * KiB if aligned else 1
        offset = draw(st.integers(0, size // unit - 1)) * unit
        length = draw(st.integers(1, max(1, min(size - offset, 2 * MiB) // unit))) * unit
        length = min(length, size - offset)
        kind = draw(st.sampled_from(["write", "zero", "discard"]))
        if kind == "write":
            return Change(dev, f"write -P 0x{draw(st.integers(1, 255)):02x} {offset} {length}")
        if kind == "zero":
            return Change(dev, f"write -z {offset} {length}")
        return Change(dev, f"discard {offset} {length}")

    return change()


def histories(devices: dict[str, int], max_backups: int) -> st.SearchStrategy[list[Step]]:
    @st.composite
    def history(draw: st.DrawFn) -> list[Step]:
        steps: list[Step] = []
        for i in range(draw(st.integers(2, max_backups))):
            steps += draw(st.lists(changes(devices), max_size=4))
            steps.append(Backup(draw(st.sampled_from(["nbd", "file-handle"]))))
            if i >= 2 and draw(st.integers(0, 3)) == 0:
                steps.append(Remove(draw(st.integers(0, 100))))
        return steps

    return history()


def run_history(devices: dict[str, int], steps: list[Step]) -> None:
    with tempfile.TemporaryDirectory(prefix="dbprop-", dir="/var/tmp") as tmp_name:
        tmp = Path(tmp_name)
        storage = make_storage(tmp)
        guest = Guest(tmp, devices)
        host = Host(storage, STOREID)
        expected: dict[str, dict[str, Path]] = {}
        for n, step in enumerate(steps):
            if isinstance(step, Change):
                guest.change(step.device, step.command)
            elif isinstance(step, Backup):
                state = guest.snapshot()
                report = host.backup_vm(
                    100, guest.disks, mechanism=step.mechanism, start_time=1000 + n
                )
                expected[report.volid] = state
            else:  # any backup, the newest too: the next one then starts afresh
                listed = volids(storage)
                victim = listed[step.which % len(listed)]
                storage.free_image(victim)
                del expected[victim]
        assert volids(storage) == sorted(expected, key=lambda v: int(v.rsplit("-", 1)[1]))
        assert_store_sound(storage)
        assert not leftovers(Path(storage.scfg.path))
        for volid, state in expected.items():
            restore_and_compare(storage, volid, state, tmp)


SMALL = {"drive-scsi0": 8 * MiB}
LARGE = {"drive-scsi0": 24 * MiB, "drive-virtio1": 8 * MiB + 512}


@settings(
    max_examples=8,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(steps=histories(SMALL, 6))
def test_every_restore_point_equals_the_guest(steps: list[Step]) -> None:
    run_history(SMALL, steps)


@pytest.mark.slow
@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(steps=histories(LARGE, 10))
def test_every_restore_point_equals_the_guest_long(steps: list[Step]) -> None:
    run_history(LARGE, steps)
