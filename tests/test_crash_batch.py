"""Crash recovery over a batch: ``wham serve`` killed with SIGKILL at random points.

A real server (subprocess, bubblewrap sandboxes, the real Codex CLI against the scripted
model) runs a batch of tasks: plain ones, one with best-of-2, ones whose environment has a
setup script, a follow-up and PR pushes. The server is killed with SIGKILL six times: right
after a ``POST tasks``, during a setup script, while the agent runs a command, after the
agent's last model request (diff and recording), while a PR push waits at the remote and
right after a restart, in an order and with delays drawn from a seeded random generator (the
seed is printed; set ``WHAM_CRASH_SEED`` to replay a run). After every kill, none of the
killed server's processes may be left; it is restarted on the same data directory. At the
end nothing is lost (every task created exists, every attempt completed), nothing is stuck
(all terminal within a bounded wait) and nothing is duplicated (one result, one diff and one
terminal event per attempt, event ids unique and increasing, one PR branch per task), and no
attempt directory of the killed servers is left but what follow-ups need.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import (
    WHAM,
    LiveServer,
    git,
    make_repo,
    parse_sse,
    serve_env,
    start_live_server,
    stop,
)
from support.procs import cwd_pids, host_pids, namespace_pids, pid_namespace, unique_marker
from support.scripted_model import Say, ScriptedModel, Shell

PREFIX = "/backend-api/wham"
TERMINAL = ("completed", "failed", "cancelled")
PHASES = ("after_post", "setup", "agent", "diff", "restart")  # and "pr", once a task completed
MAX_TRIES = 8  # more than the kills: every attempt must complete in the end
# the bound on the whole batch: it takes about 2 minutes on a loaded 2-core machine, most of
# it six server start-ups and Codex start-ups
DEADLINE = 240.0


def _sandbox_namespaces(needle: str) -> set[str]:
    """The PID namespaces of the sandboxes whose bubblewrap carries ``needle`` (the data
    directory, unique to this test) on its command line."""
    found: set[str] = set()
    for pid in host_pids(needle):
        try:
            host = pid_namespace(pid)
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            for child in children:
                ns = pid_namespace(int(child))
                if ns != host:
                    found.add(ns)
        except OSError:
            continue
    return found


class Watcher:
    """Samples the sandboxes of the servers under test, so a kill can be checked for leftovers
    in namespaces whose bubblewrap died first."""

    def __init__(self, needle: str) -> None:
        self.needle = needle
        self.namespaces: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Watcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def sample(self) -> None:
        self.namespaces |= _sandbox_namespaces(self.needle)

    def _run(self) -> None:
        while not self._stop.wait(0.25):
            self.sample()


@dataclass
class Run:
    """One crash batch: what the test created, to check against what the server kept."""

    rng: random.Random
    env_ids: dict[str, str]
    agent_marker: str
    setup_marker: str
    last_step: threading.Event  # the agent's last model request came: the diff is next
    pushing: Path  # a push reached the remote (its post-receive hook runs)
    unanswered: int = 0  # POSTs the kill may have cut off
    tasks: dict[str, str] = field(default_factory=dict)  # task id -> environment kind
    attempts: dict[str, int] = field(default_factory=dict)  # user turn id -> attempts asked
    started: float = field(default_factory=time.monotonic)
    first: str = ""  # the best-of-2 task, which gets a follow-up once it completed
    follow_up: str = ""  # the follow-up's user turn

    def post_task(self, c: httpx.Client, kind: str, prompt: str, n: int = 1) -> str:
        body: dict[str, Any] = {
            "new_task": {"environment_id": self.env_ids[kind]},
            "input_items": _message(prompt),
        }
        if n > 1:
            body["metadata"] = {"best_of_n": n}
        r = c.post("tasks", json=body)
        assert r.status_code == 200, r.text
        task_id = str(r.json()["task"]["id"])
        self.tasks[task_id] = kind
        self.attempts[r.json()["user_turn"]["id"]] = n
        return task_id

    def post_in_flight(self, c: httpx.Client, prompt: str) -> None:
        """``POST tasks`` while the server is being killed (``unanswered`` counts those whose
        answer may be lost)."""
        with contextlib.suppress(httpx.HTTPError):
            self.post_task(c, "plain", prompt)
            self.unanswered -= 1

    def adopt_unanswered(self, c: httpx.Client) -> None:
        """Tasks whose ``POST`` got no answer but were created: at most one per such POST,
        each checked like the others from here on."""
        listed = [t["id"] for t in c.get("tasks/list", params={"limit": 100}).json()["items"]]
        extra = [t for t in listed if t not in self.tasks]
        assert len(extra) <= self.unanswered, (extra, self.unanswered)
        for task_id in extra:
            self.tasks[task_id] = "plain"
            for turn in _turns(c, task_id):
                if turn["role"] == "user":
                    self.attempts[turn["id"]] = 1

    def maybe_follow_up(self, c: httpx.Client) -> None:
        """The follow-up of the best-of-2 task, once its current attempt completed."""
        if self.follow_up or not self.first:
            return
        turn = _current(c, self.first)
        if turn["turn_status"] != "completed":
            return
        r = c.post(
            "tasks",
            json={
                "follow_up": {"task_id": self.first, "turn_id": turn["id"]},
                "input_items": _message("Follow up: and once more"),
            },
        )
        assert r.status_code == 200, r.text
        self.follow_up = str(r.json()["user_turn"]["id"])
        self.attempts[self.follow_up] = 1


def _client(srv: LiveServer, token: str) -> httpx.Client:
    return httpx.Client(
        base_url=f"{srv.url}{PREFIX}", headers={"Authorization": f"Bearer {token}"}, timeout=60
    )


def _token(data: Path, env: dict[str, str]) -> str:
    out = subprocess.run(
        [str(WHAM), "token", "create", "--data-dir", str(data)],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, **env},
    )
    return out.stdout.strip()


def _message(prompt: str) -> list[dict[str, Any]]:
    return [
        {"type": "message", "role": "user", "content": [{"content_type": "text", "text": prompt}]}
    ]


def _wait(what: str, done: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            print(f"  ({what}: not seen within {timeout:.0f} s)")
            return False
        time.sleep(0.05)
    return True


def _current(c: httpx.Client, task_id: str) -> dict[str, Any]:
    return dict(c.get(f"tasks/{task_id}").json()["current_assistant_turn"])


def _turns(c: httpx.Client, task_id: str) -> list[dict[str, Any]]:
    """Every turn of the task, each with its ``parent`` turn id."""
    mapping = c.get(f"tasks/{task_id}/turns").json()["turn_mapping"]
    return [{**entry["turn"], "parent": entry["parent"]} for entry in mapping.values()]


def _quietly(call: Callable[[str], Any], path: str) -> None:
    with contextlib.suppress(httpx.HTTPError):  # the server was killed under it
        call(path)


def _push_held_at_the_remote(
    c: httpx.Client, repo: Path, prompt: str, held: Path, hold_timeout: float
) -> tuple[str, dict[str, Any]]:
    """Run a task on ``repo`` to completion and start its PR push in a thread; return once
    the remote's hook says it holds the push (``held`` exists). The task id and its turn."""
    r = c.post("environments", json={"label": "acme/repo", "repos": [str(repo)]})
    assert r.status_code == 201, r.text
    body = {"new_task": {"environment_id": r.json()["id"]}, "input_items": _message(prompt)}
    r = c.post("tasks", json=body)
    assert r.status_code == 200, r.text
    task_id = str(r.json()["task"]["id"])
    assert _wait("completed", lambda: _current(c, task_id)["turn_status"] in TERMINAL, 90)
    turn = _current(c, task_id)
    assert turn["turn_status"] == "completed", turn["error"]
    pr = f"tasks/{task_id}/turns/{turn['id']}/pr"
    threading.Thread(target=_quietly, args=(c.post, pr), daemon=True).start()
    assert _wait("the push at the remote", held.exists, hold_timeout)
    return task_id, turn


