"""The post-setup cache (sandbox.snapshots) with real bubblewrap, git and Codex CLI against
the scripted model: a slow setup script runs once, later attempts resume its snapshot and run
the maintenance script; a branch that moved resumes it too and checks out only the new commit;
reset-cache, a changed setup script and expiry make setup run again; attempts on one snapshot
cannot change it or each other's files."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import Server, diff_of, engine_settings, make_server, wait_for_task
from openwham.cli import render
from openwham.wire import TaskDetails
from support.browser import csrf_of, sign_in
from support.scripted_model import Say, ScriptedModel, Shell
from test_engine import commands, stream

pytestmark = pytest.mark.sandbox

SETUP = [
    "sleep 3",
    "mkdir -p node_modules",
    "head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n' > node_modules/marker",
    "echo home-state > ~/.setup-home",
    'echo "setup ran: $(cat node_modules/marker)"',
]
MAINTENANCE = ['echo "maintenance ran: $(cat node_modules/marker) $(cat ~/.setup-home)"']


@pytest.fixture
def cache_server(tmp_path: Path, sqlite_url: str, scripted_model: Any) -> Iterator[Server]:
    yield from make_server(tmp_path, sqlite_url, **engine_settings(scripted_model))


@pytest.fixture
def ignoring_repo(repo: Path) -> Path:
    (repo / ".gitignore").write_text("node_modules/\n")
    subprocess.run(["git", "add", ".gitignore"], cwd=repo, check=True)
    subprocess.run(["git", "commit", "-qm", "ignore node_modules"], cwd=repo, check=True)
    return repo


def setup_lines(api: Any, task_id: str, turn_id: str) -> list[str]:
    r = api.get(f"tasks/{task_id}/turns/{turn_id}/logs")
    assert r.status_code == 200, r.text
    return [entry["line"] for entry in r.json()["logs"]]


def run_task(api: Any, env_id: str, prompt: str = "Look") -> tuple[str, str, dict[str, Any]]:
    created = api.create_task(env_id, prompt)
    task_id, turn_id = created["task"]["id"], created["turn"]["id"]
    turn = wait_for_task(api, task_id)["current_assistant_turn"]
    assert turn["turn_status"] == "completed", turn["error"]
    return task_id, turn_id, turn


def commit(repo: Path, files: dict[str, str | None], message: str) -> str:
    """A new commit on the repository's branch (``None``: delete the file); its sha."""
    for name, text in files.items():
        if text is None:
            subprocess.run(["git", "rm", "-q", name], cwd=repo, check=True)
        else:
            (repo / name).write_text(text)
            subprocess.run(["git", "add", name], cwd=repo, check=True)
    subprocess.run(["git", "commit", "-qm", message], cwd=repo, check=True)
    return head(repo)


def head(repo: Path) -> str:
    out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, check=True, capture_output=True)
    return out.stdout.decode().strip()


def setup_cache_line(page: str) -> str:
    """The task page's line about the post-setup cache."""
    start = page.index('id="setup-cache">') + len('id="setup-cache">')
    return page[start : page.index("</p>", start)]


def snapshot_dirs(server: Server) -> list[Path]:
    root = server.app_state.settings.data_dir / "setup-cache"
    return sorted(p.parent for p in root.glob("*/*/ready"))


def test_second_task_resumes_the_snapshot_runs_maintenance_and_reset_or_new_setup_rerun(
    cache_server: Server, scripted_model: ScriptedModel, ignoring_repo: Path
) -> None:
    api = cache_server.api
    scripted_model.script = [Shell("cat node_modules/marker; cat ~/.setup-home"), Say("Seen.")]
    env = api.create_env(ignoring_repo, setup=SETUP, maintenance_setup=MAINTENANCE)
    assert env["cache_settings"]["post_setup_cache_enabled"] is True  # the default

    task1, turn1, first = run_task(api, env["id"])
    lines1 = setup_lines(api, task1, turn1)
    (ran,) = [line for line in lines1 if line.startswith("setup ran: ")]
    marker = ran.removeprefix("setup ran: ")
    assert len(marker) == 32
    assert marker in commands(first)[0][1]["content"]["parts"][0]
    (snap,) = snapshot_dirs(cache_server)
    assert (snap / "upper" / "node_modules" / "marker").read_text() == marker
    assert (snap.parent.parent.stat().st_mode & 0o777) == 0o700

    started = time.monotonic()
    task2, turn2, second = run_task(api, env["id"])
    took = time.monotonic() - started
    lines2 = setup_lines(api, task2, turn2)
    assert not any(line.startswith("setup ran") for line in lines2), lines2
    assert lines2[0].startswith("Resumed cached container from "), lines2
    assert f"maintenance ran: {marker} home-state" in lines2
    output = commands(second)[0][1]["content"]["parts"][0]
    assert marker in output and "home-state" in output  # the agent started on it
    assert took < 30
    assert snapshot_dirs(cache_server) == [snap]

    r = api.post(f"environments/{env['id']}/reset-cache")
    assert r.status_code in (200, 204), r.text
    task3, turn3, _ = run_task(api, env["id"])
    lines3 = setup_lines(api, task3, turn3)
    assert any(line.startswith("setup ran: ") for line in lines3), lines3
    assert not any(line.startswith("Resumed") for line in lines3)

    r = api.patch(f"environments/{env['id']}", json={"setup": [*SETUP, "echo changed"]})
    assert r.status_code == 200, r.text
    task4, turn4, _ = run_task(api, env["id"])
    lines4 = setup_lines(api, task4, turn4)
    assert "changed" in lines4 and any(line.startswith("setup ran: ") for line in lines4)
    task5, turn5, _ = run_task(api, env["id"])
    assert setup_lines(api, task5, turn5)[0].startswith("Resumed cached container")


