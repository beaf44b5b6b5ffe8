"""Reliability: faults of the source a backup reads.

EIO from an nbdkit server (error filter at a rate; a shell plugin failing one
range), EIO at one guest offset of a real incremental export (qemu-nbd over
QEMU's blkdebug), a server killed in the middle of the copy (nbdkit with the
delay filter; the host's own qemu-nbd under the command line), and sources
shorter than the hypervisor said.  Every time: a clear error naming the device
and the offset, no partial backup left or listed, `previous-info` byte for
byte as before, the guest's bitmap as before, and the next incremental
restores to exactly the guest."""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest
from faultlib import (
    MiB,
    NbdKit,
    assert_store_sound,
    backup_args,
    cli,
    cli_popen,
    has_nbdkit_filter,
    leftovers,
    partial_dirs,
    provider_backup,
    servers_for,
    store_state,
    volids,
    wait_for,
)
from guests import STOREID, Guest, make_storage, restore_and_compare, store_bitmap

from dirbackup import qemu
from dirbackup.errors import IOTimeout, StoreError
from dirbackup.host import Host
from dirbackup.storage import DirectoryStorage

DEV = "drive-scsi0"
SIZE = 16 * MiB
NBD_ERROR = re.compile(
    rf"(?:reading|querying) nbd\+unix:///{DEV}\?socket=\S+ at offset (\d+): .*"
    r"(Input/output error|Transport endpoint is not connected|closed the connection"
    r"|Connection reset|Broken pipe)",
    re.IGNORECASE,
)


class Scene:
    """A guest with one full backup and changes since; what must not move."""

    def __init__(self, tmp_path: Path, sock_dir: Path) -> None:
        self.tmp = tmp_path
        self.sock_dir = sock_dir
        self.storage = make_storage(tmp_path)
        self.guest = Guest(tmp_path, {DEV: SIZE})
        self.host = Host(self.storage, STOREID)
        self.first = self.host.backup_vm(100, self.guest.disks, start_time=1000).volid
        self.guest.change(DEV, "write -P 0x31 1M 3M", "write -z 9M 1M", "discard 12M 1M")
        self.state = self.guest.snapshot()[DEV]
        self.image = self.guest.disks[0].path
        self.bitmap = store_bitmap(self.storage, DEV)
        self.before = self.snapshot()

    def fleecing(self) -> Path:
        """A copy of the guest's state for a server to serve (the provider
        discards what it copied from a writable source, like the hypervisor's
        fleecing image)."""
        copy = self.tmp / "fleecing.raw"
        copy.unlink(missing_ok=True)
        qemu.run(["cp", "--sparse=always", str(self.state), str(copy)])
        return copy

    def snapshot(self) -> tuple[object, ...]:
        return store_state(self.storage, 100, self.image, self.bitmap, self.sock_dir)

    def assert_untouched(self) -> None:
        """Nothing of the failed backup remains, and nothing else moved."""
        assert not partial_dirs(self.storage, 100)
        assert not leftovers(self.storage.store.root)
        assert self.snapshot() == self.before
        assert assert_store_sound(self.storage) == [self.first]
        assert not servers_for(str(self.tmp))

    def next_incremental_is_exact(self) -> None:
        report = self.host.backup_vm(100, self.guest.disks, start_time=3000)
        assert report.bitmap_modes == {DEV: "reuse"}
        assert self.storage.list_volumes(100)[-1]["parent"] == self.first
        restore_and_compare(self.storage, report.volid, {DEV: self.state}, self.tmp)
        assert_store_sound(self.storage)


@pytest.fixture
def scene(tmp_path: Path, sock_dir: Path) -> Scene:
    return Scene(tmp_path, sock_dir)


def once(region: tuple[int, int]) -> object:
    """A next-dirty-region callback yielding one region, then None."""
    regions = iter([region])
    return lambda: next(regions, None)


