"""Reliability: a restore never returns bytes the backup did not record.

Every restore checks each layer of the chain against the digests its backup's
manifest recorded, in the copy loop; each image's backing file must be the
image of the backup its manifest names as parent.  A real store (guest 100:
a full backup and two incrementals with 4 KiB clusters, on a disk whose size
is a multiple of no cluster size) is damaged the way bit rot or a careless
hand would: a flipped bit in a data cluster of the top image or of the base
(seen or hidden by the layers above), a cleared L2 entry, an entry pointed at
another data cluster, the zero flag set on a clean entry, a zero cluster
turned back into data, a backing name one bit away from another backup's.
Before the checks, the command line restored each of them with exit 0 (QEMU
reads wrong bytes from all but the hidden flip).  Now each fails with exit 1
and one line naming the backup, the device and the offset, through the
command line and the Python API, in both target formats, and leaves nothing
under the target's name (an existing target keeps its content).  The damage
is found by parsing the images (imagefaults.py).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import imagefaults as faults
import pytest
from conftest import KiB, MiB, assert_same
from faultlib import cli, provider_backup, servers_for
from guests import STOREID, Guest, make_storage

from dirbackup import copy, extents, qcow2, qemu
from dirbackup.errors import DirbackupError, IntegrityError
from dirbackup.host import Host

DEV = "drive-scsi0"
SIZE = 40 * MiB + 1536  # three 16 MiB digest chunks; no cluster size divides it
CHUNK = 16 * MiB
TIMES = (1000, 1001, 1003)  # "qemu-1003" backs onto "qemu-1001", one bit from "qemu-1000"
CHANGES = (
    ["write -P 0x11 0 3M", "write -P 0x12 20M 2M", f"write -P 0x13 {SIZE - 8 * KiB} 8k"],
    [
        "write -P 0x22 4608 512",
        "write -z 1M 8k",
        "write -P 0x23 20488k 4k",
        "write -P 0x24 40M 1536",
    ],
    ["write -P 0x44 12k 4k", "write -z 21M 4k", "write -P 0x45 24M 4k"],
)


class Scene:
    """The store and the guest's state at each backup; built once per module,
    copied for each test that damages it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.storage = make_storage(root, **faults.LAYOUT)
        self.volids = [f"{STOREID}:backup/100/qemu-{t}" for t in TIMES]
        self.states = [root / f"state-{t}.raw" for t in TIMES]

    @classmethod
    def build(cls, root: Path) -> Scene:
        scene = cls(root)
        gdir = root / "guest"
        gdir.mkdir()
        qemu.img_create(gdir / f"{DEV}.qcow2", SIZE, cluster_size=4 * KiB)
        guest = Guest.existing(gdir, [DEV])
        host = Host(scene.storage, STOREID)
        for t, cmds, state, volid in zip(TIMES, CHANGES, scene.states, scene.volids, strict=True):
            guest.change(DEV, *cmds)
            guest.snapshot()[DEV].rename(state)
            assert host.backup_vm(100, guest.disks, start_time=t).volid == volid
        return scene

    def copy(self, dst: Path) -> Scene:
        shutil.copytree(self.root, dst, dirs_exist_ok=True)
        return Scene(dst)

    def image(self, which: int) -> Path:
        return Path(self.storage.path(self.volids[which])[0]) / f"{DEV}.qcow2"


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Scene:
    return Scene.build(tmp_path_factory.mktemp("integrity"))


@pytest.fixture
def scene(template: Scene, tmp_path: Path) -> Scene:
    return template.copy(tmp_path / "scene")


# ---------------------------------------------------------------------- damage


@dataclass(frozen=True)
class Damage:
    """What to break, which restore point shows it, and what the error names."""

    apply: Callable[[Scene], None]
    restore: int  # index of the restore point to restore
    blamed: int  # index of the backup the error names
    offset: int | None  # the chunk offset the error names
    wrong: bool = True  # QEMU reads wrong bytes from the damaged chain


def _flip_data(which: int, guest: int) -> Callable[[Scene], None]:
    def apply(scene: Scene) -> None:
        img = scene.image(which)
        e = faults.entry_at(img, guest)
        assert e.data, e
        faults.flip_bit(img, e.host + guest - e.guest, 3)

    return apply


def _set(
    which: int, guest: int, value: Callable[[Path], int], kind: str
) -> Callable[[Scene], None]:
    def apply(scene: Scene) -> None:
        img = scene.image(which)
        e = faults.entry_at(img, guest)
        assert getattr(e, kind), e
        faults.set_entry(img, e, value(img))

    return apply


