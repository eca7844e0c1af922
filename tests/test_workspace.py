"""Mirrors and per-attempt workspaces on real git."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from conftest import git, make_repo
from openwham.engine.diff import workspace_diff
from openwham.sandbox.bwrap import SHARED_OBJECTS
from openwham.sandbox.workspace import (
    Mirrors,
    WorkspaceError,
    apply_patch,
    branch_head,
    branch_ref,
    create_repo_workspace,
    create_workspace,
)


def test_mirror_then_workspace_at_branch(repo: Path, tmp_path: Path) -> None:
    git("checkout", "-q", "-b", "feature", cwd=repo)
    (repo / "feature.txt").write_text("f\n")
    git("add", ".", cwd=repo)
    git("commit", "-q", "-m", "feature", cwd=repo)
    feature_sha = git("rev-parse", "HEAD", cwd=repo).strip()
    git("checkout", "-q", "main", cwd=repo)

    mirror = Mirrors(tmp_path / "mirrors").ensure("repo-abc", str(repo))
    ws = tmp_path / "ws"
    base = create_workspace(mirror, ws, "feature", str(repo))
    assert base == feature_sha
    assert (ws / "feature.txt").read_text() == "f\n"
    assert git("remote", "get-url", "origin", cwd=ws).strip() == str(repo)
    # objects are borrowed from the mirror through the sibling link, by a relative path (the
    # same entry resolves in the sandbox, where the link is a read-only bind), never hard-linked
    alternates = ws / ".git" / "objects" / "info" / "alternates"
    assert alternates.read_text() == f"../../../{SHARED_OBJECTS}\n"
    assert (tmp_path / SHARED_OBJECTS).resolve() == (mirror / "objects").resolve()
    objects = [p for p in (ws / ".git" / "objects").rglob("*") if p.is_file()]
    assert all(p.stat().st_nlink == 1 for p in objects)
    assert git("status", "--porcelain", cwd=ws) == ""


def test_workspace_survives_its_directory_being_renamed(repo: Path, tmp_path: Path) -> None:
    """A standby's directory is renamed when an attempt takes it: the relative entry follows."""
    mirror = Mirrors(tmp_path / "mirrors").ensure("k", str(repo))
    (tmp_path / "standby").mkdir()
    base = create_workspace(mirror, tmp_path / "standby" / "workspace", "main", str(repo))
    (tmp_path / "standby").rename(tmp_path / "attempt")
    ws = tmp_path / "attempt" / "workspace"
    assert git("rev-parse", "HEAD^{tree}", cwd=ws).strip()
    assert git("diff", "--stat", base, cwd=ws) == ""


def test_one_directory_never_shares_two_repositories(repo: Path, tmp_path: Path) -> None:
    mirrors = Mirrors(tmp_path / "mirrors")
    a = mirrors.ensure("a", str(repo))
    b = mirrors.ensure("b", str(repo))
    (tmp_path / "att").mkdir()
    create_workspace(a, tmp_path / "att" / "workspace", "main", str(repo))
    with pytest.raises(WorkspaceError, match="another repository"):
        create_workspace(b, tmp_path / "att" / "other", "main", str(repo))
    assert (tmp_path / "att" / SHARED_OBJECTS).resolve() == (a / "objects").resolve()


def test_fetch_picks_up_new_commits(repo: Path, tmp_path: Path) -> None:
    mirrors = Mirrors(tmp_path / "mirrors")
    mirrors.ensure("k", str(repo))
    (repo / "new.txt").write_text("n\n")
    git("add", ".", cwd=repo)
    git("commit", "-q", "-m", "new", cwd=repo)
    head = git("rev-parse", "HEAD", cwd=repo).strip()
    mirror = mirrors.ensure("k", str(repo))
    assert create_workspace(mirror, tmp_path / "ws", "main", str(repo)) == head


