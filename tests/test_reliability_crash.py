"""Reliability: kill -9 of the command line at any point.

Exact points come from strace, which delivers SIGKILL on entry of the Nth
rename / fdatasync / unlink of the main thread (the call never happens):
while the qcow2 metadata is written, before the manifest lands, before and
after the publishing rename, before previous-info and before the log.  Other
points come from timing: SIGKILL after N ms of a bandwidth-limited backup,
and SIGKILL of prune while it merges a removed base into its child.

After each crash: the list shows no half backup, every listed backup
verifies, no qemu-nbd or nbdfuse is left holding the guest's disk, the next
run removes every leftover (partial directories of dead processes, .tmp-PID
files, .removing-PID and merge leftovers), and the next incremental restores
(with our engine and through qemu-img) to exactly the guest."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from faultlib import (
    MiB,
    assert_store_sound,
    backup_args,
    cli,
    cli_killed_at,
    cli_popen,
    leftovers,
    partial_dirs,
    servers_for,
    volids,
    wait_for,
)
from guests import STOREID, Guest, make_storage, restore_and_compare

from dirbackup import qemu
from dirbackup.host import Host

DEV = "drive-scsi0"
RENAME = "rename"  # os.rename / os.replace
EXCHANGE = "renameat2"  # the atomic swap of a merge
UNLINK = "unlink,unlinkat"


class CrashScene:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.storage = make_storage(tmp_path)
        self.root = Path(self.storage.scfg.path)
        self.guest = Guest(tmp_path, {DEV: 16 * MiB})
        self.image = self.guest.disks[0].path
        self.states: dict[str, Path] = {}
        self.first = self.backup_in_process()
        self.change(1)

    def backup_in_process(self) -> str:
        state = self.guest.snapshot()[DEV]
        volid = Host(self.storage, STOREID).backup_vm(100, self.guest.disks).volid
        self.states[volid] = state
        return volid

    def change(self, n: int) -> None:
        n %= 6
        self.guest.change(
            DEV, f"write -P 0x{0x50 + n:02x} {n}M 1M", f"write -z {8 + n}M 64k", "discard 14M 1M"
        )

    def args(self, *extra: object) -> list[object]:
        return backup_args(self.root, 100, self.image, *extra, device=DEV)

    def after_crash(self, before: list[str]) -> list[str]:
        """What must hold right after the crash, before anything cleans up."""
        listed = assert_store_sound(self.storage)
        assert listed[: len(before)] == before and len(listed) <= len(before) + 1, listed
        # the servers of the dead backup go with it
        wait_for(lambda: not servers_for(str(self.tmp)), timeout=10)
        # the guest's disk is free for the VM again
        qemu.io(self.image, "write -P 0x77 15M 4k")
        return listed

    def next_run_heals(self) -> None:
        """The next backup cleans every leftover and is an exact incremental."""
        state = self.guest.snapshot()[DEV]
        out = cli(*self.args()).stdout
        assert not leftovers(self.root), leftovers(self.root)
        listed = assert_store_sound(self.storage)
        self.states[listed[-1]] = state
        assert "incremental" in out or "full" in out
        for volid in listed:
            restore_and_compare(self.storage, volid, {DEV: self.states[volid]}, self.tmp)


@pytest.fixture
def crash(tmp_path: Path) -> CrashScene:
    return CrashScene(tmp_path)


# (system calls, occurrence, published?) -- in the order a backup makes them
POINTS = [
    pytest.param(RENAME, 1, False, id="config-written"),
    pytest.param("fdatasync", 1, False, id="qcow2-metadata-before-header"),
    pytest.param("fdatasync", 2, False, id="qcow2-header-written"),
    pytest.param(UNLINK, 1, False, id="publish-start"),
    pytest.param(RENAME, 2, False, id="manifest-rename"),
    pytest.param(RENAME, 3, False, id="publish-rename"),
    pytest.param(RENAME, 4, True, id="previous-info-rename"),
    pytest.param(RENAME, 5, True, id="log-rename"),
]


@pytest.mark.parametrize(("syscall", "when", "published"), POINTS)
def test_kill_at_exact_points(crash: CrashScene, syscall: str, when: int, published: bool) -> None:
    state = crash.guest.snapshot()[DEV]
    before = volids(crash.storage)
    proc = cli_killed_at(syscall, when, *crash.args())
    assert proc.returncode in (137, -9), (proc.returncode, proc.stderr)
    listed = crash.after_crash(before)
    assert len(listed) == len(before) + published, listed
    if published:
        crash.states[listed[-1]] = state
    else:
        assert partial_dirs(crash.storage, 100), "the kill came after the publish"
    crash.change(2)
    crash.next_run_heals()


@pytest.mark.parametrize("delays", [(0.1, 0.35, 0.6, 0.9, 1.3)])
def test_kill_after_random_delays(crash: CrashScene, delays: tuple[float, ...]) -> None:
    """SIGKILL N seconds into a bandwidth-limited backup (start-up, snapshot
    access, the copy, the end), each followed by a check and a change."""
    for n, delay in enumerate(delays, 2):
        state = crash.guest.snapshot()[DEV]
        before = volids(crash.storage)
        proc = cli_popen(*crash.args("--bwlimit", "1M"))
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        listed = crash.after_crash(before)
        if len(listed) > len(before):
            crash.states[listed[-1]] = state
        crash.change(n)
    crash.next_run_heals()


@pytest.mark.slow
def test_kill_after_many_delays(crash: CrashScene) -> None:
    test_kill_after_random_delays(crash, tuple(0.05 * i for i in range(1, 40, 2)))


def test_kill_while_the_copy_runs(crash: CrashScene) -> None:
    """SIGKILL once the image is being written (found by polling)."""
    before = volids(crash.storage)
    proc = cli_popen(*crash.args("--bwlimit", "512K"))
    try:
        wait_for(
            lambda: [p for p in partial_dirs(crash.storage, 100) if (p / f"{DEV}.qcow2").exists()]
        )
        time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    crash.after_crash(before)
    assert partial_dirs(crash.storage, 100)
    crash.change(3)
    crash.next_run_heals()


# ---------------------------------------------------------------------- prune and attributes


def chain_scene(tmp_path: Path) -> CrashScene:
    scene = CrashScene(tmp_path)
    for n in (2, 3):
        scene.backup_in_process()
        scene.change(n)
    return scene


@pytest.mark.parametrize(
    ("syscall", "when"),
    [
        pytest.param("fdatasync", 1, id="merged-image-metadata"),
        pytest.param(RENAME, 1, id="staged-manifest-rename"),
        pytest.param(EXCHANGE, 1, id="exchange"),
        pytest.param("unlinkat", 1, id="old-child-removal"),
        pytest.param(RENAME, 2, id="removing-rename"),
        pytest.param(EXCHANGE, 2, id="second-exchange"),
        pytest.param(RENAME, 4, id="second-removing-rename"),
    ],
)
def test_kill_while_prune_merges(tmp_path: Path, syscall: str, when: int) -> None:
    """prune --keep-last 1 over three backups merges both removed bases into the
    kept one; killed at each step, the store stays whole and the next prune
    finishes the job."""
    scene = chain_scene(tmp_path)
    before = volids(scene.storage)
    assert len(before) == 3
    store = ["--store", scene.root, "--storeid", STOREID]
    proc = cli_killed_at(syscall, when, "prune", *store, "--vmid", 100, "--keep-last", 1)
    assert proc.returncode in (137, -9), (proc.returncode, proc.stderr)
    listed = assert_store_sound(scene.storage)
    assert listed[-1] == before[-1]
    for volid in listed:
        restore_and_compare(scene.storage, volid, {DEV: scene.states[volid]}, tmp_path)
    cli("prune", *store, "--vmid", 100, "--keep-last", 1)
    assert volids(scene.storage) == [before[-1]]
    assert not leftovers(scene.root), leftovers(scene.root)
    assert_store_sound(scene.storage)
    restore_and_compare(scene.storage, before[-1], {DEV: scene.states[before[-1]]}, tmp_path)
    scene.next_run_heals()


def test_kill_while_a_backup_is_removed(crash: CrashScene) -> None:
    """Killed after the removed backup was renamed away, with half its files
    deleted: it is gone from the list, the next run removes the rest and,
    its base being gone, makes a full backup."""
    store = ["--store", crash.root, "--storeid", STOREID]
    proc = cli_killed_at("unlinkat", 2, "remove", *store, crash.first)
    assert proc.returncode in (137, -9), proc.stderr
    assert volids(crash.storage) == []
    assert any(".removing-" in name for name in leftovers(crash.root))
    del crash.states[crash.first]
    crash.next_run_heals()
    assert crash.storage.list_volumes(100)[0]["parent"] is None


def test_kill_while_notes_are_written(crash: CrashScene) -> None:
    store = ["--store", crash.root, "--storeid", STOREID]
    proc = cli_killed_at(RENAME, 1, "notes", *store, crash.first, "new notes")
    assert proc.returncode in (137, -9), proc.stderr
    assert_store_sound(crash.storage)
    assert crash.storage.get_volume_attribute(crash.first, "notes") == ""
    crash.next_run_heals()


# ---------------------------------------------------------------------- containers


def test_kill_during_a_container_backup(tmp_path: Path) -> None:
    storage = make_storage(tmp_path)
    rootfs = tmp_path / "rootfs"
    (rootfs / "etc").mkdir(parents=True)
    (rootfs / "etc" / "hostname").write_text("ct\n")
    (rootfs / "big").write_bytes(os.urandom(4 * MiB))
    store = ["--store", storage.scfg.path, "--storeid", STOREID]
    proc = cli_popen("backup", *store, "--vmid", 200, "--rootfs", rootfs, "--bwlimit", "2M")
    try:
        wait_for(lambda: partial_dirs(storage, 200))
        time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    assert volids(storage) == []
    cli("backup", *store, "--vmid", 200, "--rootfs", rootfs)
    assert not leftovers(storage.store.root)
    [volid] = assert_store_sound(storage)
    out = tmp_path / "restored"
    cli("restore", *store, volid, "--rootfs", out)
    assert (out / "big").read_bytes() == (rootfs / "big").read_bytes()
