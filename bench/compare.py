#!/usr/bin/env python3
"""Side-by-side benchmark: dirbackup against qemu-img convert, nbdcopy and the seed.

Every tool runs as its own process; the runner measures its whole wall time
(time.perf_counter around spawn and wait) and its CPU time and peak RSS
(os.wait4's rusage, which includes the children the tool waited for).  For
each workload the tools run alternately, round after round, with the order
rotated every round; round 0 is a warm-up whose output is checked for
correctness (qemu-img compare against the source, qemu-img check of qcow2
outputs) and then discarded, so a tool that gives a wrong answer is reported
as WRONG and never timed.  Everything lives on /dev/shm (RAM), so the page
cache plays no part; outputs are deleted between runs, outside the timed part.

Usage:  compare.py [--scale small|full] [--rounds N] [--only 1,3,...] [--workers N]

Results: a table on the terminal, bench/RESULTS.md and bench/results.png
(`--no-write` keeps the committed files untouched).  See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import images
from images import CLUSTER, GiB, KiB, MiB, TiB

from dirbackup import extents, nbd, qemu
from dirbackup.storage import DirectoryStorage

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
PY = sys.executable
OURS = str(BENCH / "ours.py")
SEED = str(BENCH / "seed_baseline.py")
STORE_EPOCH = 1_700_000_000
DEVICE = "drive-scsi0"


# ----------------------------------------------------------------------------
# Scales


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


SCALES = {
    "full": Scale(
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
    ),
    "small": Scale(
        name="small",
        mixed=256 * MiB,
        guest=1 * GiB,
        guest_data=256 * MiB,
        dirty_fraction=0.01,
        chain_fraction=0.05,
        chain_links=5,
        map_lines=1_000_000,
        scaling_sizes=(1 * GiB, 1 * TiB),
        scaling_clusters=1000,
        memory_sizes=(1 * GiB, 64 * GiB),
        memory_target_size=64 * GiB,
        rounds=2,
        shm_needed=2 * GiB,
    ),
}


# ----------------------------------------------------------------------------
# Running one tool


class Role(Enum):
    OURS = "ours"
    PEER = "peer"
    IDEAL = "ideal"  # a measurement the ideal is derived from
    INFO = "info"  # ours, another way (product path); not what targets judge


class ToolFailed(RuntimeError):
    """A tool exited non-zero, or its output was wrong."""


@dataclass
class Sample:
    """One run of one tool."""

    wall: float
    cpu: float
    maxrss: int  # bytes
    report: dict[str, Any]


@dataclass
class Tool:
    """A command line to time, with what to do around it (never timed)."""

    label: str
    argv: list[str]
    role: Role
    outputs: list[Path] = field(default_factory=list)
    check: Callable[[Sample], None] | None = None
    setup: Callable[[], None] | None = None
    teardown: Callable[[], None] | None = None
    every: Callable[[Sample], None] | None = None  # a cheap check of every timed run
    versus: str | None = None  # label of the ours row this one is compared with
    samples: list[Sample] = field(default_factory=list)
    error: str | None = None

    def values(self, what: str = "wall") -> list[float]:
        if what == "work":
            return [float(s.report["seconds"]) for s in self.samples if "seconds" in s.report]
        return [getattr(s, what) for s in self.samples]

    def median(self, what: str = "wall") -> float | None:
        v = self.values(what)
        return statistics.median(v) if v else None


class Spawner:
    """The small process that starts and times every tool (see spawner.py)."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [PY, "-I", "-S", str(BENCH / "spawner.py")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def run(
        self, argv: Sequence[str], stdout: Path, stderr: Path, timeout: float
    ) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        request = {
            "argv": list(argv),
            "stdout": str(stdout),
            "stderr": str(stderr),
            "timeout": timeout,
        }
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the spawner died")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def close(self, interrupted: bool = False) -> None:
        """Let the spawner exit; when interrupted, make it kill the running tool."""
        if interrupted:
            self.proc.terminate()
        if self.proc.stdin:
            with contextlib.suppress(BrokenPipeError):
                self.proc.stdin.close()
        self.proc.wait()


SPAWNER: Spawner | None = None
KEEP_WRONG: Path | None = None  # --keep-wrong: where failed outputs go


TIMEOUT = 600.0  # seconds any one tool may run before it is killed and reported


def run_child(argv: Sequence[str], logdir: Path, name: str) -> Sample:
    """Run one tool through the spawner: whole-process wall time, CPU time and
    peak RSS (wait4), and the JSON line it printed last, if any."""
    global SPAWNER
    if SPAWNER is None:
        SPAWNER = Spawner()
    out_path, err_path = logdir / f"{name}.out", logdir / f"{name}.err"
    answer = SPAWNER.run(argv, out_path, err_path, TIMEOUT)
    if "error" in answer:
        raise ToolFailed(answer["error"])
    if answer["status"] == -9:
        raise ToolFailed(f"killed after {TIMEOUT:.0f} s")
    if answer["status"] != 0:
        tail = err_path.read_text(errors="replace").strip().splitlines()[-5:]
        raise ToolFailed(f"exit status {answer['status']}: {' / '.join(tail)}")
    report: dict[str, Any] = {}
    for line in reversed(out_path.read_text(errors="replace").splitlines()):
        if line.startswith("{"):
            with contextlib.suppress(json.JSONDecodeError):
                report = json.loads(line)
            break
    return Sample(answer["wall"], answer["cpu"], answer["maxrss"], report)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def measure(tools: list[Tool], rounds: int, logdir: Path, say: Callable[[str], None]) -> None:
    """Round 0 warms up and is checked; rounds 1..N are timed.  Tools alternate,
    the starting tool rotating each round.  Each tool's outputs are removed
    before and right after its run (outside the timed part)."""
    for r in range(rounds + 1):
        shift = r % len(tools)
        for tool in tools[shift:] + tools[:shift]:
            if tool.error:
                continue
            for o in tool.outputs:
                _remove(o)
            try:
                if tool.setup:
                    tool.setup()
                try:
                    sample = run_child(tool.argv, logdir, _slug(tool.label))
                finally:
                    if tool.teardown:
                        tool.teardown()
                if tool.every:
                    tool.every(sample)
                if r == 0:
                    if tool.check:
                        tool.check(sample)
                else:
                    tool.samples.append(sample)
            except (ToolFailed, qemu.ToolError, subprocess.CalledProcessError) as exc:
                tool.error = f"{'WRONG' if r == 0 else 'FAILED'}: {exc}"
                say(f"    {tool.label}: {tool.error}")
                if KEEP_WRONG is not None:
                    for o in tool.outputs:
                        if o.exists():
                            shutil.move(o, KEEP_WRONG / o.name)
                            say(f"    kept {KEEP_WRONG / o.name}")
            finally:
                for o in tool.outputs:  # one output at a time: /dev/shm stays bounded
                    _remove(o)
        say(f"    round {r}{' (warm-up, checked)' if r == 0 else ''} done")


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in label).strip("-")


