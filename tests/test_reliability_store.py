"""Reliability: one bad directory in a store never stops `verify` or `prune`
of the rest.  It is reported, the rest is verified or pruned, and the
command fails at the end (exit 1, PruneError from the API).

Damages: manifests with wrong JSON shapes or field types, an entry named
like a backup that is a file, a symlink or out of the time range, a guest
entry that is a symlink or out of range, a removed base, and -- read by a
process without CAP_DAC_OVERRIDE, as a non-root operator would -- an
unreadable manifest, backup directory or guest directory."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import MiB, assert_same
from faultlib import cli, volids
from guests import STOREID, Guest, make_storage

from dirbackup.errors import DirbackupError
from dirbackup.host import Host
from dirbackup.storage import DirectoryStorage, PruneError

DEV = "drive-scsi0"
TIMES = (1000, 2000, 3000)


class Scene:
    """Guests 100 and 101 with a chain of three backups each; the raw state
    of guest 100 at its newest backup."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.store = root / "store"
        self.storage = DirectoryStorage(STOREID, {"path": str(self.store)})
        self.newest = root / "state-100.raw"

    @classmethod
    def build(cls, root: Path) -> Scene:
        storage = make_storage(root)
        host = Host(storage, STOREID)
        for vmid in (100, 101):
            (root / f"g{vmid}").mkdir()
            guest = Guest(root / f"g{vmid}", {DEV: 4 * MiB})
            for i, t in enumerate(TIMES):
                guest.change(DEV, f"write -P 0x{0x10 + i:02x} {i}M 64k")
                host.backup_vm(vmid, guest.disks, start_time=t)
            if vmid == 100:
                os.rename(guest.snapshot()[DEV], root / "state-100.raw")
        return cls(root)

    def copy(self, dst: Path) -> Scene:
        shutil.copytree(self.root, dst, symlinks=True, dirs_exist_ok=True)
        return Scene(dst)

    def volid(self, vmid: int, t: int) -> str:
        return f"{STOREID}:backup/{vmid}/qemu-{t}"

    def backup(self, vmid: int, t: int) -> Path:
        return self.store / str(vmid) / f"qemu-{t}"

    def edit_manifest(self, t: int, change: Callable[[dict], object]) -> None:
        path = self.backup(100, t) / "manifest.json"
        m = json.loads(path.read_text())
        path.write_text(json.dumps(change(m)))


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Scene:
    return Scene.build(tmp_path_factory.mktemp("store-scene"))


@pytest.fixture
def scene(template: Scene, tmp_path: Path) -> Scene:
    return template.copy(tmp_path)


def _disk(m: dict, **fields: object) -> dict:
    m["disks"][DEV].update(fields)
    return m


# name: (damage, what verify must report, whether guest 100's newest backup still restores)
DAMAGES: dict[str, tuple[Callable[[Scene], object], str, bool]] = {
    "manifest-not-an-object": (
        lambda s: (s.backup(100, 2000) / "manifest.json").write_text("[]"),
        "qemu-2000/manifest.json: unreadable manifest (not a JSON object)",
        False,  # the base's digests cannot be read: a restore checks every layer
    ),
    "manifest-disks-a-list": (
        lambda s: s.edit_manifest(2000, lambda m: {**m, "disks": []}),
        "unreadable manifest (disks and files must be objects of objects)",
        False,  # the base's digests cannot be read: a restore checks every layer
    ),
    "manifest-digests-a-list": (
        lambda s: s.edit_manifest(2000, lambda m: _disk(m, digests=[1])),
        f"unreadable manifest ({DEV}: digests is not of type dict[str, str])",
        False,  # the base's digests cannot be read: a restore checks every layer
    ),
    "manifest-protected-a-string": (
        lambda s: s.edit_manifest(2000, lambda m: {**m, "protected": "no"}),
        "unreadable manifest (manifest: protected is not of type bool)",
        False,  # the base's digests cannot be read: a restore checks every layer
    ),
    "time-beyond-the-range": (
        lambda s: s.backup(100, 9_999_999_999_999).mkdir(),
        "qemu-9999999999999: named like a backup, but its time is beyond the supported range",
        True,
    ),
    "file-named-like-a-backup": (
        lambda s: s.backup(100, 4000).write_text("not a backup\n"),
        "qemu-4000: named like a backup, but not a directory (a symbolic link?)",
        True,
    ),
    "symlink-named-like-a-backup": (
        lambda s: s.backup(100, 4000).symlink_to(s.backup(101, 3000)),
        "qemu-4000: named like a backup, but not a directory (a symbolic link?)",
        True,
    ),
    "guest-symlink": (
        lambda s: (s.store / "102").symlink_to(s.store / "101"),
        "store/102: named like a guest, but not a directory (a symbolic link?)",
        True,
    ),
    "guest-id-out-of-range": (
        lambda s: (s.store / "1000000000").mkdir(),
        "store/1000000000: named like a guest, but not a guest id in range",
        True,
    ),
    "base-removed": (
        lambda s: shutil.rmtree(s.backup(100, 1000)),
        "backing file '../qemu-1000/drive-scsi0.qcow2' cannot be opened",
        False,
    ),
}