def expect_nbd_error(err: BaseException | None, request: int) -> int:
    assert isinstance(err, OSError), err
    m = NBD_ERROR.search(str(err))
    assert m, str(err)
    offset = int(m.group(1))
    assert offset < SIZE and offset % request == 0, str(err)
    return offset


@pytest.mark.parametrize("rate", ["100%", "10%"])
def test_eio_at_a_rate_from_nbdkit(scene: Scene, sock_dir: Path, rate: str) -> None:
    if not has_nbdkit_filter("error"):
        pytest.skip("nbdkit error filter missing")
    # the hypervisor's snapshot of the disk, served by nbdkit failing reads at a rate
    with NbdKit(
        sock_dir / "kit.sock",
        ["file", str(scene.fleecing()), "error=EIO", f"error-pread-rate={rate}"],
        ["error"],
    ) as kit:
        volumes = {DEV: {"size": SIZE, "bitmap-mode": "new", "nbd-path": str(kit.socket)}}
        err = provider_backup(scene.storage, 100, volumes, 2000, request_size=64 * 1024)
    expect_nbd_error(err, 64 * 1024)
    assert "Input/output error" in str(err)
    scene.assert_untouched()
    failed = scene.storage.store.guest_dir(100) / "qemu-2000.failed"
    assert not failed.exists() or not (failed / "manifest.json").exists()
    scene.next_incremental_is_exact()


def test_eio_on_one_range_from_nbdkit(scene: Scene, sock_dir: Path) -> None:
    bad_start, bad_end = 5 * MiB + 4096, 5 * MiB + 8192
    source = scene.fleecing()
    script = sock_dir / "flaky.sh"
    script.write_text(
        f"""#!/bin/sh
case "$1" in
  get_size) stat -L -c %s '{source}' ;;
  pread)
    if [ "$4" -lt {bad_end} ] && [ $(( $4 + $3 )) -gt {bad_start} ]; then
      echo "EIO bad sector" >&2; exit 1
    fi
    exec dd if='{source}' skip="$4" count="$3" iflag=skip_bytes,count_bytes status=none ;;
  *) exit 2 ;;
esac
"""
    )
    script.chmod(0o755)
    with NbdKit(sock_dir / "kit.sock", ["sh", str(script)]) as kit:
        volumes = {DEV: {"size": SIZE, "bitmap-mode": "new", "nbd-path": str(kit.socket)}}
        err = provider_backup(scene.storage, 100, volumes, 2000, request_size=1 * MiB)
    offset = expect_nbd_error(err, 1 * MiB)
    assert offset <= bad_start < offset + 1 * MiB, str(err)
    scene.assert_untouched()
    scene.next_incremental_is_exact()


def test_eio_at_one_guest_offset_of_a_real_incremental(scene: Scene, sock_dir: Path) -> None:
    """qemu-nbd exporting the guest with its bitmap, over QEMU's blkdebug driver
    failing reads of one host sector that holds dirty guest data."""
    bad_guest = 2 * MiB + 12288
    host_map = qemu.run(["qemu-img", "map", "--output=json", "-U", str(scene.image)])
    host = next(
        e["offset"] + bad_guest - e["start"]
        for e in json.loads(host_map)
        if e["start"] <= bad_guest < e["start"] + e["length"] and e.get("data")
    )
    conf = sock_dir / "blkdebug.conf"
    conf.write_text(
        f'[inject-error]\nevent = "read_aio"\nerrno = "5"\nsector = "{host // 512}"\nonce = "off"\n'
    )
    opts = (
        f"driver=qcow2,file.driver=blkdebug,file.config={conf},"
        f"file.image.driver=file,file.image.filename={scene.image}"
    )
    server = qemu.start_nbd(
        None, str(sock_dir / "bd.sock"), export=DEV, fmt=None, image_opts=opts, bitmap=scene.bitmap
    )
    try:
        volumes = {
            DEV: {
                "size": SIZE,
                "bitmap-mode": "reuse",
                "nbd-path": server.socket,
                "bitmap-name": scene.bitmap,
            }
        }
        err = provider_backup(scene.storage, 100, volumes, 2000, request_size=256 * 1024)
    finally:
        server.stop()
    offset = expect_nbd_error(err, 256 * 1024)
    if "Input/output error" in str(err):
        assert offset <= bad_guest < offset + 256 * 1024, str(err)
    else:  # qemu-nbd drops the client when a read fails in the middle of a reply
        assert re.search(r"Transport endpoint is not connected|closed the connection", str(err))
    scene.assert_untouched()
    scene.next_incremental_is_exact()


