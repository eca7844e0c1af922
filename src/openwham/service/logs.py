"""Setup logs and server notes of attempts, as ``…/turns/{turn_id}/logs`` and ``…/logs`` serve them.

Both read the attempts' ``log`` events (the rows the turn stream sends): a setup-log line has
a ``key`` (which setup log) and a ``line``; a server note (why an attempt started over, …) has
a ``text``. Values were redacted when recorded.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from openwham.store import events
from openwham.store import models as m
from openwham.wire import TaskLogEntry, TaskLogsResponse, TurnLogLine, TurnLogsResponse
from openwham.wire.common import naive_iso

from .accounts import Principal
from .errors import BadRequest
from .tasks import get_task_row, get_turn_row

MAX_LINES = 100_000


def _iso(created: Any) -> str | None:
    return naive_iso(created) if isinstance(created, int | float) else None


def turn_logs(db: Session, principal: Principal, task_id: str, turn_id: str) -> TurnLogsResponse:
    """The setup log of one attempt, line by line."""
    task = get_task_row(db, principal, task_id)
    turn = get_turn_row(db, task, turn_id)
    if turn.role != "assistant":
        raise BadRequest("logs belong to an assistant turn (an attempt), not a user turn")
    rows = events.read(db, turn.id, item_types=[events.LOG], limit=MAX_LINES)
    return TurnLogsResponse(
        logs=[
            TurnLogLine.model_validate({"key": e.payload["key"], "line": e.payload.get("line", "")})
            for e in rows
            if isinstance(e.payload.get("key"), dict)
        ]
    )


def task_logs(db: Session, principal: Principal, task_id: str) -> TaskLogsResponse:
    """Every attempt's setup log lines (source ``setup``) and server notes (source
    ``openwham``), oldest first."""
    task = get_task_row(db, principal, task_id)
    rows = db.scalars(
        select(m.TurnEvent)
        .where(m.TurnEvent.task_id == task.id, m.TurnEvent.item_type == events.LOG)
        .order_by(m.TurnEvent.id)
        .limit(MAX_LINES)
    )
    out: list[TaskLogEntry] = []
    for row in rows:
        payload = dict(row.payload)
        setup = isinstance(payload.get("key"), dict)
        out.append(
            TaskLogEntry(
                timestamp=_iso(payload.get("created", row.created_at)),
                level="info" if setup else "warning",
                message=str(payload.get("line" if setup else "text", "")),
                source="setup" if setup else "openwham",
            )
        )
    return TaskLogsResponse(logs=out)
