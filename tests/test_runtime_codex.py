"""The ``codex`` runtime: configuration, command line, event translation, and the real agent.

The end-to-end tests run the whole path of one attempt as the engine will: a workspace cloned
from a mirror, the model gateway on a UNIX socket with the scripted Responses server as its
``openai-compatible`` upstream, and the pinned Codex binary in a bubblewrap sandbox without
network, reaching the gateway through the forwarder that the launcher starts. The diff is
computed inside a second sandbox run (host git never touches a workspace the agent used).
``run_attempt`` below is that glue, as the runtime's own end-to-end test (the engine owns it).
"""

from __future__ import annotations

import json
import shutil
import signal
import tempfile
import time
import tomllib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from conftest import git
from openwham.config import Settings
from openwham.engine.diff import workspace_diff as engine_diff
from openwham.gateway import Gateway, GatewayServer, OpenAIUpstream, Usage, forwarder_path
from openwham.runtimes.appserver import AppServerTranslator, codex_runtime
from openwham.runtimes.codex import (
    ASK_MODE_INSTRUCTIONS,
    LAUNCHER_FAILED,
    MAX_OUTPUT_CHARS,
    NO_NETWORK_NOTE,
    SANDBOX_CODEX_BIN,
    SANDBOX_CODEX_HOME,
    SANDBOX_FORWARDER,
    SANDBOX_GATEWAY_SOCKET,
    TOKEN_ENV,
    WRITTEN_MARKER,
    EventTranslator,
    Outcome,
    StatusUpdate,
    Update,
    WorklogUpdate,
    base_url,
    codex_home_files,
    command,
    launcher,
    sandbox_env,
    shell_command,
)
from openwham.sandbox import bwrap
from openwham.sandbox.bwrap import Limits, SandboxResult, SandboxSpec
from openwham.sandbox.workspace import Mirrors, create_workspace
from openwham.wire import WorklogMessage
from support.procs import host_pids
from support.scripted_model import Fail, Patch, Say, ScriptedModel, Shell

LIMITS = Limits(
    wall_clock_seconds=60,
    max_processes=512,
    memory_bytes=2 << 30,
    max_file_bytes=64 << 20,
    tmpfs_bytes=256 << 20,
)
MODEL = "gpt-5.5"  # a slug Codex knows: it offers the freeform apply_patch tool
UPSTREAM_MODEL = "upstream-model"  # what the gateway pins every request to
REAL_KEY = "sk-real-upstream-key"


# =========================================================================== configuration


def test_codex_home_points_a_responses_provider_at_the_forwarder() -> None:
    files = codex_home_files(base_url=base_url(), model="gpt-5.5", reasoning_effort="high")
    config = tomllib.loads(files["config.toml"])
    assert config["model"] == "gpt-5.5"
    assert config["model_reasoning_effort"] == "high"
    provider = config["model_providers"][config["model_provider"]]
    assert provider == {
        "name": "openwham gateway",
        "base_url": base_url(),
        "wire_api": "responses",
        "env_key": TOKEN_ENV,
        "request_max_retries": 1,
        "stream_max_retries": 1,
    }
    assert base_url().startswith("http://127.0.0.1:") and base_url().endswith("/v1")
    # what Codex 0.169.0 would otherwise try to reach from a sandbox without network
    assert config["analytics"] == {"enabled": False}
    assert config["features"] == {"plugins": False, "goals": False}
    # per-turn work an attempt does not need (test_no_goals_nor_bundled_skills_in_a_turn)
    assert config["skills"] == {"bundled": {"enabled": False}}
    assert config["web_search"] == "disabled"
    assert config["check_for_update_on_startup"] is False
    assert config["shell_environment_policy"] == {"exclude": [TOKEN_ENV]}
    assert config["developer_instructions"] == NO_NETWORK_NOTE  # Codex would say "enabled"
    assert config["sandbox_workspace_write"] == {"network_access": False}
    ask = tomllib.loads(files["ask.config.toml"])
    assert ask == {"developer_instructions": f"{NO_NETWORK_NOTE}\n\n{ASK_MODE_INSTRUCTIONS}"}
    assert sandbox_env("tok") == {"CODEX_HOME": SANDBOX_CODEX_HOME, TOKEN_ENV: "tok"}
    assert not SANDBOX_CODEX_HOME.startswith("/tmp")  # Codex refuses helpers under /tmp

    bare = tomllib.loads(codex_home_files(base_url="u", model="m")["config.toml"])
    assert "model_reasoning_effort" not in bare
    with pytest.raises(ValueError):
        codex_home_files(base_url="u", model=" ")


