"""Compatibility proven by the official Codex CLI, run as a user runs it.

One ``wham serve`` (the real process, the scripted model behind it) for the module; a
recording proxy in front of it shows which paths the CLI used. Codex CLI 0.151.0, the last
release that accepts a custom ``CODEX_CLOUD_TASKS_BASE_URL``, runs ``codex cloud exec``,
``status``, ``list``, ``diff`` and ``apply`` against both path styles (``http://host:port`` →
``/api/codex/…``, ``http://host:port/backend-api`` → ``/backend-api/wham/…``), and its
interactive TUI (``codex cloud`` in tmux: list, details, attempts, diffs); the current CLI
runs the top-level ``codex apply``. Credentials come from ``wham codex-auth``.
"""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import httpx
import pytest

from conftest import WHAM, LiveServer, git, make_repo
from support.codex_cloud import CLOUD_VERSION, CodexUser, RecordingProxy, cloud_binary
from support.codex_cloud import current_binary as current_codex
from support.scripted_model import Patch, Say, ScriptedModel, Shell
from support.tmux import Tmux

STYLES = {"api-codex": ("", "/api/codex/"), "backend-api": ("/backend-api", "/backend-api/wham/")}
FIX_ADD = Patch(
    "*** Begin Patch\n*** Update File: calc.py\n@@\n def add(a, b):\n"
    "-    return a - b\n+    return a + b\n*** End Patch"
)
# Every attempt records a random number of its own, so the attempts' diffs differ.
RANDOM_NOTE = Shell(
    "mkdir -p notes && printf '%s\\n' \"$(od -An -N8 -tx1 /dev/urandom | tr -d ' \\n')\" "
    "> notes/attempt.txt && cat notes/attempt.txt"
)
LIST_KEYS = {
    "id",
    "url",
    "title",
    "status",
    "updated_at",
    "environment_id",
    "environment_label",
    "summary",
    "is_review",
    "attempt_total",
}


@pytest.fixture(scope="module")
def proxy(served: LiveServer) -> Iterator[RecordingProxy]:
    p = RecordingProxy(served.url).start()
    try:
        yield p
    finally:
        p.stop()


@pytest.fixture(scope="module")
def token(served: LiveServer) -> str:
    return served.token()


@pytest.fixture(scope="module")
def api(served: LiveServer, token: str) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=f"{served.url}/backend-api/wham",
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
    ) as c:
        yield c


