"""Workload 1: a full backup of a raw file into qcow2.

Compares `ours.py full-file` (SEEK_DATA extents, copy engine, qcow2 Writer)
with `qemu-img convert -O qcow2` (defaults, and -W -m 16) and `nbdcopy` to a
raw file (it has no qcow2 output: the raw copy-speed bar); for issue 2's raw
copy, `ours.py copy-raw` into a raw file against `qemu-img convert -O raw`.
"""

from __future__ import annotations

import images
from checks import output_tool
from context import Ctx, Scale
from context import qemu_img_convert as convert
from report import Target, fastest, human, ratio_of
from runner import Result, Role

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
    ctx.measure(tools)
    return Result(
        KEY,
        f"full backup, raw file ({human(sc.mixed)}: 1/2 data, 1/4 zeros, 1/4 holes) → qcow2",
        tools,
        ["nbdcopy writes a raw file: it has no qcow2 output; it is the raw copy-speed bar."],
    )


def targets(res: Result, scale: Scale) -> list[Target]:
    ours, nbdcopy = res.find("ours"), res.find("nbdcopy (raw out)")
    qi = fastest(res.find("qemu-img convert"), res.find("qemu-img convert -W -m 16"))
    return [
        Target("1: ours / faster qemu-img convert", ratio_of(ours, qi), 0.5),
        Target("1: ours / nbdcopy", ratio_of(ours, nbdcopy), 0.8),
        # issue 2's raw copy: ours into a raw file, against the same peers
        Target("1: ours (raw out) / nbdcopy", ratio_of(res.find("ours (raw out)"), nbdcopy), 0.8),
    ]
