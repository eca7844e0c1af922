"""The store on both backends: migrations, WAL, durability, concurrency, a full API flow."""

from __future__ import annotations

import json
import threading
from pathlib import Path

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, select, text

from conftest import Server
from openwham.store import models as m
from openwham.store.db import Database, alembic_config, make_engine


def test_migrations_create_schema_and_are_idempotent(database_url: str) -> None:
    db = Database(database_url)
    try:
        db.migrate()
        db.migrate()  # a second start is a no-op
        tables = set(inspect(db.engine).get_table_names())
        assert {"accounts", "users", "memberships", "environments", "tasks", "turns"} <= tables
        head = ScriptDirectory.from_config(alembic_config(database_url)).get_current_head()
        with db.engine.connect() as conn:
            assert MigrationContext.configure(conn).get_current_revision() == head
            # the migrations describe exactly the ORM models (no forgotten revision)
            diff = compare_metadata(MigrationContext.configure(conn), m.Base.metadata)
            assert diff == []
    finally:
        db.dispose()


def test_sqlite_uses_wal(sqlite_url: str) -> None:
    db = Database(sqlite_url)
    try:
        db.migrate()
        with db.engine.connect() as conn:
            assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
            assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1
    finally:
        db.dispose()


def test_full_flow_on_both_backends(any_server: Server, repo: Path) -> None:
    api = any_server.api
    env = api.create_env(repo, secrets={"API_KEY": "hunter2"}, env_vars={"MODE": "test"})
    created = api.create_task(env["id"], "Flow", metadata={"best_of_n": 2})
    task_id = created["task"]["id"]
    assert api.get("tasks/list").json()["items"][0]["id"] == task_id
    assert api.get(f"tasks/{task_id}/turns").status_code == 200
    assert api.post(f"tasks/{task_id}/archive").status_code == 200
    assert api.get("tasks/list", params={"task_filter": "archived"}).json()["items"][0]["archived"]
    assert api.post(f"tasks/{task_id}/cancel").status_code == 200
    assert api.patch(f"environments/{env['id']}", json={"label": "renamed"}).status_code == 200
    assert api.get(f"environments/{env['id']}").json()["task_count"] == 1
    assert api.delete(f"tasks/{task_id}").status_code == 200
    with any_server.app_state.db.session() as s:
        assert s.scalars(select(m.Turn)).all() == []  # turns go with their task
        assert len(s.scalars(select(m.UsageEvent)).all()) == 2  # usage does not


def test_writes_are_durable_before_the_response(any_server: Server, repo: Path) -> None:
    api = any_server.api
    env = api.create_env(repo)
    task_id = api.create_task(env["id"])["task"]["id"]
    other = Database(any_server.app_state.db.url)  # a separate engine: another process's view
    try:
        with other.session() as s:
            task = s.get(m.Task, task_id)
            assert task is not None and task.current_turn_id is not None
            assert s.get(m.Turn, task.current_turn_id) is not None
    finally:
        other.dispose()


def test_concurrent_creates_all_succeed(any_server: Server, repo: Path) -> None:
    api = any_server.api
    env = api.create_env(repo)
    errors: list[str] = []

    def worker(i: int) -> None:
        for j in range(3):
            r = api.post(
                "tasks",
                json={
                    "new_task": {"environment_id": env["id"]},
                    "input_items": [
                        {
                            "type": "message",
                            "content": [{"content_type": "text", "text": f"t{i}-{j}"}],
                        }
                    ],
                },
            )
            if r.status_code != 200:
                errors.append(r.text)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(api.get("tasks/list", params={"limit": 100}).json()["items"]) == 12


