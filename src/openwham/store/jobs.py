"""Attempts as procrastinate jobs on PostgreSQL (``WHAM_EXECUTOR=queue``): the job store side.

Every pending attempt has one job: a row of procrastinate's ``procrastinate_jobs`` table with
task ``openwham.run_attempt``, queue ``attempts``, args ``{"turn_id": …}`` and the turn id as
its *queueing lock* (procrastinate keeps at most one waiting job per lock, so an attempt is
never queued twice). :func:`defer` inserts jobs through procrastinate's own SQL function on
the caller's SQLAlchemy session, so the job commits in the transaction that creates (or
requeues) its attempt: no attempt without its job, no job without its attempt. The worker
side (fetching, running, stalled workers) is ``engine.queue``.

The schema is procrastinate's, applied by :func:`apply_schema` when a node starts with the
queue executor (idempotent: applied once, under an advisory lock, when its table is missing).
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable

from procrastinate.schema import SchemaManager
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from .db import Database, rowcount
from .status import TurnStatus

QUEUE = "attempts"
TASK = "openwham.run_attempt"
# pg_advisory_xact_lock key serialising schema creation by nodes starting together
_SCHEMA_LOCK = 0x0057_4841_4D51  # "WHAMQ"

_DEFER = text(
    "SELECT procrastinate_defer_jobs_v1(ARRAY(SELECT ROW(:queue, :task, 0, NULL, t.id, "
    "jsonb_build_object('turn_id', t.id) || CAST(:extra AS jsonb), NULL)"
    "::procrastinate_job_to_defer_v1 FROM unnest(CAST(:ids AS varchar[])) AS t(id)))"
)
# Which worker holds which standby sandboxes (one row per worker; ``keys``: a hash of each
# standby's AgentKey -> how many are ready), refreshed by each worker's sweep. Not an ORM
# table: it exists only beside the queue, and losing it only loses a preference.
_OFFERS = (
    "CREATE UNLOGGED TABLE IF NOT EXISTS wham_standby_offers (node varchar(64) PRIMARY KEY, "
    "keys jsonb NOT NULL, free integer NOT NULL, updated_at double precision NOT NULL)"
)


class QueueConfigError(RuntimeError):
    """``WHAM_EXECUTOR=queue`` on a database that cannot hold the queue (not PostgreSQL)."""


def check_database(db: Database) -> None:
    """Refuse the queue executor anywhere but PostgreSQL, with the fix in the message."""
    if db.engine.dialect.name != "postgresql":
        raise QueueConfigError(
            "WHAM_EXECUTOR=queue needs PostgreSQL: set WHAM_DATABASE_URL="
            "postgresql+psycopg://USER@HOST/DB (every API node and worker on the same "
            "database), or use WHAM_EXECUTOR=inprocess (the default) with SQLite"
        )


def apply_schema(db: Database) -> bool:
    """Create procrastinate's tables and functions when they are missing; whether it did."""
    check_database(db)
    with db.engine.begin() as conn:
        conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _SCHEMA_LOCK})
        conn.execute(text(_OFFERS))
        if conn.scalar(text("SELECT to_regclass('procrastinate_jobs')")) is not None:
            return False
        raw = conn.connection.driver_connection
        assert raw is not None
        # procrastinate's schema file (many statements, no parameters) as it ships
        raw.execute(SchemaManager.get_schema())
    return True


def node_queue(node: str) -> str:
    """The queue only ``node``'s worker listens to (jobs routed to its standbys)."""
    return f"{QUEUE}.{node}"


def defer(s: Session, turn_ids: Iterable[str], *, node: str | None = None) -> None:
    """Queue a job for each attempt in the caller's transaction (committed with it). An
    attempt that already has a waiting job keeps that one. ``node``: route the jobs to that
    worker's own queue (it holds a matching standby), marked ``routed`` (never again)."""
    ids = list(dict.fromkeys(turn_ids))
    if not ids:
        return
    params = {
        "queue": node_queue(node) if node else QUEUE,
        "task": TASK,
        "extra": '{"routed": true}' if node else "{}",
    }
    try:
        with s.begin_nested():
            s.execute(_DEFER, {**params, "ids": ids})
        return
    except IntegrityError:  # one of them has a waiting job (queueing lock): one by one
        pass
    for turn_id in ids:
        try:
            with s.begin_nested():
                s.execute(_DEFER, {**params, "ids": [turn_id]})
        except IntegrityError:
            continue