def test_concurrent_ensure_clones_once(repo: Path, tmp_path: Path) -> None:
    mirrors = Mirrors(tmp_path / "mirrors")
    errors: list[BaseException] = []

    def run() -> None:
        try:
            mirrors.ensure("k", str(repo))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(os.listdir(tmp_path / "mirrors")) == ["k.git", "k.lock"]


def test_the_attempts_of_one_prompt_share_one_fetch(
    repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A best-of-4's attempts ask a few milliseconds apart: the first fetch began before the
    later ones asked, so they waited for a second fetch before their model requests were let
    through (traced: two fetches of 70-84 ms in a row, on a local repository). Calls of one
    group (the attempts' prompt turn) ask as of the group's first call: one fetch serves
    them all; a call of another group, or of none, still gets a fetch begun after it."""
    from openwham.sandbox import workspace as ws_mod

    mirrors = Mirrors(tmp_path / "mirrors")
    mirrors.ensure("k", str(repo))
    real_git = ws_mod.git
    fetches: list[str] = []

    def counting_git(*args: str, **kwargs: object) -> str:
        if args[0] == "fetch":
            fetches.append(args[0])
        return real_git(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(ws_mod, "git", counting_git)
    mirrors.ensure("k", str(repo), group="prompt-1")  # the first attempt: its own fetch
    assert len(fetches) == 1
    for _ in range(3):  # its siblings, asking after that fetch began: served by it
        mirrors.ensure("k", str(repo), group="prompt-1")
    assert len(fetches) == 1
    mirrors.ensure("k", str(repo), group="prompt-2")  # another task's prompt
    mirrors.ensure("k", str(repo))  # no group: as of this call
    assert len(fetches) == 3


def test_the_branch_head_is_read_without_git_and_as_the_last_fetch_left_it(
    repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The attempts of a best-of-N check their standbys against the branch head after one
    shared fetch: a ``git rev-parse`` each before (a fork of the server), one per fetch
    since b812f37 (still one per attempt asking while it ran); now the mirror's ref files,
    no git at all, and a commit a later fetch brings is seen at once."""
    from openwham.sandbox import workspace as ws_mod

    mirrors = Mirrors(tmp_path / "mirrors")
    real_git = ws_mod.git
    ran: list[tuple[str, ...]] = []

    def counting_git(*args: str, **kwargs: object) -> str:
        ran.append(args)
        return real_git(*args, **kwargs)  # type: ignore[arg-type]

    first = git("rev-parse", "HEAD", cwd=repo).strip()
    assert mirrors.branch_head("k", "main") is None  # no mirror yet
    mirrors.ensure("k", str(repo))
    monkeypatch.setattr(ws_mod, "git", counting_git)
    assert [mirrors.branch_head("k", "main") for _ in range(4)] == [first] * 4
    assert mirrors.branch_head("k", "nope") is None
    assert mirrors.start_commit("k", "main", None, "the repository") == first
    assert ran == []
    (repo / "next.txt").write_text("next\n")
    git("add", ".", cwd=repo)
    git("commit", "-q", "-m", "next", cwd=repo)
    second = git("rev-parse", "HEAD", cwd=repo).strip()
    assert mirrors.branch_head("k", "main") == first  # the mirror as its fetch left it
    mirrors.ensure("k", str(repo))  # a fetch
    assert [mirrors.branch_head("k", "main") for _ in range(2)] == [second] * 2
    assert [a[0] for a in ran] == ["fetch"]


def test_a_follow_up_whose_base_commit_left_the_repository_is_told_so(
    repo: Path, tmp_path: Path
) -> None:
    """A follow-up starts at its task's original base (``at``); a base that a force-push and
    a pruning fetch removed from the mirror is named in a clear error, not a git trace."""
    mirrors = Mirrors(tmp_path / "mirrors")
    base = git("rev-parse", "HEAD", cwd=repo).strip()
    mirror = mirrors.ensure("k", str(repo))
    assert mirrors.start_commit("k", "main", base, "the repository") == base
    gone = "0123456789abcdef" * 2 + "01234567"
    assert not (mirror / "objects" / gone[:2] / gone[2:]).exists()
    with pytest.raises(WorkspaceError) as err:
        mirrors.start_commit("k", "main", gone, "the repository")
    assert str(err.value) == "The task's base commit 0123456789ab is no longer in the repository"


def test_a_branch_is_read_from_the_mirrors_files_as_git_reads_it(
    repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``branch_ref`` answers what ``git rev-parse`` answers, from the ref files: packed (as
    a clone leaves them), loose (as a fetch writes them), loose over an older packed entry,
    nested names, a name that is only a directory of longer ones, none; without running git
    for any of those. A symbolic ref and another ref storage are left to git."""
    from openwham.sandbox import workspace as ws_mod

    for name in ("packed", "a/b"):
        git("branch", name, cwd=repo)
    mirrors = Mirrors(tmp_path / "mirrors")
    mirror = mirrors.ensure("k", str(repo))
    assert (mirror / "packed-refs").exists() and not (mirror / "refs/heads/packed").exists()
    (repo / "x.txt").write_text("x\n")
    git("add", ".", cwd=repo)
    git("commit", "-q", "-m", "x", cwd=repo)
    git("branch", "loose", cwd=repo)
    git("branch", "-f", "packed", "HEAD", cwd=repo)  # newer than its packed entry
    mirrors.ensure("k", str(repo))
    assert (mirror / "refs/heads/packed").exists()  # the fetch wrote it loose
    names = ["main", "packed", "loose", "a/b", "a", "nope", "a/b/c", "HEAD"]
    expected = {n: branch_head(mirror, n) for n in names}
    assert expected["packed"] == expected["loose"] != expected["a/b"]
    assert expected["a"] is expected["nope"] is expected["a/b/c"] is expected["HEAD"] is None

    ran: list[tuple[str, ...]] = []
    real_git = ws_mod.git

    def counting_git(*args: str, **kwargs: object) -> str:
        ran.append(args)
        return real_git(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(ws_mod, "git", counting_git)
    assert {n: branch_ref(mirror, n) for n in names} == expected
    assert ran == []
    git("symbolic-ref", "refs/heads/sym", "refs/heads/loose", cwd=mirror)
    assert branch_ref(mirror, "sym") == expected["loose"] and len(ran) == 1
    with (mirror / "config").open("a") as config:  # not the files backend: git answers
        config.write("[extensions]\n\trefStorage = files\n")
    assert branch_ref(mirror, "main") == expected["main"] and len(ran) == 2


def test_the_branch_check_of_a_new_task_runs_no_git_when_the_mirror_has_it(
    repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``POST tasks`` checks its branch in the request (``engine.branches.branch_exists``):
    a fork of the server for ``git rev-parse`` was half of a 22 ms ``POST`` on a quiet
    machine; a mirror that has the branch answers from its files."""
    from openwham.config import Settings
    from openwham.engine import branches
    from openwham.sandbox import workspace as ws_mod

    settings = Settings(data_dir=tmp_path)
    Mirrors(settings.resolved_data_dir / "mirrors").ensure("k", str(repo))

    def no_git(*args: str, **kwargs: object) -> str:
        raise AssertionError(f"git {' '.join(args)}")

    monkeypatch.setattr(ws_mod, "git", no_git)
    monkeypatch.setattr(branches, "git", no_git)
    assert branches.branch_exists(settings, "k", str(repo), "main")


def test_attempts_asking_together_share_a_fetch_but_never_an_older_one(
    repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 20 (32 at once, best-of-N): every attempt fetched the mirror, one at a time
    under its lock, so the last of 32 waited for 31 fetches. A fetch that began after a
    call asked now serves it too; one that began before it asked never does (a commit
    pushed meanwhile must be seen), nor one made with another credential."""
    from openwham.gitauth import GitAuth
    from openwham.locks import file_lock
    from openwham.sandbox import workspace as ws_mod

    mirrors = Mirrors(tmp_path / "mirrors")
    mirrors.ensure("k", str(repo))
    real_git = ws_mod.git
    fetches: list[float] = []
    fetching = threading.Event()

    def slow_git(*args: str, **kwargs: object) -> str:
        out = real_git(*args, **kwargs)  # type: ignore[arg-type]
        if args[0] == "fetch":
            fetches.append(time.monotonic())
            fetching.set()
            time.sleep(0.3)  # fetched, not yet released: callers pile up behind it
        return out

    monkeypatch.setattr(ws_mod, "git", slow_git)
    threads = [threading.Thread(target=mirrors.ensure, args=("k", str(repo))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert 1 <= len(fetches) <= 2  # was 8 in a row

    # a commit pushed while a fetch is under way: a call made after it gets its own fetch
    fetches.clear()
    fetching.clear()
    first = threading.Thread(target=mirrors.ensure, args=("k", str(repo)))
    first.start()
    assert fetching.wait(10)
    (repo / "late.txt").write_text("late\n")
    git("add", ".", cwd=repo)
    git("commit", "-q", "-m", "late", cwd=repo)
    head = git("rev-parse", "HEAD", cwd=repo).strip()
    mirror = mirrors.ensure("k", str(repo))
    first.join()
    assert len(fetches) == 2
    assert create_workspace(mirror, tmp_path / "ws", "main", str(repo)) == head

    # another credential's fetch is not this call's (its access is checked by its own):
    # both ask while the lock is held, so whichever fetches first began after the other asked
    fetches.clear()
    auth = GitAuth(url_prefix=str(repo), kind="https", username="u", secret="s")
    with file_lock(tmp_path / "mirrors" / "k.lock"):
        callers = [
            threading.Thread(target=mirrors.ensure, args=("k", str(repo)), kwargs=kw)
            for kw in ({"auth": auth}, {})
        ]
        for t in callers:
            t.start()
        time.sleep(0.3)
    for t in callers:
        t.join()
    assert len(fetches) == 2


def test_missing_branch_and_bad_url_are_clear(repo: Path, tmp_path: Path) -> None:
    mirrors = Mirrors(tmp_path / "mirrors")
    mirror = mirrors.ensure("k", str(repo))
    with pytest.raises(WorkspaceError, match="Branch 'nope' does not exist"):
        create_workspace(mirror, tmp_path / "ws", "nope", str(repo))
    with pytest.raises(WorkspaceError, match="Cannot clone repository"):
        mirrors.ensure("gone", str(tmp_path / "does-not-exist"))


def test_pre_apply_patch(repo: Path, tmp_path: Path) -> None:
    mirror = Mirrors(tmp_path / "mirrors").ensure("k", str(repo))
    ws = tmp_path / "ws"
    create_workspace(mirror, ws, "main", str(repo))
    good = (
        "diff --git a/calc.py b/calc.py\n--- a/calc.py\n+++ b/calc.py\n"
        "@@ -1,2 +1,2 @@\n def add(a, b):\n-    return a - b\n+    return a + b\n"
    )
    apply_patch(ws, good)
    assert "a + b" in (ws / "calc.py").read_text()
    with pytest.raises(WorkspaceError, match="does not apply"):
        apply_patch(ws, good)  # already applied: the context no longer matches


def test_overlay_checkouts_are_made_once_per_commit_and_evicted_only_when_unused(
    repo: Path, tmp_path: Path
) -> None:
    """Two workspaces at one commit share one checkout; a new commit makes another; eviction
    keeps a checkout a sandbox holds (its lease) and removes an idle one; a checkout a crash
    left half made is swept."""
    from openwham.sandbox import bwrap, overlay
    from openwham.sandbox.workspace import Checkouts

    if (reason := overlay.unavailable()) is not None:
        pytest.fail(f"overlay workspaces are not available here: {reason}")
    mirrors = Mirrors(tmp_path / "mirrors")
    mirror = mirrors.ensure("k", str(repo))
    checkouts = Checkouts(tmp_path / "checkouts", keep=1, idle_seconds=0)
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        create_workspace(
            mirror, tmp_path / name / "workspace", "main", str(repo), checkouts=checkouts
        )
    first = (tmp_path / "a" / overlay.LOWER).resolve()
    assert first == (tmp_path / "b" / overlay.LOWER).resolve()
    assert len(list(checkouts.root.glob("*/*/ready"))) == 1
    # a sandbox on the first checkout holds it while a new commit makes a second
    proc = bwrap.start(bwrap.SandboxSpec(workspace=tmp_path / "a" / "workspace"), ["sleep", "30"])
    try:
        (repo / "new.txt").write_text("new\n")
        git("add", ".", cwd=repo)
        git("commit", "-qm", "new", cwd=repo)
        mirrors.ensure("k", str(repo))
        (tmp_path / "c").mkdir()
        create_workspace(
            mirror, tmp_path / "c" / "workspace", "main", str(repo), checkouts=checkouts
        )
        assert first.is_dir()  # held: not evicted although beyond keep=1
    finally:
        proc.kill()
    assert checkouts.evict() == [first.parent]
    assert not first.exists()
    # a checkout cut short by a crash (no ``ready``) is swept at start
    half = checkouts.root / "k" / ("0" * 40 + ".x")
    (half / "tree").mkdir(parents=True)
    checkouts.sweep()
    assert not half.exists()
    assert len(list(checkouts.root.glob("*/*/ready"))) == 1


def test_host_git_on_an_overlay_workspace_sees_the_merged_view_and_mounts_nothing_here(
    repo: Path, tmp_path: Path
) -> None:
    """Host git on an overlay workspace runs in a mount namespace of its own with the overlay
    mounted (``lifeline.command`` with ``mount_namespace``: no ``preexec_fn``): it reads the
    checkout through it and writes to the attempt's upper directory only; the host's
    ``workspace`` directory stays an empty mount point."""
    from openwham.sandbox import overlay
    from openwham.sandbox.workspace import Checkouts
    from openwham.sandbox.workspace import git as host_git

    if (reason := overlay.unavailable()) is not None:
        pytest.fail(f"overlay workspaces are not available here: {reason}")
    mirror = Mirrors(tmp_path / "mirrors").ensure("k", str(repo))
    (tmp_path / "a").mkdir()
    ws = tmp_path / "a" / "workspace"
    create_workspace(mirror, ws, "main", str(repo), checkouts=Checkouts(tmp_path / "checkouts"))
    assert host_git("status", "--porcelain", cwd=ws) == ""
    apply_patch(
        ws,
        "diff --git a/calc.py b/calc.py\n--- a/calc.py\n+++ b/calc.py\n"
        "@@ -1,2 +1,2 @@\n def add(a, b):\n-    return a - b\n+    return a + b\n",
    )
    assert host_git("status", "--porcelain", cwd=ws) == " M calc.py\n"
    assert "+    return a + b" in host_git("diff", cwd=ws)
    assert list(ws.iterdir()) == []  # nothing mounted here
    upper = tmp_path / "a" / overlay.UPPER
    assert "a + b" in (upper / "calc.py").read_text()
    lower = (tmp_path / "a" / overlay.LOWER).resolve()
    assert "a - b" in (lower / "calc.py").read_text()


def test_without_overlays_workspaces_are_full_checkouts(repo: Path, tmp_path: Path) -> None:
    """A host that cannot mount overlays (not root, no overlayfs) gets today's workspace: a
    clone with every file written, and says why."""
    from openwham.sandbox import overlay
    from openwham.sandbox.workspace import Checkouts

    overlay.unavailable.cache_clear()
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(os, "geteuid", lambda: 1000)
            checkouts = Checkouts(tmp_path / "checkouts")
        assert not checkouts.enabled
        assert "root" in (checkouts.reason or "")
    finally:
        overlay.unavailable.cache_clear()
    mirror = Mirrors(tmp_path / "mirrors").ensure("k", str(repo))
    (tmp_path / "a").mkdir()
    ws = tmp_path / "a" / "workspace"
    create_workspace(mirror, ws, "main", str(repo), checkouts=checkouts)
    assert (ws / "README.md").read_text() == "# widgets\n"
    assert not (tmp_path / "a" / overlay.LOWER).exists()


def test_the_engine_logs_why_workspaces_are_clones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Overlay workspaces off, not possible on this host, or a sandbox provider that does not
    launch bubblewrap (which mounts them): the engine makes a clone per attempt and its
    start-up log says why; otherwise it uses the shared checkouts."""
    from openwham.config import Settings
    from openwham.engine.workspace import shared_checkouts
    from openwham.sandbox import overlay
    from openwham.sandbox.provider import BUBBLEWRAP
    from support.fake_sandbox import ScriptedSandboxes

    root = tmp_path / "checkouts"
    with caplog.at_level("INFO", logger="openwham.engine.workspace"):
        assert (
            shared_checkouts(Settings(data_dir=tmp_path, workspace_overlay=False), BUBBLEWRAP, root)
            is None
        )
        assert "WHAM_WORKSPACE_OVERLAY=false" in caplog.text
        assert shared_checkouts(Settings(data_dir=tmp_path), ScriptedSandboxes(), root) is None
        assert "not bubblewrap" in caplog.text
        monkeypatch.setattr(overlay, "unavailable", lambda: "no overlayfs in this kernel")
        assert shared_checkouts(Settings(data_dir=tmp_path), BUBBLEWRAP, root) is None
        assert "overlay workspaces are unavailable: no overlayfs in this kernel" in caplog.text
        monkeypatch.setattr(overlay, "unavailable", lambda: None)
        checkouts = shared_checkouts(
            Settings(data_dir=tmp_path, checkout_cache=3), BUBBLEWRAP, root
        )
        assert checkouts is not None and checkouts.enabled and checkouts.keep == 3
        assert "overlays over shared checkouts" in caplog.text


def test_a_multi_repository_workspace_borrows_each_mirror_and_diffs_each(
    repo: Path, tmp_path: Path
) -> None:
    """``workspace/<name>`` per repository, each borrowing its own mirror's objects through
    ``mirror-objects/<name>`` (the sandbox binds each read-only); the diff computed in a
    sandbox of its own gives each repository's change against its own base."""
    other = make_repo(tmp_path / "gadgets")
    git("branch", "-m", "trunk", cwd=other)
    mirrors = Mirrors(tmp_path / "mirrors")
    a, b = mirrors.ensure("a", str(repo)), mirrors.ensure("b", str(other))
    (tmp_path / "att").mkdir()
    ws = tmp_path / "att" / "workspace"
    ws.mkdir()
    base_a = create_repo_workspace(a, ws, "widgets", "main", str(repo))
    base_b = create_repo_workspace(b, ws, "gadgets", "trunk", str(other))
    for name, mirror in (("widgets", a), ("gadgets", b)):
        alternates = ws / name / ".git" / "objects" / "info" / "alternates"
        assert alternates.read_text() == f"../../../../{SHARED_OBJECTS}/{name}\n"
        link = tmp_path / "att" / SHARED_OBJECTS / name
        assert link.is_symlink() and link.resolve() == (mirror / "objects").resolve()
    with pytest.raises(WorkspaceError, match="bad or used"):
        create_repo_workspace(b, ws, "gadgets", "trunk", str(other))
    (ws / "widgets" / "README.md").write_text("changed\n")
    (ws / "gadgets" / "NEW.md").write_text("new\n")
    diff = workspace_diff(ws, base_a, repos=[("widgets", base_a), ("gadgets", base_b)])
    assert diff.text == diff.repos[0] and "+changed" in diff.text and "NEW.md" not in diff.text
    assert diff.repos[1].startswith("diff --git a/NEW.md b/NEW.md") and "+new" in diff.repos[1]
