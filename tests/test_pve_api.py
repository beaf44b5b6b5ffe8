"""Where Proxmox VE is strict about the provider API, and the provider
process the Perl plugins talk to (dirbackup.pveserve).

The Perl side itself is tested by `prove perl/t` (make test-perl)."""

from __future__ import annotations

import json
import os
import socket
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from conftest import MiB
from guests import STOREID, Guest, make_storage

from dirbackup.api import check_incremental_answer
from dirbackup.errors import DirbackupError, HostError
from dirbackup.host import Host
from dirbackup.provider import DirectoryBackupProvider
from dirbackup.pveserve import PveServer, serve_fd
from dirbackup.storage import DirectoryStorage

# ---------------------------------------------------------------- backup_handle_log_file


def test_log_file_without_backup_init_does_not_raise(tmp_path: Path) -> None:
    """PVE calls it after a failure before backup_init too, outside any eval."""
    logged: list[tuple[str, str]] = []
    storage = make_storage(tmp_path)
    p = storage.new_backup_provider(lambda level, msg: logged.append((level, msg)))
    log = tmp_path / "task.log"
    log.write_text("task log\n")
    p.job_init(1_700_000_000)
    p.backup_handle_log_file(100, str(log))
    assert logged[-1] == ("info", "no backup of guest 100 in this job; its task log is not kept")
    p.backup_handle_log_file("not a number", str(log))
    assert logged[-1][0] == "warn" and "not a number" in logged[-1][1]
    p.job_cleanup()
    assert list((tmp_path / "store").iterdir()) == []  # nothing kept, nothing half-made


def test_log_file_unreadable_is_a_warning(tmp_path: Path) -> None:
    logged: list[tuple[str, str]] = []
    storage = make_storage(tmp_path)
    p = storage.new_backup_provider(lambda level, msg: logged.append((level, msg)))
    p.job_init(1_700_000_000)
    p.backup_init(100, "qemu", 1_700_000_000)
    p.backup_cleanup(100, "qemu", False, {"error": "boom"})
    missing = tmp_path / "missing.log"
    p.backup_handle_log_file(100, str(missing))
    assert logged[-1][0] == "warn"
    assert logged[-1][1].startswith(f"could not keep the task log {missing}: ")
    p.job_cleanup()


# ---------------------------------------------------------------- backup_vm_query_incremental


def test_incremental_answer_rules() -> None:
    devices = ["drive-scsi0", "drive-virtio1"]
    assert check_incremental_answer(None, devices) == {}
    assert check_incremental_answer({}, devices) == {}
    answer = {"drive-scsi0": "none", "drive-virtio1": "use"}
    assert check_incremental_answer(answer, devices) == answer
    with pytest.raises(ValueError, match=r"^invalid incremental mode 'reuse' for drive-scsi0 "):
        check_incremental_answer({"drive-scsi0": "reuse"}, devices)
    with pytest.raises(ValueError, match=r"^invalid incremental mode None for drive-scsi0 "):
        check_incremental_answer({"drive-scsi0": None}, devices)
    with pytest.raises(ValueError, match=r"returned list, not a hash$"):
        check_incremental_answer(["drive-scsi0"], devices)
    with pytest.raises(ValueError, match=r"unknown device 'drive-sata9'$"):
        check_incremental_answer({"drive-sata9": "new"}, devices)


class _Answering(DirectoryBackupProvider):
    """Our provider with a chosen answer to backup_vm_query_incremental."""

    answer: Any = None

    def backup_vm_query_incremental(
        self, vmid: int, volumes: Mapping[str, Mapping[str, Any]]
    ) -> Any:
        return self.answer


def _host(tmp_path: Path, answer: Any) -> tuple[Host, Guest, Any]:
    storage = make_storage(tmp_path)

    def new(log: Any) -> _Answering:
        p = _Answering(storage, storage.scfg, STOREID, log)
        p.answer = answer
        return p

    guest = Guest(tmp_path, {"drive-scsi0": 4 * MiB, "drive-virtio1": 4 * MiB})
    return Host(storage, STOREID, new_provider=new), guest, storage


def test_host_refuses_an_invalid_incremental_answer(tmp_path: Path) -> None:
    host, guest, storage = _host(tmp_path, {"drive-scsi0": "yes"})
    with pytest.raises(HostError, match=r"^invalid incremental mode 'yes' for drive-scsi0 "):
        host.backup_vm(100, guest.disks, start_time=1_700_000_000)
    assert storage.list_volumes(100) == []  # never a silent full backup


