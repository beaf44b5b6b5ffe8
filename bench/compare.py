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

This file is the entry point: the options, the work directory, the loop over
the workloads and the cleanup.  The rounds and timing are in runner.py, the
checks in checks.py, what a workload is given in context.py, the tables,
targets, RESULTS.md and chart in report.py, and each workload in workloads/.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import runner
from context import SCALES, Ctx
from report import Target, human, machine, print_table, print_targets, write_chart, write_markdown
from runner import BENCH, Result, ToolFailed, remove
from workloads import WORKLOADS

from dirbackup import qemu


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
    ap.add_argument("--only", default="", help="comma-separated workloads: " + ",".join(WORKLOADS))
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
    runner.start_spawner()  # before anything large is allocated here
    with workdir(args.base) as work:
        logs = work / "logs"
        logs.mkdir()
        ctx = Ctx(
            scale,
            work,
            logs,
            args.rounds,
            args.workers,
            say,
            force_workers=args.force_workers,
            keep_wrong=args.keep_wrong,
        )
        try:
            for key in keys:
                say(f"workload {key}: {WORKLOADS[key].run.__doc__}")
                began = time.monotonic()
                try:
                    results[key] = WORKLOADS[key].run(ctx)
                except (ToolFailed, qemu.ToolError, subprocess.CalledProcessError, OSError) as exc:
                    failures[key] = f"{type(exc).__name__}: {exc}"
                    say(f"  workload {key} FAILED while setting up: {failures[key]}")
                    continue
                finally:
                    ctx.stop_all()
                    for p in work.iterdir():
                        if p != logs and p.name != "w1.raw":  # workload 2 reuses w1.raw
                            remove(p)
                print_table(results[key])
                say(f"  ({time.monotonic() - began:.0f} s)")
        except KeyboardInterrupt:
            say("interrupted; cleaning up")
            runner.stop_spawner(interrupted=True)
            ctx.stop_all()
            return 130
        finally:
            ctx.stop_all()
            runner.stop_spawner()
    seconds = time.monotonic() - t0
    goals: list[Target] = []
    for key, workload in WORKLOADS.items():
        if key in results:
            goals += workload.targets(results[key], scale)
    print_targets(goals)
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
