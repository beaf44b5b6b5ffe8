"""DIRBACKUP_TIMINGS: the command's phase timings on stderr (dirbackup.timings).

The benchmark (bench/report.py) reads these lines to say where the command's
time goes; these tests pin their form and that they cost nothing unasked.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import MiB

from dirbackup import qemu

PREFIX = "dirbackup timing: "
BACKUP_PHASES = [  # in the order a backup passes them
    "backup init (store lock, partial dir)",
    "disk sizes and bitmaps",
    "snapshot access",
    "copy",
    "qcow2 finish",
    "publish (fsync, rename)",
    "qemu-nbd stop",
    "bitmaps advance",
    "backup cleanup",
]


def run(env_value: str | None, *args: object) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "DIRBACKUP_TIMINGS"}
    if env_value is not None:
        env["DIRBACKUP_TIMINGS"] = env_value
    proc = subprocess.run(
        [sys.executable, "-m", "dirbackup", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return proc


def timings(stderr: str) -> list[tuple[str, float, int]]:
    rows = []
    for line in stderr.splitlines():
        if line.startswith(PREFIX):
            name, seconds, count = line[len(PREFIX) :].rsplit(" ", 2)
            rows.append((name, float(seconds), int(count)))
    return rows


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    path = tmp_path / "disk.qcow2"
    qemu.img_create(path, 16 * MiB)
    qemu.io(path, "write -P 7 0 3M", "write -P 9 9M 1M")
    (tmp_path / "store").mkdir()
    return path


def backup(env_value: str | None, disk: Path) -> subprocess.CompletedProcess[str]:
    store = disk.parent / "store"
    return run(
        env_value,
        *["backup", "--store", store, "--vmid", "100", "--disk", f"drive-scsi0={disk}"],
        "--json",
    )


def test_backup_and_restore_report_their_phases(disk: Path) -> None:
    proc = backup("1", disk)
    report = json.loads(proc.stdout)  # stdout is untouched: one JSON line
    assert report["disks"]["drive-scsi0"]["read"] == 4 * MiB
    rows = timings(proc.stderr)
    names = [n for n, _, _ in rows]
    assert names[0] == "startup" and names[-1] == "total"
    assert [n for n in names if n in BACKUP_PHASES] == BACKUP_PHASES
    # qemu-img calls of the bitmap set-up are counted, nested in the phases
    found = {n: (s, c) for n, s, c in rows}
    assert found["qemu-img info"][1] >= 1 and found["qemu-img bitmap"][1] >= 1
    assert all(s >= 0 for s, _ in found.values())
    assert found["copy"][0] > 0 and found["startup"][0] > 0
    assert found["total"][0] >= sum(found[n][0] for n in BACKUP_PHASES)
    assert len(names) == len(set(names))  # one line per phase, entries summed

    out = disk.parent / "restored.raw"
    store = disk.parent / "store"
    proc = run("yes", "restore", "--store", store, report["volid"], "--disk", f"drive-scsi0={out}")
    names = [n for n, _, _ in timings(proc.stderr)]
    assert names == [
        "startup",
        "open and validate chain",
        "restore copy (incl. fsync, rename)",
        "total",
    ]
    ok, msg = qemu.img_compare(out, disk, "raw", "qcow2")
    assert ok, msg


@pytest.mark.parametrize("value", [None, "", "0"])
def test_nothing_is_printed_unless_asked(disk: Path, value: str | None) -> None:
    proc = backup(value, disk)
    assert PREFIX not in proc.stderr
    assert proc.stderr == ""


def test_qemu_img_calls_of_a_backup(disk: Path) -> None:
    """The fixed cost of the command: one `qemu-img info` per qcow2 disk (its
    bitmaps and backing chain; sizes come from the header, formats from the
    magic bytes), the bitmap lifecycle by `qemu-img bitmap`; none for a raw
    disk.  Counted from the timing lines, the calls' own count."""

    def calls(*args: object) -> dict[str, int]:
        proc = run("1", "backup", "--store", disk.parent / "store", "--vmid", "100", *args)
        return {n: c for n, _, c in timings(proc.stderr) if n.startswith("qemu-img ")}

    qcow = ["--disk", f"drive-scsi0={disk}"]
    # full: info; bitmap add .next, then merge it into the new generation, remove it
    assert calls(*qcow) == {"qemu-img info": 1, "qemu-img bitmap": 3}
    qemu.io(disk, "write -P 5 1M 64k")
    # incremental: the same, and the generation read is removed
    assert calls(*qcow) == {"qemu-img info": 1, "qemu-img bitmap": 4}
    raw = disk.parent / "disk.raw"
    raw.write_bytes(b"\x01" * MiB)
    assert calls("--disk", f"drive-scsi1={raw}") == {}