def codex_auth(server: str, token: str, home: Path) -> str:
    out = subprocess.run(
        [str(WHAM), "codex-auth", "--server", server, "--token", token, "--codex-home", str(home)],
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout


@pytest.fixture(scope="module")
def user(tmp_path_factory: pytest.TempPathFactory, proxy: RecordingProxy, token: str) -> CodexUser:
    """A user whose CODEX_HOME was written by ``wham codex-auth`` for the server."""
    home = tmp_path_factory.mktemp("codex-home")
    out = codex_auth(proxy.url, token, home)
    assert f"CODEX_CLOUD_TASKS_BASE_URL={proxy.url}/backend-api" in out
    version = subprocess.run(
        [str(cloud_binary()), "--version"], capture_output=True, text=True, check=True
    )
    assert version.stdout.strip() == f"codex-cli {CLOUD_VERSION}"
    return CodexUser(home)


@pytest.fixture(scope="module")
def envs(tmp_path_factory: pytest.TempPathFactory, api: httpx.Client) -> dict[str, Any]:
    """Two environments: ``acme/widgets`` and ``acme/gadgets``, each on a repository of its own."""
    root = tmp_path_factory.mktemp("repos")
    out: dict[str, Any] = {}
    for name in ("widgets", "gadgets"):
        repo = make_repo(root / name)
        r = api.post("environments", json={"label": f"acme/{name}", "repos": [str(repo)]})
        assert r.status_code == 201, r.text
        out[name] = {"id": r.json()["id"], "repo": repo, "label": f"acme/{name}"}
    return out


def wait_completed(api: httpx.Client, task_id: str, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        details = dict(api.get(f"tasks/{task_id}").json())
        turns = [details["current_assistant_turn"]]
        siblings = api.get(f"tasks/{task_id}/turns/{turns[0]['id']}/sibling_turns").json()
        turns += siblings["sibling_turns"]
        statuses = {t["turn_status"] for t in turns}
        if statuses <= {"completed", "failed", "cancelled"}:
            assert statuses == {"completed"}, [t.get("error") for t in turns]
            return details
        assert time.monotonic() < deadline, statuses
        time.sleep(0.1)


def create_task(api: httpx.Client, env_id: str, prompt: str, attempts: int = 1) -> str:
    body: dict[str, Any] = {
        "new_task": {"environment_id": env_id},
        "input_items": [
            {
                "type": "message",
                "role": "user",
                "content": [{"content_type": "text", "text": prompt}],
            }
        ],
    }
    if attempts > 1:
        body["metadata"] = {"best_of_n": attempts}
    r = api.post("tasks", json=body)
    assert r.status_code == 200, r.text
    return str(r.json()["task"]["id"])


@pytest.fixture(scope="module")
def listed(api: httpx.Client, model: ScriptedModel, envs: dict[str, Any]) -> dict[str, Any]:
    """Tasks made through the API: one in ``acme/widgets`` (fixes ``add``, writes a note), and
    three in ``acme/gadgets`` (more than one page of ``--limit 2``); all completed."""
    model.script = [FIX_ADD, Shell("echo hello > hello.txt"), Say("Fixed add.")]
    widget = create_task(api, envs["widgets"]["id"], "Fix add and say hello")
    widget_details = wait_completed(api, widget)
    model.script = [Shell("echo gadget >> gadgets.txt"), Say("Added a gadget.")]
    gadgets = [create_task(api, envs["gadgets"]["id"], f"Add gadget {i}") for i in range(3)]
    for task_id in gadgets:
        wait_completed(api, task_id)
    r = api.get("tasks/list", params={"environment_id": envs["gadgets"]["id"], "limit": 20})
    ordered = [item["id"] for item in r.json()["items"]]
    assert sorted(ordered) == sorted(gadgets)
    return {"widget": widget, "widget_details": widget_details, "gadgets": ordered}


def pr_diff(turn: dict[str, Any]) -> str:
    (item,) = [i for i in turn["output_items"] if i["type"] == "pr"]
    return str(item["output_diff"]["diff"])


def note_value(diff: str) -> str:
    m = re.search(r"\+\+\+ b/notes/attempt\.txt\n@@ [^\n]*\n\+([0-9a-f]{16})\n", diff)
    assert m, diff
    return m.group(1)


def clone(repo: Path, dest: Path) -> Path:
    git("clone", "-q", str(repo), str(dest), cwd=repo.parent)
    return dest


def status_lines(r: subprocess.CompletedProcess[str]) -> list[str]:
    return [line.strip() for line in r.stdout.strip().splitlines()]


# --------------------------------------------------------------------------- codex cloud


@pytest.mark.parametrize("style", list(STYLES))
def test_codex_cloud_exec_status_diff_apply(
    style: str,
    user: CodexUser,
    proxy: RecordingProxy,
    api: httpx.Client,
    model: ScriptedModel,
    gate: threading.Event,
    envs: dict[str, Any],
    tmp_path: Path,
) -> None:
    suffix, prefix = STYLES[style]
    base = proxy.url + suffix
    repo = envs["widgets"]["repo"]
    work = clone(repo, tmp_path / "work")  # the user's checkout
    model.script = [RANDOM_NOTE, FIX_ADD, Say("Fixed add and noted a random number.")]
    prompt = f"Fix add and note a random number ({style})"

    # exec: the task is created with two attempts and its URL printed
    gate.clear()
    proxy.calls.clear()
    try:
        r = user.cloud(
            "exec", "--env", "acme/widgets", "--attempts", "2", prompt, cwd=work, base_url=base
        )
        assert r.returncode == 0, r.stderr
        m = re.fullmatch(
            rf"{re.escape(proxy.url)}/codex/tasks/(task_e_[0-9a-f]{{32}})", r.stdout.strip()
        )
        assert m, r.stdout
        task_id = m.group(1)
        assert [(c.method, c.path) for c in proxy.calls] == [
            ("GET", prefix + "environments"),
            ("POST", prefix + "tasks"),
        ]
        details = api.get(f"tasks/{task_id}").json()
        assert details["task"]["environment_id"] == envs["widgets"]["id"]
        assert details["current_user_turn"]["input_items"][0]["content"][0]["text"] == prompt
        assert len(details["current_assistant_turn"]["sibling_turn_ids"]) == 1  # 2 attempts

        # status while the attempts cannot finish: exit 1, shown as pending
        r = user.cloud("status", task_id, cwd=work, base_url=base)
        assert r.returncode == 1, (r.stdout, r.stderr)
        lines = status_lines(r)
        assert lines[0].startswith("[PENDING] "), lines
        assert lines[1].startswith("acme/widgets"), lines
    finally:
        gate.set()

    # polled like a script would (by URL): exit 0 once ready
    deadline = time.monotonic() + 120
    while (r := user.cloud("status", m.group(0), cwd=work, base_url=base)).returncode != 0:
        assert r.returncode == 1 and status_lines(r)[0].startswith("[PENDING] "), r.stderr
        assert time.monotonic() < deadline, r.stdout
        time.sleep(0.5)
    details = wait_completed(api, task_id)
    stats = details["task"]["task_status_display"]["latest_turn_status_display"]["diff_stats"]
    assert stats == {"files_modified": 2, "lines_added": 2, "lines_removed": 1}
    assert status_lines(r)[0] == f"[READY] {details['task']['title']}"
    assert re.fullmatch(r"acme/widgets\s+•\s+\d+[smhd] ago", status_lines(r)[1]), r.stdout
    assert status_lines(r)[2] == "+2/-1 • 2 files"

    # diff: attempt 1 is the task's diff, attempt 2 its sibling's; they differ
    first = details["current_assistant_turn"]
    assert first["attempt_placement"] == 0
    siblings = api.get(f"tasks/{task_id}/turns/{first['id']}/sibling_turns").json()
    (second,) = siblings["sibling_turns"]
    assert second["attempt_placement"] == 1
    diff1, diff2 = pr_diff(first), pr_diff(second)
    assert note_value(diff1) != note_value(diff2)
    assert "+    return a + b" in diff1 and "+    return a + b" in diff2
    r = user.cloud("diff", task_id, "--attempt", "2", cwd=work, base_url=base)
    assert r.returncode == 0, r.stderr
    assert r.stdout.rstrip("\n") == diff2.rstrip("\n")
    r = user.cloud("diff", task_id, cwd=work, base_url=base)
    assert r.returncode == 0, r.stderr
    assert r.stdout.rstrip("\n") == diff1.rstrip("\n")

    # apply into fresh clones: attempt 1 by default, attempt 2 on request
    for attempt, diff in ((None, diff1), ("2", diff2)):
        checkout = clone(repo, tmp_path / f"clone-{attempt or 1}")
        extra = ["--attempt", attempt] if attempt else []
        r = user.cloud("apply", task_id, *extra, cwd=checkout, base_url=base)
        assert r.returncode == 0, (r.stdout, r.stderr)
        assert f"Applied task {task_id} locally" in r.stdout
        assert (checkout / "notes" / "attempt.txt").read_text() == note_value(diff) + "\n"
        assert (checkout / "calc.py").read_text() == "def add(a, b):\n    return a + b\n"
        status = git("status", "--porcelain", "--untracked-files=all", cwd=checkout)
        assert {line[3:] for line in status.splitlines()} == {
            "calc.py",
            "notes/attempt.txt",
            "error.log",  # every `codex cloud` command logs to ./error.log
        }
        assert "startup: base_url=" in (checkout / "error.log").read_text()

    assert git("status", "--porcelain", cwd=repo) == ""  # the environment's repo is untouched
    # every call went to this path style
    assert proxy.calls and all(c.path.startswith(prefix) for c in proxy.calls)
    assert f"{prefix}tasks/{task_id}/turns/{first['id']}/sibling_turns" in proxy.paths()
    # with the credentials of `wham codex-auth`
    tokens = json.loads((user.home / "auth.json").read_text())["tokens"]
    assert {(c.headers["authorization"], c.headers["chatgpt-account-id"]) for c in proxy.calls} == {
        (f"Bearer {tokens['access_token']}", tokens["account_id"])
    }


@pytest.mark.parametrize("style", list(STYLES))
def test_codex_cloud_list_text_json_cursor_and_env(
    style: str,
    user: CodexUser,
    proxy: RecordingProxy,
    envs: dict[str, Any],
    listed: dict[str, Any],
    api: httpx.Client,
    tmp_path: Path,
) -> None:
    suffix, prefix = STYLES[style]
    base = proxy.url + suffix
    cwd = tmp_path  # not a checkout: `--env` names the environment
    gadgets = listed["gadgets"]

    def cloud_list(*args: str) -> subprocess.CompletedProcess[str]:
        r = user.cloud("list", *args, cwd=cwd, base_url=base)
        assert r.returncode == 0, r.stderr
        return r

    # --json, two pages of --limit 2 in the acme/gadgets environment
    proxy.calls.clear()
    page1 = json.loads(cloud_list("--env", "acme/gadgets", "--limit", "2", "--json").stdout)
    assert page1["cursor"]
    page2 = json.loads(
        cloud_list(
            "--env", "acme/gadgets", "--limit", "2", "--json", "--cursor", page1["cursor"]
        ).stdout
    )
    assert page2["cursor"] is None
    items = page1["tasks"] + page2["tasks"]
    assert [t["id"] for t in items] == gadgets
    api_items = {
        i["id"]: i
        for i in api.get(
            "tasks/list", params={"environment_id": envs["gadgets"]["id"], "limit": 20}
        ).json()["items"]
    }
    for t in items:
        assert set(t) == LIST_KEYS
        assert t["url"] == f"{proxy.url}/codex/tasks/{t['id']}"
        assert t["title"] == api_items[t["id"]]["title"]
        assert t["status"] == "ready"
        assert t["environment_id"] is None
        assert t["environment_label"] == "acme/gadgets"
        assert t["summary"] == {"files_changed": 1, "lines_added": 1, "lines_removed": 0}
        assert t["is_review"] is False
        assert t["attempt_total"] == 1
        updated = datetime.fromisoformat(t["updated_at"].replace("Z", "+00:00")).timestamp()
        assert abs(updated - api_items[t["id"]]["updated_at"]) < 0.01
    lists = [c for c in proxy.calls if c.path == prefix + "tasks/list"]
    assert [parse_qs(c.query) for c in lists] == [
        {"limit": ["2"], "task_filter": ["current"], "environment_id": [envs["gadgets"]["id"]]},
        {
            "limit": ["2"],
            "task_filter": ["current"],
            "cursor": [page1["cursor"]],
            "environment_id": [envs["gadgets"]["id"]],
        },
    ]
    assert all(c.path.startswith(prefix) for c in proxy.calls)

    # text: the same pages, with the hint for the next one
    text1 = cloud_list("--env", "acme/gadgets", "--limit", "2").stdout
    hint = re.search(r"codex cloud list --cursor='([^']+)'", text1)
    assert hint, text1
    text2 = cloud_list("--env", "acme/gadgets", "--limit", "2", f"--cursor={hint.group(1)}").stdout
    assert "--cursor" not in text2
    for text, page in ((text1, page1), (text2, page2)):
        for t in page["tasks"]:
            block = f"{t['url']}\n  [READY] {t['title']}\n  acme/gadgets  •  "
            assert block in text, text
        assert text.count("+1/-0 • 1 file") == len(page["tasks"])

    # the environment filter: all tasks without it, only acme/gadgets' with it
    everything = json.loads(cloud_list("--json").stdout)
    ids = [t["id"] for t in everything["tasks"]]
    assert listed["widget"] in ids and set(gadgets) <= set(ids)
    widget = next(t for t in everything["tasks"] if t["id"] == listed["widget"])
    assert widget["environment_label"] == "acme/widgets"
    assert widget["summary"] == {"files_changed": 2, "lines_added": 2, "lines_removed": 1}
    assert listed["widget"] not in [t["id"] for t in items]


# --------------------------------------------------------------------------- codex apply


@pytest.mark.parametrize("how", ["config.toml", "-c"])
def test_top_level_codex_apply_stages_the_diff(
    how: str,
    user: CodexUser,
    proxy: RecordingProxy,
    token: str,
    envs: dict[str, Any],
    listed: dict[str, Any],
    tmp_path: Path,
) -> None:
    task_id = listed["widget"]
    checkout = clone(envs["widgets"]["repo"], tmp_path / "checkout")
    args = ["apply", task_id]
    if how == "config.toml":
        runner = user  # chatgpt_base_url written by `wham codex-auth`
    else:
        home = tmp_path / "home"
        home.mkdir()
        (home / "config.toml").write_text('cli_auth_credentials_store = "file"\n')
        codex_auth(proxy.url, token, home)
        assert "chatgpt_base_url" not in (home / "config.toml").read_text()
        runner = CodexUser(home)
        args = ["-c", f'chatgpt_base_url="{proxy.url}/backend-api/"', *args]
    proxy.calls.clear()
    r = runner.run(current_codex(), *args, cwd=checkout)
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert "Successfully applied diff" in r.stdout
    assert f"/backend-api/wham/tasks/{task_id}" in proxy.paths()
    assert git("status", "--porcelain", cwd=checkout).splitlines() == ["M  calc.py", "A  hello.txt"]
    assert (checkout / "calc.py").read_text() == "def add(a, b):\n    return a + b\n"
    assert (checkout / "hello.txt").read_text() == "hello\n"
    diff = pr_diff(listed["widget_details"]["current_diff_task_turn"])
    assert git("diff", "--cached", cwd=checkout).rstrip("\n") == diff.rstrip("\n")


# --------------------------------------------------------------------------- codex cloud TUI


@pytest.fixture(scope="module")
def tui_tasks(
    api: httpx.Client, model: ScriptedModel, envs: dict[str, Any], listed: dict[str, Any]
) -> dict[str, Any]:
    """Besides ``listed``'s tasks: a best-of-2 task, and a task whose attempt was pushed as a
    PR branch to the environment's repository."""
    model.script = [RANDOM_NOTE, FIX_ADD, Say("Two ways to fix add.")]
    best = create_task(api, envs["widgets"]["id"], "Fix add twice", attempts=2)
    best_details = wait_completed(api, best)
    model.script = [Shell("echo pushed > pushed.txt"), Say("Wrote the pushed note.")]
    pushed = create_task(api, envs["gadgets"]["id"], "Write the pushed note")
    pushed_details = wait_completed(api, pushed)
    turn_id = pushed_details["current_assistant_turn"]["id"]
    r = api.post(f"tasks/{pushed}/turns/{turn_id}/pr")
    assert r.status_code == 200, r.text
    assert r.json()["pull_request"]["state"] == "pushed"
    return {"best": best, "best_details": best_details, "pushed": pushed}


def _selected(title: str) -> Callable[[str], bool]:
    marker = "\u203a"  # the list's selection mark
    return lambda screen: re.search(rf"{marker}\s*\[READY\] {re.escape(title)}", screen) is not None


def _details(term: Tmux, task_title: str, titles: list[str]) -> None:
    """Select the task in the list (↓ from the top) and open it (Enter)."""
    term.keys(*["Up"] * len(titles))  # ↑ stops at the first task
    for _ in range(titles.index(task_title)):
        term.keys("Down")
    term.wait_for(_selected(task_title))
    term.keys("Enter")
    term.wait_for(f"Details: {task_title}")


def test_codex_cloud_tui_lists_every_task_and_shows_attempts_and_diffs(
    user: CodexUser,
    proxy: RecordingProxy,
    api: httpx.Client,
    tui_tasks: dict[str, Any],
    tmp_path: Path,
) -> None:
    """`codex cloud` (the interactive TUI) under tmux: every task is listed (the one with a
    pushed PR branch too), Enter opens a task on its prompt and answer (once), → shows the
    diff, Tab switches attempts."""
    items = api.get("tasks/list", params={"limit": 20}).json()["items"]
    assert 6 <= len(items) < 10  # one screen of the TUI's list
    titles = [t["title"] for t in items]
    best = next(t["title"] for t in items if t["id"] == tui_tasks["best"])
    pushed = next(t["title"] for t in items if t["id"] == tui_tasks["pushed"])
    assert titles.count(best) == titles.count(pushed) == 1
    first = tui_tasks["best_details"]["current_assistant_turn"]
    (second,) = api.get(f"tasks/{tui_tasks['best']}/turns/{first['id']}/sibling_turns").json()[
        "sibling_turns"
    ]
    notes = [note_value(pr_diff(first)), note_value(pr_diff(second))]
    # `codex cloud list` and `status` show the task with the pushed branch, not as a review
    base = f"{proxy.url}/backend-api"
    r = user.cloud("list", "--json", cwd=tmp_path, base_url=base)
    assert r.returncode == 0, r.stderr
    (row,) = [t for t in json.loads(r.stdout)["tasks"] if t["id"] == tui_tasks["pushed"]]
    assert (row["title"], row["status"], row["is_review"]) == (pushed, "ready", False)
    r = user.cloud("status", tui_tasks["pushed"], cwd=tmp_path, base_url=base)
    assert r.returncode == 0 and status_lines(r)[0] == f"[READY] {pushed}", (r.stdout, r.stderr)
    term = Tmux(width=200, height=50)
    try:
        term.start(
            [str(cloud_binary()), "cloud"],
            cwd=tmp_path,  # not a checkout
            env=user.env(base),
        )
        # outside a checkout the TUI picks the environment with the most tasks ...
        term.wait_for(re.compile(r"Cloud Tasks • acme/\w+"))
        # ... o: the environment filter, whose first row is all environments
        term.keys("o")
        term.wait_for("acme/widgets")
        term.keys("Enter")
        screen = term.wait_for(
            lambda s: "Cloud Tasks • All" in s and all(f"[READY] {t}" in s for t in titles)
        )
        listed = re.findall(r"\[READY\] (.+?)\s*│", screen)
        assert listed == titles, screen  # every task, the pushed one too, in the API's order
        assert pushed in listed

        # the best-of-2 task opens on attempt 1: the prompt and its answer, once
        _details(term, best, listed)
        screen = term.wait_for(lambda s: "Attempt 1/2" in s and "Two ways to fix add." in s)
        assert "User prompt" in screen and "Fix add twice" in screen
        assert screen.count("Two ways to fix add.") == 1, screen
        # →: attempt 1's diff
        term.keys("Right")
        screen = term.wait_for(notes[0])
        assert "+    return a + b" in screen and notes[1] not in screen
        # Tab: attempt 2's diff, then (←) its answer, once
        screen = term.press("Tab", notes[1], unchanged="Attempt 1/2")
        assert "Attempt 2/2" in screen and notes[0] not in screen
        term.keys("Left")
        screen = term.wait_for(lambda s: "[Prompt]" in s and "Two ways to fix add." in s)
        assert "Attempt 2/2" in screen and screen.count("Two ways to fix add.") == 1, screen
        # Tab again: back to attempt 1
        screen = term.press(
            "Tab",
            lambda s: "Attempt 1/2" in s and "Two ways to fix add." in s,
            unchanged="Attempt 2/2",
        )
        assert screen.count("Two ways to fix add.") == 1, screen

        # the task with the pushed branch opens too: its diff, then its answer once
        term.keys("Escape")
        term.wait_for(lambda s: "Details:" not in s)
        _details(term, pushed, listed)
        screen = term.wait_for("Wrote the pushed note.")
        assert screen.count("Wrote the pushed note.") == 1, screen
        term.keys("Right")
        term.wait_for("+pushed")
        term.keys("Escape")
        term.wait_for(lambda s: "Details:" not in s)
        term.keys("q")
        term.wait_for(lambda s: "[READY]" not in s)
    finally:
        term.kill()


# --------------------------------------------------------------------------- big diffs


def test_the_codex_cli_gets_and_applies_a_diff_over_the_inline_cap(
    user: CodexUser,
    proxy: RecordingProxy,
    api: httpx.Client,
    model: ScriptedModel,
    tmp_path: Path,
) -> None:
    """Details cut a diff over ``WHAM_INLINE_DIFF_MAX_BYTES`` (1 MiB) for other clients; the
    official CLI, which reads only the inline diff, gets it whole: ``codex cloud diff`` prints
    it and top-level ``codex apply`` applies all of it. (Last in the module: its task is
    archived at the end, so the TUI's list above never sees it.)"""
    repo = make_repo(tmp_path / "bigdiff")
    r = api.post("environments", json={"label": "acme/bigdiff", "repos": [str(repo)]})
    assert r.status_code == 201, r.text
    model.script = [Shell("seq 1 300000 > big.txt"), Say("Wrote a big file.")]
    task_id = create_task(api, r.json()["id"], "Write a big file")
    details = wait_completed(api, task_id)
    (item,) = [i for i in details["current_diff_task_turn"]["output_items"] if i["type"] == "pr"]
    assert item["output_diff"]["truncated"] is True  # this client (httpx) gets it cut
    turn_id = details["current_assistant_turn"]["id"]
    whole = api.get(f"tasks/{task_id}/turns/{turn_id}/diff").text
    assert len(whole.encode()) > 1 << 20 and whole.endswith("\n+300000\n")

    r = user.cloud("diff", task_id, cwd=tmp_path, base_url=proxy.url + "/backend-api")
    assert r.returncode == 0, r.stderr
    assert r.stdout.rstrip("\n") == whole.rstrip("\n")

    checkout = clone(repo, tmp_path / "checkout")
    r = user.run(current_codex(), "apply", task_id, cwd=checkout, timeout=120)
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert "Successfully applied diff" in r.stdout
    assert (checkout / "big.txt").read_text() == "".join(f"{i}\n" for i in range(1, 300001))
    assert api.post(f"tasks/{task_id}/archive").status_code == 200