def test_first_start_race_creates_one_owner(sqlite_url: str) -> None:
    """`wham serve` and `wham token create` starting together agree on one owner."""
    from openwham.service.accounts import ensure_owner_committed

    db = Database(sqlite_url)
    db.migrate()
    results: list[str] = []

    def start() -> None:
        account, _ = ensure_owner_committed(db)
        results.append(account.id)

    threads = [threading.Thread(target=start) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert len(results) == 5 and len(set(results)) == 1
        with db.session() as s:
            assert len(s.scalars(select(m.Account)).all()) == 1
    finally:
        db.dispose()


def test_migration_0004_fills_the_diff_stats_of_stored_turns(database_url: str) -> None:
    """Turns stored before the diff stat columns get them from their bodies; on SQLite the
    table is rebuilt with the body last (0005) and keeps every row."""
    engine = make_engine(database_url)
    cfg = alembic_config(database_url)
    pr = {
        "type": "pr",
        "output_diff": {"diff": "diff --git a/x b/x\n", "files_modified": 1, "lines_added": 7},
    }
    rows = {"t1": [pr], "t2": [], "t3": [{"type": "output_diff", "diff": "d", "lines_removed": 2}]}
    try:
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "0003")
            conn.execute(
                text("INSERT INTO accounts VALUES ('a', 'A', 'pro', 0)"),
            )
            conn.execute(
                text(
                    "INSERT INTO tasks (id, account_id, user_id, title, has_generated_title,"
                    " archived, has_unread_turn, num_follow_ups, body, created_at, updated_at)"
                    " VALUES ('task', 'a', 'u', 't', false, false, false, 0, '{}', 0, 0)"
                )
            )
            for turn_id, items in rows.items():
                conn.execute(
                    text(
                        "INSERT INTO turns (id, task_id, role, discarded, viewed, body,"
                        " created_at, updated_at) VALUES (:id, 'task', 'assistant', false,"
                        " false, :body, 1, 2)"
                    ),
                    {"id": turn_id, "body": json.dumps({"output_items": items})},
                )
        db = Database(database_url)
        try:
            db.migrate()
            with db.session() as s:
                got = {
                    t.id: (
                        t.has_diff,
                        t.diff_files_modified,
                        t.diff_lines_added,
                        t.diff_lines_removed,
                        t.created_at,
                        t.body["output_items"],
                    )
                    for t in s.scalars(select(m.Turn))
                }
        finally:
            db.dispose()
        assert got == {
            "t1": (True, 1, 7, None, 1.0, [pr]),
            "t2": (False, None, None, None, 1.0, []),
            "t3": (True, None, None, 2, 1.0, rows["t3"]),
        }
    finally:
        engine.dispose()


def test_event_ids_are_never_given_again_after_a_delete(database_url: str) -> None:
    """An attempt that starts over loses its events (the newest rows): its new events must
    get larger ids than those deleted, or a reader resuming after an id it saw skips them.
    On SQLite this needs AUTOINCREMENT (migration 0008 rebuilds the table with it, keeping
    the rows and counting on from the largest id)."""
    from openwham.store import events

    engine = make_engine(database_url)
    cfg = alembic_config(database_url)
    try:
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "0007")
            conn.execute(text("INSERT INTO accounts VALUES ('a', 'A', 'pro', 0)"))
            conn.execute(
                text(
                    "INSERT INTO tasks (id, account_id, user_id, title, has_generated_title,"
                    " archived, has_unread_turn, num_follow_ups, body, created_at, updated_at)"
                    " VALUES ('task', 'a', 'u', 't', false, false, false, 0, '{}', 0, 0)"
                )
            )
            for i in range(3):
                conn.execute(
                    text(
                        "INSERT INTO turn_events (task_id, turn_id, item_type, payload,"
                        " created_at) VALUES ('task', 'old', 'log', :p, 0)"
                    ),
                    {"p": json.dumps({"text": f"kept {i}"})},
                )
        db = Database(database_url)
        try:
            db.migrate()
            with db.session() as s:
                kept = [e.id for e in events.read(s, "old")]
                for i in range(4):
                    events.append(s, "task", "turn", events.LOG, {"text": f"first run {i}"})
            with db.session() as s:
                first = [e.id for e in events.read(s, "turn")]
                events.clear(s, "turn", [events.LOG])
                events.append(s, "task", "turn", events.LOG, {"text": "second run"})
            with db.session() as s:
                second = [e.id for e in events.read(s, "turn")]
        finally:
            db.dispose()
        assert len(kept) == 3 and len(first) == 4 and len(second) == 1
        assert max(kept) < min(first)
        assert second[0] > max(first)
    finally:
        engine.dispose()
