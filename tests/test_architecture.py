"""Imports point one way (docs/ARCHITECTURE.md): a layer never imports the layers above it."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "openwham"

# layer -> the openwham layers it may import (itself always allowed)
ALLOWED: dict[str, set[str]] = {
    "ids": set(),
    "gitpaths": set(),
    "gitauth": set(),
    "codexauth": set(),
    "config": set(),
    "redaction": set(),
    "locks": set(),
    "lifeline": set(),
    "wire": set(),
    "store": set(),
    # git hosting services' REST APIs (pull requests); knows nothing of openwham's data
    "forges": set(),
    "service": {"wire", "store", "config", "ids", "gitpaths", "gitauth", "redaction", "lifeline"},
    "engine": {
        "wire",
        "store",
        "config",
        "ids",
        "gitpaths",
        "gitauth",
        "service",
        "sandbox",
        "runtimes",
        "gateway",
        "redaction",
        "locks",
        "lifeline",
    },
    # the operations API, web UI and CLI share; the only way into the engine from above
    "commands": {
        "wire",
        "store",
        "config",
        "ids",
        "service",
        "engine",
        "locks",
        "forges",
        "gitauth",
    },
    "sandbox": {"config", "gitpaths", "gitauth", "locks", "lifeline"},
    "runtimes": {"config", "wire"},
    "gateway": {"config", "store", "codexauth", "redaction"},
    "client": {"wire", "codexauth"},
    "server": {"wire", "store", "config", "ids", "service", "commands", "web", "locks", "lifeline"},
    "web": {"wire", "store", "config", "ids", "service", "commands"},
    "cli": {
        "wire",
        "store",
        "config",
        "ids",
        "service",
        "commands",
        "server",
        "client",
        "codexauth",
    },
}

# Only the application commands reach into the engine from above it: routers, web pages and
# the CLI call ``openwham.commands`` (docs/ARCHITECTURE.md, issue 17's seams).
ENGINE_CALLERS = {"engine", "commands"}


def _layer(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0].removesuffix(".py")


def _imports(path: Path) -> set[str]:
    """The openwham top-level modules ``path`` imports: ``import openwham.x``, ``from
    openwham.x import …``, ``from openwham import x`` and relative imports (resolved)."""
    tree = ast.parse(path.read_text())
    package = ["openwham", *path.relative_to(PACKAGE).parent.parts]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            names = [module] if module != "openwham" else [f"openwham.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "openwham" and len(parts) > 1 and _is_module(parts[1]):
                found.add(parts[1])
    return found


def _is_module(name: str) -> bool:
    return (PACKAGE / name).is_dir() or (PACKAGE / f"{name}.py").is_file()


SOURCES = sorted(p for p in PACKAGE.rglob("*.py") if p.parent != PACKAGE or p.name != "__init__.py")


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_one_way(path: Path) -> None:
    layer = _layer(path)
    assert layer in ALLOWED, f"new top-level module {layer}: add it to ALLOWED and ARCHITECTURE.md"
    bad = {x for x in _imports(path) if x != layer and x not in ALLOWED[layer] and x != "__init__"}
    assert not bad, f"{path.relative_to(PACKAGE)} ({layer}) must not import {sorted(bad)}"


def test_only_the_commands_import_the_engine() -> None:
    assert {layer for layer, allowed in ALLOWED.items() if "engine" in allowed} <= ENGINE_CALLERS
    offenders = [
        str(p.relative_to(PACKAGE))
        for p in SOURCES
        if _layer(p) not in ENGINE_CALLERS and "engine" in _imports(p)
    ]
    assert not offenders, f"import openwham.commands instead of the engine: {offenders}"


# The engine's parts: the engine (attempt.py) uses them, never the reverse, and it starts
# sandboxes and its agent only through its protocols (SandboxProvider, AgentRuntime).
ENGINE_PARTS = (
    "agent.py",
    "claim.py",
    "control.py",
    "result.py",
    "setup_cache.py",
    "standby.py",
    "titling.py",
    "turns.py",
    "workspace.py",
)


@pytest.mark.parametrize("part", ENGINE_PARTS)
def test_the_engines_parts_do_not_import_the_engine(part: str) -> None:
    tree = ast.parse((PACKAGE / "engine" / part).read_text())
    modules = {
        node.module or ""
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and (node.level or "engine" in (node.module or ""))
    }
    assert not {m for m in modules if m.split(".")[-1] == "attempt"}, part


# what makes a sandbox or launches the agent, behind SandboxProvider and AgentRuntime
SANDBOX_CALLS = {"start", "run", "selftest", "host_gaps", "disk_enforcement"}
AGENT_CALLS = {"launcher", "exec_argv", "resume_argv", "driver_argv"}
ENGINE_MODULES = sorted((PACKAGE / "engine").glob("*.py"))


@pytest.mark.parametrize("path", ENGINE_MODULES, ids=lambda p: p.name)
def test_the_engine_starts_sandboxes_and_agents_through_its_protocols(path: Path) -> None:
    """No engine module calls bubblewrap or the Codex launcher itself (``bwrap.start(…)``,
    ``from openwham.sandbox.bwrap import run``): a fake provider then runs every phase."""
    direct: list[str] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = node.func.value
            if isinstance(owner, ast.Name) and (
                (owner.id == "bwrap" and node.func.attr in SANDBOX_CALLS)
                or (owner.id in ("codex", "appserver") and node.func.attr in AGENT_CALLS)
            ):
                direct.append(f"{owner.id}.{node.func.attr}()")
        module = node.module or "" if isinstance(node, ast.ImportFrom) else ""
        agent_modules = ("runtimes.codex", "runtimes.appserver")
        if isinstance(node, ast.ImportFrom) and module.endswith(("bwrap", *agent_modules)):
            calls = SANDBOX_CALLS if module.endswith("bwrap") else AGENT_CALLS
            direct += [f"{module}.{a.name}" for a in node.names if a.name in calls]
    assert not direct, f"use the engine's SandboxProvider / AgentRuntime: {direct}"


@pytest.mark.parametrize(
    ("snippet", "where"),
    [
        ("from openwham.engine import storage", "server/x.py"),
        ("import openwham.engine.prs", "web/x.py"),
        ("from openwham import engine", "cli/x.py"),
        ("from ..engine import branches", "server/x.py"),
        ("from ...engine.attempt import requeue", "server/routers/x.py"),
    ],
)
def test_the_import_check_finds_engine_imports(
    snippet: str, where: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(f"{__name__}.PACKAGE", tmp_path)
    (tmp_path / "engine").mkdir()
    source = tmp_path / where
    source.parent.mkdir(parents=True, exist_ok=True)
    source.write_text(snippet + "\n")
    assert "engine" in _imports(source)


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


# ------------------------------------------------------------------ one owner of turn_status

# store.turnstate holds every transition of an attempt (conditional updates); nothing else may
# write the column, so no path can change a status without its guard.
TURN_STATE_OWNER = PACKAGE / "store" / "turnstate.py"
_STATUS = "turn_status"
# calls that write rows: a turn_status anywhere in their arguments is a write of the column
_WRITING_CALLS = {
    "values",
    "ordered_values",
    "update",
    "insert",
    "Turn",
    "setattr",
    "bulk_update_mappings",
    "bulk_insert_mappings",
    "on_conflict_do_update",
    "merge",
}
# raw SQL (text(), exec_driver_sql, a DB-API cursor) that sets the column
_SQL_WRITE = re.compile(
    r"(?is)\b(update\s+\"?turns\"?\s.*\bset\b|insert\s+into\s+\"?turns\"?\b|replace\s+into\s+\"?turns\"?\b).*\bturn_status\b"
)


def _callee(node: ast.Call) -> str:
    """The called name; ``x.update(…)``/``x.insert(…)`` only as SQLAlchemy's (``sa.update``),
    not a dict's or a list's."""
    func = node.func
    if isinstance(func, ast.Name):
        return func.id
    if not isinstance(func, ast.Attribute):
        return ""
    if func.attr in ("update", "insert"):
        owner = func.value
        return func.attr if isinstance(owner, ast.Name) and owner.id in ("sa", "sqlalchemy") else ""
    return func.attr


def _mentions_status(node: ast.AST) -> bool:
    for sub in ast.walk(node):
        if isinstance(sub, ast.Attribute) and sub.attr == _STATUS:
            return True
        if isinstance(sub, ast.keyword) and sub.arg == _STATUS:
            return True
        if isinstance(sub, ast.Constant) and isinstance(sub.value, str) and _STATUS in sub.value:
            return True
    return False


def status_writes(source: str) -> list[str]:
    """Where ``source`` writes ``turn_status``: an assignment (or ``del``) of the attribute, a
    row-writing call (``update``/``values``/``insert``/``Turn(...)``/``setattr``/raw SQL) with
    the column among its arguments, or an SQL string that updates or inserts it."""
    found = []
    for node in ast.walk(ast.parse(source)):
        line = getattr(node, "lineno", 0)
        if (
            isinstance(node, ast.Attribute)
            and node.attr == _STATUS
            and isinstance(node.ctx, ast.Store | ast.Del)
        ):
            found.append(f"line {line}: assigns .{_STATUS}")
        elif isinstance(node, ast.Call) and _callee(node) in _WRITING_CALLS:
            if any(_mentions_status(a) for a in [*node.args, *node.keywords]):
                found.append(f"line {line}: {_callee(node)}(…) with {_STATUS}")
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and _SQL_WRITE.search(node.value)
        ):
            found.append(f"line {line}: SQL writing {_STATUS}")
    return found


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_only_turnstate_writes_turn_status(path: Path) -> None:
    if path == TURN_STATE_OWNER or "migrations" in path.relative_to(PACKAGE).parts:
        return
    writes = status_writes(path.read_text())
    assert not writes, (
        f"{path.relative_to(PACKAGE)} writes turn_status (use store.turnstate): {writes}"
    )


@pytest.mark.parametrize(
    "snippet",
    [
        "turn.turn_status = 'failed'",
        "turn.turn_status: str = 'failed'",
        "a.b.turn_status += 'x'",
        "for turn.turn_status in x: pass",
        "del turn.turn_status",
        "s.execute(update(m.Turn).values(turn_status='pending'))",
        "s.execute(update(m.Turn).values({m.Turn.turn_status: 'pending'}))",
        "s.execute(update(m.Turn).values(**{'turn_status': 'pending'}))",
        "s.execute(update(m.Turn).ordered_values((m.Turn.turn_status, 'x')))",
        "s.execute(insert(m.Turn).values(id='x', turn_status='pending'))",
        "s.execute(sa.update(m.Turn, **{'turn_status': 'x'}))",
        "s.add(m.Turn(id='x', turn_status='pending'))",
        "s.add(Turn(id='x', **{'turn_status': 'pending'}))",
        "setattr(turn, 'turn_status', 'failed')",
        "s.execute(text(\"UPDATE turns SET turn_status = 'failed'\"))",
        "s.exec_driver_sql('update turns set turn_status=%s where id=1', ('x',))",
        "cur.execute('UPDATE \"turns\" SET body = 1, turn_status = 2')",
        "Q = '''INSERT INTO turns (id, turn_status) VALUES (1, 2)'''",
        "s.bulk_update_mappings(m.Turn, [{'id': 'x', 'turn_status': 'failed'}])",
    ],
)
def test_the_turn_status_check_finds_writes(snippet: str) -> None:
    assert status_writes(snippet), snippet


@pytest.mark.parametrize(
    "snippet",
    [
        "x = turn.turn_status",
        "s.scalar(select(m.Turn.turn_status).where(m.Turn.id == i))",
        "s.execute(update(m.Turn).where(m.Turn.turn_status == 'x').values(body={}))",
        "TaskTurn(turn_status=turn.turn_status or 'pending')",
        "payload = {'turn_status': status}",
        "data.update({'turn_status': turn.turn_status})",
        "events.status_payload('Cancelled', 'cancelled')",
        "s.execute(update(m.Turn).where(m.Turn.turn_status.in_(A)).values(body=b))",
        "s.execute(text('SELECT turn_status FROM turns WHERE id = :id'))",
        '"""Each update of a turn is conditional on its turn_status."""',
    ],
)
def test_the_turn_status_check_lets_reads_be(snippet: str) -> None:
    assert not status_writes(snippet), snippet
