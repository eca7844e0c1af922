"""Run fencing with the real engine (``Engine.run_turn``) and the scripted sandbox provider:
another node requeues the attempt under a live run (it judged the run's worker dead) and
claims it again; the run notices, kills its agent's sandbox and writes nothing more: not its
work log, not its result, not a terminal state, not its session. The fast half is in
tests/test_fencing.py; the queue executor's stalled worker is in tests/test_queue.py."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from conftest import Server, make_repo
from openwham.config import CodexMode, Settings
from openwham.engine.attempt import Control, Engine
from openwham.engine.claim import Claims
from openwham.engine.recorder import SUPERSEDED
from openwham.engine.turns import requeue
from openwham.gateway import Gateway
from openwham.sandbox.bwrap import SandboxSpec
from openwham.sandbox.provider import OutputSink, Sandbox
from openwham.store import events, turnstate
from openwham.store import models as m
from openwham.store.db import Database
from openwham.store.events import LocalEventBus
from openwham.store.status import TurnStatus
from support.fake_sandbox import Script, ScriptedSandboxes

OTHER_NODE = "other-host:4242:feedbeef"
ANSWER = [
    json.dumps(e)
    for e in (
        {"type": "thread.started", "thread_id": "thread-1"},
        {"type": "turn.started"},
        {
            "type": "item.completed",
            "item": {"id": "m1", "type": "agent_message", "text": "It is 42"},
        },
        {"type": "turn.completed", "usage": {"input_tokens": 3, "output_tokens": 2}},
    )
]


def _attempt(server: Server, tmp_path: Path) -> str:
    """A pending Ask-mode attempt (no diff to compute)."""
    env = server.api.create_env(make_repo(tmp_path / "repo"))
    new_task = {"run_environment_in_qa_mode": True}
    task_id = server.api.create_task(env["id"], "What is it?", new_task=new_task)["task"]["id"]
    with server.app_state.db.sessions() as s:
        turn_id = s.scalar(
            select(m.Turn.id).where(m.Turn.task_id == task_id, m.Turn.role == "assistant")
        )
    assert turn_id is not None
    return turn_id


@dataclass
class TakenOverAtStart(ScriptedSandboxes):
    """Plays the script, but first (as the agent starts) lets ``before_start`` run: here,
    another node taking the attempt over."""

    before_start: list[Any] = field(default_factory=list)

    def start(
        self,
        spec: SandboxSpec,
        argv: Sequence[str],
        *,
        stdin: bytes | None = None,
        on_output: OutputSink | None = None,
        hold: bool = False,
        ready_marker: str | None = None,
    ) -> Sandbox:
        for hook in self.before_start:
            hook()
        return super().start(
            spec, argv, stdin=stdin, on_output=on_output, hold=hold, ready_marker=ready_marker
        )


def _engine(server: Server, tmp_path: Path, sandboxes: ScriptedSandboxes) -> Engine:
    settings = Settings(
        data_dir=tmp_path / "worker",
        database_url=str(server.app_state.db.url),
        executor="none",
        model_provider="openai-compatible",
        model_base_url="http://127.0.0.1:9/v1",  # never reached: no model request is made
        model_api_key="sk-fake",
        standby_sandboxes=0,
        title_timeout_seconds=0.1,
        codex_mode=CodexMode.EXEC,  # the fake sandbox replays `codex exec --json` lines
    )
    return Engine(
        settings,
        server.app_state.db,
        LocalEventBus(),
        Gateway.from_settings(settings),
        tmp_path / "gateway.sock",
        sandbox=sandboxes,
    )


@pytest.fixture
def sandboxes() -> TakenOverAtStart:
    return TakenOverAtStart()


@pytest.fixture
def engine(server: Server, tmp_path: Path, sandboxes: TakenOverAtStart) -> Iterator[Engine]:
    engine = _engine(server, tmp_path, sandboxes)
    yield engine
    engine.close()


def _take_over(server: Server, turn_id: str) -> str:
    """What another node does to a run it judged dead: its recovery requeues the attempt
    (executor.recover), then its executor claims it (Claims.claim); the new run's id."""
    db = server.app_state.db
    with db.session() as s:
        turn = s.get(m.Turn, turn_id)
        assert turn is not None and turn.turn_status == TurnStatus.IN_PROGRESS
        note = "The server running this attempt stopped; starting it again from scratch"
        assert requeue(s, turn, note, seen=turn.updated_at)
    claim = Claims(server.app_state.settings, db, LocalEventBus(), OTHER_NODE).claim(turn_id)
    assert claim is not None and claim.run_id
    return claim.run_id


