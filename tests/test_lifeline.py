"""Host git run by the server dies with it (``openwham.lifeline``): after a SIGKILL of the
process that started it, a push held at the remote is gone within seconds instead of
running on (and landing a branch nobody records)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import git, make_repo, serve_env, start_live_server, stop
from support.procs import slow_setpriv, unique_marker
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


_STARTS = """
import subprocess, sys
from openwham import lifeline
lifeline.setpriv = lambda: sys.argv[1]
subprocess.run(lifeline.command(["touch", sys.argv[2]]))
"""


def test_a_command_whose_server_died_before_the_signal_was_armed_runs_nothing(
    tmp_path: Path,
) -> None:
    """``lifeline.command``: the server killed between its vfork and ``setpriv``'s
    ``prctl`` (the signal then never comes: the parent is gone already). The check after it
    finds the parent is not the server any more and runs nothing; without it the command ran
    on, orphaned."""
    (slow, pid), ran = slow_setpriv(tmp_path), tmp_path / "ran"
    server = subprocess.Popen([sys.executable, "-c", _STARTS, str(slow), str(ran)])
    assert server.wait(timeout=30) == -signal.SIGKILL
    assert _wait("the wrapped command's start", pid.exists, 10)
    child = int(pid.read_text())
    try:
        assert _gone_within([child], 10.0) == [], "the command outlived its check"
        assert not ran.exists(), "the command ran although its server had died"
    finally:
        if _alive(child):
            os.kill(child, signal.SIGKILL)


def test_a_command_runs_with_the_signal_armed_for_its_parent(tmp_path: Path) -> None:
    """What ``lifeline.command`` runs keeps its pid through ``setpriv`` and ``sh`` and has
    SIGKILL as its parent-death signal (``/proc``'s status has no field for it: the test
    kills the parent and watches the child go, as the push test does through a server)."""
    code = """
import subprocess, sys, time
from openwham import lifeline
p = subprocess.Popen(lifeline.command(["sleep", "300"]))
print(p.pid, flush=True)
time.sleep(300)
"""
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        assert _wait(
            "sleep to be executed",
            lambda: Path(f"/proc/{child}/cmdline").read_bytes().startswith(b"sleep\0"),
            10,
        )
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        assert _gone_within([child], 5.0) == [], "the command outlived the process that ran it"
    finally:
        parent.kill()
        parent.wait(10)


def test_host_git_is_started_without_a_preexec_fn(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Host git (``sandbox.workspace.git``, ``service.repos``) starts through
    ``lifeline.command``, with no ``preexec_fn``: one makes ``subprocess`` fork the whole
    server with the GIL held instead of ``vfork`` (docs/benchmarks.md)."""
    from openwham.sandbox import workspace
    from openwham.service import repos

    started: list[tuple[list[str], object]] = []
    execute = subprocess.Popen._execute_child  # type: ignore[attr-defined]

    def spy(self: object, args: list[str], executable: object, preexec_fn: object, *a, **k):  # type: ignore[no-untyped-def]
        started.append((list(args), preexec_fn))
        return execute(self, args, executable, preexec_fn, *a, **k)

    work = make_repo(tmp_path / "work")
    monkeypatch.setattr(subprocess.Popen, "_execute_child", spy)
    assert workspace.git("rev-parse", "HEAD", cwd=work).strip()
    assert repos._local_head(str(work)) == (True, "main")
    assert len(started) == 2
    for args, preexec in started:
        assert preexec is None, args
        assert args[1:3] == ["--pdeathsig", "KILL"], args
