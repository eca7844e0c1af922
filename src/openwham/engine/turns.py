"""Attempts put back or shown waiting, with what goes with it: ``requeue`` (recovery, the
recover command, a graceful shutdown's ``release``) resets the body and the events of an
attempt that starts again; ``mark_waiting`` shows "Waiting" on queued attempts. The status
changes themselves are ``store.turnstate``'s, conditional as every transition is."""

from __future__ import annotations

import time

from sqlalchemy import select
from sqlalchemy.orm import Session

from openwham.store import events, turnstate
from openwham.store import models as m
from openwham.store.db import Database
from openwham.store.events import EventBus
from openwham.store.status import TurnStatus

from .recorder import TurnRecorder, latest_event

WAITING = "Waiting"


def mark_waiting(db: Database, bus: EventBus, turn_ids: list[str]) -> None:
    """Show "Waiting" on attempts queued behind busy workers: all in one write of the group
    commit (a burst queued each attempt's in a transaction of its own, in its ``POST``)."""

    def write(s: Session) -> list[str]:
        marked = []
        for turn_id in turn_ids:
            turn = s.get(m.Turn, turn_id)
            if turn is None or turn.turn_status != TurnStatus.PENDING:
                continue
            if (turn.body.get("latest_event") or {}).get("text") == WAITING:
                continue
            body = {**turn.body, "latest_event": latest_event(WAITING)}
            if turnstate.wait(s, turn_id, body=body):
                events.append(
                    s,
                    turn.task_id,
                    turn_id,
                    events.TASK_TURN_EVENT,
                    events.status_payload(WAITING, TurnStatus.PENDING),
                )
                marked.append(turn_id)
        return marked

    if not turn_ids:
        return
    for turn_id in db.writes.run(write):
        bus.publish(turn_id)


def release(db: Database, bus: EventBus, turn_id: str, rec: TurnRecorder | None, note: str) -> str:
    """Put an attempt back to ``pending`` without counting a try (graceful shutdown)."""
    if rec is not None:
        rec.flush()
        rec.gone = True
    with db.session() as s:
        turn = s.get(m.Turn, turn_id)
        if turn is None or turn.turn_status != TurnStatus.IN_PROGRESS:
            return str(turn.turn_status) if turn else "deleted"
        tries = int((turn.body.get("run") or {}).get("tries") or 1)
        run = rec.run_id if rec is not None else None
        if not requeue(s, turn, note, tries=max(0, tries - 1), run=run):  # moved meanwhile
            now = s.scalar(select(m.Turn.turn_status).where(m.Turn.id == turn_id))
            return str(now or "deleted")
    bus.publish(turn_id)
    return "pending"


def requeue(
    s: Session,
    turn: m.Turn,
    note: str,
    *,
    tries: int | None = None,
    recover: bool = False,
    seen: float | None = None,
    run: str | None = None,
) -> bool:
    """Put an attempt back to ``pending`` to start again from scratch: its results, status
    lines (a terminal one would end a new stream at once), work log and setup log go, a
    ``log`` event says why. ``tries`` replaces the count of runs. A running attempt
    (``turnstate.requeue``), or with ``recover`` a failed or cancelled one
    (``turnstate.recover``); whether it applied (someone else may have moved it first).
    ``seen``: only if its ``updated_at`` is still that (see ``turnstate.requeue``); ``run``:
    only if that run still holds it (its own graceful stop)."""
    body = dict(turn.body)
    if tries is not None:
        body["run"] = {**(body.get("run") or {}), "tries": tries}
    body.update(
        output_items=[],
        worklog={"messages": []},
        error=None,
        latest_event=latest_event(WAITING),
        base_commit_sha=None,
        logs=None,
        proxy_events=None,
        setup_cache=None,
        repo_diffs=None,
        repo_bases=None,
    )
    if recover:
        moved = turnstate.recover(s, turn.id, body=body)
    else:
        moved = turnstate.requeue(s, turn.id, body=body, seen=seen, run=run)
    if not moved:
        return False
    # its setup log goes with it; the server's notes (log events without a key) stay
    notes = [e.payload for e in events.read(s, turn.id, item_types=[events.LOG], limit=10_000)]
    events.clear(
        s,
        turn.id,
        [events.WORK_LOG_MESSAGE, events.LOG, events.TASK_TURN_EVENT, events.PROXY_EVENT],
    )
    for payload in notes:
        if "key" not in payload:
            events.append(s, turn.task_id, turn.id, events.LOG, payload)
    events.append(s, turn.task_id, turn.id, events.LOG, {"text": note, "created": time.time()})
    events.append(
        s,
        turn.task_id,
        turn.id,
        events.TASK_TURN_EVENT,
        events.status_payload(WAITING, TurnStatus.PENDING),
    )
    return True
