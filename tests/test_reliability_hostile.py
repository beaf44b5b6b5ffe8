"""Reliability: hostile input is refused, and nothing outside the store is
ever read or served.

Files placed in a real store: qcow2 images whose backing file points outside
the guest's directory, to /etc/shadow, to json: and nbd: names, to itself or
round in a cycle, with an external data file, with headers that lie about
sizes and tables, truncated; symlinks in place of images, configs, archives
and whole backups; manifests and previous-info records that name files
outside.  Volume ids with `..`, absolute paths, NUL bytes and huge numbers,
through the storage plugin, the provider and the command line; `nbdinfo
--map` text that is truncated, overlapping, out of order or absurd.  (The
qcow2 reader and the map parsers are fuzzed in test_reliability_fuzz.py.)"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from faultlib import MiB, cli, servers_for, volids
from guests import STOREID, Guest, make_storage, restore_and_compare

from dirbackup import extents, qcow2, qemu
from dirbackup.errors import DirbackupError, MapFormatError
from dirbackup.host import Disk, Host
from dirbackup.storage import DirectoryStorage, PruneError

DEV = "drive-scsi0"
SIZE = 16 * MiB


class HostileStore:
    """Guest 100 with a full and an incremental backup, guest 101 with one, and
    a qcow2 image and a secret file outside the store.  Built once per module
    and copied for each test that damages it."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.storage = DirectoryStorage(STOREID, {"path": str(tmp_path / "store")})
        self.root = Path(self.storage.scfg.path)
        self.guest = Guest.existing(tmp_path / "g100", [DEV])
        self.outside = tmp_path / "outside.qcow2"
        self.secret = tmp_path / "secret"
        self.full, self.incr = (f"{STOREID}:backup/100/qemu-{t}" for t in (1000, 2000))
        self.other = f"{STOREID}:backup/101/qemu-1500"
        self.states = {v: tmp_path / f"state-{i}.raw" for i, v in enumerate((self.full, self.incr))}

    @classmethod
    def build(cls, tmp_path: Path) -> HostileStore:
        storage = make_storage(tmp_path)
        host = Host(storage, STOREID)
        for vmid, starts in ((100, (1000, 2000)), (101, (1500,))):
            root = tmp_path / f"g{vmid}"
            root.mkdir()
            guest = Guest(root, {DEV: SIZE})
            for i, t in enumerate(starts):
                guest.change(DEV, f"write -P 0x{t // 100:02x} {t // 1000}M 1M")
                state = guest.snapshot()[DEV]
                host.backup_vm(vmid, guest.disks, start_time=t)
                if vmid == 100:
                    os.rename(state, tmp_path / f"state-{i}.raw")
        qemu.img_create(tmp_path / "outside.qcow2", SIZE)
        qemu.io(tmp_path / "outside.qcow2", "write -P 0x99 0 16M")
        (tmp_path / "secret").write_text("root:$6$secret\n")
        hs = cls(tmp_path)
        assert volids(hs.storage) == [hs.full, hs.incr, hs.other]
        return hs

    def copy(self, dst: Path) -> HostileStore:
        shutil.copytree(self.tmp, dst, symlinks=True, dirs_exist_ok=True)
        return HostileStore(dst)

    def image(self, volid: str) -> Path:
        return Path(self.storage.path(volid)[0]) / f"{DEV}.qcow2"

    def rebase(self, volid: str, backing: str, fmt: str = "qcow2") -> None:
        rebase = ["qemu-img", "rebase", "-u", "-f", "qcow2", "-b", backing, "-F", fmt]
        qemu.run([*rebase, str(self.image(volid))])

    def assert_refused(self, volid: str, needle: str) -> str:
        """Every way of reading the disk refuses it, and nothing is served."""
        volname = volid.split(":", 1)[1]
        provider = self.storage.new_backup_provider()
        with pytest.raises(DirbackupError, match=needle) as exc:
            provider.restore_vm_volume_init(volname, DEV, {})
        assert not provider._restores
        assert not servers_for(str(self.tmp)), servers_for(str(self.tmp))
        target = self.tmp / "target.raw"
        for engine in ("dirbackup", "qemu-img"):
            with pytest.raises(DirbackupError, match=needle):
                Host(self.storage, STOREID).restore_vm(
                    volid,
                    {DEV: target},
                    engine=engine,  # type: ignore[arg-type]
                )
            assert not target.exists()
        proc = cli(
            "restore", "--store", self.root, "--storeid", STOREID, volid,
            "--disk", f"{DEV}={target}", check=1,
        )  # fmt: skip
        assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
        assert not target.exists()
        [result] = self.storage.verify(volid)
        assert not result.ok, result
        # the rest of the store is still listed
        assert self.other in volids(self.storage)
        return str(exc.value)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> HostileStore:
    return HostileStore.build(tmp_path_factory.mktemp("hostile"))


