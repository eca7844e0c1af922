"""Multi-repository environments: every repository of an environment is cloned into the
workspace (``/workspace/<name>``), the diff and the PR branches cover each one that
changed, and what cannot be laid out side by side is refused when the environment is saved.
"""

from __future__ import annotations

import base64
import json
import logging
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from conftest import Api, Server, completed_task, diff_of, git, make_repo, wait_for_task
from openwham.client import WhamClient, WhamError
from support.browser import sign_in
from support.forge_standin import ForgeStandIn
from support.git_servers import SmartHttpGit, SshGit, bare_copy, keygen
from support.scripted_model import Patch, Say, ScriptedModel, Shell
from test_git_credentials import _shell_outputs, scan


def _repo(path: Path, files: dict[str, str]) -> Path:
    path.mkdir(parents=True)
    git("init", "-q", "-b", "main", cwd=path)
    for name, text in files.items():
        (path / name).write_text(text)
    git("add", ".", cwd=path)
    git("commit", "-q", "-m", "one", cwd=path)
    return path


# --------------------------------------------------------------------------- saving


def test_two_repositories_that_would_share_a_directory_are_refused(
    api: Api, tmp_path: Path
) -> None:
    a = _repo(tmp_path / "one" / "lib", {"a.txt": "a\n"})
    b = _repo(tmp_path / "two" / "Lib", {"b.txt": "b\n"})
    r = api.post("environments", json={"label": "x", "repos": [str(a), str(b)]})
    assert r.status_code == 400, r.text
    detail = r.json()["detail"]
    assert "would both be cloned into the workspace's directory 'Lib'" in detail
    assert str(a) in detail and str(b) in detail
    # the same on update
    env = api.create_env(a)
    r = api.patch(f"environments/{env['id']}", json={"repos": [str(a), str(b)]})
    assert r.status_code == 400 and "would both be cloned" in r.json()["detail"], r.text
    # another name for one of them is the way out
    r = api.post(
        "environments",
        json={"label": "x", "repos": [str(a), {"url": str(b), "name": "acme/lib2"}]},
    )
    assert r.status_code == 201, r.text


def test_a_repository_name_that_is_no_directory_name_is_refused_beside_others(
    api: Api, tmp_path: Path
) -> None:
    a = _repo(tmp_path / "lib", {"a.txt": "a\n"})
    b = _repo(tmp_path / "odd name", {"b.txt": "b\n"})
    r = api.post("environments", json={"label": "x", "repos": [str(a), str(b)]})
    assert r.status_code == 400, r.text
    assert "named 'odd name', which cannot be its directory" in r.json()["detail"]
    # alone it is its workspace, as always: no directory of its own, nothing to refuse
    assert api.post("environments", json={"label": "x", "repos": [str(b)]}).status_code == 201


# --------------------------------------------------------------------------- running

BOTH = """\
*** Begin Patch
*** Update File: widgets/calc.py
@@
 def add(a, b):
-    return a - b
+    return a + b
*** Add File: gadgets/NOTES.md
+gadgets note
*** End Patch"""
MORE = """\
*** Begin Patch
*** Update File: gadgets/calc.py
@@
 def add(a, b):
-    return a - b
+    return b + a
*** End Patch"""


def two_remotes(tmp_path: Path) -> tuple[Path, Path]:
    """Two bare repositories (``widgets.git`` on ``main``, ``gadgets.git`` on ``trunk``)."""
    remotes = []
    for name, branch in (("widgets", "main"), ("gadgets", "trunk")):
        work = make_repo(tmp_path / f"{name}-work")
        git("branch", "-m", branch, cwd=work)
        remote = tmp_path / f"{name}.git"
        git("clone", "-q", "--bare", str(work), str(remote), cwd=tmp_path)
        remotes.append(remote)
    return remotes[0], remotes[1]


