"""Workload 4: a restore of a full + N incremental chain (made by our product) to raw.

Compares `ours.py restore` (validated chain, copy engine) with
`qemu-img convert -O raw` of the top image (defaults, and -W -m 16); the
product path (`Host.restore_vm`) is shown for information; the CLI row is the
command a user types (`dirbackup restore VOLID --disk DEV=OUT`, whole
process).  The chain is compared with the guest before anything is timed.
The write floor is the guest's data bytes written from one buffer.
"""

from __future__ import annotations

import images
from checks import output_tool, same
from context import (
    DEVICE,
    STORE_EPOCH,
    Ctx,
    Scale,
    cli_restore,
    product_backup,
    product_image,
    untimed_ours,
    write_floor,
)
from context import qemu_img_convert as convert
from images import CLUSTER
from report import Target, fastest, human, ratio_of
from runner import Result, Role, Tool, ToolFailed, remove, run_child

KEY = "4"
PRODUCT = "ours, product path (Host.restore_vm)"
CLI_ROW = "CLI: dirbackup restore"
FLOOR = "write floor (data bytes from one buffer)"


def run(ctx: Ctx) -> Result:
    """Restore of a full + N incremental chain (written by our product) into a raw file."""
    sc = ctx.scale
    w = ctx.work
    store = ctx.mkdir("w4-store")
    storeid, vmid = "chain", "101"
    ctx.say(f"  building a full + {sc.chain_links} incremental chain of {human(sc.mixed)}")
    raw = w / "w4.raw"
    images.mixed_raw(raw, sc.mixed, seed=4)
    guest = w / "w4-guest.qcow2"
    images.qemu_img("convert", "-f", "raw", "-O", "qcow2", str(raw), str(guest))
    remove(raw)
    epochs = [STORE_EPOCH + i for i in range(sc.chain_links + 1)]
    per_link = int(sc.mixed // CLUSTER * sc.chain_fraction)
    for i, epoch in enumerate(epochs):
        if i:
            clusters = images.scattered_clusters(sc.mixed, per_link, seed=40 + i)
            images.qemu_io_batch(
                guest, images.dirty_commands(clusters, seed=50 + i, zero_every=10, discard_every=7)
            )
        sample = run_child(
            untimed_ours(*product_backup(store, storeid, vmid, guest, epoch)),
            ctx.logs,
            f"w4-setup-{i}",
        )
        mode = sample.report.get("modes", {}).get(DEVICE)
        if mode != ("reuse" if i else "new"):
            raise ToolFailed(f"chain link {i} was not made as expected (bitmap mode {mode})")
    top = product_image(store, vmid, epochs[-1])
    same(top, guest, "qcow2", "qcow2")  # the chain itself is right before we time reading it
    remove(guest)
    volid = f"{storeid}:backup/{vmid}/qemu-{epochs[-1]}"
    rows = [  # label, role, output file (the command's last argument), command
        ("ours", Role.OURS, "w4-ours.raw", ctx.ours("restore", str(top), str(store / vmid))),
        (
            PRODUCT,
            Role.INFO,
            "w4-prod.raw",
            ctx.ours("product-restore", str(store), storeid, volid, DEVICE),
        ),
        # the output goes into --disk DEV=OUT, not last: see below
        (CLI_ROW, Role.CLI, "w4-cli.raw", cli_restore(store, storeid, volid, w / "w4-cli.raw")),
        ("qemu-img convert -O raw", Role.PEER, "w4-qi.raw", convert("qcow2", "raw", top)),
        (
            "qemu-img convert -O raw -W -m 16",
            Role.PEER,
            "w4-qiw.raw",
            convert("qcow2", "raw", top, fast=True),
        ),
    ]
    tools = [
        output_tool(
            label,
            command if role == Role.CLI else [*command, str(w / out)],
            role,
            w / out,
            top,
            "qcow2",
        )
        for label, role, out, command in rows
    ]
    floor = w / "w4-floor.raw"
    data = images.data_bytes(top)
    tools.append(Tool(FLOOR, write_floor(data, floor), Role.IDEAL, [floor]))
    try:
        ctx.measure(tools)
    finally:
        remove(store)
    return Result(
        KEY,
        f"restore of a full + {sc.chain_links} incremental chain ({human(sc.mixed)} disk, "
        f"{sc.chain_fraction:.0%} of clusters changed per link) into a raw file",
        tools,
        [
            "The chain is made by our product (Host.backup_vm: a full, then incrementals from "
            "the qcow2 bitmap); changes by qemu-io: pattern writes, every 10th a zero write, "
            "every 7th a discard. It is compared with the guest before timing.",
        ],
    )


def targets(res: Result, scale: Scale) -> list[Target]:
    qi = fastest(res.find("qemu-img convert -O raw"), res.find("qemu-img convert -O raw -W -m 16"))
    return [
        Target("4: ours / faster qemu-img convert -O raw", ratio_of(res.find("ours"), qi), 0.7),
        Target(
            "4: product path / qemu-img", ratio_of(res.find(PRODUCT), qi), 0.7, informational=True
        ),
        Target("4: CLI / engine-only (ours)", ratio_of(res.find(CLI_ROW), res.find("ours")), 1.15),
        Target(
            "4: CLI / faster qemu-img convert -O raw",
            ratio_of(res.find(CLI_ROW), qi),
            0.7,
            informational=True,
        ),
        Target("4: ours / write floor", ratio_of(res.find("ours"), res.find(FLOOR)), None),
        Target("4: CLI / write floor", ratio_of(res.find(CLI_ROW), res.find(FLOOR)), None),
    ]
