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
    "redaction": set(),
    "wire": set(),
    "store": set(),
    "service": {"wire", "store", "config", "ids", "gitpaths", "redaction"},
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
        "redaction",
    },
    "sandbox": {"config", "gitpaths"},
    "runtimes": {"config", "wire"},
    "gateway": {"config", "store", "codexauth", "redaction"},
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


# ------------------------------------------------------------------ the project stands alone

ROOT = PACKAGE.parents[1]
# What a clone of the project holds and runs: none of it may reach outside the clone for the
# reference material that sits beside our own checkouts (it is copied into tests/fixtures and
# docs/reference instead). Spelled in pieces so that this file does not match itself.
_OUTSIDE = ("../" + "shared", "WHAM_" + "SHARED_DIR", 'parent / "' + 'shared"')


def _project_files() -> list[Path]:
    found = []
    for top in ("src", "tests", "scripts", "bench", "docs", ".ci", "tools"):
        for path in sorted((ROOT / top).rglob("*")):
            if not path.is_file() or "node_modules" in path.parts or "__pycache__" in path.parts:
                continue
            found.append(path)
    return [*found, ROOT / "README.md", ROOT / "pyproject.toml", ROOT / "wham"]


def test_nothing_in_the_project_reaches_outside_the_clone() -> None:
    offenders = []
    for path in _project_files():
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        offenders += [
            f"{path.relative_to(ROOT)}: {needle}" for needle in _OUTSIDE if needle in text
        ]
    assert not offenders, offenders


def test_the_reference_payloads_are_in_the_project() -> None:
    reference = ROOT / "tests" / "fixtures" / "wham-reference"
    assert len(list((reference / "examples").glob("*.json"))) >= 30
    assert {p.name for p in (reference / "openai-codex-fixtures").glob("*.json")} == {
        "task_details_with_diff.json",
        "task_details_with_error.json",
    }
    readme = (reference / "README.md").read_text()
    for license_file in ("LICENSE-gpt-api-intel.txt", "LICENSE-openai-codex.txt"):
        assert license_file in readme and (reference / license_file).is_file()