def test_cache_off_runs_setup_every_time(
    cache_server: Server, scripted_model: ScriptedModel, ignoring_repo: Path
) -> None:
    api = cache_server.api
    scripted_model.script = [Say("Hi.")]
    env = api.create_env(
        ignoring_repo, setup=SETUP, cache_settings={"post_setup_cache_enabled": False}
    )
    for _ in range(2):
        task, turn, _ = run_task(api, env["id"])
        assert any(line.startswith("setup ran: ") for line in setup_lines(api, task, turn))
    assert snapshot_dirs(cache_server) == []


@pytest.fixture
def short_cache_server(tmp_path: Path, sqlite_url: str, scripted_model: Any) -> Iterator[Server]:
    yield from make_server(
        tmp_path,
        sqlite_url,
        **engine_settings(scripted_model, setup_cache_max_age_seconds=4),
    )


def test_expired_snapshots_are_not_used_and_go(
    short_cache_server: Server, scripted_model: ScriptedModel, ignoring_repo: Path
) -> None:
    api = short_cache_server.api
    scripted_model.script = [Say("Hi.")]
    env = api.create_env(ignoring_repo, setup=SETUP)
    run_task(api, env["id"])
    (old,) = snapshot_dirs(short_cache_server)
    time.sleep(4.5)
    task, turn, _ = run_task(api, env["id"])
    assert any(line.startswith("setup ran: ") for line in setup_lines(api, task, turn))
    (new,) = snapshot_dirs(short_cache_server)
    assert new != old and not old.exists()


def test_attempts_on_one_snapshot_see_neither_each_others_files_nor_can_change_it(
    cache_server: Server, scripted_model: ScriptedModel, ignoring_repo: Path
) -> None:
    api = cache_server.api
    scripted_model.script = [Say("Hi.")]
    env = api.create_env(ignoring_repo, setup=SETUP)
    run_task(api, env["id"])
    (snap,) = snapshot_dirs(cache_server)
    marker = (snap / "upper" / "node_modules" / "marker").read_text()

    # both attempts at once: each writes its own file and overwrites the marker, waits for
    # the other to have done the same, then looks for the other's writes; and each searches
    # the sandbox for the snapshot's directory
    scripted_model.script = [
        Shell(
            'me=$(head -c 8 /dev/urandom | od -An -tx1 | tr -d " \\n"); '
            'echo "$me" > node_modules/marker; echo "$me" > node_modules/own-$me; '
            'echo "$me" > ~/.setup-home; sleep 6; '
            'echo "me=$me"; ls node_modules; echo "marker=$(cat node_modules/marker)"; '
            'echo "home=$(cat ~/.setup-home)"; '
            f"find / -xdev -name {snap.name} 2>/dev/null | head -3; echo searched"
        ),
        Say("Done."),
    ]
    created = [api.create_task(env["id"], f"Attempt {i}") for i in range(2)]
    outputs = []
    for c in created:
        turn = wait_for_task(api, c["task"]["id"])["current_assistant_turn"]
        assert turn["turn_status"] == "completed", turn["error"]
        lines = setup_lines(api, c["task"]["id"], c["turn"]["id"])
        assert lines[0].startswith("Resumed cached container"), lines
        ran = commands(turn)
        assert ran, turn["output_items"]
        outputs.append(ran[0][1]["content"]["parts"][0])
    for out in outputs:
        me = next(line for line in out.splitlines() if line.startswith("me=")).removeprefix("me=")
        owns = [line for line in out.splitlines() if line.startswith("own-")]
        assert owns == [f"own-{me}"], out  # only its own file
        assert f"marker={me}" in out
        assert f"home={me}" in out  # its own home
        assert snap.name not in out.replace(f"-name {snap.name}", "")
    assert (snap / "upper" / "node_modules" / "marker").read_text() == marker
    assert sorted(p.name for p in (snap / "upper" / "node_modules").iterdir()) == ["marker"]
    assert (snap / "home" / ".setup-home").read_text() == "home-state\n"


