"""Hot reads (task details, tasks/list, the feed): one worker-thread call, Core rows, and
rendered answers kept under the rows they were rendered from (``service.rendercache``).

What must hold: the bytes are those of the wire models (``tasks.details`` / ``list_tasks``
serialised as FastAPI's ``response_model`` did), a repeated read is served from the cache,
and any write, whichever way it reaches the database and whether or not it touches
``updated_at``, shows in the very next answer on every node."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio.to_thread
import pytest
from pydantic import BaseModel
from sqlalchemy import event, update

from conftest import Api, Server, finish_turn, make_server
from openwham.server.readqueue import ReadQueue
from openwham.service import accounts, tasks
from openwham.service.errors import Unauthorized
from openwham.service.rendercache import RenderCache, digest
from openwham.store import models as m

CLI = {"User-Agent": "codex_cli_rs/0.50.0 (Linux; x86_64)"}


def _json(model: BaseModel) -> bytes:
    return model.__pydantic_serializer__.to_json(model, by_alias=True)


def _with_answer(server: Server, turn_id: str, text: str, diff_lines: int = 3) -> None:
    """Give an attempt what a finished one holds (an answer and a diff) by a Core update
    that leaves ``updated_at`` alone, as some of the engine's writes do."""
    diff = "diff --git a/calc.py b/calc.py\n--- a/calc.py\n+++ b/calc.py\n@@ -1 +1 @@\n"
    diff += "".join(f"-old {i}\n+new {i}\n" for i in range(diff_lines))
    with server.app_state.db.session() as s:
        turn = s.get(m.Turn, turn_id)
        assert turn is not None
        body = dict(turn.body)
        body["output_items"] = [
            {"type": "message", "role": "assistant", "content": [{"text": text}]},
            {
                "type": "pr",
                "pr_title": "t",
                "pr_message": text,
                "output_diff": {"type": "output_diff", "diff": diff, "files_modified": 1},
            },
        ]
        s.execute(update(m.Turn).where(m.Turn.id == turn_id).values(**m.Turn.body_values(body)))
        s.commit()


def _expected(server: Server, task_id: str, inline: int | None) -> tuple[bytes, bytes]:
    """Task details and the first list page as the wire models serialise them."""
    with server.app_state.db.session() as s:
        account, user = accounts.ensure_owner(s)
        principal = accounts.Principal(user=user, account=account)
        details = tasks.details(s, principal, task_id, inline_diff=inline)
        page = tasks.list_tasks(
            s, principal, limit=100, task_filter=None, environment_id=None, cursor=None
        )
        return _json(details), _json(page)


@pytest.fixture
def tree(any_server: Server, repo: Path) -> Iterator[tuple[Server, str, dict[str, Any]]]:
    """A best-of-2 task whose first attempt finished with an answer and a diff, a follow-up
    on it, and a second task: siblings, children, a user turn with a parent."""
    api = any_server.api
    env = api.create_env(repo)
    first = api.create_task(env["id"], "Fix add", metadata={"best_of_n": 2})
    task_id, turn_id = first["task"]["id"], first["turn"]["id"]
    _with_answer(any_server, turn_id, "Fixed it", diff_lines=400)
    finish_turn(any_server, turn_id)
    follow = api.follow_up(task_id, turn_id, "And the docs")
    api.create_task(env["id"], "Another one")
    yield any_server, task_id, follow


def test_answers_are_the_wire_models_bytes(tree: tuple[Server, str, dict[str, Any]]) -> None:
    server, task_id, _ = tree
    api = server.api
    for inline, headers in ((server.app_state.settings.inline_diff_max_bytes, {}), (None, CLI)):
        want_details, want_list = _expected(server, task_id, inline)
        for _ in range(2):  # rendered, then from the cache
            r = api.get(f"tasks/{task_id}", headers=headers)
            assert r.status_code == 200 and r.headers["content-type"] == "application/json"
            assert r.content == want_details
            r = api.get("tasks/list", params={"limit": 100}, headers=headers)
            assert r.content == want_list
    assert server.app_state.renders.hits >= 2 + 2 * 3  # details twice, 3 list items twice


