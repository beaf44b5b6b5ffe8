"""Which process owns a thing: an owner line that stays true after its pid is reused.

A backup being written (the store's partial directories) and the mount points
of nbdfuse exports are left behind when their process dies; the next one must
tell whether the owner still runs.  A pid alone cannot say (pids are reused),
so an owner is written as `<pid> <start time>`, the start time as the kernel
counts it in /proc/<pid>/stat, and a process is alive only if both match.
"""

from __future__ import annotations

import os
from collections.abc import Collection


def _process_alive(pid: int, start: str) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return fields[0] not in ("Z", "X") and fields[19] == start


def _start_time(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[19]


def owner_line(pid: int | None = None) -> str:
    """`<pid> <start time>`: names this process (or process `pid`), even
    after its pid is reused."""
    pid = os.getpid() if pid is None else pid
    return f"{pid} {_start_time(pid)}\n"


def owner_alive(line: str) -> bool:
    """Whether the process an owner_line() names still runs."""
    try:
        pid_s, start = line.split()
        return _process_alive(int(pid_s), start)
    except ValueError:
        return False


def processes_naming(path: str, programs: Collection[str]) -> list[str]:
    """Owner lines of this user's processes running one of `programs` (by
    the base name of argv[0]) with an argument at or below `path` (a real
    path), oldest first.

    A run directory's helpers (qemu-nbd on a socket in it, nbdfuse mounting a
    directory in it) are recorded in its state file only once started: a
    process interrupted between starting one and recording it leaves a helper
    that only its command line ties to the directory."""
    prefix = path.rstrip("/") + "/"
    uid = os.getuid()
    found: list[tuple[int, str]] = []
    me = os.getpid()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            if entry.stat().st_uid != uid:
                continue
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                argv = f.read().decode("utf-8", "surrogateescape").split("\0")
            if os.path.basename(argv[0]) not in programs:
                continue
            if not any(a == path or prefix in a for a in argv):
                continue
            start = _start_time(int(entry.name))
        except (OSError, IndexError):
            continue
        found.append((int(start), f"{entry.name} {start}\n"))
    return [line for _, line in sorted(found)]