def test_a_moved_branch_resumes_the_snapshot_and_checks_out_only_the_new_commit(
    cache_server: Server, scripted_model: ScriptedModel, ignoring_repo: Path
) -> None:
    api = cache_server.api
    scripted_model.script = [Say("Hi.")]
    env = api.create_env(ignoring_repo, setup=SETUP, maintenance_setup=MAINTENANCE)
    old = head(ignoring_repo)
    task1, turn1, first = run_task(api, env["id"])
    (ran,) = [line for line in setup_lines(api, task1, turn1) if line.startswith("setup ran: ")]
    marker = ran.removeprefix("setup ran: ")
    (snap,) = snapshot_dirs(cache_server)

    new = commit(
        ignoring_repo,
        {"NEW.md": "from the new commit\n", "calc.py": "def add(a, b):\n    return a + b\n"},
        "move the branch",
    )
    scripted_model.script = [
        Shell(
            "cat NEW.md calc.py node_modules/marker; echo; git rev-parse HEAD; "
            "git status --porcelain; echo status-end; git rev-parse origin/main"
        ),
        Shell("echo agent > AGENT.md"),
        Say("Seen."),
    ]
    task2, turn2, second = run_task(api, env["id"])
    lines = setup_lines(api, task2, turn2)
    assert not any(line.startswith("setup ran") for line in lines), lines
    assert lines[0].startswith("Resumed cached container from "), lines
    assert f"(commit {old[:7]}→{new[:7]}, setup script not run)" in lines[0], lines
    assert f"maintenance ran: {marker} home-state" in lines
    out = commands(second)[0][1]["content"]["parts"][0]
    assert "from the new commit" in out and "return a + b" in out  # the new commit's files
    assert marker in out  # what setup installed (ignored) is there
    assert out.count(new) == 2, out  # HEAD and origin/main are the new commit
    status = out.split(new, 1)[1].split("status-end")[0]
    assert status.strip() == "", out  # nothing changed against it
    diff = diff_of(api.get(f"tasks/{task2}").json())
    assert "AGENT.md" in diff and "NEW.md" not in diff and "calc.py" not in diff, diff
    assert {k: v for k, v in second["setup_cache"].items() if v is not None} == {
        "used": True,
        "created": first["setup_cache"]["created"],
        "commit": old,
        "checked_out": new,
        "maintenance": True,
    }
    assert first["setup_cache"]["saved"] is True and first["setup_cache"]["commit"] == old
    # the web task page and `wham task show` say so
    resumed = f"(commit {old[:7]}→{new[:7]}, setup script not run); ran maintenance script"
    client = cache_server.api.client
    sign_in(client, cache_server.api.token or "")
    shown = setup_cache_line(client.get(f"/tasks/{task2}").text)
    assert shown.startswith("Resumed cached container from ") and shown.endswith(resumed)
    shown = setup_cache_line(client.get(f"/tasks/{task1}").text)
    assert shown.startswith("Ran setup script; container cached for later attempts ("), shown
    details = TaskDetails.model_validate(api.get(f"tasks/{task2}").json())
    assert details.current_assistant_turn is not None
    lines = render.details_lines(details, [details.current_assistant_turn], "url")
    assert any("Resumed cached container from " in x and resumed in x for x in lines), lines
    assert snapshot_dirs(cache_server) == [snap]  # the same snapshot, not a second setup
    # the snapshot itself is still the old commit's
    assert not (snap / "upper" / "NEW.md").exists()


TRACKED_SETUP = [
    "sleep 1",
    "mkdir -p node_modules && echo installed > node_modules/marker",
    "echo setup-a >> a.txt",
    "echo setup-b >> b.txt",
    "echo setup ran",
]


def test_after_a_moved_branch_the_new_commits_win_where_setup_changed_the_same_tracked_file(
    cache_server: Server, scripted_model: ScriptedModel, ignoring_repo: Path
) -> None:
    """The decision for tracked files the setup script changed (docs/ARCHITECTURE.md): as in
    a kept container they keep the change, unless the new commits change them too."""
    api = cache_server.api
    commit(ignoring_repo, {"a.txt": "a\n", "b.txt": "b\n", "gone.txt": "x\n"}, "files")
    scripted_model.script = [Say("Hi.")]
    env = api.create_env(ignoring_repo, setup=TRACKED_SETUP)
    run_task(api, env["id"])
    commit(ignoring_repo, {"b.txt": "b2\n", "gone.txt": None}, "change b")
    scripted_model.script = [
        Shell("cat a.txt b.txt node_modules/marker; ls gone.txt; true"),
        Say("Seen."),
    ]
    task, turn, second = run_task(api, env["id"])
    lines = setup_lines(api, task, turn)
    assert lines[0].startswith("Resumed cached container from "), lines
    assert "Dropped the setup script's change to b.txt: the new commits change it" in lines
    assert not any("a.txt" in line for line in lines)
    out = commands(second)[0][1]["content"]["parts"][0]
    assert "a\nsetup-a\nb2\ninstalled" in out, out
    assert "No such file" in out  # deleted by the new commit


FOLLOW_SETUP = [
    *SETUP,
    "echo built > BUILD_INFO",  # untracked, not ignored: in the first attempt's diff
    "echo setup-line >> README.md",  # a tracked file: in the first attempt's diff too
]


