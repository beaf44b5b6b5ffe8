"""Running the tools of one workload: alternating rounds, the checked warm-up, timing and RSS.

Every tool runs as its own process, started by the spawner (spawner.py, so
that the runner's own memory does not count in a child's peak RSS).  For
each workload the tools run alternately, round after round, with the order
rotated every round so that drifting machine load hits all of them alike;
round 0 is a warm-up whose output is checked and then discarded, so a tool
that gives a wrong answer is reported as WRONG and never timed.  Outputs are
deleted before and after every run, outside the timed part.

What a workload hands back (`Result`) is defined here too: its tools with
their samples, notes and derived figures, which the report turns into tables.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from dirbackup import qemu

BENCH = Path(__file__).resolve().parent
PY = sys.executable
TIMEOUT = 600.0  # seconds any one tool may run before it is killed and reported
TIMINGS_ENV = "DIRBACKUP_TIMINGS"  # makes `dirbackup` print its phase timings (stderr)
TIMING_PREFIX = "dirbackup timing: "  # how those lines start (dirbackup.timings.PREFIX)


class Role(Enum):
    OURS = "ours"
    PEER = "peer"
    IDEAL = "ideal"  # a measurement the ideal is derived from
    INFO = "info"  # ours, another way (product path); not what targets judge
    CLI = "cli"  # the `dirbackup` command as a user types it (whole process)


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


def ratio(a: Tool, b: Tool, what: str = "wall") -> float | None:
    ma, mb = a.median(what), b.median(what)
    if ma is None or mb is None or mb == 0:
        return None
    return ma / mb


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

    def find(self, label: str) -> Tool | None:
        return next((t for t in self.tools if t.label == label), None)

    @property
    def primary(self) -> Tool:
        return next(t for t in self.tools if t.role == Role.OURS)


class Spawner:
    """The small process that starts and times every tool (see spawner.py).

    Its environment has DIRBACKUP_TIMINGS=1, so that the `dirbackup` command
    prints where its time went (dirbackup.timings; a few clock reads, printed
    at exit) and run_child can show it; the other tools ignore it."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [PY, "-I", "-S", str(BENCH / "spawner.py")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, TIMINGS_ENV: "1"},
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


_SPAWNER: Spawner | None = None


def start_spawner() -> None:
    """Start the spawner now (before anything large is allocated in this process)."""
    global _SPAWNER
    if _SPAWNER is None:
        _SPAWNER = Spawner()


def stop_spawner(interrupted: bool = False) -> None:
    """Let the spawner exit; when interrupted, make it kill the running tool."""
    global _SPAWNER
    if _SPAWNER is not None:
        _SPAWNER.close(interrupted)
        _SPAWNER = None


def run_child(argv: Sequence[str], logdir: Path, name: str) -> Sample:
    """Run one tool through the spawner: whole-process wall time, CPU time and
    peak RSS (wait4), and the JSON line it printed last, if any; the phase
    timings `dirbackup` printed on stderr go into the report's "timings"
    ({phase: seconds})."""
    start_spawner()
    assert _SPAWNER is not None
    out_path, err_path = logdir / f"{name}.out", logdir / f"{name}.err"
    answer = _SPAWNER.run(argv, out_path, err_path, TIMEOUT)
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
    timings = _timings(err_path)
    if timings:
        report["timings"] = timings
    return Sample(answer["wall"], answer["cpu"], answer["maxrss"], report)


def _timings(err_path: Path) -> dict[str, float]:
    """The `dirbackup timing: NAME SECONDS COUNT` lines of a tool's stderr."""
    found: dict[str, float] = {}
    for line in err_path.read_text(errors="replace").splitlines():
        if line.startswith(TIMING_PREFIX):
            fields = line[len(TIMING_PREFIX) :].rsplit(" ", 2)
            with contextlib.suppress(ValueError, IndexError):
                found[fields[0]] = float(fields[1])
    return found


def remove(path: Path) -> None:
    """Remove a file or a directory tree, if it is there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def measure(
    tools: list[Tool],
    rounds: int,
    logdir: Path,
    say: Callable[[str], None],
    keep_wrong: Path | None = None,
) -> None:
    """Round 0 warms up and is checked; rounds 1..N are timed.  Tools alternate,
    the starting tool rotating each round.  Each tool's outputs are removed
    before and right after its run (outside the timed part); with `keep_wrong`,
    the outputs of a tool that fails are moved there instead."""
    for r in range(rounds + 1):
        shift = r % len(tools)
        for tool in tools[shift:] + tools[:shift]:
            if tool.error:
                continue
            for o in tool.outputs:
                remove(o)
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
                if keep_wrong is not None:
                    for o in tool.outputs:
                        if o.exists():
                            shutil.move(o, keep_wrong / o.name)
                            say(f"    kept {keep_wrong / o.name}")
            finally:
                for o in tool.outputs:  # one output at a time: /dev/shm stays bounded
                    remove(o)
        say(f"    round {r}{' (warm-up, checked)' if r == 0 else ''} done")


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in label).strip("-")
