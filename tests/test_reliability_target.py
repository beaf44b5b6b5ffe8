"""Reliability: faults of the store a backup writes into.

The store lives on a small tmpfs that fills up -- at every step of a backup,
from the data copy to the metadata, the manifest, the publish, previous-info
and the log -- and on a file system (or a guest directory) made read-only.
Every time: ENOSPC or EROFS reported clearly, nothing half-published, the
earlier backups byte for byte intact and verified, and the next incremental
exact once there is room again."""

from __future__ import annotations

import errno
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from faultlib import (
    MiB,
    assert_store_sound,
    backup_args,
    cli,
    fill,
    leftovers,
    partial_dirs,
    remount,
    small_tmpfs,
    store_state,
    volids,
)
from guests import STOREID, Guest, restore_and_compare, store_bitmap

from dirbackup.host import Host
from dirbackup.storage import DirectoryStorage

DEV = "drive-scsi0"


class FullStore:
    """A guest (16 MiB disk, 8.5 MiB of data) with one full backup in a store on
    a 20 MiB tmpfs, and 6 MiB of changes since."""

    def __init__(self, tmp_path: Path, sock_dir: Path, store: Path) -> None:
        self.tmp = tmp_path
        self.sock_dir = sock_dir
        self.root = store
        # uncompressed images: the store fills up at the sizes these tests set
        self.storage = DirectoryStorage(STOREID, {"path": str(store), "compress": "none"})
        self.guest = Guest(tmp_path, {DEV: 16 * MiB})
        self.image = self.guest.disks[0].path
        self.host = Host(self.storage, STOREID)
        self.first_state = self.guest.snapshot()[DEV]
        self.first = self.host.backup_vm(100, self.guest.disks, start_time=1000).volid
        self.guest.change(DEV, "write -P 0x41 0 3M", "write -P 0x42 10M 3M", "write -z 15M 64k")
        self.state = self.guest.snapshot()[DEV]
        self.bitmap = store_bitmap(self.storage, DEV)
        self.before = self.snapshot()

    def snapshot(self) -> tuple[object, ...]:
        return store_state(self.storage, 100, self.image, self.bitmap, self.sock_dir)

    def assert_untouched(self) -> None:
        assert not partial_dirs(self.storage, 100)
        assert not leftovers(self.root)
        assert self.snapshot() == self.before
        assert assert_store_sound(self.storage) == [self.first]

    def backup(self) -> BaseException | None:
        try:
            self.host.backup_vm(100, self.guest.disks, start_time=2000)
        except (OSError, Exception) as exc:
            return exc
        return None

    def cli_backup(self, check: int | None = None) -> subprocess.CompletedProcess[str]:
        return cli(
            *backup_args(self.root, 100, self.image, "--compress", "none", device=DEV),
            check=check,
        )

    def next_incremental_is_exact(self) -> None:
        report = self.host.backup_vm(100, self.guest.disks, start_time=3000)
        assert report.bitmap_modes == {DEV: "reuse"}
        restore_and_compare(self.storage, report.volid, {DEV: self.state}, self.tmp)
        assert_store_sound(self.storage)


@pytest.fixture
def full_store(tmp_path: Path, sock_dir: Path) -> Iterator[FullStore]:
    with small_tmpfs(tmp_path / "store", "20M") as store:
        yield FullStore(tmp_path, sock_dir, store)


def test_store_fills_up_during_the_copy(full_store: FullStore) -> None:
    s = full_store
    fill(s.root, 2 * MiB)  # the 6 MiB incremental cannot fit
    proc = s.cli_backup(check=1)
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "No space left on device" in last, proc.stderr
    assert f"{DEV}.qcow2" in last and "offset" in last, proc.stderr
    assert "Traceback" not in proc.stderr
    (s.root / "filler").unlink()
    s.assert_untouched()
    s.next_incremental_is_exact()


def _phase_sweep(tmp_path: Path, sock_dir: Path, shortfalls: list[int]) -> list[str]:
    """For each shortfall: a fresh scene whose store lacks that many bytes for
    the incremental; returns how each attempt ended."""
    # how much a successful incremental takes
    with small_tmpfs(tmp_path / "probe", "20M") as store:
        (tmp_path / "probe-guest").mkdir()
        s = FullStore(tmp_path / "probe-guest", sock_dir, store)
        free = shutil.disk_usage(store).free
        assert s.backup() is None
        need = free - shutil.disk_usage(store).free
    outcomes = []
    for i, short in enumerate(shortfalls):
        work = tmp_path / f"w{i}"
        work.mkdir()
        with small_tmpfs(tmp_path / f"store{i}", "20M") as store:
            s = FullStore(work, sock_dir, store)
            fill(store, need - short)
            err = s.backup()
            if err is None:  # it fitted after all: then it is whole
                outcomes.append("ok")
                assert len(assert_store_sound(s.storage)) == 2
                (store / "filler").unlink()
                continue
            assert isinstance(err, OSError) and err.errno == errno.ENOSPC, repr(err)
            assert "No space left on device" in str(err)
            assert str(store) in str(err), f"ENOSPC without the file it hit: {err!r}"
            outcomes.append(str(err).split(":")[0])
            (store / "filler").unlink()
            s.assert_untouched()
            s.next_incremental_is_exact()
    return outcomes