def test_a_follow_up_resumes_the_snapshot_with_the_earlier_attempts_change(
    cache_server: Server, scripted_model: ScriptedModel, ignoring_repo: Path
) -> None:
    api = cache_server.api
    env = api.create_env(ignoring_repo, setup=FOLLOW_SETUP, maintenance_setup=MAINTENANCE)
    scripted_model.script = [Shell("echo first > NOTES.md"), Say("Wrote notes.")]
    task, turn1, _ = run_task(api, env["id"])
    (ran,) = [line for line in setup_lines(api, task, turn1) if line.startswith("setup ran: ")]
    marker = ran.removeprefix("setup ran: ")
    (snap,) = snapshot_dirs(cache_server)

    scripted_model.script = [
        Say("(not reached)"),  # the resumed conversation brings the first attempt's output
        Shell("cat NOTES.md node_modules/marker BUILD_INFO README.md; echo more >> NOTES.md"),
        Say("Seen."),
    ]
    out = api.follow_up(task, turn1, "Add more.")
    turn2 = out["turn"]["id"]
    second = wait_for_task(api, task)["current_assistant_turn"]
    assert second["id"] == turn2 and second["turn_status"] == "completed", second["error"]
    lines = setup_lines(api, task, turn2)
    assert not any(line.startswith("setup ran") for line in lines), lines
    assert lines[0].startswith("Resumed cached container from "), lines
    assert f"maintenance ran: {marker} home-state" in lines
    shown = commands(second)[0][1]["content"]["parts"][0]
    # the first attempt's change (with setup's non-ignored files once, not twice) on the
    # snapshot's installs
    assert f"first\n{marker}built\n# widgets\nsetup-line\n" in shown, shown
    diff = diff_of(api.get(f"tasks/{task}").json())
    assert "+first\n+more" in diff and "BUILD_INFO" in diff, diff
    assert diff.count("+setup-line") == 1, diff
    assert "node_modules" not in diff
    assert second["setup_cache"]["used"] is True
    assert snapshot_dirs(cache_server) == [snap]


def test_a_filter_the_setup_script_configured_never_runs_on_the_host(
    cache_server: Server, scripted_model: ScriptedModel, ignoring_repo: Path, tmp_path: Path
) -> None:
    """The attack: setup leaves a filter driver in .git/config and .git/info/attributes; the
    previous attempt's change (a follow-up) and a starting diff are applied over the snapshot,
    and host git would run the driver as the server's user (root)."""
    ran = tmp_path / "filter-ran"
    driver = f"touch {ran}; cat"
    setup = [
        *SETUP,
        f"git config filter.evil.clean '{driver}'",
        f"git config filter.evil.smudge '{driver}'",
        "echo '* filter=evil' > .git/info/attributes",
    ]
    api = cache_server.api
    env = api.create_env(ignoring_repo, setup=setup)
    scripted_model.script = [Shell("echo first > NOTES.md"), Say("Wrote notes.")]
    task, turn1, _ = run_task(api, env["id"])
    assert snapshot_dirs(cache_server)
    assert not ran.exists()

    scripted_model.script = [Say("(not reached)"), Shell("cat NOTES.md"), Say("Seen.")]
    turn2 = api.follow_up(task, turn1, "Again.")["turn"]["id"]
    second = wait_for_task(api, task)["current_assistant_turn"]
    assert second["id"] == turn2 and second["turn_status"] == "completed", second["error"]
    assert setup_lines(api, task, turn2)[0].startswith("Resumed cached container")
    assert "first" in commands(second)[0][1]["content"]["parts"][0]

    patch = (
        "diff --git a/PATCHED.md b/PATCHED.md\nnew file mode 100644\n"
        "--- /dev/null\n+++ b/PATCHED.md\n@@ -0,0 +1 @@\n+patched\n"
    )
    scripted_model.script = [Shell("cat PATCHED.md"), Say("Seen.")]
    text = {"content_type": "text", "text": "Look"}
    created = api.create_task(
        env["id"],
        "Look",
        input_items=[
            {"type": "message", "role": "user", "content": [text]},
            {"type": "pre_apply_patch", "output_diff": {"diff": patch}},
        ],
    )
    third = wait_for_task(api, created["task"]["id"])["current_assistant_turn"]
    assert third["turn_status"] == "completed", third["error"]
    lines = setup_lines(api, created["task"]["id"], created["turn"]["id"])
    assert lines[0].startswith("Resumed cached container"), lines
    assert "patched" in commands(third)[0][1]["content"]["parts"][0]
    assert not ran.exists()


# ---------------------------------------------------------------- standbys from the snapshot

STANDBY_MAINTENANCE = [
    'echo "maintenance ran: $(cat node_modules/marker) $(cat ~/.setup-home) ${#API_TOKEN}"',
    "echo maintained > node_modules/maintained",
]
AGENT_LOOKS = (
    "cat node_modules/marker; echo; cat ~/.setup-home node_modules/maintained; "
    'echo "var=$MY_VAR token=${API_TOKEN:-none}"'
)


@pytest.fixture
def standby_cache_server(tmp_path: Path, sqlite_url: str, scripted_model: Any) -> Iterator[Server]:
    yield from make_server(
        tmp_path, sqlite_url, **engine_settings(scripted_model, standby_sandboxes=1)
    )


def wait_standby(server: Server, timeout: float = 60.0) -> None:
    """Wait until a standby is ready and none is being prepared."""
    runner = server.app_state.runner
    assert runner is not None and runner.engine is not None
    pool = runner.engine.standby
    deadline = time.monotonic() + timeout
    while len(pool) < 1 or pool.busy:
        assert time.monotonic() < deadline, "no standby sandbox was prepared"
        time.sleep(0.05)


