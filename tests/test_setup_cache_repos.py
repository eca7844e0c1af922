"""The post-setup cache of a multi-repository environment, with real bubblewrap, git and the
Codex CLI against the scripted model: one snapshot covers the whole workspace (every
repository, what setup installed in each, the home); a later attempt resumes it with each
repository checked out at its own commit on top, and a follow-up with each repository's
earlier change; standby sandboxes are started from it, and one is taken only while every
repository is still where a new task would start."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import Server, diff_of, engine_settings, git, make_repo, make_server, wait_for_task
from support.scripted_model import Say, ScriptedModel, Shell
from test_engine import commands
from test_setup_cache import (
    run_task,
    setup_lines,
    snapshot_dirs,
    took_standby,
    turn_body,
    wait_standby,
)

pytestmark = pytest.mark.sandbox

SETUP = [
    "sleep 2",
    "for d in widgets gadgets; do mkdir -p $d/node_modules; "
    "head -c 8 /dev/urandom | od -An -tx1 | tr -d ' \\n' > $d/node_modules/marker; done",
    "echo home-state > ~/.setup-home",
    'echo "setup ran: $(cat widgets/node_modules/marker)-$(cat gadgets/node_modules/marker)"',
]
MAINTENANCE = [
    'echo "maintenance ran: $(cat widgets/node_modules/marker)-'
    '$(cat gadgets/node_modules/marker) $(cat ~/.setup-home)"'
]


@pytest.fixture
def cache_server(tmp_path: Path, sqlite_url: str, scripted_model: Any) -> Iterator[Server]:
    yield from make_server(tmp_path, sqlite_url, **engine_settings(scripted_model))


@pytest.fixture
def remotes(tmp_path: Path) -> tuple[Path, Path]:
    """Two bare repositories that ignore ``node_modules/``: ``widgets.git`` on ``main``,
    ``gadgets.git`` on ``trunk``."""
    found = []
    for name, branch in (("widgets", "main"), ("gadgets", "trunk")):
        work = make_repo(tmp_path / f"{name}-work")
        git("branch", "-m", branch, cwd=work)
        (work / ".gitignore").write_text("node_modules/\n")
        git("add", ".gitignore", cwd=work)
        git("commit", "-q", "-m", "ignore node_modules", cwd=work)
        remote = tmp_path / f"{name}.git"
        git("clone", "-q", "--bare", str(work), str(remote), cwd=tmp_path)
        git("remote", "add", "origin", str(remote), cwd=work)
        found.append(remote)
    return found[0], found[1]


def advance(remote: Path, branch: str, name: str, text: str) -> tuple[str, str]:
    """A new commit adding ``name`` pushed to ``remote``'s ``branch``: (old, new) heads."""
    work = remote.parent / f"{remote.stem}-work"
    old = git("rev-parse", "HEAD", cwd=work).strip()
    (work / name).write_text(text)
    git("add", name, cwd=work)
    git("commit", "-q", "-m", f"add {name}", cwd=work)
    git("push", "-q", "origin", branch, cwd=work)
    return old, git("rev-parse", "HEAD", cwd=work).strip()


def make_env(server: Server, remotes: tuple[Path, Path]) -> dict[str, Any]:
    widgets, gadgets = remotes
    r = server.api.post(
        "environments",
        json={
            "label": "two",
            "repos": [str(widgets), {"url": str(gadgets), "default_branch": "trunk"}],
            "setup": SETUP,
            "maintenance_setup": MAINTENANCE,
        },
    )
    assert r.status_code == 201, r.text
    return dict(r.json())


def markers_of(lines: list[str]) -> str:
    (ran,) = [line for line in lines if line.startswith("setup ran: ")]
    return ran.removeprefix("setup ran: ")


