"""``wham task cancel``, ``diff`` and ``show`` as a user runs them against ``wham serve``
(real tasks: the Codex CLI in the sandbox, answered by the scripted model); ``diff`` on a
terminal runs in a real pty."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest

from conftest import WHAM, LiveServer, make_repo
from openwham.client import WhamClient
from support.scripted_model import Patch, Say, ScriptedModel

FIX_ADD = Patch(
    "*** Begin Patch\n*** Update File: calc.py\n@@\n def add(a, b):\n"
    "-    return a - b\n+    return a + b\n*** Add File: NOTES.md\n+fixed add\n+and noted it\n"
    "*** End Patch"
)
SCRIPT = [FIX_ADD, Say("Fixed add() and wrote NOTES.md.")]


@pytest.fixture(scope="module")
def token(served: LiveServer) -> str:
    return served.token()


@pytest.fixture(scope="module")
def wham(served: LiveServer, token: str) -> Iterator[WhamClient]:
    with WhamClient(served.url, token=token) as c:
        yield c


@pytest.fixture(scope="module")
def env_id(wham: WhamClient, model: ScriptedModel, tmp_path_factory: pytest.TempPathFactory) -> str:
    model.script = SCRIPT
    repo = make_repo(tmp_path_factory.mktemp("origin") / "widgets")
    return wham.create_environment({"label": "acme/widgets", "repos": [str(repo)]}).id


@pytest.fixture(scope="module")
def cli_env(
    tmp_path_factory: pytest.TempPathFactory, served: LiveServer, token: str
) -> dict[str, str]:
    home = tmp_path_factory.mktemp("cli-home")
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(home),
        "WHAM_CONFIG_DIR": str(home / "config"),
        "CODEX_HOME": str(home / "codex"),
    }
    login = run_cli(env, "login", "--server", served.url, "--token", token)
    assert login.returncode == 0, login.stderr
    return env


def run_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(WHAM), *args],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=180,
    )


@pytest.fixture(scope="module")
def done_task(wham: WhamClient, env_id: str) -> str:
    """A finished task: the first prompt and one follow-up, with a pushed PR branch."""
    task_id = wham.create_task("Fix add()", env_id).task.id
    wham.wait(task_id, poll=0.2, timeout=120)
    return task_id


# ----------------------------------------------------------------------------- cancel


def test_cancel_of_a_finished_task_says_nothing_was_cancelled(
    cli_env: dict[str, str], wham: WhamClient, done_task: str
) -> None:
    r = run_cli(cli_env, "task", "cancel", done_task)
    assert r.returncode == 1, r.stdout
    assert r.stdout == ""
    assert r.stderr.splitlines() == [f"error: nothing to cancel: task {done_task} is already ready"]
    j = run_cli(cli_env, "task", "cancel", done_task, "--json")
    assert j.returncode == 1
    body = json.loads(j.stdout)
    assert body["success"] is False and body["cancelled"] == [] and body["status"] == "ready"
    current = wham.get_task(done_task).current_assistant_turn
    assert current is not None and current.turn_status == "completed"


def test_cancel_of_a_running_task_names_the_attempts_it_stopped(
    cli_env: dict[str, str], wham: WhamClient, env_id: str, gate: threading.Event
) -> None:
    gate.clear()
    try:
        created = wham.create_task("Slow one", env_id, attempts=2)
        task_id = created.task.id
        deadline = time.monotonic() + 60
        while wham.get_task(task_id).current_assistant_turn.turn_status != "in_progress":  # type: ignore[union-attr]
            assert time.monotonic() < deadline
            time.sleep(0.1)
        r = run_cli(cli_env, "task", "cancel", task_id, "--json")
    finally:
        gate.set()
    assert r.returncode == 0, r.stderr
    body = json.loads(r.stdout)
    attempts = wham.attempts(task_id)
    assert body["success"] is True
    assert body["cancelled"] == [{"attempt": i, "turn_id": t.id} for i, t in enumerate(attempts, 1)]
    wham.wait(task_id, poll=0.2, timeout=60)
    assert [t.turn_status for t in wham.attempts(task_id)] == ["cancelled", "cancelled"]
    again = run_cli(cli_env, "task", "cancel", task_id)
    assert again.returncode == 1
    assert again.stderr.startswith(f"error: nothing to cancel: task {task_id} is already cancelled")


def test_cancel_prints_which_attempts(
    cli_env: dict[str, str], wham: WhamClient, env_id: str, gate: threading.Event
) -> None:
    gate.clear()
    try:
        task_id = wham.create_task("Queued one", env_id).task.id
        r = run_cli(cli_env, "task", "cancel", task_id)
    finally:
        gate.set()
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"{task_id}: cancelled attempt 1\n"