@pytest.fixture(params=["sqlite", "postgres"])
def database(request: pytest.FixtureRequest) -> Iterator[dict[str, str]]:
    """The server's database: the embedded SQLite, or PostgreSQL (``WHAM_DATABASE_URL``)."""
    if request.param == "sqlite":
        yield {}
        return
    yield {"WHAM_DATABASE_URL": str(request.getfixturevalue("postgres_url"))}


def test_sigkill_at_random_points_loses_nothing_leaves_nothing_stuck_or_twice(
    tmp_path: Path, scripted_model: ScriptedModel, database: dict[str, str]
) -> None:
    seed = int(os.environ.get("WHAM_CRASH_SEED") or random.SystemRandom().randrange(1 << 32))
    print(f"\nWHAM_CRASH_SEED={seed}")
    rng = random.Random(seed)
    data = tmp_path / unique_marker("crash-data")  # on every sandbox's bwrap command line
    repos = {"plain": make_repo(tmp_path / "plain"), "setup": make_repo(tmp_path / "setup")}
    pushing = tmp_path / "pushing"
    for repo in repos.values():  # holds each push a second after the branch is on the remote
        hook = repo / ".git" / "hooks" / "post-receive"
        hook.write_text(f"#!/bin/sh\ntouch {pushing}\nsleep 1\n")
        hook.chmod(0o755)
    run = Run(
        rng=rng,
        env_ids={},
        agent_marker=unique_marker("crash-agent"),
        setup_marker=unique_marker("crash-setup"),
        last_step=threading.Event(),
        pushing=pushing,
    )
    scripted_model.script = [
        Shell(
            f"python3 -c 'import time; time.sleep(1)' {run.agent_marker}; echo step >> notes.txt"
        ),
        Say("Done."),
    ]

    def on_request(body: dict[str, Any]) -> None:
        outputs = [i for i in body.get("input") or [] if i.get("type") == "function_call_output"]
        if len(outputs) == 1:
            run.last_step.set()

    scripted_model.on_request = on_request
    env = {
        **serve_env(scripted_model),
        **database,
        "WHAM_ATTEMPT_MAX_TRIES": str(MAX_TRIES),
        "WHAM_STANDBY_SANDBOXES": "1",
    }
    phases = list(PHASES)
    rng.shuffle(phases)
    phases.insert(rng.randrange(2, len(phases) + 1), "pr")
    if phases[0] == "restart":  # after a restart, not before the first one
        phases[0], phases[1] = phases[1], phases[0]
    print("kills:", " ".join(phases))
    servers: list[LiveServer] = []
    with Watcher(data.name) as watcher:
        try:
            srv = start_live_server(data, env)
            servers.append(srv)
            token = _token(data, env)
            with _client(srv, token) as c:
                for kind, setup in (
                    ("plain", []),
                    ("setup", [f"python3 -c 'import time; time.sleep(1.5)' {run.setup_marker}"]),
                ):
                    r = c.post(
                        "environments",
                        json={"label": f"acme/{kind}", "repos": [str(repos[kind])], "setup": setup},
                    )
                    assert r.status_code == 201, r.text
                    run.env_ids[kind] = r.json()["id"]
            for i, phase in enumerate(phases):
                with _client(srv, token) as c:  # open while requests are cut off
                    _round(c, run, phase, i)
                    watcher.sample()
                    stop(srv, signal.SIGKILL)
                _assert_nothing_left(watcher, data)
                srv = start_live_server(data, env)
                servers.append(srv)
            with _client(srv, token) as c:
                _finish(c, run)
                attempts = _assert_batch(c, run, repos)
        finally:
            for s in servers:
                stop(s)
        _assert_nothing_left(watcher, data)
    _assert_attempt_dirs(data / "attempts")
    print(
        f"crash batch: {len(phases)} kills, {len(run.tasks)} tasks, {len(attempts)} attempts, "
        f"{time.monotonic() - run.started:.0f} s"
    )


