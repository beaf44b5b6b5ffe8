"""Reliability: a backup is only as good as its chain, and damage in a base is
never spread, served or built upon.

One layer of a real chain (a full backup and two incrementals built on it) is
damaged the ways that keep every qcow2 tool happy but change what it reads
(tests/imagefaults.py: a flipped byte in a data cluster, a cleared L2 entry,
a zero flag on a data entry).  Then:
* verify fails the damaged backup and every backup built on it, each saying
  which base is bad, and goes on with the rest of the store;
* removing the damaged base (remove, prune, free_image) refuses to merge it
  into its child and changes nothing but the record of the failure;
* the next backup is full (and restores exactly), whichever check found it;
* `--engine qemu-img` and the provider's qemu-img-path refuse the chain.
A merge that would write anything but what its two checked layers read is
caught before the merged image is used."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from faultlib import MiB, cli, leftovers, provider_backup, servers_for, volids
from guests import STOREID, Guest, make_storage, restore_and_compare
from imagefaults import FAULTS, LAYOUT, flip_data_byte, set_zero_flag

from dirbackup import qcow2, qemu
from dirbackup.errors import IntegrityError
from dirbackup.host import Host
from dirbackup.storage import DirectoryStorage
from dirbackup.verify import Checker, MergeCheck, check_merge, check_merged

DEV = "drive-scsi0"
SIZE = 16 * MiB
TIMES = (1000, 2000, 3000)
NEEDLE = "data does not match its digests"


class ChainScene:
    """Guest 100 with a full backup and two incrementals (with a zero write),
    guest 101 with one full backup; the guests' disks with their bitmaps and
    the raw state at each backup.  Built once per module, copied per test."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.storage = DirectoryStorage(STOREID, {"path": str(tmp / "store"), **LAYOUT})
        self.root = Path(self.storage.scfg.path)
        self.guest = Guest.existing(tmp / "g100", [DEV])
        self.volids = [f"{STOREID}:backup/100/qemu-{t}" for t in TIMES]
        self.other = f"{STOREID}:backup/101/qemu-1500"
        self.states = [tmp / f"state-{i}.raw" for i in range(len(TIMES))]

    @classmethod
    def build(cls, tmp: Path) -> ChainScene:
        storage = make_storage(tmp, **LAYOUT)
        host = Host(storage, STOREID)
        (tmp / "g100").mkdir()
        guest = Guest(tmp / "g100", {DEV: SIZE})
        changes = ([], ["write -P 0x44 4M 128k"], ["write -P 0x55 5M 64k", "write -z 6M 64k"])
        for i, (t, cmds) in enumerate(zip(TIMES, changes, strict=True)):
            if cmds:
                guest.change(DEV, *cmds)
            os.rename(guest.snapshot()[DEV], tmp / f"state-{i}.raw")
            host.backup_vm(100, guest.disks, start_time=t)
        (tmp / "g101").mkdir()
        other = Guest(tmp / "g101", {DEV: SIZE})
        host.backup_vm(101, other.disks, start_time=1500)
        scene = cls(tmp)
        assert volids(scene.storage) == [*scene.volids, scene.other]
        return scene

    def copy(self, dst: Path) -> ChainScene:
        shutil.copytree(self.tmp, dst, symlinks=True, dirs_exist_ok=True)
        return ChainScene(dst)

    def image(self, i: int) -> Path:
        return Path(self.storage.path(self.volids[i])[0]) / f"{DEV}.qcow2"

    def volname(self, i: int) -> str:
        return self.volids[i].split(":", 1)[1]

    def files(self) -> dict[str, str]:
        """sha256 of every file of the store."""
        out = {}
        for dirpath, _dirs, names in os.walk(self.root):
            for name in names:
                p = Path(dirpath) / name
                out[str(p.relative_to(self.root))] = hashlib.sha256(p.read_bytes()).hexdigest()
        return out

    def marks(self) -> list[str | None]:
        return [
            self.storage.store.check_failure(self.storage.backup_id(v))
            for v in [*self.volids, self.other]
        ]


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> ChainScene:
    return ChainScene.build(tmp_path_factory.mktemp("chain"))


