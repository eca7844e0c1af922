"""Task actions that run or copy attempts, through the API with the real agent: ``recover``
(a failed attempt runs again), ``fork`` (a new task from a chosen attempt, which follow-ups
continue on their own) and ``delete`` (the attempts' files go with the task)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

from conftest import Server, completed_task, diff_of, parse_sse, wait_for_task, wait_stored
from support.scripted_model import Fail, Patch, Say, ScriptedModel

FIX = """\
*** Begin Patch
*** Update File: calc.py
@@
 def add(a, b):
-    return a - b
+    return a + b
*** End Patch"""
NOTE = """\
*** Begin Patch
*** Add File: NOTES.md
+forked
*** End Patch"""


def test_recover_runs_a_failed_attempt_again(
    engine_server: Server, scripted_model: ScriptedModel, repo: Path
) -> None:
    api = engine_server.api
    scripted_model.script = [Fail(message="upstream broke")]
    env = api.create_env(repo)
    created = api.create_task(env["id"], "Fix add")
    task_id, turn_id = created["task"]["id"], created["turn"]["id"]
    failed = wait_for_task(api, task_id)["current_assistant_turn"]
    assert failed["turn_status"] == "failed"
    used = api.get("tasks/rate_limit").json()["remaining"]

    scripted_model.script = [Patch(FIX), Say("Fixed add.")]
    r = api.post(f"tasks/{task_id}/recover")
    assert r.status_code == 200 and r.json() == {"success": True}
    details = wait_for_task(api, task_id)
    turn = details["current_assistant_turn"]
    assert turn["id"] == turn_id and turn["turn_status"] == "completed", turn["error"]
    assert turn["error"] is None and "+    return a + b" in diff_of(details)
    assert api.get("tasks/rate_limit").json()["remaining"] == used - 1  # counted
    # the stream of the recovered attempt shows the new run to its end, with the note
    frames = parse_sse(api.get(f"tasks/{task_id}/turns/{turn_id}/stream").text)
    ends = [
        f["data"]["payload"]["turn_status"]
        for f in frames
        if f["data"]["item_type"] == "task_turn_event"
        and f["data"]["payload"]["turn_status"] in ("completed", "failed")
    ]
    assert ends == ["completed"]
    notes = [f["data"]["payload"].get("text") for f in frames if f["data"]["item_type"] == "log"]
    assert "Recovered: this attempt runs again from the start" in notes

    # nothing left to recover
    r = api.post(f"tasks/{task_id}/recover")
    assert r.status_code == 409 and "Nothing to recover" in r.json()["detail"]
    assert api.post("tasks/task_e_nope/recover").status_code == 404


def test_fork_starts_a_new_task_from_a_chosen_attempt(
    engine_server: Server, scripted_model: ScriptedModel, repo: Path
) -> None:
    api = engine_server.api
    env = api.create_env(repo)
    task_id, turn_id, original = completed_task(
        api, scripted_model, env["id"], "Fix add", [Patch(FIX), Say("Fixed add.")]
    )

    r = api.post(f"tasks/{task_id}/fork", json={"turn_id": turn_id})
    assert r.status_code == 200, r.text
    forked = r.json()
    new_id = forked["task"]["id"]
    assert new_id != task_id and forked["task"]["title"] == original["task"]["title"]
    copy = forked["current_assistant_turn"]
    assert copy["id"] != turn_id and copy["turn_status"] == "completed"
    assert copy["output_items"] == original["current_assistant_turn"]["output_items"]
    assert diff_of(forked) == diff_of(original)
    assert (
        forked["current_user_turn"]["input_items"] == original["current_user_turn"]["input_items"]
    )
    ids = {t["id"] for t in api.get("tasks/list").json()["items"]}
    assert {task_id, new_id} <= ids

    # a follow-up of the fork continues its conversation and tree; the original is untouched
    scripted_model.requests.clear()
    scripted_model.script = [Say("(not reached)"), Patch(NOTE), Say("Noted.")]
    follow = api.follow_up(new_id, copy["id"], "Add a note")
    details = wait_for_task(api, new_id)
    assert details["current_assistant_turn"]["turn_status"] == "completed", details[
        "current_assistant_turn"
    ]["error"]
    assert details["current_assistant_turn"]["id"] == follow["turn"]["id"]
    diff = diff_of(details)
    assert "+    return a + b" in diff and "+forked" in diff
    history = str(scripted_model.requests[0]["input"])
    assert "Fix add" in history and "Add a note" in history  # the whole conversation
    again = api.get(f"tasks/{task_id}").json()
    assert again["task"]["denormalized_metadata"]["num_follow_ups"] == 0
    assert again["current_assistant_turn"]["id"] == turn_id

    # bad requests
    user_turn = original["current_user_turn"]["id"]
    assert api.post(f"tasks/{task_id}/fork", json={"turn_id": user_turn}).status_code == 400
    assert api.post(f"tasks/{task_id}/fork", json={"turn_id": "nope"}).status_code == 404
    assert api.post(f"tasks/{task_id}/fork", json=[1]).status_code == 400
    other = api.as_(engine_server.other_account_token())
    assert other.post(f"tasks/{task_id}/fork", json={}).status_code == 404


def test_deleting_a_task_removes_its_attempts_files(
    engine_server: Server, scripted_model: ScriptedModel, repo: Path
) -> None:
    api = engine_server.api
    env = api.create_env(repo)
    task_id, turn_id, _ = completed_task(
        api, scripted_model, env["id"], "Fix add", [Patch(FIX), Say("Fixed add.")]
    )
    attempt_dir = engine_server.app_state.settings.resolved_data_dir / "attempts" / turn_id
    wait_stored(engine_server, turn_id)  # its files here are gone; its session is stored
    assert api.delete(f"tasks/{task_id}").status_code == 200
    assert not attempt_dir.exists()
    assert engine_server.app_state.artifacts.present([turn_id], "codex-home") == set()
    assert api.get(f"tasks/{task_id}").status_code == 404


def _members(archive: bytes) -> dict[str, int]:
    """The files of a stored Codex home (a tar) and their sizes."""
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        return {m.name: m.size for m in tar if m.isreg()}


def test_a_finished_attempt_keeps_little_and_its_follow_up_and_fork_still_resume(
    engine_server: Server, scripted_model: ScriptedModel, repo: Path
) -> None:
    """Issue 20: a completed attempt kept 1.43 MB (its whole Codex home: a 569 KB sqlite WAL,
    400 KB of bundled skills Codex re-creates). What is kept (now its stored session; the
    diff and logs are in the database, and nothing stays in the attempt's directory) must be
    ≤ 150 KB and still resume in a follow-up and in a fork's follow-up."""
    api = engine_server.api
    env = api.create_env(repo)
    task_id, turn_id, _ = completed_task(
        api, scripted_model, env["id"], "Fix add, remember pelican", [Patch(FIX), Say("Fixed.")]
    )
    store = engine_server.app_state.artifacts
    kept = wait_stored(engine_server, turn_id)
    files = _members(kept)
    assert any(name.startswith("sessions/") and "rollout-" in name for name in files), files
    assert len(kept) <= 150_000, sorted((size, name) for name, size in files.items())

    r = api.post(f"tasks/{task_id}/fork", json={"turn_id": turn_id})
    assert r.status_code == 200, r.text
    fork_id, fork_turn = r.json()["task"]["id"], r.json()["current_assistant_turn"]["id"]
    assert store.get(fork_turn, "codex-home") == kept
    for task, turn, prompt in ((task_id, turn_id, "And now?"), (fork_id, fork_turn, "Fork?")):
        scripted_model.requests.clear()
        scripted_model.script = [Say(f"Answered {prompt}")]
        follow = api.follow_up(task, turn, prompt)
        details = wait_for_task(api, task)
        current = details["current_assistant_turn"]
        assert current["id"] == follow["turn"]["id"]
        assert current["turn_status"] == "completed", current["error"]
        history = str(scripted_model.requests[0]["input"])
        assert "remember pelican" in history and prompt in history  # resumed, not restarted
        assert len(wait_stored(engine_server, current["id"])) <= 150_000
