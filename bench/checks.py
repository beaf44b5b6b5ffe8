"""The correctness checks a tool's output must pass before the tool is timed.

Correct before timed: qemu-img compare against the source (or the backup
chain, for restores), qemu-img check of every qcow2, and for incremental runs
the exact dirty byte count on every timed round.  A failed check raises
ToolFailed, which the runner reports as WRONG.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from runner import Role, Sample, Tool, ToolFailed

from dirbackup import qemu


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


def output_tool(
    label: str,
    argv: list[str],
    role: Role,
    out: Path,
    reference: Path | str,
    ref_fmt: str,
    **around: Any,
) -> Tool:
    """A tool writing one file `out` (qcow2 or raw, by its suffix) whose contents
    must equal `reference`; `around` are Tool's other fields (setup, every...)."""
    fmt = "qcow2" if out.suffix == ".qcow2" else "raw"
    return Tool(label, argv, role, [out], check_output(out, fmt, reference, ref_fmt), **around)
