"""Group commit (``store.groupcommit``): on SQLite the small writes that threads ask for while
a commit is under way go in one transaction (running attempts' events: one transaction per
agent line before), each caller returns only once its write committed, one caller's writes
keep their order, and one write's error or refusal never loses another's. Real SQLite (and
PostgreSQL, where each write stays its own transaction); the database is held busy by an
open write transaction so that the batches form the same way every run."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from sqlalchemy import Connection, select, text
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from openwham.config import Settings
from openwham.engine import turns
from openwham.engine.claim import Claims
from openwham.engine.recorder import SUPERSEDED, TurnRecorder
from openwham.engine.titling import Titles
from openwham.store import db as store_db
from openwham.store import events, groupcommit, sqlitelock, turnstate
from openwham.store import models as m
from openwham.store.db import Database
from openwham.store.events import LocalEventBus
from openwham.store.groupcommit import GroupCommit
from openwham.store.status import TurnStatus
from openwham.wire import WorklogMessage
from test_turnstate import _with_a_task

BOUND = 20.0


def _until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + BOUND
    while not condition():
        assert time.monotonic() < deadline, "the condition never held"
        time.sleep(0.01)


def _start(target: Callable[[], None]) -> threading.Thread:
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread


def _hold(db: Database) -> Connection:
    """An open write transaction: every other writer of the database waits behind it."""
    holder = db.engine.connect()
    holder.execute(text("UPDATE tasks SET updated_at = updated_at"))
    return holder


def _with_writes(url: str) -> Database:
    """A database with a task and a ``writes`` table (``who`` unique)."""
    database = _with_a_task(url)
    with database.engine.begin() as conn:
        conn.execute(text("CREATE TABLE writes (id INTEGER PRIMARY KEY, who TEXT UNIQUE)"))
    return database


@pytest.fixture
def db(sqlite_url: str) -> Iterator[Database]:
    database = _with_writes(sqlite_url)
    try:
        yield database
    finally:
        database.dispose()


def _insert(who: str) -> Callable[[Session], str]:
    def job(s: Session) -> str:
        s.execute(text("INSERT INTO writes (who) VALUES (:who)"), {"who": who})
        return who

    return job


def _outcome(
    writes: GroupCommit, outcome: dict[str, Any], error: type[Exception]
) -> Callable[[str], None]:
    """A writer of ``who`` that puts its result, or its ``error``, in ``outcome``."""

    def write(who: str) -> None:
        try:
            outcome[who] = writes.run(_insert(who))
        except error as exc:
            outcome[who] = exc

    return write


def _let_go(holder: Connection, threads: list[threading.Thread]) -> None:
    """End the holder's transaction and wait for the writers it held back."""
    holder.commit()
    holder.close()
    for thread in threads:
        thread.join(BOUND)


def _rows(db: Database) -> list[str]:
    with db.engine.connect() as conn:
        return list(conn.scalars(text("SELECT who FROM writes ORDER BY id")))


def test_writes_asked_during_a_commit_share_the_next_transaction(db: Database) -> None:
    writes = db.writes
    assert writes.batched
    holder = _hold(db)
    results: dict[str, str] = {}

    def write(who: str) -> None:
        results[who] = writes.run(_insert(who))

    first = _start(lambda: write("first"))  # taken: its transaction waits for the holder
    _until(lambda: not writes.queued and writes.busy)
    time.sleep(0.2)
    others = [_start(lambda n=n: write(f"w{n}")) for n in range(8)]  # type: ignore[misc]
    _until(lambda: writes.queued == 8)
    assert not results  # nobody returned before its commit
    before = writes.commits
    _let_go(holder, [first, *others])
    assert writes.commits - before == 2  # the first alone, then the eight together
    assert results == {w: w for w in ["first", *(f"w{n}" for n in range(8))]}
    rows = _rows(db)
    assert rows[0] == "first" and sorted(rows[1:]) == sorted(f"w{n}" for n in range(8))


