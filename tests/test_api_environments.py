"""Environment endpoints end to end (in-process), under both path styles."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from conftest import Api, Server, git
from openwham.store import models as m

ENV_ID = re.compile(r"^[0-9a-f]{32}$")
REDACTED = "<REDACTED>"
SECRET = "pw-9f2c1e77-plaintext"
OTHER_SECRET = "tok-41d0aa3b-plaintext"


def _make_repo(path: Path, branch: str = "main") -> Path:
    path.mkdir()
    git("init", "-q", "-b", branch, cwd=path)
    (path / "a.txt").write_text("a\n")
    git("add", ".", cwd=path)
    git("commit", "-q", "-m", "one", cwd=path)
    return path


def _repo_of(env: dict[str, Any], index: int = 0) -> dict[str, Any]:
    assert env["repos"][index] in env["repo_map"]
    return dict(env["repo_map"][env["repos"][index]])


def _secret_free_text(api: Api, env_id: str, task_id: str | None = None) -> str:
    """The raw text of every GET that can show an environment (or a snapshot of it)."""
    paths = [
        "environments",
        "environments/recent",
        f"environments/{env_id}",
        f"environments/{env_id}/with-creator-and-machine",
        "environments/with-creators",
        "environments/by-repo/github/acme/widgets",
    ]
    if task_id:
        paths += [f"tasks/{task_id}", f"tasks/{task_id}/turns", "tasks/list", "tasks"]
    texts = []
    for path in paths:
        r = api.get(path)
        assert r.status_code == 200, f"{path}: {r.text}"
        texts.append(r.text)
    return "\n".join(texts)


# --------------------------------------------------------------------------- create


def test_create_with_every_repo_form(api: Api, repo: Path, tmp_path: Path) -> None:
    second = _make_repo(tmp_path / "second", "main")
    body = {
        "label": "acme/widgets",
        "repos": [
            str(repo),
            {"url": str(second), "name": "acme/widgets-alias", "default_branch": "stable"},
            "https://github.com/Acme/Gadgets.git",
            "git@github.com:acme/tools.git",
            {"url": "ssh://git@git.example.com/team/lib.git", "default_branch": "develop"},
        ],
    }
    r = api.post("environments", json=body)
    assert r.status_code == 201, r.text
    env = r.json()
    assert ENV_ID.match(env["id"])
    assert env["label"] == "acme/widgets" and env["task_count"] == 0
    assert len(env["repos"]) == len(set(env["repos"])) == 5
    assert set(env["repo_map"]) == set(env["repos"])
    repos = [_repo_of(env, i) for i in range(5)]

    local, named, https, scp, ssh = repos
    assert local["clone_url"] == str(repo) and local["default_branch"] == "main"
    assert local["repository_full_name"].endswith("/widgets") and local["name"] == "widgets"
    assert named["repository_full_name"] == "acme/widgets-alias"
    assert named["name"] == "widgets-alias" and named["owner"]["login"] == "acme"
    assert named["clone_url"] == str(second) and named["default_branch"] == "stable"
    assert https["clone_url"] == "https://github.com/Acme/Gadgets.git"
    assert https["repository_full_name"] == "Acme/Gadgets" and https["default_branch"] == "main"
    assert scp["clone_url"] == "git@github.com:acme/tools.git"
    assert scp["repository_full_name"] == "acme/tools" and scp["default_branch"] == "main"
    assert ssh["repository_full_name"] == "team/lib" and ssh["default_branch"] == "develop"

    # the defaults of an environment created with only label and repos
    assert env["secrets"] == {} and env["env_vars"] == {}
    assert env["agent_network_access"]["mode"] == "off"
    assert env["workspace_dir"] == "/workspace" and env["is_pinned"] is False
    assert isinstance(env["created_at"], float)
    assert env["cache_settings"]["cache_invalidation_key"]
    assert api.get(f"environments/{env['id']}").json() == env


def test_default_branch_is_detected_from_a_local_repository(api: Api, tmp_path: Path) -> None:
    path = _make_repo(tmp_path / "trunky", "trunk")
    env = api.create_env(path, label="acme/trunky")
    assert _repo_of(env)["default_branch"] == "trunk"
    # a task without a branch starts from the detected default branch
    task = api.create_task(env["id"])
    assert task["turn"]["branch"] == "trunk"
    # an explicit default_branch wins over detection
    env2 = api.create_env(tmp_path, label="x", repos=[{"url": str(path), "default_branch": "rel"}])
    assert _repo_of(env2)["default_branch"] == "rel"


def test_create_rejects_bad_input_with_4xx_and_creates_nothing(
    api: Api, repo: Path, tmp_path: Path
) -> None:
    bad: list[dict[str, Any]] = [
        {"label": "x", "repos": []},
        {"label": "", "repos": [str(repo)]},
        {"label": "x", "repos": [str(tmp_path / "missing")]},
        {"label": "x", "repos": ["ftp://example.com/a.git"]},
        {"label": "x", "repos": [str(repo)], "machine_id": "gpu-large"},
        {"label": "x", "repos": [str(repo)], "env_vars": {"1BAD": "v"}},
        {"label": "x", "repos": [str(repo)], "secrets": {"OK": 5}},
        {"label": "x", "repos": [str(repo)], "unknown_field": True},
        {"label": "x", "repos": [str(repo)], "agent_network_access": {"mode": "maybe"}},
    ]
    for body in bad:
        r = api.post("environments", json=body)
        assert 400 <= r.status_code < 500, (body, r.status_code, r.text)
        assert isinstance(r.json()["detail"], str)
    assert api.get("environments").json() == []


LOADER_NAMES = [
    "LD_PRELOAD",
    "LD_LIBRARY_PATH",
    "LD_AUDIT",
    "BASH_ENV",
    "ENV",
    "PATH",
    "IFS",
    "PS4",
    "SHELLOPTS",
    "GIT_DIR",
    "GIT_SSH_COMMAND",
    "GIT_CONFIG_GLOBAL",
    "PYTHONSTARTUP",
    "PYTHONPATH",
    "NODE_OPTIONS",
    "PERL5OPT",
]


def test_names_that_change_how_programs_load_are_refused_on_create_and_update(
    api: Api, repo: Path
) -> None:
    """As variables or secrets, at create and at update: 400 naming the variable and why;
    nothing stored. Look-alikes that do not change loading are fine."""
    for name in LOADER_NAMES:
        for field in ("env_vars", "secrets"):
            r = api.post(
                "environments", json={"label": "x", "repos": [str(repo)], field: {name: "v"}}
            )
            assert r.status_code == 400, (name, field, r.text)
            detail = r.json()["detail"]
            assert f"{name!r} is not allowed: it " in detail and "docs/api.md" in detail, detail
    assert api.get("environments").json() == []
    env = api.create_env(
        repo, env_vars={"GITHUB_USER": "me", "path": "lower case is not PATH", "LDFLAGS": "-s"}
    )
    for name in ("GIT_DIR", "LD_PRELOAD", "BASH_ENV"):
        for field in ("env_vars", "secrets"):
            r = api.patch(f"environments/{env['id']}", json={field: {name: "v"}})
            assert r.status_code == 400 and repr(name) in r.json()["detail"], (name, r.text)
    stored = api.get(f"environments/{env['id']}").json()
    assert stored["env_vars"] == {
        "GITHUB_USER": "me",
        "path": "lower case is not PATH",
        "LDFLAGS": "-s",
    }
    # deleting such a secret (an old row's) stays possible
    r = api.patch(f"environments/{env['id']}", json={"secrets": {"GIT_DIR": None}})
    assert r.status_code == 200, r.text


def test_a_directory_that_is_not_a_git_repository_is_refused(api: Api, tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "file.txt").write_text("x\n")
    for spec in (str(plain), f"file://{plain}", {"url": str(plain), "name": "acme/plain"}):
        r = api.post("environments", json={"label": "x", "repos": [spec]})
        assert r.status_code == 400, (spec, r.text)
        assert "not a git repository" in r.json()["detail"]
    assert api.get("environments").json() == []


def test_credentials_in_a_repository_url_are_refused_and_not_echoed(api: Api) -> None:
    token = "ghp_0123456789abcdefSECRET"
    for url in (
        f"https://x-access-token:{token}@github.com/acme/widgets.git",
        f"https://{token}@github.com/acme/widgets.git",
        f"ssh://git:{token}@git.example.com/acme/widgets.git",
    ):
        r = api.post("environments", json={"label": "x", "repos": [url]})
        assert r.status_code == 400, (url, r.text)
        assert token not in r.text and "credentials" in r.json()["detail"]
    # a user name alone is how ssh works and stays allowed
    env = api.create_env("ssh://git@git.example.com/acme/widgets.git", label="ssh")
    assert _repo_of(env)["clone_url"] == "ssh://git@git.example.com/acme/widgets.git"


# --------------------------------------------------------------------------- secrets


def test_secrets_are_write_only_and_encrypted_at_rest(api: Api, server: Server, repo: Path) -> None:
    env = api.create_env(repo, env_vars={"PLAIN": "visible"}, secrets={"DB_PASSWORD": SECRET})
    assert env["secrets"] == {"DB_PASSWORD": REDACTED}
    assert env["env_vars"] == {"PLAIN": "visible"}
    task_id = api.create_task(env["id"])["task"]["id"]

    text = _secret_free_text(api, env["id"], task_id)
    assert SECRET not in text
    assert f'"DB_PASSWORD":"{REDACTED}"' in text.replace(" ", "")

    patched = api.patch(f"environments/{env['id']}", json={"secrets": {"API_KEY": OTHER_SECRET}})
    assert patched.status_code == 200, patched.text
    assert SECRET not in patched.text and OTHER_SECRET not in patched.text
    assert patched.json()["secrets"] == {"API_KEY": REDACTED, "DB_PASSWORD": REDACTED}
    text = _secret_free_text(api, env["id"], task_id)
    assert SECRET not in text and OTHER_SECRET not in text

    box = server.app_state.secret_box
    with server.app_state.db.session() as s:
        row = s.get(m.Environment, env["id"])
        assert row is not None
        stored = dict(row.secrets)
        body = json.dumps(row.body)
    assert set(stored) == {"DB_PASSWORD", "API_KEY"}
    for value in stored.values():
        assert SECRET not in value and OTHER_SECRET not in value
    assert box.open(stored["DB_PASSWORD"]) == SECRET
    assert box.open(stored["API_KEY"]) == OTHER_SECRET
    assert SECRET not in body and OTHER_SECRET not in body

    # Not in the database files either (main file and write-ahead log).
    files = list((server.app_state.settings.resolved_data_dir).glob("openwham.db*"))
    assert files
    for path in files:
        raw = path.read_bytes()
        assert SECRET.encode() not in raw and OTHER_SECRET.encode() not in raw


# --------------------------------------------------------------------------- update


def test_patch_replaces_given_fields_and_merges_secrets(
    api: Api, server: Server, repo: Path
) -> None:
    env = api.create_env(
        repo,
        label="one",
        description="first",
        setup=["pip install -e ."],
        env_vars={"A": "1", "B": "2"},
        secrets={"S1": "v1", "S2": "v2"},
        agent_network_access={"mode": "on", "preset_allowlist": "all"},
    )
    env_id = env["id"]
    key = env["cache_settings"]["cache_invalidation_key"]

    r = api.patch(
        f"environments/{env_id}",
        json={"label": "two", "env_vars": {"C": "3"}, "secrets": {"S1": None, "S3": "v3"}},
    )
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["label"] == "two"
    assert out["env_vars"] == {"C": "3"}  # replaced wholesale
    assert out["secrets"] == {"S2": REDACTED, "S3": REDACTED}  # merged, null deletes
    # fields not sent are unchanged
    assert out["description"] == "first" and out["setup"] == ["pip install -e ."]
    assert out["agent_network_access"]["mode"] == "on"
    assert out["repos"] == env["repos"] and out["created_at"] == env["created_at"]
    assert out["cache_settings"]["cache_invalidation_key"] == key
    assert api.get(f"environments/{env_id}").json() == out

    with server.app_state.db.session() as s:
        row = s.get(m.Environment, env_id)
        assert row is not None
        opened = {k: server.app_state.secret_box.open(v) for k, v in row.secrets.items()}
    assert opened == {"S2": "v2", "S3": "v3"}

    out = api.patch(
        f"environments/{env_id}",
        json={
            "setup": "make deps",
            "description": "",
            "is_pinned": True,
            "agent_network_access": {"mode": "off"},
            "repos": [{"url": "https://github.com/acme/other.git", "default_branch": "dev"}],
        },
    ).json()
    assert out["setup"] == ["make deps"] and out["description"] == ""
    assert out["is_pinned"] is True and out["agent_network_access"]["mode"] == "off"
    assert [_repo_of(out)["repository_full_name"], _repo_of(out)["default_branch"]] == [
        "acme/other",
        "dev",
    ]
    assert out["env_vars"] == {"C": "3"} and out["label"] == "two"

    for bad in ({"label": None}, {"lable": "typo"}, {"env_vars": {"bad name": "x"}}):
        r = api.patch(f"environments/{env_id}", json=bad)
        assert r.status_code == 400, (bad, r.text)
    assert api.get(f"environments/{env_id}").json()["label"] == "two"
    assert api.patch("environments/" + "0" * 32, json={"label": "x"}).status_code == 404


# --------------------------------------------------------------------------- lists


def test_list_is_a_bare_array_pinned_first_then_by_label(api: Api, repo: Path) -> None:
    for label, pinned in [("beta", False), ("zeta", True), ("alpha", False), ("gamma", True)]:
        api.create_env(repo, label=label, is_pinned=pinned)
    envs = api.get("environments").json()
    assert isinstance(envs, list)
    assert [e["label"] for e in envs] == ["gamma", "zeta", "alpha", "beta"]
    assert [e["is_pinned"] for e in envs] == [True, True, False, False]


def test_recent_lists_only_used_environments_most_recent_first(api: Api, repo: Path) -> None:
    a, b, c = (api.create_env(repo, label=x)["id"] for x in ("a", "b", "c"))
    assert api.get("environments/recent").json() == []
    api.create_task(a)
    api.create_task(c)
    assert [e["id"] for e in api.get("environments/recent").json()] == [c, a]
    api.create_task(a)
    recent = api.get("environments/recent").json()
    assert [e["id"] for e in recent] == [a, c]
    assert b not in [e["id"] for e in recent]


def test_by_repo_is_a_case_insensitive_bare_array(api: Api, repo: Path) -> None:
    named = {"url": str(repo), "name": "acme/widgets"}
    one = api.create_env(repo, label="one", repos=[named])["id"]
    gadgets = "https://github.com/acme/gadgets.git"
    two = api.create_env(repo, label="two", repos=[gadgets, named])["id"]
    api.create_env(repo, label="three", repos=[gadgets])
    for path in (
        "environments/by-repo/github/acme/widgets",
        "environments/by-repo/github/ACME/Widgets",
        "environments/by-repo/github/acme/widgets.git",
    ):
        found = api.get(path).json()
        assert isinstance(found, list)
        assert sorted(e["id"] for e in found) == sorted([one, two]), path
    assert api.get("environments/by-repo/github/acme/nothing").json() == []


def test_with_creator_and_machine_and_with_creators(api: Api, repo: Path) -> None:
    env = api.create_env(repo)
    full = api.get(f"environments/{env['id']}/with-creator-and-machine").json()
    machines = api.get("machines").json()
    assert isinstance(machines, list) and len(machines) == 1
    machine = machines[0]
    assert full["machine"] == machine and env["machine_id"] == machine["id"]
    assert machine["label"] == "universal"
    assert set(machine) == {"id", "label", "cpu_limit", "memory_limit_mb", "disk_limit_mb", "image"}
    creator = full.pop("creator")
    full.pop("machine")
    assert full == env
    assert creator["id"] == env["creator_id"]
    assert creator["email"] and creator["name"]

    page = api.get("environments/with-creators").json()
    assert page["cursor"] is None
    assert [(i["environment"], i["creator"]) for i in page["items"]] == [(env, creator)]


# --------------------------------------------------------------------------- actions


def test_reset_cache_changes_the_invalidation_key(api: Api, repo: Path) -> None:
    env = api.create_env(repo, cache_settings={"post_setup_cache_enabled": True})
    before = env["cache_settings"]
    r = api.post(f"environments/{env['id']}/reset-cache")
    assert r.status_code == 200 and r.json() is None
    after = api.get(f"environments/{env['id']}").json()["cache_settings"]
    assert after["cache_invalidation_key"] != before["cache_invalidation_key"]
    assert after["post_setup_cache_enabled"] is True
    assert api.post("environments/" + "f" * 32 + "/reset-cache").status_code == 404


def test_delete_then_404(api: Api, repo: Path) -> None:
    env = api.create_env(repo)
    task_id = api.create_task(env["id"])["task"]["id"]
    r = api.delete(f"environments/{env['id']}")
    assert r.status_code == 204 and r.content == b""
    assert api.get(f"environments/{env['id']}").status_code == 404
    assert api.get(f"environments/{env['id']}/with-creator-and-machine").status_code == 404
    assert api.delete(f"environments/{env['id']}").status_code == 404
    assert api.get("environments").json() == []
    # the task survives its environment and still renders
    assert api.get(f"tasks/{task_id}").status_code == 200
    assert api.get("tasks/list").status_code == 200
    prompt = [
        {"type": "message", "role": "user", "content": [{"content_type": "text", "text": "x"}]}
    ]
    r = api.post("tasks", json={"new_task": {"environment_id": env["id"]}, "input_items": prompt})
    assert r.status_code == 404, r.text


def test_task_count_counts_tasks(api: Api, repo: Path) -> None:
    env = api.create_env(repo)
    other = api.create_env(repo, label="other")
    api.create_task(env["id"])
    api.create_task(env["id"], metadata={"best_of_n": 3})  # one task, three attempts
    counts = {e["id"]: e["task_count"] for e in api.get("environments").json()}
    assert counts == {env["id"]: 2, other["id"]: 0}
    assert api.get(f"environments/{env['id']}").json()["task_count"] == 2
    full = api.get(f"environments/{env['id']}/with-creator-and-machine").json()
    assert full["task_count"] == 2


def test_environments_are_private_to_their_account(server: Server, repo: Path) -> None:
    api = server.api
    env = api.create_env(repo, secrets={"S": SECRET})
    other = api.as_(server.other_account_token())
    assert other.get("environments").json() == []
    assert other.get("environments/by-repo/github/acme/widgets").json() == []
    for method, path in [
        ("GET", f"environments/{env['id']}"),
        ("GET", f"environments/{env['id']}/with-creator-and-machine"),
        ("PATCH", f"environments/{env['id']}"),
        ("POST", f"environments/{env['id']}/reset-cache"),
        ("DELETE", f"environments/{env['id']}"),
    ]:
        r = other.request(method, path, json={"label": "mine"} if method == "PATCH" else None)
        assert r.status_code == 404, (method, path, r.text)
    assert api.get(f"environments/{env['id']}").json()["label"] == "acme/widgets"
