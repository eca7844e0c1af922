"""Persists what one running attempt does: ordered events soon, the turn body in batches.

Events (status lines, work-log messages, logs) are queued as they happen and written, in the
order they were made, by the recorder's own writer thread (``wham-rec-…``, started with the
recorder, so the agent's output thread does not wait for a thread to start, and gone at the
attempt's end or after ``IDLE_SECONDS`` without a write; with ``beat`` it is also the
attempt's heartbeat, writing the body at least every ``HEARTBEAT_SECONDS``), which
publishes each batch once it committed, so the turn stream is live and in order. The
callers never wait for the database: an agent's output is read by a thread that hands each
line to the recorder, and a write that waited for SQLite's lock (hundreds of ms at four
attempts at once, seconds at 32) held the reading of Codex's output behind it
(``turn.completed`` read after the diff was written; docs/benchmarks.md, "Best-of-4").
What is queued while a write is under way goes in the next one, in one transaction. The
queue is bounded (``MAX_PENDING`` events): past it a caller waits for the writer, as
every caller did before. :meth:`flush` waits until everything asked before it is written
(what a caller then promises, e.g. a release, is durable), and :meth:`finish` writes the
terminal state only after every event queued before it; an event is published only after its
commit, as before. A crash loses what was queued and not yet committed, as it lost the lines
still in the agent's pipe before: nothing that was published or answered.

The turn's JSON body (work log, latest_event) is rewritten at most every ``FLUSH_SECONDS``
while the attempt runs (with a batch of events when due, or asked by the heartbeat), which
keeps long attempts from rewriting a large work log per line and keeps the server's CPU for
the agent's model requests; ``GET`` of a running turn may lag by about that much. Every
write is conditional on the turn still being ``in_progress``: once a user cancelled it (or
deleted the task), the recorder notices, sets ``gone`` and writes nothing more but the final
work log of a cancelled attempt.

Fencing: with the ``run_id`` of its claim, every write (body, events, the end) is also
conditional on the attempt still being held by this run, folded into the same statement
(``store.turnstate``, "Fencing"). When a write finds the attempt requeued or claimed by
another run since (this run was judged dead: a stalled worker, a restart's recovery), the
recorder writes nothing more, not even a final state, logs why, and tells ``on_gone``
(``"superseded"``), which stops the run (kills its sandbox); a cancel noticed the same way
is reported as ``"cancelled"``.

Everything stored passes through the attempt's :class:`Redactor` first (the environment's
secret values become ``[redacted]``): status lines, work-log messages, setup log lines, proxy
events, the result's output items and error.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from openwham.redaction import Redactor
from openwham.store import events, turnstate
from openwham.store import models as m
from openwham.store.db import Database
from openwham.store.events import EventBus
from openwham.store.turnstate import TurnStatus
from openwham.wire import WorklogMessage

log = logging.getLogger(__name__)

FLUSH_SECONDS = 1.0
HEARTBEAT_SECONDS = 10.0
#: events queued and not yet written past which a caller waits for the writer
MAX_PENDING = 1000
#: the writer thread ends after this long without anything to write (a new one starts then)
IDLE_SECONDS = 30.0
MAX_PROXY_EVENTS = 1000  # kept on the turn; later ones are not


def latest_event(text: str) -> dict[str, Any]:
    return {"created": time.time(), "text": text, "event_type": "info"}


def dump_message(message: WorklogMessage) -> dict[str, Any]:
    return message.model_dump(mode="json", by_alias=True)


def _without_answer(
    messages: dict[str, dict[str, Any]], output_items: list[dict[str, Any]] | None
) -> list[dict[str, Any]]:
    """The work log to keep once the attempt ended: when its answer is a ``message`` output
    item, not the answer's work-log message too (``channel`` ``final``). The official Codex
    client shows a turn's ``message`` items *and* every assistant work-log text, so keeping
    both showed each answer twice; chatgpt.com's captured work logs hold the steps, not the
    answer. The event stream still carries it, as the attempt's last message."""
    answered = any(isinstance(i, dict) and i.get("type") == "message" for i in output_items or [])
    return [msg for msg in messages.values() if not (answered and msg.get("channel") == "final")]


SUPERSEDED = "superseded"  # what a run whose attempt another run holds now ends with


def _end(
    s: Session,
    turn_id: str,
    status: TurnStatus,
    body: dict[str, Any],
    now: float,
    run: str | None,
) -> bool:
    """The terminal transition to ``status`` of a running attempt; whether it applied."""
    if status is TurnStatus.COMPLETED:
        return turnstate.finish(s, turn_id, body=body, now=now, run=run)
    if status is TurnStatus.FAILED:
        return turnstate.fail(s, turn_id, body=body, error=body["error"], now=now, run=run)
    if status is TurnStatus.CANCELLED:
        return turnstate.cancel(s, turn_id, body=body, now=now, run=run) is not None
    raise ValueError(f"{status} is not how an attempt ends")