def _data_value(which: int, guest: int) -> Callable[[Path], int]:
    def value(img: Path) -> int:
        e = faults.entry_at(img, guest)
        assert e.data, e
        return e.value

    return value


def _backing_one_bit(scene: Scene) -> None:
    img = scene.image(2)
    name = faults.backing_name(img)
    assert name == "../qemu-1001/drive-scsi0.qcow2", name
    faults.set_backing_name(img, name.replace("qemu-1001", "qemu-1000"))


DAMAGE = {
    "top data flipped": Damage(_flip_data(2, 24 * MiB + 100), 2, 2, CHUNK),
    "base data flipped": Damage(_flip_data(0, 20 * MiB + 512 * KiB), 2, 0, CHUNK),
    "base data flipped under the layers above": Damage(
        _flip_data(0, 12 * KiB + 100), 2, 0, 0, wrong=False
    ),
    "L2 entry cleared": Damage(_set(1, 20488 * KiB, lambda _: 0, "data"), 1, 1, CHUNK),
    "L2 entry redirected": Damage(_set(2, 12 * KiB, _data_value(2, 24 * MiB), "data"), 2, 2, 0),
    "zero flag on a clean entry": Damage(
        _set(2, 16 * KiB, lambda _: faults.ZERO_FLAG, "clean"), 2, 2, 0
    ),
    "zero cluster made unallocated": Damage(_set(1, 1 * MiB, lambda _: 0, "zero"), 1, 1, 0),
    "zero cluster made data": Damage(_set(1, 1 * MiB, _data_value(1, 4 * KiB), "zero"), 1, 1, 0),
    "backing name one bit off": Damage(_backing_one_bit, 2, 2, None),
}


def _message(scene: Scene, d: Damage) -> str:
    """The pattern the one error line must match."""
    who = re.escape(f"backup {scene.volids[d.blamed]} {DEV}: ")
    if d.offset is None:
        return who + re.escape(
            "the backing file '../qemu-1000/drive-scsi0.qcow2' does not lie in "
            "backup/100/qemu-1001, the parent its manifest names; refused"
        )
    return who + re.escape(
        f"the data in the chunk at offset {d.offset} (16.0 MiB) does not match its digest: "
        "the backup is damaged"
    )