def test_a_failing_write_in_a_batch_fails_alone(db: Database) -> None:
    """A bad write in a batch is rolled back alone (its savepoint): its caller gets its error,
    the others are committed in the same transaction (before: the batch was rolled back and
    each write ran again in a transaction of its own)."""
    writes = db.writes
    writes.run(_insert("taken"))
    holder = _hold(db)
    outcome: dict[str, Any] = {}
    write = _outcome(writes, outcome, IntegrityError)

    before = writes.commits
    first = _start(lambda: write("first"))
    _until(lambda: writes.busy)
    time.sleep(0.2)
    threads = []
    for who in ["a", "taken", "b"]:  # "taken" breaks the UNIQUE constraint
        threads.append(_start(lambda who=who: write(who)))  # type: ignore[misc]
        _until(lambda: writes.queued == len(threads))
    _let_go(holder, [first, *threads])
    assert isinstance(outcome.pop("taken"), IntegrityError)
    assert outcome == {"first": "first", "a": "a", "b": "b"}
    assert _rows(db) == ["taken", "first", "a", "b"]
    assert writes.commits - before == 2  # "first" alone, then a and b together


def test_the_writes_run_on_one_writer_thread(db: Database, monkeypatch: Any) -> None:
    """Every write of the process runs on the writer thread, not its caller's: the lock does
    not change hands between callers (each a thread that may wait for the GIL and a core
    before its next statement); the thread ends once idle and a new one starts at need."""
    monkeypatch.setattr(groupcommit, "IDLE_SECONDS", 0.2)
    writes = db.writes
    ran: list[threading.Thread] = []

    def job(who: str) -> Callable[[Session], str]:
        insert = _insert(who)

        def run(s: Session) -> str:
            ran.append(threading.current_thread())
            return insert(s)

        return run

    holder = _hold(db)
    callers = [_start(lambda: writes.run(job("w0")))]
    _until(lambda: writes.busy)
    callers += [_start(lambda n=n: writes.run(job(f"w{n}"))) for n in range(1, 6)]  # type: ignore[misc]
    _until(lambda: writes.queued == 5)
    _let_go(holder, callers)
    assert len(ran) == 6
    assert len({t.ident for t in ran}) == 1
    assert ran[0].name == "wham-sqlite-writer" and ran[0] not in callers
    _until(lambda: writes.writer is None)  # idle: gone
    assert writes.run(job("later")) == "later"
    assert ran[-1] is not ran[0] and ran[-1].name == "wham-sqlite-writer"
    assert sorted(_rows(db)) == sorted([*(f"w{n}" for n in range(6)), "later"])


def _pending(db: Database, ids: list[str], task_id: str = "task") -> list[str]:
    """Pending attempts ``ids`` of ``task_id``."""
    now = time.time()
    with db.session() as s:
        for turn_id in ids:
            s.add(
                turnstate.new_attempt(
                    id=turn_id,
                    task_id=task_id,
                    parent_id=None,
                    body={},
                    created_at=now,
                    updated_at=now,
                )
            )
    return ids


def _attempts(db: Database, n: int) -> list[str]:
    """``n`` running attempts, claimed by run ``A``."""
    ids = _pending(db, [f"turn{k}" for k in range(n)])
    with db.session() as s:
        for turn_id in ids:
            assert turnstate.claim(s, turn_id, body={}, run="A")
    return ids


def _written(rec: TurnRecorder, message: WorklogMessage) -> None:
    """``message`` recorded and written (the recorder hands it to a writer thread)."""
    rec.message(message)
    assert rec.drain(BOUND)


def _message(n: int) -> WorklogMessage:
    return WorklogMessage.model_validate(
        {
            "id": f"m{n}",
            "author": {"role": "assistant"},
            "content": {"content_type": "text", "parts": [f"line {n}"]},
            "status": "finished_successfully",
            "channel": None,
        }
    )


