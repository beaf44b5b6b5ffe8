"""Reliability: what the hypervisor (or a user) passes in never yields a
backup that cannot be restored.

A dirty bitmap finer than the smallest cluster size a large disk's qcow2
image can have (QEMU limits its L1 table to 32 MiB), start times in
milliseconds or beyond the supported range, guest ids out of range, and a
guest directory that is a symlink: each is refused up front with one clear
error, and nothing is published or written through the link."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
from conftest import GiB, KiB, assert_same
from faultlib import backup_args, cli, previous_info, provider_backup, volids
from guests import STOREID, make_storage, store_bitmap

from dirbackup import qcow2, qemu
from dirbackup.errors import DirbackupError, StoreError, VolumeNameError
from dirbackup.host import Disk, Host
from dirbackup.storage import DirectoryStorage
from dirbackup.store import MAX_EPOCH, MAX_VMID

DEV = "drive-scsi0"
BIG = 256 * GiB
BITMAP = "hv-bitmap"


def manifest_disk(storage: DirectoryStorage, volid: str) -> dict[str, Any]:
    path = Path(storage.path(volid)[0]) / "manifest.json"
    return dict(json.loads(path.read_text())["disks"][DEV])


def big_guest(tmp_path: Path) -> Path:
    """A sparse 256 GiB qcow2 disk with 1 MiB of data at 1 GiB."""
    img = tmp_path / "big.qcow2"
    qemu.img_create(img, BIG)
    qemu.io(img, "write -P 0x11 1G 1M")
    return img


# ---------------------------------------------------------------------- cluster sizes


def test_smallest_cluster_size_keeps_the_l1_table_within_qemus_limit(tmp_path: Path) -> None:
    assert qcow2.smallest_cluster_size(128 * GiB) == 512
    assert qcow2.smallest_cluster_size(128 * GiB + 1) == 1024
    assert qcow2.smallest_cluster_size(BIG) == 1024
    assert qcow2.smallest_cluster_size(8 << 40) == 4096
    assert qcow2.smallest_cluster_size((2 << 50) + 1) == 128 * KiB
    # the writer refuses to make an image no reader opens (QEMU: "L1 table is too large")
    with pytest.raises(ValueError, match="L1 table larger than 32 MiB"):
        qcow2.Writer(tmp_path / "x.qcow2", BIG, 512)
    assert not (tmp_path / "x.qcow2").exists()


def test_dirty_region_finer_than_the_smallest_cluster_is_refused(
    tmp_path: Path, nbd_server: Any
) -> None:
    """A 512-byte dirty region on a 256 GiB disk would need 512-byte clusters,
    whose L1 table (64 MiB) neither QEMU nor we read: the backup fails with a
    clear error and publishes nothing; a region aligned to 1 KiB, the smallest
    cluster size that fits, makes a good incremental."""
    storage = make_storage(tmp_path)
    img = big_guest(tmp_path)
    qemu.run(["qemu-img", "bitmap", "--add", "--enable", "-g", "512", str(img), BITMAP])
    server = nbd_server(img, export=DEV)
    full = {DEV: {"size": BIG, "bitmap-mode": "new", "nbd-path": server.socket}}
    assert provider_backup(storage, 100, full, 1000) is None
    server.stop()
    [first] = volids(storage)
    record = previous_info(storage, 100)

    def incremental(start: int) -> BaseException | None:
        srv = nbd_server(img, export=DEV, bitmap=BITMAP)
        vol = {"size": BIG, "bitmap-mode": "reuse", "nbd-path": srv.socket, "bitmap-name": BITMAP}
        try:
            return provider_backup(storage, 100, {DEV: vol}, start)
        finally:
            srv.stop()

    qemu.io(img, "write -P 0x22 100G 512")
    error = incremental(2000)
    assert error is not None
    assert str(error).startswith(
        f"{DEV}: the dirty bitmap marks a region that starts or ends at offset "
        f"{100 * GiB + 512}, not a multiple of 1.0 KiB, the smallest qcow2 cluster size a "
        "disk of 256.0 GiB can have"
    ), error
    assert volids(storage) == [first]
    assert previous_info(storage, 100) == record
    assert sorted(p.name for p in storage.store.guest_dir(100).iterdir()) == [
        ".lock",
        "previous-info",
        "qemu-1000",
    ]
    assert all(r.ok for r in storage.verify())

    # aligned to 1 KiB: an incremental with 1 KiB clusters that QEMU reads
    qemu.run(["qemu-img", "bitmap", "--clear", str(img), BITMAP])
    qemu.io(img, "write -P 0x33 100G 1k", "write -P 0x44 200G 3k")
    assert incremental(3000) is None
    volid = volids(storage)[-1]
    disk = manifest_disk(storage, volid)
    assert disk["mode"] == "incremental"
    assert (disk["cluster_size"], disk["dirty_bytes"]) == (KiB, 4 * KiB)
    image = Path(storage.path(volid)[0]) / f"{DEV}.qcow2"
    assert qemu.img_check(image).get("check-errors", 0) == 0
    target = tmp_path / "restored.raw"
    Host(storage, STOREID).restore_vm(volid, {DEV: target})
    assert_same(target, img, "raw", "qcow2")
    # QEMU reads the chain as well
    qemu.run(["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", str(image), str(img)])
    assert all(r.ok for r in storage.verify())


def test_sparse_256g_guest_with_a_512_byte_write_end_to_end(tmp_path: Path) -> None:
    """The command line: a 512-byte write on a 256 GiB disk backs up (the
    host's bitmap has QEMU's default granularity) and restores exactly; with a
    bitmap of 512-byte granularity the backup fails with one clear error (or,
    should the host not trust such a bitmap, is full) -- never an exit 0 with
    a backup that cannot be read back."""
    img = big_guest(tmp_path)
    store = tmp_path / "store"
    store.mkdir()
    storage = DirectoryStorage(STOREID, {"path": str(store)})
    cli(*backup_args(store, 100, img))
    qemu.io(img, "write -P 0x22 100G 512")
    out = cli(*backup_args(store, 100, img)).stdout
    assert "drive-scsi0 incremental; read 64.0 KiB of 256.0 GiB" in out, out
    target = tmp_path / "restored.raw"
    volid = volids(storage)[-1]
    cli("restore", "--store", store, "--storeid", STOREID, volid, "--disk", f"{DEV}={target}")
    assert target.stat().st_size == BIG
    assert_same(target, img, "raw", "qcow2")

    # a bitmap of 512-byte granularity in place of the host's
    name = store_bitmap(storage, DEV)
    qemu.bitmap(img, "remove", name)
    qemu.run(["qemu-img", "bitmap", "--add", "--enable", "-g", "512", str(img), name])
    qemu.io(img, "write -P 0x33 200G 512")
    before = volids(storage)
    proc = cli(*backup_args(store, 100, img), check=None)
    if proc.returncode == 0:  # taken as a full backup: it must restore exactly
        assert len(volids(storage)) == len(before) + 1
        cli("restore", "--store", store, "--storeid", STOREID, volids(storage)[-1],
            "--disk", f"{DEV}={target}", "--force")  # fmt: skip
        assert_same(target, img, "raw", "qcow2")
    else:
        assert proc.returncode == 1, proc
        last = proc.stderr.splitlines()[-1]
        assert last.startswith(f"error: {DEV}: the dirty bitmap marks a region"), proc.stderr
        assert "or --mode full on the command line" in last
        assert "Traceback" not in proc.stderr
        assert volids(storage) == before
    assert cli("verify", "--store", store, "--storeid", STOREID).returncode == 0


# ---------------------------------------------------------------------- ids and times


BAD_IDS = [
    (-1, 1000, "invalid guest id -1"),
    (0, 1000, "invalid guest id 0"),
    (MAX_VMID + 1, 1000, "invalid guest id 1000000000"),
    ("abc", 1000, "invalid guest id 'abc'"),
    (True, 1000, "invalid guest id True"),
    (100, 1_700_000_000_000, "invalid start time 1700000000000: whole seconds since 1970, at most"),
    (100, MAX_EPOCH + 1, "invalid start time 100000000000"),
    (100, -5, "invalid start time -5"),
    (100, 0, "invalid start time 0"),
    (100, 1.5, "invalid start time 1.5"),
    (100, "soon", "invalid start time 'soon'"),
]


def test_backup_init_refuses_ids_no_volume_name_can_address(tmp_path: Path) -> None:
    """Negative, zero or huge guest ids and start times in milliseconds or
    beyond the range would publish backups that no volume name addresses (so
    that nothing restores them): refused before anything is written."""
    storage = make_storage(tmp_path)
    provider = storage.new_backup_provider()
    provider.job_init(1000)
    for vmid, start, message in BAD_IDS:
        with pytest.raises(VolumeNameError) as exc:
            provider.backup_init(vmid, "qemu", start)  # type: ignore[arg-type]
        assert str(exc.value).startswith(message), exc.value
    with pytest.raises(DirbackupError, match="unsupported guest type 'kvm'"):
        provider.backup_init(100, "kvm", 1000)
    assert list(storage.store.root.iterdir()) == []
    # the API's other entry points that take a guest id refuse the same
    for call in (
        lambda: storage.list_volumes(-1),
        lambda: storage.prune_backups("keep-last=1", vmid=0),
        lambda: storage.verify(vmid=MAX_VMID + 1),
    ):
        with pytest.raises(VolumeNameError, match="invalid guest id"):
            call()
    assert list(storage.store.root.iterdir()) == []
    # the limits themselves are fine, and the archive name parses
    archive = provider.backup_init(MAX_VMID, "qemu", MAX_EPOCH)["archive-name"]
    assert archive == f"{MAX_VMID}/qemu-{MAX_EPOCH}"
    assert storage.parse_volname(f"backup/{archive}")[2] == MAX_VMID
    provider.backup_cleanup(MAX_VMID, "qemu", False, {"error": "test"})
    assert storage.list_volumes() == []


@pytest.mark.parametrize("vmid", ["0", "-1", "1000000000", "1e3", "\u0661\u0660\u0660"])
def test_cli_refuses_guest_ids_out_of_range(tmp_path: Path, vmid: str) -> None:
    store = tmp_path / "store"
    store.mkdir()
    img = tmp_path / "d.qcow2"
    qemu.img_create(img, 1 << 20)
    for args in (
        backup_args(store, vmid, img),
        ["prune", "--store", store, "--vmid", vmid, "--keep-last", 1],
        ["list", "--store", store, "--vmid", vmid],
    ):
        proc = cli(*args, check=2)
        assert f"invalid guest id {vmid!r}" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
    assert list(store.iterdir()) == []


def test_backup_names_beyond_the_range_are_no_backups(tmp_path: Path) -> None:
    """A directory named with a time in milliseconds is no backup of ours: it
    is not listed (verify reports it), takes no prune slot and does not move
    the next backup's time."""
    storage = make_storage(tmp_path)
    img = tmp_path / "d.qcow2"
    qemu.img_create(img, 1 << 20)
    host = Host(storage, STOREID)
    host.backup_vm(100, [_disk(img)], start_time=1000)
    (storage.store.guest_dir(100) / "qemu-1700000000000").mkdir()
    assert host.backup_vm(100, [_disk(img)], start_time=2000).volid.endswith("/qemu-2000")
    assert volids(storage) == [f"{STOREID}:backup/100/qemu-{t}" for t in (1000, 2000)]
    [bad] = [r for r in storage.verify() if not r.ok]
    assert bad.volid.endswith("/100/qemu-1700000000000")
    assert bad.problems == ("named like a backup, but its time is beyond the supported range",)


