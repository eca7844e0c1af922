"""sandbox.snapshots without a sandbox: what each snapshot records of its environment and
cache generation, and a clear that keeps the current generation's (the queue workers' sweep,
``Workspaces.drop_stale_caches``) and never one a sandbox holds; the cache's total size limit
with least-recently-used eviction."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from openwham.sandbox.snapshots import RepoAt, Snapshots


def _take(cache: Snapshots, tmp: Path, env: str, generation: str, name: str, size: int = 0) -> Path:
    work = tmp / name
    (work / "workspace").mkdir(parents=True)
    (work / "workspace" / "marker").write_text(name)
    (work / "workspace" / "deps.bin").write_bytes(os.urandom(size))
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


def test_beyond_the_size_limit_the_least_recently_used_go_but_not_a_held_or_recent_one(
    tmp_path: Path,
) -> None:
    cache = Snapshots(tmp_path / "cache", max_age=3600, max_bytes=1 << 40, idle_seconds=0)
    paths = [_take(cache, tmp_path, f"env_{i}", "g", f"s{i}", size=200_000) for i in range(4)]
    size = max(json.loads((p / "ready").read_text())["size"] for p in paths)
    assert size >= 200_000
    now = time.time()
    for i, path in enumerate(paths):  # last used in order: s0 the longest ago
        os.utime(path / "ready", (now - 100 + i, now - 100 + i))
    cache.max_bytes = int(size * 2.5)  # room for two

    oldest = next(s for s in cache._all() if s.path == paths[0])
    lease = cache.hold(oldest)
    assert lease is not None
    try:
        assert cache.evict() == [paths[1]]  # s0 is held: the next least recently used goes
    finally:
        lease.close()
    assert cache.evict() == [paths[0]]  # once nothing holds it
    assert [p.exists() for p in paths] == [False, False, True, True]
    assert cache.evict() == []  # within the limit

    # one used within ``idle_seconds`` (an attempt between its sandboxes) stays over the limit
    recent = Snapshots(tmp_path / "cache", max_age=3600, max_bytes=1, idle_seconds=60)
    os.utime(paths[3] / "ready")
    assert recent.evict() == [paths[2]] and paths[3].exists()