def turn_body(server: Server, turn_id: str) -> dict[str, Any]:
    from openwham.store import models as m

    with server.app_state.db.session() as s:
        turn = s.get(m.Turn, turn_id)
        assert turn is not None
        return dict(turn.body)


def took_standby(server: Server, turn_id: str) -> bool:
    return bool(turn_body(server, turn_id)["run"]["standby"])


def before_the_prompt(api: Any, task_id: str, turn_id: str) -> list[str]:
    """The status and setup-log lines the turn's events have before the prompt's work-log
    entry (its first)."""
    seen: list[str] = []
    for frame in stream(api, task_id, turn_id):
        kind, payload = frame["data"]["item_type"], frame["data"]["payload"]
        if kind == "work_log_message":
            assert payload["author"]["role"] == "user", payload
            return seen
        if kind == "task_turn_event":
            seen.append(payload["text"])
        elif kind == "log" and "key" in payload:
            seen.append(payload["line"])
    raise AssertionError("no work-log message")


def test_the_second_task_takes_a_standby_started_from_the_snapshot(
    standby_cache_server: Server, scripted_model: ScriptedModel, ignoring_repo: Path
) -> None:
    """Setup not run, the maintenance script run (with the secret) when the standby was
    prepared, the marker and the maintenance script's file there, the agent started with the
    variables and without the secret; reset-cache and a changed setup script then make the
    next task run setup again, never taking the standby of the invalidated snapshot."""
    server = standby_cache_server
    api = server.api
    scripted_model.script = [Shell(AGENT_LOOKS), Say("Seen.")]
    env = api.create_env(
        ignoring_repo,
        setup=SETUP,
        maintenance_setup=STANDBY_MAINTENANCE,
        env_vars={"MY_VAR": "plain-value"},
        secrets={"API_TOKEN": "s3cret-token-value"},
    )
    task1, turn1, _ = run_task(api, env["id"])
    assert not took_standby(server, turn1)
    (ran,) = [line for line in setup_lines(api, task1, turn1) if line.startswith("setup ran: ")]
    marker = ran.removeprefix("setup ran: ")
    assert ran in before_the_prompt(api, task1, turn1)  # a cold start's order
    (snap,) = snapshot_dirs(server)
    wait_standby(server)
    # the maintenance script ran in the standby, on its own upper directory
    assert not (snap / "upper" / "node_modules" / "maintained").exists()

    task2, turn2, second = run_task(api, env["id"])
    assert took_standby(server, turn2)
    lines = setup_lines(api, task2, turn2)
    assert not any(line.startswith("setup ran") for line in lines), lines
    assert lines[0].startswith("Resumed cached container from "), lines
    assert "(setup script not run)" in lines[0]
    assert any(line.endswith("when this sandbox was prepared in advance") for line in lines)
    assert f"maintenance ran: {marker} home-state 18" in lines, lines
    # recorded before the prompt's entry, as on a cold start (the prompt was sent first)
    early = before_the_prompt(api, task2, turn2)
    assert lines[0] in early and "Ran maintenance script" in early, early
    assert f"maintenance ran: {marker} home-state 18" in early, early
    out = commands(second)[0][1]["content"]["parts"][0]
    assert marker in out and "home-state" in out and "maintained" in out, out
    assert "var=plain-value token=none" in out, out
    body = turn_body(server, turn2)
    assert body["setup_cache"]["used"] is True and body["setup_cache"]["maintenance"] is True
    assert snapshot_dirs(server) == [snap]
    assert not (snap / "upper" / "node_modules" / "maintained").exists()

    wait_standby(server)  # the next one, from the same snapshot
    r = api.post(f"environments/{env['id']}/reset-cache")
    assert r.status_code in (200, 204), r.text
    task3, turn3, third = run_task(api, env["id"])
    assert not took_standby(server, turn3)
    lines3 = setup_lines(api, task3, turn3)
    assert any(line.startswith("setup ran: ") for line in lines3), lines3
    assert not any(line.startswith("Resumed") for line in lines3), lines3
    assert marker not in commands(third)[0][1]["content"]["parts"][0]  # setup's new marker

    wait_standby(server)  # from the new snapshot
    r = api.patch(f"environments/{env['id']}", json={"setup": [*SETUP, "echo changed"]})
    assert r.status_code == 200, r.text
    task4, turn4, _ = run_task(api, env["id"])
    assert not took_standby(server, turn4)
    lines4 = setup_lines(api, task4, turn4)
    assert "changed" in lines4 and any(line.startswith("setup ran: ") for line in lines4)

    wait_standby(server)
    task5, turn5, _ = run_task(api, env["id"])
    assert took_standby(server, turn5)
    assert "changed" not in setup_lines(api, task5, turn5)


@pytest.fixture
def short_standby_cache_server(
    tmp_path: Path, sqlite_url: str, scripted_model: Any
) -> Iterator[Server]:
    yield from make_server(
        tmp_path,
        sqlite_url,
        **engine_settings(scripted_model, standby_sandboxes=1, setup_cache_max_age_seconds=6),
    )