@pytest.fixture
def hs(template: HostileStore, tmp_path: Path) -> HostileStore:
    """A store of one's own to damage."""
    return template.copy(tmp_path)


@pytest.fixture
def shared(template: HostileStore) -> HostileStore:
    """The template itself, for tests that must not change anything."""
    return template


# ---------------------------------------------------------------------- backing files


def test_backing_in_another_guests_directory(hs: HostileStore) -> None:
    other = Path(hs.storage.path(hs.other)[0]) / f"{DEV}.qcow2"
    hs.rebase(hs.incr, os.path.relpath(other, hs.image(hs.incr).parent))
    hs.assert_refused(hs.incr, "outside the allowed directory")


@pytest.mark.parametrize(
    ("name", "fmt", "needle"),
    [
        ("/etc/shadow", "raw", "outside the allowed directory|not qcow2"),
        ("/etc/shadow", "qcow2", "outside the allowed directory"),
        ("{secret}", "qcow2", "outside the allowed directory"),
        ("../../../secret", "qcow2", "outside the allowed directory"),
        ('json:{"driver":"file","filename":"/etc/shadow"}', "raw", "protocol or json"),
        ('json:{"driver":"file","filename":"/etc/shadow"}', "qcow2", "protocol or json"),
        (
            'json:{"driver":"qcow2","file":{"driver":"file","filename":"{outside}"}}',
            "qcow2",
            "json",
        ),
        ("nbd:unix:/tmp/x.sock", "raw", "protocol"),
        ("nbd:unix:/tmp/x.sock", "qcow2", "protocol"),
        ("nbd+unix:///drive?socket=/tmp/x.sock", "qcow2", "protocol"),
        ("file:/etc/shadow", "qcow2", "protocol"),
    ],
)
def test_backing_names_that_escape(hs: HostileStore, name: str, fmt: str, needle: str) -> None:
    name = name.replace("{secret}", str(hs.secret)).replace("{outside}", str(hs.outside))
    hs.rebase(hs.incr, name, fmt)
    message = hs.assert_refused(hs.incr, needle if fmt == "qcow2" else f"{needle}|not qcow2")
    assert f"{DEV}.qcow2" in message
    restore_and_compare(hs.storage, hs.full, {DEV: hs.states[hs.full]}, hs.tmp)


def test_backing_cycles(hs: HostileStore) -> None:
    hs.rebase(hs.incr, f"{DEV}.qcow2")  # itself
    hs.assert_refused(hs.incr, "cycle")
    hs.rebase(hs.incr, f"../{hs.full.rsplit('/', 1)[1]}/{DEV}.qcow2")
    hs.rebase(hs.full, f"../{hs.incr.rsplit('/', 1)[1]}/{DEV}.qcow2")
    hs.assert_refused(hs.incr, "cycle")
    hs.assert_refused(hs.full, "cycle")


def test_external_data_file(hs: HostileStore) -> None:
    data = hs.tmp / "data.raw"
    img = hs.tmp / "with-data-file.qcow2"
    create = ["qemu-img", "create", "-q", "-f", "qcow2"]
    qemu.run([*create, "-o", f"data_file={data},data_file_raw=on", str(img), str(SIZE)])
    shutil.copy(img, hs.image(hs.full))
    hs.assert_refused(hs.full, "external data file")


# ---------------------------------------------------------------------- lying and truncated images


def patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def header(path: Path) -> qcow2.Header:
    return qcow2.read_header(path)


