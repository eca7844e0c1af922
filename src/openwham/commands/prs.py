"""Push PR: commit an attempt's change on the task's branch and push it."""

from __future__ import annotations

from sqlalchemy.orm import Session

from openwham.engine import prs as engine_prs
from openwham.locks import LockTimeout
from openwham.service import prs
from openwham.service.accounts import Principal
from openwham.service.errors import Conflict, ServiceError
from openwham.wire import ExternalPullRequest

from .deps import Deps


def push(
    db: Session, deps: Deps, principal: Principal, task_id: str, turn_id: str
) -> ExternalPullRequest:
    """Push the attempt's change (engine/prs.py). A push of another attempt that a crash cut
    short is finished first (service/prs.py). One push per task at a time across processes
    and nodes (``deps.locks``); 409 when another push holds it too long."""
    try:
        with deps.locks.hold(engine_prs.lock_key(task_id), engine_prs.LOCK_SECONDS):
            earlier = prs.unfinished(db, principal, task_id, turn_id)
            if earlier is not None:
                try:
                    _push(db, deps, principal, earlier)
                except ServiceError:  # it cannot be finished (the branch moved): it is dropped
                    db.rollback()
                    prs.drop_unfinished(db, principal, task_id)
                    db.commit()
            plan = prs.plan(db, principal, task_id, turn_id)
            if plan.existing is not None:
                return ExternalPullRequest.model_validate(plan.existing)
            return _push(db, deps, principal, plan)
    except LockTimeout as exc:  # another node's push of this task is still running
        raise Conflict(str(exc)) from exc


def _push(db: Session, deps: Deps, principal: Principal, plan: prs.PushPlan) -> ExternalPullRequest:
    prs.reserve(db, principal, plan)
    db.commit()  # kept before the push; no transaction held while git talks to the remote
    branch, commit = engine_prs.push(deps.settings, plan)
    entry = prs.record(db, principal, plan, branch=branch, commit=commit)
    db.commit()
    return ExternalPullRequest.model_validate(entry)
