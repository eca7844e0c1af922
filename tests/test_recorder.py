"""The attempt's recorder (``engine.recorder``) hands what it records to a writer thread of
its own: the thread that reads the agent's output never waits for the database (a work-log
write waiting for SQLite's lock held the reading of ``turn.completed`` behind it), while the
events stay in order, are published only once committed, the end comes after every line
queued before it, a flush returns once what it asked is written, and the queue is bounded.
Real SQLite, held busy by an open write transaction of another connection."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import text

from openwham.engine import recorder
from openwham.engine.recorder import SUPERSEDED, TurnRecorder
from openwham.store import db as store_db
from openwham.store import events, turnstate
from openwham.store import models as m
from openwham.store.db import Database
from openwham.store.events import LocalEventBus
from openwham.store.status import TurnStatus
from test_fencing import _with_an_attempt
from test_groupcommit import _hold, _message, _start, _until

BOUND = 20.0


@pytest.fixture
def db(sqlite_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Database]:
    # a writer waiting for the held database waits for it, not for the busy timeout
    monkeypatch.setattr(store_db, "SQLITE_BUSY_TIMEOUT_MS", 120_000)
    database = _with_an_attempt(sqlite_url)
    with database.session() as s:
        assert turnstate.claim(s, "turn", body={}, run="A")
    try:
        yield database
    finally:
        database.dispose()


class Bus(LocalEventBus):
    """Records, at each publish, how many of the turn's events a stream would read."""

    def __init__(self, db: Database) -> None:
        super().__init__()
        self.db = db
        self.seen: list[int] = []

    def publish(self, turn_id: str) -> None:
        with self.db.sessions() as s:
            self.seen.append(len(events.read(s, turn_id)))
        super().publish(turn_id)


def _stored(db: Database) -> list[str]:
    """The turn's events in order: a message's id, a status line's or log's text, a proxy
    event's host."""
    with db.sessions() as s:
        return [
            str(
                e.payload.get("id")
                or e.payload.get("text")
                or e.payload.get("line")
                or e.payload.get("host")
            )
            for e in events.read(s, "turn")
        ]


def _body(db: Database) -> dict[str, Any]:
    with db.sessions() as s:
        turn = s.get(m.Turn, "turn")
        assert turn is not None
        return dict(turn.body)


def test_the_agents_lines_are_handed_over_while_the_database_is_busy(db: Database) -> None:
    """With the database held by another writer, recording an agent's lines returns at once
    (before: each call waited for its commit, so the output thread waited for the holder);
    nothing is published before it is committed; once the holder lets go every line is
    stored in the order it was recorded."""
    bus = Bus(db)
    rec = TurnRecorder(db, bus, "task", "turn", {}, run_id="A")
    holder = _hold(db)
    try:

        def agent_output() -> None:
            rec.status("Working")
            for n in range(5):
                rec.message(_message(n))
            rec.log("a note")
            rec.setup_log({"k": 1}, [("stdout", "set up")])
            rec.proxy_event({"host": "example.com"})

        reader = _start(agent_output)
        reader.join(BOUND)
        assert not reader.is_alive(), "recording waited for the database"
        assert bus.seen == [] and _stored(db) == []  # nothing committed, nothing published
    finally:
        holder.commit()
        holder.close()
    assert rec.drain(BOUND)
    assert _stored(db) == [
        "Working",
        "m0",
        "m1",
        "m2",
        "m3",
        "m4",
        "a note",
        "set up",
        "example.com",
    ]
    # each publish came after its lines were committed, the last after all of them
    assert bus.seen and bus.seen == sorted(bus.seen) and bus.seen[0] >= 1
    assert bus.seen[-1] == 9


def test_the_end_comes_after_the_lines_queued_before_it(db: Database) -> None:
    """Lines queued behind a busy database and then the attempt's end: the end is written
    after them, in its own place; lines read after the end are not written."""
    rec = TurnRecorder(db, LocalEventBus(), "task", "turn", {}, run_id="A")
    holder = _hold(db)
    ended: list[str] = []
    try:
        for n in range(3):
            rec.message(_message(n))
        ender = _start(lambda: ended.append(rec.finish(TurnStatus.COMPLETED, text="Completed")))
        time.sleep(0.2)  # (it waits for the writer, which waits for the holder)
        assert ended == []
    finally:
        holder.commit()
        holder.close()
    ender.join(BOUND)
    assert ended == [TurnStatus.COMPLETED]
    rec.message(_message(9))  # the agent printed more while closing down
    assert rec.drain(BOUND)
    assert _stored(db) == ["m0", "m1", "m2", "Completed"]
    body = _body(db)
    assert [msg["id"] for msg in body["worklog"]["messages"]] == ["m0", "m1", "m2"]