def test_a_standby_is_not_served_once_its_snapshot_expired(
    short_standby_cache_server: Server, scripted_model: ScriptedModel, ignoring_repo: Path
) -> None:
    server = short_standby_cache_server
    api = server.api
    scripted_model.script = [Say("Hi.")]
    env = api.create_env(ignoring_repo, setup=SETUP)
    run_task(api, env["id"])
    (old,) = snapshot_dirs(server)
    wait_standby(server)
    created = float((old / "ready").read_text().split('"created":')[1].split(",")[0])
    time.sleep(max(0.0, created + 6.5 - time.time()))
    task, turn, _ = run_task(api, env["id"])
    assert not took_standby(server, turn)
    assert any(line.startswith("setup ran: ") for line in setup_lines(api, task, turn))


# ------------------------------------------------------------------- clone workspaces


@pytest.fixture
def clone_cache_server(tmp_path: Path, sqlite_url: str, scripted_model: Any) -> Iterator[Server]:
    yield from make_server(
        tmp_path, sqlite_url, **engine_settings(scripted_model, workspace_overlay=False)
    )


def test_clone_workspaces_resume_a_copied_snapshot_at_a_moved_branch(
    clone_cache_server: Server, scripted_model: ScriptedModel, ignoring_repo: Path
) -> None:
    """Without overlay workspaces (WHAM_WORKSPACE_OVERLAY=false, a server that is not root)
    the snapshot is a copy of the workspace, copied back per attempt."""
    api = clone_cache_server.api
    env = api.create_env(ignoring_repo, setup=SETUP, maintenance_setup=MAINTENANCE)
    scripted_model.script = [Say("Hi.")]
    old = head(ignoring_repo)
    task1, turn1, first = run_task(api, env["id"])
    (ran,) = [line for line in setup_lines(api, task1, turn1) if line.startswith("setup ran: ")]
    marker = ran.removeprefix("setup ran: ")
    assert first["setup_cache"]["saved"] is True
    (snap,) = snapshot_dirs(clone_cache_server)
    assert (snap / "tree" / "node_modules" / "marker").read_text() == marker
    assert not (snap / "upper").exists()

    new = commit(ignoring_repo, {"NEW.md": "from the new commit\n"}, "move the branch")
    scripted_model.script = [
        Shell(
            "cat NEW.md node_modules/marker ~/.setup-home; git rev-parse HEAD; "
            "git status --porcelain; echo status-end; echo agent > node_modules/marker"
        ),
        Say("Seen."),
    ]
    task2, turn2, second = run_task(api, env["id"])
    lines = setup_lines(api, task2, turn2)
    assert not any(line.startswith("setup ran") for line in lines), lines
    assert f"(commit {old[:7]}→{new[:7]}, setup script not run)" in lines[0], lines
    assert f"maintenance ran: {marker} home-state" in lines
    out = commands(second)[0][1]["content"]["parts"][0]
    assert f"from the new commit\n{marker}home-state\n{new}\nstatus-end" in out, out
    assert diff_of(api.get(f"tasks/{task2}").json()) == ""
    # the attempt wrote over its copy, not over the snapshot
    assert (snap / "tree" / "node_modules" / "marker").read_text() == marker
    assert snapshot_dirs(clone_cache_server) == [snap]


def test_a_task_on_another_branch_resumes_the_snapshot_on_that_branch(
    cache_server: Server, scripted_model: ScriptedModel, ignoring_repo: Path
) -> None:
    """The key holds no branch either: a task on another branch of the repository resumes
    the snapshot taken on main, checked out on its own branch, with its upstream."""
    api = cache_server.api
    env = api.create_env(ignoring_repo, setup=SETUP)
    scripted_model.script = [Say("Hi.")]
    run_task(api, env["id"])
    (snap,) = snapshot_dirs(cache_server)
    subprocess.run(["git", "checkout", "-qb", "topic"], cwd=ignoring_repo, check=True)
    topic = commit(ignoring_repo, {"TOPIC.md": "on topic\n"}, "topic work")
    subprocess.run(["git", "checkout", "-q", "main"], cwd=ignoring_repo, check=True)

    scripted_model.script = [
        Shell(
            "cat TOPIC.md node_modules/marker; echo; git rev-parse --abbrev-ref HEAD "
            "'@{upstream}'; git rev-parse HEAD origin/topic; git status --porcelain; echo end"
        ),
        Say("Seen."),
    ]
    created = api.create_task(env["id"], "Look", new_task={"branch": "topic"})
    task = created["task"]["id"]
    turn = wait_for_task(api, task)["current_assistant_turn"]
    assert turn["turn_status"] == "completed", turn["error"]
    lines = setup_lines(api, task, created["turn"]["id"])
    assert lines[0].startswith("Resumed cached container from "), lines
    assert not any(line.startswith("setup ran") for line in lines), lines
    out = commands(turn)[0][1]["content"]["parts"][0]
    marker = (snap / "upper" / "node_modules" / "marker").read_text()
    assert f"on topic\n{marker}\ntopic\norigin/topic\n{topic}\n{topic}\nend" in out, out
    assert turn["base_commit_sha"] == topic
    assert diff_of(api.get(f"tasks/{task}").json()) == ""
    assert snapshot_dirs(cache_server) == [snap]


