"""Test images for the benchmarks, made fast and reproducibly (seeded numpy).

Everything is written with plain pwrite/ftruncate or qemu-img/qemu-io, never
with dirbackup itself, so a bug of ours cannot shape the data it is judged on.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
TiB = 1024 * GiB
CLUSTER = 64 * KiB

# Kinds of 1 MiB pieces in a mixed image
DATA, ZERO, HOLE = 0, 1, 2


def random_block(rng: np.random.Generator, n: int) -> bytes:
    """n random bytes (n a multiple of 8), about 1 GB/s."""
    return rng.integers(0, 1 << 63, size=n // 8, dtype=np.uint64).tobytes()


def mixed_layout(size: int, rng: np.random.Generator, piece: int = MiB) -> np.ndarray:
    """Kinds of the `piece`-sized pieces of a disk: half data, a quarter written
    zeros, a quarter holes, shuffled so that extents have varied lengths."""
    n = size // piece
    kinds = np.full(n, DATA, dtype=np.uint8)
    kinds[n // 2 : n // 2 + n // 4] = ZERO
    kinds[n // 2 + n // 4 :] = HOLE
    rng.shuffle(kinds)
    return kinds


def write_pieces(path: Path, size: int, kinds: np.ndarray, seed: int, piece: int = MiB) -> int:
    """Create a sparse raw file with DATA pieces random and ZERO pieces written
    as zero bytes (allocated); return the number of data bytes."""
    rng = np.random.default_rng(seed)
    zeros = bytes(piece)
    data = 0
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, size)
        batch = 64
        index = np.flatnonzero(kinds == DATA)
        for start in range(0, index.size, batch):
            chunk = index[start : start + batch]
            block = random_block(rng, piece * chunk.size)
            for k, i in enumerate(chunk):
                os.pwrite(fd, block[k * piece : (k + 1) * piece], int(i) * piece)
            data += piece * chunk.size
        for i in np.flatnonzero(kinds == ZERO):
            os.pwrite(fd, zeros, int(i) * piece)
    finally:
        os.close(fd)
    return data


def mixed_raw(path: Path, size: int, seed: int) -> int:
    """Workload 1's image: half random data, a quarter written zeros, a quarter holes."""
    rng = np.random.default_rng(seed)
    return write_pieces(path, size, mixed_layout(size, rng), seed + 1)


def sparse_raw(path: Path, size: int, data_bytes: int, seed: int) -> int:
    """A sparse raw file of `size` with `data_bytes` of random data in 1 MiB pieces
    at random places."""
    rng = np.random.default_rng(seed)
    n = size // MiB
    kinds = np.full(n, HOLE, dtype=np.uint8)
    kinds[rng.choice(n, size=min(n, data_bytes // MiB), replace=False)] = DATA
    return write_pieces(path, size, kinds, seed + 1)


def scattered_clusters(size: int, count: int, seed: int, span: int | None = None) -> np.ndarray:
    """`count` distinct random cluster indexes within the first `span` bytes, sorted."""
    clusters = (span or size) // CLUSTER
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(clusters, size=min(count, clusters), replace=False))


def raw_with_clusters(path: Path, size: int, clusters: Sequence[int], seed: int) -> None:
    """A sparse raw file whose only data are random 64 KiB clusters at `clusters`."""
    rng = np.random.default_rng(seed)
    block = random_block(rng, CLUSTER * len(clusters))
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, size)
        for k, c in enumerate(clusters):
            os.pwrite(fd, block[k * CLUSTER : (k + 1) * CLUSTER], int(c) * CLUSTER)
    finally:
        os.close(fd)


def qemu_io_batch(
    image: Path, commands: Iterable[str], fmt: str = "qcow2", batch: int = 2000
) -> None:
    """Run qemu-io commands on an image, many `-c` per process."""
    pending = list(commands)
    for start in range(0, len(pending), batch):
        argv = ["qemu-io", "-f", fmt]
        for c in pending[start : start + batch]:
            argv += ["-c", c]
        subprocess.run([*argv, str(image)], check=True, stdout=subprocess.DEVNULL)


def dirty_commands(
    clusters: Iterable[int], seed: int, zero_every: int = 10, discard_every: int = 0
) -> list[str]:
    """qemu-io commands that change each cluster: a pattern write, or every
    `zero_every`-th one a zero write (so incrementals must record zero clusters
    over old data), or every `discard_every`-th one a discard."""
    rng = np.random.default_rng(seed)
    patterns = rng.integers(1, 256, size=1 << 16)
    out = []
    for k, c in enumerate(clusters):
        off = int(c) * CLUSTER
        if zero_every and k % zero_every == zero_every - 1:
            out.append(f"write -z {off} {CLUSTER}")
        elif discard_every and k % discard_every == discard_every - 1:
            out.append(f"discard {off} {CLUSTER}")
        else:
            out.append(f"write -P {int(patterns[k % patterns.size])} {off} {CLUSTER}")
    return out


def qemu_img(*args: str) -> None:
    """Run qemu-img quietly, failing loudly."""
    subprocess.run(["qemu-img", *args], check=True, stdout=subprocess.DEVNULL)


def data_bytes(path: Path) -> int:
    """Bytes of an image (through its backing chain) that hold data other than
    zeros, as `qemu-img map` reports them: what a copy of it must write."""
    out = subprocess.run(
        ["qemu-img", "map", "--output=json", str(path)], check=True, capture_output=True
    ).stdout
    return sum(e["length"] for e in json.loads(out) if e["data"] and not e["zero"])


def map_text(path: Path, lines: int, seed: int) -> tuple[int, int, int]:
    """An `nbdinfo --map=qemu:dirty-bitmap:NAME` output of `lines` extents,
    alternating clean and dirty with random lengths (whole clusters), in
    nbdinfo's own format (`%10u  %10u  %3u  descr`).  Returns the dirty
    extents' (count, bytes, sum of offsets mod 2**64)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 64, size=lines, dtype=np.uint64) * np.uint64(CLUSTER)
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.uint64)
    kinds = np.arange(lines, dtype=np.uint64) % 2  # clean, dirty, clean, ...
    words = np.array(["clean", "dirty"])[kinds]
    text = "".join(
        f"{o:10d}  {n:10d}  {k:3d}  {w}\n"
        for o, n, k, w in zip(
            offsets.tolist(), lengths.tolist(), kinds.tolist(), words.tolist(), strict=False
        )
    )
    path.write_text(text)
    dirty = kinds == 1
    offset_sum = int(np.sum(offsets[dirty], dtype=np.uint64))
    return int(dirty.sum()), int(lengths[dirty].sum()), offset_sum