def test_every_write_shows_in_the_next_answer(tree: tuple[Server, str, dict[str, Any]]) -> None:
    """Writes that do not touch ``updated_at`` (Core updates of a body, a status, an
    environment's label, the task's own columns) change the answer at once."""
    server, task_id, follow = tree
    api = server.api
    inline = server.app_state.settings.inline_diff_max_bytes
    db = server.app_state.db

    def check() -> None:
        want_details, want_list = _expected(server, task_id, inline)
        assert api.get(f"tasks/{task_id}").content == want_details
        assert api.get("tasks/list", params={"limit": 100}).content == want_list

    check()
    check()
    hits = server.app_state.renders.hits
    assert hits > 0

    def stamp() -> float:
        with db.session() as s:
            task = s.get(m.Task, task_id)
            assert task is not None
            return task.updated_at

    before = stamp()
    _with_answer(server, follow["turn"]["id"], "Docs done")
    assert b"Docs done" in api.get(f"tasks/{task_id}").content
    check()
    finish_turn(server, follow["turn"]["id"], "failed")
    details = api.get(f"tasks/{task_id}").json()
    assert details["current_assistant_turn"]["turn_status"] == "failed"
    check()
    with db.session() as s:
        s.execute(update(m.Environment).values(label="acme/renamed"))
        s.execute(update(m.Task).where(m.Task.id == task_id).values(title="Renamed"))
        s.commit()
    page = api.get("tasks/list", params={"limit": 100}).json()
    mine = next(i for i in page["items"] if i["id"] == task_id)
    assert mine["title"] == "Renamed"
    assert mine["task_status_display"]["environment_label"] == "acme/renamed"
    check()
    assert api.post(f"tasks/{task_id}/archive").status_code == 200
    assert api.get(f"tasks/{task_id}").json()["task"]["archived"] is True
    check()
    assert api.post(f"tasks/{task_id}/unarchive").status_code == 200
    assert api.get(f"tasks/{task_id}").json()["task"]["archived"] is False
    check()
    assert stamp() == before  # none of the body/label/title writes above moved it


def test_a_second_node_never_answers_from_before_a_write(
    tmp_path: Path, database_url: str, repo: Path
) -> None:
    """Two apps on one database (same data dir and keys, as two nodes): node B has the
    task's details cached, node A changes the task, node B's next answer has the change."""
    nodes = [make_server(tmp_path, database_url) for _ in range(2)]
    try:
        a, b = (next(n) for n in nodes)
        env = a.api.create_env(repo)
        task_id = a.api.create_task(env["id"], "Shared")["task"]["id"]
        b_api = b.api.as_(b.owner_token())
        assert b_api.get(f"tasks/{task_id}").json()["task"]["title"] == "Shared"
        assert b_api.get(f"tasks/{task_id}").status_code == 200
        assert b.app_state.renders.hits >= 1
        assert a.api.post(f"tasks/{task_id}/archive").status_code == 200
        assert b_api.get(f"tasks/{task_id}").json()["task"]["archived"] is True
        listed = b_api.get("tasks/list", params={"task_filter": "all"}).json()["items"]
        assert [i["archived"] for i in listed] == [True]
    finally:
        for n in nodes:
            n.close()