class TurnRecorder:
    def __init__(
        self,
        db: Database,
        bus: EventBus,
        task_id: str,
        turn_id: str,
        body: dict[str, Any],
        redactor: Redactor | None = None,
        *,
        run_id: str | None = None,
        on_gone: Callable[[str], None] | None = None,
        beat: float | None = None,
        start: bool = True,
    ) -> None:
        self.db, self.bus = db, bus
        self.run_id = run_id  # the claim's fencing token (None: unfenced, older callers)
        self.on_gone = on_gone
        self.redactor = redactor or Redactor()
        self.task_id, self.turn_id = task_id, turn_id
        self.body = dict(body)
        self._messages: dict[str, dict[str, Any]] = {
            str(msg.get("id")): msg for msg in (self.body.get("worklog") or {}).get("messages", [])
        }
        # guards everything below and the body; never held across a database write
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)  # a write ended, or one was asked
        self._pending: list[tuple[str, dict[str, Any]]] = []  # events to write, in order
        self._body_asked = False  # the body is written with the next batch, due or not
        self._asked = 0  # writes asked so far (a flush waits for its number to be done)
        self._done = 0  # the writes asked up to this number are written (or dropped)
        self._writing = False  # a write is under way (the writer's batch, or the end)
        self._writer: threading.Thread | None = None
        self._closed = False  # the end is written: the writer ends once idle
        self._dirty = False
        self._written = time.monotonic()
        self.gone = False
        self.gone_reason: str | None = None  # "superseded" or "cancelled", once noticed
        #: with ``beat``: the writer calls :meth:`heartbeat` every ``beat`` seconds until
        #: :meth:`stop_beating` (an attempt's thread that did it woke as often, and starting
        #: it made the attempt's thread wait for a new thread to run, up to ~70 ms with four
        #: attempts starting on two cores)
        self._beat = beat
        self._next_beat = time.monotonic() + (beat or 0.0)
        if start:
            self.start()

    def start(self) -> None:
        """Start the writer thread now, unless it runs (else the first write starts it):
        not by the agent's output thread at its first line. ``start=False`` and this later:
        an attempt starts it once its prompt is sent (``Workspaces.prepare``), since
        ``Thread.start`` waits until the new thread runs (up to ~25 ms before the take with
        four attempts starting on two cores)."""
        with self._lock:
            self._start_writer()

    # ------------------------------------------------------------------ recording

    def status(self, text: str) -> None:
        """A new live status line: event now, body with the next flush."""
        text = self.redactor.text(text)
        with self._lock:
            self.body["latest_event"] = latest_event(text)
            self._dirty = True
            self._queue(
                [(events.TASK_TURN_EVENT, events.status_payload(text, TurnStatus.IN_PROGRESS))]
            )

    def message(self, message: WorklogMessage) -> None:
        """A new or updated work-log message."""
        data = self.redactor.data(dump_message(message))
        with self._lock:
            self._messages[message.id] = data
            self._dirty = True
            self._queue([(events.WORK_LOG_MESSAGE, data)])

    def log(self, text: str) -> None:
        """A note of the server's own (a ``log`` event without a ``key``)."""
        text = self.redactor.text(text)
        with self._lock:
            self._queue([(events.LOG, {"text": text, "created": time.time()})])

    def setup_log(self, key: dict[str, Any], lines: list[tuple[str, str]]) -> None:
        """Lines of a setup log (``(stream, line)``), one ``log`` event each, in one write."""
        now = time.time()
        items = [
            (
                events.LOG,
                {"key": key, "line": self.redactor.text(line), "stream": stream, "created": now},
            )
            for stream, line in lines
        ]
        with self._lock:
            self._queue(items)

    def proxy_event(self, event: dict[str, Any]) -> None:
        """A request through the egress proxy: a ``proxy_event`` event at once (the stream,
        the work log) and kept in the turn's ``proxy_events`` with the next flush."""
        event = self.redactor.data(event)
        with self._lock:
            kept = list(self.body.get("proxy_events") or [])
            if len(kept) >= MAX_PROXY_EVENTS:
                return
            kept.append(event)
            self.body["proxy_events"] = kept
            self._dirty = True
            self._queue([(events.PROXY_EVENT, event)])

    def set(self, **fields: Any) -> None:
        """Set body fields (e.g. ``base_commit_sha``); written with the next flush."""
        with self._lock:
            self.body.update(self.redactor.data(fields))
            self._dirty = True

    def flush(self) -> None:
        """Write what is queued and the body, if changed, now; return once it is written."""
        with self._lock:
            if self._dirty:
                self._body_asked = True
                self._queue([])
        self.drain()

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until everything asked before this call is written (or dropped: the attempt
        is gone); ``False`` when ``timeout`` seconds passed first."""
        with self._changed:
            asked = self._asked
            return self._changed.wait_for(lambda: self._done >= asked, timeout)

    def stop_beating(self) -> None:
        """No more heartbeats (the attempt's run ended); the writer ends once idle."""
        with self._changed:
            self._beat = None
            self._changed.notify_all()

    def heartbeat(self) -> None:
        """Mark the turn as alive (``updated_at``) and flush a pending work log (by the
        writer: this does not wait). The writer calls it every ``beat`` seconds."""
        with self._lock:
            if self._dirty and self._due():
                self._body_asked = True
                self._queue([])
            elif time.monotonic() - self._written >= HEARTBEAT_SECONDS:
                self._dirty = self._body_asked = True
                self._queue([])

    # ------------------------------------------------------------------ ending

    def finish(
        self,
        status: str,
        *,
        text: str,
        error: dict[str, Any] | None = None,
        output_items: list[dict[str, Any]] | None = None,
    ) -> str:
        """Write the terminal state, after every event queued before. Returns the status the
        turn ended with: ``status``, or ``cancelled`` when the user cancelled it meanwhile
        (the work log is kept either way)."""
        text, error = self.redactor.text(text), self.redactor.data(error)
        output_items = self.redactor.data(output_items)
        if status == TurnStatus.FAILED:  # always with a reason, even when an exception had none
            code = str((error or {}).get("code") or "internal_error")
            error = {**(error or {}), "code": code, "message": (error or {}).get("message") or code}
        with self._changed:
            # the writer has written (or dropped) what was queued, and waits meanwhile
            self._changed.wait_for(lambda: not self._writing and not self._pending)
            self.body["latest_event"] = latest_event(text)
            self.body["error"] = error
            if output_items is not None:
                self.body["output_items"] = output_items
            self.body["worklog"] = {"messages": _without_answer(self._messages, output_items)}
            if self.gone_reason == SUPERSEDED:
                return SUPERSEDED
            body = dict(self.body)
            self._writing = True
        ended, written = SUPERSEDED, False
        try:
            ended, written = self.db.writes.run(
                lambda s: self._end(s, TurnStatus(status), text, error, body)
            )
        finally:
            with self._changed:
                if written:  # lines read meanwhile are not written after the end
                    self.gone = self._closed = True
                    self._pending.clear()
                self._writing = False
                self._changed.notify_all()
        if ended == SUPERSEDED:
            self._gone(SUPERSEDED)
        if not written:
            return ended
        self.bus.publish(self.turn_id)
        return ended

    def _end(
        self,
        s: Session,
        status: TurnStatus,
        text: str,
        error: dict[str, Any] | None,
        body: dict[str, Any],
    ) -> tuple[str, bool]:
        """The terminal state's writes (in the group commit with other attempts' writes):
        the status the turn ended with and whether anything was written (not when it was
        ``deleted``, ``superseded`` or ended otherwise meanwhile, but when cancelled)."""
        now = time.time()
        ended = str(status)
        if not _end(s, self.turn_id, status, body, now, self.run_id):
            current = s.get(m.Turn, self.turn_id)
            if current is None:
                return "deleted", False
            if self.run_id is not None and current.run_id != self.run_id:
                return SUPERSEDED, False
            ended = str(current.turn_status)
            if ended != TurnStatus.CANCELLED:
                return ended, False
            # keep the work log of a cancelled attempt, and say so
            cancelled = dict(current.body)
            cancelled["worklog"] = body["worklog"]
            cancelled["latest_event"] = latest_event("Cancelled")
            current.body = cancelled
            current.updated_at = now
            error = cancelled.get("error")
            text = "Cancelled"
        s.execute(
            update(m.Task)
            .where(m.Task.id == self.task_id)
            .values(updated_at=now, has_unread_turn=True)
        )
        events.append(
            s,
            self.task_id,
            self.turn_id,
            events.TASK_TURN_EVENT,
            events.status_payload(text, ended, error=error),
        )
        return ended, True

    # ------------------------------------------------------------------ internals

    def _due(self) -> bool:
        return time.monotonic() - self._written >= FLUSH_SECONDS

    def _queue(self, items: list[tuple[str, dict[str, Any]]]) -> None:
        """Hand ``items`` (and a body write asked, if any) to the writer thread, started if
        there is none. The caller holds ``_lock``; it waits only while ``MAX_PENDING``
        events are queued (the writer is behind the database by that much)."""
        if self.gone:
            return
        while len(self._pending) >= MAX_PENDING and not self.gone:
            self._changed.wait()
        if self.gone:
            return
        self._pending.extend(items)
        self._asked += 1
        self._start_writer()
        self._changed.notify_all()

    def _start_writer(self) -> None:
        """The writer thread, unless it runs (lock held)."""
        if self._writer is None:
            self._writer = threading.Thread(
                target=self._loop, name=f"wham-rec-{self.turn_id[-8:]}", daemon=True
            )
            self._writer.start()

    def _work(self) -> bool:
        return not self._writing and (bool(self._pending) or self._done < self._asked)

    def _idle(self) -> bool:
        return not self._writing and not self._pending and self._done >= self._asked

    def _loop(self) -> None:
        """The writer: takes everything queued, writes it in one transaction (with the body
        when it is due or asked), and again, until the end is written or it was idle for
        ``IDLE_SECONDS`` (not while it beats: it calls :meth:`heartbeat` when due)."""
        while True:
            with self._changed:
                while True:
                    # the heartbeat is due also while writes keep coming (a setup log's
                    # lines do not rewrite the body, which a heartbeat does every so often)
                    beating = self._beat is not None and not self._closed
                    if beating and time.monotonic() >= self._next_beat:
                        self._next_beat = time.monotonic() + (self._beat or 0.0)
                        self.heartbeat()  # (queues a write when one is due)
                    if self._work():
                        break
                    if beating:
                        self._changed.wait(max(0.0, self._next_beat - time.monotonic()))
                        continue
                    if (self._closed or not self._changed.wait(IDLE_SECONDS)) and self._idle():
                        self._writer = None
                        return
                asked = self._asked
                items, self._pending = self._pending, []
                self._changed.notify_all()  # room in the queue for a caller waiting for it
                body = self._dirty and (self._body_asked or (bool(items) and self._due()))
                self._body_asked = False
                snapshot: dict[str, Any] | None = None
                if body and not self.gone:
                    self.body["worklog"] = {"messages": list(self._messages.values())}
                    snapshot = dict(self.body)  # its values are replaced, never changed
                    self._dirty = False
                write = not self.gone and (snapshot is not None or bool(items))
                self._writing = write
            try:
                if write:
                    self._write(items, snapshot)
            finally:
                with self._changed:
                    self._writing = False
                    self._done = max(self._done, asked)
                    self._changed.notify_all()

    def _write(
        self, items: list[tuple[str, dict[str, Any]]], snapshot: dict[str, Any] | None
    ) -> None:
        """The events (and the body, when given) in one transaction shared with other
        attempts' writes (``Database.writes``, a group commit); published once it
        committed. On the writer thread, without ``_lock``: ``snapshot`` is the body as it
        was when the batch was taken."""

        def write(s: Session) -> str | None:
            """Why the write was refused (nothing of it was added then), or ``None``."""
            # with the body updated in this transaction the row is ours until the commit:
            # the events need no check of their own
            held = False
            if snapshot is not None:
                if not turnstate.record(s, self.turn_id, body=snapshot, run=self.run_id):
                    return self._why_refused(s)
                held = True
            for item_type, payload in items:
                run = None if held else self.run_id
                if not events.append(s, self.task_id, self.turn_id, item_type, payload, run=run):
                    return self._why_refused(s)  # the first: nothing was added
                held = True  # (FOR SHARE on PostgreSQL) the rest go in the same way
            return None

        try:
            refused = self.db.writes.run(write)
        except Exception:  # the database, or a bug: either way nothing more is recorded
            log.exception("recording attempt %s failed; stopping it", self.turn_id)
            with self._lock:
                self.gone = True
                self._pending.clear()
            return
        if refused is not None:
            self._gone(refused)
            return
        if snapshot is not None:
            with self._lock:
                self._written = time.monotonic()
        if items:
            self.bus.publish(self.turn_id)

    def _why_refused(self, s: Session) -> str:
        """Why a write of this run matched no row: the attempt is held by another run or by
        none (requeued, recovered: ``superseded``), or it ended (cancelled, deleted)."""
        row = s.execute(
            select(m.Turn.turn_status, m.Turn.run_id).where(m.Turn.id == self.turn_id)
        ).first()
        if row is not None and self.run_id is not None and row.run_id != self.run_id:
            return SUPERSEDED
        return "cancelled"

    def _gone(self, reason: str) -> None:
        """Write nothing more (what is queued is dropped), and tell the run (on a thread of
        its own: stopping it kills its sandbox, and waits for its output threads)."""
        with self._changed:
            first = self.gone_reason is None
            self.gone = True
            self.gone_reason = self.gone_reason or reason
            self._pending.clear()
            self._changed.notify_all()  # a caller waiting for room in the queue
        if not first:
            return
        if reason == SUPERSEDED:
            log.warning(
                "attempt %s: run %s no longer holds it (requeued or claimed by another run "
                "since); stopping this run without writing anything more",
                self.turn_id,
                self.run_id,
            )
        if self.on_gone is not None:
            threading.Thread(
                target=self.on_gone, args=(reason,), name=f"gone-{self.turn_id[-8:]}", daemon=True
            ).start()
