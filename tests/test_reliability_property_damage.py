"""Reliability: damaged stores never restore wrong bytes with a success.

hypothesis draws a history of guest changes and backups (full, then
incrementals, into one store), keeps the guest's state at each backup, then
damages the store: bits flipped in data clusters, L2 entries, the L1 table and
the header of randomly chosen layers.  Every restore point is then restored
with our engine and through the provider's qemu-img-path.  Each restore either
fails with a clear error (DirbackupError or OSError) or gives back exactly the
guest as it was at that backup (qemu-img compare) -- never success with wrong
data."""

from __future__ import annotations

import random
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import imagefaults
import pytest
from faultlib import KiB, MiB, volids
from guests import STOREID, Guest, make_storage
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dirbackup import qcow2, qemu
from dirbackup.errors import DirbackupError
from dirbackup.host import Host
from dirbackup.storage import DirectoryStorage

DEVICE = "drive-scsi0"
SIZE = 4 * MiB
KINDS = ("data", "l2", "l1", "header")


@dataclass(frozen=True)
class Damage:
    backup: int  # index among the backups
    kind: str  # one of KINDS
    seed: int  # picks the entry, byte and bit


@st.composite
def _write(draw: st.DrawFn) -> str:
    unit = draw(st.sampled_from([64 * KiB, 512]))
    offset = draw(st.integers(0, SIZE // unit - 1)) * unit
    length = min(draw(st.integers(1, (512 * KiB) // unit)) * unit, SIZE - offset)
    kind = draw(st.sampled_from(["write", "write", "zero", "discard"]))
    if kind == "write":
        return f"write -P 0x{draw(st.integers(1, 255)):02x} {offset} {length}"
    if kind == "zero":
        return f"write -z {offset} {length}"
    return f"discard {offset} {length}"


scenarios = st.tuples(
    st.lists(st.lists(_write(), max_size=3), min_size=2, max_size=4),
    st.lists(
        st.builds(Damage, st.integers(0, 100), st.sampled_from(KINDS), st.integers(0, 1 << 30)),
        min_size=1,
        max_size=3,
    ),
)


def damage(image: Path, d: Damage) -> str:
    """Apply one damage to an image; say what was done (for failure reports)."""
    rng = random.Random(d.seed)
    try:
        h = qcow2.read_header(image)
    except DirbackupError:  # an earlier damage broke the header
        return f"{d.kind}: header unreadable, nothing to damage"
    if d.kind in ("data", "l2"):
        try:
            table = imagefaults.entries(image)
        except (OSError, ValueError, struct.error):  # an earlier damage broke the tables
            return f"{d.kind}: tables unreadable, nothing to damage"
        pool = [e for e in table if e.data] if d.kind == "data" else table
        if not pool:
            return f"{d.kind}: nothing to damage"
        e = rng.choice(pool)
        if d.kind == "data":
            where = e.host + rng.randrange(e.cluster_size)
        else:
            where = e.where + rng.randrange(8)
    elif d.kind == "l1":
        where = h.l1_offset + rng.randrange(h.l1_size * 8)
    else:
        where = rng.randrange(104)
    if where >= image.stat().st_size:  # an earlier damage sent an entry past the end
        return f"{d.kind}: byte {where} lies past the end of {image.name}"
    bit = rng.randrange(8)
    imagefaults.flip_bit(image, where, bit)
    return f"{d.kind}: bit {bit} of byte {where} of {image.name}"


def _restore_is_exact_or_fails(storage: DirectoryStorage, volid: str, raw: Path, tmp: Path) -> str:
    """'ok' or 'refused'; an AssertionError for success with wrong bytes."""
    target = tmp / "restore.raw"
    target.unlink(missing_ok=True)
    try:
        Host(storage, STOREID).restore_vm(volid, {DEVICE: target}, force=True)
    except (DirbackupError, OSError):
        assert not target.exists(), "a failed restore left its target under the final name"
        ours = "refused"
    else:
        same, msg = qemu.img_compare(raw, target)
        assert same, f"our restore of {volid} succeeded with wrong data: {msg}"
        ours = "ok"
    provider = storage.new_backup_provider()
    volname = volid.split(":", 1)[1]
    out = tmp / "via-qemu-img.raw"
    out.unlink(missing_ok=True)
    try:
        path = provider.restore_vm_volume_init(volname, DEVICE, {})["qemu-img-path"]
    except (DirbackupError, OSError):
        return ours
    try:
        qemu.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", path, str(out)])
    except DirbackupError:
        return ours  # QEMU itself refused to read it: loud
    finally:
        provider.restore_vm_volume_cleanup(volname, DEVICE, {})
        provider.restore_vm_cleanup(volname)
    same, msg = qemu.img_compare(raw, out)
    assert same, f"qemu-img-path of {volid} served wrong data: {msg}"
    return ours


def run_scenario(rounds: list[list[str]], damages: list[Damage]) -> list[str]:
    """Outcomes of our engine's restores, oldest restore point first."""
    with tempfile.TemporaryDirectory(prefix="dbcorrupt-", dir="/var/tmp") as tmp_name:
        tmp = Path(tmp_name)
        storage = make_storage(tmp, **imagefaults.LAYOUT)
        guest = Guest(tmp, {DEVICE: SIZE})
        host = Host(storage, STOREID)
        expected: dict[str, Path] = {}
        for n, writes in enumerate(rounds):
            if writes:
                guest.change(DEVICE, *writes)
            state = guest.snapshot()
            report = host.backup_vm(100, guest.disks, start_time=1000 + n)
            expected[report.volid] = state[DEVICE]
        listed = volids(storage)
        done = []
        for d in damages:
            volid = listed[d.backup % len(listed)]
            image = Path(storage.path(volid)[0]) / f"{DEVICE}.qcow2"
            done.append(damage(image, d))
        outcomes = []
        for volid in listed:
            try:
                outcomes.append(_restore_is_exact_or_fails(storage, volid, expected[volid], tmp))
            except AssertionError as exc:
                raise AssertionError(f"{exc}\nafter damage: {done}") from None
        return outcomes


def test_damaged_base_data_is_refused(tmp_path: Path) -> None:
    """A fixed case: a flipped bit in a data cluster of the full backup fails the
    restore of the full backup and of the incrementals built on it."""
    rounds = [["write -P 0x11 0 1M"], ["write -P 0x22 2M 64k"], ["write -z 0 64k"]]
    assert run_scenario(rounds, [Damage(0, "data", 7)]) == ["refused"] * 3


@settings(
    max_examples=10,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(scenario=scenarios)
def test_damage_never_restores_wrong_bytes(scenario: tuple[list[list[str]], list[Damage]]) -> None:
    run_scenario(*scenario)


@pytest.mark.slow
@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(scenario=scenarios)
def test_damage_never_restores_wrong_bytes_long(
    scenario: tuple[list[list[str]], list[Damage]],
) -> None:
    run_scenario(*scenario)
