"""SQLite's write lock, queued first come first served inside the process (issue 20).

SQLite lets one connection at a time write a database; another that wants to write waits in
SQLite's busy handler, which sleeps and tries again (after 1, 2, 5 … and then every 100 ms),
so a writer that has waited a while loses each try to writers that arrived after it and find
the lock free between two of its sleeps: in a burst of 32 attempts one event insert waited
4.5 to 10.8 s that way (docs/benchmarks.md, "32 at once"). Here each connection of this process
to a database file first takes that file's :class:`FairLock`, a queue that hands the lock to
the writer that has waited longest the moment a transaction commits or rolls back, and only
then begins its transaction with ``BEGIN IMMEDIATE`` (SQLite's write lock at once). SQLite's
own lock still decides between processes (the CLI, another ``wham serve``): the busy handler
waits for the rest of the timeout.

**Where the lock is taken.** Python's ``sqlite3`` (legacy transaction control, as SQLAlchemy
uses it) begins a transaction before the first INSERT, UPDATE, DELETE or REPLACE of a
connection that is not in one; reads before it run outside any transaction. :class:`Connection`
takes the fair lock at exactly that point, so it is held where SQLite's write lock would be
held anyway (from the first write to the commit): no new deadlock (a thread writing on two
connections at once already deadlocked on SQLite's lock until the busy timeout). A
``SAVEPOINT`` outside a transaction (SQLAlchemy's ``begin_nested``, which the group commit
runs each write in) takes it too: SQLite would begin a deferred transaction there that the
savepoint's ``RELEASE`` commits, so the transaction is begun ``IMMEDIATE`` first.

**Bounded.** Waiting longer than the busy timeout (``Connection.wait_seconds``, set from
``store.db.SQLITE_BUSY_TIMEOUT_MS``) raises ``sqlite3.OperationalError("database is locked")``
as SQLite does, which the API answers 503 with Retry-After; the busy handler then waits only
for what is left of the timeout.

Only for SQLite database files; PostgreSQL has its own row locks and needs none of this.
"""

from __future__ import annotations

import collections
import os
import re
import sqlite3
import threading
import time
from typing import Any

# What makes Python's sqlite3 begin a transaction (CPython's ``is_dml``), after whitespace
# and comments.
_DML = ("insert", "update", "delete", "replace")
_COMMENTS = re.compile(r"(?:\s|--[^\n]*(?:\n|$)|/\*.*?(?:\*/|$))*", re.S)


def _head(sql: str) -> str:
    head = sql.lstrip()
    if head.startswith(("--", "/*")):
        match = _COMMENTS.match(sql)
        head = sql[match.end() :] if match else head
    return head[:9].lower()


def begins_write(sql: str) -> bool:
    """Whether ``sql`` is a statement before which ``sqlite3`` begins a transaction."""
    return _head(sql).startswith(_DML)


def opens_write(sql: str) -> bool:
    """Whether the lock is taken (and the transaction begun) before ``sql`` outside a
    transaction: a statement that makes ``sqlite3`` begin one, or a ``SAVEPOINT``."""
    head = _head(sql)
    return head.startswith(_DML) or head.startswith("savepoint")


class FairLock:
    """A lock granted in the order it was asked for (first in, first out), with a timeout.
    ``release`` hands it straight to the oldest waiter, so a thread arriving just then cannot
    take it first."""

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._held = False
        self._waiters: collections.deque[threading.Event] = collections.deque()

    @property
    def waiting(self) -> int:
        """How many threads wait for the lock now."""
        return len(self._waiters)

    def acquire(self, timeout: float) -> bool:
        with self._mutex:
            if not self._held:
                self._held = True
                return True
            turn = threading.Event()
            self._waiters.append(turn)
        if turn.wait(max(0.0, timeout)):
            return True
        with self._mutex:
            if turn.is_set():  # handed over as the wait ended
                return True
            self._waiters.remove(turn)
            return False

    def release(self) -> None:
        with self._mutex:
            if not self._held:
                raise RuntimeError("release of a FairLock that is not held")
            if self._waiters:
                self._waiters.popleft().set()  # still held: it is the next one's now
            else:
                self._held = False


_locks: dict[str, FairLock] = {}
_locks_mutex = threading.Lock()