@pytest.mark.parametrize("name", list(DAMAGES))
def test_one_bad_entry_stops_neither_verify_nor_prune(scene: Scene, name: str) -> None:
    damage, needle, restorable = DAMAGES[name]
    damage(scene)
    other = [scene.volid(101, t) for t in TIMES]

    # verify, storage API: everything else is checked, the damage is reported
    results = {r.volid: r for r in scene.storage.verify()}
    assert all(results[v].ok for v in other), results
    bad = [(v, r.problems) for v, r in results.items() if not r.ok]
    assert any(needle in f"{v}: {p}" for v, problems in bad for p in problems), bad

    # verify, command line: every backup of guest 101 is ok, the damage is
    # printed, and the exit status is 1 with one error line at the end
    proc = cli("verify", "--store", scene.store, "--storeid", STOREID, check=1)
    for v in other:
        assert f"{v}: ok (" in proc.stdout, proc.stdout
    assert needle in proc.stdout.replace(": FAILED\n  ", ": "), proc.stdout
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: ") and proc.stderr.endswith("failed verification\n")

    # prune of the whole store, storage API: guest 101 is pruned, the damage
    # is reported, PruneError at the end (with the marks)
    lines: list[tuple[str, str]] = []
    with pytest.raises(PruneError) as exc:
        scene.storage.prune_backups("keep-last=1", log=lambda lvl, msg: lines.append((lvl, msg)))
    assert volids(scene.storage, 101) == [scene.volid(101, 3000)]
    assert {e["volid"]: e["mark"] for e in exc.value.entries}[scene.volid(101, 3000)] == "keep"
    errors = [msg for lvl, msg in lines if lvl == "err"]
    assert errors and str(exc.value) == "prune: " + errors[0] + (
        f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    )
    assert scene.volid(100, 3000) in volids(scene.storage, 100)
    target = scene.root / "restored.raw"
    if restorable:
        Host(scene.storage, STOREID).restore_vm(scene.volid(100, 3000), {DEV: target})
        assert_same(target, scene.newest)
    else:  # refused with a clear error, nothing written
        with pytest.raises(DirbackupError):
            Host(scene.storage, STOREID).restore_vm(scene.volid(100, 3000), {DEV: target})
        assert not target.exists()
    assert scene.storage.verify(scene.volid(101, 3000))[0].ok


@pytest.mark.parametrize("name", ["manifest-not-an-object", "base-removed"])
def test_cli_prune_reports_and_fails_at_the_end(scene: Scene, name: str) -> None:
    DAMAGES[name][0](scene)
    s = ["--store", scene.store, "--storeid", STOREID]
    proc = cli("prune", *s, "--vmid", 100, "--keep-last", 1, check=1)
    assert "Traceback" not in proc.stderr
    assert f"{scene.volid(100, 3000)}  keep" in proc.stdout
    last = proc.stderr.splitlines()[-1]
    assert last.startswith("error: prune: "), proc.stderr
    # each failure once, as an error line; no log block repeating them
    assert not [line for line in proc.stderr.splitlines() if line.startswith("err: ")]
    assert len(set(proc.stderr.splitlines())) == len(proc.stderr.splitlines())
    # the other guest's prune is not affected
    cli("prune", *s, "--vmid", 101, "--keep-last", 1)
    assert volids(scene.storage, 101) == [scene.volid(101, 3000)]


