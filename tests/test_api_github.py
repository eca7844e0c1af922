"""The GitHub-shaped reads (installations, repositories, branch search) and the other reads
official clients make around them, from the account's environments and mirrors."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from conftest import Api, Server, git, make_repo
from openwham.engine import branches
from openwham.sandbox.workspace import Mirrors

REMOTES = [
    "https://github.com/Acme/Gadgets.git",
    "git@github.com:acme/tools.git",  # the same owner, spelled otherwise
    "ssh://git@git.example.com/team/lib.git",
]


def _env(api: Api, *repos: str | Path, label: str = "acme") -> dict[str, Any]:
    r = api.post("environments", json={"label": label, "repos": [str(x) for x in repos]})
    assert r.status_code == 201, r.text
    return dict(r.json())


def _ok(api: Api, path: str, **params: Any) -> Any:
    r = api.get(path, params=params or None)
    assert r.status_code == 200, f"{path}: {r.status_code} {r.text}"
    return r.json()


def _branches(api: Api, repo_id: str, **params: Any) -> list[str]:
    page = _ok(api, f"github/branches/{repo_id}/search", **params)
    return [item["branch"] for item in page["items"]]


def test_installations_are_the_owners_of_the_accounts_repositories(api: Api) -> None:
    _env(api, *REMOTES)
    inst = _ok(api, "github/installations")["installations"]
    assert [i["account_login"] for i in inst] == ["Acme", "team"]
    acme, team = inst
    assert acme["html_url"] == "https://github.com/Acme"
    assert team["html_url"] is None  # SSH only: no web page known
    assert acme["account_type"] == "User" and acme["events"] == []
    assert isinstance(acme["account_id"], int) and acme["account_id"] != team["account_id"]
    v2 = _ok(api, "github/installations/v2")
    assert v2 == {"memberships": inst, "other": [], "likely_on_old_access_token": False}
    assert _ok(api, "github/installations") == {"installations": inst}  # stable ids
    for path in ("github/installations/events", "github/installations/events/v2"):
        assert _ok(api, path) == {"installations_without_events": []}


def test_repositories_of_an_installation_and_search_in_pages(api: Api) -> None:
    env = _env(api, *REMOTES)
    acme = _ok(api, "github/installations")["installations"][0]
    page = _ok(api, f"github/repositories/v2/{acme['id']}")
    names = [r["repository_full_name"] for r in page["repositories"]]
    assert names == ["Acme/Gadgets", "acme/tools"] and page["cursor"] is None
    assert {r["id"] for r in page["repositories"]} <= set(env["repos"])

    found = _ok(api, "github/repositories/search/all-installations", query="LIB")
    assert [r["repository_full_name"] for r in found["repositories"]] == ["team/lib"]

    seen: list[str] = []
    cursor = None
    for _ in range(5):
        params: dict[str, Any] = {"limit": 1, **({"cursor": cursor} if cursor else {})}
        page = _ok(api, "github/repositories/search/all-installations", **params)
        seen += [r["repository_full_name"] for r in page["repositories"]]
        cursor = page["cursor"]
        if cursor is None:
            break
    assert seen == ["Acme/Gadgets", "acme/tools", "team/lib"]


def test_a_repository_by_its_id(api: Api) -> None:
    env = _env(api, *REMOTES)
    repo_id = env["repos"][0]
    repo = _ok(api, f"github/repositories/{repo_id}")
    assert repo["id"] == repo_id and repo["repository_full_name"] == "Acme/Gadgets"
    assert repo["clone_url"] == REMOTES[0] and repo["default_branch"] == "main"
    assert repo["merge_commit_title"] == "MERGE_MESSAGE"
    assert repo["squash_merge_commit_title"] == "COMMIT_OR_PR_TITLE"
    assert _ok(api, f"environments/{env['id']}/repos") == [
        {k: v for k, v in env["repo_map"][key].items()} for key in env["repos"]
    ]


@pytest.mark.parametrize(
    ("path", "params", "status"),
    [
        ("github/repositories/repo-0000000000000000", None, 404),
        ("github/repositories/v2/inst-0000000000000000", None, 404),
        ("github/branches/repo-0000000000000000/search", None, 404),
        ("github/repositories/search/all-installations", {"cursor": "not a cursor"}, 400),
        ("github/repositories/search/all-installations", {"cursor": "eDox"}, 400),  # "x:1"
        ("github/repositories/search/all-installations", {"limit": 0}, 400),
        ("github/repositories/search/all-installations", {"limit": 501}, 400),
        ("github/repositories/search/all-installations", {"limit": "many"}, 400),
        ("github/repositories/search/all-installations", {"query": "x" * 201}, 400),
        ("environments/0123456789abcdef0123456789abcdef/repos", None, 404),
    ],
)
def test_bad_reads_are_clear_client_errors(
    api: Api, path: str, params: dict[str, Any] | None, status: int
) -> None:
    _env(api, *REMOTES)
    r = api.get(path, params=params)
    assert r.status_code == status, r.text
    assert isinstance(r.json()["detail"], str) and r.json()["detail"]


def test_another_account_sees_none_of_it(server: Server, api: Api, repo: Path) -> None:
    env = _env(api, repo, *REMOTES)
    other = api.as_(server.other_account_token())
    assert _ok(other, "github/installations") == {"installations": []}
    assert _ok(other, "github/repositories/search/all-installations")["repositories"] == []
    acme = _ok(api, "github/installations")["installations"][0]["id"]
    for path in (
        f"github/repositories/{env['repos'][0]}",
        f"github/repositories/v2/{acme}",
        f"github/branches/{env['repos'][0]}/search",
        f"environments/{env['id']}/repos",
    ):
        assert other.get(path).status_code == 404, path
    # the same repository in the other account's own environment is its own to read
    theirs = _env(other, REMOTES[0], label="theirs")
    assert _ok(other, f"github/repositories/{theirs['repos'][0]}")["clone_url"] == REMOTES[0]
    assert [i["account_login"] for i in _ok(other, "github/installations")["installations"]] == [
        "Acme"
    ]


def test_branch_search_without_a_mirror_asks_the_repository(api: Api, repo: Path) -> None:
    for name in ("feature/Fix-login", "fix-tests", "docs", "zz-fix"):
        git("branch", name, cwd=repo)
    repo_id = _env(api, repo)["repos"][0]
    assert _branches(api, repo_id) == ["main", "docs", "feature/Fix-login", "fix-tests", "zz-fix"]
    assert _branches(api, repo_id, query="FIX") == ["feature/Fix-login", "fix-tests", "zz-fix"]
    first = _ok(api, f"github/branches/{repo_id}/search", query="fix", limit=2)
    assert [i["branch"] for i in first["items"]] == ["feature/Fix-login", "fix-tests"]
    rest = _ok(api, f"github/branches/{repo_id}/search", query="fix", cursor=first["cursor"])
    assert rest == {"items": [{"branch": "zz-fix"}], "cursor": None}


def test_branch_search_reads_the_mirror_fetched_at_most_every_30_s(
    server: Server, api: Api, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    origin = make_repo(tmp_path / "origin")
    repo_id = _env(api, origin)["repos"][0]
    settings = server.app_state.settings
    mirrors = Mirrors(settings.resolved_data_dir / "mirrors")
    mirrors.ensure(repo_id, str(origin))  # as the engine's first attempt leaves it
    refresher = branches.MirrorRefresher()
    monkeypatch.setattr(branches, "REFRESHER", refresher)

    git("branch", "new-one", cwd=origin)
    assert _branches(api, repo_id) == ["main", "new-one"]  # first search: fetched
    git("branch", "newer", cwd=origin)
    assert _branches(api, repo_id) == ["main", "new-one"]  # within 30 s: the mirror's refs
    refresher.every = 0.0  # as if 30 s had passed
    assert _branches(api, repo_id) == ["main", "new-one", "newer"]
    # the branches came from the mirror: it has them too
    assert git("branch", "--list", "newer", cwd=mirrors.path(repo_id)).strip() == "newer"


def test_branch_search_answers_within_its_wait_when_the_fetch_hangs(
    server: Server, api: Api, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A remote that does not answer must not hold the composer: the mirror's refs are the
    answer after the wait, and the fetch goes on without blocking the next search."""
    origin = make_repo(tmp_path / "origin")
    repo_id = _env(api, origin)["repos"][0]
    Mirrors(server.app_state.settings.resolved_data_dir / "mirrors").ensure(repo_id, str(origin))
    release = threading.Event()
    calls: list[str] = []

    def hanging_ensure(self: Mirrors, key: str, url: str, **_: object) -> Path:
        calls.append(key)
        release.wait(10)
        return self.path(key)

    monkeypatch.setattr(Mirrors, "ensure", hanging_ensure)
    monkeypatch.setattr(branches, "REFRESHER", branches.MirrorRefresher(every=0.0, wait=0.2))
    try:
        assert _branches(api, repo_id) == ["main"]
        assert _branches(api, repo_id) == ["main"]
        assert calls == [repo_id]  # one fetch under way at a time
    finally:
        release.set()


def test_copy_git_apply_and_user_handle(server: Server, api: Api, repo: Path) -> None:
    env = _env(api, repo)
    created = api.create_task(env["id"])
    task_id, turn_id = created["task"]["id"], created["turn"]["id"]
    r = api.post(f"tasks/{task_id}/turns/{turn_id}/copy_git_apply")
    assert r.status_code == 200 and r.json() == {"success": True}
    unknown = f"{task_id}~assttrn_e_{'0' * 32}"
    assert api.post(f"tasks/{task_id}/turns/{unknown}/copy_git_apply").status_code == 404
    other = api.as_(server.other_account_token())
    assert other.post(f"tasks/{task_id}/turns/{turn_id}/copy_git_apply").status_code == 404
    assert _ok(api, "task_suggestions/github/user_handle") == {"github_handle": None}
