"""``wham task cancel``, ``diff`` and ``show`` as a user runs them against ``wham serve``
(real tasks: the Codex CLI in the sandbox, answered by the scripted model); ``diff`` on a
terminal runs in a real pty."""

from __future__ import annotations

import fcntl
import json
import os
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import WHAM, LiveServer, cli_user, git, make_repo, run_cli
from openwham.cli import diffs
from openwham.client import WhamClient
from support.scripted_model import Patch, Say, ScriptedModel

FIX_ADD = Patch(
    "*** Begin Patch\n*** Update File: calc.py\n@@\n def add(a, b):\n"
    "-    return a - b\n+    return a + b\n*** Add File: NOTES.md\n+fixed add\n+and noted it\n"
    "*** End Patch"
)
SCRIPT = [FIX_ADD, Say("Fixed add() and wrote NOTES.md.")]


@pytest.fixture(scope="module")
def token(served: LiveServer) -> str:
    return served.token()


@pytest.fixture(scope="module")
def wham(served: LiveServer, token: str) -> Iterator[WhamClient]:
    with WhamClient(served.url, token=token) as c:
        yield c


@pytest.fixture(scope="module")
def env_id(wham: WhamClient, model: ScriptedModel, tmp_path_factory: pytest.TempPathFactory) -> str:
    model.script = SCRIPT
    repo = make_repo(tmp_path_factory.mktemp("origin") / "widgets")
    return wham.create_environment({"label": "acme/widgets", "repos": [str(repo)]}).id


@pytest.fixture(scope="module")
def cli_env(
    tmp_path_factory: pytest.TempPathFactory, served: LiveServer, token: str
) -> dict[str, str]:
    return cli_user(tmp_path_factory.mktemp("cli-home"), served.url, token)


# The child makes the pty its controlling terminal (less reads keys from /dev/tty), then
# becomes wham.
_CTTY = (
    "import fcntl, os, sys, termios; fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
    "os.execv(sys.argv[1], sys.argv[1:])"
)


def run_in_pty(env: dict[str, str], *args: str) -> tuple[int, str]:
    """``wham ARGS`` with stdin, stdout and stderr on a new pty (120x50), as in a terminal;
    returns the exit code and what the terminal received."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 120, 0, 0))
    proc = subprocess.Popen(
        [sys.executable, "-c", _CTTY, str(WHAM), *args],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env={"TERM": "xterm-256color", **env},
        start_new_session=True,
    )
    os.close(slave)
    received = bytearray()
    try:
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: every holder of the pty's other end has closed it
                break
            if not chunk:
                break
            received += chunk
        code = proc.wait(60)
    finally:
        os.close(master)
    return code, received.decode(errors="replace").replace("\r\n", "\n")


@pytest.fixture
def fake_less(tmp_path: Path, cli_env: dict[str, str]) -> tuple[dict[str, str], Path]:
    """A ``less`` first on PATH that records how it was run and what it was given, then
    shows it; returns the CLI environment using it and the record's folder."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "less"
    script.write_text(
        "#!/bin/sh\n"
        f'printf "%s\\n" "$*" "LESS=$LESS" > "{tmp_path}/less.args"\n'
        f'exec tee "{tmp_path}/less.input"\n'
    )
    script.chmod(0o755)
    return {**cli_env, "PATH": f"{bin_dir}:{cli_env['PATH']}"}, tmp_path


@pytest.fixture(scope="module")
def done_task(wham: WhamClient, env_id: str, model: ScriptedModel) -> str:
    """A finished task: the first prompt and one follow-up, with a pushed PR branch."""
    model.script = SCRIPT
    task_id = wham.create_task("Fix add()", env_id).task.id
    wham.wait(task_id, poll=0.2, timeout=120)
    # The follow-up's request holds the first turn's tool output: it plays step 1.
    model.script = [FIX_ADD, Say("Added a docstring too.")]
    try:
        wham.follow_up(task_id, "Now add a docstring.")
        wham.wait(task_id, poll=0.2, timeout=120)
    finally:
        model.script = SCRIPT
    wham.create_pr(task_id)
    return task_id


# ----------------------------------------------------------------------------- cancel


def test_cancel_of_a_finished_task_says_nothing_was_cancelled(
    cli_env: dict[str, str], wham: WhamClient, done_task: str
) -> None:
    r = run_cli(cli_env, "task", "cancel", done_task)
    assert r.returncode == 1, r.stdout
    assert r.stdout == ""
    assert r.stderr.splitlines() == [f"error: nothing to cancel: task {done_task} is already ready"]
    j = run_cli(cli_env, "task", "cancel", done_task, "--json")
    assert j.returncode == 1
    body = json.loads(j.stdout)
    assert body["success"] is False and body["cancelled"] == [] and body["status"] == "ready"
    current = wham.get_task(done_task).current_assistant_turn
    assert current is not None and current.turn_status == "completed"