def test_attempts_lines_are_committed_together_in_order_and_published_after(
    db: Database,
) -> None:
    """Four running attempts print lines at once while the database is busy: their events are
    committed in far fewer transactions than lines, every one is stored, each attempt's in
    the order it printed them; a line is published only after its commit; and a run that was
    superseded meanwhile is refused in the batch without taking the others' lines with it."""
    turns = _attempts(db, 4)
    with db.session() as s:  # turn3 was requeued and claimed by another run meanwhile
        assert turnstate.requeue(s, "turn3", body={})
        assert turnstate.claim(s, "turn3", body={}, run="B")
    published: list[tuple[str, int]] = []

    class Bus(LocalEventBus):
        def publish(self, turn_id: str) -> None:
            with db.sessions() as s:  # what a stream would read now
                published.append((turn_id, len(events.read(s, turn_id))))

    bus = Bus()
    recorders = [TurnRecorder(db, bus, "task", t, {}, run_id="A") for t in turns]
    gone: list[str] = []
    recorders[3].on_gone = gone.append
    lines = 12
    holder = _hold(db)
    before = db.writes.commits

    def attempt(rec: TurnRecorder) -> None:
        for n in range(lines):
            rec.message(_message(n))

    threads = [_start(lambda: attempt(recorders[0]))]
    _until(lambda: db.writes.busy)  # its first line taken: waiting for the holder
    threads += [_start(lambda rec=rec: attempt(rec)) for rec in recorders[1:]]  # type: ignore[misc]
    _until(lambda: db.writes.queued == 3)  # three queue meanwhile
    for thread in threads:  # the lines are handed over: nobody waits for the database
        thread.join(BOUND)
        assert not thread.is_alive()
    _let_go(holder, [])
    for rec in recorders:
        assert rec.drain(BOUND)
    commits = db.writes.commits - before
    # 37 lines (turn3's one refused): one transaction each once; now each recorder writes
    # its first line alone and the lines queued meanwhile in one more write (turn3: one,
    # refused), and the group commit writes queued together in one transaction
    assert commits <= 7, commits
    with db.sessions() as s:
        for turn_id in turns[:3]:
            got = [e.payload["id"] for e in events.read(s, turn_id)]
            assert got == [f"m{n}" for n in range(lines)], (turn_id, got)
        assert events.read(s, "turn3") == []
    assert recorders[3].gone_reason == SUPERSEDED
    _until(lambda: gone == [SUPERSEDED])
    for turn_id in turns[:3]:  # each publish saw its own lines committed
        seen = [n for t, n in published if t == turn_id]
        assert seen and seen == sorted(set(seen)) and seen[0] >= 1, (turn_id, seen)
        assert seen[-1] == lines, (turn_id, seen)


def test_on_postgresql_each_write_is_its_own_transaction(postgres_url: str) -> None:
    database = _with_a_task(postgres_url)
    try:
        assert not database.writes.batched
        turn = _attempts(database, 1)[0]
        rec = TurnRecorder(database, LocalEventBus(), "task", turn, {}, run_id="A")
        before = database.writes.commits
        for n in range(3):
            rec.message(_message(n))
            assert rec.drain(BOUND)
        assert database.writes.commits - before == 3
        with database.sessions() as s:
            assert [e.payload["id"] for e in events.read(s, turn)] == ["m0", "m1", "m2"]
    finally:
        database.dispose()


def test_a_group_commit_alone_commits_at_once(db: Database) -> None:
    """No timer: a write with nobody else waiting is committed now, in a transaction alone."""
    group = GroupCommit(db.session, batched=True)
    assert group.run(_insert("alone")) == "alone"
    assert group.commits == 1 and not group.busy
    assert _rows(db) == ["alone"]


def test_a_write_handed_over_first_commits_what_its_caller_wrote(db: Database) -> None:
    """``run_in``: a caller's session that wrote already (SQLite's lock held by it) is
    committed before the writer runs the job, which would otherwise wait for that lock
    until the busy timeout; the job runs on the writer thread."""
    ran: list[str] = []

    def job(s: Session) -> str:
        ran.append(threading.current_thread().name)
        return _insert("handed")(s)

    with db.session() as s:
        s.execute(text("INSERT INTO writes (who) VALUES ('caller')"))
        started = time.monotonic()
        assert db.writes.run_in(s, job) == "handed"
        assert time.monotonic() - started < 2
    assert ran == ["wham-sqlite-writer"]
    assert _rows(db) == ["caller", "handed"]


