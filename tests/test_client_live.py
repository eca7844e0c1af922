"""The SDK (sync and async) and the ``wham`` CLI against ``wham serve`` running real tasks:
the real Codex CLI in the sandbox, answered by the scripted model."""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import LiveServer, cli_user, git, make_repo, run_cli
from openwham.client import (
    AsyncWhamClient,
    Conflict,
    NotFound,
    Steps,
    UnknownEnvironment,
    WhamClient,
    turn_diff,
)
from openwham.codexauth import jwt_claims
from support.scripted_model import Patch, Say, ScriptedModel, Shell

FIX_ADD = Patch(
    "*** Begin Patch\n*** Update File: calc.py\n@@\n def add(a, b):\n"
    "-    return a - b\n+    return a + b\n*** End Patch"
)
# Every attempt writes a random number of its own, so the attempts' diffs differ.
RANDOM_NOTE = Shell(
    "printf '%s\\n' \"$(od -An -N8 -tx1 /dev/urandom | tr -d ' \\n')\" > NOTE.txt && cat NOTE.txt"
)
SCRIPT = [RANDOM_NOTE, FIX_ADD, Say("Fixed add() and left a note.")]


@pytest.fixture(scope="module")
def token(served: LiveServer) -> str:
    return served.token()


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_repo(tmp_path_factory.mktemp("origin") / "widgets")


@pytest.fixture(scope="module")
def wham(served: LiveServer, token: str) -> Iterator[WhamClient]:
    with WhamClient(served.url, token=token) as c:
        yield c


@pytest.fixture(scope="module")
def env_id(wham: WhamClient, repo: Path, model: ScriptedModel) -> str:
    model.script = SCRIPT
    return wham.create_environment({"label": "acme/widgets", "repos": [str(repo)]}).id


def clone(repo: Path, dest: Path) -> Path:
    subprocess.run(["git", "clone", "-q", str(repo), str(dest)], check=True)
    return dest


def note(diff: str) -> str:
    lines = [ln for ln in diff.splitlines() if ln.startswith("+") and not ln.startswith("+++")]
    return next(ln[1:] for ln in lines if len(ln) == 17)


# ----------------------------------------------------------------------------- SDK


def test_sdk_runs_a_best_of_two_task_end_to_end(
    wham: WhamClient, env_id: str, repo: Path, tmp_path: Path
) -> None:
    checkout = clone(repo, tmp_path / "checkout")
    assert wham.resolve_environment(repo=checkout).id == env_id  # by the checkout's remote
    assert wham.resolve_environment("ACME/widgets").id == env_id
    with pytest.raises(UnknownEnvironment, match="known: acme/widgets"):
        wham.resolve_environment("nope")

    created = wham.create_task("Fix add()", env_id, attempts=2)
    task_id, turn_id = created.task.id, created.turn.id
    assert turn_id is not None
    events = list(wham.stream(task_id, turn_id))
    kinds = {e.item_type for e in events}
    assert {"task_turn_event", "work_log_message"} <= kinds
    assert events[-1].is_terminal and events[-1].turn_status == "completed"
    texts = [e.payload.get("text") for e in events if e.item_type == "task_turn_event"]
    assert "Working" in " ".join(str(t) for t in texts)

    details = wham.wait(task_id, poll=0.2, timeout=120)
    attempts = wham.attempts(task_id)
    assert [t.attempt_placement for t in attempts] == [0, 1]
    assert all(t.turn_status == "completed" for t in attempts)
    first, second = wham.diff(task_id), wham.diff(task_id, attempt=2)
    assert first == turn_diff(details.current_diff_task_turn)
    assert note(first) != note(second)
    with pytest.raises(Exception, match="2 attempt"):
        wham.diff(task_id, attempt=3)

    assert wham.apply(task_id, checkout, attempt=2, check=True).status == "success"
    assert not (checkout / "NOTE.txt").exists()
    result = wham.apply(task_id, checkout, attempt=2)
    assert result.status == "success" and sorted(result.applied) == ["NOTE.txt", "calc.py"]
    assert (checkout / "NOTE.txt").read_text().strip() == note(second)
    assert "return a + b" in (checkout / "calc.py").read_text()

    follow = wham.follow_up(task_id, "Now add a docstring.")
    assert follow.task.id == task_id
    done = wham.wait(task_id, poll=0.2, timeout=120)
    assert done.current_assistant_turn is not None
    assert done.current_assistant_turn.id == follow.turn.id
    assert done.current_assistant_turn.turn_status == "completed"

    pr = wham.create_pr(task_id)
    assert pr.pull_request.head and pr.assistant_turn_id == follow.turn.id
    branches = git("branch", "--list", pr.pull_request.head, cwd=repo)
    assert pr.pull_request.head in branches

    assert wham.archive(task_id)
    assert task_id in [t.id for t in wham.iter_tasks(task_filter="archived")]
    assert task_id not in [t.id for t in wham.iter_tasks()]
    assert wham.unarchive(task_id)
    with pytest.raises(NotFound):
        wham.get_task("task_e_doesnotexist")


