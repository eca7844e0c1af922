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

from collections.abc import Collection, Iterable

from procrastinate.schema import SchemaManager
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from .db import Database
from .status import TurnStatus

QUEUE = "attempts"
TASK = "openwham.run_attempt"
# pg_advisory_xact_lock key serialising schema creation by nodes starting together
_SCHEMA_LOCK = 0x0057_4841_4D51  # "WHAMQ"

_DEFER = text(
    "SELECT procrastinate_defer_jobs_v1(ARRAY(SELECT ROW(:queue, :task, 0, NULL, t.id, "
    "jsonb_build_object('turn_id', t.id), NULL)::procrastinate_job_to_defer_v1 "
    "FROM unnest(CAST(:ids AS varchar[])) AS t(id)))"
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
        if conn.scalar(text("SELECT to_regclass('procrastinate_jobs')")) is not None:
            return False
        raw = conn.connection.driver_connection
        assert raw is not None
        # procrastinate's schema file (many statements, no parameters) as it ships
        raw.execute(SchemaManager.get_schema())
    return True


def defer(s: Session, turn_ids: Iterable[str]) -> None:
    """Queue a job for each attempt in the caller's transaction (committed with it). An
    attempt that already has a waiting job keeps that one."""
    ids = list(dict.fromkeys(turn_ids))
    if not ids:
        return
    try:
        with s.begin_nested():
            s.execute(_DEFER, {"queue": QUEUE, "task": TASK, "ids": ids})
        return
    except IntegrityError:  # one of them has a waiting job (queueing lock): one by one
        pass
    for turn_id in ids:
        try:
            with s.begin_nested():
                s.execute(_DEFER, {"queue": QUEUE, "task": TASK, "ids": [turn_id]})
        except IntegrityError:
            continue


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
