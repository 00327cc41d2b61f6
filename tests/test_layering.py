"""The package map, enforced by an ``ast`` walk over every module of ``entcal``:

* imports point down: models/corpora/synthetic → decoding → calibrators → eval → studies →
  commands (a module may import only from its own layer or below);
* no import cycle between modules (function-level imports included; ``TYPE_CHECKING`` blocks
  left out, since they never run).
"""

from __future__ import annotations

import ast
from pathlib import Path

import entcal

ROOT = Path(entcal.__file__).parent

# Layer of each part of the package; a module may import only from its own layer or below.
# The root package re-exports ``entcal.generate``, so it sits with generation.
ROOT_LAYER = 1
LAYERS = {
    "entcal.models": 0,
    "entcal.devices": 0,
    "entcal.corpora": 0,
    "entcal.synthetic": 0,
    "entcal.decoding": 1,
    "entcal.generation": 1,
    "entcal.calibrators": 2,
    "entcal.eval": 3,
    "entcal.studies": 4,
    "entcal.commands": 5,
    "entcal.cli": 5,
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        out[".".join(rel.parts).removesuffix(".__init__")] = path
    return out


MODULES = _modules()


def _layer(module: str) -> int | None:
    if module == "entcal":
        return ROOT_LAYER
    best = None
    for prefix, layer in LAYERS.items():
        if module == prefix or module.startswith(prefix + "."):
            best = layer
    return best


def _is_type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
    )


def _walk(tree: ast.AST):
    for node in ast.iter_child_nodes(tree):
        if _is_type_checking(node):
            continue
        yield node
        yield from _walk(node)


def _imports(module: str) -> set[str]:
    """The entcal modules ``module`` imports (``from pkg import sub`` counts as ``pkg.sub``)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in _walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for a in node.names:
                sub = f"{source}.{a.name}"
                found.add(sub if sub in MODULES else source)
    return {m for m in found if m in MODULES and m != module}


GRAPH = {m: _imports(m) for m in MODULES}


def test_the_walk_sees_the_package():
    assert "entcal.decoding.base" in GRAPH["entcal.decoding.chain"]
    assert "entcal.decoding.ops" in GRAPH["entcal.generation"]  # from entcal.decoding import ops


def test_every_module_has_a_layer():
    unplaced = [m for m in MODULES if _layer(m) is None]
    assert not unplaced, f"modules missing from LAYERS (add them to the map): {unplaced}"


def _upward(graph: dict[str, set[str]]) -> list[str]:
    """Every edge ``a -> b`` of ``graph`` where ``b`` sits in a higher layer than ``a``."""
    upward = []
    for module, targets in graph.items():
        here = _layer(module)
        for target in targets:
            there = _layer(target)
            if here is not None and there is not None and there > here:
                upward.append(f"{module} -> {target}")
    return sorted(upward)


def test_upward_check_finds_an_upward_import():
    graph = {
        "entcal.decoding.spec": {"entcal.calibrators.calibrated", "entcal.models"},
        "entcal.eval.compare": {"entcal.decoding.spec"},
    }
    assert _upward(graph) == ["entcal.decoding.spec -> entcal.calibrators.calibrated"]


def test_no_import_points_up():
    upward = _upward(GRAPH)
    assert not upward, "imports pointing up:\n" + "\n".join(upward)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle():
    cycles = _cycles(GRAPH)
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)
