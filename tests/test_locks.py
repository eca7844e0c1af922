"""Locks across processes and nodes (``openwham.locks``): PostgreSQL advisory locks, file
locks for SQLite and for what is per node (mirrors); PR pushes of one task from two apps on
one database make one branch."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import Api, Server, completed_task, engine_settings, git, make_repo, make_server
from openwham.locks import LockTimeout, database_locks
from support.scripted_model import Say, ScriptedModel, Shell

HOLDER = """
import sys
from pathlib import Path
from openwham.locks import database_locks
with database_locks(sys.argv[1], Path(sys.argv[2])).hold(sys.argv[3], 30):
    print("held", flush=True)
    sys.stdin.read()
"""


def _holder(url: str, data: Path, key: str) -> subprocess.Popen[str]:
    """Another process holding ``key`` until its stdin closes."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, url, str(data), key],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline() == "held\n"
    return proc


@pytest.mark.parametrize("ending", ["release", "sigkill"])
def test_a_lock_held_by_another_process_is_waited_for_refused_after_the_timeout_and_freed(
    database_url: str, tmp_path: Path, ending: str
) -> None:
    data = tmp_path / "data"
    locks = database_locks(database_url, data)
    other = _holder(database_url, data, "pr-push:task_1")
    try:
        busy = r"pr-push:task_1 is busy: .* more than 0.3 s"
        with pytest.raises(LockTimeout, match=busy), locks.hold("pr-push:task_1", 0.3):
            pass
        with locks.hold("pr-push:task_2", 0.3):  # another key is not held
            pass
        if ending == "release":
            assert other.stdin is not None
            other.stdin.close()
        else:  # a killed node leaves no lock behind
            other.send_signal(signal.SIGKILL)
        other.wait(10)
        with locks.hold("pr-push:task_1", 10):
            pass
    finally:
        other.kill()
        other.wait(10)


FETCH = """
import sys
from pathlib import Path
from openwham.sandbox.workspace import Mirrors
print(Mirrors(Path(sys.argv[1])).ensure("widgets", sys.argv[2]))
"""


def test_two_processes_fetching_one_mirror_at_once_both_succeed(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "widgets")
    mirrors = tmp_path / "data" / "mirrors"
    for round_ in range(2):  # a first clone, then a fetch
        (repo / f"f{round_}").write_text("x\n")
        git("add", ".", cwd=repo)
        git("commit", "-q", "-m", f"round {round_}", cwd=repo)
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", FETCH, str(mirrors), str(repo)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(2)
        ]
        outs = [p.communicate(timeout=120) for p in procs]
        assert [p.returncode for p in procs] == [0, 0], outs
        assert {out.strip() for out, _ in outs} == {str(mirrors / "widgets.git")}
        mirror = mirrors / "widgets.git"
        git("fsck", "--strict", cwd=mirror)
        assert git("rev-parse", "main", cwd=mirror) == git("rev-parse", "main", cwd=repo)
    assert sorted(p.name for p in mirrors.iterdir()) == ["widgets.git", "widgets.lock"]


@pytest.fixture
def two_nodes(
    tmp_path: Path, postgres_url: str, scripted_model: ScriptedModel
) -> Iterator[tuple[Server, Server]]:
    """Two apps (own data directories, the same keys) on one PostgreSQL database; the first
    runs attempts."""
    first = make_server(tmp_path / "a", postgres_url, **engine_settings(scripted_model))
    a = next(first)
    (tmp_path / "b" / "data").mkdir(parents=True)
    shutil.copytree(tmp_path / "a" / "data" / "keys", tmp_path / "b" / "data" / "keys")
    second = make_server(tmp_path / "b", postgres_url)
    b = next(second)
    try:
        yield a, b
    finally:
        for gen in (second, first):
            for _ in gen:
                pass


@pytest.mark.sandbox
def test_two_nodes_pushing_a_pr_for_one_task_at_once_make_one_branch(
    two_nodes: tuple[Server, Server], scripted_model: ScriptedModel, tmp_path: Path
) -> None:
    """The first node's push is held at the remote (a pre-receive hook) while the second
    node is asked for the same push: it waits for the first, then answers with its result.
    Before, the lock was a dict in one process: the second node planned and pushed too."""
    a, b = two_nodes
    work = make_repo(tmp_path / "work")
    remote = tmp_path / "remote.git"
    git("clone", "-q", "--bare", str(work), str(remote), cwd=tmp_path)
    calls, release = tmp_path / "hook-calls", tmp_path / "hook-release"
    hook = remote / "hooks" / "pre-receive"
    hook.write_text(
        f"#!/bin/sh\necho x >> {calls}\n"
        f"for i in $(seq 1200); do [ -e {release} ] && exit 0; sleep 0.05; done\n"
    )
    hook.chmod(0o755)
    env = a.api.create_env(str(remote))
    task_id, turn_id, _ = completed_task(
        a.api, scripted_model, env["id"], "Add notes", [Shell("echo n >> notes.txt"), Say("Ok.")]
    )
    api_b = Api(b.api.client, a.api.token)
    answers: dict[str, Any] = {}

    def push(name: str, api: Api) -> None:
        answers[name] = api.post(f"tasks/{task_id}/turns/{turn_id}/pr")

    first = threading.Thread(target=push, args=("a", a.api))
    first.start()
    deadline = time.monotonic() + 60
    while not calls.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert calls.exists(), "the first push never reached the remote"
    second = threading.Thread(target=push, args=("b", api_b))
    second.start()
    second.join(2.0)  # it waits for the first node's push (or, unlocked, pushes itself)
    assert "b" not in answers, answers["b"].text
    release.touch()
    first.join(120)
    second.join(120)
    assert answers["a"].status_code == 200, answers["a"].text
    assert answers["b"].status_code == 200, answers["b"].text
    assert answers["a"].json() == answers["b"].json()
    branches = git("for-each-ref", "--format=%(refname:short)", "refs/heads", cwd=remote).split()
    assert sorted(branches) == sorted(["main", answers["a"].json()["pull_request"]["head"]])
    assert calls.read_text() == "x\n"  # one push reached the remote