def test_one_task_changes_two_repositories(
    engine_server: Server, scripted_model: ScriptedModel, tmp_path: Path
) -> None:
    api = engine_server.api
    widgets, gadgets = two_remotes(tmp_path)
    bases = [git("rev-parse", "HEAD", cwd=r).strip() for r in (widgets, gadgets)]
    r = api.post(
        "environments",
        json={
            "label": "two",
            "repos": [str(widgets), {"url": str(gadgets), "default_branch": "trunk"}],
        },
    )
    assert r.status_code == 201, r.text
    env = r.json()
    keys = env["repos"]
    task_id, turn_id, details = completed_task(
        api,
        scripted_model,
        env["id"],
        "Fix both",
        [Shell("ls /workspace; pwd"), Patch(BOTH), Say("Fixed both.")],
    )
    turn = details["current_assistant_turn"]
    # the agent ran in /workspace, which holds both checkouts
    outputs = json.dumps(turn["worklog"])
    assert "gadgets\\nwidgets" in outputs and "/workspace" in outputs
    # the first repository's diff is the task's (codex apply), with paths inside it
    first = diff_of(details)
    assert first.startswith("diff --git a/calc.py b/calc.py") and "+    return a + b" in first
    # every changed repository's diff, keyed by its key in repos
    repo_diffs = turn["repo_diffs"]
    assert set(repo_diffs) == set(keys)
    assert repo_diffs[keys[0]]["diff"] == first
    assert repo_diffs[keys[0]]["base_commit_sha"] == bases[0] == turn["base_commit_sha"]
    second = repo_diffs[keys[1]]
    assert second["repo_id"] == keys[1] and second["base_commit_sha"] == bases[1]
    assert second["diff"].startswith("diff --git a/NOTES.md b/NOTES.md")
    assert "+gadgets note" in second["diff"] and "calc.py" not in second["diff"]
    assert (second["files_modified"], second["lines_added"]) == (1, 1)
    # each one whole at the turn's diff endpoint (the first one's also without repo_id)
    url = f"tasks/{task_id}/turns/{turn_id}/diff"
    assert api.get(url).text == first
    assert api.get(url, params={"repo_id": keys[0]}).text == first
    assert api.get(url, params={"repo_id": keys[1]}).text == second["diff"]
    r = api.get(url, params={"repo_id": "repo-nope"})
    assert r.status_code == 404 and "no diff for repository 'repo-nope'" in r.json()["detail"]
    # what `codex apply` does with the task's diff (git apply --3way) works in a checkout
    # of the first repository
    checkout = tmp_path / "checkout"
    git("clone", "-q", str(widgets), str(checkout), cwd=tmp_path)
    subprocess.run(
        ["git", "apply", "--3way", "-"], input=first, text=True, cwd=checkout, check=True
    )
    assert (checkout / "calc.py").read_text() == "def add(a, b):\n    return a + b\n"

    # the SDK (and `wham task diff/apply --repository`) picks a repository by name
    sdk = WhamClient("http://testserver", token=api.token, transport=api.client._transport)
    assert sdk.diff(task_id) == first
    assert sdk.diff(task_id, repository="gadgets") == second["diff"]
    assert sdk.diff(task_id, repository=keys[0]) == first
    with pytest.raises(WhamError, match=r"no repository 'nope'.*gadgets, widgets"):
        sdk.diff(task_id, repository="nope")
    gadgets_checkout = tmp_path / "gadgets-checkout"
    git("clone", "-q", str(gadgets), str(gadgets_checkout), cwd=tmp_path)
    applied = sdk.apply(task_id, gadgets_checkout, repository="gadgets")
    assert applied.status == "success", applied
    assert (gadgets_checkout / "NOTES.md").read_text() == "gadgets note\n"

    # the web UI's task page shows each repository's changes under its name
    sign_in(api.client, api.token or "")
    page = api.client.get(f"/tasks/{task_id}").text
    assert "Changes in widgets" in page and "Changes in gadgets" in page
    assert page.index("Changes in widgets") < page.index("Changes in gadgets")
    assert "gadgets note" in page and "return a + b" in page
    download = api.client.get(f"/tasks/{task_id}/turns/{turn_id}/diff?repo_id={keys[1]}")
    assert download.status_code == 200 and download.text == second["diff"]

    # a follow-up starts from both changes and its diffs hold each whole change
    # (the script index counts tool outputs: the resumed conversation brings the first two)
    scripted_model.script = [Say("-"), Say("-"), Patch(MORE), Say("Changed gadgets.")]
    follow = api.follow_up(task_id, turn_id, "Now gadgets' add")
    turn2 = follow["turn"]["id"]
    details = wait_for_task(api, task_id)
    turn = details["current_assistant_turn"]
    assert turn["id"] == turn2 and turn["turn_status"] == "completed", turn["error"]
    assert diff_of(details) == first  # the first repository did not change again
    again = turn["repo_diffs"]
    assert again[keys[0]]["diff"] == first
    assert "+gadgets note" in again[keys[1]]["diff"]
    assert "+    return b + a" in again[keys[1]]["diff"]
    assert again[keys[1]]["base_commit_sha"] == bases[1]