def _round(c: httpx.Client, run: Run, phase: str, i: int) -> None:
    """Submit this round's work and return when the server is to be killed."""
    print(f"{time.monotonic() - run.started:5.1f} s: round {i}, kill {phase}")
    rng = run.rng
    if not run.first:
        run.first = run.post_task(c, "plain", f"Best of two number {i}", n=2)
    run.maybe_follow_up(c)
    if phase == "after_post":
        run.post_task(c, rng.choice(["plain", "setup"]), f"Plain task number {i}")
        # and one more whose answer the kill may cut off: it exists once or not at all
        run.unanswered += 1
        threading.Thread(target=run.post_in_flight, args=(c, f"In flight number {i}")).start()
        time.sleep(rng.uniform(0, 0.2))
    elif phase == "setup":
        run.post_task(c, "setup", f"Setup task number {i}")
        if _wait("setup script", lambda: bool(host_pids(run.setup_marker)), 60):
            time.sleep(rng.uniform(0, 1.2))
    elif phase == "agent":
        run.post_task(c, "plain", f"Agent task number {i}")
        if _wait("agent command", lambda: bool(host_pids(run.agent_marker)), 60):
            time.sleep(rng.uniform(0, 0.8))
    elif phase == "restart":  # while the restarted server takes up what the last one left
        time.sleep(rng.uniform(0, 1.5))
    elif phase == "diff":
        run.last_step.clear()
        run.post_task(c, rng.choice(["plain", "setup"]), f"Diff task number {i}")
        if _wait("last model request", run.last_step.is_set, 60):
            time.sleep(rng.uniform(0, 0.6))
    else:  # "pr": push a completed task's change, kill once the remote has it, unrecorded
        _wait("a completed task", lambda: bool(_completed(c, run)), 90)
        done = _completed(c, run)
        if done:
            task_id = rng.choice(done)
            turn_id = _current(c, task_id)["id"]
            path = f"tasks/{task_id}/turns/{turn_id}/pr"
            run.pushing.unlink(missing_ok=True)
            threading.Thread(target=_quietly, args=(c.post, path), daemon=True).start()
            if _wait("the push at the remote", run.pushing.exists, 30):
                time.sleep(rng.uniform(0, 0.8))


