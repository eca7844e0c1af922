"""A task with a real pull request on a forge, as the official Codex CLI shows it (issue 18).

``codex cloud list`` (0.151.0) prints no pull-request fields: its text has the task's URL,
``[STATUS] title``, label and diff stats, and ``--json`` turns a non-empty ``pull_requests``
in the list item into ``is_review: true`` (docs/reference/codex-cli.md §4.3). So what a user
of the CLI can see of the pull request is that flag, while ``status`` and the text list work
as for any task; the number and URL are in the API's list item. One ``wham serve`` process
(the scripted model behind it) and the GitHub stand-in on loopback for the module.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import LiveServer, git, make_repo
from support.codex_cloud import CodexUser
from support.forge_standin import ForgeStandIn
from support.scripted_model import Say, ScriptedModel
from test_codex_compat import FIX_ADD, codex_auth, create_task, status_lines, wait_completed

TOKEN = "forge-token-1234"


@pytest.fixture(scope="module")
def api(served: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=f"{served.url}/backend-api/wham",
        headers={"Authorization": f"Bearer {served.token()}"},
        timeout=30,
    ) as c:
        yield c


@pytest.fixture(scope="module")
def forge() -> Iterator[ForgeStandIn]:
    standin = ForgeStandIn("github", tokens={TOKEN}).start()
    try:
        yield standin
    finally:
        standin.stop()


@pytest.fixture(scope="module")
def opened(
    tmp_path_factory: pytest.TempPathFactory,
    api: httpx.Client,
    model: ScriptedModel,
    forge: ForgeStandIn,
) -> dict[str, Any]:
    """A completed task in ``acme/widgets`` (a bare repository the forge connection serves)
    whose PR push opened pull request #1 on the stand-in; and a task with no pull request."""
    root = tmp_path_factory.mktemp("forge")
    work = make_repo(root / "work")
    (root / "acme").mkdir()
    remote = root / "acme" / "widgets.git"
    git("clone", "-q", "--bare", str(work), str(remote), cwd=root)
    r = api.post(
        "forge_connections",
        json={
            "kind": "github",
            "api_base_url": forge.url,
            "token": TOKEN,
            "repo_url_prefix": f"{root}/",
        },
    )
    assert r.status_code == 201, r.text
    r = api.post("environments", json={"label": "acme/widgets", "repos": [str(remote)]})
    assert r.status_code == 201, r.text
    env_id = r.json()["id"]
    model.script = [FIX_ADD, Say("Fixed add.")]
    with_pr = create_task(api, env_id, "Fix add")
    details = wait_completed(api, with_pr)
    turn_id = details["current_assistant_turn"]["id"]
    r = api.post(f"tasks/{with_pr}/turns/{turn_id}/pr")
    assert r.status_code == 200, r.text
    model.script = [Say("Nothing to change.")]
    plain = create_task(api, env_id, "Look around")
    wait_completed(api, plain)
    return {"with_pr": with_pr, "plain": plain, "pr": r.json()["pull_request"], "remote": remote}


@pytest.fixture(scope="module")
def user(
    tmp_path_factory: pytest.TempPathFactory, served: LiveServer, opened: dict[str, Any]
) -> CodexUser:
    home = tmp_path_factory.mktemp("codex-home")
    codex_auth(served.url, served.token(), home)
    return CodexUser(home)


def test_codex_cloud_list_shows_a_task_with_a_forge_pull_request_as_a_review(
    served: LiveServer,
    api: httpx.Client,
    forge: ForgeStandIn,
    opened: dict[str, Any],
    user: CodexUser,
    tmp_path: Path,
) -> None:
    with_pr, plain = opened["with_pr"], opened["plain"]
    # the forge opened #1 for the pushed branch; the API's list item carries it
    (create,) = [c for c in forge.calls if c.method == "POST"]
    assert create.path == "/repos/acme/widgets/pulls"
    html_url = "https://forge.example/acme/widgets/pull/1"
    assert (opened["pr"]["number"], opened["pr"]["url"]) == (1, html_url)
    assert git("rev-parse", opened["pr"]["head"], cwd=opened["remote"]).strip()
    items = {i["id"]: i for i in api.get("tasks/list", params={"limit": 20}).json()["items"]}
    (entry,) = items[with_pr]["pull_requests"]
    assert (entry["pull_request"]["number"], entry["pull_request"]["url"]) == (1, html_url)
    assert entry["pull_request"]["state"] == "open"
    assert items[plain]["pull_requests"] == []

    base = f"{served.url}/backend-api"
    # --json: the task with the pull request is a review (the only trace of it there)
    r = user.cloud("list", "--json", cwd=tmp_path, base_url=base)
    assert r.returncode == 0, r.stderr
    rows = {t["id"]: t for t in json.loads(r.stdout)["tasks"]}
    assert (rows[with_pr]["status"], rows[with_pr]["is_review"]) == ("ready", True)
    assert (rows[plain]["status"], rows[plain]["is_review"]) == ("ready", False)
    assert rows[with_pr]["title"] == items[with_pr]["title"]
    assert rows[with_pr]["summary"] == {"files_changed": 1, "lines_added": 1, "lines_removed": 1}
    assert html_url not in r.stdout and "pull" not in json.dumps(rows[with_pr])

    # text: URL, [STATUS] title, label and diff stats, as for any task; no PR in it
    r = user.cloud("list", cwd=tmp_path, base_url=base)
    assert r.returncode == 0, r.stderr
    block = f"{served.url}/codex/tasks/{with_pr}\n  [READY] {items[with_pr]['title']}\n"
    assert block + "  acme/widgets  •  " in r.stdout, r.stdout
    assert "+1/-1 • 1 file" in r.stdout
    assert html_url not in r.stdout

    # status: the task as ever (exit 0 because it is ready)
    r = user.cloud("status", with_pr, cwd=tmp_path, base_url=base)
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert status_lines(r)[0] == f"[READY] {items[with_pr]['title']}"
    # and the diff of the task, which is what the pull request holds
    r = user.cloud("diff", with_pr, cwd=tmp_path, base_url=base)
    assert r.returncode == 0 and "+    return a + b" in r.stdout, r.stderr