LIES: dict[str, tuple[Callable[[Path], None], str]] = {
    "virtual size larger than the manifest's": (
        lambda p: patch(p, 24, struct.pack(">Q", 2 * SIZE)),
        "virtual size",
    ),
    "virtual size beyond what the L1 table maps": (
        lambda p: patch(p, 24, struct.pack(">Q", 1 << 50)),
        "L1 table size",
    ),
    "L1 table beyond the end of the file": (
        lambda p: patch(p, 40, struct.pack(">Q", 1 << 40)),
        "L1 table offset",
    ),
    "L1 table offset misaligned": (
        lambda p: patch(p, 40, struct.pack(">Q", header(p).l1_offset + 8)),
        "L1 table offset",
    ),
    "huge L1 table": (lambda p: patch(p, 36, struct.pack(">I", 1 << 28)), "L1 table size"),
    "refcount table beyond the end": (
        lambda p: patch(p, 48, struct.pack(">Q", 1 << 40)),
        "refcount table offset",
    ),
    "cluster size of 1 GiB": (lambda p: patch(p, 20, struct.pack(">I", 30)), "cluster_bits"),
    "backing name beyond the end": (
        lambda p: patch(p, 8, struct.pack(">QI", 1 << 40, 20)),
        "beyond the end|backing file name",
    ),
    "unknown incompatible feature": (
        lambda p: patch(p, 72, struct.pack(">Q", 1 << 20)),
        "incompatible",
    ),
    "L2 table beyond the end": (
        lambda p: patch(p, header(p).l1_offset, struct.pack(">Q", (1 << 63) | (1 << 45))),
        "L2 table offset",
    ),
    "truncated in the middle": (
        lambda p: os.truncate(p, p.stat().st_size // 2),
        "offset|truncated|beyond",
    ),
    "truncated to the header": (lambda p: os.truncate(p, 100), "truncated|header|magic"),
    "empty": (lambda p: os.truncate(p, 0), "magic"),
}


@pytest.mark.parametrize("lie", sorted(LIES))
def test_lying_and_truncated_images(hs: HostileStore, lie: str) -> None:
    damage, needle = LIES[lie]
    damage(hs.image(hs.full))
    hs.assert_refused(hs.full, needle)
    hs.assert_refused(hs.incr, needle)  # its base is damaged


def test_data_cluster_beyond_the_end_of_a_qemu_image(hs: HostileStore) -> None:
    """An image made by QEMU (data before the tables) cut in its data."""
    img = hs.image(hs.full)
    qemu.run(["qemu-img", "convert", "-O", "qcow2", str(hs.guest.disks[0].path), str(img) + ".q"])
    os.replace(str(img) + ".q", img)
    h = header(img)
    with open(img, "rb") as f:
        f.seek(h.l1_offset)
        l2 = struct.unpack(">Q", f.read(8))[0] & 0x00FFFFFFFFFFFE00
        f.seek(l2)
        entries = struct.unpack(">8192Q", f.read(65536))
    data = max(e & 0x00FFFFFFFFFFFE00 for e in entries)
    assert data > l2
    os.truncate(img, data)
    hs.assert_refused(hs.full, "invalid host offset|offset")


# ---------------------------------------------------------------------- symlinks and records


def test_image_replaced_by_a_symlink(hs: HostileStore) -> None:
    img = hs.image(hs.full)
    img.unlink()
    img.symlink_to(hs.outside)
    hs.assert_refused(hs.full, "outside the allowed directory|symbolic link")


def test_config_replaced_by_a_symlink(hs: HostileStore) -> None:
    conf = Path(hs.storage.path(hs.full)[0]) / "guest.conf"
    conf.unlink()
    conf.symlink_to(hs.secret)
    provider = hs.storage.new_backup_provider()
    with pytest.raises(DirbackupError, match=r"guest\.conf"):
        provider.archive_get_guest_config(hs.full.split(":")[1])
    fw = conf.with_name("firewall.conf")
    fw.symlink_to(hs.secret)
    with pytest.raises(DirbackupError, match=r"firewall\.conf"):
        provider.archive_get_firewall_config(hs.full.split(":")[1])
    [result] = hs.storage.verify(hs.full)
    assert not result.ok
    assert all("root:$6$" not in p for p in result.problems)


def test_backup_directory_replaced_by_a_symlink(hs: HostileStore) -> None:
    outside = hs.tmp / "outside-backup"
    shutil.copytree(hs.storage.path(hs.full)[0], outside)
    link = hs.root / "100" / "qemu-3000"
    link.symlink_to(outside)
    assert f"{STOREID}:backup/100/qemu-3000" not in volids(hs.storage)
    provider = hs.storage.new_backup_provider()
    with pytest.raises(DirbackupError):
        provider.restore_vm_volume_init("backup/100/qemu-3000", DEV, {})
    with pytest.raises(DirbackupError):
        provider.archive_get_guest_config("backup/100/qemu-3000")
    assert not servers_for(str(hs.tmp))
    # prune does the rest, reports the link and fails at the end
    with pytest.raises(PruneError, match=r"qemu-3000: named like a backup, but not a directory"):
        hs.storage.prune_backups("keep-last=1", vmid=100)
    assert outside.is_dir() and any(outside.iterdir())
    assert volids(hs.storage, 100) == [hs.incr]


def test_container_archive_replaced_by_a_symlink(tmp_path: Path) -> None:
    storage = make_storage(tmp_path)
    rootfs = tmp_path / "rootfs"
    rootfs.mkdir()
    (rootfs / "file").write_text("data\n")
    volid = Host(storage, STOREID).backup_container(200, rootfs, start_time=1000).volid
    archive = Path(storage.path(volid)[0]) / "archive.tar"
    evil = tmp_path / "evil.tar"
    subprocess.run(["tar", "-cf", str(evil), "-C", "/etc", "hostname"], check=True)
    archive.unlink()
    archive.symlink_to(evil)
    provider = storage.new_backup_provider()
    with pytest.raises(DirbackupError, match=r"archive\.tar"):
        provider.restore_container_init(volid.split(":")[1], {})
    assert not storage.verify(volid)[0].ok


@pytest.mark.parametrize(
    "field",
    ["file-absolute", "file-dotdot", "parent", "size", "digest_chunk", "garbage"],
)
def test_hostile_manifest(hs: HostileStore, field: str) -> None:
    path = Path(hs.storage.path(hs.incr)[0]) / "manifest.json"
    m = json.loads(path.read_text())
    disk = m["disks"][DEV]
    if field == "file-absolute":
        disk["file"] = str(hs.outside)
    elif field == "file-dotdot":
        disk["file"] = f"../../101/{hs.other.rsplit('/', 1)[1]}/{DEV}.qcow2"
    elif field == "parent":
        disk["parent"] = m["parent"] = "backup/100/../../etc"
    elif field == "size":
        disk["size"] = 1 << 62
    elif field == "digest_chunk":
        disk["digest_chunk"] = 0
    path.write_text("{not json" if field == "garbage" else json.dumps(m))
    # the store is still listed and verified; this backup fails verify
    listed = volids(hs.storage)
    assert hs.full in listed and hs.other in listed
    results = {r.volid: r for r in hs.storage.verify()}
    assert results[hs.full].ok and results[hs.other].ok
    assert hs.incr not in results or not results[hs.incr].ok
    if field in ("file-absolute", "file-dotdot", "size"):
        with pytest.raises(DirbackupError):
            hs.storage.new_backup_provider().restore_vm_volume_init(hs.incr.split(":")[1], DEV, {})
        assert not servers_for(str(hs.tmp))
    restore_and_compare(hs.storage, hs.full, {DEV: hs.states[hs.full]}, hs.tmp)


@pytest.mark.parametrize("where", ["absolute", "dotdot"])
def test_hostile_previous_info(hs: HostileStore, where: str) -> None:
    """previous-info naming an image outside the guest's directory is no base:
    the next backup is full (not an incremental backed by a foreign file)."""
    path = hs.storage.store.previous_info_path(100)
    info = json.loads(path.read_text())
    info["devices"][DEV]["file"] = (
        str(hs.outside) if where == "absolute" else f"../../../{hs.outside.name}"
    )
    path.write_text(json.dumps(info))
    hs.guest.change(DEV, "write -P 0x33 3M 64k")
    state = hs.guest.snapshot()[DEV]
    report = Host(hs.storage, STOREID).backup_vm(100, hs.guest.disks, start_time=3000)
    m = json.loads((Path(hs.storage.path(report.volid)[0]) / "manifest.json").read_text())
    assert m["disks"][DEV]["parent"] is None, m
    assert all(r.ok for r in hs.storage.verify())
    restore_and_compare(hs.storage, report.volid, {DEV: state}, hs.tmp)


# ---------------------------------------------------------------------- volume ids


BAD_VOLNAMES = [
    "backup/100/../../etc/passwd",
    "backup/../100/qemu-1000",
    "/etc/passwd",
    "backup//etc/passwd",
    "backup/100/qemu-1000/../../../etc",
    "backup/100/qemu-1000\0",
    "backup/100\0/qemu-1000",
    "backup/100/qemu-1000\n",
    "backup/100/qemu-99999999999999999999999999",
    "backup/99999999999999999999/qemu-1000",
    "backup/-100/qemu-1000",
    "backup/+100/qemu-1000",
    "backup/ 100/qemu-1000",
    "backup/\u0661\u0660\u0660/qemu-1000",  # Arabic-Indic digits
    "backup/100/qemu-0x10",
    "backup/100/qemu-1e3",
    "backup/100/qemu-1000.partial",
    "backup/100/.qemu-1000.partial",
    "backup/100/qemu-1000.failed",
    "backup/100/qemu-1000/",
    "backup/100",
    "backup",
    "..",
    "",
    "x" * 5000,
]


def api_calls(
    storage: DirectoryStorage, volname: str, target: Path
) -> dict[str, Callable[[], object]]:
    """Every entry point of the storage plugin and provider that takes a volume."""
    provider = storage.new_backup_provider()
    return {
        "parse_volname": lambda: storage.parse_volname(volname),
        "path": lambda: storage.path(volname),
        "volume_size_info": lambda: storage.volume_size_info(volname),
        "get_volume_attribute": lambda: storage.get_volume_attribute(volname, "notes"),
        "update_volume_attribute": lambda: storage.update_volume_attribute(volname, "notes", "x"),
        "free_image": lambda: storage.free_image(volname),
        "verify": lambda: storage.verify(volname),
        "activate_volume": lambda: storage.activate_volume(volname),
        "restore_get_mechanism": lambda: provider.restore_get_mechanism(volname),
        "restore_vm_init": lambda: provider.restore_vm_init(volname),
        "restore_vm_volume_init": lambda: provider.restore_vm_volume_init(volname, DEV, {}),
        "archive_get_guest_config": lambda: provider.archive_get_guest_config(volname),
        "restore_container_init": lambda: provider.restore_container_init(volname, {}),
        "Host.restore_vm": lambda: Host(storage, STOREID).restore_vm(
            f"{STOREID}:{volname}", {DEV: target}
        ),
    }


def test_hostile_volume_ids_through_the_api(shared: HostileStore) -> None:
    target = shared.tmp / "t.raw"
    for volname in BAD_VOLNAMES:
        for what, call in api_calls(shared.storage, volname, target).items():
            with pytest.raises(DirbackupError):
                call()
                pytest.fail(f"{what}({volname!r}) was accepted")
    assert not target.exists()
    assert not servers_for(str(shared.tmp))
    assert volids(shared.storage) == [shared.full, shared.incr, shared.other]
    assert all(r.ok for r in shared.storage.verify())


CLI_VOLIDS = [v for v in BAD_VOLNAMES if "\0" not in v] + [
    "other:backup/100/qemu-1000",
    "dirb:",
    ":backup/100/qemu-1000",
    "dirb:backup/100/qemu-1000:x",
]


def test_hostile_volume_ids_through_the_cli(
    shared: HostileStore, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every command that takes a volume id refuses each one with a one-line
    error (in-process for all of them, as a process for a few)."""
    from dirbackup.cli import main

    store = ["--store", str(shared.root), "--storeid", STOREID]
    target = shared.tmp / "t.raw"
    commands = [
        lambda v: ["restore", *store, v, "--disk", f"{DEV}={target}"],
        lambda v: ["verify", *store, v],
        lambda v: ["remove", *store, v],
        lambda v: ["notes", *store, v, "x"],
        lambda v: ["protect", *store, v],
    ]
    for volid in CLI_VOLIDS:
        for command in commands:
            assert main(command(volid)) == 1, command(volid)
            err = capsys.readouterr().err.strip().splitlines()
            assert err and err[-1].startswith("error: "), (command(volid), err)
    for volid in ("backup/100/../../etc/passwd", "/etc/shadow", "backup/100/qemu-" + "9" * 30):
        proc = cli(*commands[0](volid), check=1)
        assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
    assert not target.exists()
    assert volids(shared.storage) == [shared.full, shared.incr, shared.other]


@pytest.mark.parametrize("device", ["../drive-scsi0", "", "a/b", "drive\0", "..", ".hidden"])
def test_hostile_device_names(shared: HostileStore, device: str) -> None:
    provider = shared.storage.new_backup_provider()
    volname = shared.full.split(":")[1]
    with pytest.raises(DirbackupError):
        provider.restore_vm_volume_init(volname, device, {})
    with pytest.raises(DirbackupError):
        Host(shared.storage, STOREID).restore_vm(shared.full, {device: shared.tmp / "t.raw"})
    with pytest.raises(DirbackupError):
        Host(shared.storage, STOREID).backup_vm(100, [Disk(device, shared.guest.disks[0].path)])
    assert not servers_for(str(shared.tmp))
    assert volids(shared.storage) == [shared.full, shared.incr, shared.other]


# ---------------------------------------------------------------------- nbdinfo --map text


@pytest.fixture(scope="module")
def real_map(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, int]:
    """`nbdinfo --map` and `--map --json` of a real export with data, zeros and holes."""
    tmp = tmp_path_factory.mktemp("map")
    img = tmp / "g.qcow2"
    qemu.img_create(img, SIZE)
    qemu.io(img, "write -P 1 0 1M", "write -z 2M 1M", "write -P 2 5M 64k", "write -P 3 15M 1M")
    sock = Path("/tmp") / f"dbmap-{os.getpid()}.sock"
    with qemu.serve_nbd(img, str(sock)) as server:
        text = subprocess.run(
            ["nbdinfo", "--map", server.uri], check=True, capture_output=True, text=True
        ).stdout
        js = subprocess.run(
            ["nbdinfo", "--map", "--json", server.uri], check=True, capture_output=True, text=True
        ).stdout
    assert len(text.splitlines()) >= 4
    return text, js, SIZE


def map_mutations(text: str, size: int) -> dict[str, str]:
    lines = text.splitlines(keepends=True)
    first = lines[0].split()
    return {
        "truncated mid-line": text[: len(text) - len(lines[-1]) // 2],
        "last line dropped": "".join(lines[:-1]),
        "middle line dropped": "".join(lines[:1] + lines[2:]),
        "line repeated": "".join(lines[:2] + lines[1:]),
        "lines swapped": "".join([lines[1], lines[0], *lines[2:]]),
        "reversed": "".join(reversed(lines)),
        "overlapping": text.replace(lines[1].split()[0], str(int(lines[1].split()[0]) - 512), 1),
        "past the end": text + f"{size} 4096 0 data\n",
        "absurd length": f"0 {2**64 - 1} 0 data\n",
        "beyond 2^64": f"0 {size} 0\n{size} {2**64} 0\n",
        "negative": "-1 4096 0\n",
        "hex": "0x0 0x1000 0\n",
        "NUL byte": text.replace(" ", "\0", 1),
        "zero length": f"0 0 0\n{text}",
        "garbage": "this is not a map\n",
        "empty": "",
        "type out of range": f"0 {size} 99999999999\n",
        "first line only": lines[0],
        "huge gap": f"{first[0]} {first[1]} 0\n{2**40} 4096 0\n",
    }


def test_map_text_hostile(real_map: tuple[str, str, int]) -> None:
    text, _js, size = real_map
    got = extents.parse_map_text(text, size=size)
    assert extents.total(got) == size
    for name, bad in map_mutations(text, size).items():
        with pytest.raises(MapFormatError):
            extents.parse_map_text(bad, size=size)
            pytest.fail(f"accepted: {name}")


def test_map_json_hostile(real_map: tuple[str, str, int]) -> None:
    _text, js, size = real_map
    entries = json.loads(js)
    assert extents.total(extents.parse_map_json(js, size=size)) == size

    def dump(rows: list[dict[str, object]]) -> str:
        return json.dumps(rows)

    bad = {
        "truncated": js[: len(js) // 2],
        "entry dropped": dump(entries[:1] + entries[2:]),
        "entries swapped": dump([entries[1], entries[0], *entries[2:]]),
        "overlap": dump([entries[0], {**entries[1], "offset": entries[1]["offset"] - 512}]),
        "absurd": dump([{**entries[0], "length": 2**64 + 5}]),
        "negative": dump([{**entries[0], "offset": -1}]),
        "string numbers": dump([{**entries[0], "offset": "0"}]),
        "float": dump([{**entries[0], "length": 1.5}]),
        "nested": json.dumps({"map": entries}),
        "trailing": js + "[]",
    }
    for name, text in bad.items():
        with pytest.raises(MapFormatError):
            extents.parse_map_json(text, size=size)
            pytest.fail(f"accepted: {name}")


def test_planted_directory_with_an_absurd_time(hs: HostileStore) -> None:
    """A directory named like a backup from beyond the valid range does not
    drag the next backup's time out of it (its id would be unusable)."""
    (hs.root / "100" / "qemu-9999999999999").mkdir()
    report = Host(hs.storage, STOREID).backup_vm(100, hs.guest.disks, start_time=3000)
    assert report.volid.endswith("/qemu-3000")
    hs.storage.parse_volname(report.volid.split(":")[1])
    restore_and_compare(hs.storage, report.volid, {DEV: hs.guest.snapshot()[DEV]}, hs.tmp)