def test_a_follow_up_whose_change_does_not_fit_the_snapshot_runs_setup_instead(
    cache_server: Server, scripted_model: ScriptedModel, ignoring_repo: Path
) -> None:
    """The first attempt un-ignored node_modules/, so its change adds the file the snapshot
    holds as ignored: over the snapshot it does not apply, and the follow-up starts as without
    a cache (the change on a fresh checkout, then the setup script) instead of failing."""
    api = cache_server.api
    env = api.create_env(ignoring_repo, setup=SETUP)
    scripted_model.script = [Shell(": > .gitignore"), Say("Un-ignored.")]
    task, turn1, first = run_task(api, env["id"])
    assert first["setup_cache"]["saved"] is True
    scripted_model.script = [Say("(not reached)"), Shell("cat node_modules/marker"), Say("Ok.")]
    turn2 = api.follow_up(task, turn1, "Again.")["turn"]["id"]
    second = wait_for_task(api, task)["current_assistant_turn"]
    assert second["id"] == turn2 and second["turn_status"] == "completed", second["error"]
    lines = setup_lines(api, task, turn2)
    assert any(line.startswith("setup ran: ") for line in lines), lines
    assert not any(line.startswith("Resumed") for line in lines), lines
    assert second["setup_cache"] == {**second["setup_cache"], "used": False, "saved": False}


@pytest.fixture
def clone_standby_server(tmp_path: Path, sqlite_url: str, scripted_model: Any) -> Iterator[Server]:
    yield from make_server(
        tmp_path,
        sqlite_url,
        **engine_settings(scripted_model, workspace_overlay=False, standby_sandboxes=1),
    )


def test_clone_workspaces_get_standbys_from_the_copied_snapshot(
    clone_standby_server: Server, scripted_model: ScriptedModel, ignoring_repo: Path
) -> None:
    server = clone_standby_server
    api = server.api
    env = api.create_env(ignoring_repo, setup=SETUP, maintenance_setup=MAINTENANCE)
    scripted_model.script = [Say("Hi.")]
    task1, turn1, _ = run_task(api, env["id"])
    (ran,) = [line for line in setup_lines(api, task1, turn1) if line.startswith("setup ran: ")]
    marker = ran.removeprefix("setup ran: ")
    assert ran in before_the_prompt(api, task1, turn1)  # a cold start's order
    (snap,) = snapshot_dirs(server)
    wait_standby(server)
    scripted_model.script = [Shell("cat node_modules/marker ~/.setup-home"), Say("Seen.")]
    task2, turn2, second = run_task(api, env["id"])
    assert took_standby(server, turn2)
    lines = setup_lines(api, task2, turn2)
    assert lines[0].startswith("Resumed cached container from "), lines
    assert f"maintenance ran: {marker} home-state" in lines, lines
    assert f"{marker}home-state" in commands(second)[0][1]["content"]["parts"][0]
    assert snapshot_dirs(server) == [snap] and (snap / "tree").is_dir()


def test_reset_cache_removes_the_old_snapshot_at_once_unless_a_sandbox_holds_it(
    standby_cache_server: Server, scripted_model: ScriptedModel, ignoring_repo: Path
) -> None:
    """The environment's standby started from the snapshot is dropped and the snapshot
    removed by the reset itself; a snapshot an attempt's agent runs on stays (and the
    attempt completes on it)."""
    server = standby_cache_server
    api = server.api
    scripted_model.script = [Say("Hi.")]
    env = api.create_env(ignoring_repo, setup=SETUP)
    _, turn1, _ = run_task(api, env["id"])
    (snap,) = snapshot_dirs(server)
    runner = server.app_state.runner
    assert runner is not None and runner.engine is not None
    workspace = runner.engine.attempts_root / turn1 / "workspace"
    deadline = time.monotonic() + 30
    while workspace.exists():  # the attempt's sandbox is gone (it held the lease until then)
        assert time.monotonic() < deadline
        time.sleep(0.02)
    wait_standby(server)  # holds the snapshot's lease
    r = api.post(f"environments/{env['id']}/reset-cache")
    assert r.status_code in (200, 204), r.text
    assert not snap.exists() and snapshot_dirs(server) == []
    assert len(runner.engine.standby) == 0

    scripted_model.script = [Shell("sleep 5; cat node_modules/marker"), Say("Seen.")]
    created = api.create_task(env["id"], "Look")
    deadline = time.monotonic() + 60
    while not snapshot_dirs(server):  # setup done, the snapshot taken, the agent starting
        assert time.monotonic() < deadline, "no snapshot was taken"
        time.sleep(0.05)
    (held,) = snapshot_dirs(server)
    time.sleep(1.5)
    r = api.post(f"environments/{env['id']}/reset-cache")
    assert r.status_code in (200, 204), r.text
    assert held.exists()
    turn = wait_for_task(api, created["task"]["id"])["current_assistant_turn"]
    assert turn["turn_status"] == "completed", turn["error"]
    marker = (held / "upper" / "node_modules" / "marker").read_text()
    assert marker in commands(turn)[0][1]["content"]["parts"][0]


