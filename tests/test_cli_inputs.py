"""The command line's inputs (issue 15): configuration files that are not
UTF-8, verify with nothing to verify, one image given twice, bandwidth units
and --json output; each refusal checked by its exact line and exit code."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import MiB
from faultlib import cli as dirbackup

from dirbackup import qemu
from dirbackup.errors import HostError
from dirbackup.host import Disk, Host
from dirbackup.storage import DirectoryStorage
from dirbackup.units import MIN_RATE, parse_rate, parse_size


def last_line(proc: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in proc.stderr
    return proc.stderr.rstrip("\n").splitlines()[-1]


@pytest.fixture
def vm(tmp_path: Path) -> dict[str, Path]:
    disk0 = tmp_path / "disk0.qcow2"
    qemu.img_create(disk0, 4 * MiB)
    qemu.io(disk0, "write -P 1 0 1M")
    disk1 = tmp_path / "disk1.raw"
    with open(disk1, "wb") as f:
        f.truncate(2 * MiB)
        f.write(os.urandom(4096))
    store = tmp_path / "store"
    store.mkdir()
    return {"disk0": disk0, "disk1": disk1, "store": store, "tmp": tmp_path}


# ------------------------------------------------------------- config not UTF-8

NOT_UTF8 = b"memory: 512\nname: caf\xe9\n# \xff\xfe broken \xc3(\n"


def test_config_that_is_not_utf8_is_stored_byte_for_byte(vm: dict[str, Path]) -> None:
    conf = vm["tmp"] / "100.conf"
    conf.write_bytes(NOT_UTF8)
    fw = vm["tmp"] / "100.fw"
    fw.write_bytes(b"[OPTIONS]\nenable: \x80\n")
    with pytest.raises(UnicodeDecodeError):
        NOT_UTF8.decode()
    s = ["--store", str(vm["store"])]
    out = dirbackup(
        "backup", *s, "--vmid", "100", "--disk", f"drive-scsi0={vm['disk0']}",
        "--config", str(conf), "--firewall", str(fw),
    ).stdout  # fmt: skip
    volid = out.split(": ")[0]
    storage = DirectoryStorage("dirbackup", {"path": str(vm["store"])})
    files = list(storage.store.backup_dir(storage.backup_id(volid)).iterdir())
    drive_map = b"#qmdump#map:scsi0:drive-scsi0::qcow2:\n"  # the host's (test_host_pve)
    assert [f for f in files if f.read_bytes() == NOT_UTF8 + drive_map]
    assert [f for f in files if f.read_bytes() == fw.read_bytes()]
    provider = storage.new_backup_provider()
    volname = volid.split(":", 1)[1]
    assert provider.archive_get_guest_config(volname) == (NOT_UTF8 + drive_map).decode(
        "utf-8", "replace"
    )
    assert provider.archive_get_firewall_config(volname) == "[OPTIONS]\nenable: \ufffd\n"
    assert dirbackup("verify", *s, volid).stdout.startswith(f"{volid}: ok")
    target = vm["tmp"] / "r.raw"
    dirbackup("restore", *s, volid, "--disk", f"drive-scsi0={target}")
    qemu.run(["qemu-img", "compare", "-U", str(vm["disk0"]), str(target)])


def test_container_config_that_is_not_utf8_is_stored_byte_for_byte(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "hostname").write_text("ct\n")
    conf = tmp_path / "200.conf"
    conf.write_bytes(NOT_UTF8)
    store = tmp_path / "store"
    store.mkdir()
    out = dirbackup(
        "backup", "--store", str(store), "--vmid", "200", "--rootfs", str(root),
        "--config", str(conf),
    ).stdout  # fmt: skip
    storage = DirectoryStorage("dirbackup", {"path": str(store)})
    files = storage.store.backup_dir(storage.backup_id(out.split(": ")[0])).iterdir()
    assert [f for f in files if f.read_bytes() == NOT_UTF8]


# ------------------------------------------------------------- verify of nothing


def test_verify_with_nothing_to_verify_is_an_error(vm: dict[str, Path]) -> None:
    store = str(vm["store"])
    proc = dirbackup("verify", "--store", store, check=1)
    assert proc.stdout == ""
    assert proc.stderr == f"error: no backups to verify in {store}\n"
    dirbackup("backup", "--store", store, "--vmid", "100", "--disk", f"d0={vm['disk1']}")
    proc = dirbackup("verify", "--store", store, "--vmid", "555", check=1)
    assert proc.stdout == ""
    assert proc.stderr == f"error: no backups of guest 555 to verify in {store}\n"
    assert ": ok" in dirbackup("verify", "--store", store, "--vmid", "100").stdout


# ------------------------------------------------------------- one image twice


@pytest.mark.parametrize("how", ["same path", "symlink", "hard link", "same device"])
def test_one_image_for_two_devices_is_a_usage_error(vm: dict[str, Path], how: str) -> None:
    disk = vm["disk0"]
    other = vm["tmp"] / "other.qcow2"
    if how == "symlink":
        other.symlink_to(disk)
    elif how == "hard link":
        os.link(disk, other)
    else:
        other = disk
    second = "drive-scsi0" if how == "same device" else "drive-scsi1"
    disk_args = ["--disk", f"drive-scsi0={disk}", "--disk", f"{second}={other}"]
    proc = dirbackup("backup", "--store", str(vm["store"]), "--vmid", "100", *disk_args, check=2)
    expected = {
        "same path": f"{disk} is given as both drive-scsi0 and drive-scsi1",
        "symlink": f"{other} (the same image as {disk}) is given as both drive-scsi0 and "
        "drive-scsi1",
        "hard link": f"{other} (the same image as {disk}) is given as both drive-scsi0 and "
        "drive-scsi1",
        "same device": "device drive-scsi0 given twice",
    }[how]
    assert last_line(proc) == f"dirbackup backup: error: {expected}"
    assert proc.stdout == "" and not list(vm["store"].iterdir())
    assert "bitmaps" not in qemu.run(["qemu-img", "info", "-U", str(disk)])


def test_two_images_of_equal_content_are_two_disks(vm: dict[str, Path]) -> None:
    copy = vm["tmp"] / "copy.raw"
    copy.write_bytes(vm["disk1"].read_bytes())
    disk_args = ["--disk", f"drive-scsi0={vm['disk1']}", "--disk", f"drive-scsi1={copy}"]
    out = dirbackup("backup", "--store", str(vm["store"]), "--vmid", "100", *disk_args).stdout
    assert "drive-scsi0 full, drive-scsi1 full" in out


# ------------------------------------------------------------- sizes and rates


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("1048576", 1 << 20),
        ("512B", 512),
        ("64K", 64 << 10),
        ("64k", 64 << 10),
        ("64KiB", 64 << 10),
        ("64KB", 64_000),
        ("64kB", 64_000),
        ("100M", 100 << 20),
        ("100MiB", 100 << 20),
        ("100MB", 100_000_000),
        ("1.5G", 3 << 29),
        ("1.5GiB", 3 << 29),
        ("2GB", 2_000_000_000),
        ("1T", 1 << 40),
        ("1TiB", 1 << 40),
        ("1TB", 10**12),
        (" 10 MiB ", 10 << 20),
    ],
)
def test_parse_size_reads_every_unit(text: str, size: int) -> None:
    assert parse_size(text) == size
    rate = parse_rate(text + "/s") if size >= MIN_RATE and not text.strip().isdigit() else None
    assert rate in (None, size)


@pytest.mark.parametrize("text", ["fast", "", "MB", "-1M", "1e6", "50Mb", "50mb", "1PB", "1 2M"])
def test_parse_size_refuses_what_is_not_a_size(text: str) -> None:
    with pytest.raises(ValueError, match=r"^not a size: "):
        parse_size(text)


@pytest.mark.parametrize(
    ("text", "rate"),
    [("0", 0), ("0MB", 0), ("64KiB", 64 << 10), ("100MB", 10**8), ("100MiB/s", 100 << 20)],
)
def test_parse_rate(text: str, rate: int) -> None:
    assert parse_rate(text) == rate


BWLIMIT_REFUSALS = [
    (
        "1",
        "'1' has no unit: give one, e.g. 100MiB, 50MB, 1G (a bare number is KiB/s to vzdump, "
        "bytes/s to others)",
    ),
    (
        "102400",
        "'102400' has no unit: give one, e.g. 100MiB, 50MB, 1G (a bare number is KiB/s to "
        "vzdump, bytes/s to others)",
    ),
    (
        "63KiB",
        "'63KiB' is below the least rate accepted, 64 KiB/s (a 10 GiB disk would take two "
        "days; 0: no limit)",
    ),
    (
        "65KB",
        "'65KB' is below the least rate accepted, 64 KiB/s (a 10 GiB disk would take two "
        "days; 0: no limit)",
    ),
    ("fast", "not a size: 'fast' (e.g. 100MiB, 50MB, 1G, per second)"),
    ("50Mb", "not a size: '50Mb' (e.g. 100MiB, 50MB, 1G, per second)"),
    ("-1M", "not a size: '-1M' (e.g. 100MiB, 50MB, 1G, per second)"),
]


@pytest.mark.parametrize(("text", "message"), BWLIMIT_REFUSALS)
def test_bwlimit_refusals(vm: dict[str, Path], text: str, message: str) -> None:
    with pytest.raises(ValueError) as exc:
        parse_rate(text)
    assert str(exc.value) == message
    proc = dirbackup(
        "backup", "--store", str(vm["store"]), "--vmid", "100",
        "--disk", f"drive-scsi0={vm['disk0']}", f"--bwlimit={text}",
        check=2,
    )  # fmt: skip
    assert last_line(proc) == f"dirbackup backup: error: argument --bwlimit: {message}"
    assert not list(vm["store"].iterdir())


def test_bwlimit_in_decimal_megabytes_is_taken(vm: dict[str, Path]) -> None:
    out = dirbackup(
        "backup", "--store", str(vm["store"]), "--vmid", "100",
        "--disk", f"drive-scsi0={vm['disk1']}", "--bwlimit", "500MB",
    ).stdout  # fmt: skip
    assert "drive-scsi0 full" in out


# ------------------------------------------------------------- --json


def json_lines(proc: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    """Every line of stdout a JSON object, nothing else."""
    assert proc.stdout.endswith("\n"), proc.stdout
    objects = [json.loads(line) for line in proc.stdout.splitlines()]
    assert all(isinstance(o, dict) for o in objects)
    return objects


def test_json_output_of_every_reporting_command(vm: dict[str, Path]) -> None:
    s = ["--store", str(vm["store"])]
    disks = ["--disk", f"drive-scsi0={vm['disk0']}", "--disk", f"drive-scsi1={vm['disk1']}"]
    backups = []
    for _ in range(3):
        qemu.io(vm["disk0"], "write -P 7 0 64k")
        [b] = json_lines(dirbackup("backup", *s, "--vmid", "100", *disks, "--json"))
        backups.append(b)
    b = backups[1]
    assert set(b) == {"volid", "vmid", "type", "ctime", "seconds", "archive-size", "disks"}
    assert b["vmid"] == 100 and b["type"] == "qemu" and b["volid"].startswith("dirbackup:")
    assert b["disks"]["drive-scsi0"] == {
        "mode": "incremental",
        "size": 4 * MiB,
        "read": 64 << 10,
        "written": b["disks"]["drive-scsi0"]["written"],
    }
    assert b["disks"]["drive-scsi1"]["mode"] == "full"
    assert b["disks"]["drive-scsi1"]["size"] == 2 * MiB

    target = vm["tmp"] / "r.raw"
    [r] = json_lines(
        dirbackup("restore", *s, b["volid"], "--disk", f"drive-scsi1={target}", "--json")
    )
    assert r == {
        "volid": b["volid"],
        "seconds": r["seconds"],
        "disks": {
            "drive-scsi1": {"target": str(target), "bytes": r["disks"]["drive-scsi1"]["bytes"]}
        },
    }
    assert (
        r["disks"]["drive-scsi1"]["bytes"] > 0 and target.read_bytes() == vm["disk1"].read_bytes()
    )

    verified = json_lines(dirbackup("verify", *s, "--json"))
    assert [v["volid"] for v in verified] == [x["volid"] for x in backups]
    assert all(v["ok"] and v["problems"] == [] and v["checked-bytes"] > 0 for v in verified)
    assert set(verified[0]) == {"volid", "ok", "checked-bytes", "problems"}

    [removed] = json_lines(dirbackup("remove", *s, backups[0]["volid"], "--json"))
    assert removed == {"volid": backups[0]["volid"], "removed": True, "merged-into": [b["volid"]]}

    marks = json_lines(dirbackup("prune", *s, "--vmid", "100", "--keep-last", "1", "--json"))
    assert [(m["volid"], m["mark"]) for m in marks] == [
        (backups[2]["volid"], "keep"),
        (backups[1]["volid"], "remove"),
    ]
    assert set(marks[0]) == {"volid", "type", "ctime", "vmid", "mark"}


def test_json_output_of_a_failed_verify_and_of_containers(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "file").write_text("x" * 10000)
    store = tmp_path / "store"
    store.mkdir()
    s = ["--store", str(store)]
    [b] = json_lines(dirbackup("backup", *s, "--vmid", "200", "--rootfs", str(root), "--json"))
    assert b["type"] == "lxc" and b["disks"] == {} and b["archive-size"] > 0
    target = tmp_path / "back"
    [r] = json_lines(dirbackup("restore", *s, b["volid"], "--rootfs", str(target), "--json"))
    assert r == {"volid": b["volid"], "rootfs": str(target), "seconds": r["seconds"]}
    storage = DirectoryStorage("dirbackup", {"path": str(store)})
    for f in storage.store.backup_dir(storage.backup_id(b["volid"])).iterdir():
        if f.stat().st_size > 10000:  # the archive
            with open(f, "r+b") as fh:
                fh.seek(5000)
                fh.write(b"damaged")
    proc = dirbackup("verify", *s, "--json", check=1)
    [v] = json_lines(proc)
    assert v["volid"] == b["volid"] and v["ok"] is False and v["problems"]
    assert proc.stderr == "error: 1 of 1 backups failed verification\n"


def test_host_refuses_a_hard_link_of_one_image_for_two_devices(vm: dict[str, Path]) -> None:
    """The Python API refuses it too (HostError), with the same line."""
    link = vm["tmp"] / "link.qcow2"
    os.link(vm["disk0"], link)
    storage = DirectoryStorage("dirbackup", {"path": str(vm["store"])})
    disks = [Disk("drive-scsi0", vm["disk0"]), Disk("drive-scsi1", link)]
    with pytest.raises(HostError) as exc:
        Host(storage, "dirbackup").backup_vm(100, disks)
    assert str(exc.value) == (
        f"{link} (the same image as {vm['disk0']}) is given as both drive-scsi0 and drive-scsi1"
    )
    assert not list(vm["store"].iterdir())
