"""Workload 2: a full backup from a qemu-nbd export of workload 1's image.

Compares `ours.py full-nbd` (connect_many, base:allocation) with
`qemu-img convert -O qcow2` (defaults, and -W -m 16) and `nbdcopy` to a raw
file, all reading one read-only export; the product path (`Host.backup_vm`,
which starts its own qemu-nbd and writes manifest, digests and logs) is shown
for information.  The write floor is the image's data bytes written from one
buffer.  This is the hypervisor's path (it hands the provider an NBD export):
issue 13 asks for ≤ 0.7x nbdcopy.
"""

from __future__ import annotations

import images
from checks import check_output, output_tool
from context import (
    DEVICE,
    STORE_EPOCH,
    Ctx,
    Scale,
    emptier,
    product_backup,
    product_image,
    write_floor,
)
from context import qemu_img_convert as convert
from report import Target, human, ratio_of
from runner import Result, Role, Tool, remove

KEY = "2"
PRODUCT = "ours, product path (Host.backup_vm)"
FLOOR = "write floor (data bytes from one buffer)"


def run(ctx: Ctx) -> Result:
    """Full backup from a qemu-nbd export of the same image."""
    sc = ctx.scale
    src = ctx.work / "w1.raw"
    if not src.exists():
        images.mixed_raw(src, sc.mixed, seed=1)
    server = ctx.serve(src, "w2", export=DEVICE, fmt="raw")
    uri = server.uri
    store = ctx.mkdir("w2-store")
    rows = [  # label, role, output file (the command's last argument), command
        ("ours", Role.OURS, "w2-ours.qcow2", ctx.ours("full-nbd", uri)),
        ("qemu-img convert", Role.PEER, "w2-qi.qcow2", convert("raw", "qcow2", uri)),
        (
            "qemu-img convert -W -m 16",
            Role.PEER,
            "w2-qiw.qcow2",
            convert("raw", "qcow2", uri, fast=True),
        ),
        ("nbdcopy (raw out)", Role.PEER, "w2-nc.raw", ctx.nbdcopy(uri)),
    ]
    tools = [
        output_tool(label, [*command, str(ctx.work / out)], role, ctx.work / out, src, "raw")
        for label, role, out, command in rows
    ]
    product = Tool(
        PRODUCT,
        ctx.ours(*product_backup(store, "w2", "100", src, STORE_EPOCH)),
        Role.INFO,
        [store / "100"],
        check_output(product_image(store, "100", STORE_EPOCH), "qcow2", src, "raw"),
        setup=emptier(store),
    )
    tools.insert(1, product)  # the product path's row comes right after ours
    floor = ctx.work / "w2-floor.raw"
    tools.append(Tool(FLOOR, write_floor(sc.mixed // 2, floor), Role.IDEAL, [floor]))
    try:
        ctx.measure(tools)
    finally:
        ctx.stop(server)
        remove(store)
        remove(src)
    return Result(
        KEY,
        f"full backup from a qemu-nbd export (Unix socket) of the same {human(sc.mixed)} image",
        tools,
        [
            "All tools read one read-only qemu-nbd export (--shared=8, so multi-conn); its "
            "CPU time is nobody's.",
            "The product path starts its own qemu-nbd of the file and also writes the manifest, "
            "digests and logs; it is shown for information.",
        ],
    )


def targets(res: Result, scale: Scale) -> list[Target]:
    nbdcopy = res.find("nbdcopy (raw out)")
    return [
        Target("2: ours / nbdcopy", ratio_of(res.find("ours"), nbdcopy), 0.7),
        Target(
            "2: product path / nbdcopy",
            ratio_of(res.find(PRODUCT), nbdcopy),
            0.7,
            informational=True,
        ),
        Target("2: ours / write floor", ratio_of(res.find("ours"), res.find(FLOOR)), None),
    ]
