"""The engine's own logic through a scripted ``SandboxProvider`` (tests/support/fake_sandbox):
claim, the agent's command and input, results, failure codes and cancel, in milliseconds and
without bubblewrap or Codex. The real sandbox and Codex are covered by tests/test_engine*.py."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from conftest import Server, make_repo
from openwham.config import Settings
from openwham.engine.attempt import Control, Engine
from openwham.gateway import Gateway
from openwham.runtimes import codex
from openwham.store import models as m
from openwham.store.events import LocalEventBus
from openwham.store.status import TurnStatus
from support.fake_sandbox import Script, ScriptedSandboxes


def _jsonl(*events: dict[str, Any]) -> list[str]:
    return [json.dumps(e) for e in events]


ANSWER = _jsonl(
    {"type": "thread.started", "thread_id": "thread-1"},
    {"type": "turn.started"},
    {"type": "item.completed", "item": {"id": "m1", "type": "agent_message", "text": "It is 42"}},
    {"type": "turn.completed", "usage": {"input_tokens": 3, "output_tokens": 2}},
)


@pytest.fixture
def sandboxes() -> ScriptedSandboxes:
    return ScriptedSandboxes()


@pytest.fixture
def engine(server: Server, tmp_path: Path, sandboxes: ScriptedSandboxes) -> Iterator[Engine]:
    settings = Settings(
        data_dir=tmp_path / "worker",
        database_url=str(server.app_state.db.url),
        executor="none",
        model_provider="openai-compatible",
        model_base_url="http://127.0.0.1:9/v1",  # never reached: no model request is made
        model_api_key="sk-fake",
        standby_sandboxes=0,
        title_timeout_seconds=0.1,
    )
    gateway = Gateway.from_settings(settings)
    engine = Engine(
        settings,
        server.app_state.db,
        LocalEventBus(),
        gateway,
        tmp_path / "gateway.sock",  # bound into the sandbox only: the fake never uses it
        sandbox=sandboxes,
    )
    yield engine
    engine.close()


def _attempt(server: Server, tmp_path: Path, **new_task: Any) -> tuple[str, str]:
    env = server.api.create_env(make_repo(tmp_path / "repo"))
    task_id = server.api.create_task(env["id"], "What is it?", new_task=new_task)["task"]["id"]
    with server.app_state.db.sessions() as s:
        turn_id = s.scalar(
            select(m.Turn.id).where(m.Turn.task_id == task_id, m.Turn.role == "assistant")
        )
    assert turn_id is not None
    return task_id, turn_id


def _turn(server: Server, task_id: str) -> dict[str, Any]:
    details = server.api.get(f"tasks/{task_id}").json()
    return dict(details["current_assistant_turn"])


def test_an_ask_mode_attempt_completes_with_the_agents_answer(
    server: Server, engine: Engine, sandboxes: ScriptedSandboxes, tmp_path: Path
) -> None:
    sandboxes.script = Script(stdout=ANSWER)
    task_id, turn_id = _attempt(server, tmp_path, run_environment_in_qa_mode=True)
    assert engine.run_turn(turn_id, Control()) == TurnStatus.COMPLETED
    assert engine.run_turn(turn_id, Control()) is None  # claimed once only
    (agent,) = sandboxes.started
    assert agent.stdin == b"What is it?"  # the prompt, on the held agent's stdin
    assert agent.spec.workspace_readonly  # Ask mode: the agent cannot change the checkout
    assert codex.SANDBOX_CODEX_HOME in agent.spec.rw_binds.values()
    turn = _turn(server, task_id)
    assert turn["turn_status"] == "completed"
    (message,) = turn["output_items"]
    assert message["content"][0]["text"] == "It is 42"
    with server.app_state.db.sessions() as s:
        row = s.get(m.Turn, turn_id)
        assert row is not None and row.body["run"]["thread_id"] == "thread-1"


def test_an_agent_that_fails_fails_the_attempt_with_its_message(
    server: Server, engine: Engine, sandboxes: ScriptedSandboxes, tmp_path: Path
) -> None:
    sandboxes.script = Script(
        stdout=_jsonl(
            {"type": "thread.started", "thread_id": "t"},
            {"type": "turn.failed", "error": {"message": "the agent gave up"}},
        ),
        exit_code=1,
    )
    task_id, turn_id = _attempt(server, tmp_path, run_environment_in_qa_mode=True)
    assert engine.run_turn(turn_id, Control()) == TurnStatus.FAILED
    turn = _turn(server, task_id)
    assert "the agent gave up" in turn["error"]["message"]


def test_a_cancel_kills_the_agent_and_ends_the_attempt_cancelled(
    server: Server, engine: Engine, sandboxes: ScriptedSandboxes, tmp_path: Path
) -> None:
    sandboxes.script = Script(stdout=ANSWER[:2], hang=True)
    task_id, turn_id = _attempt(server, tmp_path)
    control = Control()

    def cancel_once_running() -> None:
        assert sandboxes.first_start.wait(30)
        assert sandboxes.started[0].sent.wait(30)
        control.cancel()

    canceller = threading.Thread(target=cancel_once_running)
    canceller.start()
    assert engine.run_turn(turn_id, control) == TurnStatus.CANCELLED
    canceller.join()
    (agent,) = sandboxes.started
    result = agent.poll()
    assert result is not None and result.killed_reason == "cancelled by the user"
    turn = _turn(server, task_id)
    assert turn["turn_status"] == "cancelled"
    assert turn["error"]["code"] == "cancelled"


def test_an_attempt_without_a_model_upstream_fails_before_any_sandbox(
    server: Server, engine: Engine, sandboxes: ScriptedSandboxes, tmp_path: Path
) -> None:
    engine.gateway_problem = "no key"
    task_id, turn_id = _attempt(server, tmp_path)
    assert engine.run_turn(turn_id, Control()) == TurnStatus.FAILED
    assert _turn(server, task_id)["error"]["code"] == "model_config_error"
    assert sandboxes.started == []