def test_sdk_lists_every_page_and_reads_account(wham: WhamClient, env_id: str) -> None:
    for i in range(3):
        wham.create_task(f"Task {i}", env_id)
    pages = [wham.list_tasks(limit=2)]
    while pages[-1].cursor:
        pages.append(wham.list_tasks(limit=2, cursor=pages[-1].cursor))
    assert len(pages) >= 2
    ids = [t.id for t in wham.iter_tasks(page_size=2)]
    assert ids == [t.id for p in pages for t in p.items] and len(set(ids)) == len(ids) >= 3
    assert wham.usage().plan_type
    assert wham.settings() is not None
    env = wham.update_environment(env_id, {"description": "widgets repo"})
    assert env.description == "widgets repo"
    assert wham.get_environment(env_id).description == "widgets repo"
    for t in list(wham.iter_tasks()):
        wham.wait(t.id, poll=0.2, timeout=120)


def test_async_client_does_the_same(
    served: LiveServer, token: str, env_id: str, repo: Path, tmp_path: Path
) -> None:
    checkout = clone(repo, tmp_path / "checkout")

    async def run() -> tuple[list[str], str, str]:
        async with AsyncWhamClient(f"{served.url}/backend-api", token=token) as c:
            env = await c.resolve_environment(repo=checkout)
            created = await c.create_task("Fix add()", env.id)
            kinds = [e.item_type async for e in c.stream(created.task.id)]
            await c.wait(created.task.id, poll=0.2, timeout=120)
            diff = await c.diff(created.task.id)
            result = await c.apply(created.task.id, checkout)
            return kinds, diff, result.status

    kinds, diff, status = asyncio.run(run())
    assert kinds[-1] == "task_turn_event" and "work_log_message" in kinds
    assert status == "success" and "NOTE.txt" in diff
    assert (checkout / "NOTE.txt").read_text().strip() == note(diff)


def test_every_streamed_event_has_text_as_the_readme_prints_it(
    wham: WhamClient, env_id: str
) -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for line in ("steps = Steps()", "for event in wham.stream(task.id):", "if steps.new(event):"):
        assert line in readme
    assert "print(event.text)" in readme
    created = wham.create_task("Fix add()", env_id)
    events = list(wham.stream(created.task.id))
    steps = Steps()
    printed = [e.text for e in events if steps.new(e)]  # what the README's loop prints
    # each step once: one line per command, edit, output and answer, no status said twice
    for line in ("Edited calc.py", "Fixed add() and left a note.", "Completed"):
        assert printed.count(line) == 1, printed
    assert len([t for t in printed if t.startswith("$ ")]) == len(
        {e.payload.get("id") for e in events if e.text.startswith("$ ")}
    )
    assert all(a != b for a, b in itertools.pairwise(printed)), printed
    assert {"task_turn_event", "work_log_message", "task_title_generated"} <= {
        e.item_type for e in events
    }
    texts = [e.text for e in events]
    assert all(t.strip() for t in texts), [(e.item_type, e.text) for e in events]
    commands = [t for t in texts if t.startswith("$ ")]
    assert commands and all("{" not in t.split("\n")[0] for t in commands)  # a shell line
    assert commands[0].startswith("$ printf '%s\\n'")
    output = next(e.text for e in events if e.payload.get("author", {}).get("role") == "tool")
    assert len(output.strip()) == 16  # the note printed by `cat NOTE.txt`
    for line in (
        "Prompt: Fix add()",
        "Edited calc.py",
        "Fixed add() and left a note.",
        "Completed",
    ):
        assert line in texts, texts
    assert any(t.startswith("Title: ") for t in texts)


# ----------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def cli_env(
    tmp_path_factory: pytest.TempPathFactory, served: LiveServer, token: str
) -> dict[str, str]:
    return cli_user(tmp_path_factory.mktemp("cli-home"), served.url, token, "--name", "local")