def offer(s: Session, node: str, keys: dict[str, int], free: int, now: float) -> None:
    """Record the standbys ``node`` holds ready (by key hash) and its free slots."""
    s.execute(
        text(
            "INSERT INTO wham_standby_offers (node, keys, free, updated_at) "
            "VALUES (:node, CAST(:keys AS jsonb), :free, :now) ON CONFLICT (node) DO UPDATE "
            "SET keys = EXCLUDED.keys, free = EXCLUDED.free, updated_at = EXCLUDED.updated_at"
        ),
        {"node": node, "keys": json.dumps(keys), "free": free, "now": now},
    )


def withdraw(s: Session, node: str) -> None:
    """A stopping worker offers nothing."""
    s.execute(text("DELETE FROM wham_standby_offers WHERE node = :node"), {"node": node})


def holder(s: Session, key: str, *, besides: str, since: float) -> str | None:
    """Another worker that offered a ready standby for ``key`` and a free slot since
    ``since``, or ``None``."""
    found = s.scalar(
        text(
            "SELECT node FROM wham_standby_offers WHERE node <> :me AND updated_at >= :since "
            "AND free > 0 AND COALESCE((keys ->> :key)::int, 0) > 0 "
            "ORDER BY free DESC, updated_at DESC LIMIT 1"
        ),
        {"me": besides, "since": since, "key": key},
    )
    return str(found) if found is not None else None


def unroute_stale(s: Session, seconds: float) -> int:
    """Jobs routed to a worker that did not take them within ``seconds`` (busy, or gone)
    go back to the shared queue, where any worker runs them (without a standby)."""
    result = s.execute(
        text(
            "UPDATE procrastinate_jobs j SET queue_name = :queue WHERE j.status = 'todo' "
            "AND j.task_name = :task AND j.queue_name LIKE :routed AND EXISTS (SELECT 1 FROM "
            "procrastinate_events e WHERE e.job_id = j.id AND e.type = 'deferred' "
            "AND e.at < now() - make_interval(secs => :secs))"
        ),
        {"queue": QUEUE, "task": TASK, "routed": f"{QUEUE}.%", "secs": seconds},
    )
    return rowcount(result)


def without_job(s: Session, limit: int = 500) -> list[str]:
    """Pending attempts that have no waiting or running job (created while no queue ran,
    or whose job was lost): the safety sweep queues them."""
    rows = s.execute(
        text(
            "SELECT t.id FROM turns t WHERE t.turn_status = :pending AND t.role = 'assistant' "
            "AND NOT EXISTS (SELECT 1 FROM procrastinate_jobs j WHERE j.queueing_lock = t.id "
            "AND j.status IN ('todo', 'doing')) ORDER BY t.created_at, t.attempt_placement "
            "LIMIT :limit"
        ),
        {"pending": TurnStatus.PENDING.value, "limit": limit},
    )
    return [str(r[0]) for r in rows]


def abort(s: Session, turn_ids: Collection[str]) -> int:
    """Cancel the attempts' waiting jobs and ask the workers running theirs to abort
    (procrastinate's job abort; the worker kills the sandbox). How many jobs were asked."""
    if not turn_ids:
        return 0
    rows = s.execute(
        text(
            "SELECT procrastinate_cancel_job_v1(id, true, false) FROM procrastinate_jobs "
            "WHERE queueing_lock = ANY(CAST(:ids AS varchar[])) AND task_name = :task "
            "AND status IN ('todo', 'doing')"
        ),
        {"ids": list(turn_ids), "task": TASK},
    ).all()
    return len(rows)
