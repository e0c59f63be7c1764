"""The package's import graph, read from the source: layers import downwards only.

No import cycles; no module imports another module's underscore names; the executor
(`distributed.py`) imports no stage, the stages give it their shard functions; planning
imports no stage either (the dry runs that call the stages live in `dryrun.py`, above them).
"""

from __future__ import annotations

import ast
from pathlib import Path

import embedkit

PACKAGE = Path(embedkit.__file__).parent
STAGES = {"embedkit.pipeline", "embedkit.generation", "embedkit.index.build", "embedkit.index.search", "embedkit.dryrun"}


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.with_suffix("").relative_to(PACKAGE.parent).parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> list[tuple[str, str | None]]:
    """(module imported, name taken from it or None) for every embedkit import in the file,
    lazy ones inside functions included."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else [])) if node.level else node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.append((sub, None) if sub in known else (target, alias.name))
        elif isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names]
    return [(m, n) for m, n in found if m in known and m != name]


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: {m for m, _ in imports(name, path, known)} for name, path in known.items()}


def test_the_import_graph_has_no_cycle():
    edges, state, cycle = graph(), {}, []

    def visit(node: str, trail: list[str]) -> bool:
        state[node] = "open"
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                cycle.extend(trail[trail.index(nxt):] + [node, nxt] if nxt in trail else [node, nxt])
                return True
            if nxt not in state and visit(nxt, trail + [node]):
                return True
        state[node] = "done"
        return False

    assert not any(visit(n, []) for n in sorted(edges) if n not in state), f"import cycle: {' -> '.join(cycle)}"


def test_no_module_imports_another_modules_private_names():
    known = modules()
    private = [(name, m, n) for name, path in known.items() for m, n in imports(name, path, known)
               if n is not None and n.startswith("_") and not n.startswith("__")]  # fmt: skip
    assert private == []


def test_the_executor_and_planning_import_no_stage():
    edges = graph()
    for module in ("embedkit.distributed", "embedkit.planning"):
        assert not edges[module] & STAGES, (module, sorted(edges[module] & STAGES))


def test_the_graph_reader_sees_real_edges():
    """The checks above would pass on an empty graph: the reader must find the known edges."""
    edges = graph()
    assert "embedkit.distributed" in edges["embedkit.pipeline"]
    assert "embedkit.index.io" in edges["embedkit.index.search"]
    assert "embedkit.planning" in edges["embedkit.dryrun"] and "embedkit.pipeline" in edges["embedkit.dryrun"]
