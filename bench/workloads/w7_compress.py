"""Workload 7: compressed full backups of real, compressible data (issue 14).

An ext4 image populated from this machine's /usr/share (`mkfs.ext4 -d`; a
part of it at the small scale) is backed up by `ours.py --compress zstd:1
full-file` and compressed by `qemu-img convert -c -o compression_type=zstd`
(defaults, and -W -m 16) and by `zstd -1 -T2`; every qcow2 output must read
as the image.  The restore of our compressed image into raw is compared with
`qemu-img convert -O raw` of the same image.  The size of each output is
recorded (notes; ours / qemu-img's as a target).  Our backup also runs at
the other LEVELS (informational rows): the table gives each level's CPU time,
the derived figures its output size.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

from checks import output_tool
from context import Ctx, Scale, untimed_ours
from context import qemu_img_convert as convert
from report import Target, fastest, human, ratio_of
from runner import Result, Role, Sample, Tool, ToolFailed, remove, run_child

KEY = "7"
OURS = "ours, zstd:1"
# the other levels, to report CPU time and size per level (informational rows)
LEVELS = ("zstd:3",)
QI = "qemu-img convert -c zstd"
QIW = "qemu-img convert -c zstd -W -m 16"
ZSTD = "zstd -1 -T2 (raw file)"
RESTORE = "ours restore (compressed image)"
QI_RESTORE = "qemu-img convert -O raw (same image)"


def _tree(scale: Scale) -> Path:
    """The directory the file system is filled from."""
    full = Path("/usr/share")
    return full if scale.name == "full" else full / "doc"


def _du(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):  # gone meanwhile
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def run(ctx: Ctx) -> Result:
    """Compressed full backup of an ext4 image of /usr/share, and its restore."""
    w = ctx.work
    tree = _tree(ctx.scale)
    data = _du(tree)
    size = (data * 2 + (256 << 20)) // (1 << 20) << 20  # room for ext4's metadata
    raw = w / "w7.raw"
    ctx.say(f"  building a {human(size)} ext4 image from {tree} ({human(data)} of files)")
    with open(raw, "wb") as f:
        f.truncate(size)
    mkfs = subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-d", str(tree), str(raw)], capture_output=True, text=True
    )
    if mkfs.returncode:
        raise ToolFailed(f"mkfs.ext4 -d {tree}: {mkfs.stderr.strip()}")
    sizes: dict[str, int] = {}

    def size_of(label: str, out: Path) -> object:
        def every(_: Sample) -> None:
            sizes[label] = out.stat().st_size

        return every

    ours_out, qi_out, qiw_out, zstd_out = (
        w / "w7-ours.qcow2",
        w / "w7-qi.qcow2",
        w / "w7-qiw.qcow2",
        w / "w7.raw.zst",
    )
    level_outs = {level: w / f"w7-ours-{level.replace(':', '')}.qcow2" for level in LEVELS}
    c = ["-c", "-o", "compression_type=zstd"]
    tools = [
        output_tool(
            OURS,
            [*ctx.ours("--compress", "zstd:1", "full-file", str(raw)), str(ours_out)],
            Role.OURS,
            ours_out,
            raw,
            "raw",
            every=size_of(OURS, ours_out),
        ),
        output_tool(
            QI,
            ["qemu-img", "convert", *c, "-f", "raw", "-O", "qcow2", str(raw), str(qi_out)],
            Role.PEER,
            qi_out,
            raw,
            "raw",
            every=size_of(QI, qi_out),
        ),
        output_tool(
            QIW,
            [
                "qemu-img",
                "convert",
                "-W",
                "-m",
                "16",
                *c,
                "-f",
                "raw",
                "-O",
                "qcow2",
                str(raw),
                str(qiw_out),
            ],
            Role.PEER,
            qiw_out,
            raw,
            "raw",
            every=size_of(QIW, qiw_out),
        ),
        Tool(
            ZSTD,
            ["zstd", "-1", "-T2", "-q", "-f", str(raw), "-o", str(zstd_out)],
            Role.PEER,
            [zstd_out],
            every=size_of(ZSTD, zstd_out),
        ),
    ] + [
        output_tool(
            f"ours, {level}",
            [*ctx.ours("--compress", level, "full-file", str(raw)), str(out)],
            Role.INFO,
            out,
            raw,
            "raw",
            every=size_of(f"ours, {level}", out),
        )
        for level, out in level_outs.items()
    ]
    image = w / "w7-image.qcow2"  # the compressed image both restores read
    restores = [
        output_tool(
            RESTORE,
            [*ctx.ours("restore", str(image), str(w)), str(w / "w7-r-ours.raw")],
            Role.OURS,
            w / "w7-r-ours.raw",
            raw,
            "raw",
        ),
        output_tool(
            QI_RESTORE,
            [*convert("qcow2", "raw", image), str(w / "w7-r-qi.raw")],
            Role.PEER,
            w / "w7-r-qi.raw",
            raw,
            "raw",
            versus=RESTORE,
        ),
    ]
    try:
        ctx.measure(tools)
        run_child(
            untimed_ours("--compress", "zstd:1", "full-file", str(raw), str(image)),
            ctx.logs,
            "w7-image",
        )
        ctx.measure(restores)
    finally:
        for path in (raw, image, ours_out, qi_out, qiw_out, zstd_out, *level_outs.values()):
            remove(path)
    res = Result(
        KEY,
        f"compressed full backup of a {human(size)} ext4 image of {tree} "
        f"({human(data)} of files), and its restore",
        tools + restores,
        [
            "Output sizes: " + ", ".join(f"{k} {human(v)}" for k, v in sizes.items()),
            "The restores read one compressed image written by ours (zstd:1).",
        ],
    )
    if sizes.get(OURS) and sizes.get(QI):
        res.derived["7: size ours / qemu-img -c"] = sizes[OURS] / sizes[QI]
    for label in (OURS, *(f"ours, {level}" for level in LEVELS)):
        if sizes.get(label):
            res.derived[f"7: {label.removeprefix('ours, ')} output bytes"] = sizes[label]
    return res


def targets(res: Result, scale: Scale) -> list[Target]:
    qi = fastest(res.find(QI), res.find(QIW))
    return [
        Target("7: ours / faster qemu-img -c (time)", ratio_of(res.find(OURS), qi), 0.5),
        Target("7: ours / qemu-img -c (size)", res.derived.get("7: size ours / qemu-img -c"), 1.05),
        Target(
            "7: ours restore / qemu-img convert -O raw",
            ratio_of(res.find(RESTORE), res.find(QI_RESTORE)),
            0.7,
        ),
        Target(
            "7: ours / zstd -1 -T2 (time)",
            ratio_of(res.find(OURS), res.find(ZSTD)),
            1.0,
            informational=True,
        ),
    ]