def test_cli_walkthrough(
    cli_env: dict[str, str], served: LiveServer, env_id: str, repo: Path, tmp_path: Path
) -> None:
    new = run_cli(cli_env, "task", "new", "Fix add()", "--env", "acme/widgets", "-n", "2", "--wait")
    assert new.returncode == 0, new.stderr
    url = new.stdout.splitlines()[0]
    assert url.startswith(f"{served.url}/codex/tasks/task_e_")
    task_id = url.rsplit("/", 1)[1]
    assert "[READY]" in new.stdout and "attempt 2: completed" in new.stdout

    listed = json.loads(run_cli(cli_env, "task", "list", "--json").stdout)
    row = next(t for t in listed["tasks"] if t["id"] == task_id)
    assert row["status"] == "ready" and row["attempt_total"] == 2
    assert row["summary"]["files_changed"] == 2 and row["environment_label"] == "acme/widgets"

    show = run_cli(cli_env, "task", "show", url)
    assert show.returncode == 0 and "Fixed add() and left a note." in show.stdout
    shown = json.loads(run_cli(cli_env, "task", "show", task_id, "--json").stdout)
    assert [a["turn_status"] for a in shown["attempts"]] == ["completed", "completed"]

    diff2 = run_cli(cli_env, "task", "diff", task_id, "--attempt", "2")
    assert diff2.returncode == 0 and diff2.stdout.startswith("diff --git")
    checkout = clone(repo, tmp_path / "co")
    check = run_cli(cli_env, "task", "apply", task_id, "--attempt", "2", "--check", cwd=checkout)
    assert check.returncode == 0 and "would apply cleanly" in check.stdout
    applied = run_cli(cli_env, "task", "apply", task_id, "--attempt", "2", cwd=checkout)
    assert applied.returncode == 0, applied.stderr
    assert (checkout / "NOTE.txt").read_text().strip() == note(diff2.stdout)
    moved = clone(repo, tmp_path / "moved")
    git("rm", "-q", "calc.py", cwd=moved)
    git("commit", "-qm", "calc.py is gone", cwd=moved)
    again = run_cli(cli_env, "task", "apply", task_id, "--attempt", "2", cwd=moved)
    assert again.returncode == 1
    assert again.stderr.startswith("error: the patch does not apply")
    assert "Traceback" not in again.stderr

    watch = run_cli(cli_env, "task", "watch", task_id)
    assert watch.returncode == 0
    assert "$ " in watch.stdout and "● Completed" in watch.stdout
    assert "Fixed add() and left a note." in watch.stdout

    follow = run_cli(cli_env, "task", "follow-up", task_id, "--wait", stdin="Add a docstring.\n")
    assert follow.returncode == 0, follow.stderr
    assert "Reading prompt from stdin" in follow.stderr

    pr = run_cli(cli_env, "task", "pr", task_id, "--json")
    assert pr.returncode == 0 and json.loads(pr.stdout)["pull_request"]["head"]

    for verb in ("archive", "unarchive"):
        r = run_cli(cli_env, "task", verb, task_id, "--json")
        assert r.returncode == 0 and json.loads(r.stdout)["success"] is True
    r = run_cli(cli_env, "task", "cancel", task_id, "--json")  # it is finished
    assert r.returncode == 1 and json.loads(r.stdout)["success"] is False
    piped = run_cli(cli_env, "task", "new", "--env", env_id, "--json", stdin="From stdin\n")
    assert piped.returncode == 0 and json.loads(piped.stdout)["id"].startswith("task_e_")
    assert run_cli(cli_env, "usage").stdout.startswith("plan: ")


def test_cli_environments(cli_env: dict[str, str], repo: Path, tmp_path: Path) -> None:
    made = run_cli(
        cli_env,
        "env",
        "create",
        "--label",
        "tools",
        "--repo",
        str(repo),
        "--var",
        "A=1",
        "--secret",
        "TOKEN=s3cret",
        "--json",
    )
    assert made.returncode == 0, made.stderr
    created = json.loads(made.stdout)
    assert created["env_vars"] == {"A": "1"} and "s3cret" not in made.stdout
    listed = run_cli(cli_env, "env", "list")
    assert "tools" in listed.stdout and "acme/widgets" in listed.stdout
    upd = run_cli(cli_env, "env", "update", "tools", "--pin", "--unset-secret", "TOKEN", "--json")
    assert upd.returncode == 0 and json.loads(upd.stdout)["is_pinned"] is True
    assert json.loads(upd.stdout)["secrets"] == {}
    shown = run_cli(cli_env, "env", "show", "tools")
    assert "(pinned)" in shown.stdout and "A" in shown.stdout
    checkout = clone(repo, tmp_path / "co")
    # two environments hold this repository; the pinned one wins
    resolved = run_cli(cli_env, "env", "resolve", "--json", cwd=checkout)
    assert json.loads(resolved.stdout)["label"] == "tools"
    gone = run_cli(cli_env, "env", "delete", "tools", "--yes")
    assert gone.returncode == 0 and "deleted" in gone.stdout
    assert "tools" not in run_cli(cli_env, "env", "list").stdout


