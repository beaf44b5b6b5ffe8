"""The standalone host behaves like the hypervisor where a provider can tell
(issue 17): the order of calls on failure paths, one job for several guests,
bitmap names, the guest config's drive map, the forked container backup.

Where the point is what the host does to ANY provider, a second provider
written here (`Recorder`, a real api.BackupProvider that keeps a list of its
calls and copies nothing) is driven; otherwise our own provider, with real
qemu-img / qemu-nbd guests."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from conftest import MiB, assert_same
from guests import STOREID, Guest, make_storage, restore_and_compare

from dirbackup import extents, nbd
from dirbackup.api import BackupProvider, ContainerInfo, VolumeInfo
from dirbackup.errors import HostError
from dirbackup.host import Disk, Host
from dirbackup.provider import DirectoryBackupProvider


class Recorder(BackupProvider):
    """A second provider: records every call (name, vmid, key arguments) and
    what the host passed; `fail_at` names a method that raises."""

    def __init__(self, fail_at: str | None = None, mechanism: str = "nbd", log: Any = None) -> None:
        super().__init__(None, None, STOREID, log)
        self.calls: list[tuple[Any, ...]] = []
        self.volumes: dict[int, dict[str, dict[str, Any]]] = {}
        self.configs: dict[int, str] = {}
        self.logs: dict[int, str] = {}
        self.fail_at = fail_at
        self.mechanism = mechanism
        self.incremental = "new"
        self.read_at: tuple[int, int] | None = None  # (offset, length) backup_vm reads

    def _call(self, *what: Any) -> None:
        self.calls.append(what)
        if self.fail_at == what[0]:
            raise HostError(f"{what[0]} failed on purpose")

    def provider_name(self) -> str:
        return "recorder"

    def job_init(self, start_time: int) -> None:
        self._call("job_init")

    def job_cleanup(self) -> None:
        self._call("job_cleanup")

    def backup_init(self, vmid: int, vmtype: str, start_time: int) -> dict[str, str]:
        self._call("backup_init", vmid, vmtype)
        return {"archive-name": f"rec-{vmid}-{start_time}"}

    def backup_cleanup(
        self, vmid: int, vmtype: str | None, success: bool, info: Mapping[str, Any] | None
    ) -> dict[str, Any]:
        self._call("backup_cleanup", vmid, success, dict(info or {}).get("error"))
        return {"stats": {"archive-size": 1}} if success else {}

    def backup_get_mechanism(self, vmid: int, vmtype: str) -> str:
        self._call("backup_get_mechanism", vmid)
        return self.mechanism if vmtype == "qemu" else "directory"

    def backup_vm_query_incremental(
        self, vmid: int, volumes: Mapping[str, Mapping[str, Any]]
    ) -> dict[str, str]:
        self._call("backup_vm_query_incremental", vmid)
        return {dev: self.incremental for dev in volumes}

    def backup_vm(
        self,
        vmid: int,
        guest_config: str,
        volumes: Mapping[str, VolumeInfo | Mapping[str, Any]],
        info: Any,
    ) -> None:
        self._call("backup_vm", vmid)
        self.configs[vmid] = guest_config
        self.volumes[vmid] = {}
        for dev, vol in volumes.items():
            v = dict(vol)  # type: ignore[arg-type]
            seen = {k: v[k] for k in ("size", "bitmap-mode", "bitmap-name") if k in v}
            if "nbd-path" in v and "bitmap-name" in v:  # is the bitmap on the export?
                context = extents.dirty_bitmap_context(v["bitmap-name"])
                h = nbd.connect(nbd.unix_uri(v["nbd-path"], dev), [context])
                try:
                    seen["exported"] = h.can_meta_context(context)
                finally:
                    nbd.close_all([h])
            self.volumes[vmid][dev] = seen
            if self.read_at is not None and v.get("bitmap-mode") == "reuse":
                h = nbd.connect(nbd.unix_uri(v["nbd-path"], dev))
                try:
                    h.pread(self.read_at[1], self.read_at[0])
                finally:
                    nbd.close_all([h])

    def backup_container_prepare(self, vmid: int, info: ContainerInfo | Mapping[str, Any]) -> None:
        self._call("backup_container_prepare", vmid)

    def backup_container(
        self,
        vmid: int,
        guest_config: str,
        exclude_patterns: Sequence[str],
        info: ContainerInfo | Mapping[str, Any],
    ) -> None:
        self.log("info", f"backup_container runs in process {os.getpid()}")
        self._call("backup_container", vmid)

    def backup_handle_log_file(self, vmid: int, filename: str) -> None:
        self._call("backup_handle_log_file", vmid)
        self.logs[vmid] = Path(filename).read_text()

    # restores are not what these tests drive
    def restore_get_mechanism(self, volname: str, *storeid: str) -> tuple[str, str]:
        raise NotImplementedError

    def archive_get_guest_config(self, volname: str, *storeid: str) -> str:
        raise NotImplementedError

    def archive_get_firewall_config(self, volname: str, *storeid: str) -> str | None:
        raise NotImplementedError

    def restore_vm_init(self, volname: str, *storeid: str) -> dict[str, dict[str, int]]:
        raise NotImplementedError

    def restore_vm_cleanup(self, volname: str, *storeid: str) -> None:
        raise NotImplementedError

    def restore_vm_volume_init(
        self, volname: str, device_name: str, info: Mapping[str, Any] | None = None
    ) -> dict[str, str]:
        raise NotImplementedError

    def restore_vm_volume_cleanup(
        self, volname: str, device_name: str, info: Mapping[str, Any] | None = None
    ) -> None:
        raise NotImplementedError

    def restore_container_init(self, volname: str, *args: Any) -> dict[str, str]:
        raise NotImplementedError

    def restore_container_cleanup(self, volname: str, *args: Any) -> None:
        raise NotImplementedError

    def names(self) -> list[str]:
        return [c[0] for c in self.calls]


def _dir(parent: Path, name: str) -> Path:
    path = parent / name
    path.mkdir()
    return path


def recorder_host(tmp_path: Path, rec: Recorder) -> Host:
    return Host(make_storage(tmp_path), STOREID, provider=rec)


# -- 4: failure before backup_init


def test_failure_before_backup_init_still_cleans_up_and_hands_over_the_log(
    tmp_path: Path,
) -> None:
    rec = Recorder()
    host = recorder_host(tmp_path, rec)
    missing = tmp_path / "gone.qcow2"
    with pytest.raises(HostError, match=re.escape(f"disk image {missing} does not exist")):
        host.backup_vm(100, [Disk("drive-scsi0", missing)])
    assert rec.calls == [
        ("job_init",),
        ("backup_cleanup", 100, False, f"disk image {missing} does not exist"),
        ("backup_handle_log_file", 100),
        ("job_cleanup",),
    ]


def test_failing_backup_init_is_cleaned_up_as_the_hypervisor_does(tmp_path: Path) -> None:
    guest = Guest(tmp_path, {"drive-scsi0": 4 * MiB})
    rec = Recorder(fail_at="backup_init")
    with pytest.raises(HostError, match=r"^backup_init failed on purpose$"):
        recorder_host(tmp_path, rec).backup_vm(100, guest.disks)
    assert rec.names() == [
        "job_init",
        "backup_init",
        "backup_cleanup",
        "backup_handle_log_file",
        "job_cleanup",
    ]
    assert rec.calls[2] == ("backup_cleanup", 100, False, "backup_init failed on purpose")


def test_our_provider_takes_cleanup_and_log_without_backup_init(tmp_path: Path) -> None:
    storage = make_storage(tmp_path)
    lines: list[tuple[str, str]] = []
    host = Host(storage, STOREID, log=lambda level, msg: lines.append((level, msg)))
    missing = tmp_path / "gone.qcow2"
    with pytest.raises(HostError, match=re.escape(f"disk image {missing} does not exist")):
        host.backup_vm(100, [Disk("drive-scsi0", missing)])
    assert ("info", "guest 100: nothing to clean up") in lines
    assert ("info", "no backup of guest 100 in this job; its task log is not kept") in lines
    assert not any(level == "warn" for level, _ in lines), lines
    assert storage.list_volumes(100) == []
    # the provider stays usable: the next backup of the guest works
    (tmp_path / "g").mkdir()
    guest = Guest(tmp_path / "g", {"drive-scsi0": 4 * MiB})
    report = host.backup_vm(100, guest.disks)
    assert report.volid.startswith(f"{STOREID}:backup/")


def test_a_failing_backup_cleanup_does_not_hide_the_error(tmp_path: Path) -> None:
    rec = Recorder(fail_at="backup_cleanup")
    lines: list[tuple[str, str]] = []
    host = Host(make_storage(tmp_path), STOREID, provider=rec, log=lambda *a: lines.append(a))
    missing = tmp_path / "gone.qcow2"
    with pytest.raises(HostError, match=r"does not exist$"):
        host.backup_vm(100, [Disk("drive-scsi0", missing)])
    assert rec.names()[-2:] == ["backup_handle_log_file", "job_cleanup"]


# -- 5: one job, several guests


def test_one_job_holds_several_guests(tmp_path: Path) -> None:
    g1, g2 = (Guest(_dir(tmp_path, n), {"drive-scsi0": 4 * MiB}) for n in ("a", "b"))
    rec = Recorder()
    host = recorder_host(tmp_path, rec)
    with host.job(1_700_000_000):
        r1 = host.backup_vm(101, g1.disks, start_time=1_700_000_000)
        with pytest.raises(HostError, match=r"does not exist$"):
            host.backup_vm(102, [Disk("drive-scsi0", tmp_path / "gone.qcow2")])
        r2 = host.backup_vm(103, g2.disks, start_time=1_700_000_001)
    names = rec.names()
    assert names.count("job_init") == 1 and names[0] == "job_init"
    assert names.count("job_cleanup") == 1 and names[-1] == "job_cleanup"
    assert [c[1] for c in rec.calls if c[0] == "backup_init"] == [101, 103]
    assert [c[1:3] for c in rec.calls if c[0] == "backup_cleanup"] == [
        (101, True),
        (102, False),
        (103, True),
    ]
    assert [c[1] for c in rec.calls if c[0] == "backup_handle_log_file"] == [101, 102, 103]
    assert (r1.archive_name, r2.archive_name) == ("rec-101-1700000000", "rec-103-1700000001")
    # each guest's log is its own
    assert "102" not in rec.logs[101] and "does not exist" in rec.logs[102]
    assert "does not exist" not in rec.logs[103]


def test_a_failed_job_init_is_followed_by_job_cleanup(tmp_path: Path) -> None:
    rec = Recorder(fail_at="job_init")
    with pytest.raises(HostError, match=r"^job_init failed on purpose$"):
        recorder_host(tmp_path, rec).backup_vm(100, [Disk("drive-scsi0", tmp_path / "x")])
    assert rec.names() == ["job_init", "job_cleanup"]


def test_several_guests_in_one_job_with_our_provider(tmp_path: Path) -> None:
    storage = make_storage(tmp_path)
    guests = {}
    for vmid in (201, 202):
        guests[vmid] = Guest(
            _dir(tmp_path, str(vmid)), {"drive-scsi0": 4 * MiB, "drive-virtio1": 2 * MiB}
        )
    states = {vmid: g.snapshot() for vmid, g in guests.items()}
    host = Host(storage, STOREID)
    with host.job():
        reports = {vmid: host.backup_vm(vmid, g.disks) for vmid, g in guests.items()}
    for vmid, report in reports.items():
        targets = {dev: tmp_path / f"r{vmid}-{dev}.raw" for dev in states[vmid]}
        host.restore_vm(report.volid, targets)
        for dev, raw in states[vmid].items():
            assert_same(raw, targets[dev])


# -- 1: bitmap-name whenever the disk has a bitmap


def test_bitmap_name_is_passed_for_new_and_reuse(tmp_path: Path) -> None:
    guest = Guest(tmp_path, {"drive-scsi0": 4 * MiB, "drive-virtio1": 2 * MiB})
    raw = tmp_path / "raw.img"
    raw.write_bytes(b"\x01" * MiB)
    disks = [*guest.disks, Disk("drive-sata0", raw)]
    rec = Recorder()
    host = recorder_host(tmp_path, rec)
    rec.incremental = "new"
    host.backup_vm(100, disks, start_time=1_700_000_000)
    legacy = f"dirbackup-{STOREID}"
    first = {"bitmap-mode": "new", "bitmap-name": f"{legacy}.next", "exported": False}
    assert rec.volumes[100] == {
        "drive-scsi0": {"size": 4 * MiB, **first},
        "drive-virtio1": {"size": 2 * MiB, **first},
        "drive-sata0": {"size": MiB, "bitmap-mode": "none"},  # raw: no bitmap, no name
    }
    rec.incremental = "use"
    host.backup_vm(100, disks, start_time=1_700_000_001)
    then = {"bitmap-mode": "reuse", "bitmap-name": legacy, "exported": True}
    assert rec.volumes[100] == {
        "drive-scsi0": {"size": 4 * MiB, **then},
        "drive-virtio1": {"size": 2 * MiB, **then},
        "drive-sata0": {"size": MiB, "bitmap-mode": "none"},
    }


def test_our_provider_takes_a_bitmap_name_with_mode_new(tmp_path: Path) -> None:
    """Our provider reads the whole disk in mode new, whatever the name."""
    storage = make_storage(tmp_path)
    guest = Guest(tmp_path, {"drive-scsi0": 4 * MiB})
    seen: list[dict[str, Any]] = []

    class Watching(DirectoryBackupProvider):
        def backup_vm(self, vmid: int, guest_config: str, volumes: Any, info: Any) -> None:
            seen.append({d: dict(v) for d, v in volumes.items()})
            super().backup_vm(vmid, guest_config, volumes, info)

    host = Host(
        storage, STOREID, new_provider=lambda log: Watching(storage, storage.scfg, STOREID, log)
    )
    state = guest.snapshot()
    report = host.backup_vm(100, guest.disks, start_time=1_700_000_000)
    vol = seen[0]["drive-scsi0"]
    assert vol["bitmap-mode"] == "new" and vol["bitmap-name"].endswith(".next")
    manifest = storage.store.read_manifest(storage.backup_id(report.volid))
    assert manifest is not None and manifest.disks["drive-scsi0"].mode == "full"
    restore_and_compare(storage, report.volid, state, tmp_path)
    guest.change("drive-scsi0", "write -P 0x55 1M 64k")
    state = guest.snapshot()
    report = host.backup_vm(100, guest.disks, start_time=1_700_000_001)
    vol = seen[1]["drive-scsi0"]
    assert vol["bitmap-mode"] == "reuse" and not vol["bitmap-name"].endswith(".next")
    manifest = storage.store.read_manifest(storage.backup_id(report.volid))
    assert manifest is not None and manifest.disks["drive-scsi0"].mode == "incremental"
    assert manifest.disks["drive-scsi0"].dirty_bytes == 64 * 1024
    restore_and_compare(storage, report.volid, state, tmp_path)


# -- 3: the guest config's drive map


def test_guest_config_carries_the_drive_map(tmp_path: Path) -> None:
    guest = Guest(tmp_path, {"drive-scsi0": 4 * MiB})
    raw = tmp_path / "raw.img"
    raw.write_bytes(b"\x01" * MiB)
    rec = Recorder()
    config = "name: vm\n#qmdump#map:ide9:drive-ide9:old:raw:\nscsi0: local:100/a.qcow2\n#vzdump#x\n"
    recorder_host(tmp_path, rec).backup_vm(
        100, [*guest.disks, Disk("data", raw)], config=config, start_time=1_700_000_000
    )
    assert rec.configs[100] == (
        "name: vm\nscsi0: local:100/a.qcow2\n"
        "#qmdump#map:scsi0:drive-scsi0::qcow2:\n"
        "#qmdump#map:data:data::raw:\n"
    )


def test_restore_honours_the_drive_map(tmp_path: Path) -> None:
    storage = make_storage(tmp_path)
    guest = Guest(tmp_path, {"drive-scsi0": 4 * MiB, "drive-virtio1": 2 * MiB})
    state = guest.snapshot()
    host = Host(storage, STOREID)
    volid = host.backup_vm(100, guest.disks, config="name: vm\n").volid
    # a disk named by its drive key (scsi0) or by its device (drive-virtio1)
    targets = {"scsi0": tmp_path / "a.raw", "drive-virtio1": tmp_path / "b.raw"}
    report = host.restore_vm(volid, targets)
    assert sorted(report.devices) == ["drive-scsi0", "drive-virtio1"]
    assert_same(state["drive-scsi0"], targets["scsi0"])
    assert_same(state["drive-virtio1"], targets["drive-virtio1"])
    with pytest.raises(HostError, match=r"^disk drive-scsi0 is given twice"):
        host.restore_vm(volid, {"scsi0": tmp_path / "c.raw", "drive-scsi0": tmp_path / "d.raw"})
    with pytest.raises(
        HostError, match=r"has no disk sata1 \(it has: drive-scsi0, drive-virtio1\)$"
    ):
        host.restore_vm(volid, {"sata1": tmp_path / "e.raw"})
    assert not (tmp_path / "c.raw").exists() and not (tmp_path / "e.raw").exists()


def test_restore_refuses_a_map_line_without_data(tmp_path: Path) -> None:
    """A guest config that maps a drive to a device the backup does not hold
    (here: a provider whose config says more than its disks) is refused, as
    the hypervisor's restore refuses it, before any target is written."""
    storage = make_storage(tmp_path)
    guest = Guest(tmp_path, {"drive-scsi0": 4 * MiB})
    volid = Host(storage, STOREID).backup_vm(100, guest.disks).volid

    class Claiming(DirectoryBackupProvider):
        def archive_get_guest_config(self, volname: str, *storeid: str) -> str:
            return (
                super().archive_get_guest_config(volname)
                + "#qmdump#map:efidisk0:drive-efidisk0::raw:\n"
            )

    host = Host(storage, STOREID, provider=Claiming(storage, storage.scfg, STOREID))
    target = tmp_path / "a.raw"
    with pytest.raises(
        HostError,
        match=r"guest config maps efidisk0 to drive-efidisk0, but the backup holds no disk "
        r"drive-efidisk0 \(it has: drive-scsi0\)$",
    ):
        host.restore_vm(volid, {"scsi0": target})
    assert not target.exists()

    class Garbled(DirectoryBackupProvider):
        def archive_get_guest_config(self, volname: str, *storeid: str) -> str:
            return "#qmdump#map:scsi0:drive-scsi0\n"

    host = Host(storage, STOREID, provider=Garbled(storage, storage.scfg, STOREID))
    with pytest.raises(HostError, match=r"^guest config line 1: malformed drive map line"):
        host.restore_vm(volid, {"scsi0": target})
    assert not target.exists()


