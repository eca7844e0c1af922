"""Application commands (openwham.commands) hand attempts to the executor in two steps:
``enqueue`` inside the transaction that writes them (a queue defers its jobs there, so there
is no task without its job), ``submit`` after the commit. Routers call the commands."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from conftest import Server, finish_turn
from openwham.commands import Deps
from openwham.commands import tasks as commands
from openwham.service.accounts import Principal, ensure_owner
from openwham.service.errors import Unavailable
from openwham.store import models as m
from support.browser import sign_in


@dataclass
class Recording:
    """An executor handle that records what commands hand it and what the database held."""

    server: Server
    problem: str | None = None
    fail_enqueue: bool = False
    calls: list[tuple[str, list[str], bool, bool]] = field(default_factory=list)

    def _seen(self, session: Session | None, ids: list[str]) -> tuple[bool, bool]:
        """(visible in the writing session, visible to another connection)."""
        mine = session is not None and all(session.get(m.Turn, i) is not None for i in ids)
        with self.server.app_state.db.session() as other:
            found = other.scalars(select(m.Turn.id).where(m.Turn.id.in_(ids))).all()
        return mine, len(found) == len(ids)

    def enqueue(self, session: Session, turn_ids: Iterable[str]) -> None:
        ids = list(turn_ids)
        self.calls.append(("enqueue", ids, *self._seen(session, ids)))
        if self.fail_enqueue:
            raise RuntimeError("the queue refused the jobs")

    def submit(self, turn_ids: Iterable[str]) -> None:
        ids = list(turn_ids)
        self.calls.append(("submit", ids, *self._seen(None, ids)))

    def cancel(self, turn_ids: Iterable[str]) -> None:
        self.calls.append(("cancel", list(turn_ids), False, False))

    def drop_stale_setup_cache(self, env_id: str) -> None:
        self.calls.append(("drop_stale_setup_cache", [env_id], False, False))


def _deps(server: Server, executor: Recording) -> Deps:
    state = server.app_state
    return Deps(state.settings, state.bus, state.artifacts, state.locks, executor, state.db.writes)


def _body(env_id: str, n: int = 1) -> dict[str, object]:
    return {
        "new_task": {"environment_id": env_id},
        "input_items": [
            {"type": "message", "role": "user", "content": [{"content_type": "text", "text": "Hi"}]}
        ],
        "metadata": {"best_of_n": n},
    }


def test_create_enqueues_in_the_transaction_and_submits_after_commit(
    any_server: Server, repo: Path
) -> None:
    env = any_server.api.create_env(repo)
    rec = Recording(any_server)
    with any_server.app_state.db.session() as s:
        principal = _owner(s)
        created = commands.create(s, _deps(any_server, rec), principal, _body(env["id"], 2))
    ids = created.attempt_ids
    assert len(ids) == 2
    # enqueue saw the attempts in its own transaction, uncommitted; submit after the commit
    assert rec.calls == [("enqueue", ids, True, False), ("submit", ids, False, True)]


def test_a_refused_enqueue_leaves_no_task(any_server: Server, repo: Path) -> None:
    env = any_server.api.create_env(repo)
    rec = Recording(any_server, fail_enqueue=True)
    with pytest.raises(RuntimeError), any_server.app_state.db.session() as s:
        principal = _owner(s)
        commands.create(s, _deps(any_server, rec), principal, _body(env["id"]))
    assert [c[0] for c in rec.calls] == ["enqueue"]
    with any_server.app_state.db.session() as s:
        assert s.scalars(select(m.Task.id)).all() == []


def test_routes_go_through_the_commands(server: Server, repo: Path) -> None:
    """``POST tasks``, a follow-up, ``recover`` and ``cancel`` through the API hand their
    attempts to the app's executor handle the same way."""
    rec = Recording(server)
    server.app_state.runner = rec  # type: ignore[assignment]
    api = server.api
    env = api.create_env(repo)
    created = api.create_task(env["id"])
    task_id, turn_id = created["task"]["id"], created["turn"]["id"]
    assert rec.calls == [("enqueue", [turn_id], True, False), ("submit", [turn_id], False, True)]

    rec.calls.clear()
    finish_turn(server, turn_id, "failed")
    assert api.post(f"tasks/{task_id}/recover").status_code == 200
    assert rec.calls == [("enqueue", [turn_id], True, True), ("submit", [turn_id], False, True)]

    rec.calls.clear()
    r = api.post(f"tasks/{task_id}/cancel")
    assert r.json()["cancelled_turn_ids"] == [turn_id]
    assert rec.calls == [("cancel", [turn_id], False, False)]

    rec.calls.clear()
    finish_turn(server, turn_id)
    follow = api.follow_up(task_id, turn_id, "More")
    new = follow["turn"]["id"]
    assert rec.calls == [("enqueue", [new], True, False), ("submit", [new], False, True)]


def test_a_server_that_cannot_run_tasks_refuses_them(server: Server, repo: Path) -> None:
    rec = Recording(server, problem="This server cannot run tasks: no bubblewrap")
    env = server.api.create_env(repo)
    with server.app_state.db.session() as s:
        principal = _owner(s)
        with pytest.raises(Unavailable, match="no bubblewrap"):
            commands.create(s, _deps(server, rec), principal, _body(env["id"]))
    server.app_state.runner = rec  # type: ignore[assignment]
    r = server.api.post("tasks", json=_body(env["id"]))
    assert r.status_code == 503 and "no bubblewrap" in r.json()["detail"]
    assert rec.calls == []


def _owner(s: Session) -> Principal:
    account, user = ensure_owner(s)
    return Principal(user=user, account=account)


def test_web_pages_go_through_the_commands(server: Server, repo: Path) -> None:
    """The browser's new task, follow-up and cancel take the commands' path (enqueue in the
    transaction, submit after it, cancel stops), not a route handler's JSON."""
    rec = Recording(server)
    server.app_state.runner = rec  # type: ignore[assignment]
    client = server.api.client
    env = server.api.create_env(repo)
    csrf = sign_in(client, server.api.token or "")
    r = client.post(
        "/tasks",
        data={"csrf": csrf, "prompt": "Fix it", "environment_id": env["id"], "attempts": "2"},
        follow_redirects=False,
    )
    assert r.status_code == 303, r.text
    task_id = r.headers["location"].rsplit("/", 1)[-1]
    with server.app_state.db.session() as s:
        ids = sorted(s.scalars(select(m.Turn.id).where(m.Turn.task_id == task_id)).all())
    attempts = [i for i in ids if "~assttrn_" in i]
    assert len(attempts) == 2
    assert [(c[0], sorted(c[1]), c[2], c[3]) for c in rec.calls] == [
        ("enqueue", attempts, True, False),
        ("submit", attempts, False, True),
    ]

    rec.calls.clear()
    r = client.post(
        f"/tasks/{task_id}/action",
        data={"csrf": csrf, "action": "cancel"},
        follow_redirects=False,
    )
    assert r.status_code == 303
    assert [(c[0], sorted(c[1])) for c in rec.calls] == [("cancel", attempts)]

    rec.calls.clear()
    rec.problem = "This server cannot run tasks: no bubblewrap"
    r = client.post("/tasks", data={"csrf": csrf, "prompt": "Again", "environment_id": env["id"]})
    assert r.status_code == 503 and "no bubblewrap" in r.text
    assert rec.calls == []
