"""The command line as users type it: global options anywhere, each error once
on one line with the same exit status in every command, progress bars on a
terminal only."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dirbackup import qemu

MiB = 1 << 20


def dirbackup(*args: str, check: int | None = 0) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "dirbackup", *args], capture_output=True, text=True, timeout=300
    )
    if check is not None:
        assert proc.returncode == check, (proc.returncode, proc.stdout, proc.stderr)
    return proc


@pytest.fixture
def vm(tmp_path: Path) -> dict[str, Path]:
    disk = tmp_path / "disk0.qcow2"
    qemu.img_create(disk, 16 * MiB)
    qemu.io(disk, "write -P 1 0 4M")
    store = tmp_path / "store"
    store.mkdir()
    return {"disk": disk, "store": store, "tmp": tmp_path}


# ------------------------------------------------------------ global options


@pytest.mark.parametrize("where", ["before", "after"])
def test_verbose_before_or_after_the_command(vm: dict[str, Path], where: str) -> None:
    cmd = ["backup", "--store", str(vm["store"]), "--vmid", "100"]
    cmd += ["--disk", f"drive-scsi0={vm['disk']}"]
    args = ["-v", *cmd] if where == "before" else [*cmd, "--verbose"]
    proc = dirbackup(*args)
    assert "drive-scsi0: full backup of 16.0 MiB" in proc.stderr
    quiet = dirbackup(*cmd)
    assert quiet.stderr == ""  # not a terminal: no bars, no log


@pytest.mark.parametrize(
    "command",
    [
        ["list", "--store", "/nonexistent"],
        ["verify", "--store", "/nonexistent"],
        ["restore", "--store", "/nonexistent", "100/qemu-1", "--disk", "a=b"],
        ["backup", "--store", "/nonexistent", "--vmid", "1", "--disk", "a=b"],
        ["prune", "--store", "/nonexistent", "--vmid", "1", "--keep-last", "1"],
        ["notes", "--store", "/nonexistent", "100/qemu-1"],
    ],
)
def test_debug_before_or_after_the_command(command: list[str]) -> None:
    line = "error: backup store /nonexistent does not exist or is not a directory "
    line += "(create it with mkdir)\n"
    assert dirbackup(*command, check=1).stderr == line
    for args in (
        ["--debug", *command],
        [*command, "--debug"],
        [command[0], "--debug", *command[1:]],
    ):
        proc = dirbackup(*args, check=None)
        assert proc.returncode == 1 and "Traceback" in proc.stderr, args


def test_version_and_verbose_after_list(vm: dict[str, Path]) -> None:
    out = dirbackup("list", "--store", str(vm["store"]), "--version").stdout
    assert out.startswith("dirbackup ")
    proc = dirbackup("list", "--store", str(vm["store"]), "-v")
    assert proc.stdout == "" and proc.stderr == "no backups\n"
    assert "global options:" in dirbackup("list", "--help").stdout
