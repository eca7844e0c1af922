"""sandbox.snapshots without a sandbox: what each snapshot records of its environment and
cache generation, and a clear that keeps the current generation's (the queue workers' sweep,
``Workspaces.drop_stale_caches``) and never one a sandbox holds."""

from __future__ import annotations

import json
from pathlib import Path

from openwham.sandbox.snapshots import RepoAt, Snapshots


def _take(cache: Snapshots, tmp: Path, env: str, generation: str, name: str) -> Path:
    work = tmp / name
    (work / "workspace").mkdir(parents=True)
    (work / "workspace" / "marker").write_text(name)
    (work / "home").mkdir()
    snap = cache.take_copy(
        env,
        "k" * 32,
        work / "workspace",
        work / "home",
        commit="c" * 40,
        branch="main",
        repos=(RepoAt("repo-a", "a", "c" * 40, "main"),),
        generation=generation,
    )
    assert snap.env == env and snap.generation == generation
    return snap.path


def test_clear_keeps_the_current_generation_and_what_a_sandbox_holds(tmp_path: Path) -> None:
    cache = Snapshots(tmp_path / "cache", max_age=3600, max_bytes=1 << 30)
    old = _take(cache, tmp_path, "env_1", "gen-old", "old")
    held = _take(cache, tmp_path, "env_1", "gen-older", "held")
    new = _take(cache, tmp_path, "env_1", "gen-new", "new")
    other = _take(cache, tmp_path, "env_2", "gen-x", "other")
    meta = json.loads((new / "ready").read_text())
    assert meta["env"] == "env_1" and meta["generation"] == "gen-new"
    assert meta["repos"] == [{"key": "repo-a", "dir": "a", "commit": "c" * 40, "branch": "main"}]
    assert cache.environments() == {
        "env_1": {"gen-old", "gen-older", "gen-new"},
        "env_2": {"gen-x"},
    }

    snap = next(s for s in cache._all() if s.path == held)
    lease = cache.hold(snap)
    assert lease is not None
    try:
        assert cache.clear("env_1", keep="gen-new") == [old]
    finally:
        lease.close()
    assert held.exists() and new.exists() and other.exists() and not old.exists()
    assert cache.clear("env_1", keep="gen-new") == [held]  # once nothing holds it
    assert cache.environments() == {"env_1": {"gen-new"}, "env_2": {"gen-x"}}
    assert cache.clear("env_1") == [new]  # no generation kept: a reset-cache's
