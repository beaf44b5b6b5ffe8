"""Reliability: what a VM restore writes into, and what it never touches.

A target inside the store (by real path, also through symlinks) and a target
another process uses (an image QEMU holds its lock on; a block device that is
mounted or held exclusively) are refused, even with --force.  Both engines
write a file target under a temporary name: a full file system, Ctrl-C or
SIGTERM leave the old target as it was and no partial file.  A raw disk whose
size is not a multiple of 512 bytes comes back to the byte."""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import assert_same
from faultlib import (
    MiB,
    backup_args,
    cli,
    cli_popen,
    leftovers,
    mounts_under,
    rundirs_of,
    servers_for,
    small_tmpfs,
    store_files,
    wait_for,
)
from guests import STOREID

from dirbackup import qemu
from dirbackup.storage import DirectoryStorage

DEV = "drive-scsi0"
ENGINES = ["dirbackup", "qemu-img"]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Backup:
    """A store with one backup of a qcow2 disk of `size` bytes (data all over)."""

    def __init__(self, root: Path, size: int) -> None:
        self.root = root
        self.store = root / "store"
        self.store.mkdir()
        self.image = root / "disk.qcow2"
        qemu.img_create(self.image, size)
        qemu.io(self.image, f"write -P 0x5a 0 {size}", f"write -P 0x11 {MiB} 64k")
        cli(*backup_args(self.store, 100, self.image, device=DEV))
        self.storage = DirectoryStorage(STOREID, {"path": str(self.store)})
        self.volid = self.storage.list_volumes(100)[0]["volid"]

    @property
    def raw(self) -> Path:
        """The disk as raw, to compare restores with."""
        raw = self.root / "disk.raw"
        if not raw.exists():
            qemu.run(["qemu-img", "convert", "-O", "raw", str(self.image), str(raw)])
        return raw

    def restore(
        self, target: Path, *extra: str, check: int | None = 0
    ) -> subprocess.CompletedProcess[str]:
        return cli(
            "restore", "--store", self.store, "--storeid", STOREID, self.volid,
            "--disk", f"{DEV}={target}", *extra, check=check,
        )  # fmt: skip

    def restore_popen(self, target: Path, *extra: str) -> subprocess.Popen[str]:
        return cli_popen(
            "restore", "--store", self.store, "--storeid", STOREID, self.volid,
            "--disk", f"{DEV}={target}", *extra,
        )  # fmt: skip


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Backup:
    return Backup(tmp_path_factory.mktemp("small"), 8 * MiB)


@pytest.fixture(scope="module")
def large(tmp_path_factory: pytest.TempPathFactory) -> Backup:
    """Large enough that a restore is still copying a few tenths of a second in."""
    return Backup(tmp_path_factory.mktemp("large"), 512 * MiB)


def old_target(path: Path, size: int = 4 * MiB) -> str:
    path.write_bytes(random.Random(7).randbytes(size))
    return sha(path)


def refused(proc: subprocess.CompletedProcess[str], reason: str) -> None:
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and reason in lines[0], proc.stderr


# ---------------------------------------------------------------------- targets in the store


def test_target_inside_the_store_is_refused(small: Backup, tmp_path: Path) -> None:
    before = store_files(small.storage, 100)
    image = next(small.store.glob(f"100/*/{DEV}.qcow2"))
    outside = tmp_path / "link-to-store"
    outside.symlink_to(small.store / "100")
    into_image = tmp_path / "looks-harmless.raw"
    into_image.symlink_to(image)
    for target in (
        small.store / "new.raw",  # the store's own directory
        image.parent / "x.raw",  # a backup's directory
        image,  # a backup image itself
        outside / "y.raw",  # through a symlinked directory
        into_image,  # a symlink to a backup image
    ):
        for engine in ENGINES:
            proc = small.restore(target, "--force", "--engine", engine, check=None)
            refused(proc, f"restore target {target} lies inside the backup store; refused")
    bind = tmp_path / "same-store-elsewhere"
    bind.mkdir()
    if subprocess.run(["mount", "--bind", str(small.store), str(bind)], check=False).returncode:
        pytest.skip("cannot bind-mount")
    try:  # another path to the same directory: caught by device and inode
        proc = small.restore(bind / "z.raw", "--force", check=None)
        refused(proc, f"restore target {bind / 'z.raw'} lies inside the backup store; refused")
    finally:
        subprocess.run(["umount", str(bind)], check=True)
    assert store_files(small.storage, 100) == before
    assert leftovers(small.store) == []
    assert not (small.store / "new.raw").exists()


# ---------------------------------------------------------------------- targets in use


@contextlib.contextmanager
def qemu_io_holding(image: Path) -> Iterator[None]:
    """qemu-io with the image open (and locked) until the block ends."""
    proc = subprocess.Popen(
        ["qemu-io", "-f", "raw", str(image)],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: qemu.image_locked(image), 30)
        yield
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("holder", ["qemu-nbd", "qemu-io"])
def test_target_qemu_holds_is_refused_even_with_force(
    small: Backup, tmp_path: Path, sock_dir: Path, holder: str
) -> None:
    target = tmp_path / "vm-disk.raw"
    digest = old_target(target)
    if holder == "qemu-nbd":
        holding = qemu.serve_nbd(target, str(sock_dir / "t.sock"), fmt="raw")
    else:
        holding = qemu_io_holding(target)
    with holding:
        for engine in ENGINES:
            for fmt in ("raw", "qcow2"):
                proc = small.restore(
                    target, "--force", "--engine", engine, "--format", fmt, check=None
                )
                refused(proc, f"restore target {target} is in use by QEMU")
    assert sha(target) == digest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vm-disk.raw"]
    small.restore(target, "--force")  # released: restored
    assert_same(small.raw, target)