def test_one_snapshot_covers_every_repository_and_each_checks_out_its_own_commit_on_top(
    cache_server: Server, scripted_model: ScriptedModel, remotes: tuple[Path, Path]
) -> None:
    api = cache_server.api
    env = make_env(cache_server, remotes)
    scripted_model.script = [Say("Hi.")]
    task1, turn1, first = run_task(api, env["id"])
    markers = markers_of(setup_lines(api, task1, turn1))
    widgets_marker, gadgets_marker = markers.split("-")
    assert first["setup_cache"]["saved"] is True, first["setup_cache"]
    (snap,) = snapshot_dirs(cache_server)
    for name, marker in (("widgets", widgets_marker), ("gadgets", gadgets_marker)):
        assert (snap / "tree" / name / "node_modules" / "marker").read_text() == marker
    meta = json.loads((snap / "ready").read_text())
    assert [(r["dir"], r["branch"]) for r in meta["repos"]] == [
        ("widgets", "main"),
        ("gadgets", "trunk"),
    ]

    # both branches move, each in its own repository
    w_old, w_new = advance(remotes[0], "main", "NEW.md", "widgets moved\n")
    g_old, g_new = advance(remotes[1], "trunk", "OTHER.md", "gadgets moved\n")
    scripted_model.script = [
        Shell(
            "cat widgets/NEW.md gadgets/OTHER.md; "
            "cat widgets/node_modules/marker; echo; cat gadgets/node_modules/marker; echo; "
            "cat ~/.setup-home; git -C widgets rev-parse HEAD; git -C gadgets rev-parse HEAD; "
            "git -C gadgets rev-parse --abbrev-ref HEAD; git -C gadgets status --porcelain; "
            "echo status-end; echo agent > gadgets/node_modules/marker"
        ),
        Say("Seen."),
    ]
    task2, turn2, second = run_task(api, env["id"])
    lines = setup_lines(api, task2, turn2)
    assert not any(line.startswith("setup ran") for line in lines), lines
    assert lines[0].startswith("Resumed cached container from "), lines
    moved = f"commits widgets {w_old[:7]}→{w_new[:7]}, gadgets {g_old[:7]}→{g_new[:7]}, "
    assert moved in lines[0], lines
    assert f"maintenance ran: {markers} home-state" in lines, lines
    out = commands(second)[0][1]["content"]["parts"][0]
    expected = (
        f"widgets moved\ngadgets moved\n{widgets_marker}\n{gadgets_marker}\nhome-state\n"
        f"{w_new}\n{g_new}\ntrunk\nstatus-end"
    )
    assert expected in out, out
    assert second["setup_cache"]["used"] is True
    details = api.get(f"tasks/{task2}").json()
    assert diff_of(details) == ""
    assert second["base_commit_sha"] == w_new
    # the attempt wrote over its copy, not over the snapshot
    assert (snap / "tree" / "gadgets" / "node_modules" / "marker").read_text() == gadgets_marker
    assert snapshot_dirs(cache_server) == [snap]


def test_a_follow_up_resumes_the_snapshot_with_each_repositorys_earlier_change(
    cache_server: Server, scripted_model: ScriptedModel, remotes: tuple[Path, Path]
) -> None:
    api = cache_server.api
    env = make_env(cache_server, remotes)
    scripted_model.script = [
        Shell("echo w-first > widgets/NOTES.md; echo g-first > gadgets/calc.py"),
        Say("Wrote both."),
    ]
    task, turn1, _ = run_task(api, env["id"])
    markers = markers_of(setup_lines(api, task, turn1))
    (snap,) = snapshot_dirs(cache_server)

    scripted_model.script = [
        Say("(not reached)"),  # the resumed conversation brings the first attempt's output
        Shell(
            "cat widgets/NOTES.md gadgets/calc.py; cat widgets/node_modules/marker; echo; "
            "echo more >> gadgets/calc.py"
        ),
        Say("Seen."),
    ]
    out = api.follow_up(task, turn1, "Add more.")
    turn2 = out["turn"]["id"]
    second = wait_for_task(api, task)["current_assistant_turn"]
    assert second["id"] == turn2 and second["turn_status"] == "completed", second["error"]
    lines = setup_lines(api, task, turn2)
    assert not any(line.startswith("setup ran") for line in lines), lines
    assert lines[0].startswith("Resumed cached container from "), lines
    assert f"maintenance ran: {markers} home-state" in lines, lines
    shown = commands(second)[0][1]["content"]["parts"][0]
    assert f"w-first\ng-first\n{markers.split('-')[0]}\n" in shown, shown
    diffs = second["repo_diffs"]
    keys = env["repos"]
    assert "+w-first" in diffs[keys[0]]["diff"], diffs
    gadgets = diffs[keys[1]]["diff"]
    assert "+g-first\n+more" in gadgets and "-def add(a, b):" in gadgets, gadgets
    assert "node_modules" not in json.dumps(diffs)
    assert second["setup_cache"]["used"] is True
    assert snapshot_dirs(cache_server) == [snap]