def test_nbdkit_killed_during_the_copy(scene: Scene, sock_dir: Path) -> None:
    if not has_nbdkit_filter("delay"):
        pytest.skip("nbdkit delay filter missing")
    source = scene.fleecing()
    with NbdKit(sock_dir / "kit.sock", ["file", str(source), "rdelay=200ms"], ["delay"]) as kit:
        volumes = {DEV: {"size": SIZE, "bitmap-mode": "new", "nbd-path": str(kit.socket)}}
        threading.Timer(0.3, kit.kill).start()
        err = provider_backup(scene.storage, 100, volumes, 2000, request_size=256 * 1024)
    expect_nbd_error(err, 256 * 1024)
    scene.assert_untouched()
    scene.next_incremental_is_exact()


def test_snapshot_access_killed_under_the_command_line(scene: Scene) -> None:
    """The host's own qemu-nbd dies while the CLI copies: exit 1, clear error."""
    store = scene.storage.scfg.path
    proc = cli_popen(*backup_args(store, "100", scene.image, "--bwlimit", "2M", device=DEV))
    try:
        # once the copy runs (the image exists in the partial backup)
        wait_for(
            lambda: [p for p in partial_dirs(scene.storage, 100) if (p / f"{DEV}.qcow2").exists()]
        )
        for server in servers_for(str(scene.image)):
            os.kill(int(server.split()[0]), signal.SIGKILL)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1, (out, err)
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: "), err
    expect_nbd_error(OSError(last), 4096)
    scene.assert_untouched()
    scene.next_incremental_is_exact()


def test_export_shorter_than_declared(scene: Scene, sock_dir: Path) -> None:
    with NbdKit(sock_dir / "kit.sock", ["file", str(scene.fleecing())]) as kit:
        volumes = {DEV: {"size": SIZE + MiB, "bitmap-mode": "new", "nbd-path": str(kit.socket)}}
        err = provider_backup(scene.storage, 100, volumes, 2000)
    assert err is not None and DEV in str(err)
    assert f"the export has {SIZE} bytes, the hypervisor said {SIZE + MiB}" in str(err)
    scene.assert_untouched()
    scene.next_incremental_is_exact()


