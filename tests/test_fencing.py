"""Run fencing: a run that was judged dead while it still lives (its worker stalled, its
server restarted) cannot write to its attempt once the attempt was requeued and claimed by
another run. Every write of a run is conditional on the ``run_id`` of its claim
(store.turnstate, "Fencing"); these tests claim as run A, requeue and claim as run B, then
let A try every kind of write: each is refused and changes nothing, B's apply. On SQLite and
on PostgreSQL."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import func, select

from openwham.engine.recorder import SUPERSEDED, TurnRecorder
from openwham.engine.turns import requeue
from openwham.store import events, turnstate
from openwham.store import models as m
from openwham.store.db import Database
from openwham.store.events import LocalEventBus
from openwham.store.turnstate import TurnStatus
from openwham.wire import WorklogMessage
from test_turnstate import _with_a_task

ERROR = {"code": "agent_error", "message": "The agent failed"}


def _with_an_attempt(url: str) -> Database:
    """test_turnstate's database with one task, and a pending attempt ``turn`` of it."""
    database = _with_a_task(url)
    now = time.time()
    with database.session() as s:
        s.add(
            turnstate.new_attempt(
                id="turn", task_id="task", parent_id=None, body={}, created_at=now, updated_at=now
            )
        )
    return database


@pytest.fixture
def db(database_url: str) -> Iterator[Database]:
    database = _with_an_attempt(database_url)
    try:
        yield database
    finally:
        database.dispose()


def _claim(db: Database, run: str) -> None:
    with db.session() as s:
        assert turnstate.claim(s, "turn", body={"by": run}, run=run)
        assert events.append(s, "task", "turn", events.LOG, {"text": f"claimed by {run}"})


def _recovered(db: Database) -> None:
    """What a node's recovery does to an attempt it judged lost (executor.recover)."""
    with db.session() as s:
        turn = s.get(m.Turn, "turn")
        assert turn is not None
        assert requeue(s, turn, "The server running this attempt stopped", seen=turn.updated_at)


def _state(db: Database) -> tuple[Any, ...]:
    with db.sessions() as s:
        turn = s.get(m.Turn, "turn")
        assert turn is not None
        texts = [e.payload.get("text") for e in events.read(s, "turn")]
        count = s.scalar(select(func.count()).select_from(m.TurnEvent))
        return turn.turn_status, dict(turn.body), turn.updated_at, turn.run_id, texts, count


def test_a_superseded_runs_writes_are_refused_and_change_nothing(db: Database) -> None:
    _claim(db, "A")
    _recovered(db)
    _claim(db, "B")
    before = _state(db)
    assert before[0] is TurnStatus.IN_PROGRESS and before[3] == "B"
    body = {"by": "A", "output_items": [{"type": "message"}]}
    with db.session() as s:
        assert not turnstate.record(s, "turn", body=body, run="A")
        assert not turnstate.finish(s, "turn", body=body, run="A")
        assert not turnstate.fail(s, "turn", body=body, error=ERROR, run="A")
        assert turnstate.cancel(s, "turn", body=body, run="A") is None
        assert not turnstate.requeue(s, "turn", body=body, run="A")
        assert not events.append(s, "task", "turn", events.LOG, {"text": "A's line"}, run="A")
    assert _state(db) == before
    # the run that holds it writes as before
    with db.session() as s:
        assert events.append(s, "task", "turn", events.LOG, {"text": "B's line"}, run="B")
        assert turnstate.record(s, "turn", body={"by": "B", "n": 1}, run="B")
    with db.session() as s:
        assert turnstate.finish(s, "turn", body={"by": "B", "done": True}, run="B")
    status, body_now, _, run_id, texts, _ = _state(db)
    assert status is TurnStatus.COMPLETED and body_now == {"by": "B", "done": True}
    assert run_id == "B" and "A's line" not in texts and texts[-1] == "B's line"


def test_a_requeued_attempt_refuses_its_old_run_before_anyone_claims_it(db: Database) -> None:
    """Requeued and not claimed again yet: the old run's finish must not complete it."""
    _claim(db, "A")
    _recovered(db)
    before = _state(db)
    assert before[0] is TurnStatus.PENDING and before[3] is None
    with db.session() as s:
        assert not turnstate.finish(s, "turn", body={"by": "A"}, run="A")
        assert not events.append(s, "task", "turn", events.LOG, {"text": "late"}, run="A")
    assert _state(db) == before


