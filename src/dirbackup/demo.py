"""`dirbackup demo`: a whole backup and restore cycle on generated data.

Builds a small VM (a qcow2 disk, which gets a dirty bitmap, and a raw disk)
and a container directory, then runs the command line as an operator would:
full backup, guest changes with qemu-io (writes, zero writes, discards),
incremental backup, list, verify, restore of both restore points and of the
container -- and checks every restore with `qemu-img compare` and a tree
comparison.  Prints each command, what happened and how fast.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import BinaryIO

from dirbackup import qemu
from dirbackup.store import Store

#: The command line's entry point: argv without the program name -> exit status.
CommandLine = Callable[[Sequence[str]], int]

MiB = 1 << 20


def _say(text: str) -> None:
    print(text, flush=True)


def _run(cli: CommandLine, *argv: str) -> None:
    _say(f"\n$ dirbackup {shlex.join(argv)}")
    status = cli(list(argv))
    if status != 0:
        raise SystemExit(f"demo: 'dirbackup {argv[0]}' failed with status {status}")


def _write_random(f: BinaryIO, size: int, seed: int) -> None:
    """Incompressible data, quickly: a SHA-256 stream."""
    h = hashlib.sha256(str(seed).encode())
    for _ in range(size // MiB):
        block = bytearray()
        while len(block) < MiB:
            h.update(block[-32:] or b"x")
            block += h.digest() * 64
        f.write(bytes(block[:MiB]))


def _build_vm(work: Path) -> tuple[Path, Path]:
    """A 512 MiB qcow2 disk (random data, patterns, written zeros, holes) and a
    64 MiB raw disk."""
    raw = work / "disk0.raw"
    with open(raw, "wb") as f:
        f.truncate(512 * MiB)
    with open(raw, "r+b") as f:
        f.seek(100 * MiB)
        _write_random(f, 64 * MiB, 1)
    disk0 = work / "vm-100-disk-0.qcow2"
    qemu.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(disk0)])
    raw.unlink()
    qemu.io(disk0, "write -P 0x11 0 64M", "write -P 0x22 200M 32M", "write -z 300M 16M")
    disk1 = work / "vm-100-disk-1.raw"
    with open(disk1, "wb") as f:
        f.truncate(64 * MiB)
        f.seek(8 * MiB)
        _write_random(f, 16 * MiB, 2)
    return disk0, disk1


def _build_container(root: Path) -> None:
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "hostname").write_text("demo-ct\n")
    (root / "var" / "log").mkdir(parents=True)
    (root / "var" / "log" / "syslog").write_text("log line\n" * 1000)
    (root / "var" / "cache").mkdir()
    (root / "var" / "cache" / "big.tmp").write_bytes(b"\0" * MiB)
    (root / "home" / "user").mkdir(parents=True)
    with open(root / "home" / "user" / "data.bin", "wb") as f:
        _write_random(f, 4 * MiB, 3)
    os.link(root / "home" / "user" / "data.bin", root / "home" / "user" / "hardlink.bin")
    (root / "home" / "user" / "link").symlink_to("data.bin")
    (root / "etc" / "secret").write_text("s3cret\n")
    os.chmod(root / "etc" / "secret", 0o600)
    os.mkfifo(root / "var" / "fifo")
    with open(root / "var" / "sparse.img", "wb") as f:
        f.truncate(256 * MiB)
        f.seek(100 * MiB)
        f.write(b"sparse")


def _tree(root: Path, skip: tuple[str, ...] = ()) -> dict[str, tuple[object, ...]]:
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if any(rel == s or rel.startswith(s + "/") for s in skip):
                continue
            st = p.lstat()
            content: object = None
            if stat.S_ISREG(st.st_mode):
                content = hashlib.sha256(p.read_bytes()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                content = os.readlink(p)
            out[rel] = (
                stat.S_IFMT(st.st_mode),
                stat.S_IMODE(st.st_mode),
                st.st_uid,
                st.st_gid,
                content,
            )
    return out


def _compare(a: Path, b: Path, fmt_b: str = "raw") -> None:
    same, msg = qemu.img_compare(a, b, "raw", fmt_b)
    _say(f"  qemu-img compare {a.name} {b.name}: {msg}")
    if not same:
        raise SystemExit("demo: restored image differs from the original")


def run_demo(cli: CommandLine, workdir: Path | None = None) -> int:
    """Run the demo through the command line `cli` (the caller's, so that this
    module does not import cli.py, which imports it); return the exit status."""
    began = time.monotonic()
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    own = workdir is None
    if workdir is None:
        work = Path(tempfile.mkdtemp(prefix="dirbackup-demo-", dir=base))
    else:
        work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    store = work / "store"
    if store.exists():
        shutil.rmtree(store)
    store.mkdir()
    try:
        _say(f"dirbackup demo in {work}")
        disk0, disk1 = _build_vm(work)
        rootfs = work / "ct-200"
        if rootfs.exists():
            shutil.rmtree(rootfs)
        _build_container(rootfs)
        config = work / "100.conf"
        config.write_text(
            "scsi0: local:100/vm-100-disk-0.qcow2,size=512M\n"
            "scsi1: local:100/vm-100-disk-1.raw,size=64M\n"
        )
        snapshots = []

        def snapshot(tag: str) -> dict[str, Path]:
            s0 = work / f"disk0-{tag}.raw"
            qemu.run(["qemu-img", "convert", "-U", "-O", "raw", str(disk0), str(s0)])
            return {"drive-scsi0": s0, "drive-scsi1": disk1}

        s = ["--store", str(store)]
        disks = ["--disk", f"drive-scsi0={disk0}", "--disk", f"drive-scsi1={disk1}"]
        snapshots.append(snapshot("t0"))
        _run(
            cli,
            "backup",
            *s,
            "--vmid",
            "100",
            *disks,
            "--config",
            str(config),
            "--notes",
            "first backup",
        )
        _say("\n# the guest writes, zeroes and discards some of its disk")
        qemu.io(
            disk0,
            "write -P 0x33 1M 3M",
            "write -z 200M 8M",
            "discard 210M 8M",
            "write -P 0x44 400M 4k",
        )
        _say("  qemu-io: write 3 MiB, write zeros over 8 MiB, discard 8 MiB, write 4 KiB")
        snapshots.append(snapshot("t1"))
        _run(cli, "backup", *s, "--vmid", "100", *disks, "--config", str(config))
        _run(
            cli,
            "backup",
            *s,
            "--vmid",
            "200",
            "--rootfs",
            str(rootfs),
            "--exclude",
            "*.tmp",
            "--exclude",
            "/var/log",
        )
        _run(cli, "list", *s)
        _run(cli, "verify", *s)
        backups = [e.id for e in Store(store).backups(100)]
        for point, (bid, snap) in enumerate(zip(backups, snapshots, strict=True)):
            targets = {dev: work / f"restored-{point}-{dev}.raw" for dev in snap}
            _run(
                cli,
                "restore",
                *s,
                bid.archive,
                "--force",
                *[a for dev, t in targets.items() for a in ("--disk", f"{dev}={t}")],
            )
            for dev, t in targets.items():
                _compare(snap[dev], t)
        qtarget = work / "restored-1-drive-scsi0.qcow2"
        _run(
            cli,
            "restore",
            *s,
            backups[-1].archive,
            "--force",
            "--format",
            "qcow2",
            "--disk",
            f"drive-scsi0={qtarget}",
        )
        _compare(snapshots[-1]["drive-scsi0"], qtarget, "qcow2")
        ct = Store(store).backups(200)[0].id
        ctroot = work / "ct-restored"
        if ctroot.exists():
            shutil.rmtree(ctroot)
        _run(cli, "restore", *s, ct.archive, "--rootfs", str(ctroot))
        skip = ("var/log", "var/cache/big.tmp")
        if _tree(rootfs, skip) != _tree(ctroot):
            raise SystemExit("demo: the restored container tree differs from the original")
        _say("  container tree: identical (excluding *.tmp and /var/log, as asked)")
        _say(f"\ndemo finished successfully in {time.monotonic() - began:.1f} s")
        return 0
    finally:
        if own:
            shutil.rmtree(work, ignore_errors=True)
