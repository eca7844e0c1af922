"""The engine's own logic through a scripted ``SandboxProvider`` (tests/support/fake_sandbox):
claim, the setup phase, the agent's command and input, results and their diffs, failure codes
and cancel, in milliseconds and without bubblewrap or Codex. The real sandbox and Codex are
covered by tests/test_engine*.py and tests/test_environment_setup.py."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from conftest import Server, make_repo
from openwham.config import CodexMode, Settings
from openwham.engine import control as control_module
from openwham.engine import diff as diffs
from openwham.engine import setup as setup_phase
from openwham.engine.attempt import Control, Engine
from openwham.gateway import Gateway
from openwham.runtimes import codex
from openwham.sandbox.bwrap import SandboxSpec
from openwham.store import models as m
from openwham.store.events import LocalEventBus
from openwham.store.status import TurnStatus
from support.fake_sandbox import Script, ScriptedSandbox, ScriptedSandboxes


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
        codex_mode=CodexMode.EXEC,  # the fake sandbox replays `codex exec --json` lines
    )
    # a worker node joins with the serving node's keys (the environment's secrets)
    shutil.copytree(server.app_state.settings.keys_dir, settings.keys_dir)
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


def _attempt(
    server: Server, tmp_path: Path, env: dict[str, Any] | None = None, **new_task: Any
) -> tuple[str, str]:
    env = env or server.api.create_env(make_repo(tmp_path / "repo"))
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


def test_a_cancel_interrupts_an_agent_with_an_interrupt_signal_and_kills_it_after_a_grace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``Control.cancel`` of an agent attached with an interrupt signal (app-server mode):
    the signal, once (later cancels leave it to the grace), and the kill only once
    ``INTERRUPT_SECONDS`` passed with the sandbox still running; a shutdown, or an agent
    without a signal, is killed at once."""
    monkeypatch.setattr(control_module, "INTERRUPT_SECONDS", 0.3)

    def running() -> ScriptedSandbox:
        proc = ScriptedSandbox(SandboxSpec(workspace=tmp_path), [], Script(hang=True))
        assert proc.send(b"prompt")
        return proc

    proc, control = running(), Control()
    control.attach(proc, signal.SIGUSR2)
    control.cancel()
    control.cancel()
    assert proc.signals == [signal.SIGUSR2] and control.interrupted
    assert proc.poll() is None  # the agent has its grace
    result = proc.wait(5)
    assert result.killed_reason == "cancelled by the user"

    for reason, signum in (("shutdown", signal.SIGUSR2), ("cancelled", None)):
        proc, control = running(), Control()
        control.attach(proc, signum)
        control.cancel(reason)
        result = proc.wait(0)  # killed at once
        assert proc.signals == [] and not control.interrupted and result.killed_reason


def test_an_attempt_without_a_model_upstream_fails_before_any_sandbox(
    server: Server, engine: Engine, sandboxes: ScriptedSandboxes, tmp_path: Path
) -> None:
    engine.gateway_problem = "no key"
    task_id, turn_id = _attempt(server, tmp_path)
    assert engine.run_turn(turn_id, Control()) == TurnStatus.FAILED
    assert _turn(server, task_id)["error"]["code"] == "model_config_error"
    assert sandboxes.started == []


DIFF = """\
diff --git a/calc.py b/calc.py
--- a/calc.py
+++ b/calc.py
@@ -1,2 +1,2 @@
 def add(a, b):
-    return a - b
+    return a + b
"""


def _launcher_wrote(diff: str, status: str = "0", error: str = "") -> Script:
    """An agent that answers, and whose launcher wrote ``diff`` (the ``after`` script's
    files in the out directory) and then its marker, as ``codex.launcher`` does."""
    out = diffs.OUT_DIR
    return Script(
        stdout=ANSWER,
        stderr=[codex.WRITTEN_MARKER],
        files={f"{out}/diff": diff, f"{out}/status": f"{status}\n", f"{out}/error": error},
    )