# ----------------------------------------------------------------------------
# Correctness checks


def same(a: Path | str, b: Path | str, fmt_a: str, fmt_b: str) -> None:
    """qemu-img compare: identical guest-visible contents, or ToolFailed."""
    ok, msg = qemu.img_compare(a, b, fmt_a, fmt_b)
    if not ok:
        raise ToolFailed(f"{Path(a).name} differs from {Path(b).name}: {msg}")


def sound_qcow2(path: Path | str) -> None:
    """qemu-img check finds no corruption or leak."""
    report = qemu.img_check(path)
    bad = {k: report.get(k) for k in ("corruptions", "leaks", "check-errors") if report.get(k)}
    if bad:
        raise ToolFailed(f"qemu-img check {Path(path).name}: {bad}")


def check_output(
    out: Path, fmt: str, reference: Path | str, ref_fmt: str
) -> Callable[[Sample], None]:
    def check(_: Sample) -> None:
        same(out, reference, fmt, ref_fmt)
        if fmt == "qcow2":
            sound_qcow2(out)

    return check


def reported(key: str, expected: int) -> Callable[[Sample], None]:
    """Every run must report having moved exactly the expected bytes (catches a
    source whose state changed between rounds, e.g. a cleared bitmap)."""

    def check(sample: Sample) -> None:
        got = sample.report.get(key)
        if got != expected:
            raise ToolFailed(f"reported {key}={got}, expected {expected}")

    return check


# ----------------------------------------------------------------------------
# Workloads


@dataclass
class Ctx:
    scale: Scale
    work: Path
    logs: Path
    rounds: int
    workers: int
    say: Callable[[str], None]
    force_workers: bool = False
    servers: list[qemu.NbdServer] = field(default_factory=list)

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


@dataclass
class Target:
    """One goal of the issue, judged on medians of one run."""

    name: str
    value: float | None
    limit: float
    lower_is_better: bool = True
    unit: str = "x"
    informational: bool = False

    @property
    def met(self) -> bool | None:
        if self.value is None:
            return None
        return self.value <= self.limit if self.lower_is_better else self.value >= self.limit

    def verdict(self) -> str:
        if self.met is None:
            return "n/a (a tool failed)"
        word = "met" if self.met else "MISSED"
        return f"{word} (info)" if self.informational else word


@dataclass
class Result:
    """One workload's tools, notes and derived figures."""

    key: str
    title: str
    tools: list[Tool]
    notes: list[str] = field(default_factory=list)
    derived: dict[str, float] = field(default_factory=dict)

    def tool(self, label: str) -> Tool:
        return next(t for t in self.tools if t.label == label)

    @property
    def primary(self) -> Tool:
        return next(t for t in self.tools if t.role == Role.OURS)


def ratio(a: Tool, b: Tool, what: str = "wall") -> float | None:
    ma, mb = a.median(what), b.median(what)
    if ma is None or mb is None or mb == 0:
        return None
    return ma / mb


def w1_full_file(ctx: Ctx) -> Result:
    """Full backup of a raw file into qcow2."""
    sc = ctx.scale
    src = ctx.work / "w1.raw"
    ctx.say(f"  making {human(sc.mixed)} mixed raw image")
    images.mixed_raw(src, sc.mixed, seed=1)
    w = ctx.work
    tools = [
        Tool(
            "ours",
            ctx.ours("full-file", str(src), str(w / "w1-ours.qcow2")),
            Role.OURS,
            [w / "w1-ours.qcow2"],
            check_output(w / "w1-ours.qcow2", "qcow2", src, "raw"),
        ),
        Tool(
            "qemu-img convert",
            ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(src), str(w / "w1-qi.qcow2")],
            Role.PEER,
            [w / "w1-qi.qcow2"],
            check_output(w / "w1-qi.qcow2", "qcow2", src, "raw"),
        ),
        Tool(
            "qemu-img convert -W -m 16",
            [
                "qemu-img",
                "convert",
                "-W",
                "-m",
                "16",
                "-f",
                "raw",
                "-O",
                "qcow2",
                str(src),
                str(w / "w1-qiw.qcow2"),
            ],
            Role.PEER,
            [w / "w1-qiw.qcow2"],
            check_output(w / "w1-qiw.qcow2", "qcow2", src, "raw"),
        ),
        Tool(
            "nbdcopy (raw out)",
            ctx.nbdcopy(str(src), str(w / "w1-nc.raw")),
            Role.PEER,
            [w / "w1-nc.raw"],
            check_output(w / "w1-nc.raw", "raw", src, "raw"),
        ),
        Tool(
            "ours (raw out)",
            ctx.ours("copy-raw", str(src), str(w / "w1-ours.raw")),
            Role.INFO,
            [w / "w1-ours.raw"],
            check_output(w / "w1-ours.raw", "raw", src, "raw"),
        ),
        Tool(
            "qemu-img convert -O raw",
            ["qemu-img", "convert", "-f", "raw", "-O", "raw", str(src), str(w / "w1-qir.raw")],
            Role.PEER,
            [w / "w1-qir.raw"],
            check_output(w / "w1-qir.raw", "raw", src, "raw"),
        ),
    ]
    measure(tools, ctx.rounds, ctx.logs, ctx.say)
    return Result(
        "1",
        f"full backup, raw file ({human(sc.mixed)}: 1/2 data, 1/4 zeros, 1/4 holes) → qcow2",
        tools,
        [
            "nbdcopy writes a raw file: it has no qcow2 output; it is the raw copy-speed bar.",
        ],
    )


