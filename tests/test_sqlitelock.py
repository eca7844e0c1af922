"""SQLite writers of one process are served in the order they asked (``store.sqlitelock``):
a writer that waits is never overtaken by writers that came after it (SQLite's busy handler
let them: it sleeps up to 100 ms between tries, and a later writer took the lock between
them, which made single event inserts wait 4.5 to 10.8 s under 32 attempts). Waiting longer
than the busy timeout fails as SQLite does ("database is locked", answered 503 by the API);
the lock is released however a transaction ends. Real SQLite files, real threads; nothing
is timed except bounds far above what the steps take."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.exc import IntegrityError, OperationalError

from openwham.store import db as store_db
from openwham.store import sqlitelock
from openwham.store.db import make_engine

BOUND = 20.0  # far above any step here


def _until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + BOUND
    while not condition():
        assert time.monotonic() < deadline, "the condition never held"
        time.sleep(0.01)


@pytest.fixture
def engine(sqlite_url: str) -> Iterator[Engine]:
    engine = make_engine(sqlite_url, pool_size=40, max_overflow=0)
    with engine.begin() as conn:
        conn.execute(
            text("CREATE TABLE writes (id INTEGER PRIMARY KEY AUTOINCREMENT, who TEXT UNIQUE)")
        )
    yield engine
    engine.dispose()


def _lock(engine: Engine) -> sqlitelock.FairLock:
    lock = sqlitelock.lock_for(str(engine.url.database))
    assert lock is not None
    return lock


def _write(engine: Engine, who: str) -> None:
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO writes (who) VALUES (:who)"), {"who": who})


def _order(engine: Engine) -> list[str]:
    with engine.connect() as conn:
        return list(conn.scalars(text("SELECT who FROM writes ORDER BY id")))


def _start(target: Callable[[], None]) -> threading.Thread:
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread


def test_writers_are_served_in_the_order_they_asked(engine: Engine) -> None:
    lock = _lock(engine)
    holder = engine.connect()
    holder.execute(text("INSERT INTO writes (who) VALUES ('holder')"))  # holds the lock
    threads = []
    for n in range(6):
        threads.append(_start(lambda n=n: _write(engine, f"w{n}")))  # type: ignore[misc]
        _until(lambda n=n: lock.waiting == n + 1)  # type: ignore[misc]
    holder.commit()
    holder.close()
    for thread in threads:
        thread.join(BOUND)
    assert _order(engine) == ["holder"] + [f"w{n}" for n in range(6)]


def test_a_waiting_writer_is_not_overtaken_by_a_stream_of_later_ones(engine: Engine) -> None:
    """The starvation of the burst: one writer waits while another thread writes many short
    transactions back to back; it goes next once the holder commits, not after the stream."""
    lock = _lock(engine)
    holder = engine.connect()
    holder.execute(text("INSERT INTO writes (who) VALUES ('holder')"))
    first = _start(lambda: _write(engine, "first"))
    _until(lambda: lock.waiting == 1)
    # long enough that SQLite's busy handler would sleep 100 ms between tries by now
    time.sleep(0.5)

    def stream() -> None:
        for n in range(50):
            _write(engine, f"later{n}")

    later = _start(stream)
    _until(lambda: lock.waiting == 2)
    holder.commit()
    holder.close()
    first.join(BOUND)
    later.join(BOUND)
    order = _order(engine)
    assert order[:3] == ["holder", "first", "later0"], order
    assert len(order) == 52


def test_a_writer_that_waits_past_the_busy_timeout_fails_as_locked_and_leaves_the_queue(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As SQLite's own timeout: ``database is locked`` (the API's 503), promptly; the queue
    forgets it, and writing works again once the holder is done."""
    monkeypatch.setattr(store_db, "SQLITE_BUSY_TIMEOUT_MS", 300)
    short = make_engine(str(engine.url))
    lock = _lock(engine)
    holder = engine.connect()
    holder.execute(text("INSERT INTO writes (who) VALUES ('holder')"))
    try:
        started = time.monotonic()
        with pytest.raises(OperationalError, match="locked"):
            _write(short, "late")
        assert time.monotonic() - started < 5
        assert lock.waiting == 0
        # reads do not queue (WAL): they see the last commit while the lock is held
        with short.connect() as conn:
            assert list(conn.scalars(text("SELECT who FROM writes"))) == []
    finally:
        holder.commit()
        holder.close()
    _write(short, "after")
    assert _order(engine) == ["holder", "after"]
    short.dispose()