# -- 6: backup_container in a forked child


def test_backup_container_runs_in_a_forked_child(tmp_path: Path) -> None:
    rootfs = _dir(tmp_path, "rootfs")
    made: list[Recorder] = []

    def new(log: Any) -> Recorder:
        made.append(Recorder(log=log))
        return made[-1]

    lines: list[tuple[str, str]] = []
    host = Host(make_storage(tmp_path), STOREID, new_provider=new, log=lambda *a: lines.append(a))
    report = host.backup_container(200, rootfs, start_time=1_700_000_000)
    rec = made[0]
    child = [m for level, m in lines if m.startswith("backup_container runs in process ")]
    assert len(child) == 1  # the child's line reached the parent's log ...
    assert int(child[0].rsplit(" ", 1)[1]) != os.getpid()  # ... from another process
    assert any("backup_container runs in process" in line for line in report.log_lines)
    assert "process" in rec.logs[200]  # and the log handed over holds it
    # the call happened in the child: the parent's object never saw it
    assert rec.names() == [
        "job_init",
        "backup_init",
        "backup_get_mechanism",
        "backup_container_prepare",
        "backup_cleanup",
        "backup_handle_log_file",
        "job_cleanup",
    ]


def test_what_the_child_raises_reaches_the_parent(tmp_path: Path) -> None:
    rootfs = _dir(tmp_path, "rootfs")
    rec = Recorder(fail_at="backup_container")
    with pytest.raises(HostError, match=r"^backup_container failed on purpose$"):
        recorder_host(tmp_path, rec).backup_container(200, rootfs)
    assert rec.calls[-3:] == [
        ("backup_cleanup", 200, False, "backup_container failed on purpose"),
        ("backup_handle_log_file", 200),
        ("job_cleanup",),
    ]