def test_custom_instructions_survive_toml_quoting() -> None:
    text = 'Use "tabs"\tand \\backslashes\\.\nNew line, bell \x07, del \x7f, emoji 🏴‍☠️, é'
    files = codex_home_files(base_url="u", model="m", custom_instructions=f"  {text}\n")
    given = f"{text}\n\n{NO_NETWORK_NOTE}"
    assert tomllib.loads(files["config.toml"])["developer_instructions"] == given
    ask = tomllib.loads(files["ask.config.toml"])["developer_instructions"]
    assert ask == f"{given}\n\n{ASK_MODE_INSTRUCTIONS}"
    lone = codex_home_files(base_url="u", model="m", custom_instructions="a\ud800b")
    lone_text = tomllib.loads(lone["config.toml"])["developer_instructions"]
    assert lone_text == f"a\ufffdb\n\n{NO_NETWORK_NOTE}"
    blank = codex_home_files(base_url="u", model="m", custom_instructions=" \n ")
    assert tomllib.loads(blank["config.toml"])["developer_instructions"] == NO_NETWORK_NOTE


def test_command_reads_the_prompt_from_stdin() -> None:
    prompt = "-" + "x" * 300_000  # larger than one argv string may be; starts with a dash
    cmd = command(prompt, workdir="/workspace")
    assert cmd.argv == [
        SANDBOX_CODEX_BIN,
        "exec",
        "--json",
        "--strict-config",
        "--skip-git-repo-check",
        "--dangerously-bypass-approvals-and-sandbox",
        "-C",
        "/workspace",
        "-",
    ]
    assert cmd.stdin == prompt.encode()
    ask = command("why?", qa_mode=True)
    assert ask.argv[-3:] == ["--profile", "ask", "-"]
    assert "-s" not in ask.argv and "--sandbox" not in ask.argv  # nested bwrap cannot run
    with pytest.raises(ValueError):
        command("  \n")
    argv = launcher(cmd.argv)
    assert argv[:2] == ["/bin/bash", "-c"] and argv[-len(cmd.argv) :] == cmd.argv
    assert SANDBOX_FORWARDER in argv and SANDBOX_GATEWAY_SOCKET in argv


def test_shell_command_unwraps_codex_bash_wrapper() -> None:
    assert shell_command("/bin/bash -lc 'echo hi; ls'") == "echo hi; ls"
    assert shell_command("bash -c \"echo 'x'\"") == "echo 'x'"
    assert shell_command("python3 -m pytest") == "python3 -m pytest"
    assert shell_command("/bin/bash -lc 'unterminated") == "/bin/bash -lc 'unterminated"


# =========================================================================== event translation


def ev(kind: str, **fields: Any) -> str:
    return json.dumps({"type": kind, **fields})


def item(phase: str, **fields: Any) -> str:
    return ev(f"item.{phase}", item=fields)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        self.now += 1
        return self.now


def translator(prompt: str | None = "Fix it") -> EventTranslator:
    ids = iter(range(1000))
    return EventTranslator(prompt=prompt, clock=Clock(), new_id=lambda: f"m{next(ids)}")


def feed_all(tr: EventTranslator, lines: list[str]) -> list[Update]:
    updates = tr.take_initial()
    for line in lines:
        updates += tr.feed(line)
    return updates


def statuses(updates: list[Update]) -> list[str]:
    return [u.text for u in updates if isinstance(u, StatusUpdate)]


def shape(message: WorklogMessage) -> dict[str, Any]:
    return message.model_dump(mode="json", by_alias=True)


