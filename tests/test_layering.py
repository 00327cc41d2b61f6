"""Imports point down: models/corpora → decoding → calibrators → eval → commands (an ast walk)."""

from __future__ import annotations

import ast
from pathlib import Path

import entcal

ROOT = Path(entcal.__file__).parent

# Layer of each part of the package; a module may import only from its own layer or below.
LAYERS = {
    "entcal.models": 0,
    "entcal.corpora": 0,
    "entcal.synthetic": 0,
    "entcal.decoding": 1,
    "entcal.generation": 1,
    "entcal.calibrators": 2,
    "entcal.eval": 3,
    "entcal.commands": 4,
    "entcal.cli": 4,
}


def _layer(module: str) -> int | None:
    best = None
    for prefix, layer in LAYERS.items():
        if module == prefix or module.startswith(prefix + "."):
            best = layer
    return best


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in found if m.startswith("entcal.")}


def test_no_import_points_up():
    upward = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        module = ".".join(rel.parts).removesuffix(".__init__")
        here = _layer(module)
        if here is None:
            continue
        for target in _imports(path):
            there = _layer(target)
            if there is not None and there > here:
                upward.append(f"{module} -> {target}")
    assert not upward, "imports pointing up:\n" + "\n".join(sorted(set(upward)))