def test_title_writes_share_the_batch_and_a_refused_one_is_undone_alone(db: Database) -> None:
    """Titles are written in the group commit with the attempts' lines: a batch holds a title
    accepted, a title refused (its run no longer holds the attempt: the title's update is
    undone with its refused event, in its savepoint) and a line; one transaction commits
    the accepted ones."""
    now = time.time()
    with db.session() as s:
        s.add(
            m.Task(
                id="task2",
                account_id="acct",
                user_id="user",
                title="t2",
                created_at=now,
                updated_at=now,
            )
        )
    turns = _attempts(db, 3)
    _pending(db, ["other"], "task2")
    with db.session() as s:
        assert turnstate.claim(s, "other", body={}, run="A")
        assert turnstate.requeue(s, turns[1], body={})  # turn1's run A lost it
        assert turnstate.claim(s, turns[1], body={}, run="B")
    bus = LocalEventBus()
    titles = Titles(Settings(), db, bus)
    recorder = TurnRecorder(db, bus, "task", turns[0], {}, run_id="A")
    another = TurnRecorder(db, bus, "task", turns[2], {}, run_id="A")
    holder = _hold(db)
    before = db.writes.commits
    first = _start(lambda: _written(recorder, _message(0)))
    _until(lambda: db.writes.busy)
    claim = SimpleNamespace(task_id="task2", turn_id="other", run_id="A")
    lost = SimpleNamespace(task_id="task", turn_id=turns[1], run_id="A")
    threads = [
        _start(lambda: titles._write(claim, "Named")),  # type: ignore[arg-type]
        _start(lambda: titles._write(lost, "Not named")),  # type: ignore[arg-type]
        _start(lambda: _written(another, _message(1))),
    ]
    _until(lambda: db.writes.queued == 3)
    _let_go(holder, [first, *threads])
    assert db.writes.commits - before == 2
    with db.sessions() as s:
        named = {t.id: (t.title, t.has_generated_title) for t in s.scalars(select(m.Task))}
        assert named == {"task": ("t", False), "task2": ("Named", True)}
        assert [e.item_type for e in events.read(s, "other")] == [events.TASK_TITLE_GENERATED]
        assert events.read(s, turns[1]) == []
        assert [e.payload["id"] for e in events.read(s, turns[0])] == ["m0"]
        assert [e.payload["id"] for e in events.read(s, turns[2])] == ["m1"]


def test_claims_share_the_batch_and_a_taken_attempt_is_not_claimed_twice(db: Database) -> None:
    """Attempts claimed while the database is busy (a burst's) are written in one transaction
    (each claim queued for the lock before); an attempt claimed by another executor
    meanwhile is not claimed again, and the others are not held back by it."""
    _pending(db, [f"p{k}" for k in range(4)])
    claims = Claims(Settings(), db, LocalEventBus(), "here")
    taken = _attempts(db, 1)[0]
    recorder = TurnRecorder(db, LocalEventBus(), "task", taken, {}, run_id="A")
    got: dict[str, Any] = {}
    holder = _hold(db)
    before = db.writes.commits
    first = _start(lambda: _written(recorder, _message(0)))
    _until(lambda: db.writes.busy)
    threads = [
        _start(lambda k=k: got.__setitem__(f"p{k}", claims.claim(f"p{k}")))  # type: ignore[misc]
        for k in range(3)
    ]
    _until(lambda: db.writes.queued == 3)
    # p2 is taken by another executor meanwhile (the holder's transaction)
    holder.execute(text("UPDATE turns SET turn_status = 'in_progress', run_id = 'X' WHERE id='p2'"))
    _let_go(holder, [first, *threads])
    assert db.writes.commits - before == 2
    assert got["p2"] is None
    assert {k: v.turn_id for k, v in got.items() if v is not None} == {"p0": "p0", "p1": "p1"}
    with db.sessions() as s:
        rows = {t.id: (t.turn_status, t.run_id) for t in s.scalars(select(m.Turn))}
    assert rows["p0"] == (TurnStatus.IN_PROGRESS, got["p0"].run_id)
    assert rows["p2"] == (TurnStatus.IN_PROGRESS, "X") and rows["p3"][0] == TurnStatus.PENDING


def test_attempts_queued_behind_busy_workers_are_marked_waiting_in_one_write(
    db: Database,
) -> None:
    """A burst's queued attempts are shown "Waiting" in one transaction of the group commit
    (one each before, in the POST that queued them); one that is no longer pending is left
    alone, and each marked one is published once."""
    _pending(db, [f"q{k}" for k in range(5)])
    with db.session() as s:
        assert turnstate.claim(s, "q4", body={}, run="A")
    published: list[str] = []

    class Bus(LocalEventBus):
        def publish(self, turn_id: str) -> None:
            published.append(turn_id)

    before = db.writes.commits
    turns.mark_waiting(db, Bus(), [f"q{k}" for k in range(5)])
    assert db.writes.commits - before == 1
    assert published == ["q0", "q1", "q2", "q3"]
    turns.mark_waiting(db, Bus(), ["q0"])  # already shown: nothing written again
    assert published == ["q0", "q1", "q2", "q3"]
    with db.sessions() as s:
        for k in range(4):
            texts = [e.payload.get("text") for e in events.read(s, f"q{k}")]
            assert texts == [turns.WAITING], texts
        assert events.read(s, "q4") == []


