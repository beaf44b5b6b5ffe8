"""`dirbackup map` (instant access to a restore point) and `dirbackup mount`
/ `umount` (file-level restore), end to end, as subprocesses."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import imagefaults as faults
import pytest
from conftest import MiB
from faultlib import servers_for

from dirbackup import qemu


def dirbackup(*args: str, check: int | None = 0) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "dirbackup", *args], capture_output=True, text=True, timeout=300
    )
    if check is not None:
        assert proc.returncode == check, (proc.returncode, proc.stdout, proc.stderr)
    return proc


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
    """A guest backed up twice (full, then incremental), with its disk at each time."""
    disk = tmp_path / "disk.qcow2"
    qemu.img_create(disk, 32 * MiB)
    qemu.io(disk, "write -P 1 0 8M", "write -P 2 20M 4M")
    store = tmp_path / "store"
    store.mkdir()
    args = ["backup", "--store", str(store), "--vmid", "100", "--disk", f"drive-scsi0={disk}"]
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


def test_map_refuses_a_damaged_backup_before_serving(chain: dict[str, Path]) -> None:
    store, sock = chain["store"], chain["sock"]
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
        f"error: backup {name(second)} has no disk 'drive-scsi9' (it has: drive-scsi0)\n"
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
