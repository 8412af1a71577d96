"""The house's floors: a module imports only modules on its own floor or below, and no imports go round in circles.

`LAYERS` is where the floors are written down (docs/ARCHITECTURE.md shows the same table, checked
below). Every import in every module of `lora_chat` counts, the lazy ones inside functions too: a
lazy import of a higher floor is still a dependency on it. Packages not built yet (runtime, chat,
serve, merge, plan) already have their floor, so they land in the right place.
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lora_chat"

# Lowest first. A unit is a top-level module or package of lora_chat; "lora_chat" is the package root.
# adapters sits below train: training publishes its adapter through adapters.store, and adapters must
# never import train (the data still flows train -> adapters -> runtime). plan sits below train too: it reads
# only the recipe, the data and config.json, and training's `gradient_checkpointing: auto` asks its memory model.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("lora_chat", "errors", "files", "progress"),
    ("recipe",),
    ("models",),
    ("data",),
    ("templates",),
    ("encoding", "inputs"),
    ("adapters", "plan"),
    ("train",),
    ("runtime",),
    ("evaluate",),
    ("feedback",),
    ("chat", "serve", "merge", "validate", "preview"),
    ("cli",),
)
FLOOR = {unit: floor for floor, units in enumerate(LAYERS) for unit in units}

# Module-level cycles inside one package that are known and being removed. An entry that no longer
# matches a real cycle fails the test, so this cannot outlive the fix.
KNOWN_CYCLES: set[frozenset[str]] = set()


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def resolve(importer: str, is_package: bool, node: ast.ImportFrom) -> list[str]:
    """The lora_chat modules an import statement names (`from . import x` names the module x when it is one)."""
    if node.level:
        base = importer.split(".") if is_package else importer.split(".")[:-1]
        base = base[:len(base) - node.level + 1]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if not target.startswith("lora_chat"):
        return []
    found = []
    for alias in node.names:
        sub = f"{target}.{alias.name}"
        found.append(sub if module_path(sub) else target)
    return found


def module_path(name: str) -> Path | None:
    base = ROOT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def import_graph() -> dict[str, set[str]]:
    """Every lora_chat module -> the lora_chat modules it imports, anywhere in its body."""
    graph: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        edges = graph.setdefault(name, set())
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                edges.update(a.name for a in node.names if a.name.startswith("lora_chat"))
            elif isinstance(node, ast.ImportFrom):
                edges.update(resolve(name, path.name == "__init__.py", node))
        edges.discard(name)
    return graph


def unit_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "lora_chat"


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one member (Tarjan)."""
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


GRAPH = import_graph()


def test_every_module_has_a_floor():
    missing = sorted({unit_of(m) for m in GRAPH} - set(FLOOR))
    assert not missing, f"add these to LAYERS in tests/test_layers.py and docs/ARCHITECTURE.md: {missing}"


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return [f"{m} (floor {FLOOR[unit_of(m)]}) imports {t} (floor {FLOOR[unit_of(t)]})"
            for m, targets in sorted(graph.items()) for t in sorted(targets)
            if unit_of(m) in FLOOR and unit_of(t) in FLOOR and FLOOR[unit_of(t)] > FLOOR[unit_of(m)]]


def unit_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    units: dict[str, set[str]] = defaultdict(set)
    for m, targets in graph.items():
        units[unit_of(m)].update(unit_of(t) for t in targets if unit_of(t) != unit_of(m))
    return units


def test_no_module_imports_a_higher_floor():
    upward = upward_imports(GRAPH)
    assert not upward, "\n".join(upward)


def test_no_import_cycle_between_packages():
    assert cycles(unit_graph(GRAPH)) == []


def test_no_import_cycle_between_modules_beyond_the_known_ones():
    found = {frozenset(c) for c in cycles(GRAPH)}
    new, fixed = found - KNOWN_CYCLES, KNOWN_CYCLES - found
    assert not new, f"new import cycles: {[sorted(c) for c in new]}"
    assert not fixed, f"fixed, so remove from KNOWN_CYCLES: {[sorted(c) for c in fixed]}"


def test_the_architecture_doc_shows_the_same_floors():
    doc = (ROOT / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    section = doc.split("## Layers", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\|\s*(\d+)\s*\|([^|]*)\|", section, flags=re.M)
    assert [tuple(re.findall(r"`([\w.]+)`", units)) for _, units in rows] == list(LAYERS)


@pytest.mark.parametrize("lower, higher", [("adapters", "train"), ("models", "data"), ("data", "templates")])
def test_the_checks_catch_a_planted_upward_import_and_the_cycle_it_makes(lower, higher):
    """The checks above can fail: plant `lower` importing `higher` (which already imports `lower`)."""
    planted = {**GRAPH, f"lora_chat.{lower}.planted": {f"lora_chat.{higher}"}}
    assert upward_imports(planted) == [f"lora_chat.{lower}.planted (floor {FLOOR[lower]}) imports "
                                       f"lora_chat.{higher} (floor {FLOOR[higher]})"]
    assert any({lower, higher} <= set(c) for c in cycles(unit_graph(planted)))