def test_translator_maps_a_stream_to_worklog_status_and_answer() -> None:
    tr = translator()
    cmd = "/bin/bash -lc 'python -m pytest -q'"
    lines = [
        ev("thread.started", thread_id="t-1"),
        item("completed", id="item_0", type="error", message="Model metadata not found"),
        ev("turn.started"),
        item("completed", id="item_1", type="reasoning", text="**Looking** at the tests"),
        item("completed", id="item_2", type="agent_message", text="I'll run the tests."),
        item("started", id="item_3", type="command_execution", command=cmd, status="in_progress"),
        item(
            "completed",
            id="item_3",
            type="command_execution",
            command=cmd,
            aggregated_output="1 failed\n",
            exit_code=1,
            status="failed",
        ),
        item(
            "updated",
            id="item_4",
            type="todo_list",
            items=[{"text": "fix add", "completed": False}, {"text": "test", "completed": True}],
        ),
        item(
            "started",
            id="item_5",
            type="file_change",
            changes=[
                {"path": "/workspace/src/calc.py", "kind": "update"},
                {"path": "/workspace/NEW.md", "kind": "add"},
                {"path": "/elsewhere/x", "kind": "delete"},
            ],
            status="in_progress",
        ),
        item(
            "completed",
            id="item_5",
            type="file_change",
            changes=[{"path": "/workspace/src/calc.py", "kind": "update"}],
            status="completed",
        ),
        item("started", id="item_6", type="mcp_tool_call", server="docs", tool="search"),
        item(
            "completed",
            id="item_6",
            type="mcp_tool_call",
            server="docs",
            tool="search",
            arguments={"q": "add"},
            result={"content": [{"type": "text", "text": "found"}]},
            status="completed",
        ),
        item("completed", id="item_7", type="web_search", query="python add"),
        item("completed", id="item_8", type="brand_new_item", payload=[1, 2]),
        ev("brand.new.event", x=1),
        ev("error", message="Reconnecting... 1/1"),
        "not json at all",
        "[1, 2]",
        "",
        item("completed", id="item_9", type="agent_message", text="Fixed `add`."),
        ev(
            "turn.completed",
            usage={
                "input_tokens": 300,
                "cached_input_tokens": 100,
                "cache_write_input_tokens": 0,
                "output_tokens": 60,
                "reasoning_output_tokens": 7,
            },
        ),
    ]
    updates = feed_all(tr, lines)
    assert statuses(updates) == [
        "Working",
        "Thinking",
        "Working",
        "Running python -m pytest -q",
        "Working",
        "Editing src/calc.py and 2 other files",
        "Working",
        "Calling docs.search",
        "Working",
        "Completing the task",
    ]
    assert tr.thread_id == "t-1"
    assert tr.diagnostics[:2] == ["Model metadata not found", "Reconnecting... 1/1"]
    assert tr.diagnostics[2].startswith("not JSON")

    messages = tr.worklog.messages
    by_kind = [(m.author.role, m.recipient, m.content.content_type) for m in messages]
    assert by_kind == [
        ("user", "all", "text"),  # the prompt
        ("assistant", "all", "text"),  # reasoning
        ("assistant", "all", "text"),  # preamble
        ("assistant", "container.exec", "code"),
        ("tool", "all", "terminal_output"),
        ("assistant", "all", "text"),  # plan
        ("assistant", "apply_patch", "code"),
        ("tool", "all", "text"),
        ("assistant", "docs.search", "code"),
        ("tool", "all", "text"),
        ("assistant", "web.search", "code"),
        ("assistant", "all", "text"),  # the answer
    ]
    prompt, reasoning, preamble, call, output, plan, patch, patched = messages[:8]
    assert shape(prompt) == {
        "id": "m0",
        "author": {"role": "user", "name": None, "metadata": {}},
        "create_time": 1001.0,
        "update_time": 1001.0,
        "content": {"content_type": "text", "parts": ["Fix it"]},
        "status": "finished_successfully",
        "end_turn": None,
        "weight": 0.0,
        "metadata": {"l1239dk1": {"inline_comments": []}},
        "recipient": "all",
        "channel": None,
    }
    assert reasoning.metadata.reasoning_status == "is_reasoning"
    assert reasoning.content.parts == ["**Looking** at the tests"]
    assert preamble.channel == "commentary" and preamble.end_turn is False
    assert shape(call)["content"] == {
        "content_type": "code",
        "language": "unknown",
        "response_format_name": None,
        "text": '{"cmd": "python -m pytest -q"}',
    }
    assert call.channel == "analysis" and call.status == "finished_successfully"
    assert output.author.name == "container.exec" and output.content.parts == ["1 failed\n"]
    assert output.status == "failed" and shape(output)["metadata"] == {"exit_code": 1}
    assert plan.content.parts == ["Plan:\n- [ ] fix add\n- [x] test"]
    assert patch.content.text == "M src/calc.py"  # the completed item's list
    assert patched.content.parts == ["Success. Updated the following files:\nM src/calc.py"]
    assert messages[8].content.text == '{"q": "add"}'
    assert "found" in str(messages[9].content.parts)
    assert messages[10].content.text == '{"query": "python add"}'
    answer = messages[-1]
    assert answer.content.parts == ["Fixed `add`."]
    assert (answer.channel, answer.end_turn) == ("final", True)
    assert len({m.id for m in messages}) == len(messages)

    # a started item and its completion are one message, updated in place
    ids = [u.message.id for u in updates if isinstance(u, WorklogUpdate)]
    assert ids.count(call.id) == 2 and ids.count(patch.id) == 2
    assert [u.new for u in updates if isinstance(u, WorklogUpdate) and u.message.id == call.id] == [
        True,
        False,
    ]

    outcome = tr.finish(0)
    assert (outcome.status, outcome.error, outcome.final_message) == (
        "completed",
        None,
        "Fixed `add`.",
    )
    # the plan never got its item.completed: finishing closes it
    (closed,) = outcome.updates
    assert isinstance(closed, WorklogUpdate) and closed.message.id == plan.id
    assert closed.message.status == "finished_successfully" and not closed.new
    assert outcome.usage is not None and outcome.usage.total_tokens == 360
    assert (outcome.usage.cached_input_tokens, outcome.usage.reasoning_output_tokens) == (100, 7)
    assert tr.finish(1) is outcome  # idempotent