def test_host_accepts_none_per_device(tmp_path: Path) -> None:
    host, guest, storage = _host(tmp_path, {"drive-scsi0": "none", "drive-virtio1": "new"})
    report = host.backup_vm(100, guest.disks, start_time=1_700_000_000)
    assert report.bitmap_modes == {"drive-scsi0": "none", "drive-virtio1": "new"}
    assert [v["volid"] for v in storage.list_volumes(100)] == [report.volid]


# ---------------------------------------------------------------- storage status


def test_storage_status(tmp_path: Path) -> None:
    storage = make_storage(tmp_path)
    total, free, used, active = storage.status()
    st = os.statvfs(tmp_path / "store")
    assert active is True
    assert total == st.f_blocks * st.f_frsize
    assert 0 < free <= total and 0 <= used <= total
    gone = DirectoryStorage(STOREID, {"path": str(tmp_path / "nowhere")})
    assert gone.status() == (0, 0, 0, False)


# ---------------------------------------------------------------- restore_container_init


def test_restore_container_init_both_forms(tmp_path: Path) -> None:
    storage = make_storage(tmp_path)
    root = tmp_path / "ct"
    root.mkdir()
    (root / "hello").write_text("hello\n")
    p = storage.new_backup_provider()
    p.job_init(1_700_000_000)
    archive = p.backup_init(200, "lxc", 1_700_000_000)["archive-name"]
    info = {"directory": str(root), "sources": ["."], "backup-user-id": os.getuid()}
    p.backup_container_prepare(200, info)
    p.backup_container(200, "arch: amd64\n", [], info)
    p.backup_cleanup(200, "lxc", True, {})
    p.job_cleanup()
    volname = f"backup/{archive}"
    short = p.restore_container_init(volname, {})
    long = p.restore_container_init(volname, STOREID, {})
    assert short == long and set(short) == {"tar-path"}
    assert Path(short["tar-path"]).is_file() and Path(short["tar-path"]).stat().st_size > 0
    p.restore_container_cleanup(volname, {})
    p.restore_container_cleanup(volname, STOREID, {})


# ---------------------------------------------------------------- the provider process


@pytest.fixture
def served(tmp_path: Path) -> Iterator[socket.socket]:
    """A connection to `serve_fd` of a store in tmp_path, in a thread."""
    (tmp_path / "store").mkdir()
    ours, theirs = socket.socketpair()
    scfg = {"path": str(tmp_path / "store"), "vm-backup-mechanism": "file-handle"}
    thread = threading.Thread(
        target=serve_fd, args=(STOREID, scfg, theirs.detach()), daemon=True
    )
    thread.start()
    try:
        yield ours
    finally:
        ours.close()
        thread.join(30)
        assert not thread.is_alive()


def _call(sock: socket.socket, method: str, *args: Any) -> tuple[list[Any], dict[str, Any]]:
    sock.sendall(json.dumps({"method": method, "args": list(args)}).encode() + b"\n")
    return _replies(sock)


def _replies(sock: socket.socket) -> tuple[list[Any], dict[str, Any]]:
    logs = []
    reader = sock.makefile("rb")
    while True:
        line = reader.readline()
        assert line, "the server closed the connection"
        msg = json.loads(line)
        if "log" in msg:
            logs.append(msg["log"])
            continue
        return logs, msg


def test_serve_a_file_handle_backup(tmp_path: Path, served: socket.socket) -> None:
    disk = tmp_path / "disk.raw"
    data = os.urandom(MiB) + bytes(MiB) + os.urandom(MiB)
    disk.write_bytes(data)
    logs, reply = _call(served, "job_init", 1_700_000_000)
    assert reply == {"result": None}
    assert logs[0][0] == "info" and "job started" in logs[0][1]
    _, reply = _call(served, "backup_init", 100, "qemu", 1_700_000_000)
    archive = reply["result"]["archive-name"]
    _, reply = _call(served, "backup_get_mechanism", 100, "qemu")
    assert reply == {"result": "file-handle"}
    with open(disk, "rb") as fh:
        vol = {
            "size": len(data),
            "bitmap-mode": "none",
            "file-handle": {"pid": os.getpid(), "fd": fh.fileno()},
            "regions": [[0, len(data)]],
        }
        logs, reply = _call(served, "backup_vm", 100, "conf\n", {"drive-scsi0": vol}, {})
    assert reply == {"result": None}, reply
    assert any("full backup" in m for _, m in logs)
    _, reply = _call(served, "backup_cleanup", 100, "qemu", True, {})
    assert reply["result"]["stats"]["archive-size"] > 0
    _, reply = _call(served, "storage.volume_size_info", f"backup/{archive}")
    size, fmt, _used, parent, ctime = reply["result"]
    assert size > 0
    assert (fmt, parent, ctime) == ("directory", None, 1_700_000_000)
    _, reply = _call(served, "restore_vm_init", f"backup/{archive}")
    assert reply == {"result": {"drive-scsi0": {"size": len(data)}}}
    _, reply = _call(served, "restore_vm_volume_init", f"backup/{archive}", "drive-scsi0", {})
    assert Path(reply["result"]["qemu-img-path"]).read_bytes() == data
    _, reply = _call(served, "restore_vm_cleanup", f"backup/{archive}")
    assert reply == {"result": None}
    _, reply = _call(served, "job_cleanup")
    assert reply == {"result": None}
    assert served.recv(1) == b""  # the server is done after job_cleanup


