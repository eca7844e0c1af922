"""Mirrors and per-attempt workspaces on real git."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from conftest import git
from openwham.sandbox.workspace import Mirrors, WorkspaceError, apply_patch, create_workspace


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
    assert not (ws / ".git" / "objects" / "info" / "alternates").exists()  # independent
    # no object file is shared with the mirror: an agent writing one cannot poison the mirror
    objects = [p for p in (ws / ".git" / "objects").rglob("*") if p.is_file()]
    assert objects and all(p.stat().st_nlink == 1 for p in objects)


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
