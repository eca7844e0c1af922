"""Codex as ``codex app-server`` (``WHAM_CODEX_MODE=app-server``): the in-sandbox driver
against the real pinned binary and the scripted model, the adapter to exec's events, the
protocol names checked against the pinned binary's own JSON schema, and the launcher sparing
the app-server at the early diff. The engine-level suites run in this mode with
``WHAM_CODEX_MODE=app-server ./scripts/test tests/test_engine.py …``."""

from __future__ import annotations

import json
import logging
import resource
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from conftest import (
    engine_settings,
    git,
    make_repo,
    make_server,
    wait_for_task,
    wait_for_turn,
)
from openwham.gateway import forwarder_path
from openwham.runtimes import appserver_driver as drv
from openwham.runtimes.appserver import (
    SANDBOX_DRIVER,
    AppServerTranslator,
    CodexAppServerRuntime,
    ExecEvents,
    TurnStatus,
    driver_path,
)
from openwham.runtimes.codex import (
    MAX_OUTPUT_CHARS,
    READY_MARKER,
    SANDBOX_FORWARDER,
    TOKEN_ENV,
    WRITTEN_MARKER,
    EventTranslator,
    codex_home_files,
    exec_argv,
    launcher,
)
from openwham.runtimes.codex_cli import native_binary, pinned_version
from openwham.sandbox import bwrap
from openwham.sandbox.bwrap import Limits, SandboxSpec
from openwham.wire import WorklogMessage
from support.procs import host_pids, unique_marker
from support.scripted_model import CallTool, Patch, Say, ScriptedModel, SearchTools, Shell
from test_engine import sleeping_attempt
from test_standby import engine_of, run_info

MODEL = "gpt-5.5"
SECONDS = 90  # bound of every host run of Codex
MEMORY = 16 << 30  # address-space cap of a host run (Codex reserves a lot of it)


@pytest.fixture
def model(scripted_model: ScriptedModel) -> ScriptedModel:
    return scripted_model


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    path = tmp_path / "repo"
    path.mkdir()
    (path / "a.txt").write_text("hello\n")
    git("init", "-q", "-b", "main", cwd=path)
    git("add", ".", cwd=path)
    git("-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "init", cwd=path)
    return path


def home(tmp_path: Path, model: ScriptedModel, name: str, **settings: Any) -> dict[str, str]:
    path = tmp_path / name
    path.mkdir(mode=0o700, exist_ok=True)
    for file, text in codex_home_files(base_url=model.url, model=MODEL, **settings).items():
        (path / file).write_text(text)
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "LANG": "C.UTF-8",
        "CODEX_HOME": str(path),
        TOKEN_ENV: "sk-test",
    }


def _limit() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY, MEMORY))