@pytest.fixture
def scene(template: ChainScene, tmp_path: Path) -> ChainScene:
    return template.copy(tmp_path)


def base_problem(scene: ChainScene) -> str:
    return f"{NEEDLE} (first difference in the chunk at offset 0)"


# ---------------------------------------------------------------------- verify


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_verify_fails_the_bad_base_and_every_backup_on_it(scene: ChainScene, fault: str) -> None:
    FAULTS[fault](scene.image(0), 0)  # guest offset 0: no incremental rewrites it
    results = {r.volid: r for r in scene.storage.verify()}
    assert results[scene.volids[0]].problems == (f"{DEV}: {base_problem(scene)}",)
    for volid in scene.volids[1:]:
        assert results[volid].problems == (
            f"{DEV}: its base {scene.volname(0)} fails its check: {base_problem(scene)}",
        ), volid
    assert results[scene.other].ok  # one bad chain does not stop the rest
    marks = scene.marks()
    assert marks[0] == f"{DEV}: {base_problem(scene)}"
    assert marks[1] is not None and marks[2] is not None and marks[3] is None
    # the command line: every backup reported, then the failure
    proc = cli("verify", "--store", scene.root, "--storeid", STOREID, check=1)
    assert proc.stdout.splitlines() == [
        f"{scene.volids[0]}: FAILED",
        f"  {DEV}: {base_problem(scene)}",
        f"{scene.volids[1]}: FAILED",
        f"  {DEV}: its base {scene.volname(0)} fails its check: {base_problem(scene)}",
        f"{scene.volids[2]}: FAILED",
        f"  {DEV}: its base {scene.volname(0)} fails its check: {base_problem(scene)}",
        proc.stdout.splitlines()[-1],
    ]
    assert proc.stdout.splitlines()[-1].startswith(f"{scene.other}: ok (")
    assert proc.stderr == "error: 3 of 4 backups failed verification\n"
    listing = json.loads(cli("list", "--store", scene.root, "--storeid", STOREID, "--json").stdout)
    assert [row["check-failed"] is not None for row in listing] == [True, True, True, False]
    table = cli("list", "--store", scene.root, "--storeid", STOREID).stdout.splitlines()
    assert table[0].split()[6] == "CHECK"
    assert ["FAILED" in line for line in table[1:]] == [True, True, True, False]


def test_a_verify_that_passes_clears_the_mark(scene: ChainScene) -> None:
    image = scene.image(0)
    good = image.read_bytes()
    flip_data_byte(image, 0)
    assert not any(r.ok for r in scene.storage.verify(vmid=100))
    image.write_bytes(good)
    assert all(r.ok for r in scene.storage.verify(vmid=100))
    assert scene.marks() == [None, None, None, None]


# ---------------------------------------------------------------------- removal


def remove_base(scene: ChainScene, how: str) -> str:
    """Remove the full backup the incrementals build on; the error it gives."""
    store = ["--store", scene.root, "--storeid", STOREID]
    if how == "free_image":
        with pytest.raises(IntegrityError) as exc:
            scene.storage.free_image(scene.volids[0])
        return str(exc.value)
    if how == "remove":
        proc = cli("remove", *store, scene.volids[0], check=1)
    else:
        proc = cli("prune", *store, "--vmid", "100", "--keep-last", "2", check=1)
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: "), proc.stderr
    return proc.stderr.removeprefix("error: ").rstrip("\n")