def test_turn_failed_is_the_outcome_and_errors_are_diagnostics() -> None:
    tr = translator(prompt=None)
    cmd = "/bin/bash -lc 'sleep 100'"
    feed_all(
        tr,
        [
            ev("turn.started"),
            item("completed", id="item_0", type="agent_message", text="Let me look."),
            item("started", id="item_1", type="command_execution", command=cmd),
            ev("error", message="Reconnecting... 1/1 (stream disconnected)"),
            ev("turn.failed", error={"message": "stream disconnected before completion: boom"}),
        ],
    )
    assert tr.final_message is None
    outcome = tr.finish(1, stderr="some log\n")
    assert outcome.status == "failed" and outcome.final_message is None
    assert outcome.error is not None and outcome.error.code == "model_error"
    assert outcome.error.message == "stream disconnected before completion: boom"
    # the command still running was closed, and marked as cut off
    (closed,) = [u.message for u in outcome.updates if isinstance(u, WorklogUpdate)]
    assert closed.recipient == "container.exec" and closed.status == "failed"
    assert closed.metadata.error is not None and closed.metadata.error.code == "interrupted"
    assert tr.worklog.messages[0].channel == "commentary"  # never became the answer

    # the gateway's message names the setting to fix, so it wins
    tr = translator()
    feed_all(tr, [ev("turn.started"), ev("turn.failed", error={"message": "Quota exceeded."})])
    upstream = "model upstream http://h/v1 is unreachable (…): check WHAM_MODEL_BASE_URL"
    error = tr.finish(1, upstream_error=upstream).error
    assert error is not None and error.message == f"Model error: {upstream}"


@pytest.mark.parametrize(
    ("lines", "exit_code", "kwargs", "code", "message"),
    [
        (
            [ev("thread.started", thread_id="t"), ev("turn.started")],
            101,
            {"stderr": "log line\nthread 'main' panicked at x.rs\n"},
            "agent_error",
            "status 101 before finishing its turn: thread 'main' panicked at x.rs",
        ),
        (
            [],
            1,
            {
                "stderr": "Error loading config.toml:\n/h/config.toml:2:1: unknown configuration"
                " field `bogus`\n  |\n2 | bogus = 1\n"
            },
            "agent_error",
            "Error loading config.toml: /h/config.toml:2:1: unknown configuration field `bogus`",
        ),
        ([ev("turn.started")], 0, {}, "agent_error", "exited before finishing"),
        (
            [ev("turn.started"), ev("turn.completed", usage={})],
            -9,
            {"killed_reason": "wall-clock limit of 60 s reached"},
            "limit_exceeded",
            "stopped: wall-clock limit of 60 s reached",
        ),
        (
            [],
            LAUNCHER_FAILED,
            {"stderr": "openwham: the model gateway forwarder did not start: no python\n"},
            "agent_error",
            "the model gateway forwarder did not start: no python",
        ),
    ],
)
def test_runs_without_a_completed_turn_fail(
    lines: list[str], exit_code: int, kwargs: dict[str, Any], code: str, message: str
) -> None:
    tr = translator()
    feed_all(tr, lines)
    outcome = tr.finish(exit_code, **kwargs)
    assert outcome.status == "failed" and outcome.error is not None
    assert outcome.error.code == code and message in outcome.error.message, outcome.error


def test_huge_outputs_are_capped_and_odd_shapes_do_not_crash() -> None:
    tr = translator()
    big = "a" * 200_000 + "THE END"
    feed_all(
        tr,
        [
            item(
                "completed",
                id="i",
                type="command_execution",
                command="yes",
                aggregated_output=big,
                exit_code=0,
            ),
            item("completed", id="j", type="file_change", changes="not a list"),
            item("completed", id="k", type="todo_list", items=None),
            item("completed", type="agent_message"),  # no id, no text
            ev("turn.completed", usage={"input_tokens": "many"}),
            ev("item.completed", item="not an object"),
        ],
    )
    output = tr.worklog.messages[2].content.parts
    assert output is not None and isinstance(output[0], str)
    assert len(output[0]) < MAX_OUTPUT_CHARS + 100 and output[0].endswith("THE END")
    assert "characters omitted" in output[0]
    assert tr.usage is not None and tr.usage.input_tokens == 0
    assert tr.finish(0).status == "completed"


# =========================================================================== the real agent


@dataclass
class Stack:
    model: ScriptedModel
    gateway: Gateway
    socket: Path


@pytest.fixture
def stack() -> Iterator[Stack]:
    model = ScriptedModel().start()
    # a short directory: a UNIX socket path must fit in 107 bytes
    run_dir = Path(tempfile.mkdtemp(prefix="ow-gw-"))
    gateway = Gateway(OpenAIUpstream("openai-compatible", model.url, REAL_KEY))
    server = GatewayServer(gateway, run_dir / "gateway.sock").start()
    try:
        yield Stack(model, gateway, server.socket_path)
    finally:
        server.stop()
        model.stop()
        shutil.rmtree(run_dir, ignore_errors=True)


@dataclass
class Workspace:
    path: Path
    base: str
    origin: Path


@pytest.fixture
def workspace(tmp_path: Path) -> Workspace:
    """A clone (from a mirror) of a repository whose test fails: ``add`` subtracts."""
    origin = tmp_path / "origin"
    origin.mkdir()
    git("init", "-q", "-b", "main", cwd=origin)
    (origin / "README.md").write_text("# calc\n\nAdds numbers.\n")
    (origin / ".gitignore").write_text("__pycache__/\n")
    (origin / "calc.py").write_text("def add(a, b):\n    return a - b\n")
    (origin / "old.txt").write_text("obsolete\n")
    (origin / "test_calc.py").write_text(
        "import unittest\n\nfrom calc import add\n\n\n"
        "class AddTest(unittest.TestCase):\n"
        "    def test_add(self):\n"
        "        self.assertEqual(add(2, 3), 5)\n"
    )
    git("add", ".", cwd=origin)
    git("commit", "-q", "-m", "initial", cwd=origin)
    mirror = Mirrors(tmp_path / "mirrors").ensure("calc", str(origin))
    path = tmp_path / "attempt" / "workspace"
    path.parent.mkdir()
    base = create_workspace(mirror, path, "main", str(origin))
    return Workspace(path, base, origin)


