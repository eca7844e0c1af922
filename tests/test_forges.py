"""Pull requests on a forge (issue 18): with a forge connection for the repository, ``POST
…/turns/{id}/pr`` pushes the branch and opens the pull request through the forge's REST API
(GitHub, GitLab, Gitea stand-ins on loopback, built from their published API shapes); the
task then shows the real number, URL and state, a later push updates the same pull request,
its state is refreshed when the task is read, and the forge's refusals become clear answers.
The token is never shown, logged or stored in clear."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from conftest import (
    Api,
    Server,
    cli_user,
    completed_task,
    git,
    make_repo,
    run_cli,
    wait_for_task,
)
from openwham.cli import render
from openwham.service import forges as forge_service
from openwham.store import models as m
from openwham.wire import TaskDetails
from support.browser import sign_in
from support.forge_standin import ForgeStandIn
from support.scripted_model import Patch, Say, ScriptedModel
from test_pr_branches import FIX, MORE

TOKEN = "forge-token-1234"
BOT = "forge-bot-token-5678"


def hosted_remote(tmp_path: Path) -> tuple[Path, Path]:
    """A bare repository at ``<root>/acme/widgets.git`` (the forge's ``acme/widgets``)."""
    work = make_repo(tmp_path / "work")
    root = tmp_path / "forge"
    (root / "acme").mkdir(parents=True)
    remote = root / "acme" / "widgets.git"
    git("clone", "-q", "--bare", str(work), str(remote), cwd=tmp_path)
    return root, remote


@pytest.fixture(params=["github", "gitlab", "gitea"])
def forge(request: pytest.FixtureRequest) -> Iterator[ForgeStandIn]:
    standin = ForgeStandIn(request.param, tokens={TOKEN, BOT}).start()
    yield standin
    standin.stop()


def connect(api: Api, forge: ForgeStandIn, root: Path, **extra: Any) -> dict[str, Any]:
    body = {
        "kind": forge.kind,
        "api_base_url": forge.url,
        "token": TOKEN,
        "repo_url_prefix": f"{root}/",
        **extra,
    }
    r = api.post("forge_connections", json=body)
    assert r.status_code == 201, r.text
    return dict(r.json())


def creates(forge: ForgeStandIn) -> list[Any]:
    return [c for c in forge.calls if c.method == "POST"]


def test_a_pull_request_is_opened_updated_and_refreshed(
    engine_server: Server, scripted_model: ScriptedModel, tmp_path: Path, forge: ForgeStandIn
) -> None:
    api = engine_server.api
    root, remote = hosted_remote(tmp_path)
    connection = connect(api, forge, root)
    assert TOKEN not in str(connection) and connection["has_bot_token"] is False
    env = api.create_env(str(remote))
    task_id, turn_id, _ = completed_task(
        api, scripted_model, env["id"], "Fix the add function", [Patch(FIX), Say("Fixed add.")]
    )

    r = api.post(f"tasks/{task_id}/turns/{turn_id}/pr", json={"draft": True})
    assert r.status_code == 200, r.text
    pr = r.json()["pull_request"]
    branch = pr["head"]
    assert git("rev-parse", branch, cwd=remote).strip()  # the branch was pushed first
    (create,) = creates(forge)
    title = api.get(f"tasks/{task_id}").json()["task"]["title"]
    if forge.kind == "gitlab":
        assert create.path == "/projects/acme/widgets/merge_requests"
        assert create.headers["private-token"] == TOKEN
        assert create.json["source_branch"] == branch and create.json["target_branch"] == "main"
        assert create.json["title"] == f"Draft: {title}"
        text = create.json["description"]
        assert pr["url"].endswith("/acme/widgets/-/merge_requests/1")
    else:
        assert create.path == "/repos/acme/widgets/pulls"
        scheme = "Bearer" if forge.kind == "github" else "token"
        assert create.headers["authorization"] == f"{scheme} {TOKEN}"
        assert (create.json["head"], create.json["base"]) == (branch, "main")
        assert create.json["title"] == (f"WIP: {title}" if forge.kind == "gitea" else title)
        assert create.json.get("draft", True) is True
        text = create.json["body"]
    assert text.startswith("Fixed add.")
    assert f"/codex/tasks/{task_id}" in text  # a link back to the task
    assert (pr["number"], pr["state"], pr["draft"], pr["merged"]) == (1, "open", True, False)
    assert pr["title"] == title and pr["head"] == branch

    # the task, the list and the attempt show it
    details = api.get(f"tasks/{task_id}").json()
    assert details["task"]["external_pull_requests"][0]["pull_request"]["url"] == pr["url"]
    (item,) = [t for t in api.get("tasks/list").json()["items"] if t["id"] == task_id]
    assert [p["pull_request"]["number"] for p in item["pull_requests"]] == [1]
    assert details["current_assistant_turn"]["pull_request_status"] == "open"

    # asking again changes nothing on the forge's side but the text
    again = api.post(f"tasks/{task_id}/turns/{turn_id}/pr")
    assert again.status_code == 200 and again.json()["pull_request"]["number"] == 1
    assert len(creates(forge)) == 1

    # a follow-up's push updates the same pull request
    scripted_model.script = [Say("(not reached)"), Patch(MORE), Say("Added notes.")]
    turn2 = api.follow_up(task_id, turn_id, "Add a note")["turn"]["id"]
    assert wait_for_task(api, task_id)["current_assistant_turn"]["turn_status"] == "completed"
    r = api.post(f"tasks/{task_id}/turns/{turn2}/pr")
    assert r.status_code == 200, r.text
    assert r.json()["pull_request"]["number"] == 1 and len(creates(forge)) == 1
    update = [c for c in forge.calls if c.method in ("PATCH", "PUT")][-1]
    field = "description" if forge.kind == "gitlab" else "body"
    assert "Added notes." in update.json[field]

    # merged on the forge: reading the task refreshes it (in the background)
    engine_server.app_state.pr_refresher.every = 0.0
    forge.merge("acme/widgets", 1)
    deadline = time.monotonic() + 20
    while True:
        pr = api.get(f"tasks/{task_id}").json()["task"]["external_pull_requests"][0]
        if pr["pull_request"]["merged"]:
            break
        assert time.monotonic() < deadline, pr
        time.sleep(0.1)
    assert pr["pull_request"]["state"] == "merged"


def test_forge_refusals_are_clear_answers_and_the_token_stays_hidden(
    engine_server: Server,
    scripted_model: ScriptedModel,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    forge = ForgeStandIn("github", tokens={TOKEN, BOT}).start()
    try:
        api = engine_server.api
        root, remote = hosted_remote(tmp_path)
        env = api.create_env(str(remote))
        task_id, turn_id, _ = completed_task(
            api, scripted_model, env["id"], "Fix add", [Patch(FIX), Say("Fixed.")]
        )
        url = f"tasks/{task_id}/turns/{turn_id}/pr"

        # a wrong token: 502 naming the forge and what it said, never the token
        wrong = connect(api, forge, root, token="wrong-token-0000")
        r = api.post(url)
        assert r.status_code == 502, r.text
        detail = r.json()["detail"]
        assert "GitHub" in detail and "Bad credentials" in detail and "401" in detail
        assert "wrong-token-0000" not in r.text
        # the branch was pushed all the same, and stays the task's
        details = api.get(f"tasks/{task_id}").json()
        assert details["task"]["external_pull_requests"][0]["pull_request"]["state"] == "pushed"
        assert api.delete(f"forge_connections/{wrong['id']}").status_code == 204

        # rate limited: 429 with when to retry
        connect(api, forge, root)
        reset = int(time.time()) + 120
        forge.fail_next = (
            403,
            {"message": "API rate limit exceeded"},
            {"x-ratelimit-remaining": "0", "x-ratelimit-reset": str(reset)},
        )
        r = api.post(url)
        assert r.status_code == 429, r.text
        assert "rate limited" in r.json()["detail"]
        assert 60 < float(r.json()["retry_after"]) <= 121

        # validation refused: 409 with the forge's words
        forge.fail_next = (
            422,
            {"message": "Validation Failed", "errors": [{"message": "base is not a branch"}]},
            {},
        )
        r = api.post(url)
        assert r.status_code == 409 and "base is not a branch" in r.json()["detail"]

        # one already open for the branch (opened by hand): adopted, not a second one
        branch = details["task"]["external_pull_requests"][0]["pull_request"]["head"]
        forge._new("acme/widgets", {"title": "by hand", "head": branch, "base": "main"})
        r = api.post(url)
        assert r.status_code == 200, r.text
        assert r.json()["pull_request"]["number"] == 1
        assert len(forge.prs) == 1

        # the token appears nowhere: answers, logs, the database file
        everything = "\n".join(
            api.get(p).text
            for p in ("forge_connections", f"tasks/{task_id}", "tasks/list", "tasks")
        )
        assert TOKEN not in everything and TOKEN not in caplog.text
        data = engine_server.app_state.settings.resolved_data_dir
        for path in data.rglob("*"):
            if path.is_file():
                assert TOKEN.encode() not in path.read_bytes(), path
    finally:
        forge.stop()


def test_bot_authorship_uses_the_bot_token(
    engine_server: Server, scripted_model: ScriptedModel, tmp_path: Path
) -> None:
    forge = ForgeStandIn("gitea", tokens={TOKEN, BOT}).start()
    try:
        api = engine_server.api
        root, remote = hosted_remote(tmp_path)
        connect(api, forge, root, bot_token=BOT)
        env = api.create_env(str(remote))
        task_id, turn_id, _ = completed_task(
            api, scripted_model, env["id"], "Fix add", [Patch(FIX), Say("Fixed.")]
        )
        r = api.post(f"tasks/{task_id}/turns/{turn_id}/pr", json={"pr_authorship_mode": "bot"})
        assert r.status_code == 200, r.text
        assert creates(forge)[0].headers["authorization"] == f"token {BOT}"
        r = api.post(f"tasks/{task_id}/turns/{turn_id}/pr", json={"pr_authorship_mode": "robot"})
        assert r.status_code == 400
    finally:
        forge.stop()


# --------------------------------------------------------------------------- connections


def test_connections_are_the_accounts_own_and_write_only(server: Server, api: Api) -> None:
    r = api.post("forge_connections", json={"kind": "github", "token": TOKEN})
    assert r.status_code == 201, r.text
    made = r.json()
    assert made["api_base_url"] == "https://api.github.com"
    assert made["repo_url_prefix"] == "https://github.com/"
    listed = api.get("forge_connections").json()["items"]
    assert listed == [made] and TOKEN not in str(listed)
    other = api.as_(server.other_account_token())
    assert other.get("forge_connections").json()["items"] == []
    assert other.delete(f"forge_connections/{made['id']}").status_code == 404
    assert api.delete(f"forge_connections/{made['id']}").status_code == 204
    assert api.get("forge_connections").json()["items"] == []


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"kind": "bitbucket", "token": "t"}, "kind"),
        ({"kind": "gitea", "token": "t"}, "api_base_url is required"),
        ({"kind": "github", "token": "two words"}, "one word"),
        ({"kind": "github", "token": ""}, "token"),
        ({"kind": "github", "token": "t", "api_base_url": "ftp://x"}, "http:// or https://"),
        ({"kind": "github", "token": "t", "api_base_url": "https://u:p@x/"}, "credentials"),
        ({"kind": "github", "token": "t", "pr_authorship_mode": "bot"}, "needs a bot_token"),
        ({"kind": "github", "token": "t", "extra": 1}, "extra"),
    ],
)
def test_bad_connections_are_refused(api: Api, body: dict[str, Any], words: str) -> None:
    r = api.post("forge_connections", json=body)
    assert r.status_code == 400, r.text
    assert words in r.json()["detail"]
    assert api.get("forge_connections").json()["items"] == []


