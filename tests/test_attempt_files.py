"""What stays of an attempt on disk (engine/storage.py): a completed attempt's Codex home and
nothing of failed, cancelled or deleted ones; attempts pending or running are not touched."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import Server, finish_turn
from openwham.engine import artifacts as packing
from openwham.engine import storage
from openwham.service.artifacts import open_store


def _leave_files(root: Path, turn_id: str) -> Path:
    """An attempt directory as a crash (or an older version) leaves it."""
    path = root / turn_id
    for sub in ("workspace/.git", "home/.cache", "out", "codex-home/sessions"):
        (path / sub).mkdir(parents=True)
    (path / "codex-home" / "skills" / ".system").mkdir(parents=True)
    (path / "codex-home" / "config.toml").write_text("model = 'x'\n")
    (path / "codex-home" / "state_5.sqlite-wal").write_bytes(b"\0" * 1000)
    (path / "codex-home" / "sessions" / "rollout.jsonl").write_text("{}\n")
    (path / "out" / "diff").write_text("x" * 1000)
    (path / "closed").touch()
    (path / "scratch.idx").write_text("index")
    return path


def test_the_start_up_sweep_keeps_only_what_follow_ups_need(server: Server, repo: Path) -> None:
    api = server.api
    env = api.create_env(repo)
    turns = {}
    for status in ("completed", "failed", "cancelled", "pending", "in_progress"):
        turn = api.create_task(env["id"], f"task {status}")["turn"]["id"]
        if status != "pending":
            finish_turn(server, turn, status)
        turns[status] = turn
    root = server.app_state.settings.resolved_data_dir / "attempts"
    root.mkdir(parents=True, exist_ok=True)
    for turn in turns.values():
        _leave_files(root, turn)
    _leave_files(root, "turn_deleted0000")
    (root / ".standby-1-abc").mkdir()  # the engine's own (standbys are swept elsewhere)

    storage.sweep(root, server.app_state.db)

    assert sorted(p.name for p in (root / turns["completed"]).iterdir()) == [
        "closed",
        "codex-home",
    ]
    assert (root / turns["completed"] / "codex-home" / "sessions" / "rollout.jsonl").is_file()
    for gone in (turns["failed"], turns["cancelled"], "turn_deleted0000"):
        assert not (root / gone).exists(), gone
    for active in (turns["pending"], turns["in_progress"]):  # may be running elsewhere
        assert (root / active / "workspace").is_dir()
        assert (root / active / "out" / "diff").is_file()
    assert (root / ".standby-1-abc").is_dir()


def test_the_sweep_marks_closed_a_completed_attempt_whose_server_died_before_marking_it(
    server: Server, repo: Path
) -> None:
    """SIGKILL after an attempt's result was written but before its sandbox was marked gone
    (Codex may take seconds to close down): without the marker, a follow-up of that attempt
    waited 15 s for a sandbox that died with the server."""
    api = server.api
    env = api.create_env(repo)
    done = api.create_task(env["id"], "one")["turn"]["id"]
    finish_turn(server, done, "completed")
    root = server.app_state.settings.resolved_data_dir / "attempts"
    path = _leave_files(root, done)
    (path / "closed").unlink()

    storage.sweep(root, server.app_state.db)

    assert sorted(p.name for p in path.iterdir()) == ["closed", "codex-home"]
    # cut down as the attempt's own end would have: its session and configuration only
    assert sorted(p.name for p in (path / "codex-home").iterdir()) == ["config.toml", "sessions"]


def test_a_codex_home_is_cut_to_its_sessions_without_following_the_agents_links(
    tmp_path: Path,
) -> None:
    """Issue 20: a finished attempt kept 1.43 MB of Codex home (bundled skills, sqlite WALs).
    The agent wrote there: a link named like what is dropped is removed, not followed."""
    outside = tmp_path / "outside"
    (outside / ".system").mkdir(parents=True)
    (outside / ".system" / "precious").write_text("host file")
    (outside / "db.sqlite-wal").write_text("host file")
    home = tmp_path / "codex-home"
    (home / "sessions" / "2026").mkdir(parents=True)
    (home / "sessions" / "2026" / "rollout-1.jsonl").write_text("{}\n")
    (home / "config.toml").write_text("model = 'x'\n")
    (home / "tmp" / "arg0").mkdir(parents=True)
    (home / "state_5.sqlite").write_bytes(b"\0" * 300_000)
    (home / "state_5.sqlite-wal").symlink_to(outside / "db.sqlite-wal")
    (home / "skills").symlink_to(outside)
    storage.compact_codex_home(home)
    assert sorted(p.name for p in home.iterdir()) == ["config.toml", "sessions"]
    assert (home / "sessions" / "2026" / "rollout-1.jsonl").is_file()
    assert (outside / ".system" / "precious").read_text() == "host file"
    assert (outside / "db.sqlite-wal").read_text() == "host file"
    (home / "sessions").rename(tmp_path / "moved")
    (home / "sessions").symlink_to(outside)  # links to directories it keeps stay links
    storage.compact_codex_home(home)
    assert (outside / ".system" / "precious").is_file()


def test_the_end_of_an_attempt_keeps_its_codex_home_only_when_it_completed(
    server: Server, repo: Path
) -> None:
    api = server.api
    env = api.create_env(repo)
    done = api.create_task(env["id"], "one")["turn"]["id"]
    failed = api.create_task(env["id"], "two")["turn"]["id"]
    requeued = api.create_task(env["id"], "three")["turn"]["id"]  # pending again
    finish_turn(server, done, "completed")
    finish_turn(server, failed, "failed")
    root = server.app_state.settings.resolved_data_dir / "attempts"
    db = server.app_state.db
    for turn in (done, failed, requeued):
        _leave_files(root, turn)
        storage.tidy(root, db, turn)
    assert sorted(p.name for p in (root / done).iterdir()) == ["closed", "codex-home"]
    assert not (root / failed).exists()
    # its own executor ends a requeued attempt: the workspace goes (a retry starts afresh)
    assert not (root / requeued / "workspace").exists()
    assert not (root / requeued / "out").exists()


def test_a_clone_cut_short_leaves_no_temporary_mirror(tmp_path: Path) -> None:
    from conftest import make_repo
    from openwham.sandbox.workspace import Mirrors

    repo = make_repo(tmp_path / "src")
    root = tmp_path / "mirrors"
    stale = root / ".repo-k.abc123" / "m.git"  # what a kill -9 during `git clone` leaves
    stale.mkdir(parents=True)
    (stale / "HEAD").write_text("ref: refs/heads/main\n")
    other = root / ".repo-other.xyz"  # another key's clone may be running: not touched
    other.mkdir()
    Mirrors(root).ensure("repo-k", str(repo))
    assert not (root / ".repo-k.abc123").exists()
    assert other.is_dir()
    assert (root / "repo-k.git" / "HEAD").is_file()


def test_pr_push_scratch_left_by_a_crash_is_swept_when_old(tmp_path: Path) -> None:
    import os
    import time

    scratch = tmp_path / "tmp"
    old, fresh = scratch / "pr-old123", scratch / "pr-new456"
    for path in (old, fresh):
        (path / "objects").mkdir(parents=True)
    hour_ago = time.time() - 2 * storage.SCRATCH_MAX_AGE
    os.utime(old, (hour_ago, hour_ago))
    (scratch / "pr-link").symlink_to(tmp_path)  # never followed
    storage.sweep_scratch(scratch)
    assert not old.exists()
    assert fresh.is_dir()  # maybe another process's push under way
    assert (scratch / "pr-link").is_symlink() and tmp_path.is_dir()


def test_trees_an_agent_shaped_against_removal_are_removed(server: Server, repo: Path) -> None:
    """A failed attempt's workspace holds 3,000 nested directories (deeper than
    ``shutil.rmtree`` can recurse: it raised RecursionError out of the attempt's end) and
    directories made unreadable: the end of the attempt and the sweep remove them."""
    api = server.api
    env = api.create_env(repo)
    root = server.app_state.settings.resolved_data_dir / "attempts"
    db = server.app_state.db
    turns = [api.create_task(env["id"], f"task {i}")["turn"]["id"] for i in range(2)]
    for turn in turns:
        finish_turn(server, turn, "failed")
        path = _leave_files(root, turn)
        fd = os.open(path / "workspace", os.O_RDONLY)
        for _ in range(3000):
            os.mkdir("d", dir_fd=fd)
            child = os.open("d", os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = child
        os.close(fd)
        (path / "home" / "a" / "b").mkdir(parents=True)
        (path / "home" / "a" / "b" / "f").write_text("x")
        os.chmod(path / "home" / "a" / "b", 0)
        os.chmod(path / "home" / "a", 0)
    try:
        storage.tidy(root, db, turns[0])
        storage.sweep(root, db)
        assert not any((root / turn).exists() for turn in turns)
    finally:  # pytest's own clean-up of old temporary directories would choke on it too
        subprocess.run(["rm", "-rf", *(str(root / turn) for turn in turns)], check=True)


# The end of a completed attempt in a process killed while it removed the directory:
# ``storage.tidy`` stored the session, then ``remove_tree`` removed the Codex home (kill
# "after-codex-home": the ``closed`` marker may be left, by the file system's directory
# order) or everything in the directory (kill "before-directory": it is left empty).
_KILLED_IN_TIDY = """
import os, signal, sys
from pathlib import Path
from openwham.config import Settings
from openwham.engine import storage
from openwham.service.artifacts import open_store
from openwham.store.db import Database

