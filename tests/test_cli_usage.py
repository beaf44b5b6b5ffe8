"""The command line as users type it: global options anywhere, each error once
on one line with the same exit status in every command, progress bars on a
terminal only."""

from __future__ import annotations

import os
import pty
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from faultlib import cli as dirbackup

from dirbackup import qemu

MiB = 1 << 20


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


# ------------------------------------------------------------ errors: one line, once


def backup_of(vm: dict[str, Path], *extra: str) -> str:
    out = dirbackup(
        "backup",
        "--store",
        str(vm["store"]),
        "--vmid",
        "100",
        "--disk",
        f"drive-scsi0={vm['disk']}",
        *extra,
    ).stdout
    return out.split(": ", 1)[0]


def test_a_locked_disk_is_one_line_once(vm: dict[str, Path]) -> None:
    holder = subprocess.Popen(
        ["qemu-io", "-f", "qcow2", str(vm["disk"])],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while not qemu.image_locked(vm["disk"]) and time.monotonic() < deadline:
            time.sleep(0.05)
        line = (
            f"error: disk image {vm['disk']} is in use by another process (a VM, qemu-nbd or "
            "qemu-img holds its image lock)\n"
        )
        for verbose in ([], ["-v"]):
            proc = dirbackup(
                "backup",
                "--store",
                str(vm["store"]),
                "--vmid",
                "100",
                "--disk",
                f"drive-scsi0={vm['disk']}",
                *verbose,
                check=1,
            )
            if verbose:  # the log as it goes, then the failure once, last
                assert proc.stderr.endswith(line) and proc.stderr.count("error") == 1
                assert "err:" not in proc.stderr and "qemu-img: " not in proc.stderr
            else:
                assert proc.stderr == line
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(30)


def test_operational_errors_are_one_exact_line(vm: dict[str, Path]) -> None:
    s = ["--store", str(vm["store"])]
    disk = ["--vmid", "100", "--disk"]
    proc = dirbackup("backup", *s, *disk, "drive-scsi0=/nonexistent.qcow2", check=1)
    assert proc.stderr == "error: disk image /nonexistent.qcow2 does not exist\n"
    bad = vm["tmp"] / "bad.qcow2"  # a qcow2 header qemu-img refuses
    qemu.img_create(bad, 16 * MiB)
    with open(bad, "r+b") as f:
        f.seek(40)
        f.write(b"\xff\xff\xff\xff")
    proc = dirbackup("backup", *s, *disk, f"drive-scsi0={bad}", check=1)
    assert (
        proc.stderr
        == f"error: qemu-img info: Could not open '{bad}': Active L1 table offset invalid\n"
    )
    proc = dirbackup("restore", *s, "100/qemu-1", "--disk", "drive-scsi0=/tmp/x", check=1)
    assert proc.stderr == f"error: backup 100/qemu-1 does not exist in {vm['store']}\n"
    volid = backup_of(vm, "--protected")
    proc = dirbackup("remove", *s, volid, check=1)
    name = volid.split("backup/", 1)[1]
    assert proc.stderr == f"error: backup {name} is protected; unprotect it first\n"
    manifest = vm["store"] / name / "manifest.json"
    manifest.write_text("garbage\n")  # a damaged store
    proc = dirbackup("restore", *s, volid, "--disk", f"drive-scsi0={vm['tmp'] / 'r.raw'}", check=1)
    assert proc.stderr == (
        f"error: {manifest}: unreadable manifest (Expecting value: line 1 column 1 (char 0))\n"
    )


@pytest.mark.parametrize("command", ["backup", "restore"])
def test_a_device_given_twice_is_a_usage_error_of_the_command(
    vm: dict[str, Path], command: str
) -> None:
    s = ["--store", str(vm["store"])]
    twice = ["--disk", f"drive-scsi0={vm['tmp'] / 'a'}", "--disk", f"drive-scsi0={vm['tmp'] / 'b'}"]
    if command == "backup":
        args = ["backup", *s, "--vmid", "100", *twice]
    else:
        args = ["restore", *s, backup_of(vm), *twice]
    proc = dirbackup(*args, check=2)
    lines = proc.stderr.splitlines()
    assert lines[0].startswith(f"usage: dirbackup {command} [-h] --store DIR")
    assert lines[-1] == f"dirbackup {command}: error: device drive-scsi0 given twice"
    assert proc.stdout == ""


def test_a_usage_error_found_late_prints_the_command_usage(vm: dict[str, Path]) -> None:
    s = ["--store", str(vm["store"])]
    volid = backup_of(vm)
    proc = dirbackup("restore", *s, volid, "--rootfs", str(vm["tmp"] / "ct"), check=2)
    lines = proc.stderr.splitlines()
    assert lines[0].startswith("usage: dirbackup restore [-h]")
    assert lines[-1] == (
        f"dirbackup restore: error: {volid} is a VM backup: restore it with --disk DEV=TARGET"
    )
    proc = dirbackup("prune", *s, "--vmid", "100", check=2)
    assert proc.stderr.startswith("usage: dirbackup prune [-h]")
    assert proc.stderr.splitlines()[-1] == (
        "dirbackup prune: error: give at least one --keep-* option (prune keeps everything "
        "otherwise)"
    )


# ------------------------------------------------------------ progress bars


def on_terminal(*args: str) -> tuple[int, str]:
    """Run dirbackup with stdout and stderr on a pseudo-terminal: its exit
    status and everything it showed there."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "dirbackup", *args],
        stdin=subprocess.DEVNULL,
        stdout=slave,
        stderr=slave,
    )
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the last holder of the terminal's other side is gone
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    return proc.wait(300), b"".join(chunks).decode(errors="replace")


BAR = re.compile(
    r"\r(?P<item>\S+) +\[#+\] 100\.0% +(?P<done>[\d.]+ \w+) / (?P<total>[\d.]+ \w+) +"
    r"[\d.]+ \w+/s ETA +\d+s\r?\n"
)


def bars(shown: str) -> dict[str, str]:
    """The completed bars on a terminal: item -> its total."""
    return {m["item"]: m["total"] for m in BAR.finditer(shown)}


def test_bars_for_each_disk_on_a_terminal_and_none_otherwise(vm: dict[str, Path]) -> None:
    s = ["--store", str(vm["store"])]
    raw = vm["tmp"] / "disk1.raw"
    with open(raw, "wb") as f:
        f.truncate(8 * MiB)
        f.write(os.urandom(2 * MiB))
    disks = ["--disk", f"drive-scsi0={vm['disk']}", "--disk", f"drive-scsi1={raw}"]
    status, shown = on_terminal("backup", *s, "--vmid", "100", *disks)
    assert status == 0, shown
    assert bars(shown) == {"drive-scsi0": "4.0 MiB", "drive-scsi1": "2.0 MiB"}, shown
    volid = shown.splitlines()[-1].split(": ", 1)[0]
    restored = ["--disk", f"drive-scsi0={vm['tmp'] / 'r0.raw'}"]
    status, shown = on_terminal("restore", *s, volid, *restored)
    assert status == 0 and list(bars(shown)) == ["drive-scsi0"], shown
    status, shown = on_terminal("verify", *s)
    assert status == 0 and set(bars(shown)) == {"100/drive-scsi0", "100/drive-scsi1", "100/files"}
    assert re.search(r"\r100/drive-scsi0 +\[-+\] +0\.0% ", shown), shown  # before the first read
    # not a terminal: the summary only, on stdout; nothing on stderr
    for command in (
        ["backup", *s, "--vmid", "100", *disks],
        ["restore", *s, volid, "--disk", f"drive-scsi0={vm['tmp'] / 'r1.raw'}"],
        ["verify", *s],
    ):
        proc = dirbackup(*command)
        assert proc.stderr == "" and "\r" not in proc.stdout and "ETA" not in proc.stdout


def test_a_container_backup_shows_the_bytes_of_its_tar_stream(tmp_path: Path) -> None:
    store, rootfs = tmp_path / "store", tmp_path / "ct"
    store.mkdir()
    rootfs.mkdir()
    (rootfs / "data").write_bytes(os.urandom(6 * MiB))
    # slowed down so that the stream is seen going before it ends
    args = ["backup", "--store", str(store), "--vmid", "200", "--rootfs", str(rootfs)]
    status, shown = on_terminal(*args, "--bwlimit", "8MiB")
    assert status == 0, shown
    assert re.search(r"\rrootfs +[\d.]+ \w+ +[\d.]+ \w+/s", shown), shown  # no total yet
    assert list(bars(shown)) == ["rootfs"], shown
    proc = dirbackup(*args)
    assert proc.stderr == "" and proc.stdout.count("\n") == 1