def test_repositories_match_by_prefix_and_ssh_urls_in_https_form(server: Server, api: Api) -> None:
    gh = api.post("forge_connections", json={"kind": "github", "token": "a"}).json()
    ghe = api.post(
        "forge_connections",
        json={"kind": "github", "token": "b", "api_base_url": "https://ghe.example.com/api/v3"},
    ).json()
    with server.app_state.db.session() as s:
        acc = s.scalars(select(m.ForgeConnection.account_id)).first()
        assert acc is not None

        def found(url: str) -> str | None:
            row = forge_service.match(s, acc, url)
            return row.id if row is not None else None

        assert found("https://github.com/acme/widgets.git") == gh["id"]
        assert found("git@github.com:acme/widgets.git") == gh["id"]
        assert found("ssh://git@github.com/acme/widgets.git") == gh["id"]
        assert found("https://ghe.example.com/acme/widgets.git") == ghe["id"]
        assert found("https://github.com.evil.example/acme/widgets.git") is None
        assert found("https://gitlab.com/acme/widgets.git") is None


# --------------------------------------------------------------------------- CLI and web


def test_cli_adds_lists_and_removes_connections_with_the_token_from_stdin(
    live_server: Any, tmp_path: Path
) -> None:
    env = cli_user(tmp_path / "home", live_server.url, live_server.token())
    r = run_cli(env, "forge", "add", "gitea", "--api-url", "https://git.example.com/api/v1")
    assert r.returncode == 2 and "--token-stdin" in r.stderr
    r = run_cli(
        env,
        "forge",
        "add",
        "gitea",
        "--api-url",
        "https://git.example.com/api/v1",
        "--token-stdin",
        "--bot-token-stdin",
        "--json",
        stdin=f"{TOKEN}\n{BOT}\n",
    )
    assert r.returncode == 0, r.stderr
    made = json.loads(r.stdout)
    assert made["repo_url_prefix"] == "https://git.example.com/" and made["has_bot_token"]
    listed = run_cli(env, "forge", "list")
    assert listed.returncode == 0 and made["id"] in listed.stdout
    assert "gitea  https://git.example.com/api/v1  for https://git.example.com/" in listed.stdout
    assert TOKEN not in listed.stdout + r.stdout and BOT not in listed.stdout + r.stdout
    r = run_cli(env, "forge", "add", "bitbucket", "--token-stdin", stdin=f"{TOKEN}\n")
    assert r.returncode != 0 and "kind" in r.stderr and TOKEN not in r.stderr
    assert run_cli(env, "forge", "remove", made["id"]).returncode == 0
    assert json.loads(run_cli(env, "forge", "list", "--json").stdout) == []