def test_a_branch_of_one_repository_is_used_there_and_the_others_start_from_their_default(
    engine_server: Server, scripted_model: ScriptedModel, tmp_path: Path
) -> None:
    """``POST tasks`` accepts a branch that any repository has (the first one included
    starts from its default branch without it) and refuses one that none has, naming the
    branch and every repository; a follow-up stays on each repository's base."""
    api = engine_server.api
    widgets, gadgets = two_remotes(tmp_path)
    work = tmp_path / "gadgets-topic"
    git("clone", "-q", "-b", "trunk", str(gadgets), str(work), cwd=tmp_path)
    git("checkout", "-q", "-b", "topic", cwd=work)
    (work / "TOPIC.md").write_text("topic only\n")
    git("add", ".", cwd=work)
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "topic", cwd=work)
    git("push", "-q", "origin", "topic", cwd=work)
    topic = git("rev-parse", "topic", cwd=gadgets).strip()
    main = git("rev-parse", "main", cwd=widgets).strip()
    r = api.post(
        "environments",
        json={
            "label": "two",
            "repos": [str(widgets), {"url": str(gadgets), "default_branch": "trunk"}],
        },
    )
    assert r.status_code == 201, r.text
    env = r.json()

    def create(branch: str) -> httpx.Response:
        body = {
            "new_task": {"environment_id": env["id"], "branch": branch},
            "input_items": [
                {
                    "type": "message",
                    "role": "user",
                    "content": [{"content_type": "text", "text": "Fix both"}],
                }
            ],
        }
        return api.post("tasks", json=body)

    r = create("nope")
    assert r.status_code == 400, r.text
    names = [env["repo_map"][k]["repository_full_name"] for k in env["repos"]]
    assert r.json()["detail"] == f"Branch 'nope' not found in any of {', '.join(names)}"
    assert api.get("tasks/list").json()["items"] == []  # nothing was written

    scripted_model.script = [Shell("ls /workspace/gadgets"), Patch(BOTH), Say("Fixed both.")]
    r = create("topic")
    assert r.status_code == 200, r.text
    task_id, turn_id = r.json()["task"]["id"], r.json()["turn"]["id"]
    details = wait_for_task(api, task_id)
    turn = details["current_assistant_turn"]
    assert turn["turn_status"] == "completed", turn["error"]
    assert "TOPIC.md" in json.dumps(turn["worklog"])  # gadgets at topic
    assert turn["base_commit_sha"] == main  # widgets at its default branch
    assert turn["repo_diffs"][env["repos"][1]]["base_commit_sha"] == topic
    # the PR branch of each repository is on its own base
    r = api.post(f"tasks/{task_id}/turns/{turn_id}/pr")
    assert r.status_code == 200, r.text
    branch = r.json()["pull_request"]["head"]
    assert git("rev-parse", f"{branch}~1", cwd=widgets).strip() == main
    assert git("rev-parse", f"{branch}~1", cwd=gadgets).strip() == topic

    # a follow-up (the task's branch is checked again) starts from both bases
    scripted_model.script = [Say("-"), Say("-"), Patch(MORE), Say("Changed gadgets.")]
    follow = api.follow_up(task_id, turn_id, "Now gadgets' add")
    details = wait_for_task(api, task_id)
    turn = details["current_assistant_turn"]
    assert turn["id"] == follow["turn"]["id"]
    assert turn["turn_status"] == "completed", turn["error"]
    again = turn["repo_diffs"][env["repos"][1]]
    assert again["base_commit_sha"] == topic and "+    return b + a" in again["diff"]


def test_a_single_repository_environment_keeps_its_shape(
    engine_server: Server, scripted_model: ScriptedModel, tmp_path: Path
) -> None:
    widgets, _ = two_remotes(tmp_path)
    api = engine_server.api
    env = api.create_env(str(widgets))
    _, _, details = completed_task(
        api,
        scripted_model,
        env["id"],
        "Fix it",
        [
            Shell("ls /workspace"),
            Patch(BOTH.split("*** Add File")[0].replace("widgets/", "") + "*** End Patch"),
            Say("Fixed."),
        ],
    )
    turn = details["current_assistant_turn"]
    assert "repo_diffs" not in turn
    assert diff_of(details).startswith("diff --git a/calc.py b/calc.py")
    assert "calc.py" in json.dumps(turn["worklog"])  # the workspace is the checkout itself


# --------------------------------------------------------------------------- PR branches

GITHUB_TOKEN = "forge-token-1234"


