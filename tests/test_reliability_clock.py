"""Reliability: one backup stamped in the future (made while the clock was
wrong) neither makes prune remove the newest real backups nor drags later
backups' ids (and chains) after it.

The rule (README, "The store"): a backup stamped more than a day after now is
kept by prune outside every keep rule and reported; new backups take their
ids as if it were not there, and never build on it (they would sort before
their base): the next backup of its disks is full."""

from __future__ import annotations

import json
import time
from pathlib import Path

from conftest import MiB, assert_same
from faultlib import cli, volids
from guests import STOREID, Guest, make_storage

from dirbackup.api import VmType
from dirbackup.host import Host
from dirbackup.store import FUTURE_SLACK, BackupId

DEV = "drive-scsi0"
DAY = 86_400


def parent_of(storage: object, volid: str) -> str | None:
    path = Path(storage.path(volid)[0]) / "manifest.json"  # type: ignore[attr-defined]
    return json.loads(path.read_text())["disks"][DEV]["parent"]  # type: ignore[no-any-return]


def test_a_backup_stamped_in_the_future(tmp_path: Path) -> None:
    now = int(time.time())
    storage = make_storage(tmp_path)
    guest = Guest(tmp_path, {DEV: 8 * MiB})
    host = Host(storage, STOREID)
    states: dict[str, Path] = {}

    def backup(start: int, i: int) -> str:
        guest.change(DEV, f"write -P 0x{0x20 + i:02x} {i % 8}M 64k")
        state = guest.snapshot()[DEV]
        volid = host.backup_vm(100, guest.disks, start_time=start).volid
        states[volid] = state
        return volid

    real = [backup(now - d * DAY, i) for i, d in enumerate((6, 4, 2))]
    future = backup(now + 365 * DAY, 3)  # the clock was a year ahead
    assert parent_of(storage, future) == real[-1].split(":", 1)[1]

    # the next backup takes its own time, not one after the future backup's,
    # and is full: an incremental on the future backup would sort before it
    current = backup(now, 4)
    assert current == f"{STOREID}:backup/100/qemu-{now}"
    assert parent_of(storage, current) is None
    later = backup(now + 60, 5)
    assert parent_of(storage, later) == current.split(":", 1)[1]
    assert volids(storage) == [*real, current, later, future]

    # prune: the future backup is kept and reported, and takes no slot
    s = ["--store", storage.store.root, "--storeid", STOREID]
    proc = cli("prune", *s, "--vmid", 100, "--keep-daily", 2, "--dry-run")
    assert f"{future}  keep (stamped in the future)" in proc.stdout
    assert f"{later}  keep\n" in proc.stdout and f"{real[-1]}  keep\n" in proc.stdout
    assert f"warn: {future} is stamped " in proc.stderr
    assert "in the future: kept, and counted by no keep rule" in proc.stderr
    marks = {e["volid"]: e["mark"] for e in storage.prune_backups("keep-last=1", dryrun=True)}
    assert marks == {**dict.fromkeys([*real, current], "remove"), later: "keep", future: "keep"}
    cli("prune", *s, "--vmid", 100, "--keep-last", 1)
    assert volids(storage) == [later, future]
    for volid in (later, future):  # the bases they had were merged into them
        target = tmp_path / "restored.raw"
        host.restore_vm(volid, {DEV: target}, force=True)
        assert_same(target, states[volid])
    assert all(r.ok for r in storage.verify())


def test_new_ids_pass_over_future_stamps_only(tmp_path: Path) -> None:
    """Within a day ahead a backup still moves the next id after it (a clock
    stepped back a little); beyond it, it does not."""
    store = make_storage(tmp_path).store
    now = int(time.time())
    gdir = store.guest_dir(100)
    gdir.mkdir()
    (gdir / f"qemu-{now + 3600}").mkdir()
    assert store.new_backup_id(100, VmType.QEMU, now) == BackupId(100, VmType.QEMU, now + 3601)
    (gdir / f"qemu-{now + 3600}").rename(gdir / f"qemu-{now + FUTURE_SLACK + 60}")
    assert store.new_backup_id(100, VmType.QEMU, now) == BackupId(100, VmType.QEMU, now)
    # a start time that is itself ahead still sorts after its neighbours
    ahead = now + 10 * FUTURE_SLACK
    (gdir / f"qemu-{ahead}").mkdir()
    assert store.new_backup_id(100, VmType.QEMU, ahead - 5).epoch == ahead + 1
