"""Container backups through the provider, as the hypervisor runs them:
backup_container may run in a separate (unprivileged) process, so the
privileged process must find everything it needs on disk."""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

import pytest
from faultlib import python_for_others, small_tmpfs
from treeinfo import describe, differences

from dirbackup.errors import DirbackupError
from dirbackup.host import Host
from dirbackup.storage import DirectoryStorage

STOREID = "dirb"


def make_tree(root: Path) -> None:
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "hostname").write_text("ct\n")
    (root / "var" / "log").mkdir(parents=True)
    (root / "var" / "log" / "messages").write_text("log\n")
    (root / "srv" / "var" / "log").mkdir(parents=True)
    (root / "srv" / "var" / "log" / "kept").write_text("kept: not anchored at the root\n")
    (root / "cache.tmp").write_text("junk")
    (root / "data").write_bytes(os.urandom(256 * 1024))
    os.link(root / "data", root / "data-link")
    (root / "sym").symlink_to("etc/hostname")
    os.mkfifo(root / "fifo")
    os.chown(root / "etc" / "hostname", 1234, 5678)
    os.chmod(root / "data", 0o4750)


def storage(tmp_path: Path, mode: str) -> DirectoryStorage:
    store = tmp_path / "store"
    store.mkdir(exist_ok=True)
    return DirectoryStorage(STOREID, {"path": str(store), "lxc-backup-mode": mode})


@pytest.mark.parametrize("mode", ["tar", "squashfs"])
def test_backup_container_in_a_child_process(tmp_path: Path, mode: str) -> None:
    """backup_container runs in a forked child (as the hypervisor does for
    unprivileged containers); the parent publishes from what is on disk."""
    root = tmp_path / "root"
    make_tree(root)
    st = storage(tmp_path, mode)
    p = st.new_backup_provider()
    p.job_init(1000)
    archive = p.backup_init(200, "lxc", 1000)["archive-name"]
    assert p.backup_get_mechanism(200, "lxc") == "directory"
    info = {
        "directory": str(root),
        "sources": ["."],
        "backup-user-id": 100000,
        "bandwidth-limit": 0,
        "firewall-config": "[OPTIONS]\n",
    }
    p.backup_container_prepare(200, info)
    partial = st.store.partial_dir(st.backup_id(archive))
    assert partial.stat().st_uid == 100000
    pid = os.fork()
    if pid == 0:  # the child: its memory is lost when it exits
        try:
            p.backup_container(200, "arch: amd64\n", ["*.tmp", "/var/log"], info)
            os._exit(0)
        except BaseException:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    st.update_volume_attribute(f"{STOREID}:backup/{archive}", "notes", "set before cleanup")
    st.update_volume_attribute(f"{STOREID}:backup/{archive}", "protected", 1)
    stats = p.backup_cleanup(200, "lxc", True, {})
    assert stats["stats"]["archive-size"] > 256 * 1024
    p.job_cleanup()
    [vol] = st.list_volumes(200)
    assert vol["notes"] == "set before cleanup" and vol["protected"]
    volname = vol["volid"].split(":", 1)[1]
    mechanism = "tar" if mode == "tar" else "directory"
    assert p.restore_get_mechanism(volname) == (mechanism, "lxc")
    assert p.archive_get_guest_config(volname) == "arch: amd64\n"
    assert p.archive_get_firewall_config(volname) == "[OPTIONS]\n"
    target = tmp_path / "restored"
    Host(st, STOREID).restore_container(vol["volid"], target)
    # the excluded paths are gone; everything else is as it was (xattrs
    # compared only where both formats keep them)
    skip = {b"cache.tmp", b"var/log"}
    want = describe(root, skip=skip, keep_xattr=lambda name: name.startswith("user."))
    got = describe(target, keep_xattr=lambda name: name.startswith("user."))
    want.pop(b""), got.pop(b"")  # the restore target directory itself
    assert differences(want, got) == []
    assert all(r.ok for r in st.verify())


def test_restore_container_directory_mechanism_mounts_and_unmounts(tmp_path: Path) -> None:
    root = tmp_path / "root"
    make_tree(root)
    st = storage(tmp_path, "squashfs")
    report = Host(st, STOREID).backup_container(200, root, start_time=2000)
    p = st.new_backup_provider()
    volname = report.volid.split(":", 1)[1]
    info = p.restore_container_init(volname, STOREID, {})
    mounted = Path(info["archive-directory"])
    assert (mounted / "etc" / "hostname").read_text() == "ct\n"
    assert str(mounted) in Path("/proc/self/mountinfo").read_text()
    p.restore_container_cleanup(volname, STOREID, {})
    assert str(mounted) not in Path("/proc/self/mountinfo").read_text()
    assert not mounted.exists()