def driver(repo: Path, env: dict[str, str], *args: str) -> subprocess.Popen[bytes]:
    """The driver on the host (no sandbox), Codex the pinned binary."""
    argv = [sys.executable, "-I", str(driver_path()), "--codex", str(native_binary())]
    argv += ["--client-version", pinned_version(), "--ready-marker", READY_MARKER]
    return subprocess.Popen(
        [*argv, "--cwd", str(repo), *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=repo,
        preexec_fn=_limit,
    )


def run_driver(
    repo: Path, env: dict[str, str], prompt: str, *args: str
) -> tuple[int, list[str], str]:
    proc = driver(repo, env, *args)
    try:
        out, err = proc.communicate(prompt.encode(), timeout=SECONDS)
    finally:
        proc.kill()
    return proc.returncode, out.decode().splitlines(), err.decode()


def translate(tr: Any, lines: list[str], exit_code: int, stderr: str) -> Any:
    for line in lines:
        tr.feed(line)
    return tr.finish(exit_code, stderr=stderr)


def shape(message: WorklogMessage) -> tuple[Any, ...]:
    """A work-log message without its ids and times."""
    meta = message.metadata.model_dump(exclude_none=True)
    return (
        message.author.role,
        message.author.name,
        message.recipient,
        message.channel,
        message.status,
        message.end_turn,
        message.content.content_type,
        message.content.text,
        message.content.parts,
        meta.get("exit_code"),
    )


PATCH = "*** Begin Patch\n*** Add File: b.txt\n+new\n*** End Patch\n"


@pytest.mark.sandbox
def test_exec_and_app_server_give_the_same_work_log_and_outcome(
    tmp_path: Path, model: ScriptedModel, repo: Path
) -> None:
    """Parity: one scripted conversation (a command, a failing command, a patch, the answer)
    run by ``codex exec --json`` and by the driver gives the same work log and outcome."""
    # Codex reads stdout and stderr on separate pipes and appends chunks as they arrive, so
    # the two lines are spaced apart to give one order in both runs (CI saw "err" first once).
    script = [
        Shell("echo hi; sleep 0.3; echo err >&2"),
        Shell("exit 3"),
        Patch(PATCH),
        Say("All done."),
    ]
    prompt = "Add b.txt."
    model.script = list(script)
    argv = exec_argv(workdir=str(repo), executable=str(native_binary()))
    proc = subprocess.run(
        argv,
        input=prompt.encode(),
        capture_output=True,
        env=home(tmp_path, model, "exec"),
        timeout=SECONDS,
        preexec_fn=_limit,
    )
    exec_tr = EventTranslator(prompt=prompt)
    exec_out = translate(exec_tr, proc.stdout.decode().splitlines(), proc.returncode, "")
    git("checkout", "-q", ".", cwd=repo)
    git("clean", "-qfd", cwd=repo)

    exec_headers = model.headers[-1]
    model.script = list(script)
    code, lines, err = run_driver(repo, home(tmp_path, model, "app"), prompt)
    # the upstream sees exec's originator and User-Agent (a ChatGPT-plan backend checks them)
    for name in ("originator", "user-agent"):
        assert model.headers[-1][name] == exec_headers[name], name
    app_tr = AppServerTranslator(EventTranslator(prompt=prompt))
    app_out = translate(app_tr, lines, code, err)

    assert code == 0, err[-2000:]
    assert exec_out.status == app_out.status == "completed"
    assert exec_out.final_message == app_out.final_message == "All done."
    exec_log = [shape(m) for m in exec_tr.worklog.messages]
    assert [shape(m) for m in app_tr.inner.worklog.messages] == exec_log
    assert len(exec_log) == 8  # prompt, 2 x (command, output), patch, result, answer
    assert app_tr.thread_id and app_tr.inner.diagnostics == []
    assert app_out.usage is not None and app_out.usage.output_tokens > 0
    assert (repo / "b.txt").read_text() == "new\n"


@pytest.mark.sandbox
def test_the_thread_starts_before_the_prompt_and_resumes_with_the_configs_settings(
    tmp_path: Path, model: ScriptedModel, repo: Path
) -> None:
    """The driver's Codex is ready (``thread/started``) before its prompt, having asked the
    model nothing; a follow-up's ``thread/resume`` continues the conversation with the model
    and effort of the new ``config.toml`` (app-server would keep the thread's own)."""
    env = home(tmp_path, model, "home", reasoning_effort="low")
    proc = driver(repo, env)
    assert proc.stdout is not None and proc.stdin is not None
    first: list[str] = []
    ready = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            first.append(raw.decode())
            if '"thread/started"' in first[-1]:
                ready.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert ready.wait(SECONDS), first
        time.sleep(0.3)
        assert model.requests == []  # a standby asks the upstream nothing before its task
        model.script = [Say("First answer.")]
        proc.stdin.write(b"first prompt")
        proc.stdin.close()
        assert proc.wait(SECONDS) == 0
    finally:
        proc.kill()
    reader.join(5)
    assert proc.stderr is not None
    assert READY_MARKER in proc.stderr.read().decode().splitlines()  # the standby is ready
    thread_id = json.loads(first[0])["params"]["thread"]["id"]
    assert model.requests[0]["reasoning"]["effort"] == "low"

    home(tmp_path, model, "home", reasoning_effort="high")  # the follow-up's settings
    model.script = [Say("Second answer.")]
    code, lines, err = run_driver(repo, env, "second prompt", "--resume", thread_id)
    assert code == 0, err[-2000:]
    messages = [json.loads(line) for line in lines]
    started = [m["params"]["thread"]["id"] for m in messages if m["method"] == "thread/started"]
    assert started == [thread_id]
    assert not [m for m in messages if m["method"] == "deprecationNotice"]
    resumed = model.requests[-1]
    assert resumed["reasoning"]["effort"] == "high"
    history = json.dumps(resumed["input"])
    assert "first prompt" in history and "First answer." in history


@pytest.mark.sandbox
def test_a_config_error_fails_with_codexs_message(
    tmp_path: Path, model: ScriptedModel, repo: Path
) -> None:
    env = home(tmp_path, model, "home")
    config = Path(env["CODEX_HOME"]) / "config.toml"
    config.write_text("no_such_setting_here = 1\n" + config.read_text())
    code, _, err = run_driver(repo, env, "hello")
    assert code != 0 and model.requests == []
    outcome = AppServerTranslator(EventTranslator()).finish(code, stderr=err)
    assert outcome.status == "failed" and outcome.error is not None
    assert "no_such_setting_here" in outcome.error.message, err


@pytest.mark.sandbox
def test_a_huge_command_output_stays_within_the_line_limit(
    tmp_path: Path, model: ScriptedModel, repo: Path
) -> None:
    """6 MiB of command output: no relayed line near the sandbox's 4 MiB line limit (the
    turn's items are dropped, strings capped), and the work log keeps the capped output."""
    model.script = [Shell("head -c 6291456 /dev/zero | tr '\\0' x; echo"), Say("Big.")]
    code, lines, err = run_driver(repo, home(tmp_path, model, "home"), "print a lot")
    assert code == 0, err[-2000:]
    assert max(len(line) for line in lines) < 2 * drv.MAX_STRING
    tr = AppServerTranslator(EventTranslator(prompt="print a lot"))
    outcome = translate(tr, lines, code, err)
    assert outcome.status == "completed" and tr.inner.diagnostics == []
    (output,) = [
        m for m in tr.inner.worklog.messages if m.content.content_type == "terminal_output"
    ]
    text = str((output.content.parts or [""])[0])
    assert len(text) <= MAX_OUTPUT_CHARS + 100 and "characters omitted" in text


def _lines_until(proc: subprocess.Popen[bytes], found: Any, lines: list[str]) -> threading.Event:
    """Read ``proc``'s stdout into ``lines`` in a thread; the event is set once a line
    satisfies ``found``."""
    seen = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            lines.append(raw.decode())
            if found(lines[-1]):
                seen.set()

    threading.Thread(target=read, daemon=True).start()
    return seen


@pytest.mark.sandbox
def test_the_interrupt_signal_interrupts_the_turn_and_stops_its_command(
    tmp_path: Path, model: ScriptedModel, repo: Path
) -> None:
    """A cancel in app-server mode: the driver's ``INTERRUPT_SIGNAL`` sends
    ``turn/interrupt``; Codex stops the running command and ends the turn ``interrupted``
    without asking the model again, the driver exits 1 at once, and the session has the
    interrupted turn (a resume sees its prompt)."""
    marker = unique_marker("interrupted")
    model.script = [Shell(f"python3 -c 'import time; time.sleep(300)' {marker}"), Say("Never.")]
    env = home(tmp_path, model, "home")
    proc = driver(repo, env)
    assert proc.stdin is not None
    lines: list[str] = []
    started = _lines_until(proc, lambda line: marker in line and '"item/started"' in line, lines)
    try:
        proc.stdin.write(b"first prompt")
        proc.stdin.close()
        assert started.wait(SECONDS), lines
        deadline = time.monotonic() + 10
        while not host_pids(marker):
            assert time.monotonic() < deadline, "the command did not start"
            time.sleep(0.02)
        t0 = time.monotonic()
        proc.send_signal(drv.INTERRUPT_SIGNAL)
        code = proc.wait(SECONDS)
        elapsed = time.monotonic() - t0
    finally:
        proc.kill()
    assert code == 1 and elapsed < 2.0, elapsed
    assert host_pids(marker) == []
    assert len(model.requests) == 1  # the model was not asked again
    messages = [json.loads(line) for line in lines]
    (done,) = [m for m in messages if m["method"] == "turn/completed"]
    assert done["params"]["turn"]["status"] == TurnStatus.INTERRUPTED
    tr = AppServerTranslator(EventTranslator(prompt="first prompt"))
    assert proc.stderr is not None
    outcome = translate(tr, lines, code, proc.stderr.read().decode())
    assert outcome.status == "failed"  # the engine reports the attempt cancelled
    thread_id = messages[0]["params"]["thread"]["id"]
    model.script = [Say("Second answer.")]
    code, _, err = run_driver(repo, env, "second prompt", "--resume", thread_id)
    assert code == 0, err[-2000:]
    assert "first prompt" in json.dumps(model.requests[-1]["input"])


@pytest.mark.sandbox
def test_a_cancel_interrupts_the_attempts_turn_and_tears_its_sandbox_down(
    tmp_path: Path, sqlite_url: str, model: ScriptedModel, caplog: pytest.LogCaptureFixture
) -> None:
    """Cancelling a task whose app-server attempt runs a command: the engine signals the
    driver (``turn/interrupt``) instead of killing the sandbox; the turn ends, the sandbox
    ends by itself (no kill, as the engine logs) within two seconds, its command with it,
    and the attempt is cancelled with the work log so far."""
    caplog.set_level(logging.INFO, logger="openwham.engine.result")
    settings = engine_settings(model, codex_mode="app-server", standby_sandboxes=0)
    for server in make_server(tmp_path, sqlite_url, **settings):
        api = server.api
        marker = unique_marker("cancelled")
        task_id, turn_id = sleeping_attempt(api, model, make_repo(tmp_path / "calc"), marker)
        t0 = time.monotonic()
        assert api.post(f"tasks/{task_id}/cancel").status_code == 200
        turn = wait_for_turn(
            api,
            task_id,
            turn_id,
            until=lambda t: (t["latest_event"] or {}).get("text") == "Cancelled",
        )
        attempt = server.app_state.settings.resolved_data_dir / "attempts" / turn_id
        while (host_pids(marker) or attempt.exists()) and time.monotonic() - t0 < 10:
            time.sleep(0.02)
        elapsed = time.monotonic() - t0
        assert not host_pids(marker) and not attempt.exists()
        assert elapsed < 2.0, elapsed
        turn = api.get(f"tasks/{task_id}/turns/{turn_id}").json()["turn"]  # as the engine left it
        assert turn["turn_status"] == "cancelled" and turn["error"]["code"] == "cancelled"
        ended = f"attempt {turn_id}, interrupted on a cancel: its agent ended the turn"
        assert ended in caplog.messages  # not killed
        assert len(model.requests) == 1
        assert marker in json.dumps(turn["worklog"])  # the work log so far is kept


ASKER = """\
from pydantic import BaseModel
from mcp.server.fastmcp import Context, FastMCP

app = FastMCP("asker")


class Name(BaseModel):
    name: str


@app.tool()
async def ask(ctx: Context) -> str:
    \"\"\"Ask the user for a name.\"\"\"
    result = await ctx.elicit("What is your name?", Name)
    return f"elicitation answered: {result.action}"


if __name__ == "__main__":
    app.run()
"""


@pytest.mark.sandbox
def test_an_mcp_elicitation_during_a_turn_is_declined_and_the_turn_goes_on(
    tmp_path: Path, model: ScriptedModel, repo: Path
) -> None:
    """An MCP server's tool asks the user (``elicitation/create``) in the middle of a turn:
    the tool gets ``decline`` at once and the turn continues to the model's answer. At
    0.169.0 with ``approvalPolicy: never`` Codex declines it itself (no
    ``mcpServer/elicitation/request`` reached the driver); should a later Codex pass it on,
    the driver declines it (``answer_request``, checked against the schema above)."""
    server = tmp_path / "asker.py"
    server.write_text(ASKER)
    asker = {"command": sys.executable, "args": [str(server)], "startup_timeout_sec": 60}
    env = home(tmp_path, model, "home", mcp_servers={"asker": {**asker, "required": True}})
    model.script = [
        SearchTools("ask asker name"),
        CallTool("ask", {}, namespace="mcp__asker"),
        Say("Went on without a name."),
    ]
    code, lines, err = run_driver(repo, env, "Ask for my name.")
    assert code == 0, err[-2000:]
    outputs = [
        item for item in model.requests[-1]["input"] if item.get("type") == "function_call_output"
    ]
    assert "elicitation answered: decline" in json.dumps(outputs)
    tr = AppServerTranslator(EventTranslator(prompt="Ask for my name."))
    outcome = translate(tr, lines, code, err)
    assert outcome.status == "completed" and outcome.final_message == "Went on without a name."
    assert "elicitation answered: decline" in tr.inner.worklog.model_dump_json()


@pytest.mark.sandbox
def test_a_config_error_at_a_standbys_start_is_not_retried_and_names_the_key(
    tmp_path: Path,
    sqlite_url: str,
    model: ScriptedModel,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A Codex config that ``--strict-config`` refuses: each standby fill fails once (the
    driver exits before its ready marker) and is logged with Codex's message; nothing
    retries it (no fill loop), and every attempt starts cold and fails with the message."""
    files = CodexAppServerRuntime.home_files

    def broken(self: CodexAppServerRuntime, **settings: Any) -> dict[str, str]:
        out = files(self, **settings)
        out["config.toml"] = "no_such_setting_here = 1\n" + out["config.toml"]
        return out

    monkeypatch.setattr(CodexAppServerRuntime, "home_files", broken)
    caplog.set_level(logging.INFO, logger="openwham.engine.standby")
    settings = engine_settings(model, codex_mode="app-server", standby_sandboxes=1)
    for server in make_server(tmp_path, sqlite_url, **settings):
        api = server.api
        env = api.create_env(make_repo(tmp_path / "calc"))
        for prompt in ("first", "second"):
            created = api.create_task(env["id"], prompt)
            turn = wait_for_task(api, created["task"]["id"])["current_assistant_turn"]
            assert turn["turn_status"] == "failed"
            assert "no_such_setting_here" in turn["error"]["message"], turn["error"]
            assert run_info(server, turn["id"])["standby"] is False
        pool = engine_of(server).standby
        deadline = time.monotonic() + SECONDS
        while pool.busy:
            assert time.monotonic() < deadline, "a standby fill never ended"
            time.sleep(0.05)

        def failed() -> list[str]:
            return [
                r.getMessage() for r in caplog.records if "no standby sandbox" in r.getMessage()
            ]

        fills = failed()
        assert 1 <= len(fills) <= 4  # at most a fill at each attempt's start and end
        assert all("no_such_setting_here" in text for text in fills), fills
        time.sleep(3)
        assert failed() == fills and not pool.busy and len(pool) == 0  # not retried
        assert model.requests == []


# ----------------------------------------------------------------------------- the schema


@pytest.fixture(scope="module")
def schema(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("schema")
    subprocess.run(
        [str(native_binary()), "app-server", "generate-json-schema", "--out", str(out)],
        check=True,
        timeout=SECONDS,
        capture_output=True,
        preexec_fn=_limit,
    )
    return out


def _methods(path: Path) -> set[str]:
    found: set[str] = set()
    for variant in json.loads(path.read_text())["oneOf"]:
        found.update(variant["properties"]["method"].get("enum", []))
    return found


def _enum(schema: Path, file: str, definition: str) -> set[str]:
    defs = json.loads((schema / file).read_text())["definitions"][definition]
    values: set[str] = set(defs.get("enum", []))
    for variant in defs.get("oneOf", []):
        values.update(variant.get("enum", []))
        if variant.get("type") == "object":  # {"<name>": {…}} variants
            values.update(variant.get("required", []))
    return values


@pytest.mark.sandbox
def test_the_protocol_names_used_exist_in_the_pinned_codexs_schema(schema: Path) -> None:
    """Protocol drift on a Codex bump fails here, not in an attempt."""
    notifications = _methods(schema / "ServerNotification.json")
    assert notifications >= drv.RELAYED
    assert set(drv.OPT_OUT) <= notifications
    requests = _methods(schema / "ClientRequest.json")
    assert {
        "initialize",
        "thread/start",
        "thread/resume",
        "turn/start",
        "turn/interrupt",
    } <= requests
    assert "initialized" in _methods(schema / "ClientNotification.json")
    server_requests = _methods(schema / "ServerRequest.json")
    answered = {
        "mcpServer/elicitation/request": ("McpServerElicitationRequestResponse", "action"),
        "item/commandExecution/requestApproval": (
            "CommandExecutionRequestApprovalResponse",
            "decision",
        ),
        "item/fileChange/requestApproval": ("FileChangeRequestApprovalResponse", "decision"),
        "applyPatchApproval": ("ApplyPatchApprovalResponse", "decision"),
        "execCommandApproval": ("ExecCommandApprovalResponse", "decision"),
    }
    for method, (file, key) in answered.items():
        assert method in server_requests
        value = drv.answer_request(method)["result"][key]
        value = value if isinstance(value, str) else next(iter(value))
        ref = json.loads((schema / f"{file}.json").read_text())["properties"][key]["$ref"]
        assert value in _enum(schema, f"{file}.json", ref.rsplit("/", 1)[-1]), method
    assert "error" in drv.answer_request("item/tool/call")
    v2 = "codex_app_server_protocol.v2.schemas.json"
    assert {s.value for s in TurnStatus} == _enum(schema, v2, "TurnStatus")
    assert {"danger-full-access"} <= _enum(schema, v2, "SandboxMode")
    assert {"never"} <= _enum(schema, v2, "AskForApproval")


# ----------------------------------------------------------------------------- the adapter


def test_plans_and_patch_updates_start_once_then_update() -> None:
    ev = ExecEvents()
    plan = {"turnId": "t1", "plan": [{"step": "read", "status": "completed"}]}
    assert [e["type"] for e in ev.events({"method": "turn/plan/updated", "params": plan})] == [
        "item.started"
    ]
    plan["plan"] = [{"step": "read", "status": "completed"}, {"step": "fix", "status": "pending"}]
    (updated,) = ev.events({"method": "turn/plan/updated", "params": plan})
    assert updated["type"] == "item.updated"
    assert updated["item"]["items"] == [
        {"text": "read", "completed": True},
        {"text": "fix", "completed": False},
    ]
    change = {"itemId": "p1", "changes": [{"path": "/workspace/x", "kind": {"type": "add"}}]}
    kinds = [
        ev.events({"method": "item/fileChange/patchUpdated", "params": change})[0]["type"]
        for _ in range(2)
    ]
    assert kinds == ["item.started", "item.updated"]
    usage = {"total": {"inputTokens": 7, "outputTokens": 2, "cachedInputTokens": 1}}
    assert ev.events({"method": "thread/tokenUsage/updated", "params": {"tokenUsage": usage}}) == []
    done = ev.events({"method": "turn/completed", "params": {"turn": {"status": "completed"}}})
    assert [e["type"] for e in done] == ["item.completed", "turn.completed"]
    assert done[1]["usage"]["input_tokens"] == 7 and done[1]["usage"]["cached_input_tokens"] == 1


def _feed(tr: AppServerTranslator, *messages: dict[str, Any]) -> None:
    for message in messages:
        tr.feed(json.dumps(message))


def test_a_failed_turn_fails_with_the_models_error_and_an_interrupted_one_as_unfinished() -> None:
    tr = AppServerTranslator(EventTranslator(prompt="p"))
    error = {"message": "quota exceeded", "additionalDetails": "try later"}
    _feed(
        tr,
        {"method": "thread/started", "params": {"thread": {"id": "th-123456789"}}},
        {"method": "turn/started", "params": {"turn": {"id": "t"}}},
        {"method": "error", "params": {"error": error, "willRetry": False}},
        {"method": "turn/completed", "params": {"turn": {"status": "failed", "error": error}}},
    )
    outcome = tr.finish(1)
    assert tr.thread_id == "th-123456789" and not tr.turn_completed
    assert outcome.status == "failed" and outcome.error is not None
    assert outcome.error.message == "quota exceeded (try later)"

    tr = AppServerTranslator(EventTranslator(prompt="p"))
    command = {"type": "commandExecution", "id": "c1", "command": "sleep 9", "status": "inProgress"}
    _feed(
        tr,
        {"method": "thread/started", "params": {"thread": {"id": "th-123456789"}}},
        {"method": "item/started", "params": {"item": command}},
        {"method": "turn/completed", "params": {"turn": {"status": "interrupted"}}},
    )
    outcome = tr.finish(1)
    assert outcome.status == "failed" and outcome.error is not None
    assert "before finishing its turn" in outcome.error.message
    assert {m.status for m in tr.inner.worklog.messages[1:]} == {"failed"}


def test_unshown_items_blank_reasoning_and_bad_lines() -> None:
    tr = AppServerTranslator(EventTranslator(prompt="p"))
    before = len(tr.inner.worklog.messages)
    blank = {"type": "reasoning", "id": "r1", "summary": [" "], "content": ["raw"]}
    user = {"type": "userMessage", "id": "u1", "content": []}
    _feed(
        tr,
        {"method": "item/completed", "params": {"item": blank}},
        {"method": "item/completed", "params": {"item": user}},
        {"method": "item/started", "params": {"item": {"type": "agentMessage", "id": "m"}}},
    )
    assert len(tr.inner.worklog.messages) == before  # exec drops these too
    tr.feed("not json")
    assert tr.inner.diagnostics == ["not JSON: not json"]


def test_the_driver_caps_strings_and_drops_diffs() -> None:
    long = "x" * (drv.MAX_STRING + 10)
    capped = drv.cap({"a": [long], "changes": [{"path": "p", "diff": long}]})
    assert capped["changes"] == [{"path": "p"}]
    assert len(capped["a"][0]) < drv.MAX_STRING + 100 and "10 characters omitted" in capped["a"][0]


# ----------------------------------------------------------------------------- the launcher

LIMITS = Limits(
    wall_clock_seconds=60,
    max_processes=256,
    memory_bytes=1 << 30,
    max_file_bytes=64 << 20,
    tmpfs_bytes=64 << 20,
)


@pytest.mark.sandbox
@pytest.mark.parametrize("spare", [True, False])
def test_the_early_diff_spares_the_drivers_app_server_but_not_the_agents_commands(
    tmp_path: Path, spare: bool
) -> None:
    """At the early diff (SIGUSR1) the launcher kills every process but the driver and the
    forwarder; with ``driver`` (app-server mode) the driver's own child, the
    app-server, is let finish its session files, while the agent's commands (the
    app-server's children) are still killed before the script runs."""
    workspace = tmp_path / "ws"
    workspace.mkdir()
    mark = f"leftover-{uuid.uuid4().hex[:12]}"
    server = (
        f'm={mark[:5]}; bash -c "while :; do : $m{mark[5:]}; sleep 0.05; done" '
        "</dev/null >/dev/null 2>&1 &\n"
        "mkfifo /tmp/w; exec 9<>/tmp/w; read -r -t 1 -u 9; echo yes > /workspace/server-exited"
    )
    fake_driver = (
        f"bash -c '{server}' &\n"
        "server=$!\n"
        "sleep 0.2\n"
        'echo \'{"method":"turn/completed"}\'\n'
        'wait "$server"; exit 0'
    )
    after = "cat /proc/[0-9]*/cmdline 2>/dev/null | tr '\\0' ' ' > /workspace/procs"
    spec = SandboxSpec(
        workspace=workspace, ro_binds={forwarder_path(): SANDBOX_FORWARDER}, limits=LIMITS
    )
    procs: list[bwrap.SandboxProcess] = []
    written: list[bool] = []

    def on_output(stream: str, line: str) -> None:
        if stream == "stdout" and "turn/completed" in line:
            procs[0].signal_command(signal.SIGUSR1)
        if stream == "stderr" and line == WRITTEN_MARKER:
            written.append(True)

    argv = launcher(["/bin/bash", "-c", fake_driver], after=after, driver=spare)
    procs.append(bwrap.start(spec, argv, on_output=on_output))
    result = procs[0].wait()
    assert result.exit_code == 0, result
    assert written == [True]
    assert mark not in (workspace / "procs").read_text()
    assert (workspace / "server-exited").exists() == spare
    # with a driver, the driver says when Codex is ready, not the launcher
    assert (READY_MARKER in result.stderr.splitlines()) == (not spare)
    assert host_pids(mark) == []


@pytest.mark.sandbox
def test_a_cancel_is_passed_on_to_the_agent_and_skips_the_script(tmp_path: Path) -> None:
    """``SIGUSR2`` to the launcher (the host's cancel) reaches the agent's process, which
    ends in its own time (the app-server driver interrupts its turn); then everything left
    in the sandbox is killed and the ``after`` script (the diff) does not run."""
    workspace = tmp_path / "ws"
    workspace.mkdir()
    mark = unique_marker("leftover")
    fake_driver = (
        f'm={mark[:5]}; bash -c "while :; do : $m{mark[5:]}; sleep 0.05; done" '
        "</dev/null >/dev/null 2>&1 &\n"
        "trap 'sleep 0.3; echo interrupted; exit 1' USR2\n"
        "echo started\n"
        "sleep 30 & wait $!; echo not-interrupted"
    )
    spec = SandboxSpec(
        workspace=workspace, ro_binds={forwarder_path(): SANDBOX_FORWARDER}, limits=LIMITS
    )
    procs: list[bwrap.SandboxProcess] = []

    def on_output(stream: str, line: str) -> None:
        if stream == "stdout" and line == "started":
            procs[0].signal_command(signal.SIGUSR2)

    argv = launcher(["/bin/bash", "-c", fake_driver], after="touch /workspace/diffed", driver=True)
    t0 = time.monotonic()
    procs.append(bwrap.start(spec, argv, on_output=on_output))
    result = procs[0].wait()
    assert time.monotonic() - t0 < 10
    assert result.exit_code == 1 and result.killed_reason is None, result
    assert result.stdout.splitlines() == ["started", "interrupted"]
    assert WRITTEN_MARKER not in result.stderr.splitlines()
    assert not (workspace / "diffed").exists()
    assert host_pids(mark) == []


def test_the_driver_is_bound_where_the_runtime_runs_it() -> None:
    from openwham.runtimes.appserver import CODEX_APP_SERVER

    binds = CODEX_APP_SERVER.binds(forwarder=forwarder_path(), gateway_socket=Path("/x"))
    assert binds[driver_path()] == SANDBOX_DRIVER
    argv = CODEX_APP_SERVER.command(
        qa_mode=True, resume_thread="0123456789", custom_instructions="Be brief.", after=""
    )
    assert SANDBOX_DRIVER in argv and "--resume" in argv
    assert argv[argv.index("--client-version") + 1] == pinned_version()
    instructions = argv[argv.index("--developer-instructions") + 1]
    assert instructions.startswith("Be brief.") and "Ask mode" in instructions
    assert SANDBOX_DRIVER in CODEX_APP_SERVER.idle_helpers
    assert CODEX_APP_SERVER.interrupt_signal == drv.INTERRUPT_SIGNAL  # the one it handles