def _row(db: Database, turn_id: str) -> tuple[Any, ...]:
    with db.sessions() as s:
        turn = s.get(m.Turn, turn_id)
        assert turn is not None
        rows = events.read(s, turn_id, limit=10_000)
        return turn.turn_status, turn.run_id, dict(turn.body), turn.updated_at, rows


def test_a_run_requeued_under_its_feet_kills_its_agent_and_writes_nothing(
    server: Server, engine: Engine, sandboxes: TakenOverAtStart, tmp_path: Path
) -> None:
    """The agent runs (and would run forever); another node takes the attempt over: the run
    stops itself within seconds, its sandbox killed, and the attempt is the other run's,
    untouched."""
    sandboxes.script = Script(stdout=ANSWER[:2], hang=True)
    turn_id = _attempt(server, tmp_path)
    control = Control()
    result: list[str | None] = []
    runner = threading.Thread(target=lambda: result.append(engine.run_turn(turn_id, control)))
    runner.start()
    assert sandboxes.first_start.wait(30)
    assert sandboxes.started[0].sent.wait(30)
    taken = _take_over(server, turn_id)
    after_take_over = _row(server.app_state.db, turn_id)
    started = time.monotonic()
    runner.join(10)
    if runner.is_alive():  # unfenced, it would run on: end it, then fail
        control.cancel()
        runner.join(30)
        pytest.fail("the superseded run did not stop itself")
    assert time.monotonic() - started < 5
    assert result == [SUPERSEDED]
    (agent,) = sandboxes.started
    killed = agent.poll()
    assert killed is not None
    assert killed.killed_reason == "the attempt was requeued and is run by another worker"
    status, run_id, body, _, rows = _row(server.app_state.db, turn_id)
    assert (status, run_id) == (TurnStatus.IN_PROGRESS, taken)
    assert body["run"]["executor"] == OTHER_NODE
    assert _row(server.app_state.db, turn_id) == after_take_over  # nothing of the old run
    assert not (engine.attempts_root / turn_id).exists()
    assert not engine.artifacts.present([turn_id], "codex-home")
    assert not any(e.is_terminal for e in rows)


def test_a_run_whose_agent_ends_after_the_take_over_cannot_finish_the_attempt(
    server: Server, engine: Engine, sandboxes: TakenOverAtStart, tmp_path: Path
) -> None:
    """The other node takes over just as the old run's agent starts; the agent then answers
    and ends at once: its work log, answer, usage, title and completion are all refused, and the
    other run then finishes the attempt as its own."""
    sandboxes.script = Script(stdout=ANSWER)
    turn_id = _attempt(server, tmp_path)
    taken: list[str] = []
    sandboxes.before_start.append(lambda: taken.append(_take_over(server, turn_id)))
    after: list[tuple[Any, ...]] = []
    sandboxes.before_start.append(lambda: after.append(_row(server.app_state.db, turn_id)))
    assert engine.run_turn(turn_id, Control()) == SUPERSEDED
    status, run_id, body, _, rows = _row(server.app_state.db, turn_id)
    assert (status, run_id) == (TurnStatus.IN_PROGRESS, taken[0])
    assert _row(server.app_state.db, turn_id) == after[0]
    assert "It is 42" not in str(body) and "It is 42" not in str([e.payload for e in rows])
    with server.app_state.db.session() as s:  # the run that holds it ends it
        assert turnstate.finish(s, turn_id, body={**body, "done": True}, run=taken[0])
    with server.app_state.db.sessions() as s:
        assert s.scalar(select(m.Turn.turn_status).where(m.Turn.id == turn_id)) == "completed"