def test_our_container_backup_in_the_child_is_published_by_the_parent(tmp_path: Path) -> None:
    rootfs = _dir(tmp_path, "rootfs")
    (rootfs / "etc").mkdir()
    (rootfs / "etc" / "hostname").write_text("ct\n")
    storage = make_storage(tmp_path)
    lines: list[tuple[str, str]] = []
    host = Host(storage, STOREID, log=lambda *a: lines.append(a))
    report = host.backup_container(200, rootfs, config="arch: amd64\n")
    assert any(m.startswith("archive archive.tar: ") for _, m in lines), lines  # from the child
    assert [v["volid"] for v in storage.list_volumes(200)] == [report.volid]
    target = tmp_path / "restored"
    host.restore_container(report.volid, target)
    assert (target / "etc" / "hostname").read_text() == "ct\n"


def test_a_child_that_dies_is_an_error_in_the_parent(tmp_path: Path) -> None:
    class Dying(Recorder):
        def backup_container(self, *args: Any) -> None:
            os.kill(os.getpid(), signal.SIGKILL)

    rec = Dying()
    with pytest.raises(HostError, match=r"^the child process ended with status -9$"):
        recorder_host(tmp_path, rec).backup_container(200, _dir(tmp_path, "rootfs"))
    assert rec.names()[-3:] == ["backup_cleanup", "backup_handle_log_file", "job_cleanup"]


