"""The ordered event log of attempts, and the bus that wakes up readers.

Every status change and work-log entry of an attempt is a row in ``turn_events``; the turn
stream replays rows after a client's ``Last-Event-ID`` and then waits on the bus. The bus only
says "something new for turn X": readers always read the rows, so a missed wake-up costs at
most one poll interval and nothing is ever lost. Its one reader per turn and node is the
server's fan-out (``server/fanout.py``), which shares what it reads among that turn's
streams. ``LocalEventBus`` serves one process (SQLite); on PostgreSQL ``store.pgbus`` carries
"turn X has new events" between processes and nodes with LISTEN/NOTIFY (``pgbus.event_bus``
picks one).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from sqlalchemy import delete, insert, literal, select, text
from sqlalchemy.orm import Session

from . import models as m
from .status import TERMINAL

# What the turn stream sends (docs/reference/wham-api.md §5).
TASK_TURN_EVENT = "task_turn_event"
WORK_LOG_MESSAGE = "work_log_message"
LOG = "log"
TASK_TITLE_GENERATED = "task_title_generated"
PROXY_EVENT = "proxy_event"  # a request through the egress proxy, as it is decided
ITEM_TYPES = (TASK_TURN_EVENT, WORK_LOG_MESSAGE, LOG, TASK_TITLE_GENERATED, PROXY_EVENT)
TERMINAL_STATUSES = TERMINAL  # the statuses whose task_turn_event ends a stream


@dataclass(frozen=True)
class Event:
    id: int
    task_id: str
    turn_id: str
    item_type: str
    payload: dict[str, Any]
    created_at: float

    @property
    def is_terminal(self) -> bool:
        return (
            self.item_type == TASK_TURN_EVENT
            and self.payload.get("turn_status") in TERMINAL_STATUSES
        )


def append(
    db: Session,
    task_id: str,
    turn_id: str,
    item_type: str,
    payload: dict[str, Any],
    *,
    run: str | None = None,
) -> bool:
    """Add one event (committed with the caller's transaction); whether it was added. A Core
    insert: events are written for every line an agent prints, and the ORM's unit of work
    costs several times more CPU per row (it runs in the server process, beside the gateway).

    ``run``: a running attempt's own event, added only while the attempt is still held by
    that run (its fencing token, ``store.turnstate``): still one statement, an ``INSERT …
    SELECT`` from the turn's row, which on PostgreSQL it locks ``FOR SHARE`` so that a
    concurrent requeue (which deletes the attempt's events) either waits for it and deletes
    the event too, or commits first and the insert adds nothing.

    On PostgreSQL the writers of one turn are serialised by a transaction-scoped advisory
    lock taken before the id is allocated: ids of one turn then commit in order, so a reader
    that resumes after the last id it saw can never skip a lower id committed later (SQLite
    has one writer at a time already)."""
    if db.get_bind().dialect.name == "postgresql":
        db.execute(text("SELECT pg_advisory_xact_lock(hashtext(:turn))"), {"turn": turn_id})
    now = time.time()
    if run is None:
        db.execute(
            insert(m.TurnEvent).values(
                task_id=task_id,
                turn_id=turn_id,
                item_type=item_type,
                payload=payload,
                created_at=now,
            )
        )
        return True
    held = (
        select(
            literal(task_id, m.TurnEvent.task_id.type),
            literal(turn_id, m.TurnEvent.turn_id.type),
            literal(item_type, m.TurnEvent.item_type.type),
            literal(payload, m.TurnEvent.payload.type),
            literal(now, m.TurnEvent.created_at.type),
        )
        .where(m.Turn.id == turn_id, m.Turn.run_id == run)
        .with_for_update(read=True)
    )
    columns = ["task_id", "turn_id", "item_type", "payload", "created_at"]
    # RETURNING: psycopg reports no row count for an INSERT … SELECT
    added = db.execute(insert(m.TurnEvent).from_select(columns, held).returning(m.TurnEvent.id))
    return added.first() is not None


def read(
    db: Session,
    turn_id: str,
    *,
    after: int = 0,
    until: int | None = None,
    item_types: Sequence[str] | None = None,
    limit: int = 500,
) -> list[Event]:
    """Events of one turn with ``after < id <= until``, oldest first."""
    q = select(m.TurnEvent).where(m.TurnEvent.turn_id == turn_id, m.TurnEvent.id > after)
    if until is not None:
        q = q.where(m.TurnEvent.id <= until)
    if item_types:
        q = q.where(m.TurnEvent.item_type.in_(list(item_types)))
    rows = db.scalars(q.order_by(m.TurnEvent.id).limit(limit))
    return [
        Event(r.id, r.task_id, r.turn_id, r.item_type, dict(r.payload), r.created_at) for r in rows
    ]


def clear(db: Session, turn_id: str, item_types: Iterable[str]) -> None:
    """Drop a turn's events of the given types (an attempt that starts over)."""
    db.execute(
        delete(m.TurnEvent).where(
            m.TurnEvent.turn_id == turn_id, m.TurnEvent.item_type.in_(list(item_types))
        )
    )


def status_payload(
    text: str, turn_status: str, *, error: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A ``task_turn_event``: the live status line and the turn's status (a ``TurnStatus``,
    or the string a client sent), stored as the plain wire string."""
    payload: dict[str, Any] = {
        "text": text,
        "event_type": "info",
        "turn_status": str(turn_status),
        "created": time.time(),
    }
    if error is not None:
        payload["error"] = error
    return payload


class Subscription(Protocol):
    async def wait(self, timeout: float) -> None:
        """Return after a ``publish`` since the last wait (or since subscribing), or after
        ``timeout`` seconds."""
        ...

    def close(self) -> None: ...


class EventBus(Protocol):
    """Wakes up readers of a turn's events after a commit that added some."""

    def publish(self, turn_id: str) -> None: ...

    def subscribe(self, turn_id: str) -> Subscription:
        """Subscribe before reading, so that nothing published after the read is missed."""
        ...

    def close(self) -> None:
        """The process stops: send what is still queued, release connections."""
        ...


class _LocalSubscription:
    def __init__(self, bus: LocalEventBus, turn_id: str) -> None:
        self.bus, self.turn_id = bus, turn_id
        self.loop = asyncio.get_running_loop()
        self.event = asyncio.Event()

    async def wait(self, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.event.wait(), timeout)
        self.event.clear()

    def close(self) -> None:
        self.bus._remove(self)


class LocalEventBus:
    """In-process bus: ``publish`` may be called from any thread; ``subscribe`` from a loop."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subs: dict[str, set[_LocalSubscription]] = {}

    def publish(self, turn_id: str) -> None:
        with self._lock:
            subs = list(self._subs.get(turn_id, ()))
        for sub in subs:
            with contextlib.suppress(RuntimeError):  # that loop is closed
                sub.loop.call_soon_threadsafe(sub.event.set)

    def subscribe(self, turn_id: str) -> _LocalSubscription:
        sub = _LocalSubscription(self, turn_id)
        with self._lock:
            self._subs.setdefault(turn_id, set()).add(sub)
        return sub

    def close(self) -> None:
        """Nothing to release."""

    def _remove(self, sub: _LocalSubscription) -> None:
        with self._lock:
            subs = self._subs.get(sub.turn_id)
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    del self._subs[sub.turn_id]
