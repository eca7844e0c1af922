"""Small writes of many threads committed together by one writer thread (group commit), for
SQLite.

A running attempt writes one transaction per line its agent prints (an event, now and then
the turn's body), and claims, titles and ends write theirs; every one of them queued for
SQLite's single write lock. At 32 attempts at once the lock was busy most of the round, and
mostly not with writing: each holder, one of ~150 threads, waited for the GIL and a core
between two statements, and each hand-over woke another thread (docs/benchmarks.md, "32 at
once"). :class:`GroupCommit` gives the writes to one thread of its own (``wham-sqlite-writer``,
started at the first write and gone after ``IDLE_SECONDS`` without any): it takes everything
queued, runs it in one transaction and commits, then takes what was queued meanwhile. There
is no timer: a write alone is committed at once, and batches grow exactly as long as the
database is busy; the lock changes hands once per batch, not once per write.

Each caller gets its own result only after the transaction holding its write committed, so
what it then reports (an event published to the turn's streams) is durable, as before; the
writes of one caller (one attempt's recorder) stay in the order it made them, since it waits
for each. A job is a function of the session that writes and returns; it must not commit or
roll back. In a batch each job runs in a savepoint of its own: a job that raises (a refused
write raises to undo what it wrote) is rolled back alone and its caller gets the exception,
the others commit. When the batch's transaction itself fails, each job runs again alone in a
transaction of its own, so one job's error never loses another's write; but when it failed
because SQLite's lock did not come within the busy timeout (another process held the
database), every caller gets that error at once (the API answers 503), rather than each
waiting out the timeout again alone.

On PostgreSQL each job is simply its own transaction, in its caller's thread (rows lock
separately there, and ``events.append``'s per-turn advisory lock must not be held across
unrelated turns).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, Generic, TypeVar

from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from . import sqlitelock

log = logging.getLogger(__name__)

T = TypeVar("T")

#: the writer thread ends after this long without a write (a new one starts at the next)
IDLE_SECONDS = 2.0


class _Job(Generic[T]):
    def __init__(self, fn: Callable[[Session], T]) -> None:
        self.fn = fn
        self.wake = threading.Event()  # done
        self.result: Any = None
        self.error: BaseException | None = None

    def outcome(self) -> T:
        if self.error is not None:
            raise self.error
        result: T = self.result
        return result


class GroupCommit:
    """Runs jobs in shared transactions on a writer thread (see the module's doc);
    ``batched`` False: each in its own, in the caller's thread (PostgreSQL)."""

    def __init__(
        self, session: Callable[[], AbstractContextManager[Session]], *, batched: bool
    ) -> None:
        self._session = session
        self.batched = batched
        self._cond = threading.Condition()
        self._queue: list[_Job[Any]] = []
        self._writer: threading.Thread | None = None
        self._busy = False
        self.commits = 0  # transactions committed with at least one job (tests, benches)

    @property
    def queued(self) -> int:
        """Jobs waiting for the writer to take them."""
        return len(self._queue)

    @property
    def busy(self) -> bool:
        """Whether the writer is running a batch now."""
        return self._busy

    @property
    def writer(self) -> threading.Thread | None:
        """The writer thread, while there is one."""
        return self._writer

    def run(self, fn: Callable[[Session], T]) -> T:
        """``fn(session)`` in a transaction, committed when this returns; its result (or its
        exception)."""
        job: _Job[T] = _Job(fn)
        if not self.batched or threading.current_thread() is self._writer:
            self._alone(job)  # (a job that writes more: its own transaction, not nested)
            return job.outcome()
        with self._cond:
            self._queue.append(job)
            if self._writer is None:
                self._writer = threading.Thread(
                    target=self._loop, name="wham-sqlite-writer", daemon=True
                )
                self._writer.start()
            self._cond.notify()
        job.wake.wait()
        return job.outcome()

    def run_in(self, session: Session, fn: Callable[[Session], T]) -> T:
        """``fn`` written and committed: batched, by the writer thread (``run``: in its
        session, not ``session``); else in ``session``'s own transaction (a request's, whose
        reads came before), committed, or rolled back on error. Batched, what ``session``
        has written is committed first: its write transaction would hold SQLite's lock,
        which the writer would then wait for until the busy timeout."""
        if self.batched:
            session.flush()
            if getattr(session.connection().connection.dbapi_connection, "in_transaction", False):
                session.commit()
            return self.run(fn)
        try:
            result = fn(session)
            session.commit()
        except BaseException:
            session.rollback()
            raise
        return result

    def _loop(self) -> None:
        while True:
            with self._cond:
                if not self._queue:
                    self._cond.wait(IDLE_SECONDS)
                if not self._queue:
                    self._writer = None
                    return
                batch, self._queue = self._queue, []
                self._busy = True
            try:
                self._commit(batch)
            except BaseException as exc:  # a bug here: nobody waits for a batch that ended
                log.exception("the SQLite writer failed")
                for job in batch:
                    job.error = job.error or exc
            finally:
                for job in batch:
                    job.wake.set()
                with self._cond:
                    self._busy = False

    def _commit(self, batch: list[_Job[Any]]) -> None:
        if len(batch) == 1:
            self._alone(batch[0])
            return
        try:
            with self._session() as s:
                connection = s.connection().connection.dbapi_connection
                if isinstance(connection, sqlitelock.Connection):
                    try:  # the lock is the batch's, not one job's error
                        connection.begin_write()
                    except sqlite3.OperationalError as exc:  # as SQLAlchemy raises it
                        raise OperationalError("BEGIN IMMEDIATE", None, exc) from exc
                for job in batch:
                    try:
                        with s.begin_nested():
                            job.result = job.fn(s)
                    except Exception as exc:  # undone alone; the others commit
                        job.error = exc
                    s.expunge_all()  # (flushed) the next job reads rows afresh
        except Exception as exc:
            if _locked(exc):  # the lock never came within the busy timeout: none would get it
                for job in batch:
                    job.result, job.error = None, exc
                return
            log.debug("a batch of %d writes failed; each runs alone", len(batch), exc_info=True)
            for job in batch:
                job.result, job.error = None, None
                self._alone(job)
            return
        self.commits += 1

    def _alone(self, job: _Job[Any]) -> None:
        try:
            with self._session() as s:
                job.result = job.fn(s)
            self.commits += 1
        except BaseException as exc:
            job.error = exc


def _locked(exc: BaseException) -> bool:
    """Whether ``exc`` is SQLite's "database is locked" (its busy timeout passed: another
    process held the database)."""
    return isinstance(exc, OperationalError) and "database is locked" in str(exc)