@pytest.mark.parametrize(
    ("fault", "how"),
    [(f, "free_image") for f in sorted(FAULTS)]
    + [("zero-flag", "remove"), ("flipped-byte", "prune")],
)
def test_a_bad_base_is_not_merged(scene: ChainScene, fault: str, how: str) -> None:
    FAULTS[fault](scene.image(0), 0)
    before = scene.files()
    error = remove_base(scene, how)
    refusal = (
        f"refusing to merge {scene.volname(0)} into {scene.volname(1)}: {scene.volname(0)} "
        f"fails its check ({DEV}: {base_problem(scene)}); nothing was changed"
    )
    if how == "prune":  # prune goes on with the rest and names what it could not remove
        refusal = f"prune: {scene.volids[0]} could not be removed: {refusal}"
    assert error == refusal
    after = scene.files()
    mark = f"100/qemu-{TIMES[0]}/check-failed"
    assert set(after) - set(before) == {mark}  # the only change: the failure is recorded
    assert {k: v for k, v in after.items() if k != mark} == before
    assert scene.marks()[0] == f"{DEV}: {base_problem(scene)}"
    assert volids(scene.storage) == [*scene.volids, scene.other]
    assert not leftovers(scene.root)


def test_a_bad_child_is_not_merged_either(scene: ChainScene) -> None:
    flip_data_byte(scene.image(1), 4 * MiB)  # the first incremental's own cluster
    before = scene.files()
    with pytest.raises(IntegrityError) as exc:
        scene.storage.free_image(scene.volids[0])
    assert str(exc.value) == (
        f"refusing to merge {scene.volname(0)} into {scene.volname(1)}: {scene.volname(1)} "
        f"fails its check ({DEV}: {base_problem(scene)}); nothing was changed"
    )
    after = scene.files()
    assert set(after) - set(before) == {f"100/qemu-{TIMES[1]}/check-failed"}
    assert all(after[k] == v for k, v in before.items())


def test_a_good_base_is_merged_and_everything_still_restores(scene: ChainScene) -> None:
    scene.storage.free_image(scene.volids[0])
    assert volids(scene.storage) == [*scene.volids[1:], scene.other]
    assert all(r.ok for r in scene.storage.verify())
    for i in (1, 2):
        restore_and_compare(scene.storage, scene.volids[i], {DEV: scene.states[i]}, scene.tmp)


# ---------------------------------------------------------------------- the next backup


def find_by_verify(scene: ChainScene) -> None:
    assert not scene.storage.verify(scene.volids[0])[0].ok


def find_by_qemu_img_restore(scene: ChainScene) -> None:
    target = scene.tmp / "t.raw"
    cli(
        "restore", "--store", scene.root, "--storeid", STOREID, scene.volids[2],
        "--disk", f"{DEV}={target}", "--engine", "qemu-img", check=1,
    )  # fmt: skip


def find_by_removal(scene: ChainScene) -> None:
    remove_base(scene, "free_image")


def find_by_restore(scene: ChainScene) -> None:
    """Our engine's restore of the newest backup checks the base in its copy loop."""
    target = scene.tmp / "t.raw"
    cli(
        "restore", "--store", scene.root, "--storeid", STOREID, scene.volids[2],
        "--disk", f"{DEV}={target}", check=1,
    )  # fmt: skip
    assert not target.exists()