# -- 2: reads outside the dirty areas


@pytest.mark.parametrize(
    ("read_at", "refused"),
    [((MiB, 64 * 1024), False), ((MiB + 64 * 1024, 4096), True), ((0, 4096), True)],
)
def test_a_read_outside_the_dirty_areas_fails_the_backup(
    tmp_path: Path, read_at: tuple[int, int], refused: bool
) -> None:
    guest = Guest(tmp_path, {"drive-scsi0": 4 * MiB})
    rec = Recorder()
    host = Host(make_storage(tmp_path), STOREID, provider=rec, check_reads=True)
    host.backup_vm(100, guest.disks, start_time=1_700_000_000)  # new: any read is fine
    guest.change("drive-scsi0", "write -P 0x31 1M 64k")
    rec.incremental, rec.read_at = "use", read_at
    if not refused:
        host.backup_vm(100, guest.disks, start_time=1_700_000_001)
        assert rec.calls[-3][:3] == ("backup_cleanup", 100, True)
        return
    message = (
        f"drive-scsi0: the provider read {read_at[1]} bytes at offset {read_at[0]}, outside "
        f"the dirty areas of bitmap dirbackup-{STOREID}; the hypervisor refuses such reads "
        "(the backup is void)"
    )
    with pytest.raises(HostError, match=f"^{re.escape(message)}$"):
        host.backup_vm(100, guest.disks, start_time=1_700_000_001)
    assert rec.calls[-3] == ("backup_cleanup", 100, False, message)
    # the bitmap did not advance: the next incremental still holds the change
    rec.read_at = None
    host.backup_vm(100, guest.disks, start_time=1_700_000_002)
    assert rec.volumes[100]["drive-scsi0"]["bitmap-mode"] == "reuse"