def test_serve_errors_are_one_line(served: socket.socket) -> None:
    _, reply = _call(served, "no_such_method")
    assert reply == {"error": "unknown method 'no_such_method'"}
    _, reply = _call(served, "storage.alloc_image", 100)
    assert reply == {"error": "unknown storage method 'alloc_image'"}
    _, reply = _call(served, "backup_init", 100, "qemu", -5)
    assert "\n" not in reply["error"] and reply["error"]
    _, reply = _call(served, "restore_vm_init", "backup/../etc")
    assert reply["error"].startswith("invalid volume name 'backup/../etc'")
    served.sendall(b"{not json\n")
    _, reply = _replies(served)
    assert reply["error"].startswith("request is not JSON: ")
    _, reply = _call(served, "backup_vm", 100, "", {"d": {"size": 1, "file-handle": 3}}, {})
    assert reply == {"error": 'd: \'file-handle\' must be {"pid": P, "fd": N}'}
    _, reply = _call(served, "storage.status")
    total, _free, _used, active = reply["result"]
    assert active is True and total > 0
    _, reply = _call(served, "exit")
    assert reply == {"result": None}


def test_server_shutdown_aborts_a_running_backup(tmp_path: Path) -> None:
    """The Perl side died: the partial backup goes, the guest is unlocked."""
    (tmp_path / "store").mkdir()
    server = PveServer(STOREID, {"path": str(tmp_path / "store")})
    assert server.handle({"method": "job_init", "args": [1]}, print) == {"result": None}
    reply = server.handle({"method": "backup_init", "args": [100, "qemu", 1_700_000_000]}, print)
    assert "result" in reply
    server.shutdown()
    assert server.provider is not None and server.provider._guests == {}
    again = PveServer(STOREID, {"path": str(tmp_path / "store")})
    reply = again.handle({"method": "backup_init", "args": [100, "qemu", 1_700_000_001]}, print)
    assert "result" in reply, reply  # not locked
    again.shutdown()


def test_a_refused_configuration_is_the_answer(tmp_path: Path) -> None:
    server = PveServer(STOREID, {"path": str(tmp_path), "vm-backup-mode": "sometimes"})
    reply = server.handle({"method": "job_init", "args": [1]}, print)
    assert reply["error"].startswith(f"storage '{STOREID}': invalid storage configuration: ")
    assert "sometimes" in reply["error"]
    assert server.handle({"method": "exit", "args": []}, print) == {"result": None}
    server.shutdown()


class _Recording(DirectoryBackupProvider):
    """Our provider, remembering the calls the host makes."""

    calls: list[tuple[str, Any]]

    def backup_cleanup(
        self, vmid: int, vmtype: str | None, success: bool, info: Mapping[str, Any] | None
    ) -> dict[str, Any]:
        self.calls.append(("backup_cleanup", (vmid, success, dict(info or {}))))
        return super().backup_cleanup(vmid, vmtype, success, info)

    def backup_handle_log_file(self, vmid: Any, filename: str) -> None:
        self.calls.append(("backup_handle_log_file", Path(filename).read_text()))
        super().backup_handle_log_file(vmid, filename)

    def job_init(self, start_time: int) -> None:
        self.calls.append(("job_init", start_time))
        super().job_init(start_time)

    def job_cleanup(self) -> None:
        self.calls.append(("job_cleanup", None))
        super().job_cleanup()


def test_host_cleans_up_after_a_failed_backup_init(tmp_path: Path) -> None:
    """As PVE: backup_cleanup with the error, the task log, job_cleanup."""
    storage = make_storage(tmp_path)
    calls: list[tuple[str, Any]] = []

    def new(log: Any) -> _Recording:
        p = _Recording(storage, storage.scfg, STOREID, log)
        p.calls = calls
        return p

    guest = Guest(tmp_path, {"drive-scsi0": 4 * MiB})
    host = Host(storage, STOREID, new_provider=new)
    with pytest.raises(DirbackupError, match="start time"):
        host.backup_vm(100, guest.disks, start_time=-1)
    names = [name for name, _ in calls]
    assert names == ["job_init", "backup_cleanup", "backup_handle_log_file", "job_cleanup"]
    vmid, success, info = calls[1][1]
    assert (vmid, success) == (100, False) and "start time" in info["error"]
    assert "start time" in calls[2][1]  # the task log holds the error
    assert storage.list_volumes(100) == []


