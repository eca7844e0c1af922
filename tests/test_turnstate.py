"""The attempt state machine (store.turnstate): every allowed transition applies, every other
one is refused without changing the row, and two sessions racing on one attempt cannot both
win, on SQLite and on PostgreSQL."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, select, text, update

from openwham.store import models as m
from openwham.store import turnstate
from openwham.store.db import Database
from openwham.store.turnstate import TRANSITIONS, Transition, TurnStatus
from openwham.wire.turns import TERMINAL_TURN_STATUSES, TURN_STATUSES

ERROR = {"code": "setup_failed", "message": "The setup script exited with 1"}


def _with_a_task(url: str) -> Database:
    """A migrated database holding one account, user and task (no turns yet)."""
    database = Database(url)
    database.migrate()
    now = time.time()
    with database.session() as s:
        s.add(m.Account(id="acct", name="a", created_at=now))
        s.add(m.User(id="user", email="u@example.com", name="u", created_at=now))
        s.flush()
        s.add(
            m.Task(
                id="task",
                account_id="acct",
                user_id="user",
                title="t",
                created_at=now,
                updated_at=now,
            )
        )
    return database


@pytest.fixture
def db(database_url: str) -> Iterator[Database]:
    database = _with_a_task(database_url)
    try:
        yield database
    finally:
        database.dispose()


def _attempt(db: Database, status: TurnStatus, turn_id: str = "turn") -> str:
    """An attempt row in ``status`` (tests may set it directly; the project may not)."""
    with db.session() as s:
        row = turnstate.new_attempt(
            id=turn_id,
            task_id="task",
            parent_id=None,
            body={"n": 0},
            created_at=0.0,
            updated_at=0.0,
        )
        s.add(row)
        s.flush()
        s.execute(update(m.Turn).where(m.Turn.id == turn_id).values(turn_status=status))
    return turn_id


def _row(db: Database, turn_id: str) -> tuple[TurnStatus | None, dict[str, Any], float]:
    with db.sessions() as s:
        turn = s.get(m.Turn, turn_id)
        assert turn is not None
        return turn.turn_status, dict(turn.body), turn.updated_at


def _apply(db: Database, turn_id: str, transition: Transition) -> bool:
    body = {"n": 1}
    with db.session() as s:
        calls = {
            Transition.CLAIM: lambda: turnstate.claim(s, turn_id, body=body, run="r1"),
            Transition.WAIT: lambda: turnstate.wait(s, turn_id, body=body),
            Transition.RECORD: lambda: turnstate.record(s, turn_id, body=body),
            Transition.FINISH: lambda: turnstate.finish(s, turn_id, body=body),
            Transition.FAIL: lambda: turnstate.fail(s, turn_id, body=body, error=ERROR),
            Transition.CANCEL: lambda: turnstate.cancel(s, turn_id, body=body) is not None,
            Transition.REQUEUE: lambda: turnstate.requeue(s, turn_id, body=body),
            Transition.RECOVER: lambda: turnstate.recover(s, turn_id, body=body),
        }
        assert set(calls) == set(Transition)  # one function per transition
        return calls[transition]()


def test_the_enum_is_the_wire_contract() -> None:
    assert tuple(TurnStatus) == TURN_STATUSES
    assert {str(x) for x in turnstate.TERMINAL} == set(TERMINAL_TURN_STATUSES)
    assert set(TurnStatus) - turnstate.TERMINAL == turnstate.ACTIVE


def test_the_table() -> None:
    """The state diagram of docs/ARCHITECTURE.md, as pairs (source, target) per transition."""
    pairs = {t: {(str(s), str(r.target)) for s in r.sources} for t, r in TRANSITIONS.items()}
    assert pairs == {
        "claim": {("pending", "in_progress")},
        "wait": {("pending", "pending")},
        "record": {("in_progress", "in_progress")},
        "finish": {("in_progress", "completed")},
        "fail": {("in_progress", "failed")},
        "cancel": {("pending", "cancelled"), ("in_progress", "cancelled")},
        "requeue": {("in_progress", "pending")},
        "recover": {("failed", "pending"), ("cancelled", "pending")},
    }
    # terminal statuses are final; only a user's recover runs a failed or cancelled one again
    for transition, rule in TRANSITIONS.items():
        if rule.sources & turnstate.TERMINAL:
            assert transition is Transition.RECOVER
            assert TurnStatus.COMPLETED not in rule.sources


CASES = [(t, s) for t in Transition for s in TurnStatus]


@pytest.mark.parametrize(("transition", "source"), CASES, ids=[f"{t}-from-{s}" for t, s in CASES])
def test_each_transition_from_each_status(
    db: Database, transition: Transition, source: TurnStatus
) -> None:
    turn_id = _attempt(db, source)
    rule = TRANSITIONS[transition]
    applied = _apply(db, turn_id, transition)
    status, body, updated = _row(db, turn_id)
    with db.sessions() as s:
        epoch = s.scalar(select(m.Turn.events_epoch).where(m.Turn.id == turn_id))
    if source in rule.sources:
        assert applied
        assert status is rule.target  # loaded as the enum
        assert body["n"] == 1 and updated > 0
        if transition is Transition.FAIL:
            assert body["error"] == ERROR
        # the attempt starts over (its events go): turn streams' tails forget theirs
        assert epoch == (1 if transition in turnstate.STARTS_OVER else 0)
    else:
        assert not applied
        assert (status, body, updated, epoch) == (source, {"n": 0}, 0.0, 0)  # untouched


def test_a_completed_attempt_never_changes(db: Database) -> None:
    turn_id = _attempt(db, TurnStatus.COMPLETED)
    assert not any(_apply(db, turn_id, t) for t in Transition)
    assert _row(db, turn_id) == (TurnStatus.COMPLETED, {"n": 0}, 0.0)


def test_a_user_turn_has_no_transitions(db: Database) -> None:
    with db.session() as s:
        s.add(m.Turn(id="u", task_id="task", role="user", body={}, created_at=0.0, updated_at=0.0))
        s.flush()
        s.execute(update(m.Turn).where(m.Turn.id == "u").values(turn_status=TurnStatus.PENDING))
    assert not _apply(db, "u", Transition.CLAIM)


def test_cancel_says_what_it_cancelled(db: Database) -> None:
    """The canceller learns the status it won against (a pending attempt's terminal event is
    then its to write; a running one's executor writes it)."""
    for status in TurnStatus:
        turn_id = _attempt(db, status, f"c-{status}")
        with db.session() as s:
            was = turnstate.cancel(s, turn_id)
        assert was == (status if status in turnstate.ACTIVE else None)


def test_fail_needs_a_stated_reason(db: Database) -> None:
    turn_id = _attempt(db, TurnStatus.IN_PROGRESS)
    for error in ({}, {"code": "", "message": "x"}, {"code": "x"}, {"code": 1, "message": "x"}):
        with db.session() as s, pytest.raises(ValueError, match="error code"):
            turnstate.fail(s, turn_id, body={}, error=error)
    assert _row(db, turn_id)[0] is TurnStatus.IN_PROGRESS


def test_an_unknown_status_is_refused_not_stored(db: Database) -> None:
    turn_id = _attempt(db, TurnStatus.PENDING)
    with db.session() as s, pytest.raises(Exception, match="running"):
        s.execute(update(m.Turn).where(m.Turn.id == turn_id).values(turn_status="running"))
    assert _row(db, turn_id)[0] is TurnStatus.PENDING


def test_new_rows(db: Database) -> None:
    attempt = turnstate.new_attempt(id="a", task_id="task", created_at=0.0, updated_at=0.0)
    assert (attempt.role, attempt.turn_status) == ("assistant", TurnStatus.PENDING)
    done = _attempt(db, TurnStatus.COMPLETED, "done")
    running = _attempt(db, TurnStatus.IN_PROGRESS, "running")
    with db.sessions() as s:
        old = s.get(m.Turn, done)
        assert old is not None
        copy = turnstate.copied(old, id="c", task_id="task", created_at=0.0, updated_at=0.0)
        assert copy.turn_status is TurnStatus.COMPLETED and copy.role == "assistant"
        active = s.get(m.Turn, running)
        assert active is not None
        with pytest.raises(ValueError, match="in_progress"):
            turnstate.copied(active, id="d", task_id="task", created_at=0.0, updated_at=0.0)


def test_racing_claims_exactly_one_wins(db: Database) -> None:
    """Eight sessions claim one attempt at once, many times over: one claim applies each time."""
    for round_ in range(5):
        turn_id = _attempt(db, TurnStatus.PENDING, f"race-{round_}")
        won = _race(db, turn_id, 8)
        assert len(won) == 1
        status, body, _ = _row(db, turn_id)
        assert status is TurnStatus.IN_PROGRESS and body["run"]["executor"] == won[0]


def _race(db: Database, turn_id: str, n: int) -> list[str]:
    """``n`` threads, each with its own session, claim ``turn_id`` together; who won."""
    barrier = threading.Barrier(n)
    won: list[str] = []
    errors: list[BaseException] = []

    def claim(name: str) -> None:
        try:
            barrier.wait(timeout=30)
            with db.session() as s:
                if turnstate.claim(s, turn_id, body={"run": {"executor": name}}, run=name):
                    won.append(name)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=claim, args=(f"node-{i}",)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    return won


def test_a_claim_blocked_by_another_nodes_claim_loses(postgres_url: str) -> None:
    """PostgreSQL, interleaved for certain: node A has claimed (not committed yet), node B's
    claim waits for A's row lock, A commits, and B's claim re-checks the row and is refused;
    likewise a cancel that lands first makes a claim fail."""
    database = _with_a_task(postgres_url)
    try:
        for first in (Transition.CLAIM, Transition.CANCEL):
            turn_id = _attempt(database, TurnStatus.PENDING, f"t-{first}")
            result: list[bool] = []
            with database.sessions() as a:
                assert turnstate.move(a, turn_id, first, body={"by": "A"})
                pid = a.execute(text("SELECT pg_backend_pid()")).scalar()
                b_thread = threading.Thread(target=_claim_as, args=(database, turn_id, result))
                b_thread.start()
                _wait_until_blocked_by(database, pid)
                a.commit()
            b_thread.join(60)
            assert result == [False]
            status, body, _ = _row(database, turn_id)
            assert status is TRANSITIONS[first].target and body == {"by": "A"}
    finally:
        database.dispose()


def _claim_as(db: Database, turn_id: str, result: list[bool]) -> None:
    with db.session() as s:
        result.append(turnstate.claim(s, turn_id, body={"by": "B"}, run="B"))


def _wait_until_blocked_by(db: Database, pid: Any) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with db.sessions() as s:
            blocked = s.scalar(
                select(text("count(*)"))
                .select_from(text("pg_stat_activity"))
                .where(text(":pid = ANY(pg_blocking_pids(pid))").bindparams(pid=pid))
            )
        if blocked:
            return
        time.sleep(0.05)
    raise AssertionError("the second claim never waited for the first")


def test_a_node_judging_an_attempt_lost_cannot_undo_a_newer_write(db: Database) -> None:
    """Node A reads an attempt as stale; before A's requeue lands, B requeues and claims it
    (or its owner heartbeats): A's requeue, conditional on the ``updated_at`` it judged by,
    is refused, and B's run stands."""
    turn_id = _attempt(db, TurnStatus.IN_PROGRESS)
    with db.sessions() as s:
        seen = s.scalar(select(m.Turn.updated_at).where(m.Turn.id == turn_id))
    assert seen is not None
    with db.session() as s:  # node B
        assert turnstate.requeue(s, turn_id, body={"by": "B"}, seen=seen)
    with db.session() as s:
        assert turnstate.claim(s, turn_id, body={"by": "B"}, run="B")
    with db.session() as s:  # node A, late
        assert not turnstate.requeue(s, turn_id, body={"by": "A"}, seen=seen)
        assert not turnstate.fail(s, turn_id, body={"by": "A"}, error=ERROR, seen=seen)
    status, body, _ = _row(db, turn_id)
    assert status is TurnStatus.IN_PROGRESS and body == {"by": "B"}


@pytest.mark.parametrize("tries", [1, 2], ids=["requeue", "fail"])
def test_recovery_leaves_an_attempt_that_heartbeats_meanwhile(
    db: Database, tmp_path: Path, tries: int
) -> None:
    """The executor's sweep judges an attempt lost (old heartbeat; with tries left it would
    run again, else fail); its owner writes a heartbeat between that judgement and the sweep's
    update: the sweep leaves it."""
    from openwham.config import Settings
    from openwham.engine.attempt import Engine
    from openwham.engine.executor import recover
    from openwham.store.events import LocalEventBus

    turn_id = _attempt(db, TurnStatus.IN_PROGRESS)
    with db.session() as s:
        body = {"run": {"executor": "elsewhere:1:gone", "tries": tries}}
        s.execute(update(m.Turn).where(m.Turn.id == turn_id).values(body=body, updated_at=1.0))
    settings = Settings(data_dir=tmp_path / "data", database_url=str(db.url), executor="none")
    engine = Engine(settings, db, LocalEventBus(), None, None)
    beats = []

    def heartbeat_first(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        if statement.lstrip().upper().startswith("UPDATE TURNS") and not beats:
            beats.append(time.time())
            with db.engine.connect() as other:  # the owner, on its own connection
                other.execute(
                    update(m.Turn).where(m.Turn.id == turn_id).values(updated_at=beats[0])
                )
                other.commit()

    event.listen(db.engine, "before_cursor_execute", heartbeat_first)
    try:
        assert recover(engine) == []
    finally:
        event.remove(db.engine, "before_cursor_execute", heartbeat_first)
        engine.close()
    status, body, updated = _row(db, turn_id)
    assert beats and updated == beats[0]
    assert status is TurnStatus.IN_PROGRESS and body["run"]["executor"] == "elsewhere:1:gone"


def test_events_of_one_turn_become_visible_in_id_order(db: Database) -> None:
    """Writer A inserts and holds its transaction, writer B inserts and commits, a reader
    reads, A commits, the reader reads again: the reader gets both events, in order. Without
    the per-turn lock in events.append, B's higher id is read first and A's lower one, committed
    later, is skipped forever by a reader resuming after the last id it saw."""
    from openwham.store import events

    _attempt(db, TurnStatus.IN_PROGRESS)
    seen: list[events.Event] = []

    def read() -> None:
        with db.sessions() as s:
            seen.extend(events.read(s, "turn", after=seen[-1].id if seen else 0))

    def writer_b() -> None:
        with db.session() as s:
            events.append(s, "task", "turn", events.LOG, {"text": "B"})

    b = threading.Thread(target=writer_b)
    with db.session() as a:
        events.append(a, "task", "turn", events.LOG, {"text": "A"})
        b.start()
        b.join(timeout=2)  # without the fix B commits here; with it B waits for A
        read()
    b.join()
    read()
    assert [e.payload["text"] for e in seen] == ["A", "B"]
    assert [e.id for e in seen] == sorted(e.id for e in seen)
