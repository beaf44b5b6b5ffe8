"""Workload 1q: a full backup of a qcow2 guest image holding workload 1's data.

The same 4 GiB (1/2 random data, 1/4 written zeros, 1/4 holes) as a qcow2
guest image (`qemu-img convert -O qcow2` of workload 1's raw file).  Compares
the command a user types (`dirbackup backup --mode full`, whole process) and
the engine alone (`ours.py full-qcow2`: the chain reader restores use, into
the qcow2 Writer) with `qemu-img convert -f qcow2 -O qcow2` (defaults, and
-W -m 16); the write floor is the data bytes written from one buffer.
"""

from __future__ import annotations

import images
from checks import output_tool
from context import Ctx, Scale, write_floor
from context import qemu_img_convert as convert
from report import Target, fastest, human
from runner import Result, Role, Tool, remove

from workloads.w1_full_file import FLOOR, cli_full, cli_targets

KEY = "1q"


def run(ctx: Ctx) -> Result:
    """Full backup of a qcow2 guest image into qcow2."""
    sc = ctx.scale
    w = ctx.work
    raw = w / "w1.raw"  # workload 1's image, kept for workload 2
    if not raw.exists():
        images.mixed_raw(raw, sc.mixed, seed=1)
    guest = w / "w1q-guest.qcow2"
    ctx.say(f"  converting the {human(sc.mixed)} raw image into a qcow2 guest")
    images.qemu_img("convert", "-f", "raw", "-O", "qcow2", str(raw), str(guest))
    store = ctx.mkdir("w1q-store")

    rows = [  # label, role, output file (the command's last argument), command
        ("ours", Role.OURS, "w1q-ours.qcow2", ctx.ours("full-qcow2", str(guest))),
        ("qemu-img convert", Role.PEER, "w1q-qi.qcow2", convert("qcow2", "qcow2", guest)),
        (
            "qemu-img convert -W -m 16",
            Role.PEER,
            "w1q-qiw.qcow2",
            convert("qcow2", "qcow2", guest, fast=True),
        ),
    ]
    tools = [
        output_tool(label, [*command, str(w / out)], role, w / out, guest, "qcow2")
        for label, role, out, command in rows
    ]
    tools.insert(1, cli_full(store, guest, "qcow2"))
    floor = w / "w1q-floor.raw"
    tools.append(Tool(FLOOR, write_floor(sc.mixed // 2, floor), Role.IDEAL, [floor]))
    try:
        ctx.measure(tools)
    finally:
        remove(store)
        remove(guest)
    return Result(
        KEY,
        f"full backup, qcow2 guest image (workload 1's {human(sc.mixed)}) → qcow2",
        tools,
        [
            "The guest is `qemu-img convert -O qcow2` of workload 1's raw image (its written "
            "zeros become unallocated clusters).",
            "The CLI row backs up into an empty store each round; with --mode full it keeps "
            "no dirty bitmap in the guest (it still asks `qemu-img info` about the image).",
        ],
    )


def targets(res: Result, scale: Scale) -> list[Target]:
    qi = fastest(res.find("qemu-img convert"), res.find("qemu-img convert -W -m 16"))
    return cli_targets(KEY, res, qi)
