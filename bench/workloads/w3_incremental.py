"""Workload 3: an incremental backup of a qcow2 guest with a persistent dirty bitmap.

Compares `ours.py incremental` (dirty bitmap block status into a qcow2 over
the previous backup) with the seed (`nbdinfo --map` + regex + a 4 MiB
synchronous libnbd loop), a full `qemu-img convert`, and the ideal: dirty
bytes over the export's read rate (`nbdcopy URI null:`).  The product path
(`Host.backup_vm`, reading the bitmap generation issue 12 named) is shown for
information; the CLI row is the command a user types (`dirbackup backup
--mode incremental`, whole process), from the same store and bitmap state
every round.  Every timed round must move exactly the bitmap's dirty bytes.
The write floor is the dirty bytes written from one buffer.
"""

from __future__ import annotations

import os
from pathlib import Path

import images
from checks import cli_backup_check, cli_read, output_tool, reported, same, sound_qcow2
from context import (
    DEVICE,
    STORE_EPOCH,
    Ctx,
    Scale,
    cli_backup,
    product_backup,
    product_image,
    seed_incremental,
    untimed_ours,
    write_floor,
)
from context import qemu_img_convert as convert
from images import CLUSTER
from report import Target, human, ratio_of
from runner import Result, Role, Sample, Tool, ToolFailed, remove, run_child

from dirbackup import extents, nbd, qemu
from dirbackup.storage import DirectoryStorage

KEY = "3"
PRODUCT = "ours, product path (Host.backup_vm)"
CLI_ROW = "CLI: dirbackup backup --mode incremental"
FLOOR = "write floor (dirty bytes from one buffer)"
READ_RATE = "read rate: nbdcopy → null:"