def test_container_failures_publish_nothing(tmp_path: Path, sock_dir: Path) -> None:
    st = storage(tmp_path, "tar")
    host = Host(st, STOREID)
    with pytest.raises(DirbackupError, match="does not exist"):
        host.backup_container(200, tmp_path / "missing")
    assert st.list_volumes() == []
    # tar fails: an unreadable directory inside the tree (as a non-root user)
    tmp_path = sock_dir  # world-searchable, unlike pytest's tmp_path
    root = tmp_path / "root"
    make_tree(root)
    python, path = python_for_others(tmp_path / "lib")
    script = f"""
import os, sys
os.setgid(65534); os.setuid(65534)
sys.path[:0] = {path!r}
from dirbackup.storage import DirectoryStorage
from dirbackup.host import Host
st = DirectoryStorage("dirb", {{"path": {str(tmp_path / "ustore")!r}}})
try:
    Host(st, "dirb").backup_container(201, {str(root)!r}, start_time=3000)
except Exception as exc:
    print("ERROR", exc)
    sys.exit(3)
"""
    ustore = tmp_path / "ustore"
    ustore.mkdir()
    os.chown(ustore, 65534, 65534)
    os.chmod(root / "etc", 0o700)  # root-owned: unreadable for nobody
    proc = subprocess.run([python, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout.startswith("ERROR") and "tar" in proc.stdout
    st2 = DirectoryStorage(STOREID, {"path": str(ustore)})
    assert st2.list_volumes() == []
    leftovers = [p.name for p in (ustore / "201").iterdir() if not p.name.startswith(".lock")]
    assert all(name.endswith(".failed") for name in leftovers), leftovers


def _untidy(target: Path) -> None:
    """What a directory may hold before a restore with --force replaces it."""
    (target / "stray").write_text("not in the backup\n")
    (target / "etc" / "stray-dir").mkdir()
    (target / "etc" / "stray-dir" / "deep").write_text("neither\n")
    (target / "etc" / "hostname").write_text("changed since\n")
    (target / "var" / "log" / "messages").unlink()
    os.chmod(target, 0o711)
    os.setxattr(target, "user.stray", b"1")
    os.utime(target, (1_000_000_000, 1_000_000_000))  # any later change shows


@pytest.mark.parametrize("where", ["directory", "mount point"])
@pytest.mark.parametrize("mode", ["tar", "squashfs"])
def test_restore_with_force_gives_exactly_the_backed_up_tree(
    tmp_path: Path, mode: str, where: str
) -> None:
    root = tmp_path / "root"
    make_tree(root)
    os.chmod(root, 0o750)
    os.setxattr(root, "user.root", b"kept")
    st = storage(tmp_path, mode)
    host = Host(st, STOREID)
    volid = host.backup_container(200, root, start_time=2000).volid
    fresh = tmp_path / "fresh"
    host.restore_container(volid, fresh)
    want = describe(fresh)
    assert want[b""].mode == 0o750 and dict(want[b""].xattrs)["user.root"] == b"kept"
    with contextlib.ExitStack() as stack:
        if where == "mount point":
            target = stack.enter_context(small_tmpfs(tmp_path / "volume", "16M"))
        else:
            target = tmp_path / "ct"
        host.restore_container(volid, target, force=True)
        _untidy(target)
        with pytest.raises(DirbackupError, match="not empty; use --force"):
            host.restore_container(volid, target)
        host.restore_container(volid, target, force=True)
        assert differences(want, describe(target)) == []
        assert sorted(p.name for p in target.parent.iterdir() if p.name.startswith(".")) == []
        assert os.path.ismount(target) == (where == "mount point")


@pytest.mark.parametrize("where", ["directory", "mount point"])
@pytest.mark.parametrize("mode", ["tar", "squashfs"])
def test_failed_restore_with_force_leaves_the_old_tree(
    tmp_path: Path, mode: str, where: str
) -> None:
    root = tmp_path / "root"
    make_tree(root)
    st = storage(tmp_path, mode)
    host = Host(st, STOREID)
    volid = host.backup_container(200, root, start_time=2000).volid
    with small_tmpfs(tmp_path / "fs", "420k") as fs:  # one restored tree fits, not two
        target = fs if where == "mount point" else fs / "ct"
        host.restore_container(volid, target, force=True)
        _untidy(target)
        before, names = describe(target), sorted(fs.iterdir())
        with pytest.raises(DirbackupError, match=r"No space left on device|Wrote only"):
            host.restore_container(volid, target, force=True)
        assert differences(before, describe(target)) == []
        assert sorted(fs.iterdir()) == names  # no staging directory left