def test_several_guests_in_one_job(tmp_path: Path) -> None:
    """job_init once, each guest's backup and its own task log, job_cleanup once."""
    storage = make_storage(tmp_path)
    calls: list[tuple[str, Any]] = []

    def new(log: Any) -> _Recording:
        p = _Recording(storage, storage.scfg, STOREID, log)
        p.calls = calls
        return p

    guests = {}
    for vmid in (100, 101):
        (tmp_path / str(vmid)).mkdir()
        guests[vmid] = Guest(tmp_path / str(vmid), {"drive-scsi0": 4 * MiB})
    host = Host(storage, STOREID, new_provider=new)
    with host.job(1_700_000_000):
        reports = [host.backup_vm(v, g.disks, start_time=1_700_000_000) for v, g in guests.items()]
        with pytest.raises(HostError, match="already running"), host.job():
            pass
    names = [name for name, _ in calls]
    assert names.count("job_init") == 1 and names[0] == "job_init"
    assert names.count("job_cleanup") == 1 and names[-1] == "job_cleanup"
    logs = [value for name, value in calls if name == "backup_handle_log_file"]
    assert len(logs) == 2
    assert reports[0].volid not in logs[1]
    assert reports[0].volid in logs[0]
    assert {v["volid"] for v in storage.list_volumes()} == {r.volid for r in reports}


class _ContainerChild(DirectoryBackupProvider):
    """Our provider, telling where backup_container runs."""

    fail = False
    ran_in: int | None = None

    def backup_container(
        self, vmid: int, guest_config: str, exclude_patterns: Any, info: Any
    ) -> None:
        self.ran_in = os.getpid()
        self.log("info", f"backup_container runs in process {os.getpid()}")
        if self.fail:
            raise HostError("the archive could not be written\n(disk full)")
        super().backup_container(vmid, guest_config, exclude_patterns, info)


@pytest.mark.parametrize("fail", [False, True])
def test_backup_container_runs_in_a_forked_child(tmp_path: Path, fail: bool) -> None:
    storage = make_storage(tmp_path)
    root = tmp_path / "ct"
    root.mkdir()
    (root / "etc").mkdir()
    (root / "etc" / "hostname").write_text("ct\n")
    provider = _ContainerChild(storage, storage.scfg, STOREID)
    provider.fail = fail
    lines: list[tuple[str, str]] = []
    host = Host(storage, STOREID, provider=provider, log=lambda lv, m: lines.append((lv, m)))
    provider.log_function = host.log
    if fail:
        with pytest.raises(HostError, match=r"^the archive could not be written \(disk full\)$"):
            host.backup_container(200, root, start_time=1_700_000_000)
        assert storage.list_volumes(200) == []
    else:
        report = host.backup_container(200, root, start_time=1_700_000_000)
        assert [v["volid"] for v in storage.list_volumes(200)] == [report.volid]
        assert any(m.startswith("archive archive.tar: ") for _, m in lines)
    assert provider.ran_in is None  # what the child changed stayed in the child
    child = [m for _, m in lines if m.startswith("backup_container runs in process ")]
    assert len(child) == 1 and child[0] != f"backup_container runs in process {os.getpid()}"


def test_serve_on_a_listening_socket(tmp_path: Path) -> None:
    """`pve-serve --socket PATH`: one connection after the other until "exit"."""
    from dirbackup.pveserve import serve_socket

    (tmp_path / "store").mkdir()
    path = tmp_path / "pve.sock"
    thread = threading.Thread(
        target=serve_socket,
        args=(STOREID, {"path": str(tmp_path / "store")}, str(path)),
        daemon=True,  # a failed assertion must not leave pytest waiting for it at exit
    )
    thread.start()
    try:
        for _ in range(200):
            if path.exists():
                break
            threading.Event().wait(0.01)
        assert path.stat().st_mode & 0o777 == 0o600
        for method in ("storage.list_volumes", "exit"):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.connect(str(path))
                _, reply = _call(sock, method)
                assert reply == {"result": [] if method != "exit" else None}
    finally:
        thread.join(30)
    assert not thread.is_alive() and not path.exists()
