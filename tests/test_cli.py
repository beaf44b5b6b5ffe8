"""The command line, end to end, as a subprocess."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import MiB, assert_same
from faultlib import cli as dirbackup
from faultlib import mounts_under, rundirs_of, servers_for
from guests import store_bitmap

from dirbackup import qemu
from dirbackup.storage import DirectoryStorage


@pytest.fixture
def vm(tmp_path: Path) -> dict[str, Path]:
    disk0 = tmp_path / "disk0.qcow2"
    qemu.img_create(disk0, 32 * MiB)
    qemu.io(disk0, "write -P 1 0 8M", "write -P 2 20M 4M")
    disk1 = tmp_path / "disk1.raw"
    with open(disk1, "wb") as f:
        f.truncate(8 * MiB)
        f.seek(MiB)
        f.write(os.urandom(MiB))
    store = tmp_path / "store"
    store.mkdir()
    return {"disk0": disk0, "disk1": disk1, "store": store, "tmp": tmp_path}


def snapshot(img: Path, out: Path) -> Path:
    qemu.run(["qemu-img", "convert", "-U", "-O", "raw", str(img), str(out)])
    return out


def test_full_incremental_restore_cycle(vm: dict[str, Path]) -> None:
    s = ["--store", str(vm["store"])]
    disks = ["--disk", f"drive-scsi0={vm['disk0']}", "--disk", f"drive-scsi1={vm['disk1']}"]
    conf = vm["tmp"] / "100.conf"
    conf.write_text("memory: 512\n")
    out = dirbackup(
        "backup", *s, "--vmid", "100", *disks, "--config", str(conf), "--notes", "first"
    ).stdout
    assert "drive-scsi0 full, drive-scsi1 full" in out
    t0 = snapshot(vm["disk0"], vm["tmp"] / "t0.raw")
    qemu.io(vm["disk0"], "write -P 3 1M 64k", "write -z 20M 1M", "discard 22M 1M")
    t1 = snapshot(vm["disk0"], vm["tmp"] / "t1.raw")
    out = dirbackup("backup", *s, "--vmid", "100", *disks, "--bwlimit", "1G").stdout
    assert "drive-scsi0 incremental, drive-scsi1 full" in out and "dirty" in out
    listing = json.loads(dirbackup("list", *s, "--json").stdout)
    assert [b["parent"] for b in listing] == [None, listing[0]["volid"]]
    assert set(listing[0]) == {
        "volid",
        "vmid",
        "subtype",
        "ctime",
        "size",
        "format",
        "parent",
        "notes",
        "protected",
        "check-failed",
        "compress",
    }
    assert listing[0]["notes"] == "first" and listing[0]["protected"] is False
    assert listing[0]["check-failed"] is None
    plain = dirbackup("list", *s).stdout.splitlines()
    assert plain[0].split() == [
        "VOLID",
        "TYPE",
        "CREATED",
        "SIZE",
        "PARENT",
        "PROT",
        "CHECK",
        "NOTES",
    ]
    assert "MiB" in plain[1] and plain[1].rstrip().endswith("first")
    assert dirbackup("verify", *s).stdout.count(": ok") == 2
    # three spellings of a volume id
    ids = [
        listing[0]["volid"],
        listing[0]["volid"].split(":")[1],
        listing[1]["volid"].split("backup/")[1],
    ]
    for n, (volid, state) in enumerate(zip(ids, [t0, t0, t1], strict=True)):
        target = vm["tmp"] / f"r{n}.raw"
        dirbackup(
            "restore",
            *s,
            volid,
            "--disk",
            f"drive-scsi0={target}",
            "--disk",
            f"drive-scsi1={vm['tmp'] / f'r{n}-1.raw'}",
        )
        assert_same(state, target)
        assert_same(vm["disk1"], vm["tmp"] / f"r{n}-1.raw")
    q = vm["tmp"] / "r.qcow2"
    dirbackup("restore", *s, ids[2], "--disk", f"drive-scsi0={q}", "--format", "qcow2")
    assert_same(t1, q, "raw", "qcow2")
    viaqemu = vm["tmp"] / "qemu.raw"
    dirbackup("restore", *s, ids[2], "--disk", f"drive-scsi0={viaqemu}", "--engine", "qemu-img")
    assert_same(t1, viaqemu)
    assert dirbackup("notes", *s, ids[0]).stdout == "first\n"
    dirbackup("notes", *s, ids[0], "changed")
    assert dirbackup("notes", *s, ids[0]).stdout == "changed\n"
    dirbackup("protect", *s, ids[0])
    assert "protected" in dirbackup("remove", *s, ids[0], check=1).stderr
    dirbackup("protect", *s, ids[0], "--off")
    out = dirbackup("remove", *s, ids[0]).stdout
    assert "merged into 100/" in out
    restored = vm["tmp"] / "after-remove.raw"
    dirbackup("restore", *s, ids[2], "--disk", f"drive-scsi0={restored}")
    assert_same(t1, restored)


def test_prune_command(vm: dict[str, Path]) -> None:
    s = ["--store", str(vm["store"])]
    for _ in range(3):
        qemu.io(vm["disk0"], "write -P 9 0 64k")
        dirbackup("backup", *s, "--vmid", "100", "--disk", f"drive-scsi0={vm['disk0']}")
    dry = [
        json.loads(line)
        for line in dirbackup(
            "prune", *s, "--vmid", "100", "--keep-last", "1", "--dry-run", "--json"
        ).stdout.splitlines()
    ]
    assert [e["mark"] for e in dry] == ["keep", "remove", "remove"]
    assert len(json.loads(dirbackup("list", *s, "--json").stdout)) == 3
    res = dirbackup("prune", *s, "--vmid", "100", "--keep-last", "1")
    assert "removed 2 of 3 backups" in res.stderr
    left = json.loads(dirbackup("list", *s, "--json").stdout)
    assert len(left) == 1 and left[0]["parent"] is None
    assert dirbackup("prune", *s, "--vmid", "100", check=2).returncode == 2
    bad = dirbackup(
        "prune", *s, "--vmid", "100", "--keep-last", "1", "--lock-timeout", "-1", check=2
    )
    assert "invalid number of seconds '-1'" in bad.stderr


def test_container_backup_and_restore(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    root = tmp_path / "ct"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "hostname").write_text("ct\n")
    (root / "tmp").mkdir()
    (root / "tmp" / "junk.tmp").write_text("x")
    s = ["--store", str(store)]
    for mode in ("tar", "squashfs"):
        out = dirbackup(
            "backup",
            *s,
            "--vmid",
            "200",
            "--rootfs",
            str(root),
            "--exclude",
            "*.tmp",
            "--lxc-mode",
            mode,
        ).stdout
        volid = out.split(":", 2)[0] + ":" + out.split(":", 2)[1]
        target = tmp_path / f"restored-{mode}"
        dirbackup("restore", *s, volid, "--rootfs", str(target))
        assert (target / "etc" / "hostname").read_text() == "ct\n"
        assert not (target / "tmp" / "junk.tmp").exists()
        proc = dirbackup("restore", *s, volid, "--rootfs", str(target), check=1)
        assert "is not empty; use --force" in proc.stderr
        a_file = tmp_path / "a-file"
        a_file.write_text("keep")
        proc = dirbackup("restore", *s, volid, "--rootfs", str(a_file), check=1)
        assert f"restore target {a_file} is not a directory" in proc.stderr
        assert a_file.read_text() == "keep"
    assert dirbackup("verify", *s).stdout.count(": ok") == 2


@pytest.mark.parametrize(
    ("args", "status", "needle"),
    [
        (["list", "--store", "/nonexistent"], 1, "does not exist"),
        (
            ["restore", "--store", "{store}", "100/../../etc", "--disk", "a=b"],
            1,
            "invalid volume name",
        ),
        (["restore", "--store", "{store}", "100/qemu-1", "--disk", "a=b"], 1, "does not exist"),
        (
            ["restore", "--store", "{store}", "other:backup/100/qemu-1", "--disk", "a=b"],
            1,
            "not this store",
        ),
        (
            ["backup", "--store", "{store}", "--vmid", "100", "--disk", "drive-scsi0=/nonexistent"],
            1,
            "does not exist",
        ),
        (
            ["backup", "--store", "{store}", "--vmid", "100", "--disk", "../x=/dev/null"],
            1,
            "invalid device name",
        ),
        (["backup", "--store", "{store}", "--vmid", "abc", "--disk", "a=b"], 2, "invalid guest"),
        (["backup", "--store", "{store}", "--vmid", "1", "--disk", "nodev"], 2, "DEV=PATH"),
        (["backup", "--store", "{store}", "--vmid", "1"], 2, "required"),
        (
            ["backup", "--store", "{store}", "--vmid", "1", "--disk", "a=b", "--bwlimit", "fast"],
            2,
            "not a size",
        ),
        (["frobnicate"], 2, "invalid choice"),
        ([], 2, "required"),
    ],
)
def test_errors(vm: dict[str, Path], args: list[str], status: int, needle: str) -> None:
    args = [a.replace("{store}", str(vm["store"])) for a in args]
    proc = dirbackup(*args, check=status)
    assert needle in proc.stderr
    assert "Traceback" not in proc.stderr
    if status == 1:
        assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1


def test_restore_errors(vm: dict[str, Path]) -> None:
    s = ["--store", str(vm["store"])]
    out = dirbackup("backup", *s, "--vmid", "100", "--disk", f"drive-scsi0={vm['disk0']}").stdout
    volid = out.split(":", 2)[0] + ":" + out.split(":", 2)[1]
    existing = vm["tmp"] / "exists.raw"
    existing.write_bytes(b"precious")
    proc = dirbackup("restore", *s, volid, "--disk", f"drive-scsi0={existing}", check=1)
    assert "exists; use --force" in proc.stderr
    assert existing.read_bytes() == b"precious"
    proc = dirbackup("restore", *s, volid, "--disk", f"drive-nope={vm['tmp'] / 'x'}", check=1)
    assert "has no disk drive-nope (it has: drive-scsi0)" in proc.stderr
    proc = dirbackup("restore", *s, volid, "--rootfs", str(vm["tmp"] / "ct"), check=2)
    assert "is a VM backup" in proc.stderr
    proc = dirbackup("--debug", "restore", *s, "100/qemu-1", "--disk", "a=b", check=None)
    assert proc.returncode == 1 and "Traceback" in proc.stderr


def test_restore_targets_are_all_checked_before_anything_is_written(vm: dict[str, Path]) -> None:
    s = ["--store", str(vm["store"])]
    disks = ["--disk", f"drive-scsi0={vm['disk0']}", "--disk", f"drive-scsi1={vm['disk1']}"]
    volid = dirbackup("backup", *s, "--vmid", "100", *disks).stdout.split(": ", 1)[0]
    first = vm["tmp"] / "first.raw"
    existing = vm["tmp"] / "exists.raw"
    existing.write_bytes(b"precious")
    cases = [
        (f"drive-scsi1={existing}", "exists; use --force"),
        (f"drive-scsi1={first}", "drive-scsi0 and drive-scsi1 are both to be restored into"),
        (f"drive-scsi1={vm['tmp']}", "is a directory"),
        (f"drive-scsi1={vm['tmp'] / 'no' / 'such.raw'}", "/no is not a directory"),
    ]
    for second, message in cases:
        proc = dirbackup(
            "restore", *s, volid, "--disk", f"drive-scsi0={first}", "--disk", second, check=None
        )
        assert proc.returncode == 1 and message in proc.stderr, (second, proc.stderr)
        assert proc.stderr.count("\n") == 1
        assert not first.exists()  # the first disk was not restored half-way
    assert existing.read_bytes() == b"precious"
    assert sorted(p.name for p in vm["tmp"].iterdir() if p.name.startswith(".")) == []


def test_restore_into_block_devices(
    vm: dict[str, Path], loop_device: Callable[[int], Path]
) -> None:
    s = ["--store", str(vm["store"])]
    out = dirbackup("backup", *s, "--vmid", "100", "--disk", f"drive-scsi0={vm['disk0']}").stdout
    volid = out.split(": ", 1)[0]
    dev = loop_device(32 * MiB)
    with open(dev, "r+b") as f:  # old content that the restore must overwrite, holes included
        f.write(b"\xee" * (32 * MiB))
    proc = dirbackup("restore", *s, volid, "--disk", f"drive-scsi0={dev}", check=1)
    assert "exists; use --force" in proc.stderr
    proc = dirbackup(
        "restore",
        *s,
        volid,
        "--format",
        "qcow2",
        "--force",
        "--disk",
        f"drive-scsi0={dev}",
        check=1,
    )
    assert "only raw restores go there" in proc.stderr
    dirbackup("restore", *s, volid, "--force", "--disk", f"drive-scsi0={dev}")
    assert_same(vm["disk0"], dev, "qcow2", "raw")
    small = loop_device(16 * MiB)
    with open(small, "r+b") as f:
        f.write(b"\xdd" * MiB)
    proc = dirbackup("restore", *s, volid, "--force", "--disk", f"drive-scsi0={small}", check=1)
    assert "is smaller than the disk" in proc.stderr
    with open(small, "rb") as f:
        assert f.read(MiB) == b"\xdd" * MiB  # untouched


def test_help_explains() -> None:
    out = dirbackup("--help").stdout
    for cmd in (
        "backup",
        "list",
        "restore",
        "verify",
        "prune",
        "remove",
        "notes",
        "protect",
        "demo",
    ):
        assert cmd in out
    out = dirbackup("backup", "--help").stdout
    assert "--bwlimit" in out and "dirty bitmap" in out


def processes_using(path: Path) -> list[str]:
    """Command lines of running processes that name `path`."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if str(path) in cmd and "pytest" not in cmd:
            found.append(cmd)
    return found