def test_the_own_run_and_unfenced_writers_still_apply(db: Database) -> None:
    """A user's cancel and a node's recovery pass no token; the run's own writes pass."""
    _claim(db, "A")
    with db.session() as s:
        assert turnstate.record(s, "turn", body={"n": 1}, run="A")
        assert events.append(s, "task", "turn", events.LOG, {"text": "A"}, run="A")
    with db.session() as s:
        assert turnstate.cancel(s, "turn") is TurnStatus.IN_PROGRESS
    assert _state(db)[3] == "A"  # a cancel leaves the token: A writes its final work log


def _recorder(db: Database, run: str, gone: list[str]) -> TurnRecorder:
    with db.sessions() as s:
        turn = s.get(m.Turn, "turn")
        assert turn is not None
        body = dict(turn.body)
    return TurnRecorder(db, LocalEventBus(), "task", "turn", body, run_id=run, on_gone=gone.append)


def _until(predicate: Any) -> None:
    deadline = time.monotonic() + 5
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.01)


@pytest.mark.parametrize("first", ["status", "message", "log", "heartbeat", "finish"])
def test_the_recorder_of_a_superseded_run_stops_and_writes_nothing(
    db: Database, first: str
) -> None:
    """Whatever the old run writes first finds the attempt taken: nothing of it lands, the
    recorder says ``superseded`` (its run stops: engine.attempt kills the sandbox), and its
    finish returns ``superseded`` without ending B's attempt."""
    _claim(db, "A")
    gone: list[str] = []
    rec = _recorder(db, "A", gone)
    rec.status("Working")  # A is the owner: this lands
    assert rec.drain(5)
    _recovered(db)
    _claim(db, "B")
    before = _state(db)
    rec._written = 0.0  # the body is due (as after FLUSH_SECONDS)
    message = WorklogMessage.model_validate(
        {"id": "m1", "author": {"role": "assistant"}, "content": {"parts": ["x"]}}
    )
    writes = {
        "status": lambda: rec.status("Still working"),
        "message": lambda: rec.message(message),
        "log": lambda: rec.log("a note"),
        "heartbeat": lambda: (rec.set(x=1), rec.heartbeat()),
        "finish": lambda: rec.finish(TurnStatus.COMPLETED, text="Completed", output_items=[]),
    }
    writes[first]()
    assert rec.drain(5)  # (written by the recorder's own thread)
    assert rec.gone and rec.gone_reason == SUPERSEDED
    _until(lambda: gone)
    assert gone == [SUPERSEDED]
    rec.status("more")
    rec.log("more")
    assert rec.finish(TurnStatus.FAILED, text="Failed", error=ERROR) == SUPERSEDED
    assert rec.finish(TurnStatus.CANCELLED, text="Cancelled") == SUPERSEDED
    assert _state(db) == before


def test_a_cancelled_runs_recorder_says_cancelled(db: Database) -> None:
    """The same check tells a cancel from a lost claim: a cancelled run still ends as
    ``cancelled`` with its work log (that is not fencing's to stop)."""
    _claim(db, "A")
    gone: list[str] = []
    rec = _recorder(db, "A", gone)
    with db.session() as s:
        assert turnstate.cancel(s, "turn") is TurnStatus.IN_PROGRESS
    rec._written = 0.0
    rec.status("Working")
    _until(lambda: gone)
    assert gone == ["cancelled"]
    assert rec.finish(TurnStatus.CANCELLED, text="Cancelled") == TurnStatus.CANCELLED


def test_an_event_append_racing_a_requeue_is_not_left_behind(postgres_url: str) -> None:
    """PostgreSQL: run A appends an event (uncommitted) while another node requeues the
    attempt (which deletes its work log): the requeue waits for A's row lock, then deletes A's
    event with the others; an append after the requeue adds nothing."""
    database = _with_an_attempt(postgres_url)
    try:
        _claim(database, "A")
        requeued = threading.Event()
        with database.session() as a:
            line = {"id": "m1", "text": "A's line"}  # a work-log message: a requeue drops them
            assert events.append(a, "task", "turn", events.WORK_LOG_MESSAGE, line, run="A")
            t = threading.Thread(target=lambda: (_recovered(database), requeued.set()))
            t.start()
            assert not requeued.wait(1.0)  # the requeue waits for A's transaction
        t.join(30)
        assert requeued.is_set()
        with database.session() as s:
            assert not events.append(s, "task", "turn", events.LOG, {"text": "late"}, run="A")
        texts = _state(database)[4]
        assert "A's line" not in texts and "late" not in texts
    finally:
        database.dispose()