@contextlib.contextmanager
def loop_device(backing: Path) -> Iterator[Path]:
    proc = subprocess.run(
        ["losetup", "--find", "--show", str(backing)], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        pytest.skip(f"no loop device: {proc.stderr.strip()}")
    dev = Path(proc.stdout.strip())
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", str(dev)], capture_output=True, check=False)


def test_block_device_in_use_is_refused_even_with_force(small: Backup, tmp_path: Path) -> None:
    backing = tmp_path / "lun.img"
    backing.write_bytes(bytes(16 * MiB))
    subprocess.run(["mkfs.ext4", "-q", "-F", str(backing)], capture_output=True, check=True)
    digest = sha(backing)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with loop_device(backing) as dev:
        # mounted
        subprocess.run(["mount", "-o", "ro", str(dev), str(mnt)], capture_output=True, check=True)
        try:
            for engine in ENGINES:
                proc = small.restore(dev, "--force", "--engine", engine, check=None)
                refused(proc, f"restore target {dev} is in use (mounted, or held open exclusively")
        finally:
            subprocess.run(["umount", str(mnt)], capture_output=True, check=True)
        # held open exclusively by another process (as LVM, md or a running restore do)
        fd = os.open(dev, os.O_RDONLY | os.O_EXCL)
        try:
            for engine in ENGINES:
                proc = small.restore(dev, "--force", "--engine", engine, check=None)
                refused(proc, f"restore target {dev} is in use (mounted, or held open exclusively")
        finally:
            os.close(fd)
        assert sha(backing) == digest
        small.restore(dev, "--force")  # free: restored
    restored = backing.read_bytes()
    assert restored[: 8 * MiB] == small.raw.read_bytes()
    assert restored[8 * MiB :] != bytes(8 * MiB)  # the rest of the device as it was


# ---------------------------------------------------------------------- atomic file targets


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_full_file_system_leaves_the_old_target(
    small: Backup, tmp_path: Path, engine: str, fmt: str
) -> None:
    with small_tmpfs(tmp_path / "fs", "6M") as fs:
        target = fs / "disk.img"
        digest = old_target(target)  # 4 MiB: the 8 MiB disk does not fit beside it
        proc = small.restore(target, "--force", "--engine", engine, "--format", fmt, check=1)
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and "No space left on device" in last, proc.stderr
        assert "Traceback" not in proc.stderr
        assert sha(target) == digest
        assert sorted(p.name for p in fs.iterdir()) == ["disk.img"]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize(
    ("sig", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"]
)
def test_signal_during_restore_leaves_the_old_target(
    large: Backup, tmp_path: Path, engine: str, sig: int, status: int
) -> None:
    target = tmp_path / "disk.raw"
    digest = old_target(target)
    proc = large.restore_popen(target, "--force", "--engine", engine)
    temporary = tmp_path / f".disk.raw.restore-{proc.pid}"
    made: list[Path] = []

    def copying() -> bool:
        made[:] = rundirs_of(proc.pid)
        return proc.poll() is not None or (
            temporary.exists() and temporary.stat().st_blocks * 512 >= 16 * MiB
        )

    wait_for(copying, 60)
    assert proc.poll() is None, "the restore ended before it could be interrupted"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == status, err
    assert err.strip().splitlines()[-1] == (
        "error: terminated (SIGTERM)" if sig == signal.SIGTERM else "error: interrupted"
    )
    assert sha(target) == digest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk.raw"]
    if engine == "qemu-img":
        assert made  # its NBD export and FUSE mount
    assert [m for d in made for m in mounts_under(d)] == []
    assert [d for d in made if d.exists()] == []
    assert servers_for(str(large.store)) == []


# ---------------------------------------------------------------------- sizes


@pytest.mark.parametrize("mechanism", ["nbd", "file-handle"])
def test_raw_disk_of_any_size_comes_back_to_the_byte(tmp_path: Path, mechanism: str) -> None:
    size = 5 * MiB + 313  # not a multiple of 512: qemu-nbd exports 199 zero bytes more
    disk = tmp_path / "odd.raw"
    data = bytearray(random.Random(3).randbytes(size))
    data[2 * MiB : 3 * MiB] = bytes(MiB)  # a zero run, and data up to the last byte
    disk.write_bytes(data)
    store = tmp_path / "store"
    store.mkdir()
    cli(*backup_args(store, 100, disk, "--mechanism", mechanism, device=DEV))
    storage = DirectoryStorage(STOREID, {"path": str(store)})
    (volume,) = storage.list_volumes(100)
    assert [r.ok for r in storage.verify(volume["volid"])] == [True]
    base = ["--store", store, "--storeid", STOREID, volume["volid"]]
    for engine in ENGINES:
        for existing in (False, True):
            target = tmp_path / f"{engine}.raw"
            if existing:
                target.write_bytes(b"\xff" * (size + 4096))
            cli("restore", *base, "--disk", f"{DEV}={target}", "--engine", engine, "--force")
            assert target.stat().st_size == size
            assert target.read_bytes() == data
        qcow = tmp_path / f"{engine}.qcow2"
        cli("restore", *base, "--disk", f"{DEV}={qcow}", "--engine", engine, "--format", "qcow2")
        assert qemu.img_info(qcow)["virtual-size"] == size + 199  # whole sectors, zero tail
        assert qemu.img_check(qcow).get("corruptions", 0) == 0
        same, msg = qemu.img_compare(disk, qcow, "raw", "qcow2")
        assert same, msg
        plain = tmp_path / f"{engine}-from-qcow2.raw"
        qemu.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(qcow), str(plain)])
        assert plain.read_bytes()[:size] == data and plain.stat().st_size == size + 199