def _completed(c: httpx.Client, run: Run) -> list[str]:
    return [t for t in run.tasks if _current(c, t)["turn_status"] == "completed"]


def _finish(c: httpx.Client, run: Run) -> None:
    """Wait (bounded) for every attempt to end, the follow-up included, then push a PR of
    every task (again, for those whose push a kill interrupted)."""

    def settled() -> bool:
        run.maybe_follow_up(c)
        turns = [t for task_id in run.tasks for t in _turns(c, task_id)]
        return bool(run.follow_up) and all(
            t["turn_status"] in TERMINAL for t in turns if t["role"] == "assistant"
        )

    print(f"{time.monotonic() - run.started:5.1f} s: waiting for the batch to end")
    run.adopt_unanswered(c)
    left = DEADLINE - (time.monotonic() - run.started)
    assert _wait("every attempt ended", settled, max(left, 30)), "attempts are stuck"
    for task_id in run.tasks:
        turn = _current(c, task_id)
        if turn["turn_status"] == "completed":
            r = c.post(f"tasks/{task_id}/turns/{turn['id']}/pr")
            assert r.status_code == 200, r.text


def _assert_batch(c: httpx.Client, run: Run, repos: dict[str, Path]) -> list[str]:
    """Nothing lost, nothing twice; returns every attempt's id."""
    listed = [t["id"] for t in c.get("tasks/list", params={"limit": 100}).json()["items"]]
    assert sorted(listed) == sorted(run.tasks), "tasks lost or duplicated"
    attempts: list[str] = []
    branches: dict[str, set[str]] = {"plain": set(), "setup": set()}
    for task_id, kind in run.tasks.items():
        turns = _turns(c, task_id)
        users = [t for t in turns if t["role"] == "user"]
        assert sorted(u["id"] for u in users) == sorted(
            u for u in run.attempts if any(u == t["id"] for t in users)
        )
        for user in users:
            mine = [t for t in turns if t["role"] == "assistant" and t["parent"] == user["id"]]
            assert len(mine) == run.attempts[user["id"]], (task_id, user["id"], len(mine))
            for turn in mine:
                attempts.append(turn["id"])
                assert turn["turn_status"] == "completed", (task_id, turn["id"], turn["error"])
                prs = [i for i in turn["output_items"] if i["type"] == "pr"]
                assert len(prs) == 1, (turn["id"], turn["output_items"])  # one diff
                assert "+step" in prs[0]["output_diff"]["diff"]
                messages = turn["worklog"]["messages"]
                assert [m["author"]["role"] for m in messages].count("user") == 1, messages
                commands = sum(m.get("recipient") == "container.exec" for m in messages)
                assert commands == (0 if user["id"] == run.follow_up else 1), messages
                frames = parse_sse(c.get(f"tasks/{task_id}/turns/{turn['id']}/stream").text)
                ids = [int(f["id"]) for f in frames]
                assert ids == sorted(set(ids)), ids  # unique, in order
                ends = [
                    f
                    for f in frames
                    if f["data"]["item_type"] == "task_turn_event"
                    and f["data"]["payload"]["turn_status"] in TERMINAL
                ]
                assert len(ends) == 1 and ends[0] is frames[-1], ends
        task = c.get(f"tasks/{task_id}").json()
        pushed = task["task"].get("external_pull_requests") or []
        assert len(pushed) == 1, pushed
        branches[kind].add(pushed[0]["pull_request"]["head"])
    for kind, repo in repos.items():
        on_remote = set(
            git("for-each-ref", "--format=%(refname:short)", "refs/heads/codex", cwd=repo).split()
        )
        assert on_remote == branches[kind], (
            f"PR branches in {kind}: {on_remote} != {branches[kind]}"
        )
    return attempts


