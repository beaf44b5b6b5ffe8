"""The seams between the package's modules stay closed.

Read from the source with `ast`, not by importing: an import circle among
dirbackup's modules (also one hidden in a function-level import) and a module
that starts processes outside the plumbing are both easy to add and hard to
see in a review.  Imports under `if TYPE_CHECKING:` are for the type checker
only and do not count.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "dirbackup"

#: The plumbing: the only modules that start processes (qemu.py: qemu-nbd,
#: qemu-img, nbdfuse and friends; toolrun.py: tar, mksquashfs, mount and the
#: other one-shot tools).
PROCESS_STARTERS = {"qemu", "toolrun"}

#: Modules whose import (or any name from them) means starting processes.
PROCESS_MODULES = {"subprocess", "multiprocessing", "pty", "asyncio.subprocess"}

#: Functions of `os` that start or replace a process.
OS_PROCESS_CALLS = {
    "fork",
    "forkpty",
    "system",
    "popen",
    "posix_spawn",
    "posix_spawnp",
    *(f"exec{s}" for s in ("l", "le", "lp", "lpe", "v", "ve", "vp", "vpe")),
    *(f"spawn{s}" for s in ("l", "le", "lp", "lpe", "v", "ve", "vp", "vpe")),
}


def _modules() -> dict[str, ast.Module]:
    return {p.stem: ast.parse(p.read_text(), str(p)) for p in sorted(PACKAGE.glob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node of `tree` except those under `if TYPE_CHECKING:`."""
    out: list[ast.AST] = []
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        out.append(node)
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))
    return out


def _imported(tree: ast.Module) -> set[str]:
    """Fully qualified names of the modules (and `from` names) `tree` imports at run time."""
    names: set[str] = set()
    for node in _runtime_nodes(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def import_graph() -> dict[str, set[str]]:
    """dirbackup module -> the dirbackup modules it imports (at run time)."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, tree in modules.items():
        deps = set()
        for full in _imported(tree):
            parts = full.split(".")
            if parts[0] == "dirbackup" and len(parts) > 1 and parts[1] in modules:
                deps.add(parts[1])
        deps.discard(name)
        graph[name] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return [*path[path.index(dep) :], dep]
            if dep not in state:
                found = visit(dep)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_graph_is_read() -> None:
    graph = import_graph()
    assert "errors" in graph["store"] and "api" in graph["provider"]


def test_no_import_circle_among_dirbackup_modules() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle or ())


def test_find_cycle_sees_a_circle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def _process_uses(tree: ast.Module) -> list[str]:
    uses = []
    for full in sorted(_imported(tree)):
        root = full.split(".")[0]
        if full in PROCESS_MODULES or root in PROCESS_MODULES:
            uses.append(f"imports {full}")
        if root == "os" and full.split(".")[-1] in OS_PROCESS_CALLS:
            uses.append(f"imports {full}")
    for node in _runtime_nodes(tree):
        if not isinstance(node, ast.Attribute) or not isinstance(node.value, ast.Name):
            continue
        owner, attr = node.value.id, node.attr
        if owner == "os" and attr in OS_PROCESS_CALLS:
            uses.append(f"line {node.lineno}: os.{attr}")
    return uses


def test_only_the_plumbing_starts_processes() -> None:
    found = {
        name: uses
        for name, tree in _modules().items()
        if name not in PROCESS_STARTERS and (uses := _process_uses(tree))
    }
    assert found == {}, f"only {sorted(PROCESS_STARTERS)} may start processes"


def test_the_plumbing_says_so() -> None:
    for name in PROCESS_STARTERS:
        doc = ast.get_docstring(_modules()[name]) or ""
        assert "start processes" in " ".join(doc.split()), name


@pytest.mark.parametrize(
    "source",
    [
        "import subprocess",
        "from subprocess import run",
        "import os\nos.fork()",
        "from os import execv",
        "import multiprocessing\nmultiprocessing.Process()",
    ],
)
def test_a_process_start_is_seen(source: str) -> None:
    assert _process_uses(ast.parse(source))


def test_type_checking_imports_do_not_count() -> None:
    source = "if TYPE_CHECKING:\n    from dirbackup.qcow2 import Chain\n"
    tree = ast.parse(source)
    assert "dirbackup.qcow2" not in _imported(tree)