@pytest.mark.parametrize("found_by", ["verify", "qemu-img-restore", "removal", "restore"])
def test_no_incremental_on_a_backup_whose_check_failed(scene: ChainScene, found_by: str) -> None:
    flip_data_byte(scene.image(0), 0)
    {
        "verify": find_by_verify,
        "qemu-img-restore": find_by_qemu_img_restore,
        "removal": find_by_removal,
        "restore": find_by_restore,
    }[found_by](scene)
    assert scene.marks()[0] is not None
    scene.guest.change(DEV, "write -P 0x66 7M 64k")
    state = scene.guest.snapshot()[DEV]
    lines: list[str] = []
    host = Host(scene.storage, STOREID, log=lambda level, msg: lines.append(f"{level}: {msg}"))
    report = host.backup_vm(100, scene.guest.disks, start_time=4000)
    m = json.loads((Path(scene.storage.path(report.volid)[0]) / "manifest.json").read_text())
    assert (m["mode"], m["disks"][DEV]["mode"], m["disks"][DEV]["parent"]) == ("full", "full", None)
    # the log names the first backup of the chain found marked, and why
    if found_by == "qemu-img-restore":  # the restored backup is marked too
        why = f"{scene.volname(2)} failed its last check ({DEV}: its base {scene.volname(0)} "
        why += f"fails its check: {base_problem(scene)})"
    elif found_by == "restore":  # only the damaged layer is marked, by the copy loop
        why = f"{scene.volname(0)} failed its last check (backup {scene.volids[0]} {DEV}: the "
        why += "data in the chunk at offset 0 (16.0 MiB) does not match its digest: the backup "
        why += "is damaged)"
    else:
        why = f"{scene.volname(0)} failed its last check ({DEV}: {base_problem(scene)})"
    assert f"warn: {DEV}: {why}; no incremental on it, this backup is full" in lines, lines
    restore_and_compare(scene.storage, report.volid, {DEV: state}, scene.tmp)
    assert scene.storage.verify(report.volid)[0].ok
    # and the one after it builds on the new full backup again
    scene.guest.change(DEV, "write -P 0x77 8M 64k")
    state = scene.guest.snapshot()[DEV]
    report = Host(scene.storage, STOREID).backup_vm(100, scene.guest.disks, start_time=5000)
    m = json.loads((Path(scene.storage.path(report.volid)[0]) / "manifest.json").read_text())
    assert m["disks"][DEV]["parent"] == "backup/100/qemu-4000"
    restore_and_compare(scene.storage, report.volid, {DEV: state}, scene.tmp)


# ---------------------------------------------------------------------- qemu-img


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_qemu_img_is_never_served_a_bad_chain(scene: ChainScene, fault: str) -> None:
    FAULTS[fault](scene.image(0), 0)
    target = scene.tmp / "target.raw"
    proc = cli(
        "restore", "--store", scene.root, "--storeid", STOREID, scene.volids[2],
        "--disk", f"{DEV}={target}", "--engine", "qemu-img", check=1,
    )  # fmt: skip
    assert proc.stderr == (
        f"error: {scene.volname(2)}: {DEV}: its base {scene.volname(0)} fails its check: "
        f"{base_problem(scene)}; refused\n"
    )
    assert not target.exists()
    provider = scene.storage.new_backup_provider()
    for i in (0, 1):
        with pytest.raises(IntegrityError, match=NEEDLE):
            provider.restore_vm_volume_init(scene.volname(i), DEV, {})
        assert not provider._restores
    assert not servers_for(str(scene.tmp))
    marks = scene.marks()
    assert marks[0] == f"{DEV}: {base_problem(scene)}" and marks[2] is not None
    # the guest that is fine is still served
    state = scene.tmp / "g101.raw"
    qemu.run(
        ["qemu-img", "convert", "-O", "raw", str(scene.tmp / "g101" / f"{DEV}.qcow2"), str(state)]
    )
    restore_and_compare(scene.storage, scene.other, {DEV: state}, scene.tmp)


def test_a_backing_name_that_names_another_backup(scene: ChainScene) -> None:
    """One character of the newest image's backing name changed so that it
    names the full backup instead of its parent (an existing, valid image):
    the chain is not the one the manifests describe, and is refused."""
    image = scene.image(2)
    head = image.read_bytes()[:4096]
    old, new = b"../qemu-2000/drive-scsi0.qcow2", b"../qemu-1000/drive-scsi0.qcow2"
    assert head.count(old) == 1
    with open(image, "r+b") as f:
        f.seek(head.index(old))
        f.write(new)
    assert qcow2.read_header(image).backing_name == new.decode()
    problem = f"{DEV}: backing file is not {scene.volname(1)}"
    [result] = scene.storage.verify(scene.volids[2])
    assert result.problems == (problem,)
    target = scene.tmp / "target.raw"
    proc = cli(
        "restore", "--store", scene.root, "--storeid", STOREID, scene.volids[2],
        "--disk", f"{DEV}={target}", "--engine", "qemu-img", check=1,
    )  # fmt: skip
    refusal = (
        f"backup {scene.volids[2]} {DEV}: the backing file '../qemu-1000/{DEV}.qcow2' does not "
        f"lie in {scene.volname(1)}, the parent its manifest names; refused"
    )
    assert proc.stderr == f"error: {refusal}\n"
    assert not target.exists()
    assert scene.marks() == [None, None, refusal, None]  # its bases are fine