@pytest.fixture
def standby_server(tmp_path: Path, sqlite_url: str, scripted_model: Any) -> Iterator[Server]:
    yield from make_server(
        tmp_path, sqlite_url, **engine_settings(scripted_model, standby_sandboxes=1)
    )


def test_the_second_task_takes_a_standby_started_from_the_snapshot_of_every_repository(
    standby_server: Server, scripted_model: ScriptedModel, remotes: tuple[Path, Path]
) -> None:
    """A multi-repository environment with a setup script gets standbys too: the second task
    takes one started from the snapshot (setup not run, the maintenance script run when it
    was prepared, every repository with setup's files at its branch head, each one's change
    diffed against its own base). Once one repository's branch moved, the standby made
    before is not taken: the attempt resumes the snapshot cold with that commit on top."""
    server = standby_server
    api = server.api
    env = make_env(server, remotes)
    scripted_model.script = [Say("Hi.")]
    task1, turn1, _ = run_task(api, env["id"])
    markers = markers_of(setup_lines(api, task1, turn1))
    widgets_marker, gadgets_marker = markers.split("-")
    (snap,) = snapshot_dirs(server)
    wait_standby(server)

    look = (
        "cat widgets/node_modules/marker; echo; cat gadgets/node_modules/marker; echo; "
        "cat ~/.setup-home; git -C widgets rev-parse HEAD; git -C gadgets rev-parse HEAD; "
        "git -C gadgets rev-parse --abbrev-ref HEAD; cat gadgets/OTHER.md 2>/dev/null; "
        "echo look-end; echo standby-change > gadgets/calc.py"
    )
    scripted_model.script = [Shell(look), Say("Seen.")]
    w_head = git("rev-parse", "HEAD", cwd=remotes[0].parent / "widgets-work").strip()
    g_head = git("rev-parse", "HEAD", cwd=remotes[1].parent / "gadgets-work").strip()
    task2, turn2, second = run_task(api, env["id"])
    assert took_standby(server, turn2)
    lines = setup_lines(api, task2, turn2)
    assert not any(line.startswith("setup ran") for line in lines), lines
    assert lines[0].startswith("Resumed cached container from "), lines
    assert any(line.endswith("when this sandbox was prepared in advance") for line in lines)
    assert f"maintenance ran: {markers} home-state" in lines, lines
    out = commands(second)[0][1]["content"]["parts"][0]
    expected = (
        f"{widgets_marker}\n{gadgets_marker}\nhome-state\n{w_head}\n{g_head}\ntrunk\nlook-end"
    )
    assert expected in out, out
    assert second["setup_cache"]["used"] is True
    body = turn_body(server, turn2)
    bases = body["repo_bases"]
    keys = env["repos"]
    assert bases[keys[0]]["sha"] == w_head and bases[keys[1]] == {
        "dir": "gadgets",
        "branch": "trunk",
        "sha": g_head,
    }, bases
    diffs = second["repo_diffs"]
    assert "+standby-change" in diffs[keys[1]]["diff"], diffs
    assert keys[0] not in diffs or not diffs[keys[0]]["diff"], diffs
    assert (snap / "tree" / "gadgets" / "node_modules" / "marker").read_text() == gadgets_marker

    wait_standby(server)  # the next one, at the same heads
    g_old, g_new = advance(remotes[1], "trunk", "OTHER.md", "gadgets moved\n")
    scripted_model.script = [Shell(look), Say("Seen.")]
    task3, turn3, third = run_task(api, env["id"])
    assert not took_standby(server, turn3)
    lines = setup_lines(api, task3, turn3)
    assert not any(line.startswith("setup ran") for line in lines), lines
    assert f"commits gadgets {g_old[:7]}→{g_new[:7]}, " in lines[0], lines
    out = commands(third)[0][1]["content"]["parts"][0]
    assert f"{w_head}\n{g_new}\ntrunk\ngadgets moved\nlook-end" in out, out
