"""The distributed executor (``WHAM_EXECUTOR=queue``): attempts are procrastinate jobs.

Any number of nodes (``wham worker``, or ``wham serve`` with an embedded worker) run a
procrastinate worker on the ``attempts`` queue of one PostgreSQL database. A job carries a
turn id; running it is ``Engine.run_turn`` in a thread (procrastinate runs sync tasks in the
event loop's thread pool), whose claim is a conditional update: a job whose attempt is no
longer pending (cancelled, deleted, claimed by a run that is still alive) does nothing.
Jobs are deferred by ``store.jobs.defer`` in the transaction that creates their attempt.

- **Cancel** on any node: the turn is marked cancelled and the job's abort is requested
  (``store.jobs.abort``); the worker polls abort requests every ``ABORT_POLL_SECONDS`` and
  the engine polls its own row every second; either kills the sandbox.
- **Stalled workers** (SIGKILL, a dead machine): procrastinate records a heartbeat per worker
  every ``WORKER_HEARTBEAT_SECONDS``; every node's sweep takes the running jobs of workers
  silent for ``STALLED_SECONDS`` (``JobManager.get_stalled_jobs``) and, once their attempt's
  own heartbeat is ``TURN_STALE_SECONDS`` old, requeues the attempt (a try counted; out of
  tries it fails with ``executor_lost``, ``executor.recover``) and retries the job.
- **Graceful stop** (SIGTERM): the worker stops fetching, running attempts are stopped and
  put back to ``pending`` without counting a try, and each gets a new job, which another
  worker takes.
- **Safety sweep**: pending attempts without a waiting or running job get one.
- **Standby preference**: every worker records, with each sweep, the standbys it holds ready
  (a hash of each key) and its free slots (``store.jobs.offer``). A worker that takes a job
  and holds no standby for the attempt's key while another worker, fresh and with a free slot,
  offers one re-defers the job to that worker's own queue (``attempts.<node>``, marked
  ``routed``) instead of starting cold. A routed job not taken within ``ROUTED_SECONDS`` (the
  holder became busy or died) goes back to the shared queue and runs wherever, cold. An
  attempt with a setup script that finds no standby anywhere goes the same way to a worker
  holding its post-setup snapshot (offered as ``snapshot:<key hash>``) when the fetching
  worker holds none. When no worker holds a matching standby, the first free worker runs the
  attempt.
- **Post-setup cache**: a reset-cache (or a changed or deleted environment) answered by
  another node reaches this worker's snapshots and standbys at its next sweep
  (``Workspaces.drop_stale_caches``: each snapshot records its environment's cache
  generation, compared with the one the environment's row hashes to now).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import threading
import time
from collections.abc import Iterable
from functools import partial
from typing import Any

import procrastinate
from procrastinate import jobs as pjobs
from procrastinate.job_context import AbortReason, JobContext
from sqlalchemy import select

from openwham.store import jobs
from openwham.store import models as m
from openwham.store.pgbus import conninfo
from openwham.store.status import TERMINAL, TurnStatus

from .attempt import Control, Engine
from .executor import recover
from .setup_cache import cache_generations
from .standby import AgentKey

log = logging.getLogger(__name__)

WORKER_HEARTBEAT_SECONDS = 2.0
STALLED_SECONDS = 10.0
# an attempt's own heartbeat (recorder.HEARTBEAT_SECONDS: 10 s) older than this, with its
# worker stalled, means the run is gone
TURN_STALE_SECONDS = 25.0
SWEEP_SECONDS = 5.0
ABORT_POLL_SECONDS = 0.5
# a routed job waits this long for its standby's worker, then runs anywhere
ROUTED_SECONDS = 3.0
# offers older than this are not trusted (a worker's sweep refreshes its own every 5 s)
OFFER_FRESH_SECONDS = 15.0


def key_hash(key: AgentKey) -> str:
    """A standby key as every worker computes it (offers carry hashes, not settings)."""
    raw = json.dumps(dataclasses.asdict(key), sort_keys=True)
    return hashlib.sha256(raw.encode()).hexdigest()[:32]


def snapshot_hash(key: AgentKey) -> str:
    """What a worker holding the post-setup snapshot of ``key`` (a key with a setup script)
    offers, beside its ready standbys' :func:`key_hash`."""
    return f"snapshot:{key_hash(key)}"


def make_app(database_url: str) -> procrastinate.App:
    """A procrastinate app on the database of ``database_url`` (a SQLAlchemy URL)."""
    connector = procrastinate.PsycopgConnector(conninfo=conninfo(database_url))
    return procrastinate.App(connector=connector)


