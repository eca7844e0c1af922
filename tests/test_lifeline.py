"""Host git run by the server dies with it (``openwham.lifeline``): after a SIGKILL of the
process that started it, a push held at the remote is gone within seconds instead of
running on (and landing a branch nobody records)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import git, make_repo, serve_env, start_live_server, stop
from support.procs import unique_marker
from support.scripted_model import Say, ScriptedModel, Shell
from test_crash_batch import _client, _push_held_at_the_remote, _token, _wait

PUSH = """
import sys
from pathlib import Path
from openwham.sandbox.workspace import git
git("push", sys.argv[1], "HEAD:refs/heads/held", cwd=Path(sys.argv[2]))
"""


def _held_remote(tmp_path: Path, hooked: Path) -> tuple[Path, Path]:
    """A hook in ``hooked`` that holds a push until ``release`` exists (``held`` once it
    runs)."""
    held, release = tmp_path / "held", tmp_path / "release"
    hooks = hooked / ("hooks" if (hooked / "hooks").is_dir() else ".git/hooks")
    hook = hooks / "pre-receive"
    hook.write_text(
        f"#!/bin/sh\ntouch {held}\n"
        f"for i in $(seq 1200); do [ -e {release} ] && exit 0; sleep 0.05; done\n"
    )
    hook.chmod(0o755)
    return held, release


def _descendants(pid: int) -> list[int]:
    children = []
    for task in Path(f"/proc/{pid}/task").glob("*"):  # a child is listed by its forking thread
        try:
            children += [int(x) for x in (task / "children").read_text().split()]
        except OSError:
            continue
    return children + [d for c in children for d in _descendants(c)]


def _git_processes(pid: int, verb: str) -> list[int]:
    """The ``git <verb>`` processes ``pid`` started (its descendants: pids this test knows,
    never a search of other programs' processes)."""
    found = []
    for child in _descendants(pid):
        try:
            argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv[0].endswith(b"git") and verb.encode() in argv:
            found.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _gone_within(pids: list[int], seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while (left := [p for p in pids if _alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def test_host_git_dies_with_the_process_that_started_it(tmp_path: Path) -> None:
    work = make_repo(tmp_path / "work")
    remote = tmp_path / f"{unique_marker('remote')}.git"
    git("clone", "-q", "--bare", str(work), str(remote), cwd=tmp_path)
    held, release = _held_remote(tmp_path, remote)
    proc = subprocess.Popen([sys.executable, "-c", PUSH, str(remote), str(work)])
    try:
        assert _wait("the push at the remote", held.exists, 60)
        pushes = _git_processes(proc.pid, "push")
        assert len(pushes) == 1
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        assert _gone_within(pushes, 5.0) == [], "git push outlived the process that ran it"
    finally:
        release.touch()
        proc.kill()
        proc.wait(10)


@pytest.mark.sandbox
@pytest.mark.slow
def test_a_pr_push_held_at_the_remote_dies_with_a_killed_server(
    tmp_path: Path, scripted_model: ScriptedModel
) -> None:
    repo = make_repo(tmp_path / "repo")
    held, release = _held_remote(tmp_path, repo)
    scripted_model.script = [Shell("echo step >> notes.txt"), Say("Done.")]
    data = tmp_path / unique_marker("lifeline")
    env = serve_env(scripted_model)
    srv = start_live_server(data, env)
    try:
        with _client(srv, _token(data, env)) as c:
            _push_held_at_the_remote(c, repo, "Go", held, 60)
            pushes = _git_processes(srv.process.pid, "push")
            assert len(pushes) == 1
        stop(srv, signal.SIGKILL)
        assert _gone_within(pushes, 5.0) == [], "git push outlived the killed server"
    finally:
        release.touch()
        stop(srv, signal.SIGKILL)