@pytest.mark.parametrize(
    ("sig", "status", "said"),
    [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated (SIGTERM)")],
    ids=["SIGINT", "SIGTERM"],
)
@pytest.mark.parametrize("mechanism", ["nbd", "file-handle"])
def test_ctrl_c_stops_and_unmounts_everything(
    vm: dict[str, Path], mechanism: str, sig: int, status: int, said: str
) -> None:
    """Ctrl-C, and SIGTERM alike: helpers and mounts gone, no partial backup,
    the failed backup's log kept, the bitmap still tracking every change."""
    import time

    s = ["--store", str(vm["store"])]
    disk = ["--disk", f"drive-scsi0={vm['disk0']}"]
    dirbackup("backup", *s, "--vmid", "100", *disk)
    qemu.io(vm["disk0"], "write -P 5 0 16M")
    bitmaps_before = qemu.bitmaps(vm["disk0"])
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dirbackup",
            "backup",
            *s,
            "--vmid",
            "100",
            *disk,
            "--mechanism",
            mechanism,
            "--bwlimit",
            "4M",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    partial = None
    for _ in range(200):  # wait until the copy runs
        partial = next((p for p in (vm["store"] / "100").glob(".*.partial")), None)
        if partial is not None and any(partial.glob("*.qcow2")):
            break
        time.sleep(0.05)
    time.sleep(0.5)
    made = rundirs_of(proc.pid)  # this backup's sockets and mount points
    assert made
    if mechanism == "file-handle":
        assert any(mounts_under(d) for d in made)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == status and err.strip().splitlines()[-1] == f"error: {said}"
    assert processes_using(vm["disk0"]) == []
    assert [m for d in made for m in mounts_under(d)] == []
    assert [d for d in made if d.exists()] == []
    assert not list((vm["store"] / "100").glob(".*.partial"))
    (log,) = (vm["store"] / "100").glob("*.failed/backup.log")
    assert said in log.read_text()
    assert len(json.loads(dirbackup("list", *s, "--json").stdout)) == 1
    assert qemu.bitmaps(vm["disk0"]) == bitmaps_before  # not cleared: changes still tracked
    state = snapshot(vm["disk0"], vm["tmp"] / "now.raw")
    out = dirbackup("backup", *s, "--vmid", "100", *disk).stdout
    assert "drive-scsi0 incremental" in out
    volid = json.loads(dirbackup("list", *s, "--json").stdout)[-1]["volid"]
    target = vm["tmp"] / "after.raw"
    dirbackup("restore", *s, volid, "--disk", f"drive-scsi0={target}")
    assert_same(state, target)


def test_bitmap_made_for_a_failed_backup_is_dropped(vm: dict[str, Path]) -> None:
    """A bitmap created for a backup that then fails only knows the changes since it
    was made: it must not be reused on top of the older backup."""
    import signal
    import time

    s = ["--store", str(vm["store"])]
    disk = ["--disk", f"drive-scsi0={vm['disk0']}"]
    dirbackup("backup", *s, "--vmid", "100", *disk)
    storage = DirectoryStorage("dirbackup", {"path": str(vm["store"])})
    name = store_bitmap(storage, "drive-scsi0")
    qemu.bitmap(vm["disk0"], "remove", name)  # lost, e.g. by an image copied around
    qemu.io(vm["disk0"], "write -P 6 2M 1M")  # a change no bitmap saw
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dirbackup",
            "backup",
            *s,
            "--vmid",
            "100",
            *disk,
            "--bwlimit",
            "2M",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    for _ in range(200):
        if any((vm["store"] / "100").glob(".*.partial/*.qcow2")):
            break
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=30)
    assert proc.returncode == 130
    prefix = storage.new_backup_provider().bitmap_prefix()
    assert not [b for b in qemu.bitmaps(vm["disk0"]) if b["name"].startswith(prefix)]
    qemu.io(vm["disk0"], "write -P 7 10M 64k")
    state = snapshot(vm["disk0"], vm["tmp"] / "state.raw")
    out = dirbackup("backup", *s, "--vmid", "100", *disk).stdout
    assert "drive-scsi0 full" in out
    volid = json.loads(dirbackup("list", *s, "--json").stdout)[-1]["volid"]
    target = vm["tmp"] / "r.raw"
    dirbackup("restore", *s, volid, "--disk", f"drive-scsi0={target}")
    assert_same(state, target)


