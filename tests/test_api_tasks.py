"""Task endpoints end to end (in-process), under both path styles."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from conftest import Api, Server, finish_turn, git

TASK_ID = re.compile(r"^task_e_[0-9a-f]{32}$")


def test_create_task_returns_task_turns_and_rate_limit(api: Api, repo: Path) -> None:
    env = api.create_env(repo)
    body = api.create_task(env["id"], "Make add() add\nThanks", metadata={"best_of_n": 3})
    assert set(body) == {"task", "user_turn", "turn", "rate_limit"}
    task, user, turn = body["task"], body["user_turn"], body["turn"]
    assert TASK_ID.match(task["id"])
    assert re.match(rf"^{task['id']}~usertrn_e_[0-9a-f]{{32}}$", user["id"])
    assert re.match(rf"^{task['id']}~assttrn_e_[0-9a-f]{{32}}$", turn["id"])
    assert isinstance(task["created_at"], float)
    assert task["title"] == "Make add() add" and task["has_generated_title"] is False
    assert task["current_turn_id"] == turn["id"]
    assert turn["turn_status"] == "pending" and turn["latest_event"] is None
    assert turn["logs"] is None and turn["attempt_placement"] == 0
    assert len(turn["sibling_turn_ids"]) == 2
    assert turn["previous_turn_id"] == user["id"] and user["previous_turn_id"] is None
    assert turn["environment"]["id"] == env["id"] and turn["branch"] == "main"
    assert "windows" not in body["rate_limit"]
    assert body["rate_limit"]["remaining"] == body["rate_limit"]["limit"] - 3


def test_list_details_turns_and_siblings(api: Api, repo: Path) -> None:
    env = api.create_env(repo)
    created = api.create_task(env["id"], metadata={"best_of_n": 2})
    task_id = created["task"]["id"]

    page = api.get("tasks/list", params={"task_filter": "current", "limit": 5}).json()
    assert [i["id"] for i in page["items"]] == [task_id]
    item = page["items"][0]
    assert item["archived"] is False and item["has_unread_turn"] is False
    status = item["task_status_display"]
    assert status["environment_label"] == "acme/widgets"
    assert status["latest_turn_status_display"]["turn_status"] == "pending"

    details = api.get(f"tasks/{task_id}").json()
    assert {"task", "current_user_turn", "current_assistant_turn", "current_diff_task_turn"} <= set(
        details
    )
    assert details["current_assistant_turn"]["id"] == created["turn"]["id"]
    assert details["current_diff_task_turn"] is None
    prompt = details["current_user_turn"]["input_items"][0]["content"][0]["text"]
    assert prompt == "Fix the failing test"

    mapping = api.get(f"tasks/{task_id}/turns").json()
    assert mapping["current_turn_id"] == created["turn"]["id"]
    entries = mapping["turn_mapping"]
    user_id = created["user_turn"]["id"]
    assert entries[user_id]["parent"] is None
    assert sorted(entries[user_id]["children"]) == sorted(
        [created["turn"]["id"], *created["turn"]["sibling_turn_ids"]]
    )

    one = api.get(f"tasks/{task_id}/turns/{created['turn']['id']}").json()
    assert one["turn"]["id"] == created["turn"]["id"]

    sibs = api.get(f"tasks/{task_id}/turns/{created['turn']['id']}/sibling_turns").json()
    assert [t["attempt_placement"] for t in sibs["sibling_turns"]] == [1]
    assert sibs["sibling_turns"][0]["id"] == created["turn"]["sibling_turn_ids"][0]


def test_archive_unarchive_mark_read_cancel_delete(api: Api, repo: Path) -> None:
    env = api.create_env(repo)
    task_id = api.create_task(env["id"], metadata={"best_of_n": 2})["task"]["id"]

    assert api.post(f"tasks/{task_id}/archive").json() == {"success": True}
    current = api.get("tasks/list").json()["items"]
    archived = api.get("tasks/list", params={"task_filter": "archived"}).json()["items"]
    every = api.get("tasks/list", params={"task_filter": "all"}).json()["items"]
    assert task_id not in [i["id"] for i in current]
    assert [i["id"] for i in archived] == [task_id] and archived[0]["archived"] is True
    assert [i["id"] for i in every] == [task_id]
    assert api.post(f"tasks/{task_id}/unarchive").json() == {"success": True}
    assert [i["id"] for i in api.get("tasks/list").json()["items"]] == [task_id]

    assert api.post(f"tasks/{task_id}/mark_read").json() == {"success": True}
    assert api.get(f"tasks/{task_id}").json()["task"]["has_unread_turn"] is False

    cancelled = api.post(f"tasks/{task_id}/cancel").json()
    mapping = api.get(f"tasks/{task_id}/turns").json()["turn_mapping"]
    attempts = [e["turn"] for e in mapping.values() if e["turn"]["type"] == "assistant"]
    assert [t["turn_status"] for t in attempts] == ["cancelled", "cancelled"]
    assert cancelled["success"] is True
    assert sorted(cancelled["cancelled_turn_ids"]) == sorted(t["id"] for t in attempts)
    # Nothing left to cancel: still a success (safe to retry), and it says nothing was cancelled.
    again = api.post(f"tasks/{task_id}/cancel")
    assert again.status_code == 200
    assert again.json() == {"success": True, "cancelled_turn_ids": []}

    turn_id = api.get(f"tasks/{task_id}").json()["task"]["current_turn_id"]
    done = api.post(f"tasks/{task_id}/turns/{turn_id}/cancel").json()
    assert done == {"success": True, "cancelled_turn_ids": []}
    assert api.post(f"tasks/{task_id}/turns/{turn_id}/viewed").json() == {"success": True}

    assert api.delete(f"tasks/{task_id}").json() == {"success": True}
    assert api.get(f"tasks/{task_id}").status_code == 404
    assert api.get(f"tasks/{task_id}/turns").status_code == 404
    assert api.get("tasks/list", params={"task_filter": "all"}).json()["items"] == []


def test_keyset_pagination_is_stable(server: Server, repo: Path) -> None:
    api = server.api
    env = api.create_env(repo)
    ids = [api.create_task(env["id"], f"task {i}")["task"]["id"] for i in range(7)]
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        params = {"limit": 3, **({"cursor": cursor} if cursor else {})}
        page = api.get("tasks/list", params=params).json()
        seen += [i["id"] for i in page["items"]]
        pages += 1
        # a task created between pages must not shift later pages
        if pages == 1:
            api.create_task(env["id"], "late arrival")
        cursor = page["cursor"]
        if cursor is None:
            break
    assert seen == list(reversed(ids))
    assert pages == 3


@pytest.mark.parametrize("status", ["failed", "cancelled"])
def test_a_follow_up_needs_a_completed_attempt(server: Server, repo: Path, status: str) -> None:
    """A failed or cancelled attempt left no tree and no finished conversation to continue."""
    api = server.api
    env = api.create_env(repo)
    created = api.create_task(env["id"])
    finish_turn(server, created["turn"]["id"], status)
    body = {
        "follow_up": {"task_id": created["task"]["id"], "turn_id": created["turn"]["id"]},
        "input_items": [{"type": "message", "role": "user", "content": ["again"]}],
    }
    before = api.get(f"tasks/{created['task']['id']}/turns").json()
    r = api.post("tasks", json=body)
    assert r.status_code == 409, r.text
    assert r.json()["detail"].startswith(f"Turn {status}: it left no result to continue from")
    assert api.get(f"tasks/{created['task']['id']}/turns").json() == before  # nothing created


def test_follow_up_creates_turns_after_chosen_attempt(server: Server, repo: Path) -> None:
    api = server.api
    env = api.create_env(repo)
    created = api.create_task(env["id"])
    task_id, first = created["task"]["id"], created["turn"]["id"]

    body = {
        "follow_up": {"task_id": task_id, "turn_id": first},
        "input_items": [
            {
                "type": "message",
                "role": "user",
                "content": [{"content_type": "text", "text": "more"}],
            }
        ],
        "metadata": {"best_of_n": 2},
    }
    r = api.post("tasks", json=body)
    assert r.status_code == 409, r.text  # still pending
    assert "pending" in r.json()["detail"]

    finish_turn(server, first)
    r = api.post("tasks", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["task"]["id"] == task_id
    assert out["user_turn"]["previous_turn_id"] == first
    assert out["turn"]["previous_turn_id"] == out["user_turn"]["id"]
    assert len(out["turn"]["sibling_turn_ids"]) == 1
    assert out["task"]["denormalized_metadata"]["num_follow_ups"] == 1
    assert out["task"]["current_turn_id"] == out["turn"]["id"]

    mapping = api.get(f"tasks/{task_id}/turns").json()
    entries = mapping["turn_mapping"]
    assert entries[first]["children"] == [out["user_turn"]["id"]]
    assert entries[first]["turn"]["child_turns"] == [out["user_turn"]["id"]]
    assert entries[out["user_turn"]["id"]]["parent"] == first
    assert mapping["current_turn_id"] == out["turn"]["id"]

    # previous_turn_id is accepted as an alias of turn_id
    finish_turn(server, out["turn"]["id"])
    alias = dict(body, follow_up={"task_id": task_id, "previous_turn_id": out["turn"]["id"]})
    assert api.post("tasks", json=alias).status_code == 200


def test_discard_sets_an_attempt_aside_and_undo_brings_the_siblings_back(
    server: Server, repo: Path
) -> None:
    api = server.api
    env = api.create_env(repo)
    created = api.create_task(env["id"], metadata={"best_of_n": 3})
    task_id, first = created["task"]["id"], created["turn"]["id"]
    siblings = created["turn"]["sibling_turn_ids"]

    r = api.post(f"tasks/{task_id}/turns/{first}/discard")
    assert r.status_code == 409 and "cancel it before discarding" in r.json()["detail"]
    r = api.post(f"tasks/{task_id}/turns/{created['user_turn']['id']}/discard")
    assert r.status_code == 400
    assert api.post(f"tasks/{task_id}/turns/nope/discard").status_code == 404
    assert api.get(f"tasks/{task_id}").json()["current_assistant_turn"]["discarded"] is False

    for turn_id in [first, *siblings]:
        finish_turn(server, turn_id)
    assert api.post(f"tasks/{task_id}/turns/{first}/discard").json() == {"success": True}
    details = api.get(f"tasks/{task_id}").json()
    # the current attempt moved to the first sibling still kept
    assert details["task"]["current_turn_id"] == siblings[0]
    assert api.get(f"tasks/{task_id}/turns/{first}").json()["turn"]["discarded"] is True
    api.post(f"tasks/{task_id}/turns/{siblings[1]}/discard")
    kept = api.get(f"tasks/{task_id}/turns/{siblings[0]}/sibling_turns").json()["sibling_turns"]
    assert sorted((t["id"], t["discarded"]) for t in kept) == sorted(
        [(first, True), (siblings[1], True)]
    )

    r = api.post(f"tasks/{task_id}/turns/{siblings[0]}/undo_all_discards_for_siblings")
    assert r.json() == {"success": True}
    turns = [api.get(f"tasks/{task_id}/turns/{t}").json()["turn"] for t in [first, *siblings]]
    assert [t["discarded"] for t in turns] == [False, False, False]
    assert api.get(f"tasks/{task_id}").json()["task"]["current_turn_id"] == siblings[0]


def _counts(server: Server) -> tuple[int, int, int]:
    from sqlalchemy import func, select

    from openwham.store import models as m

    with server.app_state.db.session() as s:
        return (
            int(s.scalar(select(func.count()).select_from(m.Task)) or 0),
            int(s.scalar(select(func.count()).select_from(m.Turn)) or 0),
            int(s.scalar(select(func.count()).select_from(m.UsageEvent)) or 0),
        )


def test_a_branch_the_repository_lacks_is_refused_at_submit(server: Server, repo: Path) -> None:
    """400 naming the branch and the repository; no task, turn or usage event is stored."""
    api = server.api
    env = api.create_env(repo, label="acme/widgets", repos=[{"url": str(repo), "name": "acme/w"}])
    r = api.post("tasks", json=_new_task_body(env["id"], branch="nope"))
    assert r.status_code == 400, r.text
    assert r.json()["detail"] == "Branch 'nope' not found in acme/w"
    assert _counts(server) == (0, 0, 0)
    # a branch made since is found (the remote is asked, not a stale answer)
    git("branch", "feature/new", cwd=repo)
    ok = api.post("tasks", json=_new_task_body(env["id"], branch="feature/new"))
    assert ok.status_code == 200, ok.text
    assert ok.json()["turn"]["branch"] == "feature/new"


def test_an_unreachable_repository_is_a_400_and_a_fresh_mirror_needs_no_remote(
    server: Server, repo: Path, tmp_path: Path
) -> None:
    """A branch the engine's mirror has is accepted without asking the remote; anything else
    needs the remote, and a remote that is gone is a 400 that says so (nothing stored)."""
    from openwham.sandbox.workspace import Mirrors

    api = server.api
    env = api.create_env(repo)
    key = env["repos"][0]
    data = server.app_state.settings.resolved_data_dir
    Mirrors(data / "mirrors").ensure(key, str(repo))
    shutil.rmtree(repo)
    counts = _counts(server)
    r = api.post("tasks", json=_new_task_body(env["id"], branch="nope"))
    assert r.status_code == 400, r.text
    assert r.json()["detail"].startswith(f"Repository not reachable: {repo} (")
    assert _counts(server) == counts
    ok = api.post("tasks", json=_new_task_body(env["id"], branch="main"))
    assert ok.status_code == 200, ok.text  # from the mirror alone


def test_a_follow_up_on_a_branch_deleted_since_is_refused(server: Server, repo: Path) -> None:
    api = server.api
    git("checkout", "-q", "-b", "topic", cwd=repo)
    git("checkout", "-q", "main", cwd=repo)
    env = api.create_env(repo, repos=[{"url": str(repo), "name": "acme/widgets"}])
    created = api.create_task(env["id"], new_task={"branch": "topic"})
    finish_turn(server, created["turn"]["id"])
    git("branch", "-q", "-D", "topic", cwd=repo)
    counts = _counts(server)
    body = {
        "follow_up": {"task_id": created["task"]["id"], "turn_id": created["turn"]["id"]},
        "input_items": [_message("And more")],
    }
    r = api.post("tasks", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["detail"] == "Branch 'topic' not found in acme/widgets"
    assert _counts(server) == counts


def _message(text: str) -> dict[str, object]:
    return {"type": "message", "role": "user", "content": [{"content_type": "text", "text": text}]}


def _new_task_body(env_id: str, **spec: object) -> dict[str, object]:
    return {"new_task": {"environment_id": env_id, **spec}, "input_items": [_message("Fix it")]}


def test_cancelling_a_pending_attempt_ends_its_stream_at_once(server: Server, repo: Path) -> None:
    """A queued attempt that is cancelled gets its terminal event from the cancel itself (no
    executor will run it), not a stand-in that a stream invents after waiting for one."""
    from openwham.store import events

    api = server.api
    env = api.create_env(repo)
    created = api.create_task(env["id"], metadata={"best_of_n": 2})
    task_id, first = created["task"]["id"], created["turn"]["id"]
    cancelled = api.post(f"tasks/{task_id}/turns/{first}/cancel").json()["cancelled_turn_ids"]
    assert cancelled == [first]
    with server.app_state.db.sessions() as s:
        ends = [e for e in events.read(s, first) if e.is_terminal]
        (other,) = [t for t in created["turn"]["sibling_turn_ids"] if t != first]
        assert not [e for e in events.read(s, other) if e.is_terminal]
    assert [(e.payload["text"], e.payload["turn_status"]) for e in ends] == [
        ("Cancelled", "cancelled")
    ]
    assert ends[0].payload["error"]["code"] == "cancelled"
