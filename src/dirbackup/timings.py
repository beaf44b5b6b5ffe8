"""Where one `dirbackup` command's time goes: phase timings on stderr, on request.

Why: the benchmark (bench/, issue 13) compares the command a user types with
`qemu-img convert` and with the copy engine alone; the difference is process
start and imports, qemu-img calls for bitmaps, qemu-nbd, the copy loop's
extras and the fsync and publish.  Measuring those from outside would be
guesswork, so the command can report them itself.

With the environment variable DIRBACKUP_TIMINGS set (to anything but empty
or 0), the command prints, when it ends, one line per phase to stderr:

    dirbackup timing: NAME SECONDS COUNT

NAME may contain spaces; SECONDS is the total time spent in the phase, COUNT
how often it was entered (qemu-img is called several times).  Phases nest: a
qemu-img call made while setting up the bitmaps counts in both.  `startup`
runs from the process's start (the kernel's start time, 10 ms ticks) to
the command's main function, `total` from there to the report.  Without the
variable nothing is printed and a phase costs one dictionary look-up.

Only the standard library is used, so any module may import this one.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Iterator

ENABLED = os.environ.get("DIRBACKUP_TIMINGS", "") not in ("", "0")
PREFIX = "dirbackup timing: "

_lock = threading.Lock()
_totals: dict[str, list[float]] = {}  # name -> [seconds, count], in order of first use
_began: float | None = None


def add(name: str, seconds: float) -> None:
    """Count `seconds` more in phase `name`."""
    if not ENABLED:
        return
    with _lock:
        entry = _totals.setdefault(name, [0.0, 0])
        entry[0] += seconds
        entry[1] += 1


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """Time the block as (one more entry of) phase `name`."""
    if not ENABLED:
        yield
        return
    start = time.perf_counter()
    try:
        yield
    finally:
        add(name, time.perf_counter() - start)


def _process_age() -> float | None:
    """Seconds since this process started (the kernel's start time in clock
    ticks since boot, against CLOCK_BOOTTIME), or None where /proc has none."""
    try:
        with open("/proc/self/stat", "rb") as f:
            stat = f.read()
        # fields after the command name (which may hold spaces and parentheses)
        fields = stat[stat.rindex(b")") + 2 :].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")
        return time.clock_gettime(time.CLOCK_BOOTTIME) - started
    except (OSError, ValueError, IndexError):
        return None


def begin() -> None:
    """The command's main function starts: record `startup`."""
    global _began
    if not ENABLED:
        return
    _began = time.perf_counter()
    age = _process_age()
    if age is not None:
        add("startup", age)


def report() -> None:
    """Print every phase to stderr (once, when the command ends)."""
    if not ENABLED:
        return
    if _began is not None:
        add("total", time.perf_counter() - _began)
    with _lock:
        lines = [f"{PREFIX}{n} {s:.6f} {c}" for n, (s, c) in _totals.items()]
        _totals.clear()
    for line in lines:
        print(line, file=sys.stderr)
    sys.stderr.flush()