def _head(repo: Path) -> str:
    return subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True
    ).stdout.strip()


def test_a_code_attempt_ends_with_the_diff_its_launcher_wrote(
    server: Server, engine: Engine, sandboxes: ScriptedSandboxes, tmp_path: Path
) -> None:
    sandboxes.script = _launcher_wrote(DIFF)
    task_id, turn_id = _attempt(server, tmp_path)
    assert engine.run_turn(turn_id, Control()) == TurnStatus.COMPLETED
    (agent,) = sandboxes.started
    assert not agent.spec.workspace_readonly
    assert diffs.OUT_DIR in agent.spec.rw_binds.values()  # the launcher's diff goes there
    assert signal.SIGUSR1 in agent.signals  # the diff started on turn.completed
    assert sandboxes.ran == []  # no diff sandbox of its own
    turn = _turn(server, task_id)
    message, pr = turn["output_items"]
    assert message["content"][0]["text"] == "It is 42"
    assert pr["type"] == "pr" and pr["pr_message"] == "It is 42"
    out = pr["output_diff"]
    assert out["diff"] == DIFF
    assert (out["files_modified"], out["lines_added"], out["lines_removed"]) == (1, 1, 1)
    assert out["base_commit_sha"] == turn["base_commit_sha"] == _head(tmp_path / "repo")


def test_a_diff_the_launcher_could_not_make_fails_the_attempt_with_diff_error(
    server: Server, engine: Engine, sandboxes: ScriptedSandboxes, tmp_path: Path
) -> None:
    sandboxes.script = _launcher_wrote("", status="128", error="fatal: bad object")
    task_id, turn_id = _attempt(server, tmp_path)
    assert engine.run_turn(turn_id, Control()) == TurnStatus.FAILED
    error = _turn(server, task_id)["error"]
    assert error["code"] == "diff_error"
    assert error["message"] == "Computing the diff failed: fatal: bad object"


