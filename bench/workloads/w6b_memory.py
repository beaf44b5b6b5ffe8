"""Workload 6b: peak RSS of full backups of sparse images of 1 GiB, 64 GiB (and 1 TiB).

Compares `ours.py full-file` (and the product path at the target size) with
`qemu-img convert`; the target is under 128 MiB at 64 GiB.  Peak RSS is the
process's ru_maxrss (and of anything it waited for), from wait4.
"""

from __future__ import annotations

import images
from checks import check_output, output_tool
from context import STORE_EPOCH, Ctx, Scale, emptier, product_backup, product_image
from context import qemu_img_convert as convert
from images import MiB
from report import Target, human
from runner import Result, Role, Tool, remove

KEY = "6b"
COUNT = 1000  # random 64 KiB data clusters in each image


def run(ctx: Ctx) -> Result:
    """Peak RSS of a full backup against the virtual size of a sparse image."""
    sc = ctx.scale
    w = ctx.work
    tools: list[Tool] = []
    try:
        for size in sc.memory_sizes:
            tag = human(size).replace(" ", "")
            src = w / f"w6b-{tag}.raw"
            clusters = images.scattered_clusters(size, COUNT, seed=7)
            images.raw_with_clusters(src, size, clusters, seed=71)
            ours = f"ours, {human(size)} sparse"
            out = w / f"w6b-ours-{tag}.qcow2"
            tools.append(
                output_tool(
                    ours, ctx.ours("full-file", str(src), str(out)), Role.OURS, out, src, "raw"
                )
            )
            if size == sc.memory_target_size:
                store = w / f"w6b-store-{tag}"
                store.mkdir()
                tools.append(
                    Tool(
                        f"ours product path, {human(size)} sparse",
                        ctx.ours(*product_backup(store, "mem", "102", src, STORE_EPOCH)),
                        Role.INFO,
                        [store / "102"],
                        check_output(product_image(store, "102", STORE_EPOCH), "qcow2", src, "raw"),
                        setup=emptier(store),
                        versus=ours,
                    )
                )
            qi = w / f"w6b-qi-{tag}.qcow2"
            tools.append(
                output_tool(
                    f"qemu-img convert, {human(size)} sparse",
                    [*convert("raw", "qcow2", src), str(qi)],
                    Role.PEER,
                    qi,
                    src,
                    "raw",
                    versus=ours,
                )
            )
        ctx.measure(tools)
    finally:
        for p in w.glob("w6b-*"):
            remove(p)
    return Result(
        KEY,
        f"peak memory of a full backup against virtual size ({COUNT} random 64 KiB data "
        "clusters spread over each sparse raw image)",
        tools,
        ["Peak RSS is ru_maxrss of the process (and anything it waited for), from wait4."],
    )


def targets(res: Result, scale: Scale) -> list[Target]:
    size = human(scale.memory_target_size)
    out = []
    for label, info in (
        (f"ours, {size} sparse", False),
        (f"ours product path, {size} sparse", True),
    ):
        t = res.find(label)
        rss = max(t.values("maxrss")) / MiB if t and t.samples else None
        out.append(Target(f"6: peak RSS, {label} (MiB)", rss, 128, unit=" MiB", informational=info))
    return out