def test_cancel_of_a_running_task_names_the_attempts_it_stopped(
    cli_env: dict[str, str], wham: WhamClient, env_id: str, gate: threading.Event
) -> None:
    gate.clear()
    try:
        created = wham.create_task("Slow one", env_id, attempts=2)
        task_id = created.task.id
        deadline = time.monotonic() + 60
        while wham.get_task(task_id).current_assistant_turn.turn_status != "in_progress":  # type: ignore[union-attr]
            assert time.monotonic() < deadline
            time.sleep(0.1)
        r = run_cli(cli_env, "task", "cancel", task_id, "--json")
    finally:
        gate.set()
    assert r.returncode == 0, r.stderr
    body = json.loads(r.stdout)
    attempts = wham.attempts(task_id)
    assert body["success"] is True
    assert body["cancelled"] == [{"attempt": i, "turn_id": t.id} for i, t in enumerate(attempts, 1)]
    wham.wait(task_id, poll=0.2, timeout=60)
    assert [t.turn_status for t in wham.attempts(task_id)] == ["cancelled", "cancelled"]
    again = run_cli(cli_env, "task", "cancel", task_id)
    assert again.returncode == 1
    assert again.stderr.startswith(f"error: nothing to cancel: task {task_id} is already cancelled")


def test_cancel_prints_which_attempts(
    cli_env: dict[str, str], wham: WhamClient, env_id: str, gate: threading.Event
) -> None:
    gate.clear()
    try:
        task_id = wham.create_task("Queued one", env_id).task.id
        r = run_cli(cli_env, "task", "cancel", task_id)
    finally:
        gate.set()
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"{task_id}: cancelled attempt 1\n"


# ----------------------------------------------------------------------------- show


def test_show_tells_the_conversation_and_the_pr_branch(
    cli_env: dict[str, str], wham: WhamClient, done_task: str
) -> None:
    details = wham.get_task(done_task)
    branch = details.task.external_pull_requests[0].pull_request.head
    assert branch
    shown = run_cli(cli_env, "task", "show", done_task)
    assert shown.returncode == 0, shown.stderr
    text = shown.stdout
    assert f"PR branch: {branch} (" in text
    expected = [
        "Prompt\n  Fix add()\n",
        "Answer\n  Fixed add() and wrote NOTES.md.\n",
        "Follow-up 1\n  Now add a docstring.\n",
        "Answer\n  Added a docstring too.\n",
    ]
    at = [text.find(part) for part in expected]
    assert -1 not in at and at == sorted(at), text

    as_json = run_cli(cli_env, "task", "show", done_task, "--json")
    assert as_json.returncode == 0
    body = json.loads(as_json.stdout)
    # the shape it had, plus the new fields
    assert {
        "id",
        "url",
        "title",
        "status",
        "environment_id",
        "archived",
        "attempts",
        "task",
    } <= set(body)
    assert body["prompt"] == "Fix add()"
    assert [(c["prompt"], c["answer"]) for c in body["conversation"]] == [
        ("Fix add()", "Fixed add() and wrote NOTES.md."),
        ("Now add a docstring.", "Added a docstring too."),
    ]
    assert body["conversation"][-1]["turn_id"] == details.current_assistant_turn.id  # type: ignore[union-attr]
    assert body["pr_branch"]["branch"] == branch


# ----------------------------------------------------------------------------- diff

GREEN_ADD = "\x1b[32m+    return a + b\x1b[m"
RED_DEL = "\x1b[31m-    return a - b\x1b[m"
CYAN_HUNK = "\x1b[36m@@ -1,2 +1,2 @@\x1b[m"
BOLD_META = "\x1b[1mdiff --git a/calc.py b/calc.py\x1b[m"


def test_diff_on_a_terminal_is_coloured_and_paged_with_less_frx(
    fake_less: tuple[dict[str, str], Path], wham: WhamClient, done_task: str
) -> None:
    env, record = fake_less
    code, screen = run_in_pty(env, "task", "diff", done_task)
    assert code == 0, screen
    assert (record / "less.args").read_text().splitlines() == ["-FRX", "LESS=FRX"]
    paged = (record / "less.input").read_text()
    for coloured in (GREEN_ADD, RED_DEL, CYAN_HUNK, BOLD_META):
        assert coloured in paged and coloured in screen
    assert "\x1b[32m+fixed add\x1b[m" in paged  # NOTES.md, a new file
    plain = paged.replace("\x1b[1m", "").replace("\x1b[32m", "").replace("\x1b[31m", "")
    assert plain.replace("\x1b[36m", "").replace("\x1b[m", "") == wham.diff(done_task)