def hosted_pair(tmp_path: Path) -> tuple[Path, Path, Path]:
    """``<root>/acme/widgets.git`` (``main``) and ``<root>/acme/gadgets.git`` (``trunk``):
    the forge's ``acme/widgets`` and ``acme/gadgets``."""
    widgets, gadgets = two_remotes(tmp_path)
    root = tmp_path / "forge"
    (root / "acme").mkdir(parents=True)
    widgets = widgets.rename(root / "acme" / "widgets.git")
    gadgets = gadgets.rename(root / "acme" / "gadgets.git")
    return root, widgets, gadgets


def test_a_pr_push_goes_to_each_changed_repository_with_a_pull_request_in_each(
    engine_server: Server, scripted_model: ScriptedModel, tmp_path: Path
) -> None:
    api = engine_server.api
    root, widgets, gadgets = hosted_pair(tmp_path)
    bases = [git("rev-parse", "HEAD", cwd=r).strip() for r in (widgets, gadgets)]
    forge = ForgeStandIn("github", tokens={GITHUB_TOKEN}).start()
    try:
        r = api.post(
            "forge_connections",
            json={
                "kind": "github",
                "api_base_url": forge.url,
                "token": GITHUB_TOKEN,
                "repo_url_prefix": f"{root}/",
            },
        )
        assert r.status_code == 201, r.text
        r = api.post(
            "environments",
            json={
                "label": "two",
                "repos": [str(widgets), {"url": str(gadgets), "default_branch": "trunk"}],
            },
        )
        assert r.status_code == 201, r.text
        keys = r.json()["repos"]
        task_id, turn_id, _ = completed_task(
            api, scripted_model, r.json()["id"], "Fix both", [Patch(BOTH), Say("Fixed both.")]
        )
        r = api.post(f"tasks/{task_id}/turns/{turn_id}/pr")
        assert r.status_code == 200, r.text
        answered = r.json()
        # one branch of the task's name in each repository, on that repository's base
        branch = answered["pull_request"]["head"]
        assert branch.startswith("codex/fix-both")
        assert git("rev-parse", f"{branch}~1", cwd=widgets).strip() == bases[0]
        assert git("rev-parse", f"{branch}~1", cwd=gadgets).strip() == bases[1]
        assert "return a + b" in git("show", f"{branch}:calc.py", cwd=widgets)
        assert git("show", f"{branch}:NOTES.md", cwd=gadgets) == "gadgets note\n"
        assert "NOTES.md" not in git("ls-tree", "--name-only", branch, cwd=widgets)
        # a pull request in each, against each one's own base branch
        creates = [c for c in forge.calls if c.method == "POST"]
        assert sorted((c.path, c.json["head"], c.json["base"]) for c in creates) == [
            ("/repos/acme/gadgets/pulls", branch, "trunk"),
            ("/repos/acme/widgets/pulls", branch, "main"),
        ]
        details = api.get(f"tasks/{task_id}").json()
        entries = details["task"]["external_pull_requests"]
        assert answered == entries[0]
        assert [e["pull_request"]["url"].split("/acme/")[1] for e in entries] == [
            "widgets/pull/1",
            "gadgets/pull/1",
        ]
        assert [e["pull_request"]["base"] for e in entries] == ["main", "trunk"]
        assert [e["pull_request"]["base_sha"] for e in entries] == bases
        assert len({e["id"] for e in entries}) == 2
        assert all(e["assistant_turn_id"] == turn_id for e in entries)
        (item,) = [t for t in api.get("tasks/list").json()["items"] if t["id"] == task_id]
        assert len(item["pull_requests"]) == 2
        meta = details["task"]["denormalized_metadata"]
        assert (meta["pushed_branch_name"], meta["last_pushed_turn_id"]) == (branch, turn_id)
        assert details["current_assistant_turn"]["pull_request_status"] == "open"
        heads = [git("rev-parse", branch, cwd=r).strip() for r in (widgets, gadgets)]
        # asking again changes nothing
        again = api.post(f"tasks/{task_id}/turns/{turn_id}/pr")
        assert again.status_code == 200 and again.json() == answered
        assert [git("rev-parse", branch, cwd=r).strip() for r in (widgets, gadgets)] == heads
        assert len([c for c in forge.calls if c.method == "POST"]) == 2

        # a follow-up: a commit on top in each repository, the same pull requests updated
        scripted_model.script = [Say("-"), Patch(MORE), Say("Changed gadgets.")]
        turn2 = api.follow_up(task_id, turn_id, "Now gadgets' add")["turn"]["id"]
        assert wait_for_task(api, task_id)["current_assistant_turn"]["turn_status"] == "completed"
        r = api.post(f"tasks/{task_id}/turns/{turn2}/pr")
        assert r.status_code == 200, r.text
        assert git("rev-parse", f"{branch}~1", cwd=gadgets).strip() == heads[1]
        assert "return b + a" in git("show", f"{branch}:calc.py", cwd=gadgets)
        assert git("show", f"{branch}:NOTES.md", cwd=gadgets) == "gadgets note\n"
        assert len([c for c in forge.calls if c.method == "POST"]) == 2
        entries = api.get(f"tasks/{task_id}").json()["task"]["external_pull_requests"]
        assert [e["assistant_turn_id"] for e in entries] == [turn2, turn2]
        assert [e["pull_request"]["number"] for e in entries] == [1, 1]
        assert keys  # (the entries follow the environment's order of repos)

        # merged on the forge: each pull request's state is refreshed on its own
        engine_server.app_state.pr_refresher.every = 0.0
        forge.merge("acme/gadgets", 1)
        deadline = time.monotonic() + 20
        while True:
            entries = api.get(f"tasks/{task_id}").json()["task"]["external_pull_requests"]
            if entries[1]["pull_request"]["merged"]:
                break
            assert time.monotonic() < deadline, entries
            time.sleep(0.1)
        assert [e["pull_request"]["state"] for e in entries] == ["open", "merged"]

        # a fork starts from both changes; its push is its own: new branches (the name is
        # taken by the original's), new pull requests, the original's left alone
        r = api.post(f"tasks/{task_id}/fork", json={"turn_id": turn2})
        assert r.status_code == 200, r.text
        fork = r.json()["task"]["id"]
        fork_details = api.get(f"tasks/{fork}").json()
        fork_turn = fork_details["current_assistant_turn"]["id"]
        assert fork_details["task"]["external_pull_requests"] == []
        assert set(fork_details["current_assistant_turn"]["repo_diffs"]) == set(keys)
        r = api.post(f"tasks/{fork}/turns/{fork_turn}/pr")
        assert r.status_code == 200, r.text
        fork_branch = r.json()["pull_request"]["head"]
        assert fork_branch.startswith(f"{branch}-")
        assert git("rev-parse", f"{fork_branch}~1", cwd=gadgets).strip() == bases[1]
        assert "return b + a" in git("show", f"{fork_branch}:calc.py", cwd=gadgets)
        assert len([c for c in forge.calls if c.method == "POST"]) == 4
        fork_entries = api.get(f"tasks/{fork}").json()["task"]["external_pull_requests"]
        assert [e["pull_request"]["number"] for e in fork_entries] == [2, 2]
        entries = api.get(f"tasks/{task_id}").json()["task"]["external_pull_requests"]
        assert [e["pull_request"]["head"] for e in entries] == [branch, branch]
    finally:
        forge.stop()


