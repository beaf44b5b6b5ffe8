"""What every workload is given: the sizes of the run, its work directory, the
qemu-nbd servers it starts, and the command lines of the tools it times.

The command lines are built here once (ours.py, the seed, qemu-img convert,
nbdcopy) so that the workloads read as tables of rows and every workload runs
a tool the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from images import GiB, MiB, TiB
from runner import BENCH, PY, Tool, measure, remove

from dirbackup import qemu

OURS = str(BENCH / "ours.py")
SEED = str(BENCH / "seed_baseline.py")
CLI = str(Path(PY).parent / "dirbackup")  # the venv's command, as `make build` installs it
STORE_EPOCH = 1_700_000_000
DEVICE = "drive-scsi0"


@dataclass(frozen=True)
class Scale:
    """Sizes of one run.  `full` is what the issue specifies; `small` keeps the
    same shapes at a fraction of the size, for validating the suite."""

    name: str
    mixed: int  # workloads 1, 2 and 4: half data, 1/4 zeros, 1/4 holes
    guest: int  # workload 3: virtual size of the guest
    guest_data: int  # workload 3: data it holds
    dirty_fraction: float  # workload 3: clusters dirtied
    chain_fraction: float  # workload 4: clusters changed per incremental
    chain_links: int  # workload 4: incrementals on top of the full
    map_lines: int  # workload 5
    scaling_sizes: tuple[int, int]  # workload 6
    scaling_clusters: int  # workload 6: the same dirty set in both
    memory_sizes: tuple[int, ...]  # workload 6b
    memory_target_size: int
    rounds: int
    shm_needed: int  # bytes of /dev/shm the largest workload uses at once


FULL = Scale(
    name="full",
    mixed=4 * GiB,
    guest=16 * GiB,
    guest_data=4 * GiB,
    dirty_fraction=0.01,
    chain_fraction=0.05,
    chain_links=5,
    map_lines=1_000_000,
    scaling_sizes=(1 * GiB, 1 * TiB),
    scaling_clusters=1000,
    memory_sizes=(1 * GiB, 64 * GiB, 1 * TiB),
    memory_target_size=64 * GiB,
    rounds=7,
    shm_needed=10 * GiB,
)
SMALL = replace(  # the same shapes at a fraction of the size (5 and 6 keep theirs: cheap)
    FULL,
    name="small",
    mixed=256 * MiB,
    guest=1 * GiB,
    guest_data=256 * MiB,
    memory_sizes=(1 * GiB, 64 * GiB),
    rounds=2,
    shm_needed=2 * GiB,
)
SCALES = {s.name: s for s in (FULL, SMALL)}


@dataclass
class Ctx:
    scale: Scale
    work: Path
    logs: Path
    rounds: int
    workers: int
    say: Callable[[str], None]
    force_workers: bool = False
    keep_wrong: Path | None = None  # --keep-wrong: where failed outputs go
    servers: list[qemu.NbdServer] = field(default_factory=list)

    def measure(self, tools: list[Tool]) -> None:
        """Time these tools in alternating rounds after a checked warm-up."""
        measure(tools, self.rounds, self.logs, self.say, self.keep_wrong)

    def mkdir(self, name: str) -> Path:
        """A directory in the work directory (a store), made if it is not there."""
        path = self.work / name
        path.mkdir(exist_ok=True)
        return path

    def serve(self, image: Path, name: str, **kwargs: Any) -> qemu.NbdServer:
        server = qemu.start_nbd(image, str(self.work / f"{name}.sock"), **kwargs)
        self.servers.append(server)
        return server

    def stop(self, server: qemu.NbdServer) -> None:
        server.stop()
        if server in self.servers:
            self.servers.remove(server)

    def stop_all(self) -> None:
        for s in list(self.servers):
            self.stop(s)

    def ours(self, *args: str) -> list[str]:
        # the library picks its threads within the same budget (at most
        # min(4, CPUs), one per file target it writes with copy_file_range,
        # one connection for scattered small reads); --workers N forces N
        workers = self.workers if self.force_workers else 0
        return [PY, OURS, "--workers", str(workers), *args]

    def nbdcopy(self, *args: str) -> list[str]:
        return ["nbdcopy", f"--threads={self.workers}", *args]


def untimed_ours(*args: str) -> list[str]:
    """ours.py with the library's own choices: for building a workload's inputs."""
    return [PY, OURS, *args]


def product_backup(store: Path, storeid: str, vmid: str, disk: Path, epoch: int) -> list[str]:
    """ours.py's arguments for a backup by the product (Host.backup_vm) of one disk."""
    return ["product-backup", str(store), storeid, vmid, DEVICE, str(disk), str(epoch)]


def cli_backup(store: Path, storeid: str, vmid: str, disk: Path, mode: str) -> list[str]:
    """The `dirbackup backup` command a user types for one disk (`mode` full or
    incremental); --json makes it print one line the runner reads.  Uncompressed
    (`--compress none`): workloads 1-4 compare with qemu-img's uncompressed
    images; workload 7 measures compression."""
    return [
        *[CLI, "backup", "--store", str(store), "--storeid", storeid, "--vmid", vmid],
        *["--mode", mode, "--compress", "none", "--disk", f"{DEVICE}={disk}", "--json"],
    ]


def cli_restore(store: Path, storeid: str, volid: str, out: Path) -> list[str]:
    """The `dirbackup restore` command a user types for one disk into a new file."""
    return [
        *[CLI, "restore", "--store", str(store), "--storeid", storeid, volid],
        *["--disk", f"{DEVICE}={out}", "--json"],
    ]


def write_floor(nbytes: int, out: Path) -> list[str]:
    """ours.py write-floor: `nbytes` written from one buffer into a new file."""
    return [PY, OURS, "write-floor", str(nbytes), str(out)]


def product_image(store: Path, vmid: str, epoch: int) -> Path:
    """Where the product keeps the disk image of the backup made at `epoch`."""
    return store / vmid / f"qemu-{epoch}" / f"{DEVICE}.qcow2"


def seed_incremental(uri: str, bitmap: str, out: Path, backing: str) -> list[str]:
    """The seed's incremental backup (nbdinfo --map + 4 MiB synchronous loop)."""
    return [
        *[PY, SEED, "incremental", "--uri", uri, "--bitmap", bitmap],
        *["--out", str(out), "--backing", backing],
    ]


def qemu_img_convert(src_fmt: str, out_fmt: str, src: Path | str, fast: bool = False) -> list[str]:
    """qemu-img convert with its defaults, or `fast`: -W -m 16 (out-of-order
    writes, 16 coroutines); the output file is the argument still to add."""
    tuning = ["-W", "-m", "16"] if fast else []
    return ["qemu-img", "convert", *tuning, "-f", src_fmt, "-O", out_fmt, str(src)]


def emptier(directory: Path) -> Callable[[], None]:
    """A setup step that empties a directory (a store between product runs)."""

    def empty() -> None:
        for p in directory.iterdir():
            remove(p)

    return empty
