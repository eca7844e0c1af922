"""Tasks run for real through the API: the engine, the sandbox, the Codex CLI and the gateway.

The scripted model is the only replaced service: it makes the real Codex binary run real
commands and edits in a bubblewrap sandbox. Each test submits tasks through the API and checks
what a client sees: statuses and status lines, the work log, the diff, the SSE frames.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import (
    CODEX_MODEL,
    Api,
    Server,
    engine_settings,
    git,
    make_repo,
    make_server,
    parse_sse,
    wait_for_task,
    wait_for_turn,
    wait_stored,
)
from openwham.engine import titles as engine_titles
from openwham.engine.titles import clean_model_title, derived_title
from openwham.runtimes.codex import ASK_MODE_INSTRUCTIONS, NO_NETWORK_NOTE
from openwham.sandbox import overlay
from openwham.service.text import MAX_TITLE_CHARS
from openwham.store import models as m
from support.procs import host_pids
from support.scripted_model import Fail, Patch, Say, ScriptedModel, Shell

FIX = """\
*** Begin Patch
*** Update File: calc.py
@@
 def add(a, b):
-    return a - b
+    return a + b
*** Add File: NOTES.md
+Fixed add().
*** End Patch"""
ANSWER = "Fixed `add`: it subtracted. The test passes now."
TEST_FILE = (
    "import unittest\n\nfrom calc import add\n\n\n"
    "class AddTest(unittest.TestCase):\n"
    "    def test_add(self):\n"
    "        self.assertEqual(add(2, 3), 5)\n"
)


@pytest.fixture
def calc_repo(tmp_path: Path) -> Path:
    """A repository whose test fails: ``add`` subtracts; plus files to delete and rename."""
    path = make_repo(tmp_path / "calc")
    (path / "test_calc.py").write_text(TEST_FILE)
    (path / ".gitignore").write_text("__pycache__/\n")
    (path / "old.txt").write_text("obsolete\n")
    git("add", ".", cwd=path)
    git("commit", "-q", "-m", "tests", cwd=path)
    return path


def fix_script() -> list[Any]:
    return [
        Shell("python3 -B -m unittest -q test_calc 2>&1; echo exit=$?"),
        Patch(FIX),
        Shell(
            "git rm -q old.txt && git mv README.md README.rst && printf 'bin\\000ary' > data.bin"
            " && python3 -B -m unittest -q test_calc 2>&1"
        ),
        Say(ANSWER),
    ]


def stream(api: Api, task_id: str, turn_id: str, **kw: Any) -> list[dict[str, Any]]:
    r = api.get(f"tasks/{task_id}/turns/{turn_id}/stream", **kw)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    return parse_sse(r.text)


def statuses(frames: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [
        (f["data"]["payload"]["text"], f["data"]["payload"]["turn_status"])
        for f in frames
        if f["data"]["item_type"] == "task_turn_event"
    ]


def commands(turn: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(command, output message) pairs of the work log (output ``{}`` while it runs)."""
    messages = turn["worklog"]["messages"]
    out = []
    for i, msg in enumerate(messages):
        if msg.get("recipient") == "container.exec":
            following = messages[i + 1] if i + 1 < len(messages) else {}
            output = following if following.get("author", {}).get("role") == "tool" else {}
            out.append((json.loads(msg["content"]["text"])["cmd"], output))
    return out


# =========================================================================== the whole path


@pytest.fixture
def any_engine_server(
    tmp_path: Path, database_url: str, scripted_model: ScriptedModel
) -> Iterator[Server]:
    """A server that runs attempts, once on SQLite and once on PostgreSQL."""
    yield from make_server(tmp_path, database_url, **engine_settings(scripted_model))