def test_restore_help_says_what_the_qemu_img_engine_costs() -> None:
    out = " ".join(cli("restore", "--help").stdout.split())
    assert "one extra read of the backup" in out


# ---------------------------------------------------------------------- the merge itself


def test_layer_views_agree_with_qemu_img_commit(scene: ChainScene) -> None:
    """The merged view of the top two layers of a chain, from our digests of
    each layer, equals that of the image `qemu-img commit` makes of them
    (QEMU is the independent oracle), with and without a layer beneath."""
    work = scene.tmp / "commit"
    shutil.copytree(Path(scene.storage.path(scene.volids[0])[0]).parent, work)
    gdir = work
    for depth, top in ((2, "qemu-2000"), (3, "qemu-3000")):
        child = gdir / top / f"{DEV}.qcow2"
        with qcow2.Chain(child, gdir) as chain:
            assert chain.depth == depth
            unit = chain.headers[0].cluster_size
            bottom = depth == 2
            chunk = 16 * MiB
            _, v0 = qcow2.layer_views(chain, 0, chunk, SIZE, unit, bottom=bottom)
            shadow = qcow2.allocated(chain, 0)
            _, v1 = qcow2.layer_views(chain, 1, chunk, SIZE, unit, bottom=bottom, shadow=shadow)
            base = Path(chain.paths[1])
        assert v0 is not None and v1 is not None
        expected = v0 + v1
        copy = work / f"c{depth}"
        shutil.copytree(gdir / top, copy / top)
        shutil.copytree(base.parent, copy / base.parent.name)
        if depth == 3:
            shutil.copytree(gdir / "qemu-1000", copy / "qemu-1000")
        qemu.run(["qemu-img", "commit", "-d", str(copy / top / f"{DEV}.qcow2")])
        committed = copy / base.parent.name / f"{DEV}.qcow2"
        _, got = qcow2.image_views(committed, chunk, SIZE, unit, bottom=bottom)
        assert got is not None and np.array_equal(got, expected), depth


def merged_of(scene: ChainScene, out: Path) -> tuple[Checker, MergeCheck]:
    checker = Checker(scene.storage.store)
    store = scene.storage.store
    child, base = (scene.storage.backup_id(v) for v in scene.volids[1::-1])
    child_rec = store.read_manifest(child).disks[DEV]  # type: ignore[union-attr]
    base_rec = store.read_manifest(base).disks[DEV]  # type: ignore[union-attr]
    with qcow2.Chain(scene.image(1), store.guest_dir(100)) as chain:
        check = check_merge(checker, chain, DEV, child, child_rec, base, base_rec)
        qcow2.merge_layers(chain, out)
    return checker, check


@pytest.mark.parametrize("damage", ["none", "flipped-byte", "zero-flag"])
def test_a_merged_image_must_read_as_its_checked_layers(scene: ChainScene, damage: str) -> None:
    """check_merged passes what the merge wrote and refuses anything else: a
    merge that wrote other data is never used."""
    out = scene.tmp / "merged.qcow2"
    checker, check = merged_of(scene, out)
    child, base = (scene.storage.backup_id(v) for v in scene.volids[1::-1])
    if damage == "none":
        digests = check_merged(checker, out, check, base, child)
        assert np.array_equal(digests, qcow2.image_digests(out, 16 * MiB, SIZE))
        return
    {"flipped-byte": flip_data_byte, "zero-flag": set_zero_flag}[damage](out, 0)
    with pytest.raises(IntegrityError, match="the merged image reads differently"):
        check_merged(checker, out, check, base, child)
    marks = scene.marks()  # both layers are marked: which one changed cannot be told
    assert marks[0] is not None and marks[0].startswith(f"{DEV}: merging ") and marks[1] == marks[0]