@dataclass
class AttemptRun:
    outcome: Outcome
    translator: EventTranslator
    updates: list[Update]
    result: SandboxResult
    usage: Usage
    token: str
    cgroup_dirs: list[Path]
    lines: list[tuple[float, str]] = field(default_factory=list)  # (arrival, stdout line)
    ended: float = 0.0

    @property
    def statuses(self) -> list[str]:
        return statuses(self.updates)

    def messages(self, recipient: str) -> list[WorklogMessage]:
        return [m for m in self.translator.worklog.messages if m.recipient == recipient]

    def output_of(self, call: WorklogMessage) -> WorklogMessage:
        messages = self.translator.worklog.messages
        return messages[[m.id for m in messages].index(call.id) + 1]


def run_attempt(
    stack: Stack,
    ws: Workspace,
    prompt: str,
    *,
    qa_mode: bool = False,
    custom_instructions: str | None = None,
    reasoning_effort: str | None = None,
) -> AttemptRun:
    """One attempt, as the engine will run it (see docs/notes-execution.md)."""
    attempt_id = f"att-{uuid.uuid4().hex[:8]}"
    token = stack.gateway.register_attempt(attempt_id, model=UPSTREAM_MODEL)
    codex_home = ws.path.parent / "codex-home"
    codex_home.mkdir()
    files = codex_home_files(
        base_url=base_url(),
        model=MODEL,
        reasoning_effort=reasoning_effort,
        custom_instructions=custom_instructions,
    )
    for name, text in files.items():
        (codex_home / name).write_text(text)
    # the runtime of WHAM_CODEX_MODE: these tests run Codex as `exec` or as `app-server`
    runtime = codex_runtime(Settings().codex_mode)
    argv = runtime.command(
        qa_mode=qa_mode, resume_thread=None, custom_instructions=custom_instructions, after=""
    )
    spec = SandboxSpec(
        workspace=ws.path,
        workspace_readonly=qa_mode,
        ro_binds=runtime.binds(forwarder=forwarder_path(), gateway_socket=stack.socket),
        rw_binds={codex_home: SANDBOX_CODEX_HOME},
        env=sandbox_env(token),
        network=False,
        limits=LIMITS,
        idle_helpers=runtime.idle_helpers,
    )
    translator = runtime.translator(prompt)
    tr = translator.inner if isinstance(translator, AppServerTranslator) else translator
    assert isinstance(tr, EventTranslator)
    updates = translator.take_initial()
    lines: list[tuple[float, str]] = []

    def on_output(stream: str, line: str) -> None:
        if stream == "stdout":
            lines.append((time.monotonic(), line))
            updates.extend(translator.feed(line))

    stdin = prompt.encode("utf-8", "replace")
    proc = bwrap.start(spec, argv, stdin=stdin, on_output=on_output)
    cgroup_dirs = list(proc.cgroup.dirs.values()) if proc.cgroup else []
    result = proc.wait()
    ended = time.monotonic()
    stack.gateway.revoke(attempt_id)
    outcome = translator.finish(
        result.exit_code,
        killed_reason=result.killed_reason,
        upstream_error=stack.gateway.last_error(attempt_id),
        stderr=result.stderr,
    )
    updates.extend(outcome.updates)
    return AttemptRun(
        outcome=outcome,
        translator=tr,
        updates=updates,
        result=result,
        usage=stack.gateway.usage(attempt_id),
        token=token,
        cgroup_dirs=cgroup_dirs,
        lines=lines,
        ended=ended,
    )


def workspace_diff(ws: Workspace) -> str:
    """The engine's diff of the workspace (git runs in a sandbox: ``.git`` is agent-controlled)."""
    return engine_diff(ws.path, ws.base).text


def assert_sandbox_gone(run: AttemptRun) -> None:
    assert not host_pids(run.token, source="environ")
    assert all(not d.exists() for d in run.cgroup_dirs)


PATCH = """\
*** Begin Patch
*** Update File: calc.py
@@
 def add(a, b):
-    return a - b
+    return a + b
*** Add File: NOTES.md
+Fixed add().
*** Delete File: old.txt
*** End Patch"""
ANSWER = "Fixed `add`: it subtracted instead of adding. The tests pass now."