def test_a_hot_read_takes_one_worker_thread_call(
    server: Server, repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Session, authentication, queries and rendering in one hand-off (was four: session
    and caller, handler, response validation, session close): one thread call, AnyIO's or
    the read queue's."""
    api = server.api
    task_id = api.create_task(api.create_env(repo)["id"])["task"]["id"]
    real = anyio.to_thread.run_sync
    calls: list[Any] = []

    async def counting(func: Any, *args: Any, **kw: Any) -> Any:
        calls.append(func)
        return await real(func, *args, **kw)

    real_read = ReadQueue.run

    async def counting_reads(queue: ReadQueue, func: Any) -> Any:
        calls.append(func)
        return await real_read(queue, func)

    monkeypatch.setattr(anyio.to_thread, "run_sync", counting)
    monkeypatch.setattr(ReadQueue, "run", counting_reads)  # the hot reads' own threads
    for path in (f"tasks/{task_id}", "tasks/list", "tasks"):
        calls.clear()
        r = api.get(path)
        assert r.status_code == 200, r.text
        assert len(calls) == 1, (path, calls)


def test_a_cached_signature_still_expires(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    """Verified claims are kept per token; the expiry is checked on every use."""
    state = server.app_state
    token = server.owner_token(ttl_seconds=60)
    with state.db.session() as s:
        assert accounts.authenticate(s, state.signing_key, token, None).token_id
        s.commit()
    later = time.time() + 61
    monkeypatch.setattr(accounts.time, "time", lambda: later)
    with state.db.session() as s, pytest.raises(Unauthorized, match="expired"):
        accounts.authenticate(s, state.signing_key, token, None)
    with pytest.raises(Unauthorized, match="Invalid"):  # a tampered token is never kept
        accounts._verified_claims(
            token[:-2] + ("AA" if token[-2:] != "AA" else "BB"), state.signing_key
        )


def test_the_cache_is_bounded_and_keyed_by_its_rows() -> None:
    cache = RenderCache(max_entries=3, max_bytes=80)
    key = digest([("t1", 1.0, "body")], 100)
    assert key != digest([("t1", 1.0, "body ")], 100)
    assert key != digest([("t1", 1.0, "body")], None)
    assert digest([("a", "bc")]) != digest([("ab", "c")])
    cache.put("details", "t1", key, b"x" * 10)
    assert cache.get("details", "t1", key) == b"x" * 10
    assert cache.get("details", "t1", digest([("t1", 2.0, "body")], 100)) is None
    for i in range(5):
        cache.put("details", f"n{i}", key, b"y" * 10)
    assert len(cache) == 3 and cache.get("details", "t1", key) is None
    cache.put("details", "big", key, b"z" * 11)  # over an eighth of the bytes: not kept
    assert cache.get("details", "big", key) is None
    by_bytes = RenderCache(max_entries=100, max_bytes=160)
    for i in range(10):
        by_bytes.put("list", f"m{i}", key, b"w" * 20)
    assert by_bytes.size == 160 and len(by_bytes) == 8
    assert by_bytes.get("list", "m0", key) is None and by_bytes.get("list", "m9", key)


def test_an_api_without_a_token_is_still_401(server: Server, repo: Path) -> None:
    api: Api = server.api
    task_id = api.create_task(api.create_env(repo)["id"])["task"]["id"]
    for path in (f"tasks/{task_id}", "tasks/list", "tasks"):
        r = api.as_(None).get(path)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert api.as_("nonsense").get(path).status_code == 401
    assert api.get("tasks/" + "x" * 300).status_code == 404
    assert api.get("tasks/task_e_" + "0" * 32).status_code == 404
    other = api.as_(server.other_account_token())
    assert other.get(f"tasks/{task_id}").status_code == 404
    assert other.get("tasks/list").json()["items"] == []


def test_details_show_one_state_of_a_task_and_its_turns_written_together(
    any_server: Server, repo: Path
) -> None:
    """An attempt's end writes its status and the task's Unread in one transaction; details
    read the task's row and its turns' rows. On SQLite each read is a snapshot of its own,
    so that write could land between a read of the task and one of its turns (it did, in a
    full CI run, when they were two): the answer must still show both before or both after,
    never a completed attempt on a task not yet Unread. The write lands just before the
    statement that reads the turns (now the task's too: one statement, one snapshot)."""
    api = any_server.api
    env = api.create_env(repo)
    created = api.create_task(env["id"], "Fix add")
    task_id, turn_id = created["task"]["id"], created["turn"]["id"]
    db = any_server.app_state.db
    fired: list[bool] = []

    def end_between(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if fired or not re.search(r"\b(FROM|JOIN) turns\b", statement):
            return
        fired.append(True)
        with db.session() as s:  # another connection: commits before the turns are read
            s.execute(update(m.Turn).where(m.Turn.id == turn_id).values(turn_status="completed"))
            s.execute(update(m.Task).where(m.Task.id == task_id).values(has_unread_turn=True))

    event.listen(db.request_engine, "before_cursor_execute", end_between)
    try:
        r = api.get(f"tasks/{task_id}")
    finally:
        event.remove(db.request_engine, "before_cursor_execute", end_between)
    assert fired, "the write between the reads did not happen"
    details = r.json()
    status = details["current_assistant_turn"]["turn_status"]
    assert (status, details["task"]["has_unread_turn"]) in {
        ("pending", False),
        ("completed", True),
    }