def test_diff_through_the_real_less(
    cli_env: dict[str, str], wham: WhamClient, done_task: str
) -> None:
    code, screen = run_in_pty(cli_env, "task", "diff", done_task)  # no pager set: less -FRX
    assert code == 0, screen
    assert GREEN_ADD in screen and RED_DEL in screen and CYAN_HUNK in screen
    assert "+fixed add" in screen and "NOTES.md" in screen


def test_pager_choice_and_opting_out(
    fake_less: tuple[dict[str, str], Path], tmp_path: Path, done_task: str
) -> None:
    env, record = fake_less
    mine, theirs = tmp_path / "wham-pager.txt", tmp_path / "pager.txt"
    pagers = {"WHAM_PAGER": f"tee {mine}", "PAGER": f"tee {theirs}"}
    assert run_in_pty({**env, **pagers}, "task", "diff", done_task)[0] == 0
    assert GREEN_ADD in mine.read_text() and not theirs.exists()  # WHAM_PAGER first
    assert run_in_pty({**env, "PAGER": f"tee {theirs}"}, "task", "diff", done_task)[0] == 0
    assert GREEN_ADD in theirs.read_text() and not (record / "less.input").exists()

    for off in ({"WHAM_PAGER": ""}, {"WHAM_PAGER": "cat"}):
        code, screen = run_in_pty({**env, **off}, "task", "diff", done_task)
        assert code == 0 and GREEN_ADD in screen
    code, screen = run_in_pty(env, "task", "diff", done_task, "--no-pager")
    assert code == 0 and GREEN_ADD in screen
    assert not (record / "less.input").exists()  # none of these ran the pager

    for plain in (("--color", "never"), ("--color", "NEVER")):
        code, screen = run_in_pty(env, "task", "diff", done_task, *plain)
        assert code == 0 and "\x1b[" not in screen and "+    return a + b" in screen
    code, screen = run_in_pty({**env, "NO_COLOR": "1"}, "task", "diff", done_task)
    assert code == 0 and "\x1b[" not in screen and "+    return a + b" in screen
    assert "\x1b[" not in (record / "less.input").read_text()  # paged, without colour
    bad = run_cli(env, "task", "diff", done_task, "--color", "sometimes")
    assert bad.returncode == 2 and "--color must be auto, always or never" in bad.stderr


def test_diff_piped_is_plain_and_not_paged(
    fake_less: tuple[dict[str, str], Path], wham: WhamClient, done_task: str
) -> None:
    env, record = fake_less
    piped = run_cli({**env, "WHAM_PAGER": "less"}, "task", "diff", done_task)
    assert piped.returncode == 0
    assert piped.stdout == wham.diff(done_task)
    forced = run_cli(env, "task", "diff", done_task, "--color", "always")
    assert forced.returncode == 0 and GREEN_ADD in forced.stdout and RED_DEL in forced.stdout
    assert not (record / "less.args").exists()


def test_diff_stat_is_git_diff_stat(
    cli_env: dict[str, str],
    fake_less: tuple[dict[str, str], Path],
    wham: WhamClient,
    done_task: str,
    tmp_path: Path,
) -> None:
    checkout = make_repo(tmp_path / "checkout")
    subprocess.run(
        ["git", "apply", "--index", "-"],
        input=wham.diff(done_task),
        text=True,
        cwd=checkout,
        check=True,
    )
    expected = git("diff", "--cached", "--stat", cwd=checkout)
    stat = run_cli(cli_env, "task", "diff", done_task, "--stat")
    assert stat.returncode == 0
    assert stat.stdout == expected
    assert stat.stdout.splitlines()[-1] == " 2 files changed, 3 insertions(+), 1 deletion(-)"

    env, _ = fake_less
    code, screen = run_in_pty(env, "task", "diff", done_task, "--stat")
    assert code == 0
    assert " calc.py  | 2 \x1b[32m+\x1b[m\x1b[31m-\x1b[m" in screen

    body = json.loads(run_cli(cli_env, "task", "diff", done_task, "--stat", "--json").stdout)
    assert body["files"] == [
        {"path": "NOTES.md", "added": 2, "removed": 0, "binary": False},
        {"path": "calc.py", "added": 1, "removed": 1, "binary": False},
    ]
    assert body["summary"] == {"files_changed": 2, "lines_added": 3, "lines_removed": 1}
    assert body["diff"] == wham.diff(done_task)


