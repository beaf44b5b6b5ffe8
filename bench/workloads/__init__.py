"""The workloads compare.py runs, in the order it runs them.

Each is one module holding:

- `KEY`: its name on the command line (`--only 1,3`) and in the report;
- `run(ctx) -> Result`: builds its inputs, times its tools with `ctx.measure`
  (each tool's output checked first, see checks.py) and removes what it made;
  its one-line docstring is what the runner prints when it starts;
- `targets(result, scale) -> list[Target]`: the issue's goals it is judged on.

A new workload is a new module with those three names, added to `NAMES`.
"""

from __future__ import annotations

import importlib
from typing import Protocol, cast

from context import Ctx, Scale
from report import Target
from runner import Result


class Workload(Protocol):
    KEY: str

    def run(self, ctx: Ctx) -> Result: ...

    def targets(self, res: Result, scale: Scale) -> list[Target]: ...


NAMES = (  # the modules of this package, in the order they run
    "w1_full_file",  # keeps its image w1.raw for workloads 1q and 2
    "w1q_full_qcow2",
    "w2_full_nbd",
    "w3_incremental",
    "w4_restore",
    "w5_parse",
    "w6_scaling",
    "w6b_memory",
    "w7_compress",
)
MODULES = tuple(cast(Workload, importlib.import_module(f"{__name__}.{n}")) for n in NAMES)
WORKLOADS: dict[str, Workload] = {w.KEY: w for w in MODULES}
