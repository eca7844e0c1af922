"""The queue executor's job store (``WHAM_EXECUTOR=queue``) on a real PostgreSQL, in-process:
jobs commit with their attempts, the schema applies once, the safety sweep finds attempts
without a job, a cancel asks for the job's abort, and anything but PostgreSQL is refused at
start. The multi-process acceptance tests (workers, SIGKILL, SIGTERM) are in
``test_queue_nodes.py``."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from conftest import WHAM, Server, make_repo, make_server
from openwham.config import Settings
from openwham.server.app import create_app
from openwham.store import jobs
from openwham.store.db import Database
from openwham.store.status import TurnStatus

pytestmark = pytest.mark.postgres


@pytest.fixture
def api_node(tmp_path: Path, postgres_url: str) -> Iterator[Server]:
    """An API-only node of the queue executor: attempts become jobs, nothing runs them."""
    yield from make_server(tmp_path, postgres_url, executor="queue", executor_concurrency=0)


def _jobs(db: Database) -> list[dict[str, Any]]:
    with db.engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT id, queueing_lock, status, task_name, queue_name, args "
                "FROM procrastinate_jobs ORDER BY id"
            )
        )
        return [dict(r._mapping) for r in rows]


def test_each_attempt_gets_its_job_in_the_transaction_that_creates_it(
    api_node: Server, tmp_path: Path
) -> None:
    env = api_node.api.create_env(make_repo(tmp_path / "repo"))
    api_node.api.create_task(env["id"], metadata={"best_of_n": 2})
    with api_node.app_state.db.session() as s:
        attempts = s.scalars(
            text("SELECT id FROM turns WHERE role = 'assistant' ORDER BY attempt_placement")
        ).all()
    assert len(attempts) == 2
    found = _jobs(api_node.app_state.db)
    assert [j["queueing_lock"] for j in found] == list(attempts)
    for job, turn_id in zip(found, attempts, strict=True):
        assert job["status"] == "todo"
        assert (job["task_name"], job["queue_name"]) == (jobs.TASK, jobs.QUEUE)
        assert job["args"] == {"turn_id": turn_id}


def test_a_rolled_back_creation_leaves_no_job_and_a_second_defer_keeps_one(
    api_node: Server,
) -> None:
    db = api_node.app_state.db
    with db.sessions() as s:
        jobs.defer(s, ["turn-that-never-was"])
        assert len(_jobs(db)) == 0  # not visible before the commit
        s.rollback()
    assert _jobs(db) == []
    with db.session() as s:
        jobs.defer(s, ["turn-a", "turn-b"])
    with db.session() as s:  # a waiting job per attempt: deferring again changes nothing
        jobs.defer(s, ["turn-a", "turn-c"])
    assert sorted(j["queueing_lock"] for j in _jobs(db)) == ["turn-a", "turn-b", "turn-c"]


def test_the_safety_sweep_finds_pending_attempts_without_a_job(
    api_node: Server, tmp_path: Path
) -> None:
    env = api_node.api.create_env(make_repo(tmp_path / "repo"))
    api_node.api.create_task(env["id"])
    db = api_node.app_state.db
    with db.session() as s:
        assert jobs.without_job(s) == []
        s.execute(text("DELETE FROM procrastinate_jobs"))  # e.g. created while no queue ran
    with db.session() as s:
        orphans = jobs.without_job(s)
        pending = s.scalars(
            text("SELECT id FROM turns WHERE role = 'assistant' AND turn_status = :p"),
            {"p": TurnStatus.PENDING.value},
        ).all()
        assert orphans == list(pending) and len(orphans) == 1
        jobs.defer(s, orphans)
    with db.session() as s:
        assert jobs.without_job(s) == []


def test_cancel_on_an_api_node_asks_the_job_to_abort(api_node: Server, tmp_path: Path) -> None:
    env = api_node.api.create_env(make_repo(tmp_path / "repo"))
    task_id = api_node.api.create_task(env["id"])["task"]["id"]
    db = api_node.app_state.db
    with db.session() as s:  # as if a worker had fetched it
        s.execute(text("UPDATE procrastinate_jobs SET status = 'doing'"))
    r = api_node.api.post(f"tasks/{task_id}/cancel")
    assert r.status_code == 200, r.text
    assert len(r.json()["cancelled_turn_ids"]) == 1
    with db.engine.connect() as conn:
        asked = conn.execute(text("SELECT abort_requested FROM procrastinate_jobs")).scalars().all()
    assert asked == [True]


def test_the_schema_applies_once_and_again_is_a_no_op(postgres_url: str) -> None:
    db = Database(postgres_url)
    try:
        assert jobs.apply_schema(db) is True
        assert jobs.apply_schema(db) is False
        with db.session() as s:
            jobs.defer(s, ["t1"])
        assert [j["queueing_lock"] for j in _jobs(db)] == ["t1"]
    finally:
        db.dispose()


def test_the_queue_executor_is_refused_on_sqlite_at_start(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", executor="queue")
    with pytest.raises(jobs.QueueConfigError, match="WHAM_EXECUTOR=queue needs PostgreSQL"):
        create_app(settings)
    env = {**os.environ, "WHAM_EXECUTOR": "queue", "WHAM_DATA_DIR": str(tmp_path / "d2")}
    env.pop("WHAM_DATABASE_URL", None)
    out = subprocess.run(
        [str(WHAM), "serve", "--port", "0"], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 1
    assert "WHAM_EXECUTOR=queue needs PostgreSQL" in out.stderr
    out = subprocess.run(
        [str(WHAM), "worker", "--data-dir", str(tmp_path / "d3")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1
    assert "WHAM_DATABASE_URL" in out.stderr


def test_a_recovered_attempt_gets_a_new_job_with_its_requeue(
    api_node: Server, tmp_path: Path
) -> None:
    env = api_node.api.create_env(make_repo(tmp_path / "repo"))
    task_id = api_node.api.create_task(env["id"])["task"]["id"]
    assert api_node.api.post(f"tasks/{task_id}/cancel").status_code == 200
    db = api_node.app_state.db
    assert [j["status"] for j in _jobs(db)] == ["cancelled"]  # its waiting job went too
    r = api_node.api.post(f"tasks/{task_id}/recover")
    assert r.status_code == 200, r.text
    found = _jobs(db)
    assert [j["status"] for j in found] == ["cancelled", "todo"]
    assert found[0]["queueing_lock"] == found[1]["queueing_lock"]
    with db.session() as s:
        assert jobs.without_job(s) == []


def test_standby_offers_route_jobs_and_unclaimed_routed_jobs_go_back(api_node: Server) -> None:
    db = api_node.app_state.db
    now = time.time()
    with db.session() as s:
        jobs.offer(s, "node-a", {"k1": 1}, free=1, now=now)
        jobs.offer(s, "node-b", {"k1": 1}, free=0, now=now)  # busy: no slot for it
        jobs.offer(s, "node-c", {"k2": 2}, free=2, now=now - 60)  # stale
    with db.sessions() as s:
        assert jobs.holder(s, "k1", besides="node-x", since=now - 15) == "node-a"
        assert jobs.holder(s, "k1", besides="node-a", since=now - 15) is None
        assert jobs.holder(s, "k2", besides="node-x", since=now - 15) is None
    with db.session() as s:
        jobs.defer(s, ["turn-r"], node="node-a")
    (job,) = _jobs(db)
    assert (job["queue_name"], job["args"]) == (
        "attempts.node-a",
        {"turn_id": "turn-r", "routed": True},
    )
    with db.session() as s:
        assert jobs.unroute_stale(s, 60.0) == 0  # its worker has a while to take it
    with db.session() as s:
        assert jobs.unroute_stale(s, 0.0) == 1
    assert [j["queue_name"] for j in _jobs(db)] == [jobs.QUEUE]
    with db.session() as s:
        jobs.withdraw(s, "node-a")
    with db.sessions() as s:
        assert jobs.holder(s, "k1", besides="node-x", since=now - 15) is None


@pytest.mark.parametrize("tries", [1, 2], ids=["run-again", "out-of-tries"])
def test_a_stalled_workers_attempt_runs_again_or_fails_with_the_reason(
    api_node: Server, tmp_path: Path, tries: int
) -> None:
    """A worker died mid-attempt on another machine: its procrastinate heartbeat and the
    attempt's own are old. The sweep of a live worker requeues the attempt and retries the
    job while tries are left (``WHAM_ATTEMPT_MAX_TRIES=2``), else fails the attempt with
    ``executor_lost`` and the reason, and ends the job."""
    import asyncio

    from openwham.engine.attempt import Engine
    from openwham.engine.queue import QueueExecutor
    from openwham.store.events import LocalEventBus

    env = api_node.api.create_env(make_repo(tmp_path / "repo"))
    task_id = api_node.api.create_task(env["id"])["task"]["id"]
    db = api_node.app_state.db
    with db.session() as s:
        turn_id = s.scalar(text("SELECT id FROM turns WHERE role = 'assistant'"))
        worker = s.scalar(
            text(
                "INSERT INTO procrastinate_workers (last_heartbeat) "
                "VALUES (now() - interval '5 minutes') RETURNING id"
            )
        )
        s.execute(
            text("UPDATE procrastinate_jobs SET status = 'doing', worker_id = :w"), {"w": worker}
        )
        body = {"run": {"executor": "elsewhere:1:gone", "tries": tries}}
        s.execute(
            text(
                "UPDATE turns SET turn_status = 'in_progress', updated_at = 1.0, "
                "body = CAST(:body AS json) WHERE id = :id"
            ),
            {"body": json.dumps(body), "id": turn_id},
        )
    settings = Settings(data_dir=tmp_path / "worker", database_url=str(db.url), executor="queue")
    engine = Engine(settings, db, LocalEventBus(), None, None)
    executor = QueueExecutor(engine, 1)

    async def sweep() -> None:
        async with executor.app.open_async():
            await executor._sweep()

    try:
        asyncio.run(sweep())
    finally:
        engine.close()
    (job,) = _jobs(db)
    turn = api_node.api.get(f"tasks/{task_id}").json()["current_assistant_turn"]
    if tries == 1:
        assert turn["turn_status"] == "pending"
        assert job["status"] == "todo"  # any worker takes it again
    else:
        assert turn["turn_status"] == "failed"
        assert turn["error"]["code"] == "executor_lost"
        assert "stopped 2 time(s)" in turn["error"]["message"]
        assert job["status"] == "failed"
