"""`wham serve` as a user starts it, running tasks: live SSE over HTTP, crash and restart.

The server is a real process configured only through the environment
(``WHAM_MODEL_PROVIDER=openai-compatible`` pointed at the scripted Responses server).
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import LiveServer, git, make_repo, parse_sse, serve_env, start_live_server, stop
from openwham.sandbox import overlay
from support.procs import host_pids, wait_gone
from support.scripted_model import Patch, Say, ScriptedModel, Shell

TERMINAL = ("completed", "failed", "cancelled")
PREFIX = "/backend-api/wham"


@pytest.fixture
def served(tmp_path: Path, scripted_model: ScriptedModel) -> Iterator[LiveServer]:
    srv = start_live_server(tmp_path / "data", serve_env(scripted_model))
    try:
        yield srv
    finally:
        stop(srv)


def client(srv: LiveServer, token: str) -> httpx.Client:
    return httpx.Client(
        base_url=f"{srv.url}{PREFIX}", headers={"Authorization": f"Bearer {token}"}, timeout=30
    )


def submit(c: httpx.Client, repo: Path, prompt: str) -> tuple[str, str]:
    env = c.post("environments", json={"label": "acme/calc", "repos": [str(repo)]})
    assert env.status_code == 201, env.text
    body = {
        "new_task": {"environment_id": env.json()["id"]},
        "input_items": [
            {
                "type": "message",
                "role": "user",
                "content": [{"content_type": "text", "text": prompt}],
            }
        ],
    }
    r = c.post("tasks", json=body)
    assert r.status_code == 200, r.text
    return r.json()["task"]["id"], r.json()["turn"]["id"]


def wait_turn(c: httpx.Client, task_id: str, until: Any, timeout: float = 90) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        turn = dict(c.get(f"tasks/{task_id}").json()["current_assistant_turn"])
        if until(turn):
            return turn
        assert time.monotonic() < deadline, turn
        time.sleep(0.05)


def test_wham_serve_runs_a_task_and_streams_it_live(
    served: LiveServer, scripted_model: ScriptedModel, tmp_path: Path
) -> None:
    repo = make_repo(tmp_path / "calc")
    scripted_model.script = [
        Shell("sleep 1.5; echo slept"),
        Patch(
            "*** Begin Patch\n*** Update File: calc.py\n@@\n def add(a, b):\n"
            "-    return a - b\n+    return a + b\n*** End Patch"
        ),
        Say("Fixed."),
    ]
    with client(served, served.token()) as c:
        task_id, turn_id = submit(c, repo, "Fix add")
        seen: list[tuple[float, dict[str, Any]]] = []
        status_while_streaming = set()
        with c.stream("GET", f"tasks/{task_id}/turns/{turn_id}/stream") as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            buffer = ""
            for chunk in r.iter_text():
                buffer += chunk
                while "\n\n" in buffer:
                    block, buffer = buffer.split("\n\n", 1)
                    for frame in parse_sse(block + "\n\n"):
                        seen.append((time.monotonic(), frame["data"]))
                        if "Running sleep" in json.dumps(frame["data"]):
                            turn = c.get(f"tasks/{task_id}").json()["current_assistant_turn"]
                            status_while_streaming.add(turn["turn_status"])
        ended = time.monotonic()
        # frames arrived while the attempt ran, not all at the end
        assert status_while_streaming == {"in_progress"}
        running = next(t for t, d in seen if "Running sleep" in json.dumps(d))
        assert ended - running > 1.0
        last = seen[-1][1]
        assert last["item_type"] == "task_turn_event"
        assert last["payload"]["turn_status"] == "completed"
        details = c.get(f"tasks/{task_id}").json()
        turn = details["current_assistant_turn"]
        assert turn["turn_status"] == "completed"
        (pr,) = [i for i in turn["output_items"] if i["type"] == "pr"]
        assert "+    return a + b" in pr["output_diff"]["diff"]
        assert details["current_diff_task_turn"]["id"] == turn_id
        # the other path style serves the same task
        other = httpx.get(
            f"{served.url}/api/codex/tasks/{task_id}",
            headers={"Authorization": c.headers["Authorization"]},
        )
        assert other.json()["current_assistant_turn"]["turn_status"] == "completed"


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["crash", "stop"])
def test_an_attempt_survives_a_server_crash_or_stop(
    tmp_path: Path, scripted_model: ScriptedModel, sig: int
) -> None:
    repo = make_repo(tmp_path / "calc")
    marker = f"marker-{time.time_ns()}"
    scripted_model.script = [
        Shell(f"python3 -c 'import time; time.sleep(3)' {marker}; echo slept"),
        Say("Finished after all."),
    ]
    data = tmp_path / "data"
    first = start_live_server(data, serve_env(scripted_model))
    try:
        token = first.token()
        with client(first, token) as c:
            task_id, turn_id = submit(c, repo, "Take your time")
            wait_turn(
                c,
                task_id,
                # before its first status line the turn has no latest_event
                lambda t: "time.sleep(3)" in (t["latest_event"] or {}).get("text", ""),
            )
            # Codex reports the command as started just before it spawns it
            deadline = time.monotonic() + 2
            while not host_pids(marker) and time.monotonic() < deadline:
                time.sleep(0.02)
            assert host_pids(marker)
    finally:
        stop(first, sig)
    # the sandbox died with its server
    assert wait_gone(marker, 5) == []

    second = start_live_server(data, serve_env(scripted_model))
    try:
        with client(second, token) as c:
            turn = wait_turn(c, task_id, lambda t: t["turn_status"] in TERMINAL)
            assert turn["turn_status"] == "completed", turn["error"]
            assert turn["output_items"][0]["content"][0]["text"] == "Finished after all."
            frames = parse_sse(c.get(f"tasks/{task_id}/turns/{turn_id}/stream").text)
            logs = [f["data"]["payload"]["text"] for f in frames if f["data"]["item_type"] == "log"]
            if sig == signal.SIGKILL:  # found orphaned: a second try
                assert logs == [
                    "The server running this attempt stopped; starting it again from scratch "
                    "(try 2 of 2)"
                ]
            else:  # handed back on the way out: no try counted
                assert logs == ["The server stopped; this attempt will resume"]
            # one clean work log: the prompt, the command and its output, the answer
            messages = turn["worklog"]["messages"]
            assert [m["author"]["role"] for m in messages].count("user") == 1
            assert sum(m.get("recipient") == "container.exec" for m in messages) == 1
    finally:
        stop(second)
    assert not git("status", "--porcelain", cwd=repo)  # the user's repository is untouched
    assert os.path.isdir(data / "mirrors")


def test_a_crash_leaves_no_attempt_files_behind_and_follow_ups_still_resume(
    tmp_path: Path, scripted_model: ScriptedModel
) -> None:
    """Issue 16 item 8: a finished attempt keeps nothing on disk (the Codex session a
    follow-up resumes is in the database); an attempt lost with its server
    (``executor_lost``) keeps nothing after the restart, where before its workspace stayed
    on disk for good."""
    quick = make_repo(tmp_path / "quick")
    slow = make_repo(tmp_path / "slow")
    (slow / "slow").write_text("take your time\n")
    git("add", "slow", cwd=slow)
    git("commit", "-q", "-m", "slow", cwd=slow)
    marker = f"leftover-{time.time_ns()}"
    scripted_model.script = [
        Shell(
            f"if [ -e slow ]; then python3 -c 'import time; time.sleep(60)' {marker}; fi; echo ok"
        ),
        Say("Done."),
    ]
    data = tmp_path / "data"
    attempts = data / "attempts"
    env = {**serve_env(scripted_model), "WHAM_ATTEMPT_MAX_TRIES": "1"}
    first = start_live_server(data, env)
    try:
        token = first.token()
        with client(first, token) as c:
            done_task, done_turn = submit(c, quick, "Remember the word pelican")
            turn = wait_turn(c, done_task, lambda t: t["turn_status"] in TERMINAL)
            assert turn["turn_status"] == "completed", turn["error"]
            # the end of the attempt: its session stored, nothing left here
            deadline = time.monotonic() + 10
            while (attempts / done_turn).exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not (attempts / done_turn).exists()
            lost_task, lost_turn = submit(c, slow, "Work slowly")
            deadline = time.monotonic() + 60
            while not host_pids(marker):
                assert time.monotonic() < deadline, "the slow command never started"
                time.sleep(0.05)
            # an overlay workspace: the merged view only in the sandbox's mount namespace
            assert overlay.unavailable() is None, overlay.unavailable()
            assert (attempts / lost_turn / overlay.LOWER / "slow").is_file()
            assert list((attempts / lost_turn / "workspace").iterdir()) == []
    finally:
        stop(first, signal.SIGKILL)
    assert wait_gone(marker, 5) == []
    assert (attempts / lost_turn / overlay.UPPER).is_dir()  # what the crash left: no mount
    assert str(attempts) not in Path("/proc/self/mountinfo").read_text()

    second = start_live_server(data, env)
    try:
        with client(second, token) as c:
            lost = wait_turn(c, lost_task, lambda t: t["turn_status"] in TERMINAL)
            assert lost["turn_status"] == "failed"
            assert lost["error"]["code"] == "executor_lost"
            deadline = time.monotonic() + 10
            while (attempts / lost_turn).exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not (attempts / lost_turn).exists()
            # the completed attempt's follow-up resumes its conversation
            before = len(scripted_model.requests)
            r = c.post(
                "tasks",
                json={
                    "follow_up": {"task_id": done_task, "turn_id": done_turn},
                    "input_items": [
                        {
                            "type": "message",
                            "role": "user",
                            "content": [{"content_type": "text", "text": "And now?"}],
                        }
                    ],
                },
            )
            assert r.status_code == 200, r.text
            follow_turn = r.json()["turn"]["id"]
            turn = wait_turn(
                c, done_task, lambda t: t["id"] == follow_turn and t["turn_status"] in TERMINAL
            )
            assert turn["turn_status"] == "completed", turn["error"]
            resumed = json.dumps(scripted_model.requests[before:])
            assert "Remember the word pelican" in resumed and "And now?" in resumed
    finally:
        stop(second)
    left = sorted(n for n in os.listdir(attempts) if not n.startswith("."))  # not standbys
    assert left == []  # their sessions are stored