@pytest.mark.parametrize("mechanism", ["nbd", "file-handle"])
def test_our_provider_reads_only_dirty_areas(tmp_path: Path, mechanism: str) -> None:
    storage = make_storage(tmp_path, **{"vm-backup-mechanism": mechanism})
    guest = Guest(tmp_path, {"drive-scsi0": 4 * MiB, "drive-virtio1": 2 * MiB})
    host = Host(storage, STOREID, check_reads=True)
    host.backup_vm(100, guest.disks, start_time=1_700_000_000)
    guest.change("drive-scsi0", "write -P 0x31 1M 64k", "write -z 3M 128k")
    state = guest.snapshot()
    report = host.backup_vm(100, guest.disks, start_time=1_700_000_001)
    assert report.bitmap_modes == {"drive-scsi0": "reuse", "drive-virtio1": "reuse"}
    restore_and_compare(storage, report.volid, state, tmp_path)


CHILD_SCRIPT = """
import os, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from test_host_pve import Recorder, recorder_host

class Sleeping(Recorder):
    def backup_container(self, *args):
        Path(sys.argv[2], "child.pid").write_text(str(os.getpid()))
        time.sleep(60)

recorder_host(Path(sys.argv[2]), Sleeping()).backup_container(200, Path(sys.argv[2], "rootfs"))
"""