def test_the_environment_pages_reset_cache_removes_the_old_snapshot_at_once(
    standby_cache_server: Server, scripted_model: ScriptedModel, ignoring_repo: Path
) -> None:
    """The web UI's "Reset cache" form does what the API route does (the snapshot and its
    standby go at once), under the rules of the UI's other forms: the session's CSRF token,
    a signed-in session, an environment of the session's account; refused, nothing changes."""
    server = standby_cache_server
    api = server.api
    scripted_model.script = [Say("Hi.")]
    env = api.create_env(ignoring_repo, setup=SETUP)
    _, turn1, _ = run_task(api, env["id"])
    (snap,) = snapshot_dirs(server)
    runner = server.app_state.runner
    assert runner is not None and runner.engine is not None
    workspace = runner.engine.attempts_root / turn1 / "workspace"
    deadline = time.monotonic() + 30
    while workspace.exists():  # the attempt's sandbox is gone (it held the lease until then)
        assert time.monotonic() < deadline
        time.sleep(0.02)
    wait_standby(server)

    def invalidation_key() -> str:
        got = api.get(f"environments/{env['id']}").json()["cache_settings"]
        return str(got["cache_invalidation_key"])

    key = invalidation_key()
    path = f"/environments/{env['id']}/reset-cache"
    client = api.client
    csrf = sign_in(client, api.token or "")

    def new_client() -> httpx.Client:
        return httpx.Client(transport=client._transport, base_url=str(client.base_url))

    other_session = csrf_of(new_client().get("/login").text)
    for token in (other_session, "forged", None):
        data = {"reset": "1"} | ({"csrf": token} if token else {})
        r = client.post(path, data=data, follow_redirects=False)
        assert r.status_code == 403, r.text
        assert "expired or came from another site" in r.text
    signed_out = new_client()
    r = signed_out.post(
        path, data={"csrf": csrf_of(signed_out.get("/login").text)}, follow_redirects=False
    )
    assert r.status_code == 401, r.text
    stranger = new_client()
    stranger_csrf = sign_in(stranger, server.other_account_token())
    r = stranger.post(path, data={"csrf": stranger_csrf}, follow_redirects=False)
    assert r.status_code == 404, r.text
    assert snap.exists() and len(runner.engine.standby) == 1 and invalidation_key() == key

    r = client.post(path, data={"csrf": csrf}, follow_redirects=False)
    assert r.status_code == 303, r.text
    assert r.headers["location"] == f"/environments/{env['id']}?saved=1"
    assert not snap.exists() and snapshot_dirs(server) == []
    assert len(runner.engine.standby) == 0
    assert invalidation_key() != key
    task2, turn2, _ = run_task(api, env["id"])
    assert any(line.startswith("setup ran: ") for line in setup_lines(api, task2, turn2))


def test_a_changed_environment_loses_its_old_snapshot_at_once_and_a_resent_secret_is_no_change(
    standby_cache_server: Server, scripted_model: ScriptedModel, ignoring_repo: Path
) -> None:
    """In-process: an update that changes nothing the snapshot depends on (a label, a secret
    sent again with the value it holds) keeps the snapshot and its standby, and the next task
    resumes it; a secret's new value removes both as the PATCH returns (not at the next
    attempt or on expiry), and so does deleting the environment."""
    from openwham.store import models as m

    server = standby_cache_server
    api = server.api
    runner = server.app_state.runner
    assert runner is not None and runner.engine is not None
    scripted_model.script = [Say("Hi.")]
    env = api.create_env(ignoring_repo, setup=SETUP, secrets={"API_TOKEN": "first-value"})

    def sealed() -> str:
        with server.app_state.db.session() as s:
            row = s.get(m.Environment, env["id"])
            assert row is not None
            return str(row.secrets["API_TOKEN"])

    def settled(turn_id: str) -> None:
        """The attempt's sandbox is gone (it held the snapshot's lease until then) and the
        standby from the snapshot is ready."""
        workspace = runner.engine.attempts_root / turn_id / "workspace"
        deadline = time.monotonic() + 30
        while workspace.exists():
            assert time.monotonic() < deadline
            time.sleep(0.02)
        wait_standby(server)

    _, turn1, _ = run_task(api, env["id"])
    (snap,) = snapshot_dirs(server)
    settled(turn1)
    token = sealed()
    for change in ({"label": "renamed"}, {"secrets": {"API_TOKEN": "first-value"}}):
        r = api.patch(f"environments/{env['id']}", json=change)
        assert r.status_code == 200, r.text
        assert snapshot_dirs(server) == [snap] and len(runner.engine.standby) == 1, change
    assert sealed() == token  # the same value keeps its sealed token
    task2, turn2, _ = run_task(api, env["id"])
    assert took_standby(server, turn2)
    assert setup_lines(api, task2, turn2)[0].startswith("Resumed cached container")

    settled(turn2)
    r = api.patch(f"environments/{env['id']}", json={"secrets": {"API_TOKEN": "second-value"}})
    assert r.status_code == 200, r.text
    assert sealed() != token
    assert not snap.exists() and snapshot_dirs(server) == []
    assert len(runner.engine.standby) == 0
    task3, turn3, _ = run_task(api, env["id"])
    assert any(line.startswith("setup ran: ") for line in setup_lines(api, task3, turn3))
    (snap3,) = snapshot_dirs(server)

    settled(turn3)
    r = api.delete(f"environments/{env['id']}")
    assert r.status_code == 204, r.text
    assert not snap3.exists() and snapshot_dirs(server) == []
    assert len(runner.engine.standby) == 0
