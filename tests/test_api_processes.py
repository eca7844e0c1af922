"""``wham serve --processes N``: more API processes on one port (server/processes.py).

One real ``wham serve`` on a throwaway PostgreSQL with the queue executor and two extra API
processes. While the first process is stopped (SIGSTOP), the others still answer, and a task
posted then runs once the first (the executor's process) continues: an extra process is a
real API node, not a proxy to the first. A killed extra process is replaced; stopping the
server stops them all. On SQLite, or without the queue executor, the option is refused
before anything listens.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from conftest import WHAM, make_repo, postgres_database, serve_env
from support.procs import unique_marker
from support.scripted_model import Say, ScriptedModel

PREFIX = "/backend-api/wham"
TERMINAL = ("completed", "failed", "cancelled")


def _children(pid: int) -> list[int]:
    """Live child processes of ``pid`` (ours: the server this test started)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            continue
    live = []
    for child in found:
        try:
            state = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
        if state != "Z" and b"--listen-fd" in cmdline:
            live.append(child)
    return live


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state == "Z"


def _wait(done: object, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not done():  # type: ignore[operator]
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _serve(data_dir: Path, env: dict[str, str], *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            *(str(WHAM), "serve", "--host", "127.0.0.1", "--port", "0", "--json"),
            *("--data-dir", str(data_dir), *extra),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **env},
    )


def test_processes_are_refused_on_sqlite_and_without_the_queue(tmp_path: Path) -> None:
    proc = _serve(tmp_path / "data", {}, "--processes", "2")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert "--processes needs PostgreSQL" in err
    assert not (tmp_path / "data" / "openwham.db").exists()  # refused before the store opened


@pytest.mark.postgres
def test_processes_without_the_queue_executor_are_refused(tmp_path: Path) -> None:
    with postgres_database() as url:
        env = {"WHAM_DATABASE_URL": url, "WHAM_EXECUTOR": "inprocess"}
        proc = _serve(tmp_path / "data", env, "--processes", "2")
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert "--processes needs WHAM_EXECUTOR=queue" in err


@pytest.fixture
def stopped_later() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
            proc.wait(10)


@pytest.mark.postgres
@pytest.mark.sandbox
def test_extra_processes_serve_alone_take_tasks_and_go_with_the_server(
    tmp_path: Path, model: ScriptedModel, stopped_later: list[subprocess.Popen[str]]
) -> None:
    model.script = [Say("Posted to another process.")]
    with postgres_database() as url:
        env = {**serve_env(model), "WHAM_DATABASE_URL": url, "WHAM_EXECUTOR": "queue"}
        env["WHAM_STANDBY_SANDBOXES"] = "0"
        data = tmp_path / unique_marker("procs")
        proc = _serve(data, env, "--processes", "3")
        stopped_later.append(proc)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = re.search(r'"url": "([^"]+)"', line)
        assert match, line
        base = match.group(1)
        token = subprocess.run(
            [str(WHAM), "token", "create", "--data-dir", str(data)],
            check=True,
            capture_output=True,
            text=True,
            env={**os.environ, **env},
        ).stdout.strip()
        headers = {"Authorization": f"Bearer {token}"}
        assert _wait(lambda: len(_children(proc.pid)) == 2, 30), _children(proc.pid)

        with httpx.Client(base_url=f"{base}{PREFIX}", headers=headers, timeout=30) as c:

            def answers() -> bool:
                try:
                    return c.get(f"{base}/healthz").status_code == 200
                except httpx.TransportError:
                    return False

            assert _wait(answers, 60)
            r = c.post(
                "environments",
                json={"label": "acme/w", "repos": [str(make_repo(tmp_path / "repo"))]},
            )
            assert r.status_code == 201, r.text
            env_id = r.json()["id"]

            os.kill(proc.pid, signal.SIGSTOP)  # the first process (and its executor) stands still
            try:
                # new connections: the kernel gives each to a process that accepts it
                with httpx.Client(base_url=f"{base}{PREFIX}", headers=headers, timeout=10) as d:
                    for _ in range(5):
                        assert d.get(f"{base}/healthz").status_code == 200
                    body = {
                        "new_task": {"environment_id": env_id},
                        "input_items": [
                            {
                                "type": "message",
                                "role": "user",
                                "content": [{"content_type": "text", "text": "Hi"}],
                            }
                        ],
                    }
                    r = d.post("tasks", json=body)
                    assert r.status_code == 200, r.text
                    task_id = r.json()["task"]["id"]
                    assert d.get(f"tasks/{task_id}").status_code == 200
            finally:
                os.kill(proc.pid, signal.SIGCONT)

            def settled() -> bool:
                mapping = c.get(f"tasks/{task_id}/turns").json()["turn_mapping"]
                turns = [e["turn"] for e in mapping.values() if e["turn"]["role"] == "assistant"]
                return bool(turns) and all(t["turn_status"] in TERMINAL for t in turns)

            assert _wait(settled, 120)
            mapping = c.get(f"tasks/{task_id}/turns").json()["turn_mapping"]
            (turn,) = [e["turn"] for e in mapping.values() if e["turn"]["role"] == "assistant"]
            assert turn["turn_status"] == "completed", turn.get("error")

        # a killed extra process is replaced
        first = _children(proc.pid)
        os.kill(first[0], signal.SIGKILL)
        assert _wait(lambda: first[0] not in _children(proc.pid), 10)
        assert _wait(lambda: len(_children(proc.pid)) == 2, 30), _children(proc.pid)
        assert _wait(answers_fresh(base), 60)

        # stopping the server stops them all
        children = _children(proc.pid)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == -signal.SIGTERM  # uvicorn ends by the signal it stopped for
        # they were stopped before it ended, not left to PR_SET_PDEATHSIG
        assert all(_gone(p) for p in children), children


def answers_fresh(base: str) -> object:
    def check() -> bool:
        try:
            return httpx.get(f"{base}/healthz", timeout=5).status_code == 200
        except httpx.TransportError:
            return False

    return check


@pytest.mark.postgres
def test_extra_processes_end_when_the_first_is_killed(
    tmp_path: Path, stopped_later: list[subprocess.Popen[str]]
) -> None:
    """A first process killed outright (no shutdown of its own) leaves no API process behind:
    each extra one was started with a parent-death signal (openwham.lifeline)."""
    with postgres_database() as url:
        env = {"WHAM_DATABASE_URL": url, "WHAM_EXECUTOR": "queue"}
        env["WHAM_EXECUTOR_CONCURRENCY"] = "0"
        proc = _serve(tmp_path / unique_marker("procs"), env, "--processes", "2")
        stopped_later.append(proc)
        assert proc.stdout is not None
        match = re.search(r'"url": "([^"]+)"', proc.stdout.readline())
        assert match
        assert _wait(lambda: len(_children(proc.pid)) == 1, 30)
        (child,) = _children(proc.pid)
        time.sleep(3)  # well into its start-up (the signal is armed before it runs)
        proc.kill()
        proc.wait(10)
        assert _wait(lambda: _gone(child), 15), child
