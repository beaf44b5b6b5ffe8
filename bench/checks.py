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


def cli_image(store: Path, vmid: str, device: str, keep: tuple[str, ...] = ()) -> Path:
    """The one disk image a `dirbackup backup` run added to the store (backups
    named in `keep` were there before)."""
    found = [
        p / f"{device}.qcow2"
        for p in (store / vmid).glob("qemu-*")
        if p.name not in keep and (p / f"{device}.qcow2").exists()
    ]
    if len(found) != 1:
        raise ToolFailed(f"expected one new backup of {device} in {store / vmid}, found {found}")
    return found[0]


def cli_backup_check(
    store: Path,
    vmid: str,
    device: str,
    reference: Path | str,
    ref_fmt: str,
    mode: str,
    keep: tuple[str, ...] = (),
) -> Callable[[Sample], None]:
    """`dirbackup backup --json` made a `mode` backup of `device` whose image
    equals `reference` and passes qemu-img check."""

    def check(sample: Sample) -> None:
        disk = sample.report.get("disks", {}).get(device, {})
        if disk.get("mode") != mode:
            raise ToolFailed(f"the command made no {mode} backup of {device}: {sample.report}")
        image = cli_image(store, vmid, device, keep)
        same(image, reference, "qcow2", ref_fmt)
        sound_qcow2(image)

    return check


def cli_read(device: str, expected: int) -> Callable[[Sample], None]:
    """Every `dirbackup backup --json` run read exactly `expected` bytes of
    `device` (an incremental: the bitmap's dirty bytes)."""

    def check(sample: Sample) -> None:
        got = sample.report.get("disks", {}).get(device, {}).get("read")
        if got != expected:
            raise ToolFailed(f"the command read {got} bytes of {device}, expected {expected}")

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
