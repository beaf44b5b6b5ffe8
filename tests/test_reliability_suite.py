"""The reliability suite itself: `make test` runs its default part, and
`make test-long` also runs its long variants (marked slow)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def make_dry_run(target: str) -> str:
    return subprocess.run(
        ["make", "-n", "-C", str(ROOT), target], capture_output=True, text=True, check=True
    ).stdout


def test_make_targets() -> None:
    test = [line for line in make_dry_run("test").splitlines() if "pytest" in line]
    long = [line for line in make_dry_run("test-long").splitlines() if "pytest" in line]
    assert len(test) == 1 and re.search(r"-m ['\"]not slow['\"]", test[0]), test
    assert len(long) == 1 and not re.search(r"pytest .*-m ", long[0]), long


def test_long_variants_exist_and_stay_out_of_make_test() -> None:
    files = sorted(str(p) for p in (ROOT / "tests").glob("test_reliability*.py"))

    def collect(*marker: str) -> set[str]:
        out = subprocess.run(
            [sys.executable, "-m", "pytest", "--collect-only", "-q", *marker, *files],
            capture_output=True,
            text=True,
            cwd=ROOT,
        ).stdout
        return {line for line in out.splitlines() if "::" in line}

    slow, default = collect("-m", "slow"), collect("-m", "not slow")
    assert len(slow) >= 5 and not slow & default
    for needle in ("fuzz_qcow2_reader_long", "fuzz_map_parsers_long", "restore_point"):
        assert any(needle in t for t in slow), needle