def _no_target(target: Path) -> None:
    assert not target.exists()
    assert [p.name for p in target.parent.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("name", sorted(DAMAGE))
def test_damaged_chain_fails_every_restore(scene: Scene, tmp_path: Path, name: str) -> None:
    d = DAMAGE[name]
    d.apply(scene)
    volid = scene.volids[d.restore]
    same, _ = qemu.img_compare(scene.states[d.restore], scene.image(d.restore), "raw", "qcow2")
    assert same != d.wrong  # what QEMU itself would give back
    pattern = _message(scene, d)
    out = tmp_path / "out"
    out.mkdir()
    for fmt in ("raw", "qcow2"):
        target = out / f"disk.{fmt}"
        proc = cli(
            "restore", "--store", scene.storage.scfg.path, "--storeid", STOREID, volid,
            "--disk", f"{DEV}={target}", "--format", fmt, check=1,
        )  # fmt: skip
        assert re.fullmatch(f"error: {pattern}\n", proc.stderr), proc.stderr
        _no_target(target)
        with pytest.raises(DirbackupError, match=pattern):
            Host(scene.storage, STOREID).restore_vm(volid, {DEV: target}, target_format=fmt)
        _no_target(target)
    # an existing target keeps what it held
    target = out / "existing.raw"
    target.write_bytes(b"precious")
    with pytest.raises(DirbackupError, match=pattern):
        Host(scene.storage, STOREID).restore_vm(volid, {DEV: target}, force=True)
    assert target.read_bytes() == b"precious"
    assert sorted(p.name for p in out.iterdir()) == ["existing.raw"]
    # the restore points the damage does not reach still restore
    for i in range(d.blamed):
        _restores_exactly(scene, i, tmp_path, ("raw",))


def _restores_exactly(
    scene: Scene, i: int, tmp_path: Path, formats: tuple[str, ...] = ("raw", "qcow2")
) -> None:
    for fmt in formats:
        target = tmp_path / f"restored-{i}.{fmt}"
        Host(scene.storage, STOREID).restore_vm(scene.volids[i], {DEV: target}, target_format=fmt)
        assert_same(scene.states[i], target, "raw", fmt)
        target.unlink()


def test_undamaged_chain_restores_exactly(template: Scene, tmp_path: Path) -> None:
    for i in range(len(TIMES)):
        _restores_exactly(template, i, tmp_path)
    target = tmp_path / "cli.raw"
    proc = cli(
        "restore", "--store", template.storage.scfg.path, "--storeid", STOREID,
        template.volids[-1], "--disk", f"{DEV}={target}",
    )  # fmt: skip
    assert proc.stderr == ""
    assert_same(template.states[-1], target)


def test_damaged_chain_into_a_block_device(
    scene: Scene, loop_device: Callable[[int], Path]
) -> None:
    d = DAMAGE["top data flipped"]
    d.apply(scene)
    dev = loop_device(SIZE + 512)
    proc = cli(
        "restore", "--store", scene.storage.scfg.path, "--storeid", STOREID,
        scene.volids[d.restore], "--disk", f"{DEV}={dev}", "--force", check=1,
    )  # fmt: skip
    assert re.fullmatch(f"error: {_message(scene, d)}\n", proc.stderr), proc.stderr


def test_seed_layers_restore_unchecked_with_a_warning(scene: Scene, tmp_path: Path) -> None:
    """A backup without a manifest (the seed's layout) has no digests: its
    layer is restored as before, and the restore says it was not checked."""
    (Path(scene.storage.path(scene.volids[0])[0]) / "manifest.json").unlink()
    target = tmp_path / "out.raw"
    proc = cli(
        "restore", "--store", scene.storage.scfg.path, "--storeid", STOREID,
        scene.volids[2], "--disk", f"{DEV}={target}",
    )  # fmt: skip
    assert proc.stderr == (
        f"warn: {DEV}: qemu-1000 recorded no digests (written without a manifest): "
        "their data is restored unchecked\n"
    )
    assert_same(scene.states[2], target)
    # the layers that have digests are still checked
    _flip_data(1, 20488 * KiB)(scene)
    proc = cli(
        "restore", "--store", scene.storage.scfg.path, "--storeid", STOREID,
        scene.volids[2], "--disk", f"{DEV}={tmp_path / 'again.raw'}", check=1,
    )  # fmt: skip
    assert f"backup {scene.volids[1]} {DEV}: the data in the chunk at offset {CHUNK} " in (
        proc.stderr
    )


# ---------------------------------------------------------------------- mixed cluster sizes


@dataclass
class Layered:
    """A chain written by our writer the way backups are (each layer holds the
    clusters its writes touched, zero clusters recorded above the base), with
    the digests the copy summed, and the guest's bytes at every layer."""

    images: list[Path]
    digests: list[qcow2.LayerDigests]
    states: list[Path]
    size: int

    def chain(self, top: int) -> qcow2.Chain:
        chain = qcow2.Chain(self.images[top], self.images[0].parent)
        for i in range(chain.depth):
            chain.expect(i, self.digests[top - i])
        return chain


def _layered(tmp: Path, size: int, clusters: tuple[int, ...], seed: int) -> Layered:
    rng = random.Random(seed)
    state = bytearray(size)
    images: list[Path] = []
    digests: list[qcow2.LayerDigests] = []
    states: list[Path] = []
    for i, cs in enumerate(clusters):
        pairs = []
        for _ in range(1 if i == 0 else rng.randint(3, 8)):
            if i == 0:
                off, n = 0, size
            else:  # small unaligned writes, some of zeros, one at the very end
                n = rng.choice([1, 700, 4096, 70_000, 300_000])
                off = size - n if rng.random() < 0.2 else rng.randrange(0, size - n)
            fill = rng.randbytes(n) if i == 0 or rng.random() < 0.7 else bytes(n)
            if i == 0:
                fill = bytes(fill[: n // 3]) + bytes(n // 3) + fill[2 * (n // 3) :]
            state[off : off + n] = fill
            pairs.append((off, n))
        raw = tmp / f"state{i}.raw"
        raw.write_bytes(state)
        states.append(raw)
        regions = extents.align(extents.coalesce(extents.from_pairs(sorted(pairs))), cs, size)
        img = tmp / f"layer{i}.qcow2"
        chunk = max(cs, 1 * MiB)
        fd = os.open(raw, os.O_RDONLY)
        try:
            backing = images[-1].name if images else None
            with qcow2.Writer(img, size, cs, backing=backing) as w:
                stats = copy.copy_regions(
                    copy.FileSource(fd, str(raw)), w, regions, copy.CopyOptions(digest_chunk=chunk),
                    digest_size=size, digest_zero=w.records_zero,
                )  # fmt: skip
                w.finish()
        finally:
            os.close(fd)
        assert stats.digests is not None
        assert qcow2.image_digests(img, chunk, size).tolist() == stats.digests.tolist()
        images.append(img)
        digests.append(qcow2.LayerDigests(f"layer {i}", chunk, stats.digests))
    return Layered(images, digests, states, size)


CLUSTER_ORDERS = [
    (2 * MiB, 512, 64 * KiB, 4 * KiB),  # base first
    (512, 4 * KiB, 2 * MiB),
    (64 * KiB, 2 * MiB, 512, 512),
]


@pytest.mark.parametrize("clusters", CLUSTER_ORDERS, ids=lambda c: "-".join(map(str, c)))
def test_mixed_cluster_sizes_restore_checked(tmp_path: Path, clusters: tuple[int, ...]) -> None:
    size = 5 * MiB + 1536  # a multiple of 512 bytes only
    layered = _layered(tmp_path, size, clusters, seed=sum(clusters))
    for top in range(len(clusters)):
        with layered.chain(top) as chain:
            assert chain.unchecked == []
            out = tmp_path / "out.raw"
            stats = _restore_to_file(chain, out)
            assert_same(layered.states[top], out)
            # the extra reads are the hidden clusters, not a second pass
            held = sum(faults.data_bytes(img) for img in layered.images[: top + 1])
            assert stats.read_bytes <= held + size, (stats.read_bytes, held)
            fresh = tmp_path / "out.qcow2"
            fresh.unlink(missing_ok=True)
            with qcow2.Writer(fresh, size, chain.min_cluster_size) as w:
                qcow2.restore(chain, w)
                w.finish()
            assert_same(layered.states[top], fresh, "raw", "qcow2")
    # a flipped bit in any layer fails the restore of every chain holding it, naming it
    top = len(clusters) - 1
    for i, img in enumerate(layered.images):
        entries = faults.data_entries(img)
        e = entries[len(entries) // 2]
        where = e.host + min(e.cluster_size, size - e.guest) // 2
        faults.flip_bit(img, where)
        with layered.chain(top) as chain, pytest.raises(IntegrityError) as exc:
            _restore_to_file(chain, tmp_path / "damaged.raw")
        chunk = layered.digests[i].chunk
        offset = (e.guest + min(e.cluster_size, size - e.guest) // 2) // chunk * chunk
        assert str(exc.value).startswith(f"layer {i}: the data in the chunk at offset {offset} ")
        faults.flip_bit(img, where)


def _restore_to_file(chain: qcow2.Chain, out: Path) -> copy.CopyStats:
    fd = os.open(out, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, chain.virtual_size)
        return qcow2.restore(chain, copy.FileTarget(fd, str(out)))
    finally:
        os.close(fd)


def test_writer_with_larger_clusters_is_refused_up_front(tmp_path: Path) -> None:
    layered = _layered(tmp_path, 3 * MiB, (64 * KiB, 512), seed=5)
    with layered.chain(1) as chain:
        out = tmp_path / "out.qcow2"
        writer = qcow2.Writer(out, chain.virtual_size, 64 * KiB)
        with pytest.raises(ValueError, match="clusters are larger than the pieces"), writer:
            qcow2.restore(chain, writer)
        assert not out.exists()


def test_provider_incrementals_with_small_clusters(tmp_path: Path) -> None:
    """Incrementals of 512-byte and 4 KiB clusters (small dirty regions through
    the file-handle mechanism) on a full backup, on a disk of an odd size:
    every restore point restores exactly, through the CLI in both formats."""
    size = 6 * MiB + 5 * 512
    storage = make_storage(tmp_path)
    source = tmp_path / "fleecing.raw"
    rng = random.Random(7)
    data = bytearray(rng.randbytes(size))
    data[2 * MiB : 3 * MiB] = bytes(MiB)
    plan: list[list[tuple[int, int]]] = [
        [(0, size)],
        [(1536, 512), (3 * MiB + 512, 1024), (size - 512, 512)],
        [(8192, 4096), (4 * MiB, 12288)],
        [(0, 2 * MiB), (5 * MiB, 64 * KiB)],
    ]
    clusters = []
    for n, regions in enumerate(plan):
        for off, length in regions[: 0 if n == 0 else None]:
            data[off : off + length] = rng.randbytes(length) if off % 3 else bytes(length)
        source.write_bytes(data)
        (tmp_path / f"state{n}.raw").write_bytes(data)
        with open(source, "rb") as f:
            pending = iter(regions)
            volumes = {
                DEV: {
                    "size": size,
                    "bitmap-mode": "new" if n == 0 else "reuse",
                    "file-handle": f.fileno(),
                    "next-dirty-region": lambda p=pending: next(p, None),
                }
            }
            assert provider_backup(storage, 100, volumes, 1000 + n) is None
        image = Path(storage.path(f"{STOREID}:backup/100/qemu-{1000 + n}")[0]) / f"{DEV}.qcow2"
        clusters.append(qcow2.read_header(image).cluster_size)
    assert clusters == [64 * KiB, 512, 4 * KiB, 64 * KiB]
    for n in range(len(plan)):
        for fmt in ("raw", "qcow2"):
            target = tmp_path / f"restored{n}.{fmt}"
            proc = cli(
                "restore", "--store", storage.scfg.path, "--storeid", STOREID,
                f"{STOREID}:backup/100/qemu-{1000 + n}", "--disk", f"{DEV}={target}",
                "--format", fmt,
            )  # fmt: skip
            assert proc.stderr == ""
            assert_same(tmp_path / f"state{n}.raw", target, "raw", fmt)


def _edit_manifest(scene: Scene, which: int, **fields: object) -> None:
    path = Path(scene.storage.path(scene.volids[which])[0]) / "manifest.json"
    m = json.loads(path.read_text())
    m["disks"][DEV].update(fields)
    path.write_text(json.dumps(m))


@pytest.mark.parametrize(
    ("which", "parent", "needle"),
    [
        (0, "backup/100/qemu-1001", "names the parent backup/100/qemu-1001, but the image has no"),
        (2, None, "the image has a backing file, but the manifest records no parent"),
        (2, "backup/100/qemu-1000", "does not lie in backup/100/qemu-1000, the parent its"),
    ],
)
def test_manifest_parent_and_backing_file_must_agree(
    scene: Scene, tmp_path: Path, which: int, parent: str | None, needle: str
) -> None:
    _edit_manifest(scene, which, parent=parent)
    volid = scene.volids[which]
    target = tmp_path / "out.raw"
    proc = cli(
        "restore", "--store", scene.storage.scfg.path, "--storeid", STOREID, volid,
        "--disk", f"{DEV}={target}", check=1,
    )  # fmt: skip
    assert proc.stderr.startswith(f"error: backup {volid} {DEV}: ") and needle in proc.stderr
    assert proc.stderr.count("\n") == 1 and not target.exists()
    # the provider serves no qemu-img-path for it either
    provider = scene.storage.new_backup_provider()
    with pytest.raises(DirbackupError, match=re.escape(needle)):
        provider.restore_vm_volume_init(volid.split(":", 1)[1], DEV, {})
    assert not provider._restores and not servers_for(str(scene.root))


def test_backing_name_one_bit_off_is_not_served_to_qemu_img(scene: Scene) -> None:
    DAMAGE["backing name one bit off"].apply(scene)
    provider = scene.storage.new_backup_provider()
    with pytest.raises(DirbackupError, match=_message(scene, DAMAGE["backing name one bit off"])):
        provider.restore_vm_volume_init(scene.volids[2].split(":", 1)[1], DEV, {})
    assert not provider._restores and not servers_for(str(scene.root))


def test_copy_through_part_of_a_chain_checks_those_layers(tmp_path: Path) -> None:
    """copy_chain(depth=2), the copy a merge makes: the top two layers are
    checked (hidden clusters of the lower one included), the rest not read."""
    layered = _layered(tmp_path, 3 * MiB + 512, (64 * KiB, 4 * KiB, 512), seed=9)
    merged = tmp_path / "merged.qcow2"

    def merge() -> None:
        merged.unlink(missing_ok=True)
        with layered.chain(2) as chain:
            backing = os.path.relpath(chain.paths[2], tmp_path)
            with qcow2.Writer(merged, chain.virtual_size, 512, backing=backing) as w:
                qcow2.copy_chain(chain, w, depth=2)
                w.finish()

    merge()
    assert_same(layered.states[2], merged, "raw", "qcow2")
    img = layered.images[1]
    e = faults.data_entries(img)[-1]
    faults.flip_bit(img, e.host)
    with pytest.raises(IntegrityError, match=r"^layer 1: the data in the chunk at offset"):
        merge()
    assert not merged.exists()
    faults.flip_bit(img, e.host)
    faults.flip_bit(layered.images[0], faults.data_entries(layered.images[0])[0].host)
    merge()  # the base is not part of the copy