def test_cli_errors_are_one_line_with_a_fix(
    cli_env: dict[str, str], wham: WhamClient, env_id: str, gate: threading.Event
) -> None:
    unknown = run_cli(cli_env, "task", "new", "x", "--env", "nope")
    assert unknown.returncode == 1
    assert (
        unknown.stderr.splitlines()[0] == "error: unknown environment 'nope'; known: acme/widgets"
    )

    logged_out = run_cli({**cli_env, "WHAM_PROFILE": "chatgpt"}, "task", "list")
    assert logged_out.returncode == 4
    assert logged_out.stderr.startswith("error: ") and "wham login" in logged_out.stderr
    assert "Traceback" not in logged_out.stderr

    missing = run_cli(cli_env, "task", "show", "task_e_doesnotexist")
    assert missing.returncode == 1 and missing.stderr.startswith("error: 404")

    bad = run_cli(cli_env, "task", "new", "x", "--attempts", "9")
    assert bad.returncode == 2
    url = run_cli({**cli_env, "WHAM_URL": "localhost:1", "WHAM_TOKEN": "t"}, "task", "list")
    assert url.returncode == 1 and url.stderr.startswith("error: not an http(s) URL")

    gate.clear()
    try:
        created = wham.create_task("Slow one", env_id)
        task_id = created.task.id
        deadline = time.monotonic() + 60
        while wham.get_task(task_id).current_assistant_turn.turn_status != "in_progress":  # type: ignore[union-attr]
            assert time.monotonic() < deadline
            time.sleep(0.1)
        running = run_cli(cli_env, "task", "diff", task_id)
        assert running.returncode == 3
        assert "still running" in running.stderr.splitlines()[0]
        status = run_cli(cli_env, "task", "show", task_id)
        assert status.returncode == 3 and "[PENDING]" in status.stdout
        with pytest.raises(Conflict):
            wham.diff(task_id)
        assert run_cli(cli_env, "task", "cancel", task_id).returncode == 0
    finally:
        gate.set()
    done = wham.wait(task_id, poll=0.2, timeout=60)
    assert done.current_assistant_turn is not None
    assert done.current_assistant_turn.turn_status == "cancelled"
    assert run_cli(cli_env, "task", "show", task_id).returncode == 1


def test_cli_status_and_help(cli_env: dict[str, str], served: LiveServer, token: str) -> None:
    status = run_cli(cli_env, "status", "--json")
    rows = {r["profile"]: r for r in json.loads(status.stdout)}
    assert rows["local"]["logged_in"] and rows["local"]["current"]
    assert rows["local"]["url"] == served.url
    assert rows["chatgpt"]["logged_in"] is False
    text = run_cli(cli_env, "status").stdout
    assert f"* local  {served.url}  logged in as" in text
    helped = run_cli(cli_env, "--help")
    for noun in ("task", "env", "login", "usage", "serve"):
        assert noun in helped.stdout
    home = Path(cli_env["HOME"]) / "codex-for-cli"
    written = run_cli(
        cli_env,
        "codex-auth",
        "--server",
        served.url,
        "--token",
        token,
        "--codex-home",
        str(home),
        "--json",
    )
    assert written.returncode == 0, written.stderr
    assert json.loads(written.stdout)["auth_json"] == str(home / "auth.json")
    assert json.loads((home / "auth.json").read_text())["tokens"]["access_token"] == token
    # sign out of a profile of its own (the other tests of this module use "local")
    spare = served.token()
    login = run_cli(cli_env, "login", "--server", served.url, "--token", spare, "--name", "spare")
    assert login.returncode == 0, login.stderr
    env = {**cli_env, "WHAM_PROFILE": "spare"}
    out = run_cli(env, "logout", "--json")
    assert json.loads(out.stdout) == {
        "profile": "spare",
        "kind": "openwham",
        "token": "revoked",  # on the server, which now refuses it
        "token_id": jwt_claims(spare)["jti"],
        "was_logged_in": True,
    }
    after = run_cli({**cli_env, "WHAM_URL": served.url, "WHAM_TOKEN": spare}, "task", "list")
    assert after.returncode == 4 and "revoked" in after.stderr, after.stderr
    assert run_cli(cli_env, "task", "list").returncode == 0  # the module's own token still works


