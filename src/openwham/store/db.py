"""Engine creation and migrations: SQLite (WAL) by default, PostgreSQL by URL.

A :class:`Database` holds three connection pools, so that no user of one can starve another:

- ``sessions``: the engine's own work (executor, recorder, standby, event streams' reads) and
  the CLI; grows as needed (``max_overflow``).
- ``requests``: API and web UI requests only, a fixed number of connections (``request_pool``,
  no overflow). The server admits at most that many requests at once
  (``server.admission``), so an admitted request never waits for a connection; see
  docs/ARCHITECTURE.md, "Request path".
- ``ping``: ``/healthz``'s probe, a fresh connection each time (no pool to be exhausted).
"""

from __future__ import annotations

import math
import select
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

from alembic import command
from alembic.config import Config
from sqlalchemy import (
    Connection,
    CursorResult,
    Engine,
    Result,
    create_engine,
    event,
    exc,
    make_url,
    text,
)
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

from . import sqlitelock
from .groupcommit import GroupCommit

MIGRATIONS_DIR = Path(__file__).with_name("migrations")


# How long a statement waits for SQLite's write lock before it fails ("database is locked",
# which the API answers 503 with Retry-After): first in the process's queue for the file
# (``store.sqlitelock``), then for what is left in SQLite's busy handler.
SQLITE_BUSY_TIMEOUT_MS = 15000


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_TIMEOUT_MS)}")
    cur.close()
    if isinstance(dbapi_conn, sqlitelock.Connection):
        dbapi_conn.wait_seconds = SQLITE_BUSY_TIMEOUT_MS / 1000


# Connections for API requests (``WHAM_DB_POOL_SIZE``): as many requests are served at once.
DEFAULT_REQUEST_POOL = 10
# An admitted request gets its connection at once; this only bounds a bug's damage.
REQUEST_POOL_TIMEOUT = 10.0


def _closed_by_the_server(dbapi_conn: Any, _record: Any, _proxy: Any) -> None:
    """Checkout liveness without a round trip (instead of ``pool_pre_ping``'s ``SELECT``, one
    wake-up of the server process per checkout): an idle pooled connection has nothing to
    read, so a readable socket means the server sent its goodbye (a restart, a terminated
    backend: an error message and EOF). The pool then replaces the connection."""
    try:
        fd = dbapi_conn.fileno()
    except Exception as e:  # already closed
        raise exc.DisconnectionError("connection closed") from e
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLPRI)
    if poller.poll(0):
        raise exc.DisconnectionError("the server closed the connection")


def make_engine(url: str, **pool: Any) -> Engine:
    """An engine tuned for the backend: WAL, busy timeout and writers served in turn
    (``store.sqlitelock``) for SQLite; for servers, a dead connection found at checkout
    (``_closed_by_the_server``, or ``pool_pre_ping`` for a driver without a socket to look
    at). ``pool``: ``create_engine``'s pool arguments (default: 10 connections, 20 more at
    need)."""
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url,
            connect_args={
                "check_same_thread": False,
                "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000,
                "factory": sqlitelock.Connection,
            },
            **pool,
        )
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    sockets = make_url(url).get_driver_name() in ("psycopg", "psycopg2")  # fileno()
    pool = {"pool_size": 10, "max_overflow": 20, "pool_pre_ping": not sockets, **pool}
    engine = create_engine(url, **pool)
    if sockets:
        event.listen(engine, "checkout", _closed_by_the_server)
    return engine


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest revision (run on every start; a no-op when current)."""
    cfg = alembic_config(engine.url.render_as_string(hide_password=False))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


class Database:
    """The engines and session factories of one process (pools: see the module's doc)."""

    def __init__(self, url: str, *, request_pool: int = DEFAULT_REQUEST_POOL) -> None:
        self.url = url
        self.engine = make_engine(url)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)
        self.request_pool = max(1, request_pool)
        self.request_engine = make_engine(
            url,
            pool_size=self.request_pool,
            max_overflow=0,
            pool_timeout=REQUEST_POOL_TIMEOUT,
        )
        self.requests = sessionmaker(self.request_engine, expire_on_commit=False)
        self._ping_engine: Engine | None = None
        # the engine's small writes (running attempts' events), committed together on SQLite
        self.writes = GroupCommit(self.session, batched=url.startswith("sqlite"))

    def migrate(self) -> None:
        migrate(self.engine)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session that commits on success and rolls back on error."""
        with self.sessions() as s:
            try:
                yield s
                s.commit()
            except BaseException:
                s.rollback()
                raise

    @contextmanager
    def read_session(self) -> Iterator[Session]:
        """A request pool session for reads, rolled back at the end. On a server database
        its connection is in AUTOCOMMIT: no ``BEGIN`` and ``ROLLBACK`` round trips (each
        statement of a READ COMMITTED transaction sees a snapshot of its own anyway); a
        write in it (a token's use) commits at once."""
        with self.requests() as session:
            try:
                if not self.url.startswith("sqlite"):
                    session.connection(execution_options={"isolation_level": "AUTOCOMMIT"})
                yield session
            finally:
                session.rollback()

    @contextmanager
    def read_connection(self) -> Iterator[Connection]:
        """A request pool connection for Core reads, without an ORM session (opening,
        rolling back and closing one cost a fifth of a cached read); in AUTOCOMMIT on a
        server database, as ``read_session``. Rolled back when returned to the pool."""
        with self.request_engine.connect() as conn:
            if not self.url.startswith("sqlite"):
                conn.execution_options(isolation_level="AUTOCOMMIT")
            yield conn

    def ping(self, timeout: float) -> None:
        """Raise unless the database answers ``SELECT 1`` on a new connection (``/healthz``;
        ``timeout`` bounds the connect; the caller also bounds the whole call)."""
        if self._ping_engine is None:
            if self.url.startswith("sqlite"):
                args: dict[str, Any] = {"check_same_thread": False, "timeout": timeout}
            else:
                args = {"connect_timeout": max(1, math.ceil(timeout))}
            self._ping_engine = create_engine(self.url, poolclass=NullPool, connect_args=args)
        with self._ping_engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    def dispose(self) -> None:
        self.engine.dispose()
        self.request_engine.dispose()
        if self._ping_engine is not None:
            self._ping_engine.dispose()


def rowcount(result: Result[Any]) -> int:
    """Rows an UPDATE/DELETE matched (what conditional state changes test)."""
    return cast(CursorResult[Any], result).rowcount
