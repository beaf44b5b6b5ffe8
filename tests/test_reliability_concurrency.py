"""Reliability: things that happen at the same time.

Two backups of one guest (the second waits for the per-guest lock, or gives
up clearly after its timeout; they never interleave), backups of different
guests at once (both succeed), two threads of one process backing up one
guest (excluded like two processes), prune while a backup runs (it waits; both
results stay consistent), and backup times that stay in creation order when
several land in one second or the clock steps back."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from faultlib import (
    MiB,
    assert_store_sound,
    backup_args,
    cli,
    cli_popen,
    leftovers,
    partial_dirs,
    volids,
    wait_for,
)
from guests import STOREID, Guest, make_storage, restore_and_compare

from dirbackup.errors import StoreError
from dirbackup.host import BackupReport, Host
from dirbackup.provider import DirectoryBackupProvider
from dirbackup.store import Store

DEV = "drive-scsi0"


def finish(proc) -> str:  # type: ignore[no-untyped-def]
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, (out, err)
    return out


def manifest(storage, volid: str) -> dict:  # type: ignore[no-untyped-def,type-arg]
    return json.loads((Path(storage.path(volid)[0]) / "manifest.json").read_text())


def test_same_guest_twice_at_once(tmp_path: Path) -> None:
    storage = make_storage(tmp_path)
    guest = Guest(tmp_path, {DEV: 16 * MiB})
    state = guest.snapshot()[DEV]
    image = guest.disks[0].path
    store = storage.scfg.path
    first = cli_popen(*backup_args(store, 100, image, "--bwlimit", "4M"))
    wait_for(lambda: partial_dirs(storage, 100))
    second = cli_popen(*backup_args(store, 100, image))
    out1, out2 = finish(first), finish(second)
    assert "drive-scsi0 full" in out1 and "drive-scsi0 incremental" in out2, (out1, out2)
    a, b = volids(storage)
    assert out1.startswith(a) and out2.startswith(b)
    # the second built on the first, after it had finished: nothing was dirty
    assert storage.list_volumes(100)[1]["parent"] == a
    assert manifest(storage, b)["disks"][DEV]["dirty_bytes"] == 0
    assert_store_sound(storage)
    assert not leftovers(Path(store))
    for volid in (a, b):
        restore_and_compare(storage, volid, {DEV: state}, tmp_path)


def test_a_backup_in_the_moment_the_first_unlocks(tmp_path: Path) -> None:
    """Deterministically: a second backup runs right when the first one's
    provider releases the guest (backup_cleanup returned).  The first is
    finished by then -- bitmaps advanced -- so the second reads nothing."""
    storage = make_storage(tmp_path)
    guest = Guest(tmp_path, {DEV: 16 * MiB})
    image = guest.disks[0].path
    Host(storage, STOREID).backup_vm(100, guest.disks, start_time=1000)
    guest.change(DEV, "write -P 0x55 1M 2M")
    state = guest.snapshot()[DEV]
    seconds: list[str] = []

    class SecondRunsAfterCleanup(DirectoryBackupProvider):
        def backup_cleanup(self, vmid, vmtype, success, info):  # type: ignore[no-untyped-def]
            result = super().backup_cleanup(vmid, vmtype, success, info)
            if success:
                seconds.append(cli(*backup_args(storage.scfg.path, 100, image)).stdout)
            return result

    provider = SecondRunsAfterCleanup(storage, storage.scfg, STOREID)
    first = Host(storage, STOREID, provider=provider).backup_vm(100, guest.disks)
    [second] = seconds
    a, b = volids(storage)[1:]
    assert first.volid == a and second.startswith(b)
    assert manifest(storage, a)["disks"][DEV]["dirty_bytes"] > 0
    assert manifest(storage, b)["disks"][DEV]["dirty_bytes"] == 0, second
    assert_store_sound(storage)
    for volid in (a, b):
        restore_and_compare(storage, volid, {DEV: state}, tmp_path)


def test_same_guest_second_gives_up_after_its_timeout(tmp_path: Path) -> None:
    storage = make_storage(tmp_path)
    guest = Guest(tmp_path, {DEV: 16 * MiB})
    state = guest.snapshot()[DEV]
    store = storage.scfg.path
    first = cli_popen(*backup_args(store, 100, guest.disks[0].path, "--bwlimit", "2M"))
    try:
        wait_for(lambda: partial_dirs(storage, 100))
        provider = DirectoryBackupProvider(storage, storage.scfg, STOREID, lock_timeout=1)
        started = time.monotonic()
        with pytest.raises(StoreError, match=r"guest 100 is locked by another backup or prune"):
            Host(storage, STOREID, provider=provider).backup_vm(100, guest.disks)
        assert 1 <= time.monotonic() - started < 10
        # the command line's --lock-timeout: one line, exit 1, nothing left behind
        started = time.monotonic()
        res = cli(*backup_args(store, 100, guest.disks[0].path, "--lock-timeout", "1"), check=1)
        assert 1 <= time.monotonic() - started < 20
        assert res.stderr.strip().splitlines() == [
            "error: guest 100 is locked by another backup or prune; gave up after 1 s (backup)"
        ], res.stderr
        assert len(partial_dirs(storage, 100)) == 1  # only the first one's
    finally:
        out = finish(first)
    assert "drive-scsi0 full" in out
    [volid] = assert_store_sound(storage)
    assert not leftovers(Path(store))
    restore_and_compare(storage, volid, {DEV: state}, tmp_path)


def test_different_guests_at_once(tmp_path: Path) -> None:
    storage = make_storage(tmp_path)
    guests = {}
    for vmid in (100, 101):
        root = tmp_path / str(vmid)
        root.mkdir()
        guests[vmid] = Guest(root, {DEV: 16 * MiB})
        guests[vmid].change(DEV, f"write -P 0x{vmid - 90:02x} 2M 2M")
    states = {vmid: g.snapshot()[DEV] for vmid, g in guests.items()}
    store = storage.scfg.path
    procs = {
        vmid: cli_popen(*backup_args(store, vmid, g.disks[0].path, "--bwlimit", "4M"))
        for vmid, g in guests.items()
    }
    # both run at the same time
    wait_for(lambda: partial_dirs(storage, 100) and partial_dirs(storage, 101))
    for proc in procs.values():
        finish(proc)
    assert_store_sound(storage)
    for vmid in (100, 101):
        [volid] = volids(storage, vmid)
        restore_and_compare(storage, volid, {DEV: states[vmid]}, tmp_path)


def test_prune_while_a_backup_runs(tmp_path: Path) -> None:
    storage = make_storage(tmp_path)
    guest = Guest(tmp_path, {DEV: 16 * MiB})
    host = Host(storage, STOREID)
    states = {}
    for i in range(3):
        guest.change(DEV, f"write -P 0x{0x30 + i:02x} {i}M 1M", f"write -z {8 + i}M 64k")
        states[host.backup_vm(100, guest.disks, start_time=1000 + i).volid] = guest.snapshot()[DEV]
    guest.change(DEV, "write -P 0x44 4M 6M")
    store = storage.scfg.path
    backup = cli_popen(*backup_args(store, 100, guest.disks[0].path, "--bwlimit", "4M"))
    wait_for(lambda: partial_dirs(storage, 100))
    state = guest.snapshot()[DEV]
    prune = cli_popen(
        "prune", "--store", store, "--storeid", STOREID, "--vmid", 100, "--keep-last", 1
    )
    assert prune.poll() is None
    out = finish(backup)
    assert prune.wait(60) == 0, prune.communicate()
    # prune waited for the backup and then kept the newest backup: that one
    [newest] = volids(storage)
    assert out.startswith(newest)
    states[newest] = state
    assert storage.list_volumes(100)[-1]["parent"] is None  # its bases merged into it
    assert_store_sound(storage)
    assert not leftovers(Path(store))
    for volid in volids(storage):
        restore_and_compare(storage, volid, {DEV: states[volid]}, tmp_path)


def test_two_prunes_at_once(tmp_path: Path) -> None:
    """Two prunes mark the same backups, then wait for the guest's lock: the
    one that runs second must mark again, not remove what is gone already."""
    storage = make_storage(tmp_path)
    guest = Guest(tmp_path, {DEV: 8 * MiB})
    host = Host(storage, STOREID)
    states = {}
    for i in range(4):
        guest.change(DEV, f"write -P 0x{0x70 + i:02x} {i}M 1M")
        states[host.backup_vm(100, guest.disks, start_time=1000 + i).volid] = guest.snapshot()[DEV]
    store = ["--store", storage.scfg.path, "--storeid", STOREID, "--vmid", 100]
    with storage.store.lock(100):  # both start, mark, and wait
        prunes = [cli_popen("prune", *store, "--keep-last", n) for n in (2, 1)]
        time.sleep(1.0)
        assert all(p.poll() is None for p in prunes)
    for p in prunes:
        finish(p)
    newest = max(states, key=lambda v: int(v.rsplit("-", 1)[1]))
    assert volids(storage) == [newest]
    assert_store_sound(storage)
    assert not leftovers(Path(storage.scfg.path))
    restore_and_compare(storage, newest, {DEV: states[newest]}, tmp_path)


def test_backup_times_stay_in_creation_order(tmp_path: Path) -> None:
    """Three backups in one second get 5000, 5001, 5002; with 5001 removed the
    next one still sorts last, and so does one after the clock stepped back:
    keep-last keeps the newest."""
    storage = make_storage(tmp_path)
    guest = Guest(tmp_path, {DEV: 8 * MiB})
    host = Host(storage, STOREID)
    states = {}
    for i in range(3):
        guest.change(DEV, f"write -P 0x{0x60 + i:02x} {i}M 64k")
        states[host.backup_vm(100, guest.disks, start_time=5000).volid] = guest.snapshot()[DEV]
    assert [v.rsplit("-", 1)[1] for v in volids(storage)] == ["5000", "5001", "5002"]
    storage.free_image(volids(storage)[1])
    for start in (5000, 4000):
        guest.change(DEV, f"write -P 0x6{start // 1000} 5M 64k")
        volid = host.backup_vm(100, guest.disks, start_time=start).volid
        states[volid] = guest.snapshot()[DEV]
        assert volids(storage)[-1] == volid
        assert storage.list_volumes(100)[-1]["parent"] == volids(storage)[-2]
    storage.prune_backups("keep-last=1", vmid=100)
    assert volids(storage) == [volid]
    assert_store_sound(storage)
    restore_and_compare(storage, volid, {DEV: states[volid]}, tmp_path)
    cli("verify", "--store", storage.scfg.path, "--storeid", STOREID)


def test_the_guest_lock_excludes_other_threads(tmp_path: Path) -> None:
    """The lock is re-entrant for the thread holding it (the host prunes and
    sets attributes from it), and excludes every other thread."""
    store = Store(tmp_path, lock_timeout=0.3)
    held, release = threading.Event(), threading.Event()

    def holder() -> None:
        with store.lock(100), store.lock(100):  # the same thread: re-entrant
            held.set()
            release.wait(30)

    t = threading.Thread(target=holder)
    t.start()
    try:
        assert held.wait(30)
        started = time.monotonic()
        locked = r"guest 100 is locked by another backup or prune"
        with pytest.raises(StoreError, match=locked), store.lock(100):
            pass
        assert time.monotonic() - started >= 0.3
    finally:
        release.set()
        t.join()
    with store.lock(100, timeout=0):  # free again
        pass


def test_same_guest_from_two_threads(tmp_path: Path) -> None:
    """Two threads of one process back up the same guest at once: the second
    waits for the first, then builds on it (nothing is dirty by then)."""
    storage = make_storage(tmp_path)
    guest = Guest(tmp_path, {DEV: 16 * MiB})
    state = guest.snapshot()[DEV]
    reports: dict[str, object] = {}

    def run(name: str, bwlimit: int) -> None:
        try:
            reports[name] = Host(storage, STOREID).backup_vm(
                100, guest.disks, bandwidth_limit=bwlimit
            )
        except BaseException as exc:  # reported by the main thread
            reports[name] = exc

    first = threading.Thread(target=run, args=("first", 4 * MiB))
    first.start()
    wait_for(lambda: partial_dirs(storage, 100))
    second = threading.Thread(target=run, args=("second", 0))
    second.start()
    first.join(120)
    second.join(120)
    a, b = reports["first"], reports["second"]
    assert isinstance(a, BackupReport) and isinstance(b, BackupReport), reports
    assert a.bitmap_modes == {DEV: "new"} and b.bitmap_modes == {DEV: "reuse"}
    assert volids(storage) == [a.volid, b.volid]
    assert storage.list_volumes(100)[1]["parent"] == a.volid
    assert manifest(storage, b.volid)["disks"][DEV]["dirty_bytes"] == 0
    assert_store_sound(storage)
    assert not leftovers(Path(storage.scfg.path))
    for volid in (a.volid, b.volid):
        restore_and_compare(storage, volid, {DEV: state}, tmp_path)