def test_only_the_changed_repository_gets_a_branch(
    engine_server: Server, scripted_model: ScriptedModel, tmp_path: Path
) -> None:
    api = engine_server.api
    widgets, gadgets = two_remotes(tmp_path)
    r = api.post("environments", json={"label": "two", "repos": [str(widgets), str(gadgets)]})
    assert r.status_code == 201, r.text
    task_id, turn_id, details = completed_task(
        api, scripted_model, r.json()["id"], "Gadgets only", [Patch(MORE), Say("Done.")]
    )
    # the first repository did not change: the task has no diff for `codex apply`, the
    # second one's is in repo_diffs
    assert diff_of(details) == ""
    sign_in(api.client, api.token or "")
    page = api.client.get(f"/tasks/{task_id}").text
    assert "Changes in gadgets" in page and "Changes in widgets" not in page
    assert "Create PR branch" in page
    turn = details["current_assistant_turn"]
    assert list(turn["repo_diffs"]) == [r.json()["repos"][1]]
    r = api.post(f"tasks/{task_id}/turns/{turn_id}/pr")
    assert r.status_code == 200, r.text
    branch = r.json()["pull_request"]["head"]
    assert r.json()["pull_request"]["base"] == "trunk"
    assert "return b + a" in git("show", f"{branch}:calc.py", cwd=gadgets)
    assert git("for-each-ref", "--format=%(refname)", "refs/heads", cwd=widgets).split() == [
        "refs/heads/main"
    ]


# --------------------------------------------------------------------------- credentials

USER = "deploy"
TOKENS = ("ghp_widgetsTOKEN0123456789abcd", "ghp_gadgetsTOKEN9876543210wxyz")