def test_file_handle_truncated_after_the_size_query(scene: Scene) -> None:
    """file-handle mechanism: the disk shrinks between the size query and the copy."""
    raw = scene.tmp / "shrinking.raw"
    raw.write_bytes(scene.state.read_bytes())
    fd = os.open(raw, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size  # the hypervisor's size query
        os.truncate(raw, size - 3 * MiB)
        volumes = {
            DEV: {
                "size": size,
                "bitmap-mode": "new",
                "file-handle": fd,
                "next-dirty-region": once((0, size)),
            }
        }
        err = provider_backup(scene.storage, 100, volumes, 2000)
    finally:
        os.close(fd)
    assert isinstance(err, OSError), err
    m = re.search(rf"reading {DEV} \(file handle\) at offset (\d+): premature end", str(err))
    assert m, str(err)
    assert size - 3 * MiB - 4 * MiB <= int(m.group(1)) <= size - 3 * MiB, str(err)
    scene.assert_untouched()
    scene.next_incremental_is_exact()


def test_slow_source_is_still_exact(scene: Scene, sock_dir: Path) -> None:
    """nbdkit's delay filter on every read and block status: slower, not different."""
    if not has_nbdkit_filter("delay"):
        pytest.skip("nbdkit delay filter missing")
    source = scene.fleecing()
    with NbdKit(
        sock_dir / "kit.sock",
        ["file", str(source), "rdelay=40ms", "delay-extents=40ms"],
        ["delay"],
    ) as kit:
        volumes = {DEV: {"size": SIZE, "bitmap-mode": "new", "nbd-path": str(kit.socket)}}
        assert provider_backup(scene.storage, 100, volumes, 2000, request_size=MiB) is None
    volid = volids(scene.storage)[-1]
    assert volid.endswith("qemu-2000")
    restore_and_compare(scene.storage, volid, {DEV: scene.state}, scene.tmp)
    assert_store_sound(scene.storage)


def test_connection_already_dead_is_reported_as_such(tmp_path: Path, sock_dir: Path) -> None:
    """A copy that starts on a connection the server has dropped: ENOTCONN
    naming the source and offset, not libnbd's EINVAL for a dead handle."""
    import errno

    import nbd as libnbd

    from dirbackup import copy, extents, nbd

    raw = tmp_path / "src.raw"
    raw.write_bytes(os.urandom(MiB))
    kit = NbdKit(sock_dir / "kit.sock", ["file", str(raw)])
    uri = nbd.unix_uri(str(kit.socket), DEV)
    h = nbd.connect(uri)
    kit.stop()
    with pytest.raises(libnbd.Error):  # libnbd notices: the handle goes DEAD
        h.pread(4096, 0)
    out = os.open(tmp_path / "out.raw", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        with pytest.raises(OSError) as exc:
            copy.copy_regions(
                copy.NBDSource([h], uri), copy.FileTarget(out), extents.from_pairs([(0, MiB)])
            )
    finally:
        os.close(out)
    assert exc.value.errno == errno.ENOTCONN, exc.value
    expect_nbd_error(exc.value, 4096)


def test_raw_disk_truncated_during_the_backup(tmp_path: Path) -> None:
    """A raw disk cut short while the CLI copies it (qemu-nbd then reads the
    missing tail as zeros; the direct read meets the end of the file): the
    backup must fail, not keep those zeros."""
    storage = make_storage(tmp_path)
    raw = tmp_path / "disk.raw"
    raw.write_bytes(os.urandom(8 * MiB))
    store = ["--store", storage.scfg.path, "--storeid", STOREID]
    disk = ["--vmid", "100", "--disk", f"{DEV}={raw}"]
    proc = cli_popen("backup", *store, *disk, "--bwlimit", "2M")
    try:
        wait_for(lambda: [p for p in partial_dirs(storage, 100) if (p / f"{DEV}.qcow2").exists()])
        os.truncate(raw, 4 * MiB)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1, (out, err)
    short = "premature end of file: the source is shorter than its declared size"
    assert ("changed size" in err or short in err) and DEV in err, err
    assert volids(storage) == [] and not leftovers(Path(storage.scfg.path))
    assert not servers_for(str(tmp_path))
    cli("backup", *store, *disk)
    [volid] = assert_store_sound(storage)
    restore_and_compare(storage, volid, {DEV: raw}, tmp_path)


# ---------------------------------------------------------------------- sources that stop answering


@pytest.mark.parametrize(
    ("phase", "delay", "said"),
    [
        ("connect", "delay-open=60", rf"no answer for 2 s connecting to nbd\+unix:///{DEV}\?"),
        ("map", "delay-extents=60", rf"no progress for 2 s querying base:allocation of {DEV}"),
        ("copy", "rdelay=60", rf"no progress for 2 s reading nbd\+unix:///{DEV}\?socket=\S+ into"),
    ],
    ids=["connect", "map", "copy"],
)
def test_source_that_stops_answering_times_out(
    scene: Scene, sock_dir: Path, phase: str, delay: str, said: str
) -> None:
    """nbdkit answers the handshake, block status or reads only after a minute:
    the backup gives up after the I/O timeout (2 s here) with a clear error,
    instead of waiting while it holds the guest's lock."""
    if not has_nbdkit_filter("delay"):
        pytest.skip("nbdkit delay filter missing")
    with NbdKit(sock_dir / "kit.sock", ["file", str(scene.fleecing()), delay], ["delay"]) as kit:
        volumes = {DEV: {"size": SIZE, "bitmap-mode": "new", "nbd-path": str(kit.socket)}}
        began = time.monotonic()
        err = provider_backup(scene.storage, 100, volumes, 2000, io_timeout=2)
        took = time.monotonic() - began
    assert isinstance(err, IOTimeout), repr(err)
    assert re.search(said, str(err)) and "(I/O timeout)" in str(err), str(err)
    assert 2 <= took < 15, took
    scene.assert_untouched()
    scene.next_incremental_is_exact()


def test_slow_but_moving_source_does_not_time_out(scene: Scene, sock_dir: Path) -> None:
    """Reads of 0.6 s each, and waits for a bandwidth limit longer than the I/O
    timeout: progress, so no timeout."""
    if not has_nbdkit_filter("delay"):
        pytest.skip("nbdkit delay filter missing")
    source = scene.fleecing()
    with NbdKit(sock_dir / "kit.sock", ["file", str(source), "rdelay=600ms"], ["delay"]) as kit:
        volumes = {DEV: {"size": SIZE, "bitmap-mode": "new", "nbd-path": str(kit.socket)}}
        err = provider_backup(scene.storage, 100, volumes, 2000, request_size=4 * MiB, io_timeout=1)
    assert err is None, err
    store = scene.storage.scfg.path
    scene.guest.change(DEV, "write -P 0x44 0 2M")
    state = scene.guest.snapshot()[DEV]
    cli(*backup_args(store, "100", scene.image, "--bwlimit", "1M", "--io-timeout", "1", device=DEV))
    volid = volids(scene.storage)[-1]
    restore_and_compare(scene.storage, volid, {DEV: state}, scene.tmp)


@pytest.mark.parametrize("mechanism", ["nbd", "file-handle"])
def test_stopped_snapshot_access_times_out_under_the_command_line(
    scene: Scene, mechanism: str
) -> None:
    """The host's own qemu-nbd is stopped (SIGSTOP) while the CLI copies: exit 1
    with the timeout's error, the stopped server gone, nothing published, the
    guest's lock free for the next backup."""
    store = scene.storage.scfg.path
    args = ["--bwlimit", "2M", "--io-timeout", "2", "--mechanism", mechanism]
    proc = cli_popen(*backup_args(store, "100", scene.image, *args, device=DEV))
    try:
        wait_for(
            lambda: [p for p in partial_dirs(scene.storage, 100) if (p / f"{DEV}.qcow2").exists()]
        )
        for server in servers_for(str(scene.image)):
            os.kill(int(server.split()[0]), signal.SIGSTOP)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1, (out, err)
    last = err.strip().splitlines()[-1]
    source = rf"nbd\+unix:///{DEV}\?socket=\S+" if mechanism == "nbd" else rf"{DEV} \(file handle\)"
    assert re.fullmatch(rf"error: no progress for 2 s reading {source} into \S+: .*", last), err
    assert servers_for(str(scene.image)) == []
    scene.assert_untouched()
    scene.next_incremental_is_exact()


def test_io_timeout_is_configurable(tmp_path: Path) -> None:
    store = tmp_path / "s"
    store.mkdir()
    st = DirectoryStorage(STOREID, {"path": str(store), "io-timeout": "2.5"})
    assert st.new_backup_provider().io_timeout == 2.5
    assert Host(st, STOREID).io_timeout == 2.5
    assert DirectoryStorage(STOREID, {"path": str(store)}).new_backup_provider().io_timeout == 60
    with pytest.raises(StoreError, match="io-timeout must be a number of seconds >= 0, not '-1'"):
        DirectoryStorage(STOREID, {"path": str(store), "io-timeout": "-1"})
    proc = cli(*backup_args(store, "100", tmp_path / "x", "--io-timeout", "soon"), check=2)
    assert "invalid number of seconds 'soon'" in proc.stderr
