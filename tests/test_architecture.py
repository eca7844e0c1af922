"""Imports point one way (docs/ARCHITECTURE.md): a layer never imports the layers above it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "openwham"

# layer -> the openwham layers it may import (itself always allowed)
ALLOWED: dict[str, set[str]] = {
    "ids": set(),
    "gitpaths": set(),
    "codexauth": set(),
    "config": set(),
    "wire": set(),
    "store": set(),
    "service": {"wire", "store", "config", "ids", "gitpaths"},
    "engine": {
        "wire",
        "store",
        "config",
        "ids",
        "gitpaths",
        "service",
        "sandbox",
        "runtimes",
        "gateway",
    },
    "sandbox": {"config", "gitpaths"},
    "runtimes": {"config", "wire"},
    "gateway": {"config", "store", "codexauth"},
    "client": {"wire", "codexauth"},
    "server": {"wire", "store", "config", "ids", "service", "engine", "web"},
    "web": {"wire", "store", "config", "ids", "service"},
    "cli": {"wire", "store", "config", "ids", "service", "engine", "server", "client", "codexauth"},
}


def _layer(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0].removesuffix(".py")


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "openwham" and len(parts) > 1:
                found.add(parts[1])
    return found


SOURCES = sorted(p for p in PACKAGE.rglob("*.py") if p.parent != PACKAGE or p.name != "__init__.py")


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_one_way(path: Path) -> None:
    layer = _layer(path)
    assert layer in ALLOWED, f"new top-level module {layer}: add it to ALLOWED and ARCHITECTURE.md"
    bad = {x for x in _imports(path) if x != layer and x not in ALLOWED[layer] and x != "__init__"}
    assert not bad, f"{path.relative_to(PACKAGE)} ({layer}) must not import {sorted(bad)}"