class QueueExecutor:
    """A procrastinate worker (``concurrency`` attempts at once) on its own event loop thread."""

    def __init__(self, engine: Engine, concurrency: int) -> None:
        self.engine = engine
        self.concurrency = max(1, concurrency)
        self.app = make_app(engine.db.url)
        self.app.task(name=jobs.TASK, queue=jobs.QUEUE, pass_context=True)(self._job)
        self._lock = threading.Lock()
        self._running: dict[str, Control] = {}
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._main: asyncio.Task[None] | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        #: this worker's own queue (jobs routed to its standbys); short: a LISTEN channel
        self.node = engine.executor_id.rsplit(":", 1)[-1]
        #: attempts this worker has run (tests and the benchmark read it through logs)
        self.ran = 0

    # ------------------------------------------------------------------ interface

    def start(self) -> None:
        self._sweep_db()  # at once: attempts of a worker that died on this host go again
        self._thread = threading.Thread(target=self._serve, name="wham-queue", daemon=True)
        self._thread.start()
        self._ready.wait(30)

    def stop(self, timeout: float = 20.0) -> None:
        """Stop fetching, hand running attempts back (pending, no try counted, a new job)."""
        with self._lock:
            self._stopping = True
            running = list(self._running.values())
        loop, main = self._loop, self._main
        if loop is not None and main is not None:
            loop.call_soon_threadsafe(main.cancel)
        for control in running:
            control.cancel("shutdown")
        if self._thread is not None:
            self._thread.join(timeout)
        try:
            with self.engine.db.session() as s:
                jobs.withdraw(s, self.node)
        except Exception:  # the database is gone: the offer goes stale by itself
            log.warning("could not withdraw this worker's standby offers", exc_info=True)

    def submit(self, turn_ids: Iterable[str]) -> None:
        """Jobs are deferred with their attempts (``store.jobs.defer``); nothing to do."""

    def cancel(self, turn_id: str) -> bool:
        with self._lock:
            control = self._running.get(turn_id)
        if control is None:
            return False
        control.cancel("cancelled")
        return True

    @property
    def running(self) -> list[str]:
        with self._lock:
            return list(self._running)

    # ------------------------------------------------------------------ the job

    def _job(self, context: JobContext, turn_id: str, routed: bool = False) -> None:
        """Run one attempt; one that was handed back (graceful stop) gets a new job, one
        another worker holds a standby for is routed there."""
        if not routed and not self._stopping:
            holder = self._standby_elsewhere(turn_id)
            if holder is not None:
                with self.engine.db.session() as s:
                    jobs.defer(s, [turn_id], node=holder)
                log.info("attempt %s: routed to worker %s (its standby)", turn_id, holder)
                return
        with self._lock:
            stopping = self._stopping
            control = Control()
            if not stopping:
                self._running[turn_id] = control
        if stopping:  # fetched while stopping: leave it to another worker
            self._defer([turn_id])
            return
        done = threading.Event()
        watcher = threading.Thread(
            target=self._watch_abort,
            args=(context, control, done),
            name=f"abort-{turn_id[-8:]}",
            daemon=True,
        )
        watcher.start()
        try:
            status = self.engine.run_turn(turn_id, control)
        finally:
            done.set()
            with self._lock:
                self._running.pop(turn_id, None)
        if status is not None:
            self.ran += 1
            log.info("attempt %s: %s (worker %s)", turn_id, status, self.engine.executor_id)
        if status == TurnStatus.PENDING:
            self._defer([turn_id])

    def _standby_elsewhere(self, turn_id: str) -> str | None:
        """Another worker with a free slot and a ready standby for the attempt, when this
        one has none for it; for an attempt with a setup script when no worker has one,
        another worker holding its post-setup snapshot when this one does not (it resumes
        the snapshot instead of running the setup script here)."""
        pool = self.engine.standby
        key = self.engine.standby_key(turn_id)
        if key is None or pool.ready().get(key):
            return None
        since = time.time() - OFFER_FRESH_SECONDS
        with self.engine.db.sessions() as s:
            found = None
            if pool.size > 0:
                found = jobs.holder(s, key_hash(key), besides=self.node, since=since)
            if found is None and key.setup and key not in self.engine.workspaces.snapshot_keys():
                found = jobs.holder(s, snapshot_hash(key), besides=self.node, since=since)
            return found

    @staticmethod
    def _watch_abort(context: JobContext, control: Control, done: threading.Event) -> None:
        """procrastinate asks a sync job to abort through ``should_abort``: kill the sandbox."""
        while not done.wait(ABORT_POLL_SECONDS / 2):
            reason = context.abort_reason()
            if reason is not None:
                control.cancel("shutdown" if reason == AbortReason.SHUTDOWN else "cancelled")
                return

    def _defer(self, turn_ids: list[str]) -> None:
        with self.engine.db.session() as s:
            jobs.defer(s, turn_ids)

    # ------------------------------------------------------------------ the loop

    def _serve(self) -> None:
        loop = asyncio.new_event_loop()
        # one thread per running attempt (+ the sweep's), whatever the core count
        loop.set_default_executor(
            concurrent.futures.ThreadPoolExecutor(
                max_workers=self.concurrency + 4, thread_name_prefix="wham-queue-attempt"
            )
        )
        self._loop = loop
        try:
            loop.run_until_complete(self._main_async())
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("the queue worker stopped")
        finally:
            self._ready.set()
            loop.close()

    async def _main_async(self) -> None:
        self._main = asyncio.current_task()
        async with self.app.open_async():
            sweeper = asyncio.create_task(self._sweeper(), name="wham-queue-sweep")
            self._ready.set()
            try:
                await self.app.run_worker_async(
                    queues=[jobs.QUEUE, jobs.node_queue(self.node)],
                    name=f"wham-{self.engine.executor_id}",
                    concurrency=self.concurrency,
                    install_signal_handlers=False,
                    update_heartbeat_interval=WORKER_HEARTBEAT_SECONDS,
                    stalled_worker_timeout=STALLED_SECONDS,
                    abort_job_polling_interval=ABORT_POLL_SECONDS,
                    delete_jobs="successful",
                )
            finally:
                sweeper.cancel()

    async def _sweeper(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_SECONDS)
            try:
                await self._sweep()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("sweeping the queue failed")

    async def _sweep(self) -> None:
        stalled = await self.app.job_manager.get_stalled_jobs(
            task_name=jobs.TASK, seconds_since_heartbeat=STALLED_SECONDS
        )
        if stalled:
            retry, finish = await asyncio.to_thread(self._settle_stalled, list(stalled))
            for job in retry:
                try:
                    await self.app.job_manager.retry_job(job)
                except Exception:  # a waiting job of the attempt exists already
                    log.debug("job %s not retried", job.id, exc_info=True)
                    await self.app.job_manager.finish_job(job, pjobs.Status.FAILED, False)
            for job in finish:
                await self.app.job_manager.finish_job(job, pjobs.Status.FAILED, False)
        await asyncio.to_thread(self._sweep_db)

    def _settle_stalled(self, stalled: list[pjobs.Job]) -> tuple[list[pjobs.Job], list[pjobs.Job]]:
        """Running jobs of silent workers: which to run again, which are over."""
        by_turn: dict[str, pjobs.Job] = {}
        for job in stalled:
            turn_id = job.task_kwargs.get("turn_id")
            if isinstance(turn_id, str):
                by_turn[turn_id] = job
        recover(self.engine, turn_ids=list(by_turn), stale_after=TURN_STALE_SECONDS)
        with self.engine.db.sessions() as s:
            statuses: dict[str, Any] = dict(
                s.execute(
                    select(m.Turn.id, m.Turn.turn_status).where(m.Turn.id.in_(list(by_turn)))
                ).all()
            )
        retry: list[pjobs.Job] = []
        finish: list[pjobs.Job] = []
        for turn_id, job in by_turn.items():
            status = statuses.get(turn_id)
            if status == TurnStatus.PENDING:
                retry.append(job)
            elif status is None or status in TERMINAL:
                finish.append(job)
            # in progress with a fresh heartbeat: its run lives (a slow worker); look again
        for job in stalled:
            if not isinstance(job.task_kwargs.get("turn_id"), str):
                finish.append(job)
        return retry, finish

    def _sweep_db(self) -> None:
        """Attempts of dead runs on this host go again; pending ones without a job get one."""
        if self._stopping:
            return
        recover(self.engine)
        ready = {key_hash(key): n for key, n in self.engine.standby.ready().items()}
        ready.update({snapshot_hash(k): 1 for k in self.engine.workspaces.snapshot_keys()})
        free = max(0, self.concurrency - len(self.running))
        with self.engine.db.session() as s:
            orphans = jobs.without_job(s)
            jobs.defer(s, orphans)
            jobs.offer(s, self.node, ready, free, time.time())
            jobs.unroute_stale(s, ROUTED_SECONDS)
        if orphans:
            log.info("queued %d pending attempt(s) that had no job", len(orphans))
        # a reset-cache answered by another node: this worker's snapshots and standbys go
        self.engine.workspaces.drop_stale_caches(partial(cache_generations, self.engine.db))