def lock_for(database: str) -> FairLock | None:
    """The process's lock of a database file (``None`` for an in-memory database or a URI,
    which are not shared by path)."""
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    key = os.path.realpath(database)
    with _locks_mutex:
        lock = _locks.get(key)
        if lock is None:
            lock = _locks[key] = FairLock()
        return lock


def _database(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    database = args[0] if args else kwargs.get("database", "")
    return os.fsdecode(database) if isinstance(database, (str, bytes, os.PathLike)) else ""


class Connection(sqlite3.Connection):
    """A ``sqlite3`` connection (``sqlite3.connect(..., factory=Connection)``) whose write
    transactions take its file's :class:`FairLock` first and begin ``IMMEDIATE``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fair = lock_for(_database(args, kwargs))
        self.wait_seconds = float(kwargs.get("timeout", 5.0))
        self._holds = False
        self._busy_ms: int | None = None  # busy_timeout lowered for one begin, to restore

    # -- what SQLAlchemy calls (cursor().execute…, commit, rollback, close)

    def cursor(self, factory: Any = None) -> Any:
        return super().cursor(factory or Cursor)

    def execute(self, sql: str, parameters: Any = (), /) -> sqlite3.Cursor:
        cursor: sqlite3.Cursor = self.cursor()
        return cursor.execute(sql, parameters)

    def executemany(self, sql: str, parameters: Any, /) -> sqlite3.Cursor:
        cursor: sqlite3.Cursor = self.cursor()
        return cursor.executemany(sql, parameters)

    def commit(self) -> None:
        try:
            super().commit()
        finally:
            self._release_if_done()

    def rollback(self) -> None:
        try:
            super().rollback()
        finally:
            self._release_if_done()

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._release()

    def __del__(self) -> None:  # a connection dropped without close: never keep the lock
        self._release()

    # -- the lock

    def before(self, sql: str) -> None:
        """Called before each statement: take the lock and begin, if ``sql`` begins a write
        transaction."""
        if self.fair is None or self.isolation_level is None:  # autocommit: no transactions
            return
        if self._holds and not self.in_transaction:  # ended by a COMMIT statement
            self._release()
        if not opens_write(sql):
            return
        self.begin_write()

    def begin_write(self) -> None:
        """Take the lock and begin the write transaction (``IMMEDIATE``) now, unless this
        connection is in a transaction already (the group commit begins its batch so: the
        wait for the lock is the batch's, not its first write's)."""
        if self.fair is None or self.isolation_level is None:
            return
        if self._holds and not self.in_transaction:  # ended by a COMMIT statement
            self._release()
        if self._holds or self.in_transaction:
            return
        started = time.monotonic()
        if not self.fair.acquire(self.wait_seconds):
            raise sqlite3.OperationalError("database is locked")
        self._holds = True
        try:
            left_ms = int((self.wait_seconds - (time.monotonic() - started)) * 1000)
            full_ms = int(self.wait_seconds * 1000)
            lowered = left_ms < full_ms - 100
            if lowered:  # waited here: SQLite's busy handler gets only what is left
                super().execute(f"PRAGMA busy_timeout={max(1, left_ms)}")
            try:
                super().execute("BEGIN IMMEDIATE")
            finally:
                if lowered:
                    super().execute(f"PRAGMA busy_timeout={full_ms}")
        except BaseException:
            self._release()
            raise

    def _release_if_done(self) -> None:
        try:
            done = not self.in_transaction
        except sqlite3.ProgrammingError:  # closed
            done = True
        if done:
            self._release()

    def _release(self) -> None:
        if getattr(self, "_holds", False):
            self._holds = False
            assert self.fair is not None
            self.fair.release()


class Cursor(sqlite3.Cursor):
    """A cursor of a :class:`Connection`: each statement goes through ``before``."""

    def execute(self, sql: str, parameters: Any = (), /) -> Any:
        connection = self.connection
        if isinstance(connection, Connection):
            connection.before(sql)
        return super().execute(sql, parameters)

    def executemany(self, sql: str, parameters: Any, /) -> Any:
        connection = self.connection
        if isinstance(connection, Connection):
            connection.before(sql)
        return super().executemany(sql, parameters)
