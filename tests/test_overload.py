"""Overload: many concurrent requests against a small request pool get an answer (200, or 503
with Retry-After) instead of a stall, ``/healthz`` answers meanwhile, and the server serves
normally afterwards (issue 20, "The stall"); the admission gate's rules; ``/healthz``'s
database field.

The servers here are real uvicorn servers (``support.app_thread``) around ``create_app``, so
requests really run concurrently in AnyIO's worker threads, as under ``wham serve``. Nothing
is timed tightly: before the gate, the burst below left every worker thread waiting for a
connection inside ``get_principal`` and the requests ended in 500s after the pool's 30 s
timeout (or in the client's timeout), which the generous bounds here still catch.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from conftest import make_repo
from openwham.config import Settings
from openwham.server.admission import Gate
from openwham.server.app import create_app
from openwham.server.state import AppState
from openwham.service.accounts import create_api_token, ensure_owner
from support.app_thread import AppThread

PREFIX = "/backend-api/wham"
BURST = 200
# Far above what a served burst takes here (a second or two), far below a stall (30 s).
ANSWER_WITHIN_SECONDS = 20.0


class Running:
    def __init__(self, url: str, state: AppState, token: str, task_id: str, turn_id: str) -> None:
        self.url, self.state, self.token = url, state, token
        self.task_id, self.turn_id = task_id, turn_id


def _serve(tmp_path: Path, database_url: str, **options: Any) -> Iterator[Running]:
    settings = Settings(
        data_dir=tmp_path / "data", database_url=database_url, executor="none", **options
    )
    app = create_app(settings)
    state: AppState = app.state.wham
    with state.db.session() as s:
        account, user = ensure_owner(s)
        _, token = create_api_token(s, state.signing_key, user, account, ttl_seconds=3600)
    server = AppThread()
    url = server.start(app)
    try:
        headers = {"Authorization": f"Bearer {token}"}
        repo = make_repo(tmp_path / "widgets")
        env = httpx.post(
            f"{url}{PREFIX}/environments",
            json={"label": "acme/widgets", "repos": [str(repo)]},
            headers=headers,
            timeout=30,
        )
        assert env.status_code == 201, env.text
        task = httpx.post(
            f"{url}{PREFIX}/tasks",
            json=_task_body(env.json()["id"], "Fix the test"),
            headers=headers,
            timeout=30,
        )
        assert task.status_code == 200, task.text
        yield Running(url, state, token, task.json()["task"]["id"], task.json()["turn"]["id"])
    finally:
        server.stop()
        state.db.dispose()


def _task_body(env_id: str, text: str) -> dict[str, Any]:
    """A ``POST tasks`` body: a new task in ``env_id`` asking ``text``."""
    return {
        "new_task": {"environment_id": env_id},
        "input_items": [
            {"type": "message", "role": "user", "content": [{"content_type": "text", "text": text}]}
        ],
    }


@pytest.fixture
def small_pool(tmp_path: Path, database_url: str) -> Iterator[Running]:
    """A server whose request pool holds two connections (the default queue)."""
    yield from _serve(tmp_path, database_url, db_pool_size=2)


@pytest.fixture
def tiny_queue(tmp_path: Path, database_url: str) -> Iterator[Running]:
    """Two connections and a queue of four: most of a burst must be refused."""
    yield from _serve(tmp_path, database_url, db_pool_size=2, request_queue=4)


async def _burst(srv: Running, n: int) -> tuple[list[tuple[int, dict[str, str]]], Any, float]:
    """``n`` concurrent GETs of the task (and of the task list), one connection each, with
    ``/healthz`` asked while they run; returns (status, headers) of each, the health answer
    and the wall time."""
    headers = {"Authorization": f"Bearer {srv.token}"}
    limits = httpx.Limits(max_connections=n + 1, max_keepalive_connections=0)
    paths = [f"{PREFIX}/tasks/{srv.task_id}", f"{PREFIX}/tasks/list?limit=100"]
    async with httpx.AsyncClient(
        base_url=srv.url, limits=limits, timeout=ANSWER_WITHIN_SECONDS
    ) as client:

        async def one(i: int) -> tuple[int, dict[str, str]]:
            r = await client.get(paths[i % 2], headers=headers)
            return r.status_code, dict(r.headers)

        async def health() -> httpx.Response:
            await asyncio.sleep(0.05)
            return await client.get("/healthz")

        t0 = time.monotonic()
        *answers, healthz = await asyncio.gather(*(one(i) for i in range(n)), health())
        return list(answers), healthz, time.monotonic() - t0


def _check_burst(srv: Running, answers: list[tuple[int, dict[str, str]]], wall: float) -> None:
    statuses = sorted({status for status, _ in answers})
    assert set(statuses) <= {200, 503}, statuses
    assert any(status == 200 for status, _ in answers)
    for status, headers in answers:
        if status == 503:
            assert headers.get("retry-after") == "1"
    assert wall < ANSWER_WITHIN_SECONDS
    # ... and it serves normally afterwards, with nothing left waiting or at work
    r = httpx.get(
        f"{srv.url}{PREFIX}/tasks/{srv.task_id}",
        headers={"Authorization": f"Bearer {srv.token}"},
        timeout=10,
    )
    assert r.status_code == 200
    health = httpx.get(f"{srv.url}/healthz", timeout=10).json()
    assert health["requests"]["active"] == 0 and health["requests"]["waiting"] == 0


def test_burst_against_a_small_pool_is_answered(small_pool: Running) -> None:
    answers, healthz, wall = asyncio.run(_burst(small_pool, BURST))
    _check_burst(small_pool, answers, wall)
    assert healthz.status_code == 200
    body = healthz.json()
    assert body["status"] == "ok" and body["database"] == "ok"
    assert body["requests"]["capacity"] == 2


def test_burst_beyond_the_queue_is_refused_with_retry_after(tiny_queue: Running) -> None:
    answers, healthz, wall = asyncio.run(_burst(tiny_queue, BURST))
    _check_burst(tiny_queue, answers, wall)
    refused = sum(1 for status, _ in answers if status == 503)
    assert refused >= BURST // 2  # at most 2 at work + 4 waiting at any time
    assert healthz.status_code == 200 and healthz.json()["database"] == "ok"
    assert httpx.get(f"{tiny_queue.url}/healthz").json()["requests"]["refused"] >= refused


def test_an_open_stream_holds_no_slot(tmp_path: Path, sqlite_url: str) -> None:
    """A turn stream gives its slot back once its headers are out: with one slot and a
    stream open (the attempt stays pending: no executor), other requests are still served."""
    serving = _serve(tmp_path, sqlite_url, db_pool_size=1, request_queue_seconds=10)
    srv = next(serving)
    try:
        headers = {"Authorization": f"Bearer {srv.token}"}
        stream_url = f"{srv.url}{PREFIX}/tasks/{srv.task_id}/turns/{srv.turn_id}/stream"
        with (
            httpx.Client(timeout=30) as client,
            client.stream("GET", stream_url, headers=headers) as streamed,
        ):
            assert streamed.status_code == 200
            health = client.get(f"{srv.url}/healthz").json()
            assert health["requests"]["active"] == 0
            t0 = time.monotonic()
            r = client.get(f"{srv.url}{PREFIX}/tasks/{srv.task_id}", headers=headers)
            assert r.status_code == 200
            assert time.monotonic() - t0 < 5  # not after the queue's 10 s
    finally:
        serving.close()


# --------------------------------------------------------------------------- the gate


def test_gate_admits_capacity_queues_then_refuses() -> None:
    async def run() -> list[str]:
        seen: list[str] = []
        gate = Gate(capacity=2, queue=1, wait=30)
        assert await gate.acquire() and await gate.acquire()
        async with anyio.create_task_group() as tg:

            async def waiter() -> None:
                seen.append(f"queued:{await gate.acquire()}")

            tg.start_soon(waiter)
            await anyio.wait_all_tasks_blocked()
            assert gate.stats().waiting == 1
            seen.append(f"refused:{not await gate.acquire()}")  # the queue is full
            gate.release()  # handed to the waiter, not freed
        assert gate.stats().active == 2 and gate.stats().waiting == 0
        gate.release()
        gate.release()
        assert gate.stats().active == 0 and gate.stats().refused == 1
        return seen

    assert anyio.run(run) == ["refused:True", "queued:True"]


def test_gate_wait_runs_out_and_cancelled_waiters_leave_no_slot() -> None:
    async def run() -> None:
        gate = Gate(capacity=1, queue=5, wait=0.05)
        assert await gate.acquire()
        assert not await gate.acquire()  # waited 50 ms, then refused
        assert gate.stats().waiting == 0 and gate.stats().refused == 1
        gate.wait = 30
        async with anyio.create_task_group() as tg:
            tg.start_soon(gate.acquire)
            await anyio.wait_all_tasks_blocked()
            tg.cancel_scope.cancel()
        assert gate.stats().waiting == 0
        gate.release()
        assert gate.stats().active == 0
        assert await gate.acquire()  # the slot is there, not lost to the cancelled waiter

    anyio.run(run)


# --------------------------------------------------------------------------- /healthz


def test_healthz_reports_a_database_that_does_not_answer(tmp_path: Path) -> None:
    """The database goes away under a running server: /healthz answers 503 ``degraded``
    with ``database: unavailable`` (within its probe's timeout) instead of hanging or 200."""
    import psycopg
    from sqlalchemy.engine import make_url

    from conftest import postgres_database

    with postgres_database() as url:
        serving = _serve(tmp_path, url)
        srv = next(serving)
        try:
            first = httpx.get(f"{srv.url}/healthz", timeout=10)
            assert first.status_code == 200
            assert first.json()["status"] == "ok" and first.json()["database"] == "ok"
            name = make_url(url).database
            plain = url.replace("postgresql+psycopg://", "postgresql://")
            with psycopg.connect(plain.rsplit("/", 1)[0] + "/postgres", autocommit=True) as c:
                c.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
            time.sleep(1.1)  # past the probe's kept answer
            r = httpx.get(f"{srv.url}/healthz", timeout=10)
            assert r.status_code == 503
            body = r.json()
            assert body["status"] == "degraded" and body["database"] == "unavailable"
            assert body["version"] and body["requests"]["capacity"] >= 1
        finally:
            serving.close()


@pytest.mark.parametrize("holder", ["another process", "this process"])
def test_a_write_that_cannot_get_sqlites_lock_is_answered_503_and_changes_nothing(
    tmp_path: Path, sqlite_url: str, monkeypatch: pytest.MonkeyPatch, holder: str
) -> None:
    """Another writer holds SQLite's write lock past the busy timeout (as 32 attempts'
    work logs did in a burst): a new task is refused with 503 and Retry-After, not a 500,
    nothing of it is stored, reads still answer meanwhile, and it works once the lock goes.
    A writer of another process holds SQLite's own lock; one of this process (the engine's
    pool) holds the process's queue for it first (``store.sqlitelock``): the same answer."""
    import sqlite3

    from sqlalchemy import text

    from openwham.store import db as store_db

    monkeypatch.setattr(store_db, "SQLITE_BUSY_TIMEOUT_MS", 300)
    serving = _serve(tmp_path, sqlite_url)
    srv = next(serving)
    headers = {"Authorization": f"Bearer {srv.token}"}
    task = httpx.get(f"{srv.url}{PREFIX}/tasks/{srv.task_id}", headers=headers, timeout=10)
    body = _task_body(task.json()["task"]["environment_id"], "x")

    def count() -> int:
        r = httpx.get(f"{srv.url}{PREFIX}/tasks/list", headers=headers, timeout=10)
        return len(r.json()["items"])

    try:
        before = count()
        if holder == "another process":
            outside = sqlite3.connect(sqlite_url.split("///", 1)[1], isolation_level=None)
            outside.execute("BEGIN IMMEDIATE")  # the write lock, held
            release = outside.rollback
            close = outside.close
        else:
            inside = srv.state.db.engine.connect()
            inside.execute(text("UPDATE tasks SET updated_at = updated_at"))  # held
            release = inside.rollback
            close = inside.close
        try:
            started = time.monotonic()
            r = httpx.post(f"{srv.url}{PREFIX}/tasks", json=body, headers=headers, timeout=20)
            assert r.status_code == 503, r.text
            assert r.headers["retry-after"] == "1" and "busy" in r.json()["detail"]
            assert time.monotonic() - started < 10
            details = httpx.get(
                f"{srv.url}{PREFIX}/tasks/{srv.task_id}", headers=headers, timeout=10
            )
            assert details.status_code == 200  # WAL: readers are not held up
        finally:
            release()
            close()
        assert count() == before
        r = httpx.post(f"{srv.url}{PREFIX}/tasks", json=body, headers=headers, timeout=20)
        assert r.status_code == 200, r.text
        assert count() == before + 1
    finally:
        serving.close()


def test_post_tasks_writes_on_the_writer_thread_and_renders_after_its_commit(
    tmp_path: Path, sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``POST tasks`` holds SQLite's write lock only for the rate limit's check and its
    writes, and only on the database's writer thread (``store.groupcommit``): the branch
    check (git on the mirror, else the remote, with the account's git credential) and the
    environment's task count come before, in the request's thread without the lock; the
    rate limit's read for the response and its rendering after the commit. (32 tasks posted
    at once held the lock ~190 ms each, then 64 to 82 ms each in request threads, outside the
    writer's batches, and the attempts' claims and events waited.)"""
    from sqlalchemy import event

    from openwham.service import tasks as service_tasks
    from openwham.store import sqlitelock

    lock = sqlitelock.lock_for(sqlite_url.split("///", 1)[1])
    assert lock is not None
    held: list[bool] = []
    render = service_tasks.render_task

    def watched(*args: Any, **kwargs: Any) -> Any:
        held.append(lock._held)
        return render(*args, **kwargs)

    monkeypatch.setattr(service_tasks, "render_task", watched)
    serving = _serve(tmp_path, sqlite_url)
    srv = next(serving)
    try:
        assert held == [False]  # the fixture's own task
        held.clear()
        statements: list[tuple[bool, str, str]] = []

        def seen(_c: Any, _cur: Any, statement: str, *_: Any) -> None:
            statements.append((lock._held, threading.current_thread().name, statement))

        db = srv.state.db
        for engine in (db.request_engine, db.engine):
            event.listen(engine, "before_cursor_execute", seen)
        headers = {"Authorization": f"Bearer {srv.token}"}
        task = httpx.get(f"{srv.url}{PREFIX}/tasks/{srv.task_id}", headers=headers, timeout=10)
        statements.clear()
        r = httpx.post(
            f"{srv.url}{PREFIX}/tasks",
            json=_task_body(task.json()["task"]["environment_id"], "x"),
            headers=headers,
            timeout=20,
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["task"]["id"] and body["turn"]["turn_status"] == "pending"
        assert body["turn"]["id"] == body["task"]["current_turn_id"]
        assert body["rate_limit"] is not None
        assert held and not any(held)
        writer = [(lock_held, sql) for lock_held, name, sql in statements if name == WRITER]
        others = [sql for lock_held, name, sql in statements if name != WRITER]
        assert not any(lock_held for lock_held, name, _ in statements if name != WRITER)
        assert not any(sql.split(None, 1)[0] in ("INSERT", "UPDATE") for sql in others)
        # on the writer: the account's lock (usage.check: the lock taken as it runs), its two
        # usage counts, then writes only
        assert [sql.split(None, 1)[0] for _, sql in writer[1:]] == [
            "SELECT",  # the usage windows
            "SELECT",
            "INSERT",  # the task
            "INSERT",  # the user turn and the attempt
            "UPDATE",  # the environment's last use
            "INSERT",  # the usage event
        ], writer
        assert writer[0][1].startswith("UPDATE accounts") and all(h for h, _ in writer[1:])
        assert "usage_events" in writer[1][1] and "usage_events" in writer[2][1]
    finally:
        serving.close()


WRITER = "wham-sqlite-writer"


def test_task_details_and_lists_cost_one_statement(tmp_path: Path, sqlite_url: str) -> None:
    """A hot read is one statement: the token's row, its user and the account
    (``accounts.principal_cte``, read on every request), with task details' task, its
    environment's label and its turns (one state of all; it was four statements, then two),
    or with a list page's tasks and each one's current attempt and siblings (it was three:
    the token, the page, the turns by an expanding ``IN``)."""
    from sqlalchemy import event

    serving = _serve(tmp_path, sqlite_url)
    srv = next(serving)
    try:
        statements: list[str] = []

        def seen(_c: Any, _cur: Any, statement: str, *_: Any) -> None:
            statements.append(statement)

        engine = srv.state.db.request_engine
        headers = {"Authorization": f"Bearer {srv.token}"}
        for path in (f"tasks/{srv.task_id}", "tasks/list?limit=100"):
            statements.clear()
            event.listen(engine, "before_cursor_execute", seen)
            try:
                r = httpx.get(f"{srv.url}{PREFIX}/{path}", headers=headers, timeout=10)
            finally:
                event.remove(engine, "before_cursor_execute", seen)
            assert r.status_code == 200
            assert len(statements) == 1, (path, statements)
            for table in ("api_tokens", "memberships", " tasks", "JOIN turns"):
                assert table in statements[0], (path, table, statements[0])
    finally:
        serving.close()


def test_task_details_load_no_orm_objects(tmp_path: Path, sqlite_url: str) -> None:
    """The hot read authenticates with Core columns (``accounts.authenticate_for_read``):
    loading the token, user and account as ORM objects, and rolling back a session holding
    them, cost about a fifth of a cached request. Revocation is still read on every request
    (tests/test_hotpath.py, tests/test_auth.py)."""
    from sqlalchemy import event

    from openwham.store import models as m

    serving = _serve(tmp_path, sqlite_url)
    srv = next(serving)
    try:
        loaded: list[str] = []

        def seen(target: Any, _context: Any) -> None:
            loaded.append(type(target).__name__)

        for model in (m.ApiToken, m.User, m.Account, m.Task, m.Turn):
            event.listen(model, "load", seen)
        try:
            r = httpx.get(
                f"{srv.url}{PREFIX}/tasks/{srv.task_id}",
                headers={"Authorization": f"Bearer {srv.token}"},
                timeout=10,
            )
        finally:
            for model in (m.ApiToken, m.User, m.Account, m.Task, m.Turn):
                event.remove(model, "load", seen)
        assert r.status_code == 200
        assert loaded == []
    finally:
        serving.close()


def test_only_models_that_omit_keys_carry_a_python_serializer() -> None:
    """A Python model serializer on every wire model made serialising a task several times
    slower; only ``OmittingWireModel``s have one, and ``omit_when_unset`` needs that base."""
    from pydantic import BaseModel

    from openwham.wire import AssistantTurn, TaskDetails, WorklogMessage
    from openwham.wire.base import OmittingWireModel, WireModel

    models: list[type[BaseModel]] = [TaskDetails, AssistantTurn, WorklogMessage]
    for model in models:
        assert not model.__pydantic_decorators__.model_serializers, model
    with pytest.raises(TypeError, match="OmittingWireModel"):

        class Bad(WireModel):
            omit_when_unset = ("x",)

    class Good(OmittingWireModel):
        omit_when_unset = ("x",)
        x: int | None = None

    assert Good().model_dump() == {} and Good(x=None).model_dump() == {"x": None}


def test_hot_reads_take_one_worker_thread_for_their_dependencies() -> None:
    """Every sync dependency is a worker-thread hand-off of its own (a class dependency too):
    task details and the task lists have none (``deps.Reader`` opens the session,
    authenticates and reads in one call; tests/test_render_cache.py counts the calls)."""
    import inspect

    from fastapi.routing import APIRoute

    from openwham.server.routers import tasks as task_routes

    def calls(dep: Any) -> Iterator[Any]:
        for sub in dep.dependencies:
            if sub.call is not None:
                yield sub.call
            yield from calls(sub)

    def runs_on_the_loop(call: Any) -> bool:
        if inspect.isclass(call):
            return False
        if inspect.isfunction(call):
            return inspect.iscoroutinefunction(call) or inspect.isasyncgenfunction(call)
        return inspect.iscoroutinefunction(type(call).__call__)  # e.g. HTTPBearer

    checked = 0
    for route in task_routes.router.routes:
        if not isinstance(route, APIRoute) or "GET" not in route.methods:
            continue
        if route.path not in ("/tasks/{task_id}", "/tasks/list", "/tasks"):
            continue
        checked += 1
        sync = {
            getattr(call, "__name__", repr(call))
            for call in calls(route.dependant)
            if not runs_on_the_loop(call)
        }
        assert sync == set(), (route.path, sync)
    assert checked == 3


async def _twelve_task_details(srv: Running) -> list[int]:
    """Twelve concurrent ``GET tasks/{id}``: their statuses."""
    headers = {"Authorization": f"Bearer {srv.token}"}
    async with httpx.AsyncClient(base_url=srv.url, timeout=30) as client:
        answers = await asyncio.gather(
            *(client.get(f"{PREFIX}/tasks/{srv.task_id}", headers=headers) for _ in range(12))
        )
    return [r.status_code for r in answers]


def test_hot_reads_work_in_at_most_read_threads_threads_at_once(
    tmp_path: Path, sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Twelve concurrent task details with ``WHAM_READ_THREADS=2`` and room for eight in the
    gate: all are answered, never more than two read in threads at once (more only take turns
    on the GIL with the event loop: docs/benchmarks.md), the others wait on the loop."""
    from openwham.service import tasks as task_service

    inside = peak = 0
    lock = threading.Lock()
    real = task_service.details_json_authed

    def counted(*args: Any, **kwargs: Any) -> Any:
        nonlocal inside, peak
        with lock:
            inside += 1
            peak = max(peak, inside)
        try:
            time.sleep(0.05)
            return real(*args, **kwargs)
        finally:
            with lock:
                inside -= 1

    monkeypatch.setattr(task_service, "details_json_authed", counted)

    for srv in _serve(tmp_path, sqlite_url, db_pool_size=8, read_threads=2):
        assert asyncio.run(_twelve_task_details(srv)) == [200] * 12
    assert peak == 2


def test_queued_hot_reads_go_on_while_the_event_loop_is_busy(
    tmp_path: Path, sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reads queued behind a busy read thread are taken by that thread, not handed over one
    by one by the event loop (each hand-off cost the loop's time under a burst): with the
    loop held for 3 s right after the first of twelve task details, the other eleven are
    read meanwhile (before: they waited for the loop to hand each one over)."""
    from openwham.server import hotpath
    from openwham.service import tasks as task_service

    loops: list[asyncio.AbstractEventLoop] = []
    starts: list[float] = []
    held_at: list[float] = []
    real_route, real_read = hotpath.task_details, task_service.details_json_authed

    async def on_the_loop(*args: Any, **kwargs: Any) -> Any:
        loops.append(asyncio.get_running_loop())
        return await real_route(*args, **kwargs)

    def read(*args: Any, **kwargs: Any) -> Any:
        starts.append(time.monotonic())
        if len(starts) == 1:  # once the twelve are queued, hold the loop for 3 s
            deadline = time.monotonic() + 30
            while len(loops) < 12 and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.2)
            held_at.append(time.monotonic())
            loops[0].call_soon_threadsafe(time.sleep, 3.0)
        return real_read(*args, **kwargs)

    monkeypatch.setattr(hotpath, "task_details", on_the_loop)
    monkeypatch.setattr(task_service, "details_json_authed", read)

    for srv in _serve(tmp_path, sqlite_url, db_pool_size=16, read_threads=1):
        assert asyncio.run(_twelve_task_details(srv)) == [200] * 12
    assert len(loops) == 12 and len(starts) == 12
    assert max(starts) < held_at[0] + 2.0, [round(t - held_at[0], 2) for t in starts]


def test_read_threads_default_by_database_and_never_above_the_pool(tmp_path: Path) -> None:
    from openwham.server.state import read_threads

    sqlite = Settings(data_dir=tmp_path)
    assert read_threads(sqlite) == 2
    pg = Settings(data_dir=tmp_path, database_url="postgresql+psycopg://u@h/db")
    assert read_threads(pg) == 4
    assert read_threads(Settings(data_dir=tmp_path, read_threads=8, db_pool_size=3)) == 3
    assert read_threads(Settings(data_dir=tmp_path, read_threads=1)) == 1


# --------------------------------------------------------------------------- PostgreSQL round trips


class _RoundTrips:
    """Counts an engine's round trips to PostgreSQL: libpq's protocol trace of every
    connection it opens from now on, one ``ReadyForQuery`` per round trip (a pool pre-ping,
    ``BEGIN`` and ``ROLLBACK`` included, which SQLAlchemy's statement events do not see).
    The pool is emptied first, so that every connection it hands out is traced."""

    def __init__(self, engine: Any, trace_dir: Path) -> None:
        from sqlalchemy import event

        self.trace_dir, self.files, self.marks = trace_dir, list[Path](), dict[Path, int]()
        engine.dispose()
        event.listen(engine, "connect", self._connect)

    def _connect(self, dbapi_conn: Any, _record: Any) -> None:
        from psycopg import pq

        path = self.trace_dir / f"trace-{len(self.files)}"
        self.files.append(path)
        dbapi_conn._wham_trace = path.open("wb")  # closed with the connection
        dbapi_conn.pgconn.trace(dbapi_conn._wham_trace.fileno())
        dbapi_conn.pgconn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS | pq.Trace.REGRESS_MODE)

    def mark(self) -> None:
        self.marks = {path: len(self._lines(path)) for path in self.files}

    def _lines(self, path: Path) -> list[str]:
        return path.read_text(errors="replace").splitlines()

    def since_mark(self) -> list[str]:
        return [line for p in self.files for line in self._lines(p)[self.marks.get(p, 0) :]]

    def count(self) -> int:
        return sum(1 for line in self.since_mark() if "\tReadyForQuery\t" in line)


def test_task_details_on_postgresql_take_few_round_trips(tmp_path: Path, postgres_url: str) -> None:
    """A cached task details read, and a list page, on PostgreSQL: no pool pre-ping
    (``SELECT 1``), no ``BEGIN``/``ROLLBACK`` around a read (AUTOCOMMIT), the token's row
    and the data in one statement: one round trip (each is a wake-up of the server process
    on a busy machine; it was 7, then 2)."""
    serving = _serve(tmp_path, postgres_url)
    srv = next(serving)
    try:
        headers = {"Authorization": f"Bearer {srv.token}"}
        trips = _RoundTrips(srv.state.db.request_engine, tmp_path)
        for path in (f"tasks/{srv.task_id}", "tasks/list?limit=100"):
            url = f"{srv.url}{PREFIX}/{path}"
            assert httpx.get(url, headers=headers, timeout=10).status_code == 200
            trips.mark()
            assert httpx.get(url, headers=headers, timeout=10).status_code == 200
            print("\n".join(trips.since_mark()))
            assert trips.count() <= 1, (path, trips.since_mark())
    finally:
        serving.close()


def test_pooled_connections_the_server_closed_are_replaced_at_checkout(
    tmp_path: Path, postgres_url: str
) -> None:
    """Without a pre-ping, a pooled connection whose backend went away (a restarted or
    terminated server process) is found at checkout by its readable socket and replaced, so
    no request gets an error for it (``store.db._closed_by_the_server``)."""
    import psycopg
    from sqlalchemy import make_url

    serving = _serve(tmp_path, postgres_url)
    srv = next(serving)
    try:
        headers = {"Authorization": f"Bearer {srv.token}"}
        paths = [f"{PREFIX}/environments", f"{PREFIX}/tasks/list", f"{PREFIX}/tasks/{srv.task_id}"]
        for path in paths:
            assert httpx.get(f"{srv.url}{path}", headers=headers, timeout=10).status_code == 200
        url = make_url(postgres_url)
        admin = url.set(drivername="postgresql").render_as_string(hide_password=False)
        with psycopg.connect(admin, autocommit=True) as conn:
            ended = conn.execute(
                "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid, 5000))"
                " FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                (url.database,),
            ).fetchone()
        assert ended is not None and ended[0] >= 1
        for _ in range(3):
            for path in paths:
                r = httpx.get(f"{srv.url}{path}", headers=headers, timeout=10)
                assert r.status_code == 200, (path, r.status_code, r.text)
    finally:
        serving.close()