def _assert_attempt_dirs(root: Path) -> None:
    """Nothing is left of the attempts (all completed: what follow-ups need, their Codex
    sessions, is in the database), nor of a standby or an attempt of a killed server."""
    left = {p.name: sorted(os.listdir(p)) for p in root.iterdir()}
    assert left == {}, left


def _assert_nothing_left(watcher: Watcher, data: Path) -> None:
    """No process of a killed server: nothing with its data directory on the command line
    (bubblewrap, git) or as its working directory (git on the host), nothing in the PID
    namespace of any sandbox it ran."""
    deadline = time.monotonic() + 15
    while True:
        left = (
            host_pids(data.name)
            + cwd_pids(data)
            + [p for ns in watcher.namespaces for p in namespace_pids(ns)]
        )
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    described = {}
    for pid in left:
        try:
            described[pid] = Path(f"/proc/{pid}/cmdline").read_bytes()[:300]
        except OSError:
            continue
    assert not described, f"processes of a killed server are left: {described}"


@pytest.mark.parametrize("retry", ["same", "follow_up"])
def test_a_pr_push_cut_short_by_a_crash_is_finished_on_the_same_branch_not_a_second_one(
    tmp_path: Path, scripted_model: ScriptedModel, retry: str
) -> None:
    """The server is killed while ``git push`` waits for the remote (a post-receive hook
    holds it: the branch is on the remote, the push not yet recorded). After the restart, the
    same attempt's push goes to the same branch with the same commit; a follow-up's goes on
    top of it on that branch. Before, either named a new branch, found the name taken by the
    first push's commit and pushed ``<name>-<suffix>``: two branches for one task."""
    repo = make_repo(tmp_path / "repo")
    held, release = tmp_path / "push-held", tmp_path / "push-release"
    hook = repo / ".git" / "hooks" / "post-receive"
    hook.write_text(
        f"#!/bin/sh\ntouch {held}\n"
        f"for i in $(seq 600); do [ -e {release} ] && exit 0; sleep 0.05; done\n"
    )
    hook.chmod(0o755)
    scripted_model.script = [Shell("echo step >> notes.txt"), Say("Done.")]
    data = tmp_path / unique_marker("pr-crash")
    env = serve_env(scripted_model)
    first = start_live_server(data, env)
    try:
        token = _token(data, env)
        with _client(first, token) as c:
            task_id, turn = _push_held_at_the_remote(c, repo, "Add notes", held, 30)
            pr = f"tasks/{task_id}/turns/{turn['id']}/pr"
    finally:
        stop(first, signal.SIGKILL)
    release.touch()  # the orphaned push completes: the branch is on the remote, unrecorded
    deadline = time.monotonic() + 10
    while not git("for-each-ref", "refs/heads/codex", cwd=repo) and time.monotonic() < deadline:
        time.sleep(0.05)
    (pushed_first,) = git(
        "for-each-ref", "--format=%(refname:short) %(objectname)", "refs/heads/codex", cwd=repo
    ).splitlines()
    branch, first_commit = pushed_first.split()

    second = start_live_server(data, env)
    try:
        with _client(second, token) as c:
            if retry == "follow_up":
                r = c.post(
                    "tasks",
                    json={
                        "follow_up": {"task_id": task_id, "turn_id": turn["id"]},
                        "input_items": _message("And more"),
                    },
                )
                assert r.status_code == 200, r.text
                follow = r.json()["turn"]["id"]
                assert _wait(
                    "follow-up", lambda: _current(c, task_id)["turn_status"] in TERMINAL, 90
                )
                assert _current(c, task_id)["turn_status"] == "completed"
                pr = f"tasks/{task_id}/turns/{follow}/pr"
            r = c.post(pr)
            assert r.status_code == 200, r.text
            entry = r.json()["pull_request"]
            assert entry["head"] == branch
            if retry == "same":
                assert entry["head_sha"] == first_commit
            else:  # on top of the first push, which is recorded as the task's branch
                parent = git("rev-parse", f"{entry['head_sha']}~1", cwd=repo).strip()
                assert parent == first_commit
            meta = c.get(f"tasks/{task_id}").json()["task"]["denormalized_metadata"]
            assert meta["pushed_branch_name"] == branch
    finally:
        stop(second)
    branches = git("for-each-ref", "--format=%(refname:short)", "refs/heads/codex", cwd=repo)
    assert branches.split() == [branch]