def test_each_private_repository_is_cloned_and_pushed_with_its_own_credential(
    engine_server: Server, scripted_model: ScriptedModel, tmp_path: Path
) -> None:
    """Two private repositories on two smart-HTTP servers, each taking only its own token:
    one task clones both and its PR push reaches both; no token is in anything the API, the
    agent or the data directory holds."""
    api = engine_server.api
    servers, urls, remotes = [], [], []
    for i, name in enumerate(("widgets", "gadgets")):
        root = tmp_path / f"srv{i}"
        remote = bare_copy(make_repo(tmp_path / f"{name}-work"), root / "acme" / f"{name}.git")
        server = SmartHttpGit(root, USER, TOKENS[i]).start()
        servers.append(server)
        urls.append(f"{server.url}/acme/{name}.git")
        remotes.append(remote)
    try:
        for server, token in zip(servers, TOKENS, strict=True):
            r = api.post(
                "git_credentials",
                json={"url_prefix": f"{server.url}/", "username": USER, "secret": token},
            )
            assert r.status_code == 201, r.text
        r = api.post("environments", json={"label": "two", "repos": urls})
        assert r.status_code == 201, r.text
        task_id, turn_id, details = completed_task(
            api, scripted_model, r.json()["id"], "Fix both", [Patch(BOTH), Say("Fixed both.")]
        )
        r = api.post(f"tasks/{task_id}/turns/{turn_id}/pr")
        assert r.status_code == 200, r.text
        branch = r.json()["pull_request"]["head"]
        assert "return a + b" in git("show", f"{branch}:calc.py", cwd=remotes[0])
        assert git("show", f"{branch}:NOTES.md", cwd=remotes[1]) == "gadgets note\n"
        # each server saw only its own token (a wrong one would have been refused)
        for server, token in zip(servers, TOKENS, strict=True):
            other = TOKENS[1 - TOKENS.index(token)]
            assert any(token in base64.b64decode(h[6:]).decode() for h in server.seen_auth if h)
            assert not any(other in base64.b64decode(h[6:]).decode() for h in server.seen_auth if h)
        answers = [
            api.get(f"tasks/{task_id}").text,
            api.get(f"tasks/{task_id}/turns/{turn_id}/logs").text,
            api.get("environments").text,
            api.get("git_credentials").text,
            json.dumps(details),
        ]
        data = engine_server.app_state.settings.resolved_data_dir
        for token in TOKENS:
            assert all(token not in a for a in answers)
            assert scan(token, data) == []
    finally:
        for server in servers:
            server.stop()


def _split_quoted(text: str) -> str:
    """``text`` as a shell word in two quoted halves: no command line holds it whole."""
    half = len(text) // 2
    return f"'{text[:half]}''{text[half:]}'"