def test_ends_share_the_batch_each_as_its_attempt_stands(db: Database) -> None:
    """Attempts ending while the database is busy write their terminal states in one
    transaction: one completes, one cancelled meanwhile keeps its work log as cancelled, and
    one whose run lost the attempt writes nothing (superseded) without holding the others
    back."""
    turns = _attempts(db, 4)
    with db.session() as s:
        assert turnstate.cancel(s, turns[2]) is not None  # the user cancelled it
        assert turnstate.requeue(s, turns[3], body={})  # taken from run A
        assert turnstate.claim(s, turns[3], body={}, run="B")
    bus = LocalEventBus()
    recorders = [TurnRecorder(db, bus, "task", t, {}, run_id="A") for t in turns]
    ended: dict[str, str] = {}
    holder = _hold(db)
    before = db.writes.commits
    first = _start(lambda: _written(recorders[0], _message(0)))
    _until(lambda: db.writes.busy)
    threads = [
        _start(
            lambda rec=rec: ended.__setitem__(  # type: ignore[misc]
                rec.turn_id, rec.finish(TurnStatus.COMPLETED, text="Done")
            )
        )
        for rec in recorders[1:]
    ]
    _until(lambda: db.writes.queued == 3)
    _let_go(holder, [first, *threads])
    assert db.writes.commits - before == 2
    assert ended == {
        turns[1]: TurnStatus.COMPLETED,
        turns[2]: TurnStatus.CANCELLED,
        turns[3]: SUPERSEDED,
    }
    assert recorders[3].gone_reason == SUPERSEDED
    with db.sessions() as s:
        rows = {t.id: t for t in s.scalars(select(m.Turn))}
        assert rows[turns[1]].turn_status == TurnStatus.COMPLETED
        assert rows[turns[2]].body["latest_event"]["text"] == "Cancelled"
        assert (rows[turns[3]].turn_status, rows[turns[3]].run_id) == (
            TurnStatus.IN_PROGRESS,
            "B",
        )
        assert events.read(s, turns[3]) == []
        last = [e.payload.get("turn_status") for e in events.read(s, turns[2])]
        assert last == [TurnStatus.CANCELLED]


def test_a_batch_that_never_gets_the_lock_fails_all_its_writes_at_once(
    sqlite_url: str, monkeypatch: Any
) -> None:
    """Another holder keeps the database past the busy timeout: every write of the batch
    gets "database is locked" (answered 503) after one wait, not one more wait each alone
    (a batch of 30 waited out 31 timeouts)."""
    monkeypatch.setattr(store_db, "SQLITE_BUSY_TIMEOUT_MS", 300)
    timeouts: list[float] = []
    acquire = sqlitelock.FairLock.acquire

    def counted(self: sqlitelock.FairLock, timeout: float) -> bool:
        got = acquire(self, timeout)
        if not got:
            timeouts.append(timeout)
        return got

    monkeypatch.setattr(sqlitelock.FairLock, "acquire", counted)
    database = _with_writes(sqlite_url)
    try:
        writes = database.writes
        holder = _hold(database)
        outcome: dict[str, Any] = {}
        write = _outcome(writes, outcome, OperationalError)

        threads = [_start(lambda: write("first"))]
        _until(lambda: writes.busy)
        for who in ["a", "b", "c"]:
            threads.append(_start(lambda who=who: write(who)))  # type: ignore[misc]
            _until(lambda: writes.queued == len(threads) - 1)
        for thread in threads:
            thread.join(BOUND)
        holder.rollback()
        holder.close()
        assert sorted(outcome) == ["a", "b", "c", "first"]
        assert all("database is locked" in str(e) for e in outcome.values()), outcome
        assert len(timeouts) == 2  # "first" alone, then a, b and c together
    finally:
        database.dispose()
