"""The one place where an attempt's status changes (docs/ARCHITECTURE.md, "Turn states").

Every transition is a conditional update, ``UPDATE turns SET turn_status = :to … WHERE id =
:id AND turn_status IN (:allowed sources)``, that returns whether it applied. Two executors,
API nodes or workers racing on one attempt therefore cannot both win: the database decides,
and the loser is told so (and must leave the attempt alone). The allowed sources and the
target of each transition are data (``TRANSITIONS``), tested one by one.

The terminal statuses are final, with one exception a user asks for: ``recover`` runs a
failed or cancelled attempt again. ``completed`` never changes. The wire has one running
status, so starting is the claim, and what a running attempt is doing (setting up, waiting
for a standby, working) is its status line, written by ``record``; ``wait`` is the status
line of an attempt still queued.

**Fencing.** Each claim gives the attempt a fresh ``run_id`` (:func:`new_run_id`); a run
passes it (``run=``) with every write it makes afterwards, which adds ``AND run_id = :run``
to the same conditional update (no extra statement), and a requeue or recover clears it. A
run that was judged dead (its worker stalled, its server restarted) while it still lives
therefore cannot finish, fail, record or append to an attempt that was requeued and claimed
again since: its update matches no row, and it stops itself (``engine.recorder``). The
user's cancel and a node's recovery are not runs and pass no token.

The functions take the caller's session and do not commit: what goes with a transition
(events, the task's fields) is written in the same transaction. Nothing else writes
``turn_status`` (``tests/test_architecture.py`` fails when a module does); new rows get
theirs from :func:`new_attempt` and :func:`copied`.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final

from sqlalchemy import update
from sqlalchemy.orm import Session

from . import models as m
from .db import rowcount
from .status import ACTIVE, TERMINAL, TurnStatus

__all__ = [
    "ACTIVE",
    "STARTS_OVER",
    "TERMINAL",
    "TRANSITIONS",
    "Move",
    "Transition",
    "TurnStatus",
    "cancel",
    "claim",
    "copied",
    "fail",
    "finish",
    "move",
    "new_attempt",
    "new_run_id",
    "record",
    "recover",
    "requeue",
    "wait",
]

P, R, C, F, X = (
    TurnStatus.PENDING,
    TurnStatus.IN_PROGRESS,
    TurnStatus.COMPLETED,
    TurnStatus.FAILED,
    TurnStatus.CANCELLED,
)


class Transition(StrEnum):
    CLAIM = "claim"
    WAIT = "wait"
    RECORD = "record"
    FINISH = "finish"
    FAIL = "fail"
    CANCEL = "cancel"
    REQUEUE = "requeue"
    RECOVER = "recover"


@dataclass(frozen=True)
class Move:
    sources: frozenset[TurnStatus]
    target: TurnStatus
    why: str


TRANSITIONS: Final[Mapping[Transition, Move]] = {
    Transition.CLAIM: Move(frozenset({P}), R, "an executor takes the attempt; only one can"),
    Transition.WAIT: Move(frozenset({P}), P, "queued behind busy workers (the Waiting line)"),
    Transition.RECORD: Move(
        frozenset({R}), R, "a running attempt's writes: work log, status line, heartbeat"
    ),
    Transition.FINISH: Move(frozenset({R}), C, "the agent ended with a result"),
    Transition.FAIL: Move(frozenset({R}), F, "it cannot go on; the error says why (code)"),
    Transition.CANCEL: Move(frozenset({P, R}), X, "a user cancelled it (or the task)"),
    Transition.REQUEUE: Move(
        frozenset({R}), P, "its executor stopped or is gone; it starts again from scratch"
    ),
    Transition.RECOVER: Move(frozenset({F, X}), P, "a user runs a failed or cancelled one again"),
}


def new_run_id() -> str:
    """A fresh fencing token for one claim of an attempt."""
    return uuid.uuid4().hex


# The attempt runs again from scratch: its events are deleted in the same transaction, so
# the turn's ``events_epoch`` is bumped (turn streams' tails forget what they hold).
STARTS_OVER: Final = frozenset({Transition.REQUEUE, Transition.RECOVER})


def move(
    s: Session,
    turn_id: str,
    transition: Transition,
    *,
    body: dict[str, Any] | None = None,
    now: float | None = None,
    seen: float | None = None,
    run: str | None = None,
) -> bool:
    """Apply ``transition`` to the attempt if its current status allows it (one conditional
    UPDATE, with ``body`` when given); whether it applied. Not committed here. ``seen``: only
    if the row's ``updated_at`` is still this value, i.e. nothing (no heartbeat, no other
    node's requeue and claim) wrote it since the caller read it. ``run``: only if the
    attempt is still held by this run (its ``run_id``, see "Fencing" above)."""
    rule = TRANSITIONS[transition]
    restart = transition in STARTS_OVER
    return _update(s, turn_id, rule.sources, rule.target, body, now, seen, restart=restart, run=run)


def _update(
    s: Session,
    turn_id: str,
    sources: frozenset[TurnStatus],
    target: TurnStatus,
    body: dict[str, Any] | None,
    now: float | None,
    seen: float | None = None,
    *,
    restart: bool = False,
    run: str | None = None,
    claim: str | None = None,
) -> bool:
    values: dict[str, Any] = {
        "turn_status": target,
        "updated_at": time.time() if now is None else now,
    }
    if restart:
        values["events_epoch"] = m.Turn.events_epoch + 1
        values["run_id"] = None  # the run that held it (if it lives) can write no more
    if claim is not None:
        values["run_id"] = claim
    if body is not None:
        values.update(m.Turn.body_values(body))  # with the diff stat columns it carries
    statement = update(m.Turn).where(
        m.Turn.id == turn_id,
        m.Turn.role == "assistant",
        m.Turn.turn_status.in_(sorted(sources)),
    )
    if seen is not None:
        statement = statement.where(m.Turn.updated_at == seen)
    if run is not None:
        statement = statement.where(m.Turn.run_id == run)
    result = s.execute(statement.values(**values))
    return rowcount(result) == 1


def claim(
    s: Session, turn_id: str, *, body: dict[str, Any], run: str, now: float | None = None
) -> bool:
    """``pending`` → ``in_progress``: this executor runs the attempt (``body`` records it),
    as the run ``run`` (a :func:`new_run_id`; its later writes pass it)."""
    rule = TRANSITIONS[Transition.CLAIM]
    return _update(s, turn_id, rule.sources, rule.target, body, now, claim=run)


def wait(s: Session, turn_id: str, *, body: dict[str, Any]) -> bool:
    """``pending`` stays ``pending`` with a new ``body`` (the Waiting status line)."""
    return move(s, turn_id, Transition.WAIT, body=body)


def record(
    s: Session,
    turn_id: str,
    *,
    body: dict[str, Any],
    now: float | None = None,
    run: str | None = None,
) -> bool:
    """A running attempt writes its ``body`` (and heartbeat); refused once it is no longer
    ``in_progress`` (cancelled, requeued, deleted) or, with ``run``, no longer held by that
    run (requeued and claimed again), which tells the writer to stop."""
    return move(s, turn_id, Transition.RECORD, body=body, now=now, run=run)


def finish(
    s: Session,
    turn_id: str,
    *,
    body: dict[str, Any],
    now: float | None = None,
    run: str | None = None,
) -> bool:
    """``in_progress`` → ``completed`` (with ``run``: only by that run)."""
    return move(s, turn_id, Transition.FINISH, body=body, now=now, run=run)


def fail(
    s: Session,
    turn_id: str,
    *,
    body: dict[str, Any],
    error: Mapping[str, Any],
    now: float | None = None,
    seen: float | None = None,
    run: str | None = None,
) -> bool:
    """``in_progress`` → ``failed``, with the reason in the body's ``error`` (a ``code`` such
    as ``setup_failed`` or ``executor_lost`` and a ``message``; both required). ``seen``: as
    for :func:`requeue`; ``run``: only by that run."""
    code, message = error.get("code"), error.get("message")
    if not isinstance(code, str) or not code or not isinstance(message, str) or not message:
        raise ValueError("a failed attempt needs an error code and message")
    body = {**body, "error": dict(error)}
    return move(s, turn_id, Transition.FAIL, body=body, now=now, seen=seen, run=run)


def cancel(
    s: Session,
    turn_id: str,
    *,
    body: dict[str, Any] | None = None,
    now: float | None = None,
    run: str | None = None,
) -> TurnStatus | None:
    """``pending`` or ``in_progress`` → ``cancelled``; the status it was cancelled from (a
    pending attempt ends here, a running one's executor notices, as its ``record`` is refused
    or it is told, and stops), or ``None`` if it was neither. One conditional update per
    source, so the answer is exact even while an executor claims the attempt. ``run``: a
    run ending its own attempt as cancelled (only ``in_progress`` and held by it)."""
    rule = TRANSITIONS[Transition.CANCEL]
    sources = sorted(rule.sources) if run is None else [R]
    for source in sources:
        if _update(s, turn_id, frozenset({source}), rule.target, body, now, run=run):
            return source
    return None


def requeue(
    s: Session,
    turn_id: str,
    *,
    body: dict[str, Any],
    now: float | None = None,
    seen: float | None = None,
    run: str | None = None,
) -> bool:
    """``in_progress`` → ``pending``: its executor stopped (graceful stop; it passes its
    ``run``) or is gone. A node that judged another's attempt lost passes the ``updated_at``
    it judged by (``seen``), so its requeue cannot undo a newer claim of the same attempt.
    The ``run_id`` is cleared: the run that held it can write no more."""
    return move(s, turn_id, Transition.REQUEUE, body=body, now=now, seen=seen, run=run)


def recover(s: Session, turn_id: str, *, body: dict[str, Any], now: float | None = None) -> bool:
    """``failed`` or ``cancelled`` → ``pending``: run the attempt again (a user's recover)."""
    return move(s, turn_id, Transition.RECOVER, body=body, now=now)


# ---------------------------------------------------------------------- new rows


def new_attempt(**fields: Any) -> m.Turn:
    """A new attempt row (an assistant turn): always ``pending``."""
    return m.Turn(**fields, role="assistant", turn_status=TurnStatus.PENDING)


def copied(old: m.Turn, **fields: Any) -> m.Turn:
    """A copy of a finished turn (a fork): same role and status. An attempt still pending or
    running is not copied (two rows would then claim one run)."""
    if old.turn_status is not None and old.turn_status not in TERMINAL:
        raise ValueError(f"a {old.turn_status} attempt cannot be copied")
    return m.Turn(**fields, role=old.role, turn_status=old.turn_status)
