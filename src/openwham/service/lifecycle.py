"""Task actions that start attempts again or copy a task: ``recover`` and ``fork``.

``recover`` (``POST tasks/{id}/recover``): the failed and cancelled attempts of the task's
latest user turn run again from scratch, under their own ids (the engine puts them back to
``pending``; ``engine.turns.requeue``). They count against the rate limits like new
attempts. Nothing to recover, or an attempt still running on that turn: 409.

``fork`` (``POST tasks/{id}/fork``, body ``{"turn_id": …}``, default the current attempt): a
new task in the same environment whose history is a copy of the chain that led to a
completed attempt: each user turn and the chosen attempt of each (siblings are left out),
with their work logs, results and events, under new ids. Follow-ups of the new task
continue from the copied attempt (its Codex session is copied by the engine), independently
of the original.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from openwham import ids
from openwham.config import Settings
from openwham.store import events, turnstate
from openwham.store import models as m
from openwham.store.status import ACTIVE, TurnStatus

from . import usage
from .accounts import Principal
from .errors import BadRequest, Conflict
from .tasks import get_task_row, get_turn_row


def recoverable(
    db: Session, settings: Settings, principal: Principal, task_id: str
) -> list[m.Turn]:
    """The attempts ``recover`` runs again (usage recorded; rate limits checked first)."""
    task = get_task_row(db, principal, task_id)
    if not task.current_user_turn_id:
        raise Conflict("This task has no turn to recover")
    attempts = list(
        db.scalars(
            select(m.Turn)
            .where(m.Turn.parent_id == task.current_user_turn_id, m.Turn.role == "assistant")
            .order_by(m.Turn.attempt_placement)
        )
    )
    if any(t.turn_status in ACTIVE for t in attempts):
        raise Conflict("An attempt of this turn is still running: wait for it or cancel it")
    chosen = [t for t in attempts if t.turn_status in (TurnStatus.FAILED, TurnStatus.CANCELLED)]
    if not chosen:
        raise Conflict("Nothing to recover: no attempt of the latest turn failed or was cancelled")
    usage.check(db, settings, principal, len(chosen))
    usage.record(db, principal, task.id, [t.id for t in chosen])
    task.updated_at = time.time()
    return chosen


@dataclass(frozen=True)
class Forked:
    task_id: str
    copied: dict[str, str]  # old assistant turn id -> new one (their Codex sessions to copy)


def _chain(db: Session, task: m.Task, turn: m.Turn) -> list[m.Turn]:
    """The turns from the task's first user turn down to ``turn``, oldest first."""
    chain: list[m.Turn] = []
    current: m.Turn | None = turn
    while current is not None and len(chain) < 10_000:
        chain.append(current)
        current = get_turn_row(db, task, current.parent_id) if current.parent_id else None
    return chain[::-1]


def fork(db: Session, principal: Principal, task_id: str, raw: Any) -> Forked:
    task = get_task_row(db, principal, task_id)
    if raw is not None and not isinstance(raw, dict):
        raise BadRequest('The body must be a JSON object like {"turn_id": "…"}')
    turn_id = (raw or {}).get("turn_id") or task.current_turn_id
    if not isinstance(turn_id, str) or not turn_id:
        raise BadRequest("turn_id must be an assistant turn id of this task")
    turn = get_turn_row(db, task, turn_id)
    if turn.role != "assistant":
        raise BadRequest("A task is forked at an assistant turn (an attempt), not a user turn")
    if turn.turn_status != TurnStatus.COMPLETED:
        raise Conflict(f"Turn {turn.turn_status}: only a completed attempt can be forked")
    now = time.time()
    new_task_id = ids.new_task_id()
    chain = _chain(db, task, turn)
    mapping: dict[str, str] = {}
    for old in chain:
        mapping[old.id] = (
            ids.new_user_turn_id(new_task_id)
            if old.role == "user"
            else ids.new_assistant_turn_id(new_task_id)
        )
    body = {
        k: v
        for k, v in task.body.items()
        if k
        not in (
            "external_pull_requests",
            "pushed_branch_name",
            "last_pushed_turn_id",
            "last_pushed_commit",
            "pr_push",
            "forge_pr",  # a fork's push opens its own pull request, never updates these
            "forge_prs",
            "repo_pushes",
        )
    }
    new = m.Task(
        id=new_task_id,
        account_id=task.account_id,
        user_id=principal.user_id,
        environment_id=task.environment_id,
        title=task.title,
        has_generated_title=task.has_generated_title,
        archived=False,
        has_unread_turn=False,
        branch=task.branch,
        current_user_turn_id=mapping[chain[-2].id] if len(chain) > 1 else None,
        current_turn_id=mapping[turn.id],
        num_follow_ups=sum(1 for t in chain if t.role == "user") - 1,
        body={
            **body,
            "external_pull_requests": [],
            "forked_from": {"task_id": task.id, "turn_id": turn.id},
        },
        created_at=now,
        updated_at=now,
    )
    db.add(new)
    db.flush()
    for old in chain:
        copy_body = dict(old.body)
        copy_body.pop("pull_request_data", None)
        if old.role == "assistant":
            copy_body["pull_request_status"] = "not_created"
        db.add(
            turnstate.copied(
                old,
                id=mapping[old.id],
                task_id=new_task_id,
                parent_id=mapping.get(old.parent_id) if old.parent_id else None,
                attempt_placement=0 if old.role == "assistant" else old.attempt_placement,
                discarded=False,
                viewed=old.viewed,
                body=copy_body,
                created_at=old.created_at,
                updated_at=now,
            )
        )
    db.flush()
    for old in chain:
        for event in events.read(db, old.id, limit=100_000):
            events.append(db, new_task_id, mapping[old.id], event.item_type, event.payload)
    return Forked(
        new_task_id, {old.id: mapping[old.id] for old in chain if old.role == "assistant"}
    )