def _disk(img: Path) -> Disk:
    return Disk(DEV, img)


# ---------------------------------------------------------------------- symlinked guests


def test_guest_directory_that_is_a_symlink_is_refused(tmp_path: Path) -> None:
    """Nothing is locked, cleaned, written or removed through a guest
    directory that is a symlink: backup, prune and remove refuse it (the
    store API and the command line), and the directory it points to is left
    exactly as it was."""
    storage = make_storage(tmp_path)
    img = tmp_path / "d.qcow2"
    qemu.img_create(img, 1 << 20)
    Host(storage, STOREID).backup_vm(101, [_disk(img)], start_time=1000)
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(storage.store.guest_dir(101), elsewhere)
    (elsewhere / ".stale.tmp-999999999").write_text("a dead writer's file\n")
    (elsewhere / ".lock").unlink()
    before = sorted(p.name for p in elsewhere.rglob("*"))
    link = storage.store.guest_dir(100)
    link.symlink_to(elsewhere)
    dangling = storage.store.guest_dir(102)
    dangling.symlink_to(tmp_path / "nowhere")
    refused = "is not a directory of this store (a symbolic link?); refused"

    provider = storage.new_backup_provider()
    for vmid in (100, 102):
        with pytest.raises(StoreError, match=re.escape(refused)):
            provider.backup_init(vmid, "qemu", 2000)
        with pytest.raises(StoreError, match=re.escape(refused)):
            storage.prune_backups("keep-last=1", vmid=vmid)
    with pytest.raises(StoreError, match=re.escape(refused)):
        storage.free_image("backup/100/qemu-1000")
    with pytest.raises(DirbackupError):
        Host(storage, STOREID).backup_vm(100, [_disk(img)], start_time=2000)

    s = ["--store", storage.store.root, "--storeid", STOREID]
    for args in (
        backup_args(storage.store.root, 100, img),
        ["prune", *s, "--vmid", 100, "--keep-last", 1],
        ["remove", *s, "100/qemu-1000"],
    ):
        proc = cli(*args, check=1)
        assert proc.stderr.splitlines()[-1] == f"error: {link} {refused}", proc.stderr
    assert sorted(p.name for p in elsewhere.rglob("*")) == before
    assert not (tmp_path / "nowhere").exists()
    assert volids(storage) == [f"{STOREID}:backup/101/qemu-1000"]