def test_cli_watch_shows_each_step_once(
    cli_env: dict[str, str], wham: WhamClient, env_id: str
) -> None:
    """`wham task watch`, live and replayed: the command once, as the shell line it runs, then
    its output, the edit, the answer once (the stream sends a message again each time it
    changes; the summary at the end does not repeat the answer)."""
    created = wham.create_task("Fix add()", env_id)
    live = run_cli(cli_env, "task", "watch", created.task.id)
    replay = run_cli(cli_env, "task", "watch", created.task.id)
    script = RANDOM_NOTE.command  # as written, not as JSON
    for watch in (live, replay):
        assert watch.returncode == 0, watch.stderr
        lines = watch.stdout.splitlines()
        assert [ln for ln in lines if ln.startswith("$ ")] == [f"$ {script}"], watch.stdout
        assert '"cmd"' not in watch.stdout
        output = lines[lines.index(f"$ {script}") + 1]
        assert re.fullmatch(r"  [0-9a-f]{16}", output), watch.stdout
        assert watch.stdout.count(output.strip()) == 1
        assert [ln for ln in lines if "calc.py" in ln] == ["✎ Edited calc.py"], watch.stdout
        assert watch.stdout.count("Fixed add() and left a note.") == 1, watch.stdout
        assert not any(ln.startswith("● Running") for ln in lines), watch.stdout
        steps = [ln for ln in lines if ln.startswith(("$ ", "✎ ", "Fixed add()", "● Completed"))]
        assert steps == [
            f"$ {script}",
            "✎ Edited calc.py",
            "Fixed add() and left a note.",
            "● Completed",
        ]
        assert "[READY]" in watch.stdout and "attempt 1: completed" in watch.stdout


def test_watch_view_prints_a_failing_command_and_a_streamed_answer_once() -> None:
    """What `task watch` prints for the stream the engine records from Codex's events (the
    real translator): a command started then failed, reasoning, an answer marked final at the
    end. Each once; the failing command's output with its exit code."""
    from openwham.cli.render import WatchView
    from openwham.client import StreamEvent
    from openwham.runtimes.codex import EventTranslator, StatusUpdate, WorklogUpdate

    def item(kind: str, **fields: object) -> str:
        return json.dumps({"type": f"item.{kind}", "item": fields})

    cmd = "/bin/bash -lc 'python -m pytest -q'"
    lines = [
        json.dumps({"type": "thread.started", "thread_id": "t-1"}),
        json.dumps({"type": "turn.started"}),
        item("started", id="r", type="reasoning", text="Looking"),
        item("completed", id="r", type="reasoning", text="Looking at the tests"),
        item("started", id="c", type="command_execution", command=cmd, status="in_progress"),
        item(
            "completed",
            id="c",
            type="command_execution",
            command=cmd,
            aggregated_output="1 failed\n",
            exit_code=1,
            status="failed",
        ),
        item("completed", id="a", type="agent_message", text="The test fails."),
        json.dumps({"type": "turn.completed", "usage": {}}),
    ]
    tr = EventTranslator(prompt="Run the tests")
    events = []
    for update in tr.take_initial() + [u for line in lines for u in tr.feed(line)]:
        if isinstance(update, WorklogUpdate):
            payload = update.message.model_dump(mode="json", by_alias=True)
            events.append(StreamEvent("1", "work_log_message", payload))
        elif isinstance(update, StatusUpdate):
            events.append(StreamEvent("1", "task_turn_event", {"text": update.text}))
    view = WatchView()
    printed = [line for event in events for line in view.lines(event)]
    assert printed == [
        "[bold cyan]● Working[/]",
        "[italic dim]Looking at the tests[/]",
        "[bold]$ python -m pytest -q[/]",
        "[dim]  1 failed[/]",
        "[red]  (exit 1)[/]",
        "The test fails.",
        "[bold cyan]● Completing the task[/]",
    ]
