"""Workload 5: parsing 1,000,000 extents of `nbdinfo --map` text.

Compares `ours.py parse` (extents.parse_map_text, then the dirty extents)
with the seed's regex loop; both must report the same count, bytes and
offset sum as the generator wrote.
"""

from __future__ import annotations

import images
from context import PY, SEED, Ctx, Scale
from report import Target, ratio_of
from runner import Result, Role, Sample, Tool, ToolFailed, remove

KEY = "5"


def run(ctx: Ctx) -> Result:
    """Parse a 1,000,000-extent `nbdinfo --map` text."""
    sc = ctx.scale
    path = ctx.work / "w5.map"
    ctx.say(f"  writing a {sc.map_lines:,}-line map")
    count, total, offset_sum = images.map_text(path, sc.map_lines, seed=5)

    def expect(sample: Sample) -> None:
        r = sample.report
        got = (r.get("count", r.get("merged_count")), r.get("bytes"), r.get("offset_sum"))
        if got != (count, total, offset_sum):
            raise ToolFailed(f"parsed {got}, expected {(count, total, offset_sum)}")

    tools = [
        Tool("ours", ctx.ours("parse", str(path)), Role.OURS, [], expect),
        Tool("seed (regex loop)", [PY, SEED, "parse", str(path)], Role.PEER, [], expect),
    ]
    try:
        ctx.measure(tools)
    finally:
        remove(path)
    return Result(
        KEY,
        f"map parsing: {sc.map_lines:,} extents of `nbdinfo --map=qemu:dirty-bitmap:…` text",
        tools,
        [
            "'work s' is the parse itself (read the file, parse, keep the dirty extents) as "
            "timed inside each process; 'wall s' adds interpreter start and imports (numpy "
            "and dirbackup for ours, nothing for the seed).",
        ],
    )


def targets(res: Result, scale: Scale) -> list[Target]:
    ours, seed = res.find("ours"), res.find("seed (regex loop)")
    return [
        Target(
            "5: seed / ours (parse work)", ratio_of(seed, ours, "work"), 30, lower_is_better=False
        ),
        Target(
            "5: seed / ours (whole process)",
            ratio_of(seed, ours),
            30,
            lower_is_better=False,
            informational=True,
        ),
    ]
