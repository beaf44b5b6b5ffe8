"""`dirbackup map` (instant access to a restore point) and `dirbackup mount`
/ `umount` (file-level restore), end to end, as subprocesses."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import imagefaults as faults
import pytest
from conftest import MiB
from faultlib import cli as dirbackup
from faultlib import mounts_under, servers_for, wait_for

from dirbackup import procs, qemu


def snapshot(img: Path, out: Path) -> Path:
    qemu.run(["qemu-img", "convert", "-U", "-O", "raw", str(img), str(out)])
    return out


def volids(store: Path) -> list[str]:
    return [
        b["volid"] for b in json.loads(dirbackup("list", "--store", str(store), "--json").stdout)
    ]


def store_sums(store: Path) -> dict[str, str]:
    return {
        str(p.relative_to(store)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(store.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def chain(tmp_path: Path, sock_dir: Path) -> dict[str, Path]:
    """A guest backed up twice (full, then incremental), with its disk at each
    time; compressed images (the default)."""
    return make_chain(tmp_path, sock_dir)


@pytest.fixture
def plain_chain(tmp_path: Path, sock_dir: Path) -> dict[str, Path]:
    """The same chain of uncompressed images, for damage at places
    imagefaults finds (data clusters as they are)."""
    return make_chain(tmp_path, sock_dir, "--compress", "none")


def make_chain(tmp_path: Path, sock_dir: Path, *options: str) -> dict[str, Path]:
    disk = tmp_path / "disk.qcow2"
    qemu.img_create(disk, 32 * MiB)
    qemu.io(disk, "write -P 1 0 8M", "write -P 2 20M 4M")
    store = tmp_path / "store"
    store.mkdir()
    args = ["backup", "--store", str(store), "--vmid", "100", "--disk", f"drive-scsi0={disk}"]
    args += options
    dirbackup(*args)
    t0 = snapshot(disk, tmp_path / "t0.raw")
    qemu.io(disk, "write -P 3 1M 64k", "write -z 20M 1M", "discard 22M 1M")
    dirbackup(*args)
    t1 = snapshot(disk, tmp_path / "t1.raw")
    return {"disk": disk, "store": store, "t0": t0, "t1": t1, "sock": sock_dir / "map.sock"}


class Mapping:
    """A `dirbackup map` running in the background."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dirbackup", "map", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        self.uri = self.proc.stdout.readline().strip()  # printed once it serves

    def stop(self, sig: int) -> tuple[int, str]:
        self.proc.send_signal(sig)
        _, err = self.proc.communicate(timeout=60)
        return self.proc.returncode, err


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_map_serves_each_restore_point_read_only(chain: dict[str, Path], sig: int) -> None:
    store, sock = chain["store"], chain["sock"]
    for volid, guest in zip(volids(store), (chain["t0"], chain["t1"]), strict=True):
        mapping = Mapping("--store", str(store), volid, "drive-scsi0", "--socket", str(sock))
        assert mapping.uri == f"nbd+unix:///drive-scsi0?socket={sock}"
        same, msg = qemu.img_compare(mapping.uri, guest, "raw", "raw", strict=True)
        assert same, msg
        refused = subprocess.run(
            ["qemu-io", "-f", "raw", "-c", "write 0 64k", mapping.uri],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert refused.returncode != 0 or "read-only" in refused.stdout + refused.stderr
        assert servers_for(str(sock))
        status, err = mapping.stop(sig)
        assert status == 0, err
        assert err.splitlines()[-1] == f"stopped serving {mapping.uri}"
        assert servers_for(str(sock)) == [] and not sock.exists()


def test_map_overlay_takes_the_writes_and_leaves_the_backup_untouched(
    chain: dict[str, Path], tmp_path: Path
) -> None:
    store, sock = chain["store"], chain["sock"]
    overlay = tmp_path / "overlay.qcow2"
    before = store_sums(store)
    volid = volids(store)[0]
    mapping = Mapping(
        "--store",
        str(store),
        volid,
        "drive-scsi0",
        "--socket",
        str(sock),
        "--overlay",
        str(overlay),
    )
    assert mapping.uri == f"nbd+unix:///drive-scsi0?socket={sock}"
    same, msg = qemu.img_compare(mapping.uri, chain["t0"], "raw", "raw", strict=True)
    assert same, msg
    qemu.run(
        ["qemu-io", "-f", "raw", "-c", "write -P 9 0 1M", "-c", "write -z 21M 1M", mapping.uri]
    )
    expected = tmp_path / "expected.raw"
    qemu.run(["cp", str(chain["t0"]), str(expected)])
    qemu.run(
        ["qemu-io", "-f", "raw", "-c", "write -P 9 0 1M", "-c", "write -z 21M 1M", str(expected)]
    )
    same, msg = qemu.img_compare(mapping.uri, expected, "raw", "raw", strict=True)
    assert same, msg
    status, err = mapping.stop(signal.SIGTERM)
    assert status == 0, err
    assert servers_for(str(sock)) == [] and servers_for("dirbackup-map-") == []
    assert store_sums(store) == before  # the backup was never written
    assert overlay.is_file()  # the VM's writes are kept
    out = dirbackup("verify", "--store", str(store)).stdout
    assert out.count(": ok") == 2
    # an overlay or socket that exists is refused before anything is served
    err = dirbackup(
        "map", "--store", str(store), volid, "drive-scsi0", "--socket", str(sock),
        "--overlay", str(overlay), check=1,
    ).stderr  # fmt: skip
    assert err == f"error: overlay {overlay} exists; refused (give a new file)\n"
    sock.touch()
    err = dirbackup(
        "map", "--store", str(store), volid, "drive-scsi0", "--socket", str(sock), check=1
    ).stderr
    assert err == f"error: {sock} exists; refused (give a new socket path)\n"


def test_map_refuses_a_damaged_backup_before_serving(plain_chain: dict[str, Path]) -> None:
    store, sock = plain_chain["store"], plain_chain["sock"]
    first, second = volids(store)
    (image,) = (store / "100" / first.split("/")[-1]).glob("*.qcow2")
    faults.flip_data_byte(image, 2 * MiB)
    err = dirbackup(
        "map", "--store", str(store), second, "drive-scsi0", "--socket", str(sock), check=1
    ).stderr
    name = lambda volid: volid.split(":", 1)[1]  # noqa: E731
    assert err == (
        f"error: {name(second)}: drive-scsi0: its base {name(first)} fails its check: data does "
        "not match its digests (first difference in the chunk at offset 0); refused\n"
    )
    assert not sock.exists() and servers_for(str(sock)) == []
    err = dirbackup(
        "map", "--store", str(store), second, "drive-scsi9", "--socket", str(sock), check=1
    ).stderr
    assert err == (
        f"error: backup {name(second).removeprefix('backup/')} has no disk 'drive-scsi9' "
        "(it has: drive-scsi0)\n"
    )
    # the damage is recorded: list shows the base as failed
    rows = json.loads(dirbackup("list", "--store", str(store), "--json").stdout)
    assert rows[0]["check-failed"] is not None


def test_map_fails_when_its_server_dies(chain: dict[str, Path]) -> None:
    store, sock = chain["store"], chain["sock"]
    mapping = Mapping("--store", str(store), volids(store)[0], "drive-scsi0", "--socket", str(sock))
    (server,) = servers_for(str(sock))
    os.kill(int(server.split()[0]), signal.SIGKILL)
    _, err = mapping.proc.communicate(timeout=60)
    assert mapping.proc.returncode == 1
    assert err.splitlines()[-1] == (
        f"error: qemu-nbd stopped serving {mapping.uri} (killed by signal 9 (SIGKILL))"
    )
    assert not sock.exists()


# ---------------------------------------------------------------------- mount


def loops_over(path: Path) -> list[str]:
    """Loop devices whose backing file lies below `path`."""
    out = subprocess.run(["losetup", "-a"], capture_output=True, text=True, check=False).stdout
    return [line for line in out.splitlines() if str(path) in line]


def run_dirs() -> Path:
    return Path(qemu.run_base())


def ours_left(mountpoint: Path) -> list[str]:
    """Whatever of a `dirbackup mount` still stands: its mount, and anything
    in or naming the test's own run-directory base (each test has one, see
    fs_disk) -- run directories, mounts and loop devices in them, helpers
    serving from them, recorded in a state file or not."""
    base = run_dirs()
    left = mounts_under(mountpoint) + mounts_under(base)
    left += servers_for(str(base)) + loops_over(base)
    left += [str(d) for d in base.glob("dirbackup-mount-*")]
    return left


@pytest.fixture
def fs_disk(tmp_path: Path, sock_dir: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """An ext4 disk image made with mkfs.ext4 -d, holding a known file.  The
    run directories go to a base of the test's own (its commands inherit it),
    which no other dirbackup on the machine cleans up meanwhile."""
    monkeypatch.setenv(qemu.RUN_DIR_VARIABLE, str(sock_dir / "run"))
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "known.txt").write_text("a known file\n")
    disk = tmp_path / "fs.raw"
    with open(disk, "wb") as f:
        f.truncate(64 * MiB)
    subprocess.run(["mkfs.ext4", "-q", "-d", str(tree), str(disk)], check=True)
    store = tmp_path / "store"
    store.mkdir()
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    return {"disk": disk, "store": store, "mnt": mountpoint, "tree": tree}


def backup_of(store: Path, disk: Path, *extra: str) -> str:
    dirbackup(
        "backup", "--store", str(store), "--vmid", "300", "--disk", f"drive-scsi0={disk}", *extra
    )
    return volids(store)[-1]


def assert_mounted_read_only(mountpoint: Path) -> None:
    assert (mountpoint / "etc" / "known.txt").read_text() == "a known file\n"
    with pytest.raises(OSError) as refused:
        (mountpoint / "new.txt").write_text("x")
    assert refused.value.errno == errno.EROFS


def test_mount_reads_the_file_system_and_refuses_writes(fs_disk: dict[str, Path]) -> None:
    store, mnt = fs_disk["store"], fs_disk["mnt"]
    volid = backup_of(store, fs_disk["disk"])
    before = store_sums(store)
    out = dirbackup("mount", "--store", str(store), volid, "drive-scsi0", str(mnt)).stdout
    assert out == f"drive-scsi0 of {volid} (ext4) mounted read-only on {mnt}\n"
    try:
        assert_mounted_read_only(mnt)  # the command has returned: still mounted
        options = next(
            line for line in Path("/proc/self/mountinfo").read_text().splitlines()
            if line.split()[4] == str(mnt)
        )  # fmt: skip
        assert "ro," in options and "nosuid" in options and "nodev" in options
        err = dirbackup(
            "mount", "--store", str(store), volid, "drive-scsi0", str(mnt), check=1
        ).stderr
        assert err == f"error: {mnt} is already a mount point\n"
    finally:
        out = dirbackup("umount", str(mnt)).stdout
    assert out == f"unmounted {mnt}\n"
    assert ours_left(mnt) == [] and list(mnt.iterdir()) == []
    assert store_sums(store) == before
    err = dirbackup("umount", str(mnt), check=1).stderr
    assert err == f"error: {mnt} is not mounted by dirbackup mount\n"


def test_mount_a_partition_of_a_gpt_disk(fs_disk: dict[str, Path], tmp_path: Path) -> None:
    if shutil.which("sfdisk") is None:
        pytest.skip("sfdisk (package fdisk) is not installed")
    store, mnt = fs_disk["store"], fs_disk["mnt"]
    disk = tmp_path / "gpt.raw"
    with open(disk, "wb") as f:
        f.truncate(80 * MiB)
    subprocess.run(
        ["sfdisk", "-q", "--label", "gpt", str(disk)],
        input="start=2048, size=131072, type=linux\n", text=True, check=True,
    )  # fmt: skip
    subprocess.run(
        ["dd", f"if={fs_disk['disk']}", f"of={disk}", "bs=1M", "seek=1", "conv=notrunc,sparse"],
        capture_output=True, check=True,
    )  # fmt: skip
    volid = backup_of(store, disk)
    s = ["--store", str(store), volid, "drive-scsi0", str(mnt)]
    err = dirbackup("mount", *s, check=1).stderr
    assert err == (
        f"error: drive-scsi0 of {volid} is a partitioned disk: give --partition N (it has: 1)\n"
    )
    err = dirbackup("mount", *s, "--partition", "2", check=1).stderr
    assert err == f"error: drive-scsi0 of {volid} has no partition 2 (it has: 1)\n"
    assert ours_left(mnt) == []  # a refused mount leaves nothing
    out = dirbackup("mount", *s, "--partition", "1").stdout
    assert out == f"partition 1 of drive-scsi0 of {volid} (ext4) mounted read-only on {mnt}\n"
    try:
        assert_mounted_read_only(mnt)
    finally:
        dirbackup("umount", str(mnt))
    assert ours_left(mnt) == []


def serving(mountpoint: Path) -> bool:
    """Whether a `dirbackup mount` on `mountpoint` has its helpers running."""
    for d in run_dirs().glob("dirbackup-mount-*"):
        try:
            state = json.loads((d / "state.json").read_text())
        except (OSError, ValueError):
            continue
        if state.get("mountpoint") == str(mountpoint) and "nbdfuse" in state:
            return True
    return False


@pytest.mark.parametrize(
    ("when", "next_command"),
    [("serving", "umount"), ("mounted", "umount"), ("serving", "mount")],
)
def test_kill_9_of_mount_leaves_nothing_the_next_command_does_not_clean(
    fs_disk: dict[str, Path], when: str, next_command: str
) -> None:
    """kill -9 of `mount` half-way (its helpers running) or once mounted:
    `umount` takes all down, and so does the next `mount` for what a killed
    one left half-way (its run directory's owner is dead)."""
    store, mnt = fs_disk["store"], fs_disk["mnt"]
    volid = backup_of(store, fs_disk["disk"])
    argv = ["mount", "--store", str(store), volid, "drive-scsi0", str(mnt)]
    proc = subprocess.Popen([sys.executable, "-m", "dirbackup", *argv], stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not (mounts_under(mnt) if when == "mounted" else serving(mnt)):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.002)
    proc.kill()
    proc.wait()
    assert ours_left(mnt)  # the helpers outlive it
    if next_command == "mount":
        # mounts_under(mnt) == [] here: killed before mount(8), or its mount undone
        dirbackup(*argv)
        assert_mounted_read_only(mnt)
    out = dirbackup("umount", str(mnt)).stdout
    assert out == f"unmounted {mnt}\n"
    assert ours_left(mnt) == [] and mounts_under(mnt) == []


def test_mount_of_container_backups(fs_disk: dict[str, Path]) -> None:
    """A squashfs backup's tree is mounted read-only; a tar archive is refused."""
    store, mnt, tree = fs_disk["store"], fs_disk["mnt"], fs_disk["tree"]
    base = ["backup", "--store", str(store), "--vmid", "400", "--rootfs", str(tree)]
    dirbackup(*base, "--lxc-mode", "tar")
    dirbackup(*base, "--lxc-mode", "squashfs")
    tar, squashfs = volids(store)
    err = dirbackup("mount", "--store", str(store), tar, str(mnt), check=1).stderr
    assert err == (
        f"error: {tar} is a tar archive, which cannot be mounted: restore it with "
        "`dirbackup restore --rootfs DIR`\n"
    )
    out = dirbackup("mount", "--store", str(store), squashfs, str(mnt)).stdout
    assert out == f"{squashfs} (squashfs) mounted read-only on {mnt}\n"
    try:
        assert_mounted_read_only(mnt)
    finally:
        out = dirbackup("umount", str(mnt)).stdout
    assert out == f"unmounted {mnt}\n" and mounts_under(mnt) == []
    err = dirbackup(
        "mount", "--store", str(store), squashfs, "drive-scsi0", str(mnt), check=2
    ).stderr
    assert err.splitlines()[-1] == (
        f"dirbackup mount: error: {squashfs} is a container backup: give no DEV"
    )


def test_mount_and_map_errors(fs_disk: dict[str, Path], tmp_path: Path) -> None:
    """Each refusal: its exact line and status, and nothing left behind."""
    store, mnt, tree = fs_disk["store"], fs_disk["mnt"], fs_disk["tree"]
    volid = backup_of(store, fs_disk["disk"])
    blank = tmp_path / "blank.raw"
    with open(blank, "wb") as f:
        f.truncate(8 * MiB)
    dirbackup("backup", "--store", str(store), "--vmid", "301", "--disk", f"drive-scsi0={blank}")
    dirbackup("backup", "--store", str(store), "--vmid", "400", "--rootfs", str(tree),
              "--lxc-mode", "squashfs")  # fmt: skip
    blank_volid, container = volids(store)[1:]
    s = ["--store", str(store)]
    cases: list[tuple[list[str], int, str]] = [
        (["mount", *s, volid, str(mnt)], 1,
         f"error: {volid} is a VM backup: name the disk to mount (DEV)"),
        (["mount", *s, volid, "drive-scsi0", str(tree)], 1,
         f"error: mount point {tree} is not empty"),
        (["mount", *s, volid, "drive-scsi0", str(fs_disk["disk"])], 1,
         f"error: mount point {fs_disk['disk']} is not a directory"),
        (["mount", *s, blank_volid, "drive-scsi0", str(mnt)], 1,
         f"error: drive-scsi0 of {blank_volid} holds no file system blkid knows"),
        (["mount", *s, volid, "drive-scsi0", str(mnt), "--partition", "0"], 2,
         "dirbackup mount: error: --partition takes a partition number (1 or more) of a "
         "VM's disk"),
        (["mount", *s, container, str(mnt), "--partition", "1"], 2,
         "dirbackup mount: error: --partition takes a partition number (1 or more) of a "
         "VM's disk"),
        (["map", *s, container, "drive-scsi0", "--socket", str(tmp_path / "s.sock")], 2,
         f"dirbackup map: error: {container} is a container backup: use mount"),
        (["map", *s, volid, "drive-scsi0", "--socket", str(tmp_path / "no" / "s.sock")], 1,
         f"error: {tmp_path / 'no'} is not a directory"),
    ]  # fmt: skip
    for argv, status, line in cases:
        err = dirbackup(*argv, check=status).stderr
        assert err.splitlines()[-1] == line, argv
        if status == 1:
            assert len(err.splitlines()) == 1, err
    assert ours_left(mnt) == [] and list(mnt.iterdir()) == []


def test_mount_refuses_a_damaged_backup(fs_disk: dict[str, Path]) -> None:
    store, mnt = fs_disk["store"], fs_disk["mnt"]
    # the damage is placed in the uncompressed layout (see imagefaults.LAYOUT)
    volid = backup_of(store, fs_disk["disk"], "--compress", "none")
    (image,) = (store / "300" / volid.split("/")[-1]).glob("*.qcow2")
    guest = next(e.guest for e in faults.data_entries(image))
    faults.flip_data_byte(image, guest)
    err = dirbackup("mount", "--store", str(store), volid, "drive-scsi0", str(mnt), check=1).stderr
    name = volid.split(":", 1)[1]
    assert err.startswith(f"error: {name}: drive-scsi0: ") and err.endswith("; refused\n")
    assert "data does not match its digests" in err and len(err.splitlines()) == 1
    assert ours_left(mnt) == [] and mounts_under(mnt) == []


def test_kill_9_of_map_leaves_no_server(chain: dict[str, Path], tmp_path: Path) -> None:
    """The servers die with `map`, even by SIGKILL: no qemu-nbd keeps the
    backup's files open or serves the overlay."""
    store, sock = chain["store"], chain["sock"]
    overlay = tmp_path / "overlay.qcow2"
    mapping = Mapping(
        "--store", str(store), volids(store)[0], "drive-scsi0", "--socket", str(sock),
        "--overlay", str(overlay),
    )  # fmt: skip
    assert len(servers_for(str(sock))) == 1 and servers_for(str(store))
    mapping.proc.kill()
    mapping.proc.wait()
    deadline = time.monotonic() + 30
    while servers_for(str(sock)) or servers_for(str(store)):
        assert time.monotonic() < deadline, servers_for(str(sock)) + servers_for(str(store))
        time.sleep(0.01)
    assert overlay.is_file()


@pytest.mark.parametrize(
    ("sig", "status", "said"),
    [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated (SIGTERM)")],
    ids=["SIGINT", "SIGTERM"],
)
@pytest.mark.parametrize("when", ["server started", "serving"])
def test_ctrl_c_of_mount_half_way_leaves_nothing(
    fs_disk: dict[str, Path], sig: int, status: int, said: str, when: str
) -> None:
    """Stopped as soon as its qemu-nbd runs (before the mount could record
    it), or once both helpers are recorded: nothing of it stays."""
    store, mnt = fs_disk["store"], fs_disk["mnt"]
    volid = backup_of(store, fs_disk["disk"])
    argv = ["mount", "--store", str(store), volid, "drive-scsi0", str(mnt)]
    started = {
        "server started": lambda: bool(servers_for(str(run_dirs()))),
        "serving": lambda: serving(mnt),
    }[when]
    for _ in range(5):  # until the signal comes while its helpers run
        proc = subprocess.Popen(
            [sys.executable, "-m", "dirbackup", *argv],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        while not started() and proc.poll() is None:
            time.sleep(0.0005)
        proc.send_signal(signal.SIGSTOP)
        proc.send_signal(sig)
        proc.send_signal(signal.SIGCONT)
        _, err = proc.communicate(timeout=60)
        if proc.returncode == 0:  # it had mounted already
            dirbackup("umount", str(mnt))
            continue
        assert (proc.returncode, err.splitlines()[-1]) == (status, f"error: {said}"), err
        break
    else:
        pytest.skip("mount always finished before the signal came")
    assert ours_left(mnt) == [] and mounts_under(mnt) == []


def test_umount_of_a_busy_file_system_fails_and_can_be_retried(fs_disk: dict[str, Path]) -> None:
    store, mnt = fs_disk["store"], fs_disk["mnt"]
    volid = backup_of(store, fs_disk["disk"])
    dirbackup("mount", "--store", str(store), volid, "drive-scsi0", str(mnt))
    try:
        with open(mnt / "etc" / "known.txt"):
            err = dirbackup("umount", str(mnt), check=1).stderr
            assert err == (
                f"error: {mnt} is in use: close what uses it and run dirbackup umount again\n"
            )
            assert_mounted_read_only(mnt)  # nothing taken down under it
    finally:
        dirbackup("umount", str(mnt))
    assert ours_left(mnt) == []


@pytest.mark.parametrize(("kind", "size", "mkfs"), [
    ("vfat", 64 * MiB, ["mkfs.vfat"]),
    ("xfs", 320 * MiB, ["mkfs.xfs", "-q"]),
])  # fmt: skip
def test_mount_of_vfat_and_xfs(
    fs_disk: dict[str, Path], tmp_path: Path, kind: str, size: int, mkfs: list[str]
) -> None:
    """Other file systems than ext4 (xfs with norecovery: no log replay)."""
    if shutil.which(mkfs[0]) is None:
        pytest.skip(f"{mkfs[0]} is not installed")
    store, mnt = fs_disk["store"], fs_disk["mnt"]
    disk = tmp_path / f"{kind}.raw"
    with open(disk, "wb") as f:
        f.truncate(size)
    subprocess.run([*mkfs, str(disk)], capture_output=True, check=True)
    filling = tmp_path / "filling"
    filling.mkdir()
    if subprocess.run(["mount", "-o", "loop", str(disk), str(filling)], check=False).returncode:
        pytest.skip(f"cannot loop-mount {kind} here")
    try:
        (filling / "etc").mkdir()
        (filling / "etc" / "known.txt").write_text("a known file\n")
    finally:
        subprocess.run(["umount", str(filling)], check=True)
    volid = backup_of(store, disk)
    out = dirbackup("mount", "--store", str(store), volid, "drive-scsi0", str(mnt)).stdout
    assert out == f"drive-scsi0 of {volid} ({kind}) mounted read-only on {mnt}\n"
    try:
        assert_mounted_read_only(mnt)
        line = next(
            x for x in Path("/proc/self/mountinfo").read_text().splitlines()
            if x.split()[4] == str(mnt)
        )  # fmt: skip
        assert (kind != "xfs") or "norecovery" in line
    finally:
        dirbackup("umount", str(mnt))
    assert ours_left(mnt) == []


def test_a_helper_never_recorded_is_stopped_with_its_stale_run_directory(
    fs_disk: dict[str, Path], tmp_path: Path
) -> None:  # fs_disk: for its private run-directory base
    """A `mount` killed between starting its qemu-nbd and recording it leaves a
    server that only its command line ties to the run directory: the next
    command's cleanup of stale run directories stops it too."""
    base = run_dirs()
    base.mkdir(parents=True, exist_ok=True)
    rundir = base / "dirbackup-mount-stale"
    rundir.mkdir()
    dead = subprocess.Popen(["true"])
    line = procs.owner_line(dead.pid)
    dead.wait()
    (rundir / qemu.OWNER).write_text(line)  # its owner is gone
    image = tmp_path / "img.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "1M"], check=True)
    server = subprocess.Popen(
        ["qemu-nbd", "--read-only", "--persistent", f"--socket={rundir / 'nbd.sock'}", str(image)],
        start_new_session=True,
    )
    try:
        wait_for(lambda: (rundir / "nbd.sock").exists())
        assert servers_for(str(rundir))
        assert qemu.clean_stale_rundirs(str(base)) == [str(rundir)]  # what make_rundir runs
        server.wait(timeout=30)  # stopped (TimeoutExpired if it still served)
        assert servers_for(str(rundir)) == [] and not rundir.exists()
    finally:
        server.kill()
        server.wait()