def test_agent_fixes_a_bug_in_the_sandbox(stack: Stack, workspace: Workspace) -> None:
    stack.model.script = [
        Shell("python3 -B -m unittest -q test_calc"),
        Patch(PATCH),
        Shell(
            "git mv README.md README.rst && printf 'bin\\000ary' > data.bin"
            " && python3 -B -m unittest -q test_calc 2>&1"
            '; echo "token in env: $(env | grep -c OPENWHAM_GATEWAY_TOKEN)"'
        ),
        Say(ANSWER),
    ]
    prompt = "The test fails. Fix the bug."
    run = run_attempt(stack, workspace, prompt)

    assert run.outcome.status == "completed", (run.outcome.error, run.result.stderr[-3000:])
    assert run.outcome.final_message == ANSWER
    assert run.result.exit_code == 0 and run.result.killed_reason is None
    assert_sandbox_gone(run)

    # the diff, computed in a sandbox: modified, added, deleted, renamed and binary files
    diff = workspace_diff(workspace)
    assert "diff --git a/calc.py b/calc.py" in diff
    assert "-    return a - b\n+    return a + b" in diff
    assert "diff --git a/NOTES.md b/NOTES.md\nnew file mode 100644" in diff
    assert "diff --git a/old.txt b/old.txt\ndeleted file mode 100644" in diff
    assert "rename from README.md\nrename to README.rst" in diff
    assert "diff --git a/data.bin b/data.bin" in diff and "GIT binary patch" in diff
    assert "__pycache__" not in diff
    # and it applies to a fresh clone of the base commit
    fresh = workspace.path.parent / "fresh"
    git("clone", "-q", str(workspace.origin), str(fresh), cwd=workspace.path.parent)
    (fresh / "change.diff").write_text(diff)
    git("apply", "--index", "change.diff", cwd=fresh)
    assert (fresh / "calc.py").read_text() == "def add(a, b):\n    return a + b\n"
    assert (fresh / "data.bin").read_bytes() == b"bin\0ary"
    assert not (fresh / "old.txt").exists() and (fresh / "README.rst").exists()

    # the work log: prompt, the failing run, the edit, the passing run, the answer
    messages = run.translator.worklog.messages
    assert messages[0].author.role == "user" and messages[0].content.parts == [prompt]
    first, second = run.messages("container.exec")
    assert first.content.text == '{"cmd": "python3 -B -m unittest -q test_calc"}'
    failing = run.output_of(first)
    assert failing.content.content_type == "terminal_output" and failing.status == "failed"
    assert "AssertionError: -1 != 5" in str(failing.content.parts)
    assert failing.metadata.model_dump()["exit_code"] == 1
    passing = run.output_of(second)
    text = str(passing.content.parts)
    assert passing.status == "finished_successfully" and "OK" in text
    assert "token in env: 0" in text  # the gateway token is not in the agent's commands' env
    (patch,) = run.messages("apply_patch")
    assert sorted((patch.content.text or "").splitlines()) == [
        "A NOTES.md",
        "D old.txt",
        "M calc.py",
    ]
    assert run.output_of(patch).status == "finished_successfully"
    answer = messages[-1]
    assert answer.content.parts == [ANSWER] and (answer.channel, answer.end_turn) == ("final", True)
    assert all(m.status == "finished_successfully" for m in messages if m.author.role != "tool")
    # every update was delivered live, in order, and adds up to the final work log
    latest: dict[str, WorklogMessage] = {}
    for update in run.updates:
        if isinstance(update, WorklogUpdate):
            assert update.new == (update.message.id not in latest)
            latest[update.message.id] = update.message
    assert list(latest.values()) == messages

    assert run.statuses == [
        "Working",
        "Running python3 -B -m unittest -q test_calc",
        "Working",
        "Editing NOTES.md and 2 other files",
        "Working",
        "Running git mv README.md README.rst && printf 'bin\\000ary' > data.bin && python3 -B -m …",
        "Working",
        "Completing the task",
    ]

    # usage: Codex's own count matches the gateway's metering
    assert run.outcome.usage is not None
    assert run.usage.requests == run.usage.responses == 4
    assert run.outcome.usage.input_tokens == run.usage.input_tokens == 400
    assert run.outcome.usage.output_tokens == run.usage.output_tokens == 80
    assert run.outcome.usage.total_tokens == run.usage.total_tokens
    # the gateway pinned the model, injected the real key; the agent never saw it
    assert {body["model"] for body in stack.model.requests} == {UPSTREAM_MODEL}
    assert all(h["authorization"] == f"Bearer {REAL_KEY}" for h in stack.model.headers)
    assert REAL_KEY not in run.result.stdout + run.result.stderr
    # nothing waited on the network at exit (analytics DNS timeouts used to add 5 s)
    ends = ('"turn.completed"', '"turn/completed"')  # exec's event, app-server's notice
    turn_done = next(t for t, line in run.lines if any(e in line for e in ends))
    assert run.ended - turn_done < 2.5


