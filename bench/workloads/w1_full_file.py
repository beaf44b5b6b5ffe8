"""Workload 1: a full backup of a raw file into qcow2.

Compares `ours.py full-file` (SEEK_DATA extents, copy engine, qcow2 Writer)
with `qemu-img convert -O qcow2` (defaults, and -W -m 16) and `nbdcopy` to a
raw file (it has no qcow2 output: the raw copy-speed bar); for issue 2's raw
copy, `ours.py copy-raw` into a raw file against `qemu-img convert -O raw`.
The CLI row is the command a user types (`dirbackup backup --mode full`, the
whole process with its store, manifest, digests and publish); the write floor
is the image's data bytes written from one buffer, reading nothing.
"""

from __future__ import annotations

from pathlib import Path

import images
from checks import cli_backup_check, output_tool
from context import DEVICE, Ctx, Scale, cli_backup, emptier, write_floor
from context import qemu_img_convert as convert
from report import Target, fastest, human, ratio_of
from runner import Result, Role, Tool, remove

CLI_ROW = "CLI: dirbackup backup --mode full"
FLOOR = "write floor (data bytes from one buffer)"

KEY = "1"


def run(ctx: Ctx) -> Result:
    """Full backup of a raw file into qcow2."""
    sc = ctx.scale
    src = ctx.work / "w1.raw"  # the runner keeps it for workload 2
    ctx.say(f"  making {human(sc.mixed)} mixed raw image")
    images.mixed_raw(src, sc.mixed, seed=1)
    rows = [  # label, role, output file (the command's last argument), command
        ("ours", Role.OURS, "w1-ours.qcow2", ctx.ours("full-file", str(src))),
        ("qemu-img convert", Role.PEER, "w1-qi.qcow2", convert("raw", "qcow2", src)),
        (
            "qemu-img convert -W -m 16",
            Role.PEER,
            "w1-qiw.qcow2",
            convert("raw", "qcow2", src, fast=True),
        ),
        ("nbdcopy (raw out)", Role.PEER, "w1-nc.raw", ctx.nbdcopy(str(src))),
        ("ours (raw out)", Role.INFO, "w1-ours.raw", ctx.ours("copy-raw", str(src))),
        ("qemu-img convert -O raw", Role.PEER, "w1-qir.raw", convert("raw", "raw", src)),
    ]
    tools = [
        output_tool(label, [*command, str(ctx.work / out)], role, ctx.work / out, src, "raw")
        for label, role, out, command in rows
    ]
    store = ctx.mkdir("w1-store")
    tools.insert(1, cli_full(store, src, "raw"))  # the command's row comes right after ours
    floor = ctx.work / "w1-floor.raw"
    tools.append(Tool(FLOOR, write_floor(sc.mixed // 2, floor), Role.IDEAL, [floor]))
    try:
        ctx.measure(tools)
    finally:
        remove(store)
    return Result(
        KEY,
        f"full backup, raw file ({human(sc.mixed)}: 1/2 data, 1/4 zeros, 1/4 holes) → qcow2",
        tools,
        [
            "nbdcopy writes a raw file: it has no qcow2 output; it is the raw copy-speed bar.",
            "The CLI row backs up into an empty store each round (emptied untimed).",
        ],
    )


def cli_full(store: Path, disk: Path, fmt: str) -> Tool:
    """`dirbackup backup --mode full` of `disk` into the emptied `store`; its
    image must equal the disk."""
    return Tool(
        CLI_ROW,
        cli_backup(store, "bench", "100", disk, "full"),
        Role.CLI,
        [store / "100"],
        cli_backup_check(store, "100", DEVICE, disk, fmt, "full"),
        setup=emptier(store),
        versus="ours",
    )


def cli_targets(key: str, res: Result, qi: Tool | None) -> list[Target]:
    """The CLI's full-backup targets (workloads 1 and 1q): ≤ 0.8x the faster
    qemu-img convert, ≤ 1.15x the engine alone; ours/write floor shown."""
    cli, ours, floor = res.find(CLI_ROW), res.find("ours"), res.find(FLOOR)
    return [
        Target(f"{key}: CLI / faster qemu-img convert", ratio_of(cli, qi), 0.8),
        Target(f"{key}: CLI / engine-only (ours)", ratio_of(cli, ours), 1.15),
        Target(f"{key}: ours / write floor", ratio_of(ours, floor), None),
        Target(f"{key}: CLI / write floor", ratio_of(cli, floor), None),
    ]


def targets(res: Result, scale: Scale) -> list[Target]:
    ours, nbdcopy = res.find("ours"), res.find("nbdcopy (raw out)")
    qi = fastest(res.find("qemu-img convert"), res.find("qemu-img convert -W -m 16"))
    return [
        Target("1: ours / faster qemu-img convert", ratio_of(ours, qi), 0.5),
        Target("1: ours / nbdcopy", ratio_of(ours, nbdcopy), 0.8),
        # issue 2's raw copy: ours into a raw file, against the same peers
        Target("1: ours (raw out) / nbdcopy", ratio_of(res.find("ours (raw out)"), nbdcopy), 0.8),
        *cli_targets("1", res, qi),
    ]
