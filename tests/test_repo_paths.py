"""Local repository paths: judged by what git would open, never the data directory, and only
where the account may keep local repositories (issue 16, item 1).

The attack: a directory outside the data directory whose ``.git`` *file*, symlink,
``commondir`` or ``objects/info/alternates`` leads into ``DATA_DIR/mirrors`` let a second
account check out the owner's mirror and push into it. Two accounts, real git, real mirrors.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import Api, Server, completed_task, finish_turn, git, make_repo, make_server
from openwham.gitpaths import LocalRepoPolicy, opened_paths
from openwham.sandbox.workspace import Mirrors, WorkspaceError, local_repo_policy
from support.scripted_model import Patch, Say, ScriptedModel

DATA_DIR_REFUSAL = "leads into openwham's data directory"


@pytest.fixture
def mirror(server: Server, repo: Path) -> Path:
    """The owner's environment on ``repo`` and the engine's real mirror of it."""
    env = server.api.create_env(repo)
    data = server.app_state.settings.resolved_data_dir
    return Mirrors(data / "mirrors").ensure(env["repos"][0], str(repo))


def _post_env(api: Api, url: str | Path) -> Any:
    return api.post("environments", json={"label": "x", "repos": [str(url)]})


def _refused(api: Api, url: str | Path, words: str = DATA_DIR_REFUSAL) -> None:
    r = _post_env(api, url)
    assert r.status_code == 400, r.text
    assert words in r.json()["detail"], r.text


def _gitfile(path: Path, target: str | Path) -> Path:
    path.mkdir(parents=True)
    (path / ".git").write_text(f"gitdir: {target}\n")
    return path


def test_a_gitdir_file_into_a_mirror_is_refused_for_every_account(
    server: Server, mirror: Path, tmp_path: Path
) -> None:
    owner = server.api
    other = owner.as_(server.other_account_token())
    absolute = _gitfile(tmp_path / "innocent", mirror)
    relative = _gitfile(tmp_path / "relative", os.path.relpath(mirror, tmp_path / "relative"))
    for url in (absolute, relative, f"file://{absolute}"):
        _refused(owner, url)
    # git itself would open the mirror through it: the refusal is not a guess
    assert git("ls-remote", str(absolute), cwd=tmp_path)
    # the other account is refused before any path is looked at (no local paths at all)
    _refused(other, absolute, "WHAM_LOCAL_REPO_ROOTS")
    # nor can an environment be switched to it
    env = owner.create_env(make_repo(tmp_path / "clean"))
    r = owner.patch(f"environments/{env['id']}", json={"repos": [str(absolute)]})
    assert r.status_code == 400 and DATA_DIR_REFUSAL in r.json()["detail"], r.text
    assert len(owner.get("environments").json()) == 2  # the mirror's and the clean one


def test_alternates_into_the_data_directory_are_refused(
    server: Server, mirror: Path, tmp_path: Path
) -> None:
    api = server.api
    direct = tmp_path / "direct.git"
    git("init", "-q", "--bare", str(direct), cwd=tmp_path)
    (direct / "objects" / "info" / "alternates").write_text(f"{mirror / 'objects'}\n")
    _refused(api, direct)
    # relative to the objects directory that lists it, as git reads it, and C-quoted
    rel = tmp_path / "rel.git"
    git("init", "-q", "--bare", str(rel), cwd=tmp_path)
    hop = os.path.relpath(mirror / "objects", rel / "objects")
    (rel / "objects" / "info" / "alternates").write_text(f'# comment\n"{hop}"\n')
    _refused(api, rel)
    # through a chain: an alternate outside whose own alternates lead in
    chained = tmp_path / "chained.git"
    git("init", "-q", "--bare", str(chained), cwd=tmp_path)
    (chained / "objects" / "info" / "alternates").write_text(f"{direct / 'objects'}\n")
    _refused(api, chained)
    # a non-bare repository's alternates count the same
    work = make_repo(tmp_path / "work")
    (work / ".git" / "objects" / "info" / "alternates").write_text(f"{mirror / 'objects'}\n")
    _refused(api, work)


def test_a_worktree_commondir_into_the_data_directory_is_refused(
    server: Server, mirror: Path, tmp_path: Path
) -> None:
    worktree_gitdir = tmp_path / "wt-gitdir"
    worktree_gitdir.mkdir()
    (worktree_gitdir / "HEAD").write_text("ref: refs/heads/main\n")
    (worktree_gitdir / "commondir").write_text(os.path.relpath(mirror, worktree_gitdir) + "\n")
    checkout = _gitfile(tmp_path / "checkout", worktree_gitdir)
    _refused(server.api, checkout)
    _refused(server.api, worktree_gitdir)


def test_symlinks_into_the_data_directory_are_refused(
    server: Server, mirror: Path, tmp_path: Path
) -> None:
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / ".git").symlink_to(mirror)
    _refused(server.api, linked)
    # a symlink inside the git directory (here the pack directory) counts as well
    packs = make_repo(tmp_path / "packs")
    shutil.rmtree(packs / ".git" / "objects" / "pack")
    (packs / ".git" / "objects" / "pack").symlink_to(mirror / "objects" / "pack")
    _refused(server.api, packs)
    # and so does a symlinked repository path (refused before, still refused)
    (tmp_path / "alias").symlink_to(mirror)
    _refused(server.api, tmp_path / "alias")


def test_the_owner_of_a_single_user_install_may_use_any_path_outside_the_data_directory(
    server: Server, tmp_path: Path
) -> None:
    api = server.api
    plain = make_repo(tmp_path / "plain")
    api.create_env(plain, label="plain")
    # a real worktree (gitdir file + commondir) and a --shared clone (alternates), outside
    git("worktree", "add", "-q", "-b", "side", str(tmp_path / "side"), cwd=plain)
    api.create_env(tmp_path / "side", label="side")
    git("clone", "-q", "--shared", str(plain), str(tmp_path / "shared"), cwd=tmp_path)
    env = api.create_env(tmp_path / "shared", label="shared")
    assert api.create_task(env["id"])["task"]["id"]
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / ".git").symlink_to(plain / ".git")
    api.create_env(linked, label="linked")
    # remote URLs are not local paths: every account may use them
    other = api.as_(server.other_account_token())
    r = _post_env(other, "https://github.com/acme/widgets.git")
    assert r.status_code == 201, r.text


def test_other_accounts_get_no_local_paths_unless_roots_are_configured(
    server: Server, repo: Path
) -> None:
    other = server.api.as_(server.other_account_token())
    r = _post_env(other, repo)
    assert r.status_code == 400, r.text
    detail = r.json()["detail"]
    assert "WHAM_LOCAL_REPO_ROOTS" in detail and "owner" in detail
    assert str(repo) not in detail
    _refused(other, f"file://{repo}", "WHAM_LOCAL_REPO_ROOTS")
    _refused(other, "/nonexistent/path", "WHAM_LOCAL_REPO_ROOTS")  # no existence hint
    assert other.get("environments").json() == []


@pytest.fixture
def rooted(tmp_path: Path, sqlite_url: str) -> Iterator[Server]:
    """A server whose local repositories must live in ``tmp_path/allowed`` or ``…/also``."""
    roots = os.pathsep.join([str(tmp_path / "allowed"), str(tmp_path / "also")])
    yield from make_server(tmp_path, sqlite_url, local_repo_roots=roots)


def test_configured_roots_bind_every_account_and_everything_git_opens(
    rooted: Server, tmp_path: Path
) -> None:
    owner = rooted.api
    other = owner.as_(rooted.other_account_token())
    inside = make_repo(tmp_path / "allowed" / "widgets")
    second = make_repo(tmp_path / "also" / "gadgets")
    outside = make_repo(tmp_path / "elsewhere" / "private")
    for api in (owner, other):
        assert api.create_env(inside)["repo_map"]
        assert api.create_env(second)["repo_map"]
        _refused(api, outside, "outside the directories local repositories may live in")
    # inside the roots, but git would open a repository outside them
    escape = _gitfile(tmp_path / "allowed" / "escape", outside / ".git")
    _refused(other, escape, "WHAM_LOCAL_REPO_ROOTS")
    (tmp_path / "allowed" / "hop").symlink_to(outside)
    _refused(other, tmp_path / "allowed" / "hop", "WHAM_LOCAL_REPO_ROOTS")
    # the other account's environment on a local path inside the roots runs tasks
    env = other.create_env(inside, label="theirs")
    assert other.create_task(env["id"])["task"]["id"]


def test_a_repository_changed_after_it_was_accepted_is_refused_at_task_start_and_fetch(
    server: Server, repo: Path, tmp_path: Path
) -> None:
    """TOCTOU: the path is judged again when git is about to open it."""
    api = server.api
    data = server.app_state.settings.resolved_data_dir
    env = api.create_env(repo)
    key = env["repos"][0]
    task = api.create_task(env["id"])
    mirrors = Mirrors(data / "mirrors", local_repo_policy(server.app_state.settings))
    mirror = mirrors.ensure(key, str(repo))  # accepted: a plain repository
    # now the directory's .git becomes a gitdir file into the data directory
    shutil.rmtree(repo / ".git")
    (repo / ".git").write_text(f"gitdir: {mirror}\n")
    r = api.post("tasks", json=_task_body(env["id"]))
    assert r.status_code == 400 and DATA_DIR_REFUSAL in r.json()["detail"], r.text
    finish_turn(server, task["turn"]["id"])
    follow = api.post("tasks", json=_follow_up_body(task["task"]["id"], task["turn"]["id"]))
    assert follow.status_code == 400 and DATA_DIR_REFUSAL in follow.json()["detail"]
    # the engine's fetch (existing mirror) and first clone (new key) refuse it too
    with pytest.raises(WorkspaceError, match="data directory"):
        mirrors.ensure(key, str(repo))
    with pytest.raises(WorkspaceError, match="data directory"):
        mirrors.ensure("repo-fresh", str(repo))
    assert not (data / "mirrors" / "repo-fresh.git").exists()


def test_the_mirrors_never_open_their_own_directory_by_default(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "src")
    mirrors = Mirrors(tmp_path / "mirrors")
    mirror = mirrors.ensure("repo-a", str(repo))
    inside = _gitfile(tmp_path / "inner", mirror)
    with pytest.raises(WorkspaceError, match="data directory"):
        mirrors.ensure("repo-b", str(inside))


def test_opened_paths_follows_what_git_follows(tmp_path: Path) -> None:
    target = make_repo(tmp_path / "target")
    git("worktree", "add", "-q", "-b", "wt", str(tmp_path / "wt"), cwd=target)
    paths = opened_paths(tmp_path / "wt")
    assert (target / ".git").resolve() in paths  # the commondir
    assert any(p.parent == (target / ".git" / "worktrees").resolve() for p in paths)
    loop = tmp_path / "loop.git"
    git("init", "-q", "--bare", str(loop), cwd=tmp_path)
    (loop / "objects" / "info" / "alternates").write_text(f"{loop / 'objects'}\n")
    assert (loop / "objects").resolve() in opened_paths(loop)  # a loop ends
    policy = LocalRepoPolicy(data_dir=tmp_path / "data", roots=())
    assert "WHAM_LOCAL_REPO_ROOTS" in (policy.refusal(target) or "")


def _task_body(env_id: str) -> dict[str, Any]:
    return {
        "new_task": {"environment_id": env_id},
        "input_items": [
            {"type": "message", "role": "user", "content": [{"content_type": "text", "text": "x"}]}
        ],
    }


def _follow_up_body(task_id: str, turn_id: str) -> dict[str, Any]:
    return {
        "follow_up": {"task_id": task_id, "turn_id": turn_id},
        "input_items": [
            {"type": "message", "role": "user", "content": [{"content_type": "text", "text": "x"}]}
        ],
    }


FIX = (
    "*** Begin Patch\n*** Update File: calc.py\n@@\n def add(a, b):\n"
    "-    return a - b\n+    return a + b\n*** End Patch"
)


def test_a_pr_push_never_lands_in_a_mirror_through_a_changed_repository(
    engine_server: Server, scripted_model: ScriptedModel, tmp_path: Path
) -> None:
    """The reported attack, end to end: the repository of a finished task is turned into a
    ``.git`` file pointing at the engine's mirror; pushing the PR branch is refused (409)
    and the mirror gets no branch, and a new task on the environment is refused (400)."""
    api = engine_server.api
    repo = make_repo(tmp_path / "calc")
    env = api.create_env(repo)
    task_id, turn_id, _ = completed_task(
        api, scripted_model, env["id"], "Fix add", [Patch(FIX), Say("Fixed.")]
    )
    data = engine_server.app_state.settings.resolved_data_dir
    mirror = data / "mirrors" / f"{env['repos'][0]}.git"
    assert (mirror / "HEAD").is_file()
    branches = git("for-each-ref", "refs/heads", cwd=mirror)
    shutil.rmtree(repo / ".git")
    (repo / ".git").write_text(f"gitdir: {mirror}\n")
    r = api.post(f"tasks/{task_id}/turns/{turn_id}/pr")
    assert r.status_code == 409, r.text
    assert DATA_DIR_REFUSAL in r.json()["detail"]
    assert git("for-each-ref", "refs/heads", cwd=mirror) == branches
    r = api.post("tasks", json=_task_body(env["id"]))
    assert r.status_code == 400 and DATA_DIR_REFUSAL in r.json()["detail"], r.text