def test_the_child_dies_with_its_parent(tmp_path: Path) -> None:
    _dir(tmp_path, "rootfs")
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD_SCRIPT, str(Path(__file__).parent), str(tmp_path)]
    )
    try:
        pidfile = tmp_path / "child.pid"
        deadline = time.monotonic() + 30
        while not pidfile.exists() or not pidfile.read_text():
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        child = int(pidfile.read_text())
        assert child != proc.pid
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 10
    while Path(f"/proc/{child}").exists() and "Z" not in _state(child):
        if time.monotonic() > deadline:
            os.kill(child, signal.SIGKILL)  # leave nothing behind, then fail
            pytest.fail("the forked child outlived its killed parent")
        time.sleep(0.05)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return "Z"


def test_drive_keys_stay_unique_and_restorable(tmp_path: Path) -> None:
    """Devices `scsi0` and `drive-scsi0` of one guest: each is its own key."""
    storage = make_storage(tmp_path)
    guest = Guest(tmp_path, {"scsi0": 2 * MiB, "drive-scsi0": 4 * MiB})
    state = guest.snapshot()
    host = Host(storage, STOREID)
    volid = host.backup_vm(100, guest.disks).volid
    config = storage.new_backup_provider().archive_get_guest_config(volid.split(":", 1)[1])
    assert (
        config == "#qmdump#map:scsi0:scsi0::qcow2:\n#qmdump#map:drive-scsi0:drive-scsi0::qcow2:\n"
    )
    targets = {"scsi0": tmp_path / "a.raw", "drive-scsi0": tmp_path / "b.raw"}
    host.restore_vm(volid, targets)
    assert_same(state["scsi0"], targets["scsi0"])
    assert_same(state["drive-scsi0"], targets["drive-scsi0"])
