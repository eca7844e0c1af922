"""Small writes of many threads committed together (group commit), for SQLite.

A running attempt writes one transaction per line its agent prints (an event, now and then
the turn's body), and every one of them queues for SQLite's single write lock; 32 attempts
at once made hundreds of tiny transactions a second, each a session, a lock hand-over and a
commit. :class:`GroupCommit` runs the writes that threads ask for while a commit is under way
in one transaction: the first caller leads (it commits a batch holding its own write), later
callers queue; when the leader's commit is done it hands the lead to the oldest queued caller,
whose batch is everything queued meanwhile. There is no writer thread and no timer: a write
alone is committed at once, and batches grow exactly as long as the database is busy.

Each caller gets its own result only after the transaction holding its write committed, so
what it then reports (an event published to the turn's streams) is durable, as before; the
writes of one caller (one attempt's recorder) stay in the order it made them, since it waits
for each. A job is a function of the session that writes and returns; it must not commit or
roll back. When a batch fails, it is rolled back and each of its jobs runs again alone in a
transaction of its own, so one job's error (its caller gets it) never loses another's write.

On PostgreSQL each job is simply its own transaction (rows lock separately there, and
``events.append``'s per-turn advisory lock must not be held across unrelated turns).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, Generic, TypeVar

from sqlalchemy.orm import Session

log = logging.getLogger(__name__)

T = TypeVar("T")


class _Job(Generic[T]):
    def __init__(self, fn: Callable[[Session], T]) -> None:
        self.fn = fn
        self.wake = threading.Event()  # done, or made the leader
        self.done = False
        self.result: Any = None
        self.error: BaseException | None = None

    def outcome(self) -> T:
        if self.error is not None:
            raise self.error
        result: T = self.result
        return result


class GroupCommit:
    """Runs jobs in shared transactions (see the module's doc); ``batched`` False: each in
    its own (PostgreSQL)."""

    def __init__(
        self, session: Callable[[], AbstractContextManager[Session]], *, batched: bool
    ) -> None:
        self._session = session
        self.batched = batched
        self._mutex = threading.Lock()
        self._queue: list[_Job[Any]] = []
        self._leading = False
        self.commits = 0  # transactions committed with at least one job (tests, benches)

    @property
    def queued(self) -> int:
        """Jobs waiting for a leader to take them."""
        return len(self._queue)

    def run(self, fn: Callable[[Session], T]) -> T:
        """``fn(session)`` in a transaction, committed when this returns; its result (or its
        exception)."""
        job: _Job[T] = _Job(fn)
        if not self.batched:
            self._alone(job)
            return job.outcome()
        with self._mutex:
            self._queue.append(job)
            lead = not self._leading
            self._leading = True
        if not lead:
            job.wake.wait()
        if not job.done:  # leading: the batch taken now holds this job
            self._lead()
        return job.outcome()

    def _lead(self) -> None:
        with self._mutex:
            batch, self._queue = self._queue, []
        try:
            self._commit(batch)
        finally:
            for job in batch:  # whatever happened, nobody waits for a batch that ended
                if not job.done:
                    job.error = job.error or RuntimeError("the batch of this write ended")
                    job.done = True
                job.wake.set()
            with self._mutex:
                if self._queue:
                    self._queue[0].wake.set()  # the oldest waiter leads the next batch
                else:
                    self._leading = False

    def _commit(self, batch: list[_Job[Any]]) -> None:
        if len(batch) == 1:
            self._alone(batch[0])
            return
        try:
            with self._session() as s:
                results = [job.fn(s) for job in batch]
        except Exception:
            log.debug("a batch of %d writes failed; each runs alone", len(batch), exc_info=True)
            for job in batch:
                self._alone(job)
            return
        self.commits += 1
        for job, result in zip(batch, results, strict=True):
            job.result, job.done = result, True

    def _alone(self, job: _Job[Any]) -> None:
        try:
            with self._session() as s:
                job.result = job.fn(s)
            self.commits += 1
        except BaseException as exc:
            job.error = exc
        job.done = True