def test_a_task_runs_to_completed_with_diff_work_log_and_events(
    any_engine_server: Server, scripted_model: ScriptedModel, calc_repo: Path, tmp_path: Path
) -> None:
    api = any_engine_server.api
    scripted_model.script = fix_script()
    scripted_model.title = Say('"Fix add() so the unit test passes."')
    env = api.create_env(calc_repo)
    created = api.create_task(env["id"], "Please fix the failing test. `add` looks wrong.")
    task_id, turn_id = created["task"]["id"], created["turn"]["id"]
    assert created["turn"]["turn_status"] == "pending"

    details = wait_for_task(api, task_id)
    turn = details["current_assistant_turn"]
    assert turn["turn_status"] == "completed", turn["error"]
    assert turn["error"] is None
    assert turn["latest_event"]["text"] == "Completed"
    head = git("rev-parse", "HEAD", cwd=calc_repo).strip()
    assert turn["base_commit_sha"] == head

    # the answer and the diff, where `codex cloud diff/apply` and `codex apply` look
    message, pr = turn["output_items"]
    assert message == {
        "type": "message",
        "role": "assistant",
        "content": [{"content_type": "text", "text": ANSWER}],
    }
    assert pr["type"] == "pr" and pr["pr_message"] == ANSWER
    assert details["current_diff_task_turn"]["id"] == turn_id
    diff = pr["output_diff"]["diff"]
    assert pr["output_diff"]["base_commit_sha"] == head
    assert "-    return a - b\n+    return a + b" in diff
    assert "diff --git a/NOTES.md b/NOTES.md\nnew file mode 100644" in diff
    assert "diff --git a/old.txt b/old.txt\ndeleted file mode 100644" in diff
    assert "rename from README.md\nrename to README.rst" in diff
    assert "diff --git a/data.bin b/data.bin" in diff and "GIT binary patch" in diff
    assert "__pycache__" not in diff
    stats = {k: pr["output_diff"][k] for k in ("files_modified", "lines_added", "lines_removed")}
    assert stats == {"files_modified": 5, "lines_added": 2, "lines_removed": 2}
    display = details["task"]["task_status_display"]["latest_turn_status_display"]
    assert display["turn_status"] == "completed" and display["diff_stats"] == stats
    assert details["task"]["denormalized_metadata"]["diff_stats"] == stats

    # the diff applies to a fresh clone of the base commit
    fresh = tmp_path / "fresh"
    git("clone", "-q", str(calc_repo), str(fresh), cwd=tmp_path)
    (fresh / ".." / "change.diff").resolve().write_text(diff)
    git("apply", "--index", str((fresh / ".." / "change.diff").resolve()), cwd=fresh)
    assert (fresh / "calc.py").read_text() == "def add(a, b):\n    return a + b\n"
    assert (fresh / "data.bin").read_bytes() == b"bin\0ary"
    assert not (fresh / "old.txt").exists() and (fresh / "README.rst").exists()

    # the title came from the model (quotes and final period dropped), asked once with the
    # prompt, through the gateway with the task's model and the real key
    assert details["task"]["title"] == "Fix add() so the unit test passes"
    (asked,) = scripted_model.title_requests
    assert asked["model"] == CODEX_MODEL and asked["stream"] is True
    assert "Please fix the failing test. `add` looks wrong." in json.dumps(asked["input"])
    assert details["task"]["has_generated_title"] is True
    assert details["task"]["has_unread_turn"] is True

    # the work log: prompt, failing run, edit, passing run, answer
    messages = turn["worklog"]["messages"]
    assert messages[0]["author"]["role"] == "user"
    (first, failing), (_, passing) = commands(turn)
    assert first.startswith("python3 -B -m unittest")
    assert "AssertionError: -1 != 5" in failing["content"]["parts"][0]
    assert "exit=1" in failing["content"]["parts"][0]
    assert passing["status"] == "finished_successfully" and "OK" in passing["content"]["parts"][0]
    edits = [msg for msg in messages if msg.get("recipient") == "apply_patch"]
    assert sorted(edits[0]["content"]["text"].splitlines()) == ["A NOTES.md", "M calc.py"]
    # the answer is the turn's message item, not in the work log too (the official client
    # shows both: it would read it twice)
    (answer_item,) = [i for i in turn["output_items"] if i["type"] == "message"]
    assert answer_item["content"] == [{"content_type": "text", "text": ANSWER}]
    assert all(ANSWER not in json.dumps(msg) for msg in messages)

    # the events, replayed: ordered ids, status lines, title, every work-log message
    frames = stream(api, task_id, turn_id)
    ids = [int(f["id"]) for f in frames]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    for f in frames:
        data = f["data"]
        assert f["event"] == "message" and data["id"] == f["id"]
        assert data["payload"] == data[data["item_type"]]
        assert isinstance(data["timestamp"], float)
    lines = statuses(frames)
    assert lines[0] == ("Setting up", "in_progress")
    assert lines[-1] == ("Completed", "completed")
    texts = [t for t, _ in lines]
    assert texts.index("Working") < texts.index("Completing the task") < len(texts) - 1
    assert any(t.startswith("Running python3 -B -m unittest") for t in texts)
    assert "Editing NOTES.md and 1 other file" in texts
    (title,) = [
        f["data"]["payload"] for f in frames if f["data"]["item_type"] == "task_title_generated"
    ]
    assert title["title"] == "Fix add() so the unit test passes"
    latest: dict[str, Any] = {}
    for f in frames:
        if f["data"]["item_type"] == "work_log_message":
            latest[f["data"]["payload"]["id"]] = f["data"]["payload"]
    # the stream has every work-log message, then the answer (marked final)
    *steps, answer = latest.values()
    assert steps == messages
    assert (answer["content"]["parts"], answer["channel"]) == ([ANSWER], "final")
    assert frames[-1]["data"]["payload"]["turn_status"] == "completed"  # ends at the terminal

    # the model: the gateway pinned the model and injected the real key; usage is metered
    assert {body["model"] for body in scripted_model.requests} == {CODEX_MODEL}
    assert all(
        h["authorization"] == "Bearer sk-upstream-secret-key" for h in scripted_model.headers
    )
    # the gateway metered the attempt's usage
    with any_engine_server.app_state.db.session() as s:
        row = s.get(m.Turn, turn_id)
        assert row is not None
        usage = row.body["run"]["usage"]
    assert usage["requests"] == usage["responses"] == 4
    assert usage["input_tokens"] == 400 and usage["output_tokens"] == 80
    # ... and the title request's, recorded on the attempt beside it
    title_usage = row.body["run"]["title_usage"]
    assert title_usage["requests"] == title_usage["responses"] == 1
    assert title_usage["input_tokens"] == 100 and title_usage["total_tokens"] == 120
    # the attempt's files go once Codex has closed down (the attempt completes as soon as
    # its result is in, meanwhile); its Codex session is stored for follow-ups
    assert b"sessions/" in wait_stored(any_engine_server, turn_id)


