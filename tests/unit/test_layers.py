"""The package's shape: exported names, layers, no import cycles, one owner for SQL.

These read the source with ``ast`` (nothing is imported but the packages' ``__all__``),
so a new import or a new SQL string in the wrong module fails here, whoever adds it.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import ledger
import projections

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("ledger", "projections")

# The modules allowed to import the read side: the CLI package and the API facade.
ABOVE_READ_SIDE = ("ledger.cli", "ledger.api")

# The owners of SQL text. ledger.store: the write side's tables (events, streams,
# counters, rejected) and every read of the log (the core's, the integrity checks', the
# read-side services' and the time-travel queries'); ledger.db: the schema revision;
# ledger.embedded: the embedded cluster's role and database; projections.store: the
# projection tables, checkpoints and the runner's reads.
SQL_OWNERS = {
    "ledger.store",
    "ledger.db",
    "ledger.embedded",
    "projections.store",
}
SQL = re.compile(
    r"^\s*(SELECT\b|INSERT\s+INTO\b|UPDATE\s+\w+\s+SET\b|DELETE\s+FROM\b|WITH\s+\w+\s+AS\s*\()"
)


def _modules() -> Iterator[tuple[str, Path]]:
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            yield ".".join(parts), path


MODULES = dict(_modules())


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST) -> Iterator[str]:
    """Yield every module a module imports (at any depth, not under TYPE_CHECKING)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _is_type_checking(node):
            yield from (n for child in node.orelse for n in _imports(child))
            continue
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                yield sub if sub in MODULES else node.module
        yield from _imports(node)


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in MODULES.items():
        for target in _imports(ast.parse(path.read_text(), str(path))):
            if target in MODULES and target != name:
                graph[name].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Return the strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(MODULES):
        if v not in index:
            visit(v)
    return found


def test_the_exported_names_are_pinned() -> None:
    assert ledger.__all__ == [
        "Explanation",
        "HistoryEntry",
        "IngestCounts",
        "Ledger",
        "Lot",
        "PnlLine",
        "Position",
        "RejectedRecord",
        "Stats",
        "SyncLedger",
        "TrailEntry",
        "Verification",
    ]
    assert projections.__all__ == ["COMPILED", "compiled_build", "running_compiled"]
    from ledger import Ledger, SyncLedger
    from ledger.api import Ledger as ApiLedger

    assert Ledger is ApiLedger
    assert SyncLedger.__module__ == "ledger.api"
    for name in ledger.__all__:
        assert getattr(ledger, name).__module__ == "ledger.api"


def test_importing_the_core_does_not_import_the_api_or_the_read_side() -> None:
    code = (
        "import sys, ledger.events, ledger.store, ledger.ingest, ledger.consume, "
        "ledger.integrity\n"
        "bad = sorted(m for m in sys.modules if m == 'ledger.api' or m.startswith('projections'))\n"
        "assert not bad, bad\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_only_the_cli_and_the_api_import_the_read_side() -> None:
    offenders = [
        (name, target)
        for name, targets in _graph().items()
        if name.startswith("ledger")
        and not any(name == a or name.startswith(a + ".") for a in ABOVE_READ_SIDE)
        for target in targets
        if target.split(".")[0] == "projections"
    ]
    assert offenders == []


def test_the_read_side_never_imports_the_cli_or_the_api() -> None:
    offenders = [
        (name, target)
        for name, targets in _graph().items()
        if name.startswith("projections")
        for target in targets
        if any(target == a or target.startswith(a + ".") for a in ABOVE_READ_SIDE)
    ]
    assert offenders == []


def test_there_are_no_import_cycles() -> None:
    assert _cycles(_graph()) == []


def test_the_cycle_check_finds_a_cycle() -> None:
    """The check itself: a graph with a cycle is reported (so a pass means something)."""
    graph = {"ledger.store": {"ledger.events"}, "ledger.events": {"ledger.store"}}
    assert _cycles(graph) == [["ledger.events", "ledger.store"]]


def _sql_strings(path: Path) -> Iterator[tuple[int, str]]:
    tree = ast.parse(path.read_text(), str(path))
    parts = {id(v) for n in ast.walk(tree) if isinstance(n, ast.JoinedStr) for v in n.values}
    for node in ast.walk(tree):
        if id(node) in parts:
            continue  # a piece of an f-string: the f-string is checked whole
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            text = node.value
        elif isinstance(node, ast.JoinedStr):
            text = "".join(
                str(v.value) if isinstance(v, ast.Constant) else "{" + ast.unparse(v) + "}"
                for v in node.values
            )
        else:
            continue
        if SQL.match(text):
            yield node.lineno, text


def test_sql_text_lives_only_in_the_modules_that_own_the_tables() -> None:
    outside = [
        f"{name}:{line}: {text.strip().splitlines()[0]}"
        for name, path in MODULES.items()
        if name not in SQL_OWNERS
        for line, text in _sql_strings(path)
    ]
    assert outside == []
    # the check sees SQL where it is (or the assertion above could never fail)
    assert any(True for _ in _sql_strings(MODULES["ledger.store"]))


def test_no_sql_statement_is_written_twice() -> None:
    seen: dict[str, list[str]] = defaultdict(list)
    for name, path in MODULES.items():
        for line, text in _sql_strings(path):
            seen[" ".join(text.split())].append(f"{name}:{line}")
    assert {sql: where for sql, where in seen.items() if len(where) > 1} == {}


# What a command module may not reach past the API for: the store, ingestion, the
# runner and the parts it is built of, the queries and the read-side services (``ledger
# consume`` runs the runner in its child process, so live.py may start one).
BEHIND_THE_API = {
    "ledger.store",
    "ledger.ingest",
    "projections.queries",
    "projections.runner",
    "projections.cache",
    "projections.writer",
    "projections.pipeline",
    "projections.follow",
    "projections.rebuild",
    "projections.partition",
    "projections.audit",
    "projections.report",
    "projections.store",
}


def test_the_command_modules_go_through_the_api() -> None:
    graph = _graph()
    reached = {
        name: sorted(graph.get(name, set()) & BEHIND_THE_API)
        for name in ("ledger.cli.app", "ledger.cli.audit", "ledger.cli.common")
    }
    assert reached == {name: [] for name in reached}
    assert sorted(graph["ledger.cli.live"] & BEHIND_THE_API) == ["projections.runner"]
    assert "ledger.api" in graph["ledger.cli.app"]