url, root, turn, at = sys.argv[1], Path(sys.argv[2]), sys.argv[3], sys.argv[4]
real_rmdir = os.rmdir

def rmdir(path, *args, **kwargs):
    name = os.path.basename(os.fsdecode(path))
    if at == "before-directory" and name == turn:
        os.kill(os.getpid(), signal.SIGKILL)
    real_rmdir(path, *args, **kwargs)
    if at == "after-codex-home" and name == storage.CODEX_HOME:
        os.kill(os.getpid(), signal.SIGKILL)

os.rmdir = rmdir
db = Database(url)
storage.tidy(root, db, turn, open_store(Settings(), db))
"""


@pytest.mark.parametrize("at", ["after-codex-home", "before-directory"])
def test_a_completed_attempt_whose_removal_a_kill_cut_short_leaves_nothing(
    server: Server, repo: Path, at: str
) -> None:
    """CI (crash batch, seed 3058695315): a server was killed while the end of a completed
    attempt removed its directory, after its session was stored and its Codex home removed.
    What was left, the ``closed`` marker or an empty directory (which the start-up sweep then
    marked ``closed``), was kept for good as a completed attempt's files are, though it held
    no Codex home to resume from."""
    api = server.api
    env = api.create_env(repo)
    done = api.create_task(env["id"], "one")["turn"]["id"]
    finish_turn(server, done, "completed")
    root = server.app_state.settings.resolved_data_dir / "attempts"
    db = server.app_state.db
    path = _leave_files(root, done)
    killed = subprocess.run(
        [sys.executable, "-c", _KILLED_IN_TIDY, db.url, str(root), done, at],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    artifacts = open_store(server.app_state.settings, db)
    assert artifacts.present([done], packing.CODEX_HOME)  # stored before the removal began
    left = sorted(os.listdir(path))
    assert left == [] if at == "before-directory" else left in (["closed"], [])

    storage.sweep(root, db, artifacts)  # the restarted server's

    assert not path.exists()
    assert artifacts.present([done], packing.CODEX_HOME)  # follow-ups resume from the store