def w2_full_nbd(ctx: Ctx) -> Result:
    """Full backup from a qemu-nbd export of the same image."""
    sc = ctx.scale
    src = ctx.work / "w1.raw"
    if not src.exists():
        images.mixed_raw(src, sc.mixed, seed=1)
    server = ctx.serve(src, "w2", export=DEVICE, fmt="raw")
    uri = server.uri
    w = ctx.work
    store = w / "w2-store"
    store.mkdir(exist_ok=True)
    product_image = store / "100" / f"qemu-{STORE_EPOCH}" / f"{DEVICE}.qcow2"

    tools = [
        Tool(
            "ours",
            ctx.ours("full-nbd", uri, str(w / "w2-ours.qcow2")),
            Role.OURS,
            [w / "w2-ours.qcow2"],
            check_output(w / "w2-ours.qcow2", "qcow2", src, "raw"),
        ),
        Tool(
            "ours, product path (Host.backup_vm)",
            ctx.ours("product-backup", str(store), "w2", "100", DEVICE, str(src), str(STORE_EPOCH)),
            Role.INFO,
            [store / "100"],
            check_output(product_image, "qcow2", src, "raw"),
            setup=_emptier(store),
        ),
        Tool(
            "qemu-img convert",
            ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", uri, str(w / "w2-qi.qcow2")],
            Role.PEER,
            [w / "w2-qi.qcow2"],
            check_output(w / "w2-qi.qcow2", "qcow2", src, "raw"),
        ),
        Tool(
            "qemu-img convert -W -m 16",
            [
                "qemu-img",
                "convert",
                "-W",
                "-m",
                "16",
                "-f",
                "raw",
                "-O",
                "qcow2",
                uri,
                str(w / "w2-qiw.qcow2"),
            ],
            Role.PEER,
            [w / "w2-qiw.qcow2"],
            check_output(w / "w2-qiw.qcow2", "qcow2", src, "raw"),
        ),
        Tool(
            "nbdcopy (raw out)",
            ctx.nbdcopy(uri, str(w / "w2-nc.raw")),
            Role.PEER,
            [w / "w2-nc.raw"],
            check_output(w / "w2-nc.raw", "raw", src, "raw"),
        ),
    ]
    try:
        measure(tools, ctx.rounds, ctx.logs, ctx.say)
    finally:
        ctx.stop(server)
        _remove(store)
        _remove(src)
    return Result(
        "2",
        f"full backup from a qemu-nbd export (Unix socket) of the same {human(sc.mixed)} image",
        tools,
        [
            "All tools read one read-only qemu-nbd export (--shared=8, so multi-conn); its "
            "CPU time is nobody's.",
            "The product path starts its own qemu-nbd of the file and also writes the manifest, "
            "digests and logs; it is shown for information.",
        ],
    )


def w3_incremental(ctx: Ctx) -> Result:
    """Incremental backup of a qcow2 guest with a persistent dirty bitmap."""
    sc = ctx.scale
    w = ctx.work
    store = w / "w3-store"
    store.mkdir(exist_ok=True)
    storeid, vmid = "bench", "100"
    ctx.say(f"  making a {human(sc.guest)} guest with {human(sc.guest_data)} of data")
    raw = w / "w3-guest0.raw"
    images.sparse_raw(raw, sc.guest, sc.guest_data, seed=3)
    # The previous backup: our product's own full backup of the guest.
    full = store / vmid / f"qemu-{STORE_EPOCH}" / f"{DEVICE}.qcow2"
    run_child(
        [PY, OURS, "product-backup", str(store), storeid, vmid, DEVICE, str(raw), str(STORE_EPOCH)],
        ctx.logs,
        "w3-setup-full",
    )
    same(full, raw, "qcow2", "raw")
    _remove(raw)
    # The guest from then on: an overlay whose base is exactly what was backed up
    # (saves a second copy of the data), then dirtied.  The product backs it up
    # once more (full: its bitmap generation starts there), so that the product's
    # own incremental is proven; every tool reads the generation's bitmap.
    guest = w / "w3-guest.qcow2"
    images.qemu_img("create", "-q", "-f", "qcow2", "-b", str(full), "-F", "qcow2", str(guest))
    generation = str(STORE_EPOCH + 1)
    run_child(
        [PY, OURS, "product-backup", str(store), storeid, vmid, DEVICE, str(guest), generation],
        ctx.logs,
        "w3-setup-generation",
    )
    provider = DirectoryStorage(storeid, {"path": str(store)}).new_backup_provider()
    bitmap = provider.expected_bitmap(int(vmid), DEVICE)
    prefix = provider.bitmap_prefix()
    if bitmap is None:
        raise ToolFailed("the product's full backup of the guest started no bitmap generation")
    n_clusters = sc.guest // CLUSTER
    dirty_clusters = images.scattered_clusters(sc.guest, int(n_clusters * sc.dirty_fraction), 33)
    ctx.say(f"  dirtying {len(dirty_clusters)} clusters with qemu-io")
    images.qemu_io_batch(guest, images.dirty_commands(dirty_clusters, seed=34))
    images.qemu_img("bitmap", "--add", str(guest), "saved")
    images.qemu_img("bitmap", "--merge", bitmap, "-f", "qcow2", str(guest), "saved")
    previous_info = (store / vmid / "previous-info").read_bytes()

    # What the export holds: dirty bytes (the bitmap) and data bytes (allocation).
    probe = ctx.serve(guest, "w3-probe", export=DEVICE, bitmap=bitmap)
    context = extents.dirty_bitmap_context(bitmap)
    h = nbd.connect(probe.uri, [context, extents.ALLOCATION])
    dirty_bytes = extents.total(extents.dirty(extents.block_status(h, context)))
    data_bytes = extents.total(extents.data(extents.block_status(h, extents.ALLOCATION)))
    nbd.close_all([h])
    ctx.stop(probe)

    export: list[qemu.NbdServer] = []
    sock = w / "w3.sock"
    uri = nbd.unix_uri(str(sock), DEVICE)

    def start_export() -> None:
        export.append(ctx.serve(guest, "w3", export=DEVICE, bitmap=bitmap))

    def stop_export() -> None:
        while export:
            ctx.stop(export.pop())

    new_dir = store / vmid / f"qemu-{STORE_EPOCH + 2}"

    def restore_bitmap() -> None:
        """After a good backup Host replaces the bitmap by the next generation:
        put the old generation with its dirty set back at once, before any
        other tool reads it."""
        for b in qemu.bitmaps(guest):
            if b["name"].startswith(prefix):
                images.qemu_img("bitmap", "--remove", str(guest), b["name"])
        images.qemu_img(
            "bitmap", "--add", "--enable", "--merge", "saved", "-f", "qcow2", str(guest), bitmap
        )

    def reset_store() -> None:
        """Undo the previous product run: the new backup goes, the old record
        comes back."""
        kept = (full.parent.name, f"qemu-{STORE_EPOCH + 1}")
        for p in (store / vmid).iterdir():
            if p.name.startswith("qemu-") and p.name not in kept:
                _remove(p)
        (store / vmid / "previous-info").write_bytes(previous_info)
        restore_bitmap()

    def check_product(sample: Sample) -> None:
        if sample.report.get("modes", {}).get(DEVICE) != "reuse":
            raise ToolFailed(f"the product did not make an incremental: {sample.report}")
        same(new_dir / f"{DEVICE}.qcow2", guest, "qcow2", "qcow2")
        sound_qcow2(new_dir / f"{DEVICE}.qcow2")

    backing_rel = os.path.relpath(full, w)
    tools = [
        Tool(
            "ours",
            ctx.ours("incremental", uri, bitmap, str(w / "w3-ours.qcow2"), backing_rel),
            Role.OURS,
            [w / "w3-ours.qcow2"],
            check_output(w / "w3-ours.qcow2", "qcow2", guest, "qcow2"),
            start_export,
            stop_export,
            reported("dirty_bytes", dirty_bytes),
        ),
        Tool(
            "ours, product path (Host.backup_vm)",
            ctx.ours(
                "product-backup",
                str(store),
                storeid,
                vmid,
                DEVICE,
                str(guest),
                str(STORE_EPOCH + 2),
            ),
            Role.INFO,
            [new_dir],
            check_product,
            setup=reset_store,
            teardown=restore_bitmap,
        ),
        Tool(
            "seed (nbdinfo --map + 4 MiB sync loop)",
            [
                PY,
                SEED,
                "incremental",
                "--uri",
                uri,
                "--bitmap",
                bitmap,
                "--out",
                str(w / "w3-seed.qcow2"),
                "--backing",
                str(full),
            ],
            Role.PEER,
            [w / "w3-seed.qcow2"],
            check_output(w / "w3-seed.qcow2", "qcow2", guest, "qcow2"),
            start_export,
            stop_export,
            reported("bytes", dirty_bytes),
        ),
        Tool(
            "qemu-img convert (full)",
            [
                "qemu-img",
                "convert",
                "-f",
                "qcow2",
                "-O",
                "qcow2",
                str(guest),
                str(w / "w3-qi.qcow2"),
            ],
            Role.PEER,
            [w / "w3-qi.qcow2"],
            check_output(w / "w3-qi.qcow2", "qcow2", guest, "qcow2"),
        ),
        Tool(
            "read rate: nbdcopy → null:",
            ctx.nbdcopy(uri, "null:"),
            Role.IDEAL,
            [],
            None,
            start_export,
            stop_export,
        ),
    ]
    try:
        measure(tools, ctx.rounds, ctx.logs, ctx.say)
    finally:
        stop_export()
        _remove(store)
        _remove(guest)
    result = Result(
        "3",
        f"incremental backup: {human(sc.guest)} qcow2 guest, {human(sc.guest_data)} data, "
        f"{sc.dirty_fraction:.0%} of clusters dirty",
        tools,
        [
            f"{len(dirty_clusters)} random clusters changed with qemu-io (every 10th a zero "
            f"write): {human(dirty_bytes)} dirty; the export holds {human(data_bytes)} of data.",
            "The guest is a qcow2 overlay on our own full backup of it (same data, half the RAM); "
            "ours, the seed and the read-rate run read one read-only qemu-nbd export with the "
            "bitmap, started before and stopped after each run (untimed).",
            "Ideal = dirty bytes / read rate, the read rate being the export's data bytes over "
            "nbdcopy's median time to read them all to null:.",
        ],
    )
    rate_tool = result.tool("read rate: nbdcopy → null:")
    rate_time = rate_tool.median()
    result.derived["dirty_bytes"] = dirty_bytes
    result.derived["data_bytes"] = data_bytes
    if rate_time:
        rate = data_bytes / rate_time
        result.derived["read_rate"] = rate
        result.derived["ideal_seconds"] = dirty_bytes / rate
    return result


