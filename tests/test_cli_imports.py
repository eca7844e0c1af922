"""``wham`` starts without the server's or the SDK's imports: every start imports the command
modules to parse its arguments, and sqlalchemy, uvicorn, httpx and the wire models made
``wham --help`` take ~2 s (docs/benchmarks.md, "CLI start-up"). Each case runs a fresh
interpreter and reads its ``sys.modules``; not timed."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import typer

from openwham.cli.main import app

# What only the server, the token commands and the engine need.
SERVER_SIDE = (
    "sqlalchemy",
    "uvicorn",
    "fastapi",
    "starlette",
    "alembic",
    "procrastinate",
    "openwham.server",
    "openwham.engine",
    "openwham.store",
    "openwham.service",
    "openwham.commands",
    "openwham.web",
    "openwham.sandbox",
    "openwham.gateway",
    "openwham.runtimes",
)
# What only commands that talk to an API (or read tokens) need.
CLIENT_SIDE = (
    "httpx",
    "jwt",
    "cryptography",
    "openwham.client",
    "openwham.wire",
    "openwham.config",
)

# Runs each argv (a JSON list of lists) through `wham` in this interpreter, then writes the
# loaded modules and the exit codes to the file given first.
CHILD = """
import json, sys
out, runs = sys.argv[1], json.loads(sys.argv[2])
import openwham.cli.main as cli
codes = []
for argv in runs:
    try:
        cli.app(argv, prog_name="wham")
        codes.append(0)
    except SystemExit as e:
        codes.append(e.code if isinstance(e.code, int) else 1)
with open(out, "w") as f:
    json.dump({"modules": sorted(sys.modules), "codes": codes}, f)
"""


def _loaded(tmp_path: Path, env: dict[str, str], *runs: list[str]) -> tuple[set[str], list[int]]:
    """The modules a fresh interpreter holds after ``import openwham.cli.main`` and ``runs``."""
    result = tmp_path / "modules.json"
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(result), json.dumps(list(runs))],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert result.exists(), done.stderr
    data = json.loads(result.read_text())
    return set(data["modules"]), data["codes"]


def _among(modules: set[str], names: tuple[str, ...]) -> list[str]:
    return sorted(m for m in modules if any(m == n or m.startswith(n + ".") for n in names))


def _commands(group: typer.core.TyperGroup, path: list[str]) -> Iterator[list[str]]:
    for name, command in group.commands.items():
        if isinstance(command, typer.core.TyperGroup):
            yield from _commands(command, [*path, name])
        else:
            yield [*path, name]


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "WHAM_CONFIG_DIR": str(tmp_path / "config"),
        "CODEX_HOME": str(tmp_path / "codex"),
    }


def test_import_loads_neither_server_nor_sdk(tmp_path: Path, env: dict[str, str]) -> None:
    modules, _ = _loaded(tmp_path, env)
    assert "openwham.cli.tasks" in modules and "openwham.cli.tokens" in modules
    assert _among(modules, SERVER_SIDE + CLIENT_SIDE) == []


def test_every_commands_help_loads_neither(tmp_path: Path, env: dict[str, str]) -> None:
    root = typer.main.get_command(app)
    assert isinstance(root, typer.core.TyperGroup)
    commands = list(_commands(root, []))
    assert ["task", "list"] in commands and ["serve"] in commands and ["token", "list"] in commands
    runs = [["--help"], ["--version"], *([*c, "--help"] for c in commands)]
    modules, codes = _loaded(tmp_path, env, *runs)
    assert codes == [0] * len(runs)
    assert _among(modules, SERVER_SIDE + CLIENT_SIDE) == []


def test_a_usage_error_loads_neither(tmp_path: Path, env: dict[str, str]) -> None:
    """A command that ends before it opens a client (here ``--filter``'s check) does not load
    the SDK to see whether its exit was an SDK error."""
    modules, codes = _loaded(tmp_path, env, ["task", "list", "--filter", "bogus"])
    assert codes == [2]
    assert _among(modules, SERVER_SIDE + CLIENT_SIDE) == []


def test_a_client_command_loads_the_sdk_but_not_the_server(
    tmp_path: Path, env: dict[str, str]
) -> None:
    with socket.socket() as refused:  # bound, never listening: connections are refused
        refused.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{refused.getsockname()[1]}"
        env = {**env, "WHAM_URL": url, "WHAM_TOKEN": "not-a-token"}
        modules, codes = _loaded(tmp_path, env, ["task", "list", "--json"])
    assert codes == [1]  # "cannot reach …": the command ran and used the SDK
    assert "httpx" in modules and "openwham.wire" in modules and "openwham.client" in modules
    assert _among(modules, SERVER_SIDE) == []


def test_a_server_command_still_loads_what_it_needs(tmp_path: Path, env: dict[str, str]) -> None:
    """The imports moved into the commands: ``token list`` opens the database and works."""
    data = ["--data-dir", str(tmp_path / "data")]
    modules, codes = _loaded(tmp_path, env, ["token", "create", *data], ["token", "list", *data])
    assert codes == [0, 0]
    assert "sqlalchemy" in modules and "openwham.store.db" in modules