def test_dead_fuse_mount_of_a_killed_backup_is_cleaned_up_by_the_next_run(
    vm: dict[str, Path], sock_dir: Path
) -> None:
    """kill -9 of a backup and of its nbdfuse leaves a dead FUSE mount (stat
    fails with ENOTCONN) in the backup's run directory: the next run detaches
    and removes it -- and leaves alone the mounts it did not make.  The run
    directories go to a base of this test's own, which no other dirbackup on
    the machine cleans up meanwhile."""
    import errno
    import time

    base = sock_dir / "run"
    env = {**os.environ, qemu.RUN_DIR_VARIABLE: str(base)}
    s = ["--store", str(vm["store"])]
    disk = ["--disk", f"drive-scsi0={vm['disk0']}"]
    foreign = base / "not-ours"
    foreign.mkdir(parents=True)
    if subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(foreign)], check=False).returncode:
        pytest.skip("cannot mount a tmpfs")
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dirbackup", "backup", *s, "--vmid", "100", *disk,
             "--mechanism", "file-handle", "--bwlimit", "1M"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while not [m for d in rundirs_of(proc.pid, base) for m in mounts_under(d)]:
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.02)
        (rundir,) = rundirs_of(proc.pid, base)
        (mount,) = mounts_under(rundir)
        proc.send_signal(signal.SIGSTOP)
        for line in servers_for(str(rundir)):
            if "nbdfuse" in line:
                os.kill(int(line.split()[0]), signal.SIGKILL)
        proc.kill()
        proc.wait()
        with pytest.raises(OSError) as dead:
            os.stat(mount)
        assert dead.value.errno == errno.ENOTCONN
        assert mounts_under(rundir) == [mount]
        next_run = subprocess.run(
            [sys.executable, "-m", "dirbackup", "backup", *s, "--vmid", "100", *disk],
            capture_output=True, text=True, env=env, timeout=300,
        )  # fmt: skip
        assert next_run.returncode == 0, next_run.stderr
        assert mounts_under(rundir) == [] and not rundir.exists()
        assert mounts_under(foreign) == [str(foreign)]  # not ours: untouched
    finally:
        subprocess.run(["umount", str(foreign)], check=False)
        for d in rundirs_of(proc.pid, base):  # what a failed check may have left
            for m in mounts_under(d):
                subprocess.run(["umount", "-l", m], check=False)