def w4_restore(ctx: Ctx) -> Result:
    """Restore of a full + N incremental chain (written by our product) into a raw file."""
    sc = ctx.scale
    w = ctx.work
    store = w / "w4-store"
    store.mkdir(exist_ok=True)
    storeid, vmid = "chain", "101"
    ctx.say(f"  building a full + {sc.chain_links} incremental chain of {human(sc.mixed)}")
    raw = w / "w4.raw"
    images.mixed_raw(raw, sc.mixed, seed=4)
    guest = w / "w4-guest.qcow2"
    images.qemu_img("convert", "-f", "raw", "-O", "qcow2", str(raw), str(guest))
    _remove(raw)
    epochs = [STORE_EPOCH + i for i in range(sc.chain_links + 1)]
    per_link = int(sc.mixed // CLUSTER * sc.chain_fraction)
    for i, epoch in enumerate(epochs):
        if i:
            clusters = images.scattered_clusters(sc.mixed, per_link, seed=40 + i)
            images.qemu_io_batch(
                guest, images.dirty_commands(clusters, seed=50 + i, zero_every=10, discard_every=7)
            )
        sample = run_child(
            [PY, OURS, "product-backup", str(store), storeid, vmid, DEVICE, str(guest), str(epoch)],
            ctx.logs,
            f"w4-setup-{i}",
        )
        mode = sample.report.get("modes", {}).get(DEVICE)
        if mode != ("reuse" if i else "new"):
            raise ToolFailed(f"chain link {i} was not made as expected (bitmap mode {mode})")
    top = store / vmid / f"qemu-{epochs[-1]}" / f"{DEVICE}.qcow2"
    same(top, guest, "qcow2", "qcow2")  # the chain itself is right before we time reading it
    _remove(guest)
    volid = f"{storeid}:backup/{vmid}/qemu-{epochs[-1]}"
    tools = [
        Tool(
            "ours",
            ctx.ours("restore", str(top), str(store / vmid), str(w / "w4-ours.raw")),
            Role.OURS,
            [w / "w4-ours.raw"],
            check_output(w / "w4-ours.raw", "raw", top, "qcow2"),
        ),
        Tool(
            "ours, product path (Host.restore_vm)",
            ctx.ours("product-restore", str(store), storeid, volid, DEVICE, str(w / "w4-prod.raw")),
            Role.INFO,
            [w / "w4-prod.raw"],
            check_output(w / "w4-prod.raw", "raw", top, "qcow2"),
        ),
        Tool(
            "qemu-img convert -O raw",
            ["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(top), str(w / "w4-qi.raw")],
            Role.PEER,
            [w / "w4-qi.raw"],
            check_output(w / "w4-qi.raw", "raw", top, "qcow2"),
        ),
        Tool(
            "qemu-img convert -O raw -W -m 16",
            [
                "qemu-img",
                "convert",
                "-W",
                "-m",
                "16",
                "-f",
                "qcow2",
                "-O",
                "raw",
                str(top),
                str(w / "w4-qiw.raw"),
            ],
            Role.PEER,
            [w / "w4-qiw.raw"],
            check_output(w / "w4-qiw.raw", "raw", top, "qcow2"),
        ),
    ]
    try:
        measure(tools, ctx.rounds, ctx.logs, ctx.say)
    finally:
        _remove(store)
    return Result(
        "4",
        f"restore of a full + {sc.chain_links} incremental chain ({human(sc.mixed)} disk, "
        f"{sc.chain_fraction:.0%} of clusters changed per link) into a raw file",
        tools,
        [
            "The chain is made by our product (Host.backup_vm: a full, then incrementals from "
            "the qcow2 bitmap); changes by qemu-io: pattern writes, every 10th a zero write, "
            "every 7th a discard. It is compared with the guest before timing.",
        ],
    )


def w5_parse(ctx: Ctx) -> Result:
    """Parse a 1,000,000-extent `nbdinfo --map` text."""
    sc = ctx.scale
    path = ctx.work / "w5.map"
    ctx.say(f"  writing a {sc.map_lines:,}-line map")
    count, total, offset_sum = images.map_text(path, sc.map_lines, seed=5)

    def expect(sample: Sample) -> None:
        r = sample.report
        got = (r.get("count", r.get("merged_count")), r.get("bytes"), r.get("offset_sum"))
        if got != (count, total, offset_sum):
            raise ToolFailed(f"parsed {got}, expected {(count, total, offset_sum)}")

    tools = [
        Tool("ours", ctx.ours("parse", str(path)), Role.OURS, [], expect),
        Tool("seed (regex loop)", [PY, SEED, "parse", str(path)], Role.PEER, [], expect),
    ]
    try:
        measure(tools, ctx.rounds, ctx.logs, ctx.say)
    finally:
        _remove(path)
    return Result(
        "5",
        f"map parsing: {sc.map_lines:,} extents of `nbdinfo --map=qemu:dirty-bitmap:…` text",
        tools,
        [
            "'work s' is the parse itself (read the file, parse, keep the dirty extents) as "
            "timed inside each process; 'wall s' adds interpreter start and imports (numpy "
            "and dirbackup for ours, nothing for the seed).",
        ],
    )


def w6_scaling(ctx: Ctx) -> Result:
    """The same dirty set in a small and a huge virtual disk."""
    sc = ctx.scale
    w = ctx.work
    clusters = images.scattered_clusters(GiB, sc.scaling_clusters, seed=6, span=GiB)
    commands = images.dirty_commands(clusters, seed=61, zero_every=0)
    bitmap = "bench"
    tools: list[Tool] = []
    guests = []
    try:
        for size in sc.scaling_sizes:
            tag = human(size).replace(" ", "")
            base = w / f"w6-base-{tag}.qcow2"
            guest = w / f"w6-guest-{tag}.qcow2"
            images.qemu_img("create", "-q", "-f", "qcow2", str(base), str(size))
            images.qemu_img("create", "-q", "-f", "qcow2", str(guest), str(size))
            images.qemu_img("bitmap", "--add", "--enable", str(guest), bitmap)
            images.qemu_io_batch(guest, commands)
            guests.append(guest)
            server = ctx.serve(guest, f"w6-{tag}", export=DEVICE, bitmap=bitmap)
            out_ours, out_seed = w / f"w6-ours-{tag}.qcow2", w / f"w6-seed-{tag}.qcow2"
            tools.append(
                Tool(
                    f"ours, {human(size)} disk",
                    ctx.ours("incremental", server.uri, bitmap, str(out_ours), base.name),
                    Role.OURS,
                    [out_ours],
                    check_output(out_ours, "qcow2", guest, "qcow2"),
                    every=reported("dirty_bytes", len(clusters) * CLUSTER),
                )
            )
            tools.append(
                Tool(
                    f"seed, {human(size)} disk",
                    [
                        PY,
                        SEED,
                        "incremental",
                        "--uri",
                        server.uri,
                        "--bitmap",
                        bitmap,
                        "--out",
                        str(out_seed),
                        "--backing",
                        base.name,
                    ],
                    Role.PEER,
                    [out_seed],
                    check_output(out_seed, "qcow2", guest, "qcow2"),
                    every=reported("bytes", len(clusters) * CLUSTER),
                    versus=f"ours, {human(size)} disk",
                )
            )
        measure(tools, ctx.rounds, ctx.logs, ctx.say)
    finally:
        ctx.stop_all()
        for p in w.glob("w6-*"):
            _remove(p)
    small, big = (human(s) for s in sc.scaling_sizes)
    result = Result(
        "6",
        f"scaling: {len(clusters)} dirty clusters ({human(len(clusters) * CLUSTER)}) in a "
        f"{small} and a {big} virtual disk",
        tools,
        [
            "Same dirty offsets (random clusters in the first GiB) in both guests; the "
            "incremental is written over an empty base of the same size.",
        ],
    )
    t_small, t_big = result.tools[0], result.tools[2]
    r = ratio(t_big, t_small)
    if r is not None:
        result.derived["ours_big_over_small"] = r
    return result


def w6b_memory(ctx: Ctx) -> Result:
    """Peak RSS of a full backup against the virtual size of a sparse image."""
    sc = ctx.scale
    w = ctx.work
    tools: list[Tool] = []
    count = 1000
    try:
        for size in sc.memory_sizes:
            tag = human(size).replace(" ", "")
            src = w / f"w6b-{tag}.raw"
            clusters = images.scattered_clusters(size, count, seed=7)
            images.raw_with_clusters(src, size, clusters, seed=71)
            out = w / f"w6b-ours-{tag}.qcow2"
            tools.append(
                Tool(
                    f"ours, {human(size)} sparse",
                    ctx.ours("full-file", str(src), str(out)),
                    Role.OURS,
                    [out],
                    check_output(out, "qcow2", src, "raw"),
                )
            )
            if size == sc.memory_target_size:
                store = w / f"w6b-store-{tag}"
                store.mkdir()
                image = store / "102" / f"qemu-{STORE_EPOCH}" / f"{DEVICE}.qcow2"
                tools.append(
                    Tool(
                        f"ours product path, {human(size)} sparse",
                        ctx.ours(
                            "product-backup",
                            str(store),
                            "mem",
                            "102",
                            DEVICE,
                            str(src),
                            str(STORE_EPOCH),
                        ),
                        Role.INFO,
                        [store / "102"],
                        check_output(image, "qcow2", src, "raw"),
                        setup=_emptier(store),
                        versus=f"ours, {human(size)} sparse",
                    )
                )
            qi = w / f"w6b-qi-{tag}.qcow2"
            tools.append(
                Tool(
                    f"qemu-img convert, {human(size)} sparse",
                    ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(src), str(qi)],
                    Role.PEER,
                    [qi],
                    check_output(qi, "qcow2", src, "raw"),
                    versus=f"ours, {human(size)} sparse",
                )
            )
        measure(tools, ctx.rounds, ctx.logs, ctx.say)
    finally:
        for p in w.glob("w6b-*"):
            _remove(p)
    return Result(
        "6b",
        f"peak memory of a full backup against virtual size ({count} random 64 KiB data "
        "clusters spread over each sparse raw image)",
        tools,
        ["Peak RSS is ru_maxrss of the process (and anything it waited for), from wait4."],
    )


def _emptier(directory: Path) -> Callable[[], None]:
    """A setup step that empties a directory (a store between product runs)."""

    def empty() -> None:
        for p in directory.iterdir():
            _remove(p)

    return empty


WORKLOADS: dict[str, Callable[[Ctx], Result]] = {
    "1": w1_full_file,
    "2": w2_full_nbd,
    "3": w3_incremental,
    "4": w4_restore,
    "5": w5_parse,
    "6": w6_scaling,
    "6b": w6b_memory,
}


# ----------------------------------------------------------------------------
# Targets


def targets(results: dict[str, Result], scale: Scale) -> list[Target]:
    """The issue's goals, evaluated on this run's medians."""
    out: list[Target] = []

    def tool(key: str, label: str) -> Tool | None:
        r = results.get(key)
        if r is None:
            return None
        return next((t for t in r.tools if t.label == label), None)

    def r_(a: Tool | None, b: Tool | None, what: str = "wall") -> float | None:
        return ratio(a, b, what) if a and b else None

    def fastest(*tools: Tool | None) -> Tool | None:
        timed = [t for t in tools if t and t.median() is not None]
        return min(timed, key=lambda t: t.median() or 0.0) if timed else None

    if "1" in results:
        ours = tool("1", "ours")
        qi = fastest(tool("1", "qemu-img convert"), tool("1", "qemu-img convert -W -m 16"))
        out.append(Target("1: ours / faster qemu-img convert", r_(ours, qi), 0.5))
        out.append(Target("1: ours / nbdcopy", r_(ours, tool("1", "nbdcopy (raw out)")), 0.8))
        # issue 2's raw copy: ours into a raw file, against the same peers
        out.append(
            Target(
                "1: ours (raw out) / nbdcopy",
                r_(tool("1", "ours (raw out)"), tool("1", "nbdcopy (raw out)")),
                0.8,
            )
        )
    if "2" in results:
        nc = tool("2", "nbdcopy (raw out)")
        out.append(Target("2: ours / nbdcopy", r_(tool("2", "ours"), nc), 0.8))
        prod = tool("2", "ours, product path (Host.backup_vm)")
        out.append(Target("2: product path / nbdcopy", r_(prod, nc), 0.8, informational=True))
    if "3" in results:
        res = results["3"]
        ours = tool("3", "ours")
        full = tool("3", "qemu-img convert (full)")
        out.append(Target("3: ours / full qemu-img convert", r_(ours, full), 1 / 20))
        ideal = res.derived.get("ideal_seconds")
        wall = ours.median() if ours else None
        work = ours.median("work") if ours else None
        # the ideal is a read time without any process around it: it is
        # compared with our work time (as map parsing is), the whole process
        # is shown for information
        out.append(
            Target(
                "3: ours (work, without interpreter start) / ideal",
                work / ideal if work and ideal else None,
                1.5,
            )
        )
        out.append(
            Target(
                "3: ours (whole process) / ideal",
                wall / ideal if wall and ideal else None,
                1.5,
                informational=True,
            )
        )
        prod = tool("3", "ours, product path (Host.backup_vm)")
        out.append(
            Target(
                "3: product path / full qemu-img convert",
                r_(prod, full),
                1 / 20,
                informational=True,
            )
        )
    if "4" in results:
        qi = fastest(
            tool("4", "qemu-img convert -O raw"), tool("4", "qemu-img convert -O raw -W -m 16")
        )
        out.append(
            Target("4: ours / faster qemu-img convert -O raw", r_(tool("4", "ours"), qi), 0.7)
        )
        prod = tool("4", "ours, product path (Host.restore_vm)")
        out.append(Target("4: product path / qemu-img", r_(prod, qi), 0.7, informational=True))
    if "5" in results:
        ours, seed = tool("5", "ours"), tool("5", "seed (regex loop)")
        out.append(
            Target("5: seed / ours (parse work)", r_(seed, ours, "work"), 30, lower_is_better=False)
        )
        out.append(
            Target(
                "5: seed / ours (whole process)",
                r_(seed, ours),
                30,
                lower_is_better=False,
                informational=True,
            )
        )
    if "6" in results:
        out.append(
            Target(
                f"6: ours {human(scale.scaling_sizes[1])} / {human(scale.scaling_sizes[0])}",
                results["6"].derived.get("ours_big_over_small"),
                1.2,
            )
        )
    if "6b" in results:
        size = human(scale.memory_target_size)
        for label, info in (
            (f"ours, {size} sparse", False),
            (f"ours product path, {size} sparse", True),
        ):
            t = tool("6b", label)
            rss = max(t.values("maxrss")) / MiB if t and t.samples else None
            out.append(
                Target(f"6: peak RSS, {label} (MiB)", rss, 128, unit=" MiB", informational=info)
            )
    return out


# ----------------------------------------------------------------------------
# Reporting


def human(n: float) -> str:
    for unit, size in (("TiB", TiB), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= size:
            v = n / size
            return f"{v:.0f} {unit}" if v == int(v) else f"{v:.1f} {unit}"
    return f"{n:.0f} B"


def fmt_s(v: float | None) -> str:
    return "-" if v is None else (f"{v:.3f}" if v < 10 else f"{v:.1f}")


def table_rows(res: Result) -> list[list[str]]:
    """Tool | wall median | min-max | CPU | work | peak RSS | ours/this."""
    rows = []
    for t in res.tools:
        primary = res.tool(t.versus) if t.versus else res.primary
        if t.error:
            rows.append([t.label, t.error[:60], "", "", "", "", ""])
            continue
        walls = t.values()
        work = t.median("work")
        rss = max(t.values("maxrss")) if t.samples else 0
        r = ratio(primary, t) if t is not primary else 1.0
        rows.append(
            [
                t.label,
                fmt_s(t.median()),
                f"{fmt_s(min(walls))}-{fmt_s(max(walls))}" if walls else "-",
                fmt_s(t.median("cpu")),
                fmt_s(work),
                f"{rss / MiB:.0f}" if rss else "-",
                "-" if r is None or t.role == Role.IDEAL else f"{r:.2f}",
            ]
        )
    return rows


HEADERS = ["tool", "wall s (median)", "min-max", "CPU s", "work s", "peak RSS MiB", "ours/this"]


def print_table(res: Result) -> None:
    rows = table_rows(res)
    widths = [max(len(str(c)) for c in col) for col in zip(HEADERS, *rows, strict=True)]
    print(f"\nWorkload {res.key}: {res.title}")
    line = "  ".join(h.ljust(wd) for h, wd in zip(HEADERS, widths, strict=True))
    print(line)
    print("-" * len(line))
    for row in rows:
        print("  ".join(str(c).ljust(wd) for c, wd in zip(row, widths, strict=True)))
    for k, v in res.derived.items():
        print(f"  {k}: {v:.4g}" if isinstance(v, float) else f"  {k}: {v}")


OWN_FILES = ("--", ".", ":!bench/RESULTS.md", ":!bench/results.png")  # written by this run


def machine() -> dict[str, str]:
    """What the figures were measured on."""

    def first_line(cmd: list[str]) -> str:
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, check=False).stdout
        except FileNotFoundError:
            return "not installed"
        return out.strip().splitlines()[0] if out.strip() else "?"

    cpu = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = "?"
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal"):
                mem = human(int(line.split()[1]) * KiB)
                break
    debian = (
        Path("/etc/debian_version").read_text().strip()
        if Path("/etc/debian_version").exists()
        else "?"
    )
    import nbd as libnbd
    import numpy

    commit = first_line(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    dirty = subprocess.run(  # this run's own outputs do not count
        ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no", *OWN_FILES],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return {
        "CPU": cpu,
        "cores": str(os.cpu_count()),
        "RAM": mem,
        "kernel": platform.release(),
        "Debian": debian,
        "qemu-img": first_line(["qemu-img", "--version"]),
        "libnbd": libnbd.NBD().get_version(),
        "nbdcopy": first_line(["nbdcopy", "--version"]),
        "nbdkit": first_line(["nbdkit", "--version"]),
        "Python": platform.python_version(),
        "numpy": numpy.__version__,
        "dirbackup commit": commit + (" (with uncommitted changes)" if dirty else ""),
    }


def write_markdown(
    path: Path,
    results: dict[str, Result],
    goals: list[Target],
    scale: Scale,
    args: argparse.Namespace,
    info: dict[str, str],
    started: datetime.datetime,
    seconds: float,
    load: tuple[tuple[float, ...], tuple[float, ...]],
    work: Path,
    failures: dict[str, str],
) -> None:
    """bench/RESULTS.md: everything needed to judge and reproduce the figures."""
    lines: list[str] = ["# Benchmark results", ""]
    if scale.name != "full":
        lines += [
            f"> **{scale.name} scale, noisy machine, not the official figures.** "
            "This file was written by a validation run of the suite at reduced sizes on a "
            "shared machine; the lead replaces it with a full-scale run "
            "(`make bench`) on a quiet machine.",
            "",
        ]
    if args.only:
        lines += [f"> Partial run: only workloads {args.only}.", ""]
    for key, why in failures.items():
        lines += [f"> **Workload {key} failed while setting up**: {why}", ""]
    lines += [
        f"Run {started:%Y-%m-%d %H:%M} UTC, {seconds / 60:.1f} min, scale `{scale.name}`, "
        f"{args.rounds} timed rounds after one checked warm-up, {args.workers} worker threads.",
        f"Load average before/after: {' '.join(f'{x:.2f}' for x in load[0])} / "
        f"{' '.join(f'{x:.2f}' for x in load[1])}.",
        "",
        "Command: `" + " ".join(["python", "bench/compare.py", *sys.argv[1:]]) + "`",
        "",
        "## Machine",
        "",
        "| | |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v} |" for k, v in info.items()]
    lines += ["", "## Targets", "", "| target | value | limit | verdict |", "|---|---|---|---|"]
    for g in goals:
        value = "-" if g.value is None else f"{g.value:.3g}{g.unit}"
        limit = f"{'≤' if g.lower_is_better else '≥'} {g.limit:.3g}{g.unit}"
        lines.append(f"| {g.name} | {value} | {limit} | {g.verdict()} |")
    lines += [
        "",
        "Ratios are ours/peer of median whole-process wall times unless the row says "
        "otherwise; '(info)' rows are shown for information and are not the issue's targets.",
        "",
        "![time per workload and tool](results.png)",
        "",
    ]
    for res in results.values():
        lines += [f"## Workload {res.key}: {res.title}", ""]
        lines += ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
        lines += [
            "| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in table_rows(res)
        ]
        lines.append("")
        for k, v in res.derived.items():
            shown = (
                human(v)
                if k.endswith("bytes")
                else (f"{human(v)}/s" if k == "read_rate" else f"{v:.4g}")
            )
            lines.append(f"- {k.replace('_', ' ')}: {shown}")
        lines += [f"- {n}" for n in res.notes]
        lines += ["", "Commands (`$W` = the work directory on /dev/shm):", "", "```"]
        for t in res.tools:
            cmd = " ".join(t.argv).replace(str(work), "$W").replace(str(BENCH), "bench")
            cmd = cmd.replace(PY, "python")
            lines.append(f"{t.label}: {cmd}")
        lines += ["```", ""]
    analysis = BENCH / "analysis.md"
    if analysis.exists():
        lines += [analysis.read_text().strip(), ""]
    lines += [
        "## How to read this",
        "",
        "- wall s: whole-process wall time (spawn to exit), median of the timed rounds; "
        "min-max over them.",
        "- CPU s: user + system time of the process and of the children it waited for "
        "(not of the qemu-nbd servers the tools read from, which serve every tool alike).",
        "- work s: the time the process itself reports for its work, after interpreter "
        "start and imports (ours and the seed only).",
        "- ours/this: our median divided by this tool's; below 1 we are faster.",
        "- Thread budget: ours `--workers N` (copy threads and NBD connections), nbdcopy "
        "`--threads=N`; qemu-img has no thread option (`-m` sets coroutines, `-W` allows "
        "out-of-order writes).",
        "",
    ]
    path.write_text("\n".join(lines))


def write_chart(path: Path, results: dict[str, Result], scale: Scale) -> None:
    """One panel per workload: median wall time per tool, with min-max whiskers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in results.values() if any(t.samples for t in r.tools)]
    if not shown:
        return
    cols = 2
    rows = (len(shown) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(13, 2.6 * rows + 0.8), squeeze=False)
    colours = {
        Role.OURS: "#1f77b4",
        Role.INFO: "#9ecae1",
        Role.PEER: "#d62728",
        Role.IDEAL: "#7f7f7f",
    }
    for ax, res in zip(axes.flat, shown, strict=False):
        tools = [t for t in res.tools if t.samples]
        med = [t.median() or 0.0 for t in tools]
        lo = [m - min(t.values()) for m, t in zip(med, tools, strict=True)]
        hi = [max(t.values()) - m for m, t in zip(med, tools, strict=True)]
        y = list(range(len(tools)))
        ax.barh(y, med, xerr=[lo, hi], color=[colours[t.role] for t in tools], capsize=3)
        ax.set_yticks(y, [t.label for t in tools], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("seconds (median, min-max)", fontsize=7)
        ax.tick_params(axis="x", labelsize=7)
        title = f"{res.key}: {res.title}"
        ax.set_title(title if len(title) < 80 else title[:77] + "…", fontsize=8)
        for yi, t in zip(y, tools, strict=True):
            ax.text(max(t.values()), yi, f"  {t.median() or 0.0:.3g} s", va="center", fontsize=6)
        ax.margins(x=0.15)
    for ax in list(axes.flat)[len(shown) :]:
        ax.axis("off")
    label = (
        "" if scale.name == "full" else " — small scale, noisy machine, not the official figures"
    )
    fig.suptitle(f"dirbackup vs peers: whole-process wall time{label}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------
# Main


def prepare_memory(base: Path, say: Callable[[str], None]) -> None:
    """Give every tool the same memory to write into.

    All workloads write GiBs of fresh pages to tmpfs.  When free memory is
    short the kernel first reclaims page cache, and in a VM the first touch of
    a guest page costs the host a fault: either makes the first tools of a run
    slower than the last, whatever they are.  So (as root) the page cache is
    dropped, and a file as large as the largest output is written to the
    image directory and deleted, before anything is timed."""
    if os.geteuid() == 0:
        os.sync()
        with contextlib.suppress(OSError):
            Path("/proc/sys/vm/drop_caches").write_text("3\n")
    warm = base / f".dbb-warm-{os.getpid()}"
    block = b"\x5a" * (1 << 20)
    size = min(6 << 30, shutil.disk_usage(base).free // 3)
    say(f"  warming {human(size)} of memory in {base}")
    try:
        with open(warm, "wb") as f:
            for _ in range(size >> 20):
                f.write(block)
    finally:
        warm.unlink(missing_ok=True)


@contextlib.contextmanager
def workdir(base: Path) -> Iterator[Path]:
    path = base / f"dbb-{os.getpid()}"
    path.mkdir(mode=0o700)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str]) -> int:
    # Ctrl-C and kill both end in the cleanup below (a shell without job control
    # starts background jobs with SIGINT ignored, so install it explicitly).
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", choices=sorted(SCALES), default="full")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds (after one warm-up)")
    ap.add_argument("--only", default="", help="comma-separated workloads: 1,2,3,4,5,6,6b")
    ap.add_argument(
        "--workers",
        type=int,
        default=min(4, os.cpu_count() or 1),
        help="thread budget: nbdcopy --threads, and ours' maximum",
    )
    ap.add_argument(
        "--force-workers",
        action="store_true",
        help="make ours use exactly --workers threads instead of its own choice",
    )
    ap.add_argument("--base", type=Path, default=Path("/dev/shm"), help="where images go (RAM)")
    ap.add_argument("--results", type=Path, default=BENCH / "RESULTS.md")
    ap.add_argument("--chart", type=Path, default=BENCH / "results.png")
    ap.add_argument("--no-write", action="store_true", help="terminal table only")
    ap.add_argument("--keep-wrong", type=Path, help="move outputs that fail their check here")
    args = ap.parse_args(argv)
    global KEEP_WRONG
    KEEP_WRONG = args.keep_wrong
    scale = SCALES[args.scale]
    args.rounds = args.rounds or scale.rounds
    keys = [k.strip() for k in args.only.split(",") if k.strip()] or list(WORKLOADS)
    unknown = [k for k in keys if k not in WORKLOADS]
    if unknown:
        ap.error(f"unknown workload(s) {unknown}; choose from {', '.join(WORKLOADS)}")
    free = shutil.disk_usage(args.base).free
    if free < scale.shm_needed:
        print(
            f"{args.base} has {human(free)} free; "
            f"scale {scale.name} needs {human(scale.shm_needed)}"
        )
        return 1

    def say(msg: str) -> None:
        print(msg, flush=True)

    prepare_memory(args.base, say)
    started = datetime.datetime.now(datetime.UTC)
    t0 = time.monotonic()
    load0 = os.getloadavg()
    results: dict[str, Result] = {}
    failures: dict[str, str] = {}
    global SPAWNER
    SPAWNER = Spawner()  # before anything large is allocated here
    with workdir(args.base) as work:
        logs = work / "logs"
        logs.mkdir()
        ctx = Ctx(
            scale, work, logs, args.rounds, args.workers, say, force_workers=args.force_workers
        )
        try:
            for key in keys:
                say(f"workload {key}: {WORKLOADS[key].__doc__}")
                began = time.monotonic()
                try:
                    results[key] = WORKLOADS[key](ctx)
                except (ToolFailed, qemu.ToolError, subprocess.CalledProcessError, OSError) as exc:
                    failures[key] = f"{type(exc).__name__}: {exc}"
                    say(f"  workload {key} FAILED while setting up: {failures[key]}")
                    continue
                finally:
                    ctx.stop_all()
                    for p in work.iterdir():
                        if p != logs and p.name != "w1.raw":  # workload 2 reuses w1.raw
                            _remove(p)
                print_table(results[key])
                say(f"  ({time.monotonic() - began:.0f} s)")
        except KeyboardInterrupt:
            say("interrupted; cleaning up")
            SPAWNER.close(interrupted=True)
            ctx.stop_all()
            return 130
        finally:
            ctx.stop_all()
            SPAWNER.close()
    seconds = time.monotonic() - t0
    goals = targets(results, scale)
    print("\nTargets (medians of this run):")
    for g in goals:
        value = "-" if g.value is None else f"{g.value:.3g}{g.unit}"
        print(
            f"  {g.name:55s} {value:>12s}  limit {'≤' if g.lower_is_better else '≥'} "
            f"{g.limit:.3g}{g.unit}  {g.verdict()}"
        )
    for key, why in failures.items():
        print(f"  workload {key} FAILED: {why}")
    print(f"\nTotal {seconds / 60:.1f} min")
    if not args.no_write:
        write_markdown(
            args.results,
            results,
            goals,
            scale,
            args,
            machine(),
            started,
            seconds,
            (load0, os.getloadavg()),
            work,
            failures,
        )
        write_chart(args.chart, results, scale)
        print(f"wrote {args.results} and {args.chart}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
