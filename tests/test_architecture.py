"""The package's import graph, read from the source: layers import downwards only.

No import cycles; no module imports another module's underscore names; every module belongs to
one layer and imports only its own layer and those below (docs/design.md, "Layers"): the
executors (`run/`) and planning (`plan/`) import no stage, the stages give the executors their
shard functions, and no stage imports another.
"""

from __future__ import annotations

import ast
from pathlib import Path

import embedkit

PACKAGE = Path(embedkit.__file__).parent
# lowest first; a module may import its own layer and the layers before it
LAYERS = [
    ("base", ("embedkit.errors", "embedkit.units", "embedkit.version", "embedkit.config", "embedkit.fsutil", "embedkit.digest", "embedkit.interrupts")),
    ("engine", ("embedkit.engine",)),
    ("io", ("embedkit.io",)),
    ("run", ("embedkit.run",)),
    ("plan", ("embedkit.plan",)),
    ("stages", ("embedkit.encoding", "embedkit.generation", "embedkit.index")),
    ("shells", ("embedkit", "embedkit.cli", "embedkit.status", "embedkit.dryrun")),
]
STAGE_PACKAGES = ("embedkit.encoding", "embedkit.generation", "embedkit.index")


def layer_of(module: str) -> int:
    """The index in LAYERS of the longest prefix that names `module`'s layer."""
    best = max(((len(p), i) for i, (_, prefixes) in enumerate(LAYERS) for p in prefixes if module == p or (p != "embedkit" and module.startswith(p + "."))),
               default=None)  # fmt: skip
    assert best is not None, f"{module} is in no layer: add it to LAYERS (and to docs/design.md)"
    return best[1]


def stage_of(module: str) -> str | None:
    return next((p for p in STAGE_PACKAGES if module == p or module.startswith(p + ".")), None)


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


def test_every_module_imports_only_its_layer_and_those_below():
    edges = graph()
    upward = [(m, t, LAYERS[layer_of(t)][0]) for m, targets in edges.items() for t in targets if layer_of(t) > layer_of(m)]
    assert upward == []


def test_no_stage_imports_another_stage():
    edges = graph()
    crossing = [(m, t) for m, targets in edges.items() for t in targets if stage_of(m) and stage_of(t) and stage_of(m) != stage_of(t)]
    assert crossing == []


def test_the_layer_check_catches_an_upward_import():
    """The layer tests would pass if layer_of put everything in one layer."""
    assert layer_of("embedkit.run.distributed") < layer_of("embedkit.encoding.pipeline") < layer_of("embedkit.cli")
    assert layer_of("embedkit.engine.encoder") < layer_of("embedkit.run.outdir")
    assert layer_of("embedkit.index.build") > layer_of("embedkit.plan.planning")


def test_the_graph_reader_sees_real_edges():
    """The checks above would pass on an empty graph: the reader must find the known edges."""
    edges = graph()
    assert "embedkit.run.distributed" in edges["embedkit.encoding.pipeline"]
    assert "embedkit.index.io" in edges["embedkit.index.search"]
    assert "embedkit.plan.planning" in edges["embedkit.dryrun.encode"] and "embedkit.encoding.pipeline" in edges["embedkit.dryrun.encode"]
    assert "embedkit.engine.texts" in edges["embedkit.index.search"]