def test_an_agent_that_went_on_after_its_diff_gets_it_computed_anew_in_a_sandbox(
    server: Server,
    engine: Engine,
    sandboxes: ScriptedSandboxes,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert engine.gateway is not None
    monkeypatch.setattr(engine.gateway, "continued_after_final", lambda attempt: True)
    sandboxes.script = _launcher_wrote("stale launcher diff")
    fresh = DIFF.replace("a + b", "b + a")
    sandboxes.helper = Script(
        files={f"{diffs.OUT_DIR}/diff": fresh, f"{diffs.OUT_DIR}/status": "0\n"}
    )
    task_id, turn_id = _attempt(server, tmp_path)
    assert engine.run_turn(turn_id, Control()) == TurnStatus.COMPLETED
    (differ,) = sandboxes.ran  # through the engine's SandboxProvider, not bubblewrap
    assert differ.argv[:2] == ["/bin/bash", "-c"] and "git" in differ.argv[2]
    assert differ.spec.workspace == engine.attempts_root / turn_id / "workspace"
    assert not differ.spec.network and diffs.OUT_DIR in differ.spec.rw_binds.values()
    (_, pr) = _turn(server, task_id)["output_items"]
    assert pr["output_diff"]["diff"] == fresh


SECRET = "s3cr3t-setup-token-5150"


def test_a_setup_script_runs_first_with_the_secrets_and_its_log_is_kept_redacted(
    server: Server, engine: Engine, sandboxes: ScriptedSandboxes, tmp_path: Path
) -> None:
    env = server.api.create_env(
        make_repo(tmp_path / "repo"),
        setup=["echo installing", "make deps"],
        env_vars={"MY_VAR": "plain-value"},
        secrets={"API_TOKEN": SECRET},
    )
    sandboxes.setup = Script(stdout=["installing", f"token is {SECRET}"])
    sandboxes.script = _launcher_wrote("")
    task_id, turn_id = _attempt(server, tmp_path, env)
    assert engine.run_turn(turn_id, Control()) == TurnStatus.COMPLETED
    setup, agent = sandboxes.started
    assert "echo installing\nmake deps" in setup.argv
    assert setup.spec.env["API_TOKEN"] == SECRET and setup.spec.env["MY_VAR"] == "plain-value"
    assert setup.spec.env["https_proxy"] == f"http://{setup_phase.PROXY_LISTEN}"
    assert setup_phase.SANDBOX_EGRESS_SOCKET in setup.spec.ro_binds.values()
    # the agent: the variables, neither the secrets nor the way out
    assert agent.spec.env["MY_VAR"] == "plain-value" and "API_TOKEN" not in agent.spec.env
    assert setup_phase.SANDBOX_EGRESS_SOCKET not in agent.spec.ro_binds.values()
    assert setup.spec.rw_binds.keys() & agent.spec.rw_binds.keys()  # the same home
    r = server.api.get(f"tasks/{task_id}/turns/{turn_id}/logs")
    assert r.status_code == 200, r.text
    lines = [entry["line"] for entry in r.json()["logs"]]
    assert lines == ["installing", "token is [redacted]"]
    turn = _turn(server, task_id)
    assert [item["type"] for item in turn["output_items"]] == ["message"]  # an empty diff


def test_a_failing_setup_script_fails_the_attempt_before_the_agent_starts(
    server: Server, engine: Engine, sandboxes: ScriptedSandboxes, tmp_path: Path
) -> None:
    env = server.api.create_env(make_repo(tmp_path / "repo"), setup=["exit 3"])
    sandboxes.setup = Script(stdout=["about to fail"], exit_code=3)
    task_id, turn_id = _attempt(server, tmp_path, env)
    assert engine.run_turn(turn_id, Control()) == TurnStatus.FAILED
    (setup,) = sandboxes.started  # no agent
    assert "exit 3" in setup.argv
    error = _turn(server, task_id)["error"]
    assert error["code"] == "setup_failed"
    assert error["message"] == "The setup script exited with code 3 (see the setup log)"


def test_the_attempts_of_a_best_of_4_task_fetch_the_mirror_once(
    server: Server,
    engine: Engine,
    sandboxes: ScriptedSandboxes,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each attempt checks its standby against the branch head after a mirror fetch, and its
    model requests wait for that check: the four attempts of a best-of-4 share one fetch
    (``Mirrors.ensure``'s group, their prompt's turn) instead of queueing for two or more."""
    from openwham.sandbox import workspace as ws_mod

    sandboxes.script = Script(stdout=ANSWER)
    env = server.api.create_env(make_repo(tmp_path / "repo"))
    task_id = server.api.create_task(
        env["id"],
        "What is it?",
        new_task={"run_environment_in_qa_mode": True},
        metadata={"best_of_n": 4},
    )["task"]["id"]
    with server.app_state.db.sessions() as s:
        turns = s.scalars(
            select(m.Turn.id).where(m.Turn.task_id == task_id, m.Turn.role == "assistant")
        ).all()
    assert len(turns) == 4
    real_git = ws_mod.git
    calls: list[str] = []

    def counting_git(*args: str, **kwargs: Any) -> str:
        calls.append(" ".join(args[:2]))
        return real_git(*args, **kwargs)

    monkeypatch.setattr(ws_mod, "git", counting_git)
    for turn_id in turns:
        status = engine.run_turn(turn_id, Control())
        assert status == TurnStatus.COMPLETED, _turn(server, task_id).get("error")
    mirror = [c for c in calls if c in ("clone --mirror", "fetch --prune")]
    assert mirror == ["clone --mirror"], calls  # the first attempt's; the others use it


def test_the_mirror_fetch_begins_beside_the_standby_take(
    server: Server,
    engine: Engine,
    sandboxes: ScriptedSandboxes,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A standby's first model request is held until the mirror fetch shows its checkout is
    the branch head; the fetch (and the branch head's read) begins before a take that may
    wait for a fill (here none is ready), beside it and the prompt, not after them (issue 20:
    the held requests waited ~0.5 s for a fetch begun only then); the take of a ready
    standby, which does not wait, comes first (``wait=False``)."""
    from openwham.engine.workspace import Workspaces
    from openwham.sandbox.workspace import Mirrors

    sandboxes.script = Script(stdout=ANSWER)
    task_id, turn_id = _attempt(server, tmp_path, run_environment_in_qa_mode=True)
    ensure, take = Mirrors.ensure, Workspaces.take_standby
    fetching = threading.Event()
    during_take: list[bool] = []

    def ensure_(self: Mirrors, *a: Any, **k: Any) -> Path:
        fetching.set()
        return ensure(self, *a, **k)

    beating: list[bool] = []

    def take_(self: Workspaces, *a: Any, **k: Any) -> Any:
        if k.get("wait", True):  # a take that may wait under way: has the fetch begun?
            during_take.append(fetching.wait(10.0))
            # and is the attempt's heartbeat (its recorder's writer) beating meanwhile? A
            # take may wait for a fill for as long as the fill takes
            writer = f"wham-rec-{turn_id[-8:]}"
            beating.append(any(t.name == writer for t in threading.enumerate()))
        return take(self, *a, **k)

    monkeypatch.setattr(Mirrors, "ensure", ensure_)
    monkeypatch.setattr(Workspaces, "take_standby", take_)
    status = engine.run_turn(turn_id, Control())
    assert status == TurnStatus.COMPLETED, _turn(server, task_id).get("error")
    assert during_take == [True], "the fetch began only after the take"
    assert beating == [True], "no heartbeat while the take may wait for a fill"


def test_the_routing_key_read_from_the_row_is_the_engines_standby_key_after_the_claim(
    server: Server, tmp_path: Path, engine: Engine
) -> None:
    """The queue routes a pending attempt by the standby key it reads without claiming it
    and without decrypting a secret (``Claims.standby_key``); the worker that claims it
    prepares and takes standbys by ``Workspaces.standby_key``. They must be one key: for a
    plain environment, one with a setup script, variables, a secret and a maintenance script,
    and one of two repositories with a setup script; none for variables without a setup
    script. A secret sent again with its value keeps the key; a new value changes it."""
    api = server.api
    one, two = make_repo(tmp_path / "one"), make_repo(tmp_path / "two")
    setup = {"setup": ["echo setup"], "maintenance_setup": ["echo maintained"]}
    envs: dict[str, dict[str, Any]] = {
        "plain": api.create_env(one),
        "setup": api.create_env(
            one, **setup, env_vars={"MODE": "x"}, secrets={"TOKEN": "t0ken-value"}
        ),
        "vars only": api.create_env(one, env_vars={"MODE": "x"}),
    }
    r = api.post("environments", json={"label": "two", "repos": [str(one), str(two)], **setup})
    assert r.status_code == 201, r.text
    envs["repos"] = r.json()

    def keys(env: dict[str, Any]) -> tuple[Any, Any]:
        _, turn_id = _attempt(server, tmp_path, env)
        routed = engine.standby_key(turn_id)
        claim = engine.claims.claim(turn_id)
        assert claim is not None and claim.secrets_problem is None
        return routed, engine.workspaces.standby_key(claim)

    found = {name: keys(env) for name, env in envs.items()}
    for name, (routed, engines) in found.items():
        assert routed == engines, name
    assert found["plain"][0] is not None and found["plain"][0].setup == ""
    assert found["setup"][0] is not None and found["setup"][0].setup
    assert found["repos"][0] is not None and found["repos"][0].setup
    assert found["vars only"][0] is None

    env_id = envs["setup"]["id"]
    r = api.patch(f"environments/{env_id}", json={"secrets": {"TOKEN": "t0ken-value"}})
    assert r.status_code == 200, r.text
    assert keys(envs["setup"]) == found["setup"]
    r = api.patch(f"environments/{env_id}", json={"secrets": {"TOKEN": "new-value"}})
    assert r.status_code == 200, r.text
    routed, engines = keys(envs["setup"])
    assert routed == engines and routed != found["setup"][0]