def test_a_second_repository_over_ssh_with_a_deploy_key(
    engine_server: Server,
    scripted_model: ScriptedModel,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The first repository on a smart-HTTP server taking a token, the second over OpenSSH's
    sshd on loopback taking only a deploy key: one task clones both, diffs both and its PR
    push makes the branch in both; no line of the key is in anything the API, the logs, the
    data directory or the agent can see."""
    caplog.set_level(logging.DEBUG)
    api = engine_server.api
    widgets = bare_copy(
        make_repo(tmp_path / "widgets-work"), tmp_path / "http" / "acme" / "widgets.git"
    )
    gadgets = bare_copy(
        make_repo(tmp_path / "gadgets-work"), tmp_path / "ssh" / "acme" / "gadgets.git"
    )
    pub = keygen(tmp_path / "deploy_key")
    key = (tmp_path / "deploy_key").read_text()
    # the key's own lines (the first base64 line is the same in every OpenSSH key)
    needles = [line for line in key.splitlines()[2:] if line and not line.startswith("-")]
    assert len(needles) >= 3
    httpd = SmartHttpGit(tmp_path / "http", USER, TOKENS[0]).start()
    sshd = SshGit(tmp_path / "sshd", pub).start()
    try:
        r = api.post(
            "git_credentials",
            json={"url_prefix": f"{httpd.url}/", "username": USER, "secret": TOKENS[0]},
        )
        assert r.status_code == 201, r.text
        r = api.post(
            "git_credentials",
            json={
                "url_prefix": f"ssh://{sshd.user}@127.0.0.1:{sshd.port}/",
                "ssh_private_key": key,
                "known_hosts": sshd.known_hosts,
            },
        )
        assert r.status_code == 201, r.text
        urls = [f"{httpd.url}/acme/widgets.git", sshd.url(gadgets)]
        r = api.post("environments", json={"label": "two", "repos": urls})
        assert r.status_code == 201, r.text
        env = r.json()
        keys = env["repos"]
        assert [env["repo_map"][k]["clone_url"] for k in keys] == urls
        # the agent looks for the key everywhere it can see: files, every process's
        # environment and command line (patterns split in halves, given to grep on a pipe)
        patterns = " ".join(_split_quoted(n) for n in [*needles, TOKENS[0]])
        look = (
            f"T=$(printf '%s\\n' {patterns}); "
            'F=$(grep -rIlF --exclude-dir=proc --exclude-dir=sys -f <(printf %s "$T") / '
            "2>/dev/null | head); "
            "P=$(for p in /proc/[0-9]*; do cat $p/environ $p/cmdline 2>/dev/null; done "
            '| tr "\\0" " " | grep -cF -f <(printf %s "$T")); '
            'echo "files:[$F] processes:$P patterns:$(printf %s "$T" | wc -l)"'
        )
        task_id, turn_id, details = completed_task(
            api,
            scripted_model,
            env["id"],
            "Fix both",
            [Shell("ls /workspace"), Shell(look), Patch(BOTH), Say("Fixed both.")],
        )
        turn = details["current_assistant_turn"]
        outputs = _shell_outputs(details)
        assert any("gadgets\nwidgets" in out for out in outputs), outputs
        # (patterns: the key's lines and the token; $(…) drops the last newline)
        sightings = [out for out in outputs if "files:[" in out]
        assert sightings == [f"files:[] processes:0 patterns:{len(needles)}\n"], sightings
        # both diffs
        repo_diffs = turn["repo_diffs"]
        assert set(repo_diffs) == set(keys)
        assert "+    return a + b" in repo_diffs[keys[0]]["diff"]
        assert repo_diffs[keys[1]]["diff"].startswith("diff --git a/NOTES.md b/NOTES.md")
        # the PR branch in both: over HTTPS with the token, over SSH with the key
        r = api.post(f"tasks/{task_id}/turns/{turn_id}/pr")
        assert r.status_code == 200, r.text
        branch = r.json()["pull_request"]["head"]
        assert "return a + b" in git("show", f"{branch}:calc.py", cwd=widgets)
        assert git("show", f"{branch}:NOTES.md", cwd=gadgets) == "gadgets note\n"
        entries = api.get(f"tasks/{task_id}").json()["task"]["external_pull_requests"]
        assert [e["pull_request"]["head"] for e in entries] == [branch, branch]
        # the scan: API answers, logs, every file of the data directory
        answers = [
            api.get(f"tasks/{task_id}").text,
            api.get(f"tasks/{task_id}/turns/{turn_id}/logs").text,
            api.get("environments").text,
            api.get("git_credentials").text,
            api.get("tasks/list").text,
            json.dumps(details),
            caplog.text,
        ]
        data = engine_server.app_state.settings.resolved_data_dir
        for needle in needles:
            assert not [a for a in answers if needle in a]
            assert scan(needle, data) == []
    finally:
        sshd.stop()
        httpd.stop()


# --------------------------------------------------------------------------- defences


def test_the_agent_cannot_change_either_repositorys_shared_mirror_objects(
    engine_server: Server, scripted_model: ScriptedModel, tmp_path: Path
) -> None:
    """Each repository's mirror objects are bound read-only at ``/mirror-objects/<name>``
    (docs/security.md, "Workspaces borrow the mirror's objects, read-only"); writing,
    removing and renaming there fail, and the mirrors stay whole."""
    api = engine_server.api
    widgets, gadgets = two_remotes(tmp_path)
    r = api.post("environments", json={"label": "two", "repos": [str(widgets), str(gadgets)]})
    assert r.status_code == 201, r.text
    attack = (
        "ls /mirror-objects | tr '\\n' ' '; echo; "
        "for d in /mirror-objects/*; do "
        "n=$(find $d -type f | wc -l); "
        "touch $d/evil 2>/dev/null && echo WROTE $d; "
        "mkdir $d/evil-dir 2>/dev/null && echo MADE $d; "
        "find $d -type f -exec rm -f {} + 2>/dev/null; "
        "for f in $(find $d -type f); do mv $f $f.x 2>/dev/null && echo MOVED $f; "
        ": > $f 2>/dev/null && echo TRUNCATED $f; done; "
        '[ "$(find $d -type f | wc -l)" = "$n" ] || echo GONE $d; '
        "done; git -C gadgets cat-file -t HEAD; echo end"
    )
    _, _, details = completed_task(
        api, scripted_model, r.json()["id"], "Attack", [Shell(attack), Say("Tried.")]
    )
    out = "".join(
        str(part)
        for message in details["current_assistant_turn"]["worklog"]["messages"]
        if message["author"]["role"] == "tool"
        for part in message["content"].get("parts") or []
    )
    assert "gadgets widgets" in out and "commit" in out and "end" in out, out
    for word in ("WROTE", "MADE", "GONE", "MOVED", "TRUNCATED"):
        assert word not in out, out
    assert "repo_diffs" not in details["current_assistant_turn"]  # nothing changed
    mirrors = list((engine_server.app_state.settings.resolved_data_dir / "mirrors").glob("*.git"))
    assert len(mirrors) == 2
    for mirror in mirrors:
        assert not (mirror / "objects" / "evil").exists()
        git("fsck", "--no-dangling", cwd=mirror)
        assert git("cat-file", "-t", "HEAD", cwd=mirror).strip() == "commit"


def test_a_push_cut_short_in_one_repository_is_finished_when_asked_again(
    engine_server: Server, scripted_model: ScriptedModel, tmp_path: Path
) -> None:
    """The second repository refuses the push (a pre-receive hook): the first one has its
    branch, the answer is the refusal; asked again once the remote takes it, the first
    repository's commit is the same one (no second commit), the second gets its branch."""
    api = engine_server.api
    widgets, gadgets = two_remotes(tmp_path)
    hook = gadgets / "hooks" / "pre-receive"
    hook.write_text("#!/bin/sh\necho 'refused by policy' >&2\nexit 1\n")
    hook.chmod(0o755)
    r = api.post("environments", json={"label": "two", "repos": [str(widgets), str(gadgets)]})
    assert r.status_code == 201, r.text
    task_id, turn_id, _ = completed_task(
        api, scripted_model, r.json()["id"], "Fix both", [Patch(BOTH), Say("Fixed both.")]
    )
    r = api.post(f"tasks/{task_id}/turns/{turn_id}/pr")
    assert r.status_code in (409, 502) and "refused by policy" in r.text, r.text
    (branch,) = git(
        "for-each-ref", "--format=%(refname:short)", "refs/heads/codex", cwd=widgets
    ).split()
    first = git("rev-parse", branch, cwd=widgets).strip()
    assert "codex" not in git("for-each-ref", cwd=gadgets)
    hook.unlink()
    r = api.post(f"tasks/{task_id}/turns/{turn_id}/pr")
    assert r.status_code == 200, r.text
    assert git("rev-parse", branch, cwd=widgets).strip() == first  # the same commit
    assert git("show", f"{branch}:NOTES.md", cwd=gadgets) == "gadgets note\n"
    entries = api.get(f"tasks/{task_id}").json()["task"]["external_pull_requests"]
    assert [e["pull_request"]["head"] for e in entries] == [branch, branch]
    assert entries[0]["pull_request"]["head_sha"] == first


def test_a_secret_in_another_repositorys_change_is_redacted_and_not_pushed(
    engine_server: Server, scripted_model: ScriptedModel, tmp_path: Path
) -> None:
    """The setup script (which has the secrets) writes one into the second repository: its
    stored diff has ``[redacted]``, and the PR push of the attempt is refused naming the
    secret and the file (with its repository's directory), in no repository a branch."""
    api = engine_server.api
    widgets, gadgets = two_remotes(tmp_path)
    secret = "s3cr3t-value-for-gadgets"
    r = api.post(
        "environments",
        json={
            "label": "two",
            "repos": [str(widgets), str(gadgets)],
            "secrets": {"DEPLOY_KEY": secret},
            "setup": ['printf "%s\\n" "$DEPLOY_KEY" > gadgets/leak.txt'],
        },
    )
    assert r.status_code == 201, r.text
    keys = r.json()["repos"]
    task_id, turn_id, details = completed_task(
        api, scripted_model, r.json()["id"], "Fix both", [Patch(BOTH), Say("Fixed both.")]
    )
    text = api.get(f"tasks/{task_id}").text
    assert secret not in text
    leak = details["current_assistant_turn"]["repo_diffs"][keys[1]]["diff"]
    assert "leak.txt" in leak and "[redacted]" in leak
    r = api.post(f"tasks/{task_id}/turns/{turn_id}/pr")
    assert r.status_code == 409, r.text
    assert "'DEPLOY_KEY' in 'gadgets/leak.txt'" in r.json()["detail"] and secret not in r.text
    for remote in (widgets, gadgets):
        assert "codex" not in git("for-each-ref", cwd=remote)