def test_a_base_is_not_removed_while_a_later_backup_cannot_be_read(scene: Scene) -> None:
    """A later backup whose manifest is unreadable may build on the one being
    removed: removing it would break that chain, so it stays (reported)."""
    (scene.backup(100, 2000) / "manifest.json").write_text("{")
    lines: list[str] = []
    with pytest.raises(PruneError, match=r"qemu-2000 kept: .*unreadable manifest .*\(and 1 more\)"):
        scene.storage.prune_backups("keep-last=1", vmid=100, log=lambda _l, m: lines.append(m))
    assert lines[1].startswith(
        f"{scene.volid(100, 1000)} could not be removed: the later backup "
        "backup/100/qemu-2000 cannot be read and may build on backup/100/qemu-1000 ("
    ), lines
    assert volids(scene.storage, 100) == [scene.volid(100, t) for t in TIMES]
    assert (scene.backup(100, 1000) / f"{DEV}.qcow2").is_file()


# ---------------------------------------------------------------------- permissions

WITHOUT_DAC = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]


def cli_without_dac(*args: object) -> subprocess.CompletedProcess[str]:
    """The command line as root without the right to override file modes
    (owner bits then apply to it, as to any user)."""
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv is not installed")
    cmd = [*WITHOUT_DAC, sys.executable, "-m", "dirbackup", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


UNREADABLE = {
    "manifest": (
        lambda s: s.backup(100, 2000) / "manifest.json",
        "manifest.json: Permission denied",
    ),
    "backup-directory": (lambda s: s.backup(100, 2000), "manifest.json: Permission denied"),
    "guest-directory": (lambda s: s.store / "101", "store/101: cannot be read: Permission denied"),
}


@pytest.mark.parametrize("what", list(UNREADABLE))
def test_unreadable_entries_are_reported_and_the_rest_goes_on(scene: Scene, what: str) -> None:
    where, needle = UNREADABLE[what]
    path = where(scene)
    os.chmod(path, 0)
    try:
        s = ["--store", scene.store, "--storeid", STOREID]
        probe = cli_without_dac("list", *s)
        if probe.returncode != 0 and "Operation not permitted" in probe.stderr:
            pytest.skip(f"cannot drop capabilities: {probe.stderr.strip()}")
        assert probe.returncode == 0, probe  # listed all the same
        assert scene.volid(100, 3000) in probe.stdout
        proc = cli_without_dac("verify", *s)
        assert proc.returncode == 1, proc
        assert "Traceback" not in proc.stderr
        assert needle in proc.stdout.replace(": FAILED\n  ", ": "), proc.stdout
        assert f"{scene.volid(100, 1000)}: ok (" in proc.stdout
        if what != "guest-directory":
            assert f"{scene.volid(101, 3000)}: ok (" in proc.stdout
        assert proc.stderr.endswith("failed verification\n")

        proc = cli_without_dac("prune", *s, "--vmid", 100, "--keep-last", 1)
        assert "Traceback" not in proc.stderr
        if what == "guest-directory":  # guest 100 itself is fine
            assert proc.returncode == 0, proc
            assert volids(scene.storage, 100) == [scene.volid(100, 3000)]
        else:  # 2000 kept (it might be protected); 1000 kept (2000 may build on it)
            assert proc.returncode == 1, proc
            assert proc.stderr.splitlines()[-1].startswith("error: prune: ")
            assert f"{scene.volid(100, 2000)}  protected" in proc.stdout
            assert volids(scene.storage, 100) == [scene.volid(100, t) for t in TIMES]
    finally:
        os.chmod(path, 0o755 if path.is_dir() else 0o644)
    assert all(r.ok for r in scene.storage.verify())
