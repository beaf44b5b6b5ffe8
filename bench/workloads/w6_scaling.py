"""Workload 6: the same 1000 dirty clusters in a 1 GiB and a 1 TiB disk.

Compares `ours.py incremental` with the seed on both guests; the target is
that our time barely grows with the virtual size (1 TiB / 1 GiB ≤ 1.2).
"""

from __future__ import annotations

import images
from checks import output_tool, reported
from context import DEVICE, Ctx, Scale, seed_incremental
from images import CLUSTER, GiB
from report import Target, human
from runner import Result, Role, Tool, ratio, remove

KEY = "6"


def run(ctx: Ctx) -> Result:
    """The same dirty set in a small and a huge virtual disk."""
    sc = ctx.scale
    w = ctx.work
    clusters = images.scattered_clusters(GiB, sc.scaling_clusters, seed=6, span=GiB)
    commands = images.dirty_commands(clusters, seed=61, zero_every=0)
    dirty_bytes = len(clusters) * CLUSTER
    bitmap = "bench"
    tools: list[Tool] = []
    try:
        for size in sc.scaling_sizes:
            tag = human(size).replace(" ", "")
            base = w / f"w6-base-{tag}.qcow2"
            guest = w / f"w6-guest-{tag}.qcow2"
            images.qemu_img("create", "-q", "-f", "qcow2", str(base), str(size))
            images.qemu_img("create", "-q", "-f", "qcow2", str(guest), str(size))
            images.qemu_img("bitmap", "--add", "--enable", str(guest), bitmap)
            images.qemu_io_batch(guest, commands)
            server = ctx.serve(guest, f"w6-{tag}", export=DEVICE, bitmap=bitmap)
            out_ours, out_seed = w / f"w6-ours-{tag}.qcow2", w / f"w6-seed-{tag}.qcow2"
            ours = f"ours, {human(size)} disk"
            tools.append(
                output_tool(
                    ours,
                    ctx.ours("incremental", server.uri, bitmap, str(out_ours), base.name),
                    Role.OURS,
                    out_ours,
                    guest,
                    "qcow2",
                    every=reported("dirty_bytes", dirty_bytes),
                )
            )
            tools.append(
                output_tool(
                    f"seed, {human(size)} disk",
                    seed_incremental(server.uri, bitmap, out_seed, base.name),
                    Role.PEER,
                    out_seed,
                    guest,
                    "qcow2",
                    every=reported("bytes", dirty_bytes),
                    versus=ours,
                )
            )
        ctx.measure(tools)
    finally:
        ctx.stop_all()
        for p in w.glob("w6-*"):
            remove(p)
    small, big = (human(s) for s in sc.scaling_sizes)
    result = Result(
        KEY,
        f"scaling: {len(clusters)} dirty clusters ({human(dirty_bytes)}) in a "
        f"{small} and a {big} virtual disk",
        tools,
        [
            "Same dirty offsets (random clusters in the first GiB) in both guests; the "
            "incremental is written over an empty base of the same size.",
        ],
    )
    t_small, t_big = result.tools[0], result.tools[2]
    r = ratio(t_big, t_small)
    if r is not None:
        result.derived["ours_big_over_small"] = r
    return result


def targets(res: Result, scale: Scale) -> list[Target]:
    small, big = (human(s) for s in scale.scaling_sizes)
    return [Target(f"6: ours {big} / {small}", res.derived.get("ours_big_over_small"), 1.2)]
