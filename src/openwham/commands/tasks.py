"""Commands on tasks: create-and-submit (new task, best-of-N, follow-up), cancel-and-stop,
delete-with-files, recover and fork."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from openwham.engine import storage
from openwham.engine.turns import requeue
from openwham.service import lifecycle
from openwham.service import tasks as service
from openwham.service.accounts import Principal
from openwham.service.errors import Unavailable
from openwham.service.tasks import Created, Written
from openwham.store import models as m

from . import branches
from .deps import Deps

RECOVER_NOTE = "Recovered: this attempt runs again from the start"


def _can_run(deps: Deps) -> None:
    """Refuse new work with the reason this server cannot run it (503)."""
    if deps.executor is not None and deps.executor.problem:
        raise Unavailable(deps.executor.problem)


def _submit(db: Session, deps: Deps, turn_ids: list[str]) -> None:
    """Commit the attempts written in ``db`` with their hand-off to the executor."""
    if deps.executor is not None:
        deps.executor.enqueue(db, turn_ids)
    db.commit()
    if deps.executor is not None:
        deps.executor.submit(turn_ids)


def create(db: Session, deps: Deps, principal: Principal, body: Any) -> Created:
    """``POST tasks``: a new task (best-of-N included) or a follow-up, committed with its
    attempts handed to the executor. Read and checked in ``db`` first; the write (rate
    limit, rows, the executor's ``enqueue``) is one job of ``deps.writes`` (on SQLite the
    writer thread), else in ``db``'s transaction."""
    _can_run(deps)
    creation = service.prepare(
        db,
        deps.settings,
        principal,
        body,
        branch_lookup=branches.lookup(deps.settings, db, principal.account_id),
    )

    def write(s: Session) -> Written:
        written = creation.write(s)
        if deps.executor is not None:
            deps.executor.enqueue(s, written.attempt_ids)
        return written

    written = deps.writes.run_in(db, write) if deps.writes is not None else _here(db, write)
    if deps.executor is not None:
        deps.executor.submit(written.attempt_ids)
    return service.created(db, creation, written)


def _here(db: Session, write: Callable[[Session], Written]) -> Written:
    written = write(db)
    db.commit()
    return written


def _stop(deps: Deps, turn_ids: list[str]) -> None:
    """Wake the attempts' streams (they end on the cancelled status) and stop them."""
    for turn_id in turn_ids:
        deps.bus.publish(turn_id)
    if deps.executor is not None:
        deps.executor.cancel(turn_ids)


def cancel(db: Session, deps: Deps, principal: Principal, task_id: str) -> list[str]:
    """Cancel every queued or running attempt of the task; the ids it stopped."""
    cancelled = service.cancel(db, principal, task_id)
    db.commit()
    _stop(deps, cancelled)
    return cancelled


def cancel_turn(
    db: Session, deps: Deps, principal: Principal, task_id: str, turn_id: str
) -> list[str]:
    """Cancel one attempt (``[]`` if it had finished)."""
    cancelled = service.cancel_turn(db, principal, task_id, turn_id)
    db.commit()
    _stop(deps, cancelled)
    return cancelled


def delete(db: Session, deps: Deps, principal: Principal, task_id: str) -> None:
    """Delete a task: its running attempts are stopped first, and its attempts' files go
    with it (workspaces, homes, stored Codex sessions)."""
    cancel(db, deps, principal, task_id)
    turn_ids = service.delete(db, principal, task_id)
    db.commit()
    storage.remove(deps.settings.resolved_data_dir / "attempts", turn_ids, deps.artifacts)


def recover(db: Session, deps: Deps, principal: Principal, task_id: str) -> list[str]:
    """Run the latest turn's failed and cancelled attempts again; the ids put back."""
    _can_run(deps)
    turns = lifecycle.recoverable(db, deps.settings, principal, task_id)
    ids = [t.id for t in turns if requeue(db, t, RECOVER_NOTE, tries=0, recover=True)]
    if deps.executor is not None:
        deps.executor.enqueue(db, ids)
    db.commit()
    for turn_id in ids:
        deps.bus.publish(turn_id)
    if deps.executor is not None:
        deps.executor.submit(ids)
    return ids


def fork(db: Session, deps: Deps, principal: Principal, task_id: str, body: Any) -> str:
    """A new task that starts from a chosen completed attempt, with its Codex sessions
    copied; the new task's id."""
    forked = lifecycle.fork(db, principal, task_id, body)
    db.commit()
    rows = db.execute(
        select(m.Turn.id, m.Turn.updated_at).where(m.Turn.id.in_(list(forked.copied)))
    ).all()
    ended = {str(turn_id): float(at) for turn_id, at in rows}
    storage.copy_sessions(
        deps.settings.resolved_data_dir / "attempts", forked.copied, deps.artifacts, ended
    )
    return forked.task_id
