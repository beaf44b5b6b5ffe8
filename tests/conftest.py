"""Shared fixtures: real QEMU images, qemu-nbd exports, comparison helpers."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dirbackup import qemu

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB


@pytest.fixture
def sock_dir(tmp_path: Path) -> Path:
    """A short directory for Unix sockets (paths are limited to 108 bytes)."""
    d = Path("/tmp") / f"dbt-{os.getpid()}-{random.randrange(1 << 30):x}"
    d.mkdir()
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def nbd_server(sock_dir: Path) -> Iterator[Callable[..., qemu.NbdServer]]:
    """Start qemu-nbd servers; all are stopped at the end of the test."""
    servers: list[qemu.NbdServer] = []
    count = 0

    def start(image: Path | None, **kwargs: object) -> qemu.NbdServer:
        nonlocal count
        count += 1
        server = qemu.start_nbd(image, str(sock_dir / f"s{count}.sock"), **kwargs)  # type: ignore[arg-type]
        servers.append(server)
        return server

    yield start
    for s in servers:
        s.stop()


def write_pattern_image(path: Path, size: int, seed: int = 1) -> None:
    """A raw image with random data, written zeros and holes, in 1 MiB pieces."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for off in range(0, size, MiB):
            kind = rng.random()
            n = min(MiB, size - off)
            if kind < 0.45:
                f.seek(off)
                f.write(rng.randbytes(n))
            elif kind < 0.7:
                f.seek(off)
                f.write(bytes(n))
            # else: leave a hole


def assert_same(a: Path | str, b: Path | str, fmt_a: str = "raw", fmt_b: str = "raw") -> None:
    same, msg = qemu.img_compare(a, b, fmt_a, fmt_b)
    assert same, msg


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[Callable[[int], Path]]:
    """Loop block devices over sparse files; skipped where losetup is refused."""
    devices: list[str] = []

    def attach(size: int) -> Path:
        backing = tmp_path / f"loop{len(devices)}.img"
        with open(backing, "wb") as f:
            f.truncate(size)
        proc = subprocess.run(
            ["losetup", "--find", "--show", str(backing)], capture_output=True, text=True
        )
        if proc.returncode != 0:
            pytest.skip(f"no loop device here: {proc.stderr.strip()}")
        devices.append(proc.stdout.strip())
        return Path(devices[-1])

    yield attach
    for dev in devices:
        subprocess.run(["losetup", "--detach", dev], check=False)