def test_stream_resumes_after_last_event_id_and_filters_item_types(
    engine_server: Server, scripted_model: ScriptedModel, calc_repo: Path
) -> None:
    api = engine_server.api
    scripted_model.script = [Shell("echo hello"), Say("Done.")]
    env = api.create_env(calc_repo)
    created = api.create_task(env["id"], "Say hello")
    task_id, turn_id = created["task"]["id"], created["turn"]["id"]
    wait_for_task(api, task_id)

    everything = stream(api, task_id, turn_id)
    middle = everything[len(everything) // 2]["id"]
    rest = stream(api, task_id, turn_id, headers={"Last-Event-ID": middle})
    assert [f["id"] for f in rest] == [f["id"] for f in everything if int(f["id"]) > int(middle)]
    by_query = api.post(f"tasks/{task_id}/turns/{turn_id}/stream?last_event_id={middle}")
    assert [f["id"] for f in parse_sse(by_query.text)] == [f["id"] for f in rest]
    # reconnecting after the end: nothing more, and the stream ends at once
    started = time.monotonic()
    assert stream(api, task_id, turn_id, headers={"Last-Event-ID": everything[-1]["id"]}) == []
    assert time.monotonic() - started < 2
    only = stream(api, task_id, turn_id, params={"item_type": ["task_turn_event"]})
    assert {f["data"]["item_type"] for f in only} == {"task_turn_event"}
    assert statuses(only) == statuses(everything)
    two = stream(api, task_id, turn_id, params={"item_type": ["log", "task_title_generated"]})
    assert {f["data"]["item_type"] for f in two} == {"task_title_generated"}

    # bad input: 400 with a reason; other accounts: 404
    for params, headers in (
        ({"item_type": "nope"}, {}),
        ({}, {"Last-Event-ID": "abc"}),
        ({"last_event_id": "-1"}, {}),
    ):
        r = api.get(f"tasks/{task_id}/turns/{turn_id}/stream", params=params, headers=headers)
        assert r.status_code == 400 and r.json()["detail"], r.text
    other = api.as_(engine_server.other_account_token())
    assert other.get(f"tasks/{task_id}/turns/{turn_id}/stream").status_code == 404
    assert api.get(f"tasks/{task_id}/turns/nope/stream").status_code == 404
    assert api.as_(None).get(f"tasks/{task_id}/turns/{turn_id}/stream").status_code == 401


# =========================================================================== modes and options


def test_the_diff_is_computed_anew_when_the_agent_went_on_after_its_last_response(
    engine_server: Server,
    scripted_model: ScriptedModel,
    calc_repo: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The launcher's diff starts when a turn-ending response goes through the gateway. Codex
    asks the model again only after a tool call, so the case where it went on anyway cannot
    be produced with the real binary: the gateway is made to report it. The attempt then
    waits for the sandbox to end and computes the diff in a sandbox of its own."""
    runner = engine_server.app_state.runner
    assert runner is not None and runner.engine is not None
    assert runner.engine.gateway is not None
    monkeypatch.setattr(runner.engine.gateway, "continued_after_final", lambda attempt: True)
    scripted_model.script = fix_script()
    api = engine_server.api
    env = api.create_env(calc_repo)
    created = api.create_task(env["id"], "Please fix the failing test.")
    with caplog.at_level("WARNING", logger="openwham.engine.result"):
        details = wait_for_task(api, created["task"]["id"])
    turn = details["current_assistant_turn"]
    assert turn["turn_status"] == "completed", turn["error"]
    assert "went on after its diff" in caplog.text
    diff = turn["output_items"][1]["output_diff"]["diff"]
    assert "-    return a - b\n+    return a + b" in diff
    assert "rename from README.md\nrename to README.rst" in diff and "GIT binary patch" in diff


def test_follow_ups_continue_the_conversation_and_the_tree(
    engine_server: Server, scripted_model: ScriptedModel, calc_repo: Path
) -> None:
    """A follow-up resumes the chosen attempt's Codex session (the model sees the whole
    conversation) in a workspace holding that attempt's change on the task's original base
    (even when the branch moved since); its diff is against that base, so it shows the
    whole change. An Ask-mode follow-up changes nothing: the next one starts from the tree
    the Ask attempt had."""
    api = engine_server.api
    env = api.create_env(calc_repo)
    scripted_model.script = fix_script()
    created = api.create_task(env["id"], "Please fix the failing test.")
    task_id = created["task"]["id"]
    first = wait_for_task(api, task_id)["current_assistant_turn"]
    assert first["turn_status"] == "completed", first["error"]
    base = first["base_commit_sha"]
    (calc_repo / "LATER.md").write_text("pushed after the task started\n")
    git("add", "LATER.md", cwd=calc_repo)
    git("commit", "-q", "-m", "later", cwd=calc_repo)

    # 1. a code follow-up: the script index counts the tool outputs in the request, and the
    # resumed conversation brings the first attempt's three
    skip = [Say("(not reached)")] * 3
    scripted_model.requests.clear()
    scripted_model.script = [
        *skip,
        Shell(
            "cat NOTES.md; test -e old.txt || echo no-old.txt; test -e LATER.md || echo no-later"
        ),
        Patch(
            "*** Begin Patch\n*** Update File: NOTES.md\n@@\n Fixed add().\n+Then more.\n"
            "*** End Patch"
        ),
        Say("Added a line to the notes."),
    ]
    out = api.follow_up(task_id, first["id"], "Now add a second line to NOTES.md.")
    second = wait_for_task(api, task_id)["current_assistant_turn"]
    assert second["id"] == out["turn"]["id"] and second["turn_status"] == "completed", second
    history = json.dumps(scripted_model.requests[0]["input"])
    assert "Please fix the failing test." in history and json.dumps(ANSWER)[1:-1] in history
    assert "Now add a second line to NOTES.md." in history
    _, shown = commands(second)[0]
    text = shown["content"]["parts"][0]
    assert "Fixed add()." in text and "no-old.txt" in text and "no-later" in text
    assert second["base_commit_sha"] == base
    diff = second["output_items"][1]["output_diff"]["diff"]
    assert "-    return a - b\n+    return a + b" in diff  # the first attempt's change too
    assert "+Fixed add().\n+Then more." in diff and "rename to README.rst" in diff
    assert "LATER.md" not in diff

    # 2. an Ask-mode follow-up of it: an answer, no diff
    scripted_model.script = [*skip, Say("(no)"), Say("(no)"), Shell("cat NOTES.md"), Say("Two.")]
    api.follow_up(task_id, second["id"], "How many lines?", run_environment_in_qa_mode=True)
    third = wait_for_task(api, task_id)["current_assistant_turn"]
    assert third["turn_status"] == "completed", third["error"]
    assert [i["type"] for i in third["output_items"]] == ["message"]

    # 3. a code follow-up of the Ask attempt starts from the tree it had
    scripted_model.script = [*skip, *[Say("(no)")] * 3, Shell("cat NOTES.md"), Say("Same.")]
    api.follow_up(task_id, third["id"], "Show the notes again.")
    fourth = wait_for_task(api, task_id)["current_assistant_turn"]
    assert fourth["turn_status"] == "completed", fourth["error"]
    ((_, shown),) = commands(fourth)
    assert "Fixed add().\nThen more." in shown["content"]["parts"][0]
    assert fourth["output_items"][1]["output_diff"]["diff"] == diff
    details = api.get(f"tasks/{task_id}").json()
    assert details["task"]["denormalized_metadata"]["num_follow_ups"] == 3
    # the workspaces were overlays over a checkout of the task's base commit (the branch
    # moved meanwhile: standbys at its head have one of their own), each made once
    assert overlay.unavailable() is None, overlay.unavailable()
    checkouts = engine_server.app_state.settings.resolved_data_dir / "checkouts"
    made = sorted(p.parent.name.split(".")[0] for p in checkouts.glob("*/*/ready"))
    assert base in made and len(made) == len(set(made)) <= 2, made


def test_ask_mode_answers_without_a_diff(
    engine_server: Server, scripted_model: ScriptedModel, calc_repo: Path
) -> None:
    api = engine_server.api
    scripted_model.script = [
        Shell("cat calc.py; echo changed > calc.py; echo status=$?"),
        Patch(FIX),
        Say("`add` returns `a - b`; it should return `a + b`."),
    ]
    env = api.create_env(calc_repo)
    created = api.create_task(
        env["id"], "Why does test_add fail?", new_task={"run_environment_in_qa_mode": True}
    )
    details = wait_for_task(api, created["task"]["id"])
    turn = details["current_assistant_turn"]
    assert turn["turn_status"] == "completed", turn["error"]
    assert [i["type"] for i in turn["output_items"]] == ["message"]
    assert details["current_diff_task_turn"] is None
    ((_, output),) = commands(turn)
    text = output["content"]["parts"][0]
    assert "return a - b" in text and "Read-only file system" in text and "status=1" in text
    patch_results = [
        msg for msg in turn["worklog"]["messages"] if msg["author"].get("name") == "apply_patch"
    ]
    assert patch_results and patch_results[0]["status"] == "failed"
    developer = json.dumps(scripted_model.requests[0]["input"])
    assert json.dumps(ASK_MODE_INSTRUCTIONS)[1:-1] in developer


def test_model_effort_and_custom_instructions_reach_the_agent(
    engine_server: Server, scripted_model: ScriptedModel, calc_repo: Path
) -> None:
    api = engine_server.api
    instructions = 'Always answer in French 🇫🇷 and quote "exactly".'
    r = api.patch("settings/user", json={"custom_instructions": instructions})
    assert r.status_code == 200, r.text
    scripted_model.script = [Say("Bonjour.")]
    env = api.create_env(calc_repo)
    created = api.create_task(
        env["id"], "Hello", new_task={"model": "gpt-5.5-mini", "reasoning_effort": "high"}
    )
    details = wait_for_task(api, created["task"]["id"])
    assert details["current_assistant_turn"]["turn_status"] == "completed"
    (body,) = scripted_model.requests
    assert body["model"] == "gpt-5.5-mini"
    assert body["reasoning"]["effort"] == "high"
    developer = [
        part["text"]
        for entry in body["input"]
        if entry.get("role") == "developer"
        for part in entry["content"]
    ]
    assert f"{instructions}\n\n{NO_NETWORK_NOTE}" in developer


def test_best_of_n_runs_every_attempt(
    engine_server: Server, scripted_model: ScriptedModel, calc_repo: Path
) -> None:
    """Three attempts, each in its own sandbox and workspace (each writes a random id into
    its diff), each with its own result; the task shows attempt 0 and counts three. They
    share one of the executor's two slots, none waits for another."""
    api = engine_server.api
    scripted_model.script = [
        Patch(FIX),
        Shell("cat /proc/sys/kernel/random/uuid > attempt-id.txt; cat attempt-id.txt"),
        Say(ANSWER),
    ]
    env = api.create_env(calc_repo)
    created = api.create_task(env["id"], "Fix it", metadata={"best_of_n": 3})
    task_id = created["task"]["id"]
    details = wait_for_task(api, task_id)
    primary = details["current_assistant_turn"]
    assert primary["id"] == created["turn"]["id"] and primary["attempt_placement"] == 0
    siblings = api.get(f"tasks/{task_id}/turns/{primary['id']}/sibling_turns").json()
    others = siblings["sibling_turns"]
    ids = set()
    waited = 0
    for turn in [primary, *others]:
        turn = wait_for_turn(api, task_id, turn["id"])
        assert turn["turn_status"] == "completed", turn["error"]
        message, pr = turn["output_items"]
        assert message["content"][0]["text"] == ANSWER
        diff = pr["output_diff"]["diff"]
        assert pr["type"] == "pr" and "+    return a + b" in diff
        (line,) = [x for x in diff.splitlines() if x.startswith("+") and len(x) == 37]
        ids.add(line)
        (_, output), *_ = [c for c in commands(turn) if "attempt-id" in c[0]]
        assert output["content"]["parts"][0].strip() == line[1:]  # its own work log
        waited += ("Waiting", "pending") in statuses(stream(api, task_id, turn["id"]))
        everyone = {t["id"] for t in [primary, *others]}
        assert set(turn["sibling_turn_ids"]) == everyone - {turn["id"]}
    assert len(ids) == 3  # three workspaces
    assert waited == 0  # one slot for the task's three attempts: none queued behind another
    assert sorted(t["attempt_placement"] for t in [primary, *others]) == [0, 1, 2]
    display = api.get(f"tasks/{task_id}").json()["task"]["task_status_display"]
    latest = display["latest_turn_status_display"]
    assert latest["turn_id"] == primary["id"] and len(latest["sibling_turn_ids"]) == 2
    assert len(scripted_model.requests) == 3 * 3


# =========================================================================== inputs that fail


def test_pre_apply_patch_is_applied_first(
    engine_server: Server, scripted_model: ScriptedModel, calc_repo: Path
) -> None:
    api = engine_server.api
    scripted_model.script = [Shell("cat calc.py"), Say("Seen.")]
    env = api.create_env(calc_repo)
    starting = (
        "diff --git a/calc.py b/calc.py\n--- a/calc.py\n+++ b/calc.py\n@@ -1,2 +1,2 @@\n"
        " def add(a, b):\n-    return a - b\n+    return b - a\n"
    )
    created = api.create_task(
        env["id"],
        "Look",
        input_items=[
            {
                "type": "message",
                "role": "user",
                "content": [{"content_type": "text", "text": "Look"}],
            },
            {"type": "pre_apply_patch", "output_diff": {"diff": starting}},
        ],
    )
    details = wait_for_task(api, created["task"]["id"])
    turn = details["current_assistant_turn"]
    assert turn["turn_status"] == "completed", turn["error"]
    ((_, output),) = commands(turn)
    assert "return b - a" in output["content"]["parts"][0]
    # the task's diff includes the starting diff: it is against the branch's base
    pr = turn["output_items"][-1]
    assert "+    return b - a" in pr["output_diff"]["diff"]


def test_a_starting_diff_that_does_not_apply_fails_the_attempt(
    engine_server: Server, scripted_model: ScriptedModel, calc_repo: Path
) -> None:
    api = engine_server.api
    env = api.create_env(calc_repo)
    bad = (
        "diff --git a/calc.py b/calc.py\n--- a/calc.py\n+++ b/calc.py\n@@ -1,2 +1,2 @@\n"
        " def mul(a, b):\n-    return a / b\n+    return a * b\n"
    )
    created = api.create_task(
        env["id"],
        "x",
        input_items=[
            {"type": "message", "role": "user", "content": [{"content_type": "text", "text": "x"}]},
            {"type": "pre_apply_patch", "output_diff": {"diff": bad}},
        ],
    )
    turn = wait_for_task(api, created["task"]["id"])["current_assistant_turn"]
    assert turn["turn_status"] == "failed"
    assert turn["error"]["code"] == "failed_to_apply_patch_error"
    assert "does not apply" in turn["error"]["message"] and "calc.py" in turn["error"]["message"]
    assert turn["latest_event"]["text"] == "Failed"
    assert scripted_model.requests == []  # the agent never started


def test_a_model_failure_fails_the_attempt_and_keeps_the_work_log(
    engine_server: Server, scripted_model: ScriptedModel, calc_repo: Path
) -> None:
    api = engine_server.api
    scripted_model.script = [Shell("echo one"), Fail("server_error", "the model broke")]
    env = api.create_env(calc_repo)
    created = api.create_task(env["id"], "Do something")
    task_id, turn_id = created["task"]["id"], created["turn"]["id"]
    turn = wait_for_task(api, task_id)["current_assistant_turn"]
    assert turn["turn_status"] == "failed"
    assert turn["error"]["code"] == "model_error"
    assert "the model broke" in turn["error"]["message"]
    ((_, output),) = commands(turn)
    assert output["content"]["parts"] == ["one\n"]
    final = statuses(stream(api, task_id, turn_id))[-1]
    assert final == ("Failed", "failed")


def test_an_unconfigured_upstream_fails_attempts_naming_the_setting(
    tmp_path: Path, sqlite_url: str, scripted_model: ScriptedModel, calc_repo: Path
) -> None:
    settings = engine_settings(scripted_model, model_provider="openai", model_api_key=None)
    for server in make_server(tmp_path, sqlite_url, **settings):
        env = server.api.create_env(calc_repo)
        created = server.api.create_task(env["id"], "Hi")
        turn = wait_for_task(server.api, created["task"]["id"])["current_assistant_turn"]
        assert turn["turn_status"] == "failed"
        assert turn["error"]["code"] == "model_config_error"
        assert "WHAM_MODEL_API_KEY" in turn["error"]["message"]


def test_a_server_without_bubblewrap_refuses_tasks(
    tmp_path: Path,
    sqlite_url: str,
    scripted_model: ScriptedModel,
    calc_repo: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import shutil

    from openwham.sandbox import bwrap

    real_which = shutil.which
    monkeypatch.setattr(
        bwrap.shutil, "which", lambda name, *a, **k: None if name == "bwrap" else real_which(name)
    )
    for server in make_server(tmp_path, sqlite_url, **engine_settings(scripted_model)):
        env = server.api.create_env(calc_repo)
        r = server.api.post(
            "tasks",
            json={
                "new_task": {"environment_id": env["id"]},
                "input_items": [
                    {
                        "type": "message",
                        "role": "user",
                        "content": [{"content_type": "text", "text": "x"}],
                    }
                ],
            },
        )
        assert r.status_code == 503
        assert (
            "bubblewrap" in r.json()["detail"]
            and "apt-get install bubblewrap" in r.json()["detail"]
        )
        assert server.api.get("tasks/list").json()["items"] == []


# =========================================================================== cancel


def sleeping_attempt(
    api: Api, model: ScriptedModel, repo: Path, marker: str, *before: Any
) -> tuple[str, str]:
    """A task whose agent runs ``before``'s steps, then a 300 s command carrying ``marker``;
    returns (task id, attempt id) once the command runs."""
    model.script = [*before, Shell(f"python3 -c 'import time; time.sleep(300)' {marker}")]
    env = api.create_env(repo)
    created = api.create_task(env["id"], "Wait")
    task_id, turn_id = created["task"]["id"], created["turn"]["id"]
    wait_for_turn(
        api,
        task_id,
        turn_id,
        until=lambda t: "time.sleep(300)" in (t["latest_event"] or {}).get("text", ""),
    )
    assert host_pids(marker)
    return task_id, turn_id


def test_cancel_stops_a_running_attempt_within_two_seconds(
    engine_server: Server, scripted_model: ScriptedModel, calc_repo: Path
) -> None:
    api = engine_server.api
    marker = f"marker-{time.time_ns()}"
    scripted_model.title_delay = 60.0  # the model's title is still to come at the cancel
    task_id, turn_id = sleeping_attempt(
        api, scripted_model, calc_repo, marker, Shell("echo started")
    )

    started = time.monotonic()
    assert api.post(f"tasks/{task_id}/cancel").status_code == 200
    turn = wait_for_turn(
        api, task_id, turn_id, until=lambda t: (t["latest_event"] or {}).get("text") == "Cancelled"
    )
    while host_pids(marker) and time.monotonic() - started < 5:
        time.sleep(0.02)
    elapsed = time.monotonic() - started
    assert not host_pids(marker)
    assert elapsed < 2.0, elapsed
    assert turn["turn_status"] == "cancelled"
    assert turn["error"]["code"] == "cancelled"
    # the work log so far is kept
    (first, echoed), (second, killed) = commands(turn)
    assert (first, echoed["content"]["parts"]) == ("echo started", ["started\n"])
    assert marker in second and killed == {}
    frames = stream(api, task_id, turn_id)
    assert statuses(frames)[-1] == ("Cancelled", "cancelled")
    # the cancel did not wait for the model's title: the prompt gave it, before the terminal
    kinds = [f["data"]["item_type"] for f in frames]
    assert kinds.count("task_title_generated") == 1
    assert kinds.index("task_title_generated") < len(kinds) - 1
    assert api.get(f"tasks/{task_id}").json()["task"]["title"] == "Wait"
    # the server keeps working, and cancelling again changes nothing
    assert api.post(f"tasks/{task_id}/cancel").status_code == 200
    assert (
        api.get(f"tasks/{task_id}").json()["current_assistant_turn"]["turn_status"] == "cancelled"
    )


def test_the_attempts_of_a_best_of_n_task_start_together_in_one_slot(
    tmp_path: Path, sqlite_url: str, scripted_model: ScriptedModel, calc_repo: Path
) -> None:
    """With one slot (``WHAM_EXECUTOR_CONCURRENCY=1``) a best-of-3 task's three agents all
    start and reach the model at once (its model holds them); a task posted meanwhile waits
    for the slot, shown "Waiting", and runs once all three ended."""
    settings = engine_settings(scripted_model, executor_concurrency=1)
    for server in make_server(tmp_path, sqlite_url, **settings):
        api = server.api
        scripted_model.script = [Say("done")]
        hold = scripted_model.hold = threading.Event()  # every agent request waits
        try:
            env = api.create_env(calc_repo)
            created = api.create_task(env["id"], "Three", metadata={"best_of_n": 3})
            task_id, first = created["task"]["id"], created["turn"]["id"]
            deadline = time.monotonic() + 60
            while len(scripted_model.requests) < 3:  # one slot per attempt: only one came
                assert time.monotonic() < deadline, f"{len(scripted_model.requests)} of 3 agents"
                time.sleep(0.05)
            later = api.create_task(env["id"], "Later")
            later_task, later_turn = later["task"]["id"], later["turn"]["id"]
            queued = wait_for_turn(
                api,
                later_task,
                later_turn,
                until=lambda t: (t["latest_event"] or {}).get("text") == "Waiting",
                timeout=30,
            )
            assert queued["turn_status"] == "pending"
            assert len(scripted_model.requests) == 3  # the slot is the best-of-3's
        finally:
            hold.set()
        siblings = api.get(f"tasks/{task_id}/turns/{first}/sibling_turns").json()
        for turn_id in [first, *(t["id"] for t in siblings["sibling_turns"])]:
            done = wait_for_turn(api, task_id, turn_id)
            assert done["turn_status"] == "completed", done["error"]
        done = wait_for_turn(api, later_task, later_turn)
        assert done["turn_status"] == "completed", done["error"]
        assert len(scripted_model.requests) == 4


def test_cancel_one_attempt_of_several_and_a_queued_one(
    tmp_path: Path, sqlite_url: str, scripted_model: ScriptedModel, calc_repo: Path
) -> None:
    settings = engine_settings(scripted_model, executor_concurrency=1)
    for server in make_server(tmp_path, sqlite_url, **settings):
        api = server.api
        scripted_model.script = [Shell("sleep 2"), Say("done")]
        env = api.create_env(calc_repo)
        created = api.create_task(env["id"], "Two", metadata={"best_of_n": 2})
        task_id, first = created["task"]["id"], created["turn"]["id"]
        (second,) = [
            t["id"]
            for t in api.get(f"tasks/{task_id}/turns/{first}/sibling_turns").json()["sibling_turns"]
        ]
        # one slot, the best-of-2's (both its attempts run): the next task waits in the
        # queue; cancel it there
        other = api.create_task(env["id"], "Queued")
        other_task, queued_id = other["task"]["id"], other["turn"]["id"]
        r = api.post(f"tasks/{other_task}/turns/{queued_id}/cancel")
        assert r.status_code == 200
        queued = api.get(f"tasks/{other_task}/turns/{queued_id}").json()["turn"]
        assert queued["turn_status"] == "cancelled"
        assert statuses(stream(api, other_task, queued_id)) == [
            ("Waiting", "pending"),
            ("Cancelled", "cancelled"),
        ]
        # and one of the two running attempts: the other goes on to complete
        wait_for_turn(api, task_id, second, until=lambda t: t["turn_status"] == "in_progress")
        assert api.post(f"tasks/{task_id}/turns/{second}/cancel").status_code == 200
        assert wait_for_turn(api, task_id, second)["turn_status"] == "cancelled"
        done = wait_for_turn(api, task_id, first)
        assert done["turn_status"] == "completed", done["error"]
        assert (
            api.get(f"tasks/{task_id}/turns/{second}").json()["turn"]["turn_status"] == "cancelled"
        )
        # a finished attempt stays finished; a user turn cannot be cancelled
        assert api.post(f"tasks/{task_id}/turns/{first}/cancel").status_code == 200
        assert (
            api.get(f"tasks/{task_id}/turns/{first}").json()["turn"]["turn_status"] == "completed"
        )
        user_turn = created["user_turn"]["id"]
        assert api.post(f"tasks/{task_id}/turns/{user_turn}/cancel").status_code == 400
        assert api.post(f"tasks/{task_id}/turns/nope/cancel").status_code == 404


# =========================================================================== recovery


def orphan(server: Server, turn_id: str, *, tries: int, owner: str) -> None:
    """Make an attempt look like a dead server left it ``in_progress``."""
    with server.app_state.db.session() as s:
        turn = s.get(m.Turn, turn_id)
        assert turn is not None
        body = dict(turn.body)
        body["run"] = {**body["run"], "tries": tries, "executor": owner}
        body["latest_event"] = {"created": time.time(), "text": "Working", "event_type": "info"}
        turn.body = body
        turn.turn_status = "in_progress"


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_attempts_left_by_a_dead_server_run_again_or_fail(
    tmp_path: Path, sqlite_url: str, scripted_model: ScriptedModel, calc_repo: Path
) -> None:
    import socket

    scripted_model.script = [Say("Recovered.")]
    owner = f"{socket.gethostname()}:{dead_pid()}:deadbeef"
    # a server that does not run tasks takes them; it "dies" with them in progress
    for server in make_server(tmp_path, sqlite_url, executor="none"):
        env = server.api.create_env(calc_repo)
        again = server.api.create_task(env["id"], "Once more")
        given_up = server.api.create_task(env["id"], "Too often")
        queued = server.api.create_task(env["id"], "Never started")
        orphan(server, again["turn"]["id"], tries=1, owner=owner)
        orphan(server, given_up["turn"]["id"], tries=2, owner=owner)
    # the next server finds them at once
    for server in make_server(tmp_path, sqlite_url, **engine_settings(scripted_model)):
        api = server.api
        turn = wait_for_task(api, again["task"]["id"])["current_assistant_turn"]
        assert turn["turn_status"] == "completed", turn["error"]
        assert turn["output_items"][0]["content"][0]["text"] == "Recovered."
        logs = [
            f["data"]["payload"]["text"]
            for f in stream(api, again["task"]["id"], again["turn"]["id"])
            if f["data"]["item_type"] == "log"
        ]
        assert logs == [
            "The server running this attempt stopped; starting it again from scratch (try 2 of 2)"
        ]
        failed = wait_for_task(api, given_up["task"]["id"])["current_assistant_turn"]
        assert failed["turn_status"] == "failed"
        assert failed["error"]["code"] == "executor_lost"
        assert "stopped 2 time(s)" in failed["error"]["message"]
        pending = wait_for_task(api, queued["task"]["id"])["current_assistant_turn"]
        assert pending["turn_status"] == "completed"


# =========================================================================== titles


@pytest.mark.parametrize(
    ("prompt", "title"),
    [
        ("Please fix the failing test. `add` looks wrong.", "Fix the failing test"),
        (
            "Refactor the configuration loader so that environment variables override files",
            "Refactor the configuration loader so that environment…",
        ),
        ("x" * 70, "X" + "x" * 69),  # one long word is kept whole, not cut inside
        # a long word across the limit: the cut goes before it (it used to go inside it)
        (
            "Update the parse_configuration_value_from_environment_variables_and_files helper",
            "Update the…",
        ),
    ],
)
def test_derived_titles_are_never_cut_inside_a_word(prompt: str, title: str | None) -> None:
    got = derived_title(prompt)
    if title is not None:
        assert got == title
    if got.endswith("…"):
        assert len(got) <= MAX_TITLE_CHARS
        assert got[:-1].split()[-1] in prompt.split()  # the last word kept is a whole word


@pytest.mark.parametrize(
    ("answer", "title"),
    [
        ("Fix the date parser", "Fix the date parser"),
        ('Title: "Fix the date parser."', "Fix the date parser"),
        ("**fix the date parser**\n\nThis title says what the task does.", "Fix the date parser"),
        (
            "<think>The user wants a title.\nShort.</think>\n# Fix the date parser",
            "Fix the date parser",
        ),
        ("   \n", None),
        ("Make " + "every " * 20 + "test pass", "Make" + " every" * 9 + "…"),
    ],
)
def test_the_models_answer_is_cleaned_into_a_title(answer: str, title: str | None) -> None:
    assert clean_model_title(answer) == title


def test_titles_asked_over_the_gateway_socket_load_no_tls_certificates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The title's request is plain HTTP over the gateway's UNIX socket: each one made a TLS
    context (the CA bundle loaded, ~28 ms of the server's CPU, ~0.9 s of a burst of 32 new
    tasks); now one is made at most once per process. A real HTTP server on a UNIX socket
    answers with the Responses stream."""
    import http.server
    import socketserver
    import ssl

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["content-length"]))
            done = {"type": "response.completed", "response": {"output": []}}
            delta = {"type": "response.output_text.delta", "delta": "Fix the parser"}
            body = "".join(f"data: {json.dumps(e)}\n\n" for e in (delta, done)).encode()
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
        daemon_threads = True

        def get_request(self) -> Any:
            conn, _ = super().get_request()
            return conn, ("local", 0)

    socket_path = tmp_path / "gateway.sock"
    server = Server(str(socket_path), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    made: list[int] = []
    create = ssl.create_default_context

    def counted(*args: Any, **kwargs: Any) -> ssl.SSLContext:
        made.append(1)
        return create(*args, **kwargs)

    monkeypatch.setattr(ssl, "create_default_context", counted)
    engine_titles._tls.cache_clear()
    try:
        for _ in range(3):
            answer = engine_titles.ask_model(socket_path, "t", {"input": "x"}, 10)
            assert answer == "Fix the parser"
        assert len(made) <= 1
    finally:
        server.shutdown()
        server.server_close()
        engine_titles._tls.cache_clear()


def test_the_title_on_creation_is_not_cut_inside_a_word(api: Any, calc_repo: Path) -> None:
    env = api.create_env(calc_repo)
    prompt = "Make the importer accept configuration files " + "everywhere " * 6 + "please"
    title = api.create_task(env["id"], prompt)["task"]["title"]
    assert title.endswith("…") and len(title) <= 80
    assert prompt.startswith(title[:-1] + " ")


def _title_server(tmp_path: Path, database_url: str, model: ScriptedModel, timeout: float) -> Any:
    return make_server(
        tmp_path, database_url, **engine_settings(model, title_timeout_seconds=timeout)
    )


@pytest.mark.parametrize("failure", ["error", "slow"])
def test_the_prompt_gives_the_title_when_the_model_fails_or_is_slow(
    tmp_path: Path, sqlite_url: str, scripted_model: ScriptedModel, calc_repo: Path, failure: str
) -> None:
    if failure == "error":
        scripted_model.title = Fail("server_error", "no titles today")
    else:
        scripted_model.title_delay = 30.0
    gen = _title_server(tmp_path, sqlite_url, scripted_model, timeout=2.0)
    server = next(gen)
    try:
        api = server.api
        scripted_model.script = [Say("Done.")]
        env = api.create_env(calc_repo)
        created = api.create_task(env["id"], "Please fix the failing test. `add` looks wrong.")
        task_id, turn_id = created["task"]["id"], created["turn"]["id"]
        details = wait_for_task(api, task_id, timeout=60)
        assert details["current_assistant_turn"]["turn_status"] == "completed"
        assert len(scripted_model.title_requests) == 1
        assert details["task"]["title"] == "Fix the failing test"
        assert details["task"]["has_generated_title"] is True
        frames = stream(api, task_id, turn_id)
        kinds = [f["data"]["item_type"] for f in frames]
        assert kinds.count("task_title_generated") == 1
        assert kinds.index("task_title_generated") < len(kinds) - 1  # before the terminal
    finally:
        gen.close()


def test_the_attempt_does_not_wait_for_its_title(
    engine_server: Server, scripted_model: ScriptedModel, calc_repo: Path
) -> None:
    """The model's title arrives while the agent already works; it is written when it comes,
    still before the terminal event."""
    agent_started: list[float] = []
    scripted_model.on_request = lambda body: agent_started.append(time.monotonic()) or None
    scripted_model.title = Say("Fix add")
    scripted_model.title_delay = 4.0
    api = engine_server.api
    scripted_model.script = [Say("Done.")]
    env = api.create_env(calc_repo)
    t0 = time.monotonic()
    created = api.create_task(env["id"], "Please fix the failing test.")
    task_id, turn_id = created["task"]["id"], created["turn"]["id"]
    details = wait_for_task(api, task_id, timeout=60)
    assert details["current_assistant_turn"]["turn_status"] == "completed"
    assert agent_started and agent_started[0] - t0 < 4.0  # the agent did not wait 4 s
    assert details["task"]["title"] == "Fix add"
    frames = stream(api, task_id, turn_id)
    kinds = [f["data"]["item_type"] for f in frames]
    assert kinds.count("task_title_generated") == 1
    assert kinds.index("task_title_generated") < len(kinds) - 1


def test_the_gateway_forgets_an_attempt_once_it_ended(
    engine_server: Server, scripted_model: ScriptedModel, calc_repo: Path
) -> None:
    """Issue 20 (server memory over many tasks): the gateway kept every ended attempt's
    token record for an hour after revoking it, though its usage was already recorded."""
    runner = engine_server.app_state.runner
    assert runner is not None and runner.engine is not None
    gateway = runner.engine.gateway
    assert gateway is not None
    scripted_model.script = [Say("Nothing to do.")]
    api = engine_server.api
    env = api.create_env(calc_repo)
    created = api.create_task(env["id"], "Say something")
    turn_id = created["turn"]["id"]
    turn = wait_for_task(api, created["task"]["id"])["current_assistant_turn"]
    assert turn["turn_status"] == "completed", turn["error"]
    workspace = engine_server.app_state.settings.resolved_data_dir / "attempts" / turn_id
    deadline = time.monotonic() + 15
    while (workspace / "workspace").exists() and time.monotonic() < deadline:
        time.sleep(0.02)  # the end of the attempt (its finally) has run
    with pytest.raises(KeyError):
        gateway.usage(turn_id)


def test_an_attempt_whose_output_is_recorded_slowly_still_completes(
    engine_server: Server,
    scripted_model: ScriptedModel,
    calc_repo: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Issue 20 (32 tasks at once): under SQLite write contention a work-log write took
    seconds, the reader of Codex's output waited in it, and the sandbox's result was taken
    2 s after Codex exited with ``turn.completed`` still unread in the pipe: the attempt
    failed with "The agent exited before finishing its turn". The engine now waits until
    every line of the agent's output went through before it judges the outcome."""
    from openwham.engine.recorder import TurnRecorder

    record = TurnRecorder.message
    stalled: list[float] = []

    def slow_message(self: TurnRecorder, message: Any) -> None:
        if message.author.role == "tool" and not stalled:  # the command's output
            stalled.append(time.monotonic())
            time.sleep(4.0)  # Codex answers, prints turn.completed and exits meanwhile
        record(self, message)

    monkeypatch.setattr(TurnRecorder, "message", slow_message)
    turn = _say_hi(engine_server, scripted_model, calc_repo)
    assert stalled, "the stall never happened"
    _said_hi(turn)  # the stalled write itself was kept


def test_the_agents_output_is_read_while_its_work_log_waits_for_the_database(
    engine_server: Server,
    scripted_model: ScriptedModel,
    calc_repo: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Reading the agent's output never waits for the database: while the write of the
    command's output to the work log is held (SQLite's writer blocked inside it), the
    thread reading Codex's output still reads on to ``turn.completed`` (before, it waited
    in that write, so ``turn.completed`` was read after the diff was written, 456 ms at
    four attempts at once; best-of-4 trace, docs/benchmarks.md). The held write lands
    afterwards, in its place."""
    from openwham.engine.agent import AgentRun
    from openwham.store import events

    append, on_output = events.append, AgentRun.on_output
    completed = threading.Event()
    held: list[bool] = []

    def read(self: AgentRun, stream: str, line: str) -> None:
        on_output(self, stream, line)
        if self.translator.turn_completed:
            completed.set()

    def slow_append(
        s: Any, task_id: str, turn_id: str, item_type: str, payload: Any, **kw: Any
    ) -> Any:
        role = ((payload or {}).get("author") or {}).get("role")
        if item_type == events.WORK_LOG_MESSAGE and role == "tool" and not held:
            held.append(completed.wait(30.0))  # the database waits meanwhile
        return append(s, task_id, turn_id, item_type, payload, **kw)

    monkeypatch.setattr(AgentRun, "on_output", read)
    monkeypatch.setattr(events, "append", slow_append)
    turn = _say_hi(engine_server, scripted_model, calc_repo)
    assert held == [True], "turn.completed was not read while the work log's write waited"
    _said_hi(turn)  # the held write itself was kept


def _say_hi(server: Server, model: ScriptedModel, repo: Path) -> dict[str, Any]:
    """A task whose agent runs ``echo hi`` and answers "Done.": its attempt once ended."""
    model.script = [Shell("echo hi"), Say("Done.")]
    env = server.api.create_env(repo)
    created = server.api.create_task(env["id"], "Say hi")
    return dict(wait_for_task(server.api, created["task"]["id"])["current_assistant_turn"])


def _said_hi(turn: dict[str, Any]) -> None:
    """``_say_hi``'s attempt completed with the command's output and the answer."""
    assert turn["turn_status"] == "completed", turn["error"]
    texts = [
        "".join(p for p in msg["content"].get("parts") or [] if isinstance(p, str))
        for msg in turn["worklog"]["messages"]
    ]
    assert "hi\n" in texts
    assert turn["output_items"][0]["content"][0]["text"] == "Done."