def test_store_full_at_each_step(tmp_path: Path, sock_dir: Path) -> None:
    """ENOSPC while copying, writing the qcow2 metadata, the manifest, publishing,
    writing previous-info and the log: short of 1 MiB down to one page."""
    outcomes = _phase_sweep(tmp_path, sock_dir, [MiB, 192 * 1024, 64 * 1024, 12288, 8192, 4096])
    assert any(o != "ok" for o in outcomes), outcomes


@pytest.mark.slow
def test_store_full_at_each_page(tmp_path: Path, sock_dir: Path) -> None:
    _phase_sweep(tmp_path, sock_dir, list(range(4096, 320 * 1024, 4096)))


def test_read_only_store(full_store: FullStore) -> None:
    """A store remounted read-only: backups, prune, removal and notes fail
    clearly and change nothing; list, verify and both restores still work."""
    s = full_store
    remount(s.root, "ro")
    try:
        proc = s.cli_backup(check=1)
        assert "Read-only file system" in proc.stderr.strip().splitlines()[-1], proc.stderr
        store = ["--store", s.root, "--storeid", STOREID]
        # nothing to remove: nothing to write either
        proc = cli("prune", *store, "--vmid", "100", "--keep-last", "1")
        assert "removed 0 of 1" in proc.stderr
        for args in (
            ["remove", *store, s.first],
            ["notes", *store, s.first, "new notes"],
            ["protect", *store, s.first],
        ):
            proc = cli(*args, check=None)
            assert proc.returncode == 1 and "Read-only file system" in proc.stderr, proc.stderr
        assert s.first in cli("list", *store).stdout
        assert cli("verify", *store).stdout.count(": ok") == 1
        restore_and_compare(s.storage, s.first, {DEV: s.first_state}, s.tmp)
    finally:
        remount(s.root, "rw")
    s.assert_untouched()
    s.next_incremental_is_exact()


def test_read_only_guest_directory(full_store: FullStore) -> None:
    """Only the guest's directory is read-only (a read-only bind mount)."""
    s = full_store
    gdir = s.storage.store.guest_dir(100)
    bind = subprocess.run(["mount", "--bind", str(gdir), str(gdir)], capture_output=True)
    if bind.returncode:
        pytest.skip(f"cannot bind mount: {bind.stderr.decode().strip()}")
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(gdir)], check=True)
        proc = s.cli_backup(check=1)
        assert "Read-only file system" in proc.stderr, proc.stderr
        assert cli("list", "--store", s.root, "--storeid", STOREID).stdout.count("qemu-") == 1
    finally:
        subprocess.run(["umount", str(gdir)], check=True)
    s.assert_untouched()
    s.next_incremental_is_exact()


def test_container_publish_failure_leaves_nothing(tmp_path: Path) -> None:
    """backup_cleanup(success) finds no archive (backup_container never ran or
    its unprivileged child died): a clear error, and the partial backup goes
    at once -- not only when this long-lived process exits."""
    from guests import make_storage

    storage = make_storage(tmp_path)
    p = storage.new_backup_provider()
    p.job_init(1000)
    p.backup_init(200, "lxc", 1000)
    with pytest.raises(Exception, match="the container archive was not written"):
        p.backup_cleanup(200, "lxc", True, {})
    p.job_cleanup()
    assert not partial_dirs(storage, 200)
    assert not leftovers(storage.store.root)
    assert volids(storage) == []


@pytest.mark.parametrize(
    ("when", "fails"),
    [
        pytest.param(r"incremental backup of", True, id="before-the-copy"),
        pytest.param(r"read .* wrote", True, id="while-publishing"),
        pytest.param(r"backup \S+ complete", False, id="before-the-log"),
    ],
)
def test_store_fills_up_at_a_phase(tmp_path: Path, sock_dir: Path, when: str, fails: bool) -> None:
    """The store fills up at the moment the backup log says a phase begins
    (the log callback fills it: a real ENOSPC at a known point)."""
    with small_tmpfs(tmp_path / "store", "20M") as store:
        s = FullStore(tmp_path, sock_dir, store)
        warnings = []
        fired = []

        def log(level: str, message: str) -> None:
            if level == "warn":
                warnings.append(message)
            if re.search(when, message) and not fired:
                fired.append(fill(store, 0))

        s.host = Host(s.storage, STOREID, log=log)
        err = s.backup()
        (store / "filler").unlink()
        if fails:
            assert isinstance(err, OSError) and err.errno == errno.ENOSPC, repr(err)
            assert str(store) in str(err), repr(err)
            s.assert_untouched()
            s.next_incremental_is_exact()
            return
        # the backup is in; only its log could not be stored
        assert err is None, repr(err)
        assert any("could not store the task log" in w for w in warnings), warnings
        assert len(assert_store_sound(s.storage)) == 2
        assert not leftovers(store)
        restore_and_compare(s.storage, volids(s.storage)[-1], {DEV: s.state}, s.tmp)