def test_ask_mode_answers_without_changing_the_workspace(
    stack: Stack, workspace: Workspace
) -> None:
    stack.model.script = [
        Shell("cat calc.py; echo changed > calc.py; touch new.txt"),
        Patch(PATCH),
        Say("`add` returns `a - b`; it should return `a + b`."),
    ]
    before = {p.name: p.read_bytes() for p in workspace.path.iterdir() if p.is_file()}
    run = run_attempt(
        stack, workspace, "Why does test_add fail?", qa_mode=True, custom_instructions="Be brief."
    )

    assert run.outcome.status == "completed", (run.outcome.error, run.result.stderr[-3000:])
    assert run.outcome.final_message == "`add` returns `a - b`; it should return `a + b`."
    assert_sandbox_gone(run)
    # writes failed: the shell got a read-only file system, the patch failed
    (call,) = run.messages("container.exec")
    output = str(run.output_of(call).content.parts)
    assert "return a - b" in output and output.count("Read-only file system") == 2
    (patch,) = run.messages("apply_patch")
    assert patch.status == "finished_successfully"  # the call message itself
    assert run.output_of(patch).status == "failed"
    assert "Editing NOTES.md and 2 other files" in run.statuses
    # nothing changed: same files, and git (in a read-only sandbox) sees a clean tree
    after = {p.name: p.read_bytes() for p in workspace.path.iterdir() if p.is_file()}
    assert after == before
    status = bwrap.run(
        SandboxSpec(workspace=workspace.path, workspace_readonly=True, limits=LIMITS),
        ["git", "-c", "core.fsmonitor=", "status", "--porcelain", "--untracked-files=all"],
    )
    assert status.ok and status.stdout == "", (status.stdout, status.stderr)
    # the Ask-mode note (after the user's instructions) reached the model
    developer = json.dumps(stack.model.requests[0]["input"][:2])
    expected = f"Be brief.\n\n{NO_NETWORK_NOTE}\n\n{ASK_MODE_INSTRUCTIONS}"
    assert json.dumps(expected)[1:-1] in developer


def test_custom_instructions_and_effort_reach_the_model(stack: Stack, workspace: Workspace) -> None:
    instructions = 'Answer like a pirate 🏴‍☠️, keep "quotes" and \\backslashes\\.\nLine two.'
    stack.model.script = [Say("Arr.")]
    run = run_attempt(
        stack, workspace, "Hello", custom_instructions=instructions, reasoning_effort="high"
    )
    assert run.outcome.status == "completed", (run.outcome.error, run.result.stderr[-3000:])
    assert run.outcome.final_message == "Arr."
    (body,) = stack.model.requests
    texts = [
        part["text"]
        for entry in body["input"]
        if entry.get("role") == "developer"
        for part in entry["content"]
    ]
    assert f"{instructions}\n\n{NO_NETWORK_NOTE}" in texts
    assert ASK_MODE_INSTRUCTIONS not in json.dumps(body)  # not in Code mode
    assert body["reasoning"]["effort"] == "high"
    user_texts = [p["text"] for e in body["input"] if e.get("role") == "user" for p in e["content"]]
    assert user_texts[-1] == "Hello"  # the prompt itself is sent as written
    assert run.statuses == ["Working", "Completing the task"]
    assert workspace_diff(workspace) == ""


def test_no_goals_nor_bundled_skills_in_a_turn(stack: Stack, workspace: Workspace) -> None:
    """The generated config's per-turn switches hold in a real sandboxed run: no goal tools
    and none of Codex's bundled skills in the request, no ``skills/.system`` written into
    ``CODEX_HOME``; a skill of the repository itself is still offered to the model."""
    skill = workspace.path / ".agents" / "skills" / "frobnicate"
    skill.mkdir(parents=True)
    marker = f"frobnicate-{uuid.uuid4().hex[:8]}"
    (skill / "SKILL.md").write_text(
        f"---\nname: {marker}\ndescription: Frobnicates the widgets of this repository.\n"
        "---\nRun ./frob.\n"
    )
    stack.model.script = [Say("Done.")]
    run = run_attempt(stack, workspace, "Hello")
    assert run.outcome.status == "completed", (run.outcome.error, run.result.stderr[-3000:])
    (body,) = stack.model.requests
    text = json.dumps(body)
    tools = {t.get("name") for t in body["tools"]}
    assert "exec_command" in tools or "shell" in tools  # the request is the agent's
    assert not tools & {"create_goal", "get_goal", "update_goal"}
    assert marker in text  # the repository's skill
    for bundled in ("skill-creator", "skill-installer", "openai-docs", "imagegen"):
        assert bundled not in text
    assert not (workspace.path.parent / "codex-home" / "skills" / ".system").exists()


def test_a_model_failure_fails_the_attempt(stack: Stack, workspace: Workspace) -> None:
    stack.model.script = [Shell("echo one"), Fail("server_error", "the model broke")]
    run = run_attempt(stack, workspace, "Do something")
    assert run.outcome.status == "failed" and run.outcome.final_message is None
    error = run.outcome.error
    assert error is not None and error.code == "model_error"
    assert (
        error.message
        == "Model error: the model failed the response (server_error): the model broke"
    )
    assert run.result.exit_code == 1 and run.result.duration < 10
    (call,) = run.messages("container.exec")
    assert run.output_of(call).content.parts == ["one\n"]  # the work so far is kept
    assert run.statuses[-1] == "Working"  # never "Completing the task"
    assert_sandbox_gone(run)
    # Codex's own account of the failure stays available as a diagnostic
    assert any("the model broke" in d for d in run.translator.diagnostics)