def _git_repo_with_every_kind_of_change(path: Path) -> str:
    """A repository whose staged diff has edits, a new, a deleted, a renamed and a
    mode-changed file, and removed lines that read like headers (``--- x``, ``+++ y``)."""
    path.mkdir()
    git("init", "-q", "-b", "main", cwd=path)
    (path / "src" / "pkg").mkdir(parents=True)
    (path / "notes.txt").write_text("-- a\n++ b\nkeep\n--- c\n")
    (path / "gone.txt").write_text("bye\n")
    (path / "src" / "pkg" / "old_name.py").write_text("".join(f"line {i}\n" for i in range(30)))
    (path / "run.sh").write_text("echo hi\n")
    (path / "no-eol.txt").write_text("last")
    git("add", ".", cwd=path)
    git("commit", "-qm", "base", cwd=path)
    (path / "notes.txt").write_text("++ b\nkeep\n+++ d\n")
    (path / "gone.txt").unlink()
    (path / "src" / "pkg" / "old_name.py").rename(path / "src" / "pkg" / "new_name.py")
    (path / "run.sh").chmod(0o755)
    (path / "no-eol.txt").write_text("last line")
    (path / "added.md").write_text("# new\n")
    git("add", "-A", cwd=path)
    return git("diff", "--cached", "-M", cwd=path)


def test_diff_lines_are_classified_as_git_colours_them(tmp_path: Path) -> None:
    repo = tmp_path / "r"
    text = _git_repo_with_every_kind_of_change(repo)
    coloured = git("diff", "--cached", "-M", "--color=always", cwd=repo).splitlines()
    kinds = {"\x1b[1m": "meta", "\x1b[36m": "hunk", "\x1b[32m": "add", "\x1b[31m": "del"}
    expected = [
        next((k for c, k in kinds.items() if line.startswith(c)), "plain") for line in coloured
    ]
    ours = ["plain" if k in ("context", "other") else k for k, _ in diffs.classify(text)]
    assert ours == expected
    assert "del" in ours and any(line == "---- c" for _, line in diffs.classify(text))


def test_diff_stat_matches_git_for_renames_deletions_and_modes(tmp_path: Path) -> None:
    repo = tmp_path / "r"
    text = _git_repo_with_every_kind_of_change(repo)
    assert diffs.stat_text(diffs.stats(text)) == git("diff", "--cached", "-M", "--stat", cwd=repo)
    assert "src/pkg/{old_name.py => new_name.py} | 0" in diffs.stat_text(diffs.stats(text))


def test_diff_stat_scales_and_shortens_like_git() -> None:
    # What git 2.39 prints for 80 columns (newer git lays long lines out differently, so
    # this is not compared with the installed git); binary sizes are not in a text diff.
    files = [
        diffs.FileStat("calc.py", 1, 1),
        diffs.FileStat("image.png", binary=True),
        diffs.FileStat("very/long/directory/name/that/goes/on/and/on/forever/file_name.txt", 200),
    ]
    assert diffs.stat_text(files).splitlines() == [
        " calc.py                                            |   2 +-",
        " image.png                                          | Bin",
        " .../name/that/goes/on/and/on/forever/file_name.txt | 200 +++++++++++++++++++++",
        " 3 files changed, 201 insertions(+), 1 deletion(-)",
    ]


def test_task_diff_and_apply_pick_a_repository_of_a_multi_repository_task(
    wham: WhamClient,
    model: ScriptedModel,
    cli_env: dict[str, str],
    tmp_path: Path,
) -> None:
    """``--repository NAME``: that repository's diff of a multi-repository attempt (its
    ``repo_diffs``); without it the first repository's, as ``codex apply`` reads."""
    origin = tmp_path / "origin"
    widgets, gadgets = make_repo(origin / "widgets"), make_repo(origin / "gadgets")
    env = wham.create_environment({"label": "two", "repos": [str(widgets), str(gadgets)]})
    model.script = [
        Patch(
            "*** Begin Patch\n*** Add File: widgets/W.md\n+w\n"
            "*** Add File: gadgets/G.md\n+g\n*** End Patch"
        ),
        Say("Both."),
    ]
    task_id = wham.create_task("Note both", env.id).task.id
    wham.wait(task_id, poll=0.2, timeout=120)
    first = run_cli(cli_env, "task", "diff", task_id, "--no-pager")
    assert first.returncode == 0, first.stderr
    assert "b/W.md" in first.stdout and "G.md" not in first.stdout
    second = run_cli(cli_env, "task", "diff", task_id, "--repository", "gadgets", "--no-pager")
    assert second.returncode == 0, second.stderr
    assert "b/G.md" in second.stdout and "W.md" not in second.stdout
    bad = run_cli(cli_env, "task", "diff", task_id, "--repository", "nope")
    assert bad.returncode != 0 and "no repository 'nope'" in bad.stderr
    checkout = tmp_path / "checkout"
    git("clone", "-q", str(gadgets), str(checkout), cwd=tmp_path)
    r = run_cli(
        cli_env, "task", "apply", task_id, "--repository", "gadgets", "--repo", str(checkout)
    )
    assert r.returncode == 0, r.stderr
    assert (checkout / "G.md").read_text() == "g\n" and not (checkout / "W.md").exists()