def test_the_busy_handler_gets_only_what_is_left_of_the_timeout(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer that waited in the queue and then finds SQLite's lock held by another
    process (here: a connection outside the queue) fails within about one timeout in all,
    not one in the queue plus a whole one in SQLite's busy handler."""
    monkeypatch.setattr(store_db, "SQLITE_BUSY_TIMEOUT_MS", 2000)
    short = make_engine(str(engine.url))
    lock = _lock(engine)
    outcome: list[BaseException | None] = []

    def late() -> None:
        try:
            _write(short, "late")
            outcome.append(None)
        except BaseException as exc:  # the test inspects it
            outcome.append(exc)

    assert lock.acquire(0)  # a writer of this process holds the queue …
    outsider = sqlite3.connect(str(engine.url.database), isolation_level=None)
    outsider.execute("BEGIN IMMEDIATE")  # … and another process SQLite's lock
    try:
        started = time.monotonic()
        waiter = _start(late)
        _until(lambda: lock.waiting == 1)
        time.sleep(1.5)
        lock.release()
        waiter.join(BOUND)
        took = time.monotonic() - started
    finally:
        outsider.execute("ROLLBACK")
        outsider.close()
    short.dispose()
    assert outcome and isinstance(outcome[0], OperationalError), outcome
    assert "locked" in str(outcome[0])
    assert took < 2.0 + 0.9, took  # one timeout (and slack), not 1.5 s + a whole one (3.5 s)


def test_the_lock_is_released_however_the_transaction_ends(engine: Engine) -> None:
    lock = _lock(engine)
    _write(engine, "a")
    # a failed statement, then the rollback of the context manager
    with pytest.raises(IntegrityError), engine.begin() as conn:
        conn.execute(text("INSERT INTO writes (who) VALUES ('b')"))
        conn.execute(text("INSERT INTO writes (who) VALUES ('a')"))
    # a connection closed in its transaction (the pool resets it)
    conn = engine.connect()
    conn.execute(text("INSERT INTO writes (who) VALUES ('c')"))
    conn.close()
    # a connection invalidated (closed under the pool) in its transaction
    conn = engine.connect()
    conn.execute(text("INSERT INTO writes (who) VALUES ('d')"))
    conn.invalidate()
    conn.close()
    # raw DBAPI: a COMMIT statement ends it; the next statement notices
    raw = sqlite3.connect(str(engine.url.database), factory=sqlitelock.Connection)
    raw.execute("INSERT INTO writes (who) VALUES ('e')")
    raw.execute("COMMIT")
    raw.execute("SELECT 1")
    raw.close()
    _write(engine, "f")  # would wait forever (then fail) if any of them kept the lock
    assert lock.waiting == 0
    assert _order(engine) == ["a", "e", "f"]


def test_what_begins_a_write_transaction() -> None:
    """The statements before which Python's sqlite3 begins a transaction (the lock is taken
    there and only there)."""
    for sql in [
        "INSERT INTO t VALUES (1)",
        "  update t SET x = 1",
        "DELETE FROM t",
        "REPLACE INTO t VALUES (1)",
        "-- note\nINSERT INTO t VALUES (1)",
        "/* note */ insert into t values (1)",
    ]:
        assert sqlitelock.begins_write(sql), sql
    for sql in [
        "SELECT 1",
        "PRAGMA busy_timeout=5",
        "BEGIN",
        "CREATE TABLE t (x)",
        "-- INSERT\nSELECT 1",
        "WITH x AS (SELECT 1) SELECT * FROM x",
    ]:
        assert not sqlitelock.begins_write(sql), sql


def test_a_savepoint_outside_a_transaction_begins_one_with_the_lock(engine: Engine) -> None:
    """A ``SAVEPOINT`` outside a transaction (the group commit runs each write of a batch in
    one) takes the lock and begins the transaction ``IMMEDIATE`` first: without that, SQLite
    began a deferred transaction there, bypassing the queue, that the savepoint's
    ``RELEASE`` committed (the rest of the batch then ran outside any transaction)."""
    lock = _lock(engine)
    with engine.connect() as conn:
        raw = conn.connection.dbapi_connection
        assert isinstance(raw, sqlitelock.Connection)
        nested = conn.begin_nested()
        conn.execute(text("INSERT INTO writes (who) VALUES ('a')"))
        nested.commit()  # RELEASE
        assert raw.in_transaction and raw._holds
        assert not lock.acquire(0.05)  # still held by this transaction
        conn.rollback()
        assert not raw.in_transaction
    assert _order(engine) == []
    assert sqlitelock.opens_write("SAVEPOINT sa_savepoint_1")
    assert not sqlitelock.begins_write("SAVEPOINT sa_savepoint_1")


def test_only_database_files_share_a_lock(tmp_path: Path) -> None:
    assert sqlitelock.lock_for(":memory:") is None
    assert sqlitelock.lock_for("") is None
    a = sqlitelock.lock_for(str(tmp_path / "x.db"))
    assert a is not None and a is sqlitelock.lock_for(str(tmp_path / "." / "x.db"))
    assert a is not sqlitelock.lock_for(str(tmp_path / "y.db"))


def test_postgresql_engines_do_not_use_it(postgres_url: str) -> None:
    engine = make_engine(postgres_url)
    try:
        with engine.connect() as conn:
            assert not isinstance(conn.connection.dbapi_connection, sqlite3.Connection)
            assert conn.scalar(text("SELECT 1")) == 1
    finally:
        engine.dispose()
