"""The report: the terminal tables, the targets with their verdicts,
bench/RESULTS.md (with the machine it ran on) and the chart results.png.

Each workload says which of its figures are the issue's targets (its
`targets` function builds `Target`s); this module only judges and shows them.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from context import CLI, Scale
from images import GiB, KiB, MiB, TiB
from runner import BENCH, PY, Result, Role, Tool, ratio

REPO = BENCH.parent


@dataclass
class Target:
    """One goal of the issue, judged on medians of one run; a ratio the issue
    asks to be reported without a goal (ours / write floor) has limit None."""

    name: str
    value: float | None
    limit: float | None
    lower_is_better: bool = True
    unit: str = "x"
    informational: bool = False

    @property
    def met(self) -> bool | None:
        if self.value is None or self.limit is None:
            return None
        return self.value <= self.limit if self.lower_is_better else self.value >= self.limit

    def limit_text(self) -> str:
        if self.limit is None:
            return "-"
        return f"{'≤' if self.lower_is_better else '≥'} {self.limit:.3g}{self.unit}"

    def verdict(self) -> str:
        if self.limit is None:
            return "shown (no target)" if self.value is not None else "n/a (a tool failed)"
        if self.met is None:
            return "n/a (a tool failed)"
        word = "met" if self.met else "MISSED"
        return f"{word} (info)" if self.informational else word


def ratio_of(a: Tool | None, b: Tool | None, what: str = "wall") -> float | None:
    """a's median over b's, when both tools are there and timed."""
    return ratio(a, b, what) if a and b else None


def fastest(*tools: Tool | None) -> Tool | None:
    """The tool with the smallest median of those timed."""
    timed = [t for t in tools if t and t.median() is not None]
    return min(timed, key=lambda t: t.median() or 0.0) if timed else None


def print_targets(goals: list[Target]) -> None:
    print("\nTargets (medians of this run):")
    for g in goals:
        value = "-" if g.value is None else f"{g.value:.3g}{g.unit}"
        print(f"  {g.name:55s} {value:>12s}  limit {g.limit_text():>10s}  {g.verdict()}")


def human(n: float) -> str:
    for unit, size in (("TiB", TiB), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= size:
            v = n / size
            return f"{v:.0f} {unit}" if v == int(v) else f"{v:.1f} {unit}"
    return f"{n:.0f} B"


def fmt_s(v: float | None) -> str:
    return "-" if v is None else (f"{v:.3f}" if v < 10 else f"{v:.1f}")


def table_rows(res: Result) -> list[list[str]]:
    """Tool | wall median | min-max | CPU | work | peak RSS | ours/this."""
    rows = []
    for t in res.tools:
        primary = res.tool(t.versus) if t.versus else res.primary
        if t.error:
            rows.append([t.label, t.error[:60], "", "", "", "", ""])
            continue
        walls = t.values()
        work = t.median("work")
        rss = max(t.values("maxrss")) if t.samples else 0
        r = ratio(primary, t) if t is not primary else 1.0
        rows.append(
            [
                t.label,
                fmt_s(t.median()),
                f"{fmt_s(min(walls))}-{fmt_s(max(walls))}" if walls else "-",
                fmt_s(t.median("cpu")),
                fmt_s(work),
                f"{rss / MiB:.0f}" if rss else "-",
                "-" if r is None or t.role == Role.IDEAL else f"{r:.2f}",
            ]
        )
    return rows


HEADERS = ["tool", "wall s (median)", "min-max", "CPU s", "work s", "peak RSS MiB", "ours/this"]


def print_table(res: Result) -> None:
    rows = table_rows(res)
    widths = [max(len(str(c)) for c in col) for col in zip(HEADERS, *rows, strict=True)]
    print(f"\nWorkload {res.key}: {res.title}")
    line = "  ".join(h.ljust(wd) for h, wd in zip(HEADERS, widths, strict=True))
    print(line)
    print("-" * len(line))
    for row in rows:
        print("  ".join(str(c).ljust(wd) for c, wd in zip(row, widths, strict=True)))
    for k, v in res.derived.items():
        print(f"  {k}: {v:.4g}" if isinstance(v, float) else f"  {k}: {v}")
    for t in res.tools:
        phases = phase_rows(t)
        if phases:
            print(f"  where `{t.label}` spends its time (medians, s):")
            for name, seconds, share in phases:
                print(f"    {name:48s} {seconds:8.3f}  {share}")


# The phases dirbackup.timings reports (DIRBACKUP_TIMINGS), in the order a
# backup passes them; each is part of "total" (main() to exit), except
# "startup" (process start to main()).  Other names (qemu-img calls, nested
# in the phases above) are listed after them as "of which".
TOP_PHASES = (
    "backup init (store lock, partial dir)",
    "disk sizes and bitmaps",
    "snapshot access",
    "copy",
    "qcow2 finish",
    "publish (fsync, rename)",
    "qemu-nbd stop",
    "bitmaps advance",
    "backup cleanup",
    "open and validate chain",  # restore
    "restore copy (incl. fsync, rename)",
)


def phase_rows(t: Tool) -> list[tuple[str, float, str]]:
    """Where a `dirbackup` command's time went: (phase, median seconds, share
    of the median wall time), from the timings it printed; empty for other
    tools.  "rest" is the time inside main() no phase covers (store, manifest,
    log, Python); "exit" what is left of the wall time after main()."""
    reports = [s.report.get("timings") for s in t.samples]
    timed = [r for r in reports if r]
    if not timed:
        return []

    def med(name: str) -> float:
        return statistics.median(r.get(name, 0.0) for r in timed)

    wall = t.median() or 0.0
    names = [n for n in TOP_PHASES if any(n in r for r in timed)]
    nested = sorted({n for r in timed for n in r} - {*TOP_PHASES, "startup", "total"})
    rows = [("process start and imports", med("startup"))]
    rows += [(n, med(n)) for n in names]
    rest = statistics.median(
        r.get("total", 0.0) - sum(r.get(n, 0.0) for n in TOP_PHASES) for r in timed
    )
    exits = statistics.median(
        s.wall - s.report["timings"].get("startup", 0.0) - s.report["timings"].get("total", 0.0)
        for s in t.samples
        if s.report.get("timings")
    )
    rows += [("rest of main() (store, manifest, log, Python)", rest), ("exit", exits)]
    rows += [(f"of which {n}", med(n)) for n in nested]
    return [(n, v, f"{v / wall:.0%}" if wall else "-") for n, v in rows]


OWN_FILES = ("--", ".", ":!bench/RESULTS.md", ":!bench/results.png")  # written by this run


def machine() -> dict[str, str]:
    """What the figures were measured on."""

    def first_line(cmd: list[str]) -> str:
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, check=False).stdout
        except FileNotFoundError:
            return "not installed"
        return out.strip().splitlines()[0] if out.strip() else "?"

    cpu = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = "?"
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal"):
                mem = human(int(line.split()[1]) * KiB)
                break
    debian = (
        Path("/etc/debian_version").read_text().strip()
        if Path("/etc/debian_version").exists()
        else "?"
    )
    import nbd as libnbd
    import numpy

    commit = first_line(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    dirty = subprocess.run(  # this run's own outputs do not count
        ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no", *OWN_FILES],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return {
        "CPU": cpu,
        "cores": str(os.cpu_count()),
        "RAM": mem,
        "kernel": platform.release(),
        "Debian": debian,
        "qemu-img": first_line(["qemu-img", "--version"]),
        "libnbd": libnbd.NBD().get_version(),
        "nbdcopy": first_line(["nbdcopy", "--version"]),
        "nbdkit": first_line(["nbdkit", "--version"]),
        "Python": platform.python_version(),
        "numpy": numpy.__version__,
        "dirbackup commit": commit + (" (with uncommitted changes)" if dirty else ""),
    }


def write_markdown(
    path: Path,
    results: dict[str, Result],
    goals: list[Target],
    scale: Scale,
    args: argparse.Namespace,
    info: dict[str, str],
    started: datetime.datetime,
    seconds: float,
    load: tuple[tuple[float, ...], tuple[float, ...]],
    work: Path,
    failures: dict[str, str],
) -> None:
    """bench/RESULTS.md: everything needed to judge and reproduce the figures."""
    lines: list[str] = ["# Benchmark results", ""]
    if scale.name != "full":
        lines += [
            f"> **{scale.name} scale, noisy machine, not the official figures.** "
            "This file was written by a validation run of the suite at reduced sizes on a "
            "shared machine; the lead replaces it with a full-scale run "
            "(`make bench`) on a quiet machine.",
            "",
        ]
    if args.only:
        lines += [f"> Partial run: only workloads {args.only}.", ""]
    for key, why in failures.items():
        lines += [f"> **Workload {key} failed while setting up**: {why}", ""]
    lines += [
        f"Run {started:%Y-%m-%d %H:%M} UTC, {seconds / 60:.1f} min, scale `{scale.name}`, "
        f"{args.rounds} timed rounds after one checked warm-up, {args.workers} worker threads.",
        f"Load average before/after: {' '.join(f'{x:.2f}' for x in load[0])} / "
        f"{' '.join(f'{x:.2f}' for x in load[1])}.",
        "",
        "Command: `" + " ".join(["python", "bench/compare.py", *sys.argv[1:]]) + "`",
        "",
        "## Machine",
        "",
        "| | |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v} |" for k, v in info.items()]
    lines += ["", "## Targets", "", "| target | value | limit | verdict |", "|---|---|---|---|"]
    for g in goals:
        value = "-" if g.value is None else f"{g.value:.3g}{g.unit}"
        lines.append(f"| {g.name} | {value} | {g.limit_text()} | {g.verdict()} |")
    lines += [
        "",
        "Ratios are ours/peer of median whole-process wall times unless the row says "
        "otherwise; '(info)' rows are shown for information and are not the issue's targets.",
        "",
        "![time per workload and tool](results.png)",
        "",
    ]
    for res in results.values():
        lines += [f"## Workload {res.key}: {res.title}", ""]
        lines += ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
        lines += [
            "| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in table_rows(res)
        ]
        lines.append("")
        for k, v in res.derived.items():
            shown = (
                human(v)
                if k.endswith("bytes")
                else (f"{human(v)}/s" if k == "read_rate" else f"{v:.4g}")
            )
            lines.append(f"- {k.replace('_', ' ')}: {shown}")
        lines += [f"- {n}" for n in res.notes]
        for t in res.tools:
            phases = phase_rows(t)
            if phases:
                lines += [
                    "",
                    f"Where `{t.label}` spends its time (medians of the timed rounds, from "
                    "the command's own DIRBACKUP_TIMINGS report; 'of which' rows are inside "
                    "the phases above):",
                    "",
                    "| phase | s | share of wall |",
                    "|---|---|---|",
                ]
                lines += [f"| {n} | {v:.3f} | {share} |" for n, v, share in phases]
        lines += ["", "Commands (`$W` = the work directory on /dev/shm):", "", "```"]
        for t in res.tools:
            cmd = " ".join(t.argv).replace(str(work), "$W").replace(str(BENCH), "bench")
            cmd = cmd.replace(CLI, "dirbackup").replace(PY, "python")
            lines.append(f"{t.label}: {cmd}")
        lines += ["```", ""]
    analysis = BENCH / "analysis.md"
    if analysis.exists():
        lines += [analysis.read_text().strip(), ""]
    lines += [
        "## How to read this",
        "",
        "- wall s: whole-process wall time (spawn to exit), median of the timed rounds; "
        "min-max over them.",
        "- CPU s: user + system time of the process and of the children it waited for "
        "(not of the qemu-nbd servers the tools read from, which serve every tool alike).",
        "- work s: the time the process itself reports for its work, after interpreter "
        "start and imports (ours and the seed only).",
        "- ours/this: our median divided by this tool's; below 1 we are faster.",
        "- Thread budget: ours `--workers N` (copy threads and NBD connections), nbdcopy "
        "`--threads=N`; qemu-img has no thread option (`-m` sets coroutines, `-W` allows "
        "out-of-order writes).",
        "",
    ]
    path.write_text("\n".join(lines))


def write_chart(path: Path, results: dict[str, Result], scale: Scale) -> None:
    """One panel per workload: median wall time per tool, with min-max whiskers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in results.values() if any(t.samples for t in r.tools)]
    if not shown:
        return
    cols = 2
    rows = (len(shown) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(13, 2.6 * rows + 0.8), squeeze=False)
    colours = {
        Role.OURS: "#1f77b4",
        Role.CLI: "#2ca02c",
        Role.INFO: "#9ecae1",
        Role.PEER: "#d62728",
        Role.IDEAL: "#7f7f7f",
    }
    for ax, res in zip(axes.flat, shown, strict=False):
        tools = [t for t in res.tools if t.samples]
        med = [t.median() or 0.0 for t in tools]
        lo = [m - min(t.values()) for m, t in zip(med, tools, strict=True)]
        hi = [max(t.values()) - m for m, t in zip(med, tools, strict=True)]
        y = list(range(len(tools)))
        ax.barh(y, med, xerr=[lo, hi], color=[colours[t.role] for t in tools], capsize=3)
        ax.set_yticks(y, [t.label for t in tools], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("seconds (median, min-max)", fontsize=7)
        ax.tick_params(axis="x", labelsize=7)
        title = f"{res.key}: {res.title}"
        ax.set_title(title if len(title) < 80 else title[:77] + "…", fontsize=8)
        for yi, t in zip(y, tools, strict=True):
            ax.text(max(t.values()), yi, f"  {t.median() or 0.0:.3g} s", va="center", fontsize=6)
        ax.margins(x=0.15)
    for ax in list(axes.flat)[len(shown) :]:
        ax.axis("off")
    label = (
        "" if scale.name == "full" else " — small scale, noisy machine, not the official figures"
    )
    fig.suptitle(f"dirbackup vs peers: whole-process wall time{label}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
