"""The event bus across processes and nodes: PostgreSQL ``LISTEN``/``NOTIFY``.

A recorder on worker B commits an event and publishes "turn X has new events"; the turn
streams of API node A must wake up. On PostgreSQL every process may share the database with
others, so :func:`event_bus` gives :class:`PgEventBus` there (no setting overrides it: a local
bus would leave other nodes' streams polling every 15 s) and ``LocalEventBus`` on SQLite.

- ``publish(turn_id)`` (any thread, never blocks, never raises) wakes this process's
  subscribers at once and queues the turn for a publisher thread, which sends one
  ``pg_notify`` per distinct queued turn on a connection of its own (retrying, after a
  reconnect, what it could not send). The payload is ``"<origin> <turn id>"``: the
  subscribers read the rows themselves, as they always did; ``origin`` (random per bus) lets
  the listener skip its own process's notifications, which woke their subscribers already.
- ``subscribe(turn_id)`` (on an event loop) registers locally; the first one starts the
  listener thread: one connection per process, ``LISTEN`` on one channel, each notification
  waking the subscribers of its turn. After every (re)connect the listener wakes every
  subscriber: notifications sent while it was not listening are lost, so they read what they
  may have missed. A dead connection (the backend terminated, the network gone: an idle check
  every ``IDLE_CHECK_SECONDS`` and TCP keepalives) is replaced with a short backoff.

``wait(timeout)`` behaves exactly like ``LocalEventBus``'s: it returns after a wake-up since
the last wait (or since subscribing), or after ``timeout``. A process that only publishes (a
worker) opens no listener connection; one that only subscribes opens no publisher.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import threading
import time
from typing import Any

import psycopg
from sqlalchemy.engine import make_url

from .db import Database
from .events import EventBus, LocalEventBus, Subscription

CHANNEL = "wham_turn_events"
# With no notification for this long, the listener asks ``SELECT 1`` (a silently dead
# connection shows up there); also bounds how long ``close`` waits for it.
IDLE_CHECK_SECONDS = 10.0
# How long the listener waits for notifications per call (``close`` is noticed meanwhile).
POLL_SECONDS = 0.5
RECONNECT_FIRST_SECONDS = 0.05
RECONNECT_MAX_SECONDS = 2.0
# Turns per NOTIFY statement of the publisher.
PUBLISH_BATCH = 500
# libpq: notice a peer that vanished without closing the connection.
_KEEPALIVES: dict[str, Any] = {
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "connect_timeout": 10,
}

log = logging.getLogger(__name__)


def conninfo(url: str) -> str:
    """A libpq URI from a SQLAlchemy URL (``postgresql+psycopg://…``)."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


class _PgSubscription:
    def __init__(self, bus: PgEventBus, turn_id: str) -> None:
        self.bus, self.turn_id = bus, turn_id
        self.loop = asyncio.get_running_loop()
        self.event = asyncio.Event()

    def wake(self) -> None:
        with contextlib.suppress(RuntimeError):  # that loop is closed
            self.loop.call_soon_threadsafe(self.event.set)

    async def wait(self, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.event.wait(), timeout)
        self.event.clear()

    def close(self) -> None:
        self.bus._remove(self)


class PgEventBus:
    """:class:`~openwham.store.events.EventBus` over PostgreSQL ``LISTEN``/``NOTIFY``."""

    def __init__(self, url: str) -> None:
        self.conninfo = conninfo(url)
        self.origin = secrets.token_hex(8)
        self._lock = threading.Lock()
        self._subs: dict[str, set[_PgSubscription]] = {}
        self._pending: dict[str, None] = {}  # turns to notify, in publish order
        self._publish_wanted = threading.Condition(self._lock)
        self._closed = threading.Event()
        self._publisher: threading.Thread | None = None
        self._listener: threading.Thread | None = None
        #: set while the listener's ``LISTEN`` is in force
        self.listening = threading.Event()
        #: backend pids of the current connections (tests terminate them); connects so far
        self.listener_pid: int | None = None
        self.publisher_pid: int | None = None
        self.listener_connects = 0
        self.publisher_connects = 0

    # ------------------------------------------------------------------ EventBus

    def publish(self, turn_id: str) -> None:
        with self._lock:
            subs = list(self._subs.get(turn_id, ()))
            if self._closed.is_set():
                return
            self._pending[turn_id] = None
            if self._publisher is None:
                self._publisher = threading.Thread(
                    target=self._publish_loop, name="wham-bus-publish", daemon=True
                )
                self._publisher.start()
            self._publish_wanted.notify()
        for sub in subs:
            sub.wake()

    def subscribe(self, turn_id: str) -> _PgSubscription:
        sub = _PgSubscription(self, turn_id)
        with self._lock:
            self._subs.setdefault(turn_id, set()).add(sub)
            if self._listener is None and not self._closed.is_set():
                self._listener = threading.Thread(
                    target=self._listen_loop, name="wham-bus-listen", daemon=True
                )
                self._listener.start()
        return sub

    def close(self, timeout: float = 5.0) -> None:
        """Send what is still queued (within ``timeout``), then stop both threads."""
        deadline = time.monotonic() + timeout
        with self._lock:
            publisher = self._publisher
            while self._pending and publisher is not None and time.monotonic() < deadline:
                self._publish_wanted.wait(0.05)
            self._closed.set()
            self._publish_wanted.notify_all()
        for thread in (publisher, self._listener):
            if thread is not None:
                thread.join(max(0.0, deadline - time.monotonic()) + POLL_SECONDS)

    def _remove(self, sub: _PgSubscription) -> None:
        with self._lock:
            subs = self._subs.get(sub.turn_id)
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    del self._subs[sub.turn_id]

    def _wake(self, turn_id: str | None) -> None:
        """Wake the subscribers of ``turn_id`` (``None``: every subscriber)."""
        with self._lock:
            if turn_id is None:
                subs = [s for group in self._subs.values() for s in group]
            else:
                subs = list(self._subs.get(turn_id, ()))
        for sub in subs:
            sub.wake()

    # ------------------------------------------------------------------ threads

    def _backoff(self, delay: float) -> float:
        self._closed.wait(delay)
        return min(delay * 2, RECONNECT_MAX_SECONDS)

    def _publish_loop(self) -> None:
        delay = RECONNECT_FIRST_SECONDS
        while not self._closed.is_set():
            try:
                with psycopg.connect(self.conninfo, autocommit=True, **_KEEPALIVES) as conn:
                    self.publisher_pid = conn.info.backend_pid
                    self.publisher_connects += 1
                    delay = RECONNECT_FIRST_SECONDS
                    self._send_pending(conn)
            except Exception as exc:  # a lost connection (or a bug): start over
                if self._closed.is_set():
                    return
                log.warning("event bus: publisher connection lost (%s); reconnecting", exc)
            delay = self._backoff(delay)

    def _send_pending(self, conn: psycopg.Connection[Any]) -> None:
        """Notify queued turns until closed; on an error the turns stay queued."""
        while True:
            with self._lock:
                while not self._pending and not self._closed.is_set():
                    self._publish_wanted.wait()
                if not self._pending:
                    return  # closed with nothing left
                turns = list(self._pending)[:PUBLISH_BATCH]
            payloads = [f"{self.origin} {turn}" for turn in turns]
            conn.execute(
                "SELECT pg_notify(%s, p) FROM unnest(%s::text[]) AS p", (CHANNEL, payloads)
            )
            with self._lock:
                for turn in turns:
                    self._pending.pop(turn, None)
                self._publish_wanted.notify_all()  # close() waits for an empty queue

    def _listen_loop(self) -> None:
        delay = RECONNECT_FIRST_SECONDS
        while not self._closed.is_set():
            try:
                with psycopg.connect(self.conninfo, autocommit=True, **_KEEPALIVES) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    self.listener_pid = conn.info.backend_pid
                    self.listener_connects += 1
                    delay = RECONNECT_FIRST_SECONDS
                    self._wake(None)  # what was published while nobody listened
                    self.listening.set()
                    self._receive(conn)
            except Exception as exc:  # a lost connection (or a bug): start over
                if self._closed.is_set():
                    return
                log.warning("event bus: listener connection lost (%s); reconnecting", exc)
            finally:
                self.listening.clear()
            delay = self._backoff(delay)

    def _receive(self, conn: psycopg.Connection[Any]) -> None:
        idle_since = time.monotonic()
        while not self._closed.is_set():
            for note in conn.notifies(timeout=POLL_SECONDS):
                idle_since = time.monotonic()
                origin, _, turn_id = note.payload.partition(" ")
                if turn_id and origin != self.origin:
                    self._wake(turn_id)
            if time.monotonic() - idle_since >= IDLE_CHECK_SECONDS:
                conn.execute("SELECT 1")
                idle_since = time.monotonic()


def event_bus(db: Database) -> EventBus:
    """The bus for ``db``: :class:`PgEventBus` on PostgreSQL, else ``LocalEventBus`` (one
    process). Call ``close()`` on it when the process stops (it flushes what is queued)."""
    if db.engine.dialect.name == "postgresql":
        return PgEventBus(db.url)
    return LocalEventBus()


__all__ = ["CHANNEL", "PgEventBus", "Subscription", "conninfo", "event_bus"]