def test_an_unreachable_upstream_fails_fast_and_names_the_setting(workspace: Workspace) -> None:
    model = ScriptedModel()  # never started: nothing listens at its address
    run_dir = Path(tempfile.mkdtemp(prefix="ow-gw-"))
    gateway = Gateway(OpenAIUpstream("openai-compatible", "http://127.0.0.1:9/v1", REAL_KEY))
    server = GatewayServer(gateway, run_dir / "gateway.sock").start()
    try:
        run = run_attempt(Stack(model, gateway, server.socket_path), workspace, "Hi")
    finally:
        server.stop()
        shutil.rmtree(run_dir, ignore_errors=True)
    assert run.outcome.status == "failed"
    assert run.outcome.error is not None and "WHAM_MODEL_BASE_URL" in run.outcome.error.message
    assert run.result.duration < 10  # one retry each, not Codex's default 4 by 5
    assert run.usage.requests <= 4


def test_launcher_reports_a_forwarder_that_does_not_start(workspace: Workspace) -> None:
    argv = launcher(["/bin/echo", "never"], python="/nonexistent/python3", timeout_seconds=5)
    result = bwrap.run(SandboxSpec(workspace=workspace.path, limits=LIMITS), argv)
    assert result.exit_code == LAUNCHER_FAILED and "never" not in result.stdout
    tr = EventTranslator()
    error = tr.finish(result.exit_code, stderr=result.stderr).error
    assert error is not None
    assert error.message.startswith("the model gateway forwarder did not start:"), error
    assert "/nonexistent/python3" in error.message


@pytest.mark.parametrize("signalled", [True, False])
def test_launcher_runs_its_after_script_while_codex_exits_when_signalled(
    workspace: Workspace, signalled: bool
) -> None:
    """With ``after``, the host's SIGUSR1 (sent at the agent's last model response) makes
    the launcher kill every other process but the forwarder and run the script while Codex
    is still closing down; without it the script runs once Codex has exited. Either way the
    leftovers are gone before the script runs and the launcher exits with Codex's status."""
    mark = f"leftover-{uuid.uuid4().hex[:12]}"
    fake_codex = (
        # (the mark is put together at run time: init's command line holds this script)
        f'm={mark[:5]}; bash -c "while :; do : $m{mark[5:]}; sleep 0.05; done" '
        "</dev/null >/dev/null 2>&1 &\n"
        "grep SigIgn /proc/self/status > /workspace/sigign\n"
        "mkfifo /tmp/wait; exec 9<>/tmp/wait\n"
        'echo \'{"type":"turn.completed"}\'\n'
        # closing down takes a second, without a child process (those are killed)
        "read -r -t 1 -u 9; echo exited > /workspace/codex-exited; exit 3"
    )
    after = (
        "[ -e /workspace/codex-exited ] && when=late || when=early\n"
        "cat /proc/[0-9]*/cmdline 2>/dev/null | tr '\\0' ' ' > /workspace/procs\n"
        "echo $when > /workspace/after"
    )
    spec = SandboxSpec(
        workspace=workspace.path,
        ro_binds={forwarder_path(): SANDBOX_FORWARDER},
        limits=LIMITS,
    )
    procs: list[bwrap.SandboxProcess] = []
    sent: list[bool] = []

    written: list[bool] = []  # WRITTEN_MARKER seen: had Codex exited by then?

    def on_output(stream: str, line: str) -> None:
        if signalled and stream == "stdout" and "turn.completed" in line:
            sent.append(procs[0].signal_command(signal.SIGUSR1))
        if stream == "stderr" and line == WRITTEN_MARKER:
            written.append((workspace.path / "codex-exited").exists())

    argv = launcher(["/bin/bash", "-c", fake_codex], after=after)
    procs.append(bwrap.start(spec, argv, on_output=on_output))
    result = procs[0].wait()
    assert sent == ([True] if signalled else [])
    assert result.exit_code == 3, result
    assert (workspace.path / "after").read_text().strip() == ("early" if signalled else "late")
    # the launcher says when the script's result is in: while Codex closes down, if signalled
    assert written == [not signalled]
    assert (workspace.path / "codex-exited").exists()  # Codex was let finish either way
    procs_seen = (workspace.path / "procs").read_text()
    assert mark not in procs_seen
    # signalled, the forwarder is spared (should Codex ask the model again, it gets through)
    assert (f"-I {SANDBOX_FORWARDER} --listen" in procs_seen) == signalled
    # Codex runs as a background job, yet with SIGINT and SIGQUIT not ignored (its commands
    # inherit that: a test suite's Ctrl-C handling must behave as on a terminal)
    ignored = int((workspace.path / "sigign").read_text().split()[1], 16)
    assert ignored & (1 << (signal.SIGINT - 1) | 1 << (signal.SIGQUIT - 1)) == 0
    assert host_pids(mark) == []
