"""The provider and the storage plugin, driven as the hypervisor drives them.

Guests are qcow2 images with persistent dirty bitmaps changed by qemu-io
between backups; every restore point is compared with qemu-img compare
against a copy of the guest taken at that time."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
from conftest import KiB, MiB
from guests import STOREID, Guest, make_storage, restore_and_compare, store_bitmap

from dirbackup import qemu
from dirbackup.api import VmType
from dirbackup.errors import ImageError, StoreError, VolumeNameError
from dirbackup.host import Host
from dirbackup.manifest import PreviousInfo
from dirbackup.storage import DirectoryStorage, StorageOperationError
from dirbackup.store import BackupId


@pytest.mark.parametrize("mechanism", ["nbd", "file-handle"])
def test_full_and_incremental_chain(tmp_path: Path, mechanism: str) -> None:
    storage = make_storage(tmp_path, **{"vm-backup-mechanism": mechanism})
    guest = Guest(tmp_path, {"drive-scsi0": 32 * MiB, "drive-virtio1": 16 * MiB})
    host = Host(storage, STOREID)
    changes = [
        [],
        [("drive-scsi0", "write -P 0x21 1M 100k", "write -z 4M 1M", "discard 8M 2M")],
        [
            ("drive-scsi0", "write -z 0 64k", "write -P 0x22 31M 4k"),
            ("drive-virtio1", "discard 0 8M", "write -P 0x23 12M 1"),
        ],
        [("drive-virtio1", "write -P 0x24 0 16M")],
        [],  # nothing changed: a clean bitmap reads nothing
    ]
    volids = []
    for i, batch in enumerate(changes):
        for dev, *cmds in batch:
            guest.change(dev, *cmds)
        guest.snapshot()
        report = host.backup_vm(
            100,
            guest.disks,
            config=f"# config {i}\n",
            firewall="[OPTIONS]\nenable: 1\n" if i == 1 else None,
            start_time=1_700_000_000 + i * 3600,
        )
        volids.append(report.volid)
        expected = "new" if i == 0 else "reuse"
        assert set(report.bitmap_modes.values()) == {expected}
    listing = storage.list_volumes(100)
    assert [v["volid"] for v in listing] == volids
    assert listing[0]["parent"] is None
    for prev, entry in itertools.pairwise(listing):
        assert entry["parent"] == prev["volid"]
        assert entry["subtype"] == "qemu" and entry["content"] == "backup"
    # the last backup saw a clean bitmap: its images hold no data clusters
    last = storage.store.backup_dir(storage.backup_id(volids[-1]))
    for img in last.glob("*.qcow2"):
        assert qemu.img_check(img).get("allocated-clusters", 0) == 0
    size, fmt, used, parent, ctime = storage.volume_size_info(volids[2])
    assert fmt == "directory" and size > 0 and used > 0
    assert parent == volids[1] and ctime == 1_700_000_000 + 2 * 3600
    for volid, state in zip(volids, guest.states, strict=True):
        restore_and_compare(storage, volid, state, tmp_path)
    provider = storage.new_backup_provider()
    assert provider.archive_get_guest_config(volids[1].split(":")[1]) == (
        "# config 1\n"  # and the host's drive map (PVE's #qmdump#map: lines)
        "#qmdump#map:scsi0:drive-scsi0::qcow2:\n#qmdump#map:virtio1:drive-virtio1::qcow2:\n"
    )
    assert provider.archive_get_firewall_config(volids[1].split(":")[1]) == (
        "[OPTIONS]\nenable: 1\n"
    )
    assert provider.archive_get_firewall_config(volids[2].split(":")[1]) is None
    assert all(r.ok for r in storage.verify()), storage.verify()


def test_query_incremental_and_full_mode(tmp_path: Path) -> None:
    storage = make_storage(tmp_path)
    guest = Guest(tmp_path, {"drive-scsi0": 8 * MiB})
    provider = storage.new_backup_provider()
    assert provider.backup_vm_query_incremental(100, {"drive-scsi0": {"size": 8 * MiB}}) == {
        "drive-scsi0": "new"
    }
    Host(storage, STOREID).backup_vm(100, guest.disks, start_time=1000)
    answer = provider.backup_vm_query_incremental(
        100, {"drive-scsi0": {"size": 8 * MiB}, "drive-scsi1": {"size": MiB}}
    )
    assert answer == {"drive-scsi0": "use", "drive-scsi1": "new"}
    # a resized disk: no base of the same size
    assert provider.backup_vm_query_incremental(100, {"drive-scsi0": {"size": 16 * MiB}}) == {
        "drive-scsi0": "new"
    }
    full = make_storage(tmp_path, **{"vm-backup-mode": "full"})
    assert (
        full.new_backup_provider().backup_vm_query_incremental(
            100, {"drive-scsi0": {"size": 8 * MiB}}
        )
        == {}
    )
    # full mode: the host removes the bitmap and every backup is self-contained
    report = Host(full, STOREID).backup_vm(100, guest.disks, start_time=2000)
    assert report.bitmap_modes == {"drive-scsi0": "none"}
    prefix = provider.bitmap_prefix()
    assert not [b for b in qemu.bitmaps(guest.disks[0].path) if b["name"].startswith(prefix)]
    assert full.list_volumes(100)[-1]["parent"] is None


def test_same_second_backups_never_overwrite(tmp_path: Path) -> None:
    storage = make_storage(tmp_path)
    guest = Guest(tmp_path, {"drive-scsi0": 4 * MiB})
    host = Host(storage, STOREID)
    a = host.backup_vm(100, guest.disks, start_time=5000)
    b = host.backup_vm(100, guest.disks, start_time=5000)
    assert a.volid != b.volid and b.volid.endswith("qemu-5001")
    assert len(storage.list_volumes(100)) == 2


def test_failure_in_the_middle_keeps_everything_consistent(tmp_path: Path, nbd_server) -> None:
    storage = make_storage(tmp_path)
    guest = Guest(tmp_path, {"drive-scsi0": 16 * MiB, "drive-scsi1": 8 * MiB})
    host = Host(storage, STOREID)
    host.backup_vm(100, guest.disks, start_time=1000)
    guest.snapshot()
    prev_path = storage.store.previous_info_path(100)
    before = prev_path.read_bytes()
    guest.change("drive-scsi0", "write -P 0x31 0 1M")
    guest.change("drive-scsi1", "write -P 0x32 1M 1M")
    # drive as the hypervisor would, and lose the second disk's snapshot access mid-way
    p = storage.new_backup_provider()
    p.job_init(2000)
    archive = p.backup_init(100, "qemu", 2000)["archive-name"]
    b0, b1 = store_bitmap(storage, "drive-scsi0"), store_bitmap(storage, "drive-scsi1")
    s0 = nbd_server(guest.disks[0].path, export="drive-scsi0", bitmap=b0)
    s1 = nbd_server(guest.disks[1].path, export="drive-scsi1", bitmap=b1)
    s1.stop()
    volumes = {
        "drive-scsi0": {
            "size": 16 * MiB,
            "bitmap-mode": "reuse",
            "nbd-path": s0.socket,
            "bitmap-name": b0,
        },
        "drive-scsi1": {
            "size": 8 * MiB,
            "bitmap-mode": "reuse",
            "nbd-path": s1.socket,
            "bitmap-name": b1,
        },
    }
    with pytest.raises(OSError, match="connecting to"):
        p.backup_vm(100, "cfg", volumes, {})
    s0.stop()
    p.backup_cleanup(100, "qemu", False, {"error": "snapshot access lost"})
    log = tmp_path / "task.log"
    log.write_text("task log\n")
    p.backup_handle_log_file(100, str(log))
    p.job_cleanup()
    gdir = storage.store.guest_dir(100)
    assert prev_path.read_bytes() == before
    assert [v["volid"] for v in storage.list_volumes(100)] == [f"{STOREID}:backup/100/qemu-1000"]
    assert (gdir / f"{archive.split('/')[1]}.failed" / "backup.log").read_text() == "task log\n"
    assert not [p.name for p in gdir.iterdir() if p.name.endswith(".partial")]
    # the bitmaps still hold the changes: the next incremental is correct
    guest.snapshot()
    report = host.backup_vm(100, guest.disks, start_time=3000)
    assert set(report.bitmap_modes.values()) == {"reuse"}
    restore_and_compare(storage, report.volid, guest.states[-1], tmp_path)


def test_failure_after_publish_forgets_the_base(tmp_path: Path) -> None:
    """backup_vm returned (the hypervisor's bitmap advanced) but the job failed later:
    the backup is removed and the next backup of its disks is full."""
    storage = make_storage(tmp_path)
    guest = Guest(tmp_path, {"drive-scsi0": 8 * MiB})
    host = Host(storage, STOREID)
    host.backup_vm(100, guest.disks, start_time=1000)
    p = storage.new_backup_provider()
    p.job_init(2000)
    p.backup_init(100, "qemu", 2000)
    s = qemu.start_nbd(guest.disks[0].path, str(tmp_path / "s.sock"), export="drive-scsi0")
    try:
        p.backup_vm(
            100,
            "cfg",
            {"drive-scsi0": {"size": 8 * MiB, "bitmap-mode": "none", "nbd-path": s.socket}},
            {},
        )
    finally:
        s.stop()
    assert len(storage.list_volumes(100)) == 2  # published when backup_vm returned
    p.backup_cleanup(100, "qemu", False, {"error": "prune failed"})
    assert len(storage.list_volumes(100)) == 1
    assert p.backup_vm_query_incremental(100, {"drive-scsi0": {"size": 8 * MiB}}) == {
        "drive-scsi0": "new"
    }


def test_v3_adapter_round_trip(tmp_path: Path) -> None:
    from dirbackup import compat

    storage = make_storage(tmp_path, **{"vm-backup-mechanism": "block-device"})
    guest = Guest(tmp_path, {"drive-scsi0": 8 * MiB})
    guest.snapshot()
    v3 = compat.to_v3(storage.new_backup_provider())
    v3.job_hook("start", {"start-time": 4000})
    name = v3.backup_get_archive_name(100, "qemu", 4000)
    v3.backup_hook("start", 100, "qemu", {"start-time": 4000})
    mechanism, bitmap_id = v3.backup_get_mechanism(100, "qemu")
    assert mechanism == "block-device" and bitmap_id == "fresh"
    # v3 passes a block device path; a raw image file stands in for it here
    raw = guest.states[0]["drive-scsi0"]
    v3.backup_vm(
        100, "cfg", {"drive-scsi0": {"path": str(raw), "size": 8 * MiB, "bitmap-mode": "none"}}, {}
    )
    v3.backup_hook("end", 100, "qemu", {})
    assert v3.backup_get_task_size(100) > 0
    v3.job_hook("end", {})
    volname = f"backup/{name}"
    assert v3.restore_get_guest_config(volname, STOREID) == "cfg"
    assert v3.restore_get_mechanism(volname, STOREID) == ("qemu-img", "qemu")
    restore_and_compare(storage, f"{STOREID}:{volname}", guest.states[0], tmp_path)
    # and a v3 provider driven by our host through the other adapter
    host = Host(storage, STOREID, provider=compat.from_v3(v3))
    report = host.backup_vm(100, guest.disks, start_time=5000)
    restore_and_compare(storage, report.volid, guest.states[0], tmp_path)


# ------------------------------------------------------------------ pruning and removal


def chain_of_backups(
    tmp_path: Path, n: int, **opts: object
) -> tuple[DirectoryStorage, Guest, list[str]]:
    storage = make_storage(tmp_path, **opts)
    guest = Guest(tmp_path, {"drive-scsi0": 16 * MiB})
    host = Host(storage, STOREID)
    volids = []
    for i in range(n):
        guest.change(
            "drive-scsi0", f"write -P 0x{0x40 + i:02x} {i}M 512k", f"write -z {8 + i}M 64k"
        )
        guest.snapshot()
        volids.append(host.backup_vm(100, guest.disks, start_time=86400 * (i + 1)).volid)
    return storage, guest, volids


def test_prune_merges_removed_bases_into_kept_children(tmp_path: Path) -> None:
    storage, guest, volids = chain_of_backups(tmp_path, 5)
    storage.update_volume_attribute(volids[1], "protected", 1)
    dry = storage.prune_backups("keep-last=2", vmid=100, dryrun=True)
    marks = {e["volid"]: e["mark"] for e in dry}
    assert marks == {
        volids[4]: "keep",
        volids[3]: "keep",
        volids[2]: "remove",
        volids[1]: "protected",
        volids[0]: "remove",
    }
    assert len(storage.list_volumes(100)) == 5
    storage.prune_backups("keep-last=2", vmid=100)
    left = [v["volid"] for v in storage.list_volumes(100)]
    assert left == [volids[1], volids[3], volids[4]]
    for volid in left:
        restore_and_compare(storage, volid, guest.states[volids.index(volid)], tmp_path)
    for img in storage.store.guest_dir(100).glob("*/*.qcow2"):
        report = qemu.img_check(img)
        assert report.get("check-errors", 0) == 0 and report.get("leaks", 0) == 0
    assert all(r.ok for r in storage.verify(vmid=100))
    with pytest.raises(StoreError, match="protected"):
        storage.free_image(volids[1])
    storage.update_volume_attribute(volids[1], "protected", 0)
    storage.free_image(volids[1])
    assert storage.list_volumes(100)[0]["parent"] is None
    restore_and_compare(storage, volids[3], guest.states[3], tmp_path)


def test_prune_removes_failed_logs_older_than_what_it_keeps(tmp_path: Path) -> None:
    storage, _guest, volids = chain_of_backups(tmp_path, 3)  # at days 1, 2, 3
    store = storage.store
    day = 86400
    for epoch in (1000, day + 1, 2 * day + 1, 3 * day + 1):
        store.discard(BackupId(100, VmType.QEMU, epoch), keep_log=f"log {epoch}\n")
    store.discard(BackupId(100, VmType.LXC, 1000), keep_log="no container backup\n")
    store.discard(BackupId(101, VmType.QEMU, 1000), keep_log="only failures\n")
    storage.prune_backups("keep-last=2", dryrun=True)
    assert len(store.failed_logs(100)) == 5 and len(store.failed_logs(101)) == 1
    lines: list[str] = []
    storage.prune_backups("keep-last=2", log=lambda _level, msg: lines.append(msg))
    # kept: days 2 and 3; the qemu logs before day 2 went with day 1's backup
    assert [v["volid"] for v in storage.list_volumes(100)] == volids[1:]
    assert [b.archive for b in store.failed_logs(100)] == [
        "100/lxc-1000",
        f"100/qemu-{2 * day + 1}",
        f"100/qemu-{3 * day + 1}",
    ]
    newest = store.failed_dir(BackupId(100, VmType.QEMU, 3 * day + 1))
    assert (newest / "backup.log").read_text() == f"log {3 * day + 1}\n"
    assert [b.archive for b in store.failed_logs(101)] == ["101/qemu-1000"]
    assert "removed the log of failed backup 100/qemu-1000" in lines
    assert f"removed the log of failed backup 100/qemu-{day + 1}" in lines
    assert not [p.name for p in store.guest_dir(100).iterdir() if ".removing-" in p.name]


def test_free_image_in_the_middle(tmp_path: Path) -> None:
    storage, guest, volids = chain_of_backups(tmp_path, 3)
    storage.free_image(volids[1])
    listing = storage.list_volumes(100)
    assert [v["volid"] for v in listing] == [volids[0], volids[2]]
    assert listing[1]["parent"] == volids[0]
    restore_and_compare(storage, volids[2], guest.states[2], tmp_path)
    # the next incremental still builds on the newest backup
    guest.change("drive-scsi0", "write -P 0x77 2M 64k")
    guest.snapshot()
    report = Host(storage, STOREID).backup_vm(100, guest.disks, start_time=10**6)
    restore_and_compare(storage, report.volid, guest.states[-1], tmp_path)
    assert storage.list_volumes(100)[-1]["parent"] == volids[2]


def test_attributes(tmp_path: Path) -> None:
    storage, _guest, volids = chain_of_backups(tmp_path, 3)
    storage.update_volume_attribute(volids[0], "notes", "before upgrade\nsecond line")
    assert storage.get_volume_attribute(volids[0], "notes") == "before upgrade\nsecond line"
    assert storage.list_volumes(100)[0]["notes"] == "before upgrade\nsecond line"
    assert storage.get_volume_attribute(volids[0], "protected") == 0
    with pytest.raises(StorageOperationError, match="not supported"):
        storage.update_volume_attribute(volids[0], "color", "red")
    assert storage.get_volume_attribute(volids[0], "color") is None
    limited = DirectoryStorage(STOREID, {"path": storage.scfg.path, "max-protected-backups": 1})
    limited.update_volume_attribute(volids[0], "protected", 1)
    with pytest.raises(StoreError, match="max-protected-backups"):
        limited.update_volume_attribute(volids[1], "protected", 1)


def test_volume_names_and_unsupported_operations(tmp_path: Path) -> None:
    storage = make_storage(tmp_path)
    assert storage.parse_volname("backup/100/qemu-1700000000") == (
        "backup",
        "100/qemu-1700000000",
        100,
    )
    for bad in [
        "backup/100/../../etc/passwd",
        "backup/../100/qemu-1",
        "/etc/passwd",
        "backup/100/qemu-1/../../x",
        "backup/100/qemu-1\0",
        "backup/1e3/qemu-1",
        "backup/100/qemu-99999999999999999999",
        "backup/0100/qemu-1",
        "backup/100/vzdump-qemu-1.vma",
        "backup/100/qemu-",
        "backup/100/lxc-1/x",
        "",
        "backup//qemu-1",
    ]:
        with pytest.raises(VolumeNameError):
            storage.parse_volname(bad)
    with pytest.raises(StoreError, match="belongs to storage"):
        storage.backup_id("other:backup/100/qemu-1")
    for op in (
        lambda: storage.alloc_image(100, "raw", None, 1),
        lambda: storage.clone_image("backup/100/qemu-1", 101),
        lambda: storage.volume_resize("backup/100/qemu-1", 1),
        lambda: storage.volume_snapshot("backup/100/qemu-1", "s"),
        lambda: storage.path("backup/100/qemu-1", "snap"),
    ):
        with pytest.raises(StorageOperationError):
            op()
    with pytest.raises(StoreError, match="does not exist"):
        DirectoryStorage(STOREID, {"path": str(tmp_path / "missing")}).activate_storage()
    assert storage.activate_storage()
    with pytest.raises(StoreError, match="unknown storage option"):
        DirectoryStorage(STOREID, {"path": "/x", "colour": "red"})
    for bad in ("-1", "soon", "nan", "inf"):
        with pytest.raises(StoreError, match="lock-timeout"):
            DirectoryStorage(STOREID, {"path": "/x", "lock-timeout": bad})
    patient = DirectoryStorage(STOREID, {"path": "/x", "lock-timeout": "2.5"})
    assert patient.store.lock_timeout == 2.5


def test_hostile_chain_is_never_served(tmp_path: Path) -> None:
    storage, _guest, volids = chain_of_backups(tmp_path, 2)
    outside = tmp_path / "outside.qcow2"
    qemu.img_create(outside, 16 * MiB)
    qemu.io(outside, "write -P 0x99 0 16M")
    img = storage.store.backup_dir(storage.backup_id(volids[1])) / "drive-scsi0.qcow2"
    qemu.run(
        ["qemu-img", "rebase", "-u", "-f", "qcow2", "-b", str(outside), "-F", "qcow2", str(img)]
    )
    provider = storage.new_backup_provider()
    volname = volids[1].split(":")[1]
    with pytest.raises(ImageError, match="outside the allowed directory"):
        provider.restore_vm_volume_init(volname, "drive-scsi0", {})
    assert not provider._restores
    with pytest.raises(ImageError, match="outside"):
        Host(storage, STOREID).restore_vm(volids[1], {"drive-scsi0": tmp_path / "x.raw"})
    assert not (tmp_path / "x.raw").exists()
    bad = [r for r in storage.verify(vmid=100) if not r.ok]
    assert [r.volid for r in bad] == [volids[1]]


def test_verify_detects_corruption(tmp_path: Path) -> None:
    # a byte flipped at a fixed offset of the data clusters: uncompressed images
    storage, _guest, volids = chain_of_backups(tmp_path, 2, compress="none")
    img = storage.store.backup_dir(storage.backup_id(volids[0])) / "drive-scsi0.qcow2"
    with open(img, "r+b") as f:
        f.seek(64 * KiB + 1000)
        byte = f.read(1)
        f.seek(64 * KiB + 1000)
        f.write(bytes([byte[0] ^ 1]))
    results = {r.volid: r for r in storage.verify(vmid=100)}
    assert not results[volids[0]].ok
    assert "drive-scsi0: data does not match its digests" in results[volids[0]].problems[0]
    # the incremental built on it is no better than its base, and says which base is bad
    base = volids[0].split(":")[1]
    assert results[volids[1]].problems == (
        f"drive-scsi0: its base {base} fails its check: "
        "data does not match its digests (first difference in the chunk at offset 0)",
    )
    with open(img, "r+b") as f:  # repaired: both verify again, and their marks go
        f.seek(64 * KiB + 1000)
        f.write(byte)
    assert all(r.ok for r in storage.verify(vmid=100))
    assert [storage.store.check_failure(storage.backup_id(v)) for v in volids] == [None, None]
    conf = storage.store.backup_dir(storage.backup_id(volids[1])) / "guest.conf"
    conf.write_text("tampered")
    assert not storage.verify(volids[1])[0].ok


def test_seed_layout_store(tmp_path: Path) -> None:
    """A store made by the seed: absolute backing paths, "<bitmap-id> <time>"
    previous-info, no manifest.  Listed, verified as far as possible, restored,
    and built upon."""
    root = tmp_path / "store"
    gdir = root / "100"
    b1, b2 = gdir / "qemu-1000", gdir / "qemu-2000"
    b1.mkdir(parents=True)
    b2.mkdir()
    guest = Guest(tmp_path, {"drive-scsi0": 8 * MiB})
    qemu.run(
        [
            "qemu-img",
            "convert",
            "-O",
            "qcow2",
            str(guest.disks[0].path),
            str(b1 / "drive-scsi0.qcow2"),
        ]
    )
    qemu.img_create(b2 / "drive-scsi0.qcow2", 8 * MiB, backing=str(b1 / "drive-scsi0.qcow2"))
    qemu.io(b2 / "drive-scsi0.qcow2", "write -P 0x5a 1M 1M", "write -z 3M 64k")
    guest.change("drive-scsi0", "write -P 0x5a 1M 1M", "write -z 3M 64k")
    for b in (b1, b2):
        (b / "guest.conf").write_text("seed config\n")
    (gdir / "previous-info").write_text("1000 2000")
    storage = DirectoryStorage(STOREID, {"path": str(root)})
    listing = storage.list_volumes()
    assert [v["volid"] for v in listing] == [
        f"{STOREID}:backup/100/qemu-1000",
        f"{STOREID}:backup/100/qemu-2000",
    ]
    assert listing[1]["parent"] == f"{STOREID}:backup/100/qemu-1000"
    assert all(r.ok for r in storage.verify()), storage.verify()
    state = guest.snapshot()
    restore_and_compare(storage, listing[1]["volid"], state, tmp_path)
    # the hypervisor's API (no bitmap generations) builds on the seed's last backup
    provider = storage.new_backup_provider()
    answer = provider.backup_vm_query_incremental(100, {"drive-scsi0": {"size": 8 * MiB}})
    assert answer == {"drive-scsi0": "use"}
    # our host cannot prove that a bitmap continues the seed's backup: full, then
    # incremental on the generation that full backup started
    qemu.bitmap(guest.disks[0].path, "add", "dirbackup-" + STOREID)  # the old single bitmap
    guest.change("drive-scsi0", "write -P 0x6b 5M 64k")
    state = guest.snapshot()
    report = Host(storage, STOREID).backup_vm(100, guest.disks, start_time=3000)
    assert report.bitmap_modes == {"drive-scsi0": "new"}
    assert "dirbackup-" + STOREID not in {b["name"] for b in qemu.bitmaps(guest.disks[0].path)}
    restore_and_compare(storage, report.volid, state, tmp_path)
    guest.change("drive-scsi0", "write -P 0x6c 6M 64k")
    state = guest.snapshot()
    report = Host(storage, STOREID).backup_vm(100, guest.disks, start_time=4000)
    assert report.bitmap_modes == {"drive-scsi0": "reuse"}
    restore_and_compare(storage, report.volid, state, tmp_path)
    storage.update_volume_attribute(listing[0]["volid"], "notes", "from the seed")
    assert storage.list_volumes()[0]["notes"] == "from the seed"


def test_manifest_contents(tmp_path: Path) -> None:
    storage, _guest, volids = chain_of_backups(tmp_path, 2)
    path = storage.store.backup_dir(storage.backup_id(volids[1])) / "manifest.json"
    m = json.loads(path.read_text())
    disk = m["disks"]["drive-scsi0"]
    assert m["mode"] == "incremental" and m["parent"] == volids[0].split(":")[1]
    assert disk["mode"] == "incremental" and disk["cluster_size"] == 64 * KiB
    assert disk["digests"] and all(len(v) == 16 for v in disk["digests"].values())
    assert m["tool"].startswith("dirbackup ") and m["files"]["guest.conf"]["sha256"]
    log = path.parent / "backup.log"
    assert "drive-scsi0: incremental backup" in log.read_text()
    prev = PreviousInfo.parse(storage.store.previous_info_path(100).read_text())
    assert prev.devices["drive-scsi0"].backup == volids[1].split("/")[-1]