def test_task_show_and_the_web_page_show_the_pull_request(
    engine_server: Server, scripted_model: ScriptedModel, tmp_path: Path
) -> None:
    forge = ForgeStandIn("github", tokens={TOKEN}).start()
    try:
        api = engine_server.api
        root, remote = hosted_remote(tmp_path)
        connect(api, forge, root)
        env = api.create_env(str(remote))
        task_id, turn_id, _ = completed_task(
            api, scripted_model, env["id"], "Fix add", [Patch(FIX), Say("Fixed.")]
        )
        pr = api.post(f"tasks/{task_id}/turns/{turn_id}/pr").json()["pull_request"]
        details = TaskDetails.model_validate(api.get(f"tasks/{task_id}").json())
        shown = render.pr_branch(details.task)
        assert shown is not None
        assert (shown["number"], shown["state"], shown["url"]) == (1, "open", pr["url"])
        client = engine_server.api.client
        sign_in(client, engine_server.api.token or "")
        page = client.get(f"/codex/tasks/{task_id}").text
        assert f'href="{pr["url"]}"' in page and "PR #1 open" in page
    finally:
        forge.stop()


def test_web_forges_page_adds_lists_and_removes(server: Server) -> None:
    client = server.api.client
    csrf = sign_in(client, server.api.token or "")
    page = client.get("/settings/forges")
    assert page.status_code == 200 and "No forges connected" in page.text
    # a Gitea without its API URL: 400 with the reason, the other values kept, no token echoed
    bad = client.post(
        "/settings/forges",
        data={
            "csrf": csrf,
            "kind": "gitea",
            "repo_url_prefix": "https://git.example/",
            "token": TOKEN,
        },
    )
    assert bad.status_code == 400 and "api_base_url is required" in bad.text
    assert "https://git.example/" in bad.text and TOKEN not in bad.text
    assert server.api.get("forge_connections").json()["items"] == []
    # a forged CSRF token changes nothing
    forged = client.post(
        "/settings/forges", data={"csrf": "nope", "kind": "github", "token": TOKEN}
    )
    assert forged.status_code == 403
    assert server.api.get("forge_connections").json()["items"] == []
    made = client.post(
        "/settings/forges",
        data={"csrf": csrf, "kind": "github", "token": TOKEN, "bot_token": BOT},
        follow_redirects=False,
    )
    assert made.status_code == 303, made.text
    (conn,) = server.api.get("forge_connections").json()["items"]
    assert conn["kind"] == "github" and conn["has_bot_token"]
    listed = client.get("/settings/forges").text
    assert conn["id"] in listed and "https://github.com/" in listed
    assert TOKEN not in listed and BOT not in listed
    gone = client.post(
        f"/settings/forges/{conn['id']}/remove", data={"csrf": csrf}, follow_redirects=False
    )
    assert gone.status_code == 303
    assert server.api.get("forge_connections").json()["items"] == []