def test_a_flush_returns_once_what_it_asked_is_written(db: Database) -> None:
    """``flush`` (a release at shutdown, before it requeues the attempt) waits for the lines
    queued before it and the body."""
    rec = TurnRecorder(db, LocalEventBus(), "task", "turn", {}, run_id="A")
    holder = _hold(db)
    flushed = threading.Event()
    try:
        rec.message(_message(0))
        rec.set(base_commit_sha="abc")
        flusher = _start(lambda: (rec.flush(), flushed.set()))
        assert not flushed.wait(0.3)
    finally:
        holder.commit()
        holder.close()
    flusher.join(BOUND)
    assert flushed.is_set()
    body = _body(db)  # read right after the flush returned: written by then
    assert body["base_commit_sha"] == "abc"
    assert [msg["id"] for msg in body["worklog"]["messages"]] == ["m0"]
    assert _stored(db) == ["m0"]


def test_the_queue_is_bounded(db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past ``MAX_PENDING`` queued events the caller waits for the writer (memory stays
    bounded when the database is slow); no line is lost or reordered."""
    monkeypatch.setattr(recorder, "MAX_PENDING", 3)
    rec = TurnRecorder(db, LocalEventBus(), "task", "turn", {}, run_id="A")
    holder = _hold(db)
    done = threading.Event()
    try:

        def agent_output() -> None:
            for n in range(10):
                rec.message(_message(n))
            done.set()

        reader = _start(agent_output)
        _until(lambda: len(rec._pending) == 3)
        assert not done.wait(0.3)  # the fourth waits for room
    finally:
        holder.commit()
        holder.close()
    reader.join(BOUND)
    assert done.is_set()
    assert rec.drain(BOUND)
    assert _stored(db) == [f"m{n}" for n in range(10)]


def test_lines_queued_when_the_run_lost_its_attempt_are_dropped(db: Database) -> None:
    """The attempt was taken by another run while lines waited: the first write is refused,
    the rest are dropped, ``on_gone`` is told once, and the caller never waited."""
    gone: list[str] = []
    rec = TurnRecorder(db, LocalEventBus(), "task", "turn", {}, run_id="A", on_gone=gone.append)
    holder = _hold(db)
    try:
        holder.execute(text("UPDATE turns SET run_id = 'B' WHERE id = 'turn'"))
        for n in range(5):
            rec.message(_message(n))
    finally:
        holder.commit()
        holder.close()
    assert rec.drain(BOUND)
    _until(lambda: gone == [SUPERSEDED])
    rec.message(_message(7))
    assert rec.drain(BOUND)
    assert rec.gone_reason == SUPERSEDED and _stored(db) == []
    assert rec.finish(TurnStatus.COMPLETED, text="Completed") == SUPERSEDED


def test_the_writer_beats_while_lines_keep_coming_and_ends_once_stopped(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``beat`` the recorder's writer is also the attempt's heartbeat (no thread of its
    own to start, which made the attempt's thread wait for a new thread to run): the turn's
    ``updated_at`` moves on every ``HEARTBEAT_SECONDS`` with nobody calling ``heartbeat``,
    also while log lines (which do not rewrite the body) keep the writer busy; after
    ``stop_beating`` it beats no more and its thread ends once idle."""
    monkeypatch.setattr(recorder, "HEARTBEAT_SECONDS", 0.2)
    monkeypatch.setattr(recorder, "IDLE_SECONDS", 0.2)

    def updated() -> float:
        with db.sessions() as s:
            turn = s.get(m.Turn, "turn")
            assert turn is not None
            return float(turn.updated_at)

    rec = TurnRecorder(db, LocalEventBus(), "task", "turn", {}, run_id="A", beat=0.02)
    seen = {updated()}
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        rec.log("a line")  # the writer always has something to write
        seen.add(updated())
        time.sleep(0.005)
    assert len(seen) >= 4, f"updated_at moved {len(seen) - 1} times in 2 s"
    writer = rec._writer  # it does not end while it beats
    assert writer is not None and writer.is_alive()
    rec.stop_beating()
    assert rec.drain(BOUND)
    writer.join(BOUND)
    assert not writer.is_alive()
    last = updated()
    time.sleep(0.5)
    assert updated() == last


def test_a_recorder_made_with_start_false_starts_its_writer_at_start_or_its_first_write(
    db: Database,
) -> None:
    """An attempt's recorder starts no thread when it is made (its ``Thread.start`` waited
    until the new thread ran, before the attempt's take): ``start()`` starts the writer (the
    engine's, once the prompt is sent), as does the first write, once."""
    rec = TurnRecorder(db, LocalEventBus(), "task", "turn", {}, run_id="A", start=False)
    assert rec._writer is None
    rec.start()
    writer = rec._writer
    assert writer is not None and writer.is_alive()
    rec.start()
    assert rec._writer is writer
    other = TurnRecorder(db, LocalEventBus(), "task", "turn", {}, run_id="A", start=False)
    assert other._writer is None
    other.status("Working")
    assert other._writer is not None
    assert other.drain(BOUND) and "Working" in _stored(db)