def test_merge_of_layers_with_different_cluster_sizes(tmp_path: Path) -> None:
    """An incremental of 512-byte clusters (an unaligned dirty region) merged
    with its 64 KiB base: checked, merged, verified, restored exactly."""
    storage = make_storage(tmp_path)
    raw = tmp_path / "disk.raw"  # the source: the provider punches what it has read
    content = bytearray(os.urandom(2 * MiB) + bytes(2 * MiB))
    raw.write_bytes(content)
    fd = os.open(raw, os.O_RDWR)

    def volumes(mode: str, *regions: tuple[int, int]) -> dict[str, dict[str, object]]:
        pieces = iter(regions)
        return {
            DEV: {
                "size": 4 * MiB,
                "bitmap-mode": mode,
                "file-handle": fd,
                "next-dirty-region": lambda: next(pieces, None),
            }
        }

    try:
        assert provider_backup(storage, 100, volumes("new", (0, 4 * MiB)), 1000) is None
        for data, offset in ((b"\x5a" * 1024, 4096 + 512), (bytes(512), MiB + 1024)):
            os.pwrite(fd, data, offset)
            content[offset : offset + len(data)] = data
        inc = volumes("reuse", (4096 + 512, 1024), (MiB + 1024, 512))
        assert provider_backup(storage, 100, inc, 2000) is None
    finally:
        os.close(fd)
    first, second = volids(storage)
    image = Path(storage.path(second)[0]) / f"{DEV}.qcow2"
    assert qcow2.read_header(image).cluster_size == 512
    storage.free_image(first)
    assert qcow2.read_header(image).cluster_size == 512
    assert qcow2.read_header(image).backing_name is None
    assert all(r.ok for r in storage.verify())
    state = tmp_path / "state.raw"
    state.write_bytes(content)
    restore_and_compare(storage, second, {DEV: state}, tmp_path)


@pytest.mark.parametrize("damage", ["garbage", "no-digests", "wrong-parent"])
def test_no_incremental_on_a_backup_a_restore_would_refuse(tmp_path: Path, damage: str) -> None:
    """A base whose manifest a restore cannot use (unreadable, digests gone, a
    parent that is not its backing file's backup) is no base: the next backup
    is full and restores exactly -- never an incremental nothing can restore."""
    storage = make_storage(tmp_path)
    guest = Guest(tmp_path, {DEV: 8 * MiB})
    host = Host(storage, STOREID)
    host.backup_vm(100, guest.disks, start_time=1000)
    guest.change(DEV, "write -P 0x31 1M 64k")
    host.backup_vm(100, guest.disks, start_time=2000)
    manifest = Path(storage.path(f"{STOREID}:backup/100/qemu-2000")[0]) / "manifest.json"
    m = json.loads(manifest.read_text())
    if damage == "garbage":
        manifest.write_text("not json")
    elif damage == "no-digests":
        m["disks"][DEV]["digest_chunk"] = 3
        manifest.write_text(json.dumps(m))
    else:
        m["disks"][DEV]["parent"] = None
        manifest.write_text(json.dumps(m))
    guest.change(DEV, "write -P 0x32 2M 64k")
    state = guest.snapshot()[DEV]
    lines: list[str] = []
    report = Host(
        storage, STOREID, log=lambda level, msg: lines.append(f"{level}: {msg}")
    ).backup_vm(100, guest.disks, start_time=3000)
    m = json.loads((Path(storage.path(report.volid)[0]) / "manifest.json").read_text())
    assert (m["mode"], m["disks"][DEV]["parent"]) == ("full", None), lines
    assert any(f"{DEV}: its last backup qemu-2000 is no valid base" in line for line in lines), (
        lines
    )
    restore_and_compare(storage, report.volid, {DEV: state}, tmp_path)