def run(ctx: Ctx) -> Result:
    """Incremental backup of a qcow2 guest with a persistent dirty bitmap."""
    sc = ctx.scale
    w = ctx.work
    store = ctx.mkdir("w3-store")
    storeid, vmid = "bench", "100"
    ctx.say(f"  making a {human(sc.guest)} guest with {human(sc.guest_data)} of data")
    raw = w / "w3-guest0.raw"
    images.sparse_raw(raw, sc.guest, sc.guest_data, seed=3)
    # The previous backup: our product's own full backup of the guest.
    full = product_image(store, vmid, STORE_EPOCH)
    run_child(
        untimed_ours(*product_backup(store, storeid, vmid, raw, STORE_EPOCH)),
        ctx.logs,
        "w3-setup-full",
    )
    same(full, raw, "qcow2", "raw")
    remove(raw)
    # The guest from then on: an overlay whose base is exactly what was backed up
    # (saves a second copy of the data), then dirtied.  The product backs it up
    # once more (full: its bitmap generation starts there), so that the product's
    # own incremental is proven; every tool reads the generation's bitmap.
    guest = w / "w3-guest.qcow2"
    images.qemu_img("create", "-q", "-f", "qcow2", "-b", str(full), "-F", "qcow2", str(guest))
    run_child(
        untimed_ours(*product_backup(store, storeid, vmid, guest, STORE_EPOCH + 1)),
        ctx.logs,
        "w3-setup-generation",
    )
    provider = DirectoryStorage(storeid, {"path": str(store)}).new_backup_provider()
    bitmap = provider.expected_bitmap(int(vmid), DEVICE)
    prefix = provider.bitmap_prefix()
    if bitmap is None:
        raise ToolFailed("the product's full backup of the guest started no bitmap generation")
    n_clusters = sc.guest // CLUSTER
    dirty_clusters = images.scattered_clusters(sc.guest, int(n_clusters * sc.dirty_fraction), 33)
    ctx.say(f"  dirtying {len(dirty_clusters)} clusters with qemu-io")
    images.qemu_io_batch(guest, images.dirty_commands(dirty_clusters, seed=34))
    images.qemu_img("bitmap", "--add", str(guest), "saved")
    images.qemu_img("bitmap", "--merge", bitmap, "-f", "qcow2", str(guest), "saved")
    previous_info = (store / vmid / "previous-info").read_bytes()

    # What the export holds: dirty bytes (the bitmap) and data bytes (allocation).
    probe = ctx.serve(guest, "w3-probe", export=DEVICE, bitmap=bitmap)
    context = extents.dirty_bitmap_context(bitmap)
    h = nbd.connect(probe.uri, [context, extents.ALLOCATION])
    dirty_bytes = extents.total(extents.dirty(extents.block_status(h, context)))
    data_bytes = extents.total(extents.data(extents.block_status(h, extents.ALLOCATION)))
    nbd.close_all([h])
    ctx.stop(probe)

    export: list[qemu.NbdServer] = []
    sock = w / "w3.sock"
    uri = nbd.unix_uri(str(sock), DEVICE)

    def start_export() -> None:
        export.append(ctx.serve(guest, "w3", export=DEVICE, bitmap=bitmap))

    def stop_export() -> None:
        while export:
            ctx.stop(export.pop())

    new_image = product_image(store, vmid, STORE_EPOCH + 2)

    def restore_bitmap() -> None:
        """After a good backup Host replaces the bitmap by the next generation:
        put the old generation with its dirty set back at once, before any
        other tool reads it."""
        for b in qemu.bitmaps(guest):
            if b["name"].startswith(prefix):
                images.qemu_img("bitmap", "--remove", str(guest), b["name"])
        images.qemu_img(
            "bitmap", "--add", "--enable", "--merge", "saved", "-f", "qcow2", str(guest), bitmap
        )

    kept = (full.parent.name, f"qemu-{STORE_EPOCH + 1}")

    def reset_store() -> None:
        """Undo the previous product run: the new backup goes, the old record
        comes back."""
        for p in (store / vmid).iterdir():
            if p.name.startswith("qemu-") and p.name not in kept:
                remove(p)
        (store / vmid / "previous-info").write_bytes(previous_info)
        restore_bitmap()

    def check_product(sample: Sample) -> None:
        if sample.report.get("modes", {}).get(DEVICE) != "reuse":
            raise ToolFailed(f"the product did not make an incremental: {sample.report}")
        same(new_image, guest, "qcow2", "qcow2")
        sound_qcow2(new_image)

    def incremental(label: str, role: Role, argv: list[str], out: Path, key: str) -> Tool:
        """A tool backing up the export's dirty clusters into `out`: every run
        must report exactly the bitmap's dirty bytes under `key`."""
        every = reported(key, dirty_bytes)
        return output_tool(
            label,
            argv,
            role,
            out,
            guest,
            "qcow2",
            setup=start_export,
            teardown=stop_export,
            every=every,
        )

    ours_out, seed_out, qi_out = w / "w3-ours.qcow2", w / "w3-seed.qcow2", w / "w3-qi.qcow2"
    backing_rel = os.path.relpath(full, w)
    tools = [
        incremental(
            "ours",
            Role.OURS,
            ctx.ours("incremental", uri, bitmap, str(ours_out), backing_rel),
            ours_out,
            "dirty_bytes",
        ),
        Tool(
            PRODUCT,
            ctx.ours(*product_backup(store, storeid, vmid, guest, STORE_EPOCH + 2)),
            Role.INFO,
            [new_image.parent],
            check_product,
            setup=reset_store,
            teardown=restore_bitmap,
        ),
        Tool(  # the same store and bitmap state as the product path's, every round
            CLI_ROW,
            cli_backup(store, storeid, vmid, guest, "incremental"),
            Role.CLI,
            [],  # its backup is removed by reset_store before the next run
            cli_backup_check(store, vmid, DEVICE, guest, "qcow2", "incremental", kept),
            setup=reset_store,
            teardown=restore_bitmap,
            every=cli_read(DEVICE, dirty_bytes),
        ),
        incremental(
            "seed (nbdinfo --map + 4 MiB sync loop)",
            Role.PEER,
            seed_incremental(uri, bitmap, seed_out, str(full)),
            seed_out,
            "bytes",
        ),
        output_tool(
            "qemu-img convert (full)",
            [*convert("qcow2", "qcow2", guest), str(qi_out)],
            Role.PEER,
            qi_out,
            guest,
            "qcow2",
        ),
        Tool(
            READ_RATE,
            ctx.nbdcopy(uri, "null:"),
            Role.IDEAL,
            setup=start_export,
            teardown=stop_export,
        ),
        Tool(FLOOR, write_floor(dirty_bytes, w / "w3-floor.raw"), Role.IDEAL, [w / "w3-floor.raw"]),
    ]
    try:
        ctx.measure(tools)
    finally:
        stop_export()
        remove(store)
        remove(guest)
    result = Result(
        KEY,
        f"incremental backup: {human(sc.guest)} qcow2 guest, {human(sc.guest_data)} data, "
        f"{sc.dirty_fraction:.0%} of clusters dirty",
        tools,
        [
            f"{len(dirty_clusters)} random clusters changed with qemu-io (every 10th a zero "
            f"write): {human(dirty_bytes)} dirty; the export holds {human(data_bytes)} of data.",
            "The guest is a qcow2 overlay on our own full backup of it (same data, half the RAM); "
            "ours, the seed and the read-rate run read one read-only qemu-nbd export with the "
            "bitmap, started before and stopped after each run (untimed).",
            "Ideal = dirty bytes / read rate, the read rate being the export's data bytes over "
            "nbdcopy's median time to read them all to null:.",
        ],
    )
    rate_time = result.tool(READ_RATE).median()
    result.derived["dirty_bytes"] = dirty_bytes
    result.derived["data_bytes"] = data_bytes
    if rate_time:
        rate = data_bytes / rate_time
        result.derived["read_rate"] = rate
        result.derived["ideal_seconds"] = dirty_bytes / rate
    return result


def targets(res: Result, scale: Scale) -> list[Target]:
    ours = res.find("ours")
    full = res.find("qemu-img convert (full)")
    ideal = res.derived.get("ideal_seconds")
    wall = ours.median() if ours else None
    work = ours.median("work") if ours else None
    return [
        Target("3: ours / full qemu-img convert", ratio_of(ours, full), 1 / 20),
        # the ideal is a read time without any process around it: it is
        # compared with our work time (as map parsing is), the whole process
        # is shown for information
        Target(
            "3: ours (work, without interpreter start) / ideal",
            work / ideal if work and ideal else None,
            1.5,
        ),
        Target(
            "3: ours (whole process) / ideal",
            wall / ideal if wall and ideal else None,
            1.5,
            informational=True,
        ),
        Target(
            "3: product path / full qemu-img convert",
            ratio_of(res.find(PRODUCT), full),
            1 / 20,
            informational=True,
        ),
        Target("3: CLI / full qemu-img convert", ratio_of(res.find(CLI_ROW), full), 1 / 15),
        Target("3: CLI / engine-only (ours)", ratio_of(res.find(CLI_ROW), ours), 1.15),
        Target("3: ours / write floor", ratio_of(ours, res.find(FLOOR)), None),
        Target("3: CLI / write floor", ratio_of(res.find(CLI_ROW), res.find(FLOOR)), None),
    ]
