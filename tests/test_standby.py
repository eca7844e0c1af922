"""Standby sandboxes: the next attempt's workspace and Codex, started ahead of time.

After an attempt ends the engine clones the next workspace for the same repository, branch
and agent settings and starts Codex in its sandbox, waiting for a prompt. These tests check,
through the API and the real sandbox, that a matching task takes it and gives the same result
as a cold start, and that a task it does not fit (moved branch, starting diff, other model)
does not, and that nothing of it outlives the server.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from conftest import (
    Server,
    engine_settings,
    git,
    make_repo,
    make_server,
    wait_for_task,
    wait_for_turn,
    wait_stored,
)
from openwham.engine.attempt import Engine
from openwham.engine.standby import AgentKey, Prepared, StandbyPool
from openwham.engine.workspace import READY_STANDBYS
from openwham.runtimes import codex
from openwham.store import models as m
from support.procs import foreign_process, namespace_pids, sandbox_namespace, wait_gone
from support.scripted_model import Patch, Say, ScriptedModel, Shell

EDIT = """\
*** Begin Patch
*** Update File: app.py
@@
-VALUE = 1
+VALUE = 2
*** End Patch"""


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    path = make_repo(tmp_path / "app")
    (path / "app.py").write_text("VALUE = 1\n")
    git("add", ".", cwd=path)
    git("commit", "-q", "-m", "app", cwd=path)
    return path


def engine_of(server: Server) -> Engine:
    runner = server.app_state.runner
    assert runner is not None and runner.engine is not None
    return runner.engine


def wait_standby(server: Server, count: int = 1, timeout: float = 30.0) -> None:
    """Wait until ``count`` standbys are ready and none is being prepared."""
    engine = engine_of(server)
    deadline = time.monotonic() + timeout
    while len(engine.standby) < count or engine.standby.busy:
        assert time.monotonic() < deadline, "no standby sandbox was prepared"
        time.sleep(0.05)


def run_info(server: Server, turn_id: str) -> dict[str, Any]:
    with server.app_state.db.sessions() as s:
        turn = s.get(m.Turn, turn_id)
        assert turn is not None
        return dict(turn.body["run"])


def edit_task(server: Server, env_id: str, **extra: Any) -> dict[str, Any]:
    created = server.api.create_task(env_id, "Make VALUE two", **extra)
    turn = wait_for_task(server.api, created["task"]["id"])["current_assistant_turn"]
    assert turn["turn_status"] == "completed", turn["error"]
    # the engine's last step: a standby is being prepared once the workspace is gone
    workspace = engine_of(server).attempts_root / turn["id"] / "workspace"
    deadline = time.monotonic() + 30
    while workspace.exists():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    return dict(turn)


def test_the_next_attempt_starts_in_a_standby_sandbox_with_the_same_result(
    standby_server: Server, scripted_model: ScriptedModel, repo: Path
) -> None:
    api = standby_server.api
    env = api.create_env(repo)
    script = [Shell("cat app.py && pwd && ls -a"), Patch(EDIT), Say("VALUE is 2 now.")]

    scripted_model.script = script
    cold = edit_task(standby_server, env["id"])
    assert run_info(standby_server, cold["id"])["standby"] is False
    wait_standby(standby_server)

    scripted_model.requests.clear()
    scripted_model.script = script
    warm = edit_task(standby_server, env["id"])
    info = run_info(standby_server, warm["id"])
    assert info["standby"] is True
    assert info["usage"]["requests"] == 3  # counted for this attempt, from the hand-over
    # the same diff, base and work log as a cold start; the prompt reached the model
    assert (
        warm["output_items"][-1]["output_diff"]["diff"]
        == (cold["output_items"][-1]["output_diff"]["diff"])
    )
    assert "+VALUE = 2" in warm["output_items"][-1]["output_diff"]["diff"]
    assert warm["base_commit_sha"] == cold["base_commit_sha"]
    assert len(warm["worklog"]["messages"]) == len(cold["worklog"]["messages"])
    assert "Make VALUE two" in str(scripted_model.requests[0]["input"])
    # the attempt ran in its own directory (its session is stored under its id); the
    # standby's is gone, a new one is prepared
    root = engine_of(standby_server).attempts_root
    assert b"config.toml" in wait_stored(standby_server, warm["id"])
    wait_standby(standby_server)
    standbys = [p.name for p in root.glob(".standby-*")]
    assert len(standbys) == 1
    # shown ready where an operator (or bench.bestof) sees it: the one standby, by name
    assert [p.name for p in (root / READY_STANDBYS).iterdir()] == standbys


def test_a_standby_is_not_used_when_it_does_not_fit_the_task(
    standby_server: Server, scripted_model: ScriptedModel, repo: Path
) -> None:
    api = standby_server.api
    env = api.create_env(repo)
    scripted_model.script = [Say("Looked.")]
    edit_task(standby_server, env["id"])
    wait_standby(standby_server)

    # the branch moved: the standby's checkout is stale
    (repo / "app.py").write_text("VALUE = 10\n")
    git("commit", "-qam", "ten", cwd=repo)
    # (the standby's agent got the prompt while the mirror was fetched, here made slow
    # enough for the agent to ask the model: it is dropped, and nothing of it reaches the
    # model or the work log)
    mirrors = engine_of(standby_server).workspaces.mirrors
    fetch = mirrors.ensure

    def slow_fetch(*args: Any, **kwargs: Any) -> Path:
        time.sleep(1.5)
        return fetch(*args, **kwargs)

    scripted_model.requests.clear()
    scripted_model.script = [Shell("cat app.py"), Say("Looked.")]
    mirrors.ensure = slow_fetch  # type: ignore[method-assign]
    try:
        moved = edit_task(standby_server, env["id"])
    finally:
        mirrors.ensure = fetch  # type: ignore[method-assign]
    assert run_info(standby_server, moved["id"])["standby"] is False
    assert moved["base_commit_sha"] == git("rev-parse", "HEAD", cwd=repo).strip()
    assert "VALUE = 10" in str(moved["worklog"])
    assert len(scripted_model.requests) == 2  # the cold attempt's two, no more
    messages = moved["worklog"]["messages"]
    assert [m["author"]["role"] for m in messages].count("user") == 1
    assert sum("cat app.py" in str(m["content"]) for m in messages) == 1

    # a starting diff: Codex reads the repository's config before it could be applied
    wait_standby(standby_server)
    patch = (
        "diff --git a/app.py b/app.py\n--- a/app.py\n+++ b/app.py\n@@ -1 +1 @@\n"
        "-VALUE = 10\n+VALUE = 11\n"
    )
    items = [
        {"type": "message", "role": "user", "content": [{"content_type": "text", "text": "x"}]},
        {"type": "pre_apply_patch", "output_diff": {"diff": patch}},
    ]
    scripted_model.script = [Say("Looked.")]
    patched = edit_task(standby_server, env["id"], input_items=items)
    assert run_info(standby_server, patched["id"])["standby"] is False

    # another model: the standby's Codex was started for the default one
    wait_standby(standby_server)
    scripted_model.requests.clear()
    scripted_model.script = [Say("Looked.")]
    other = edit_task(standby_server, env["id"], new_task={"model": "gpt-5.5-mini"})
    assert run_info(standby_server, other["id"])["standby"] is False
    assert scripted_model.requests[0]["model"] == "gpt-5.5-mini"

    # and the settings of the last attempt are the ones kept ready: the default model again
    # is cold once, then warm
    wait_standby(standby_server)
    scripted_model.script = [Say("Looked.")]
    first = edit_task(standby_server, env["id"])
    assert run_info(standby_server, first["id"])["standby"] is False
    wait_standby(standby_server)
    scripted_model.script = [Say("Looked.")]
    second = edit_task(standby_server, env["id"])
    assert run_info(standby_server, second["id"])["standby"] is True


def _kind(args: list[str]) -> str:
    """``git <verb>``, ``bwrap`` or the program of a command line the server started
    (``openwham.lifeline.command``'s wrappers looked through)."""
    names = [Path(a).name for a in args]
    if "bwrap" in names:
        return "bwrap"
    if "git" in names:
        rest = iter(names[names.index("git") + 1 :])
        for arg in rest:
            if arg in ("-c", "-C"):
                next(rest, None)
            elif not arg.startswith("-"):
                return f"git {arg}"
    return names[0]


def test_an_attempt_on_a_standby_starts_one_fetch_and_the_next_standbys_sandbox(
    standby_server: Server, scripted_model: ScriptedModel, repo: Path, monkeypatch: Any
) -> None:
    """The processes the server starts for an attempt that takes a standby, and for the
    standby prepared after it (overlay workspaces: the checkout at the commit exists): the
    mirror's fetch and the next standby's sandbox. The branch head (the standby's check, the
    next one's commit) is read from the mirror's files: two ``git rev-parse`` before, each a
    fork of the server. Neither git nor bwrap is started with a ``preexec_fn`` (one makes
    ``subprocess`` fork the whole server)."""
    engine = engine_of(standby_server)
    checkouts = engine.workspaces.checkouts
    if checkouts is None or not checkouts.enabled:
        pytest.fail("overlay workspaces are not available here")
    env = standby_server.api.create_env(repo)
    scripted_model.script = [Say("Looked.")]
    edit_task(standby_server, env["id"])
    wait_standby(standby_server)

    started: list[tuple[str, object]] = []
    execute = subprocess.Popen._execute_child  # type: ignore[attr-defined]

    def spy(self: object, args: Any, executable: Any, preexec_fn: Any, *a: Any, **k: Any) -> Any:
        started.append((_kind(list(args)), preexec_fn))
        return execute(self, args, executable, preexec_fn, *a, **k)

    monkeypatch.setattr(subprocess.Popen, "_execute_child", spy)
    scripted_model.script = [Shell("cat app.py"), Say("Looked.")]
    warm = edit_task(standby_server, env["id"])
    wait_standby(standby_server)
    monkeypatch.undo()
    assert run_info(standby_server, warm["id"])["standby"] is True
    assert warm["base_commit_sha"] == git("rev-parse", "HEAD", cwd=repo).strip()
    assert sorted(kind for kind, _ in started) == ["bwrap", "git fetch"]
    assert [preexec for _, preexec in started] == [None, None]


def test_standby_sandboxes_end_with_the_server_and_are_off_with_zero(
    tmp_path: Path, sqlite_url: str, scripted_model: ScriptedModel, repo: Path
) -> None:
    servers = make_server(
        tmp_path, sqlite_url, **engine_settings(scripted_model, standby_sandboxes=1)
    )
    server = next(servers)
    env = server.api.create_env(repo)
    scripted_model.script = [Say("Looked.")]
    edit_task(server, env["id"])
    wait_standby(server)
    root = engine_of(server).attempts_root
    ((standby,),) = engine_of(server).standby._ready.values()
    assert standby.proc.pid is not None and Path(f"/proc/{standby.proc.pid}").exists()
    sandbox = sandbox_namespace(standby.proc.pid)
    assert namespace_pids(sandbox)
    # Another openwham's Codex on the machine is not this server's to stop, nor a leftover.
    with foreign_process(codex.SANDBOX_CODEX_BIN, "exec", "--json") as other:
        next(servers, None)  # stops the server
        assert standby.proc.poll() is not None
        assert not wait_gone(namespace=sandbox)
        assert Path(f"/proc/{other}").exists()
    assert not list(root.glob(".standby-*"))

    # A server of its own (data directory and database): another data directory on the same
    # database holds other keys, which the database's key fingerprint refuses.
    off_url = f"sqlite:///{tmp_path / 'off' / 'data' / 'openwham.db'}"
    off = make_server(
        tmp_path / "off", off_url, **engine_settings(scripted_model, standby_sandboxes=0)
    )
    server = next(off)
    try:
        env = server.api.create_env(repo)
        for _ in range(2):
            scripted_model.script = [Say("Looked.")]
            done = edit_task(server, env["id"])
            assert run_info(server, done["id"])["standby"] is False
        time.sleep(0.5)
        assert len(engine_of(server).standby) == 0
    finally:
        next(off, None)


# --------------------------------------------------------------------------- several per key


class _Proc:
    """What the pool asks of a standby's sandbox: whether it still runs; ``hurry``."""

    def __init__(self) -> None:
        self.alive = True
        self.hurried = False

    def hurry(self) -> None:
        self.hurried = True

    def poll(self) -> object:
        return None if self.alive else object()


def _pool(
    size: int,
    made: list[Prepared],
    dropped: list[Prepared],
    gate: threading.Event,
    shown: Callable[[Prepared, bool], None] | None = None,
) -> StandbyPool:
    def make(key: AgentKey) -> Prepared:
        gate.wait(10)
        proc: Any = _Proc()
        prepared = Prepared(dir=Path("/nonexistent"), base="b", proc=proc, owner="o")
        made.append(prepared)
        return prepared

    return StandbyPool(size=size, max_age=60.0, make=make, drop=dropped.append, shown=shown)


def _key(name: str) -> AgentKey:
    return AgentKey(name, f"/{name}", "main", False, "m", None, None)


def test_a_best_of_n_finds_n_standbys_prepared_in_parallel() -> None:
    made: list[Prepared] = []
    dropped: list[Prepared] = []
    gate = threading.Event()
    pool = _pool(4, made, dropped, gate)
    try:
        pool.refill(_key("a"), 4)
        # all four are being prepared at once (each make blocks until the gate opens)
        fills = [t for t in threading.enumerate() if t.name == "standby-fill"]
        assert len(fills) == 4 and pool.busy
        pool.refill(_key("a"), 4)  # nothing more: four are on their way
        assert len([t for t in threading.enumerate() if t.name == "standby-fill"]) == 4
        gate.set()
        deadline = time.monotonic() + 10
        while pool.busy or len(pool) < 4:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        taken = [pool.take(_key("a")) for _ in range(4)]
        assert all(p is not None for p in taken) and len({id(p) for p in taken}) == 4
        assert pool.take(_key("a")) is None and len(pool) == 0
        assert dropped == []
    finally:
        gate.set()
        pool.close()


def _settled(pool: StandbyPool, n: int) -> None:
    deadline = time.monotonic() + 10
    while pool.busy or len(pool) < n:
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_n_ready_standbys_give_n_takes_at_once_while_another_one_settles() -> None:
    """What the pool counts ready (``ready()``, ``len``) a take has at once: a best-of-4
    finding four ready takes them without waiting, also while a fifth standby's index is
    being settled (its settle held the pool's lock, so every take, and ``ready()``, waited
    for that sandboxed ``git update-index``); the settling one is not counted ready and a
    take finding none else waits for it, as for a fill, and gets it."""
    made: list[Prepared] = []
    settling, slow = threading.Event(), threading.Event()
    settled: list[Prepared] = []

    def make(key: AgentKey) -> Prepared:
        proc: Any = _Proc()
        base = "slow" if len(made) == 4 else "b"
        prepared = Prepared(dir=Path("/nonexistent"), base=base, proc=proc, owner="o")
        made.append(prepared)
        return prepared

    def settle(prepared: Prepared) -> None:
        if prepared.base == "slow":
            settling.set()
            slow.wait(10)
        settled.append(prepared)

    pool = StandbyPool(
        size=5, max_age=60.0, make=make, drop=lambda p: None, settle=settle, settle_after=0.0
    )
    try:
        pool.refill(_key("a"), 4)
        deadline = time.monotonic() + 10
        while len(settled) < 4 or pool.busy:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        pool.refill(_key("a"), 5)  # a fifth: its settle blocks until ``slow``
        assert settling.wait(10)
        t0 = time.monotonic()
        assert pool.ready() == {_key("a"): 4} and len(pool) == 4
        got: list[Prepared | None] = []
        takers = [threading.Thread(target=lambda: got.append(pool.take(_key("a")))) for _ in "wxyz"]
        for t in takers:
            t.start()
        for t in takers:
            t.join(1.0)
        waited = time.monotonic() - t0
        assert len(got) == 4 and waited < 1.0, f"four takes of four ready waited {waited:.1f} s"
        assert all(p is not None and p.base == "b" for p in got)
        assert len({id(p) for p in got}) == 4 and pool.ready() == {}
        fifth: list[Prepared | None] = []
        taker = threading.Thread(target=lambda: fifth.append(pool.take(_key("a"))))
        taker.start()
        time.sleep(0.2)
        assert fifth == []  # waits for the standby being settled, as for a fill
        slow.set()
        taker.join(5)
        assert len(fifth) == 1 and fifth[0] is made[4]
    finally:
        slow.set()
        pool.close()


def test_a_take_passes_over_a_dead_standby_for_the_next_ready_one() -> None:
    """A ready standby whose sandbox died is not what a take gets (nor ``None``, a cold
    start, as it was): the next ready one is, and the dead one is dropped; what the pool
    shows as ready (``shown``) follows its ready list."""
    made: list[Prepared] = []
    dropped: list[Prepared] = []
    shown: dict[int, bool] = {}
    gate = threading.Event()
    gate.set()
    pool = _pool(4, made, dropped, gate, lambda p, ready: shown.__setitem__(id(p), ready))
    try:
        pool.refill(_key("a"), 2)
        _settled(pool, 2)
        assert sorted(shown.values()) == [True, True]
        oldest = min(made, key=lambda p: p.created)
        oldest.proc.alive = False  # type: ignore[attr-defined]
        assert pool.ready() == {_key("a"): 1}
        taken = pool.take(_key("a"))
        assert taken is not None and taken is not oldest
        deadline = time.monotonic() + 5
        while dropped != [oldest]:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert not any(shown.values()) and len(pool) == 0
    finally:
        pool.close()


def test_a_take_without_wait_has_a_ready_standby_or_none_at_once() -> None:
    """``take(wait=False)`` (the engine's first take, before it starts the fetch): a ready
    standby at once, else ``None`` at once, also while a fill of the key is under way (a
    take with ``wait`` waits for that fill and gets it)."""
    made: list[Prepared] = []
    dropped: list[Prepared] = []
    gate = threading.Event()
    pool = _pool(4, made, dropped, gate)
    try:
        pool.refill(_key("a"), 1)  # under way until the gate opens
        t0 = time.monotonic()
        assert pool.take(_key("a"), wait=False) is None
        assert time.monotonic() - t0 < 0.5
        got: list[Prepared | None] = []
        taker = threading.Thread(target=lambda: got.append(pool.take(_key("a"))))
        taker.start()
        time.sleep(0.1)
        gate.set()
        taker.join(5)
        assert len(got) == 1 and got[0] is made[0]
        pool.refill(_key("a"), 1)
        _settled(pool, 1)
        assert pool.take(_key("a"), wait=False) is made[1]
    finally:
        gate.set()
        pool.close()


def test_a_single_attempt_between_two_best_of_4_tasks_leaves_four_standbys() -> None:
    """The refill of a one-attempt task like a recent best-of-4 tops the key up to four: the
    next best-of-4 finds a standby for each attempt (it found three, and its fourth attempt
    started cold, the last to end: the best-of-4 bench's 1.9 s against 1.4 s)."""
    made: list[Prepared] = []
    dropped: list[Prepared] = []
    gate = threading.Event()
    gate.set()
    pool = _pool(4, made, dropped, gate)
    try:
        pool.refill(_key("a"), 4)  # the best-of-4's attempts
        _settled(pool, 4)
        assert pool.take(_key("a")) is not None  # a single-attempt task like it
        pool.refill(_key("a"), 1, top_up=False)  # its refill once it has its prompt: three
        assert not pool.busy and len(pool) == 3  # are left, its own count: none beside it
        pool.refill(_key("a"), 1)  # its refill at its end
        _settled(pool, 4)
        assert len(made) == 5
        assert all(pool.take(_key("a")) is not None for _ in range(4))
    finally:
        pool.close()


def test_the_larger_count_asked_for_a_key_lasts_max_age() -> None:
    made: list[Prepared] = []

    def make(key: AgentKey) -> Prepared:
        proc: Any = _Proc()
        made.append(Prepared(dir=Path("/nonexistent"), base="b", proc=proc, owner="o"))
        return made[-1]

    pool = StandbyPool(size=4, max_age=0.3, make=make, drop=lambda p: None)
    try:
        pool.refill(_key("a"), 3)
        _settled(pool, 3)
        assert all(pool.take(_key("a")) is not None for _ in range(3))
        time.sleep(0.35)  # the best-of-3 was max_age ago: a single is refilled to one
        pool.refill(_key("a"), 1)
        _settled(pool, 1)
        assert len(made) == 4 and len(pool) == 1
    finally:
        pool.close()


def test_standbys_beyond_the_size_evict_the_least_recently_refilled_key() -> None:
    made: list[Prepared] = []
    dropped: list[Prepared] = []
    gate = threading.Event()
    gate.set()
    pool = _pool(3, made, dropped, gate)
    try:
        pool.refill(_key("a"), 2)
        deadline = time.monotonic() + 10
        while pool.busy or len(pool) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        pool.refill(_key("b"), 5)  # capped at the size: three for b, a's two evicted first
        while pool.busy or len(dropped) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert len(pool) == 3
        assert pool.take(_key("a")) is None
        assert all(pool.take(_key("b")) is not None for _ in range(3))
        assert set(map(id, dropped)) == set(map(id, made[:2]))
    finally:
        pool.close()


def test_a_best_of_two_task_finds_a_standby_for_each_attempt(
    tmp_path: Path, sqlite_url: str, scripted_model: ScriptedModel, repo: Path
) -> None:
    """After a best-of-2 task, two standbys are prepared for the next one like it, and both
    of its attempts start in one (with one standby kept per key, the second started cold)."""
    for server in make_server(
        tmp_path, sqlite_url, **engine_settings(scripted_model, standby_sandboxes=2)
    ):
        api = server.api
        env = api.create_env(repo)
        scripted_model.script = [Say("ok")]
        ids = []
        for _ in range(2):
            created = api.create_task(env["id"], "Look", metadata={"best_of_n": 2})
            task_id = created["task"]["id"]
            first = wait_for_task(api, task_id)["current_assistant_turn"]
            others = api.get(f"tasks/{task_id}/turns/{first['id']}/sibling_turns").json()
            turns = [first["id"], *(t["id"] for t in others["sibling_turns"])]
            for turn_id in turns:
                assert wait_for_turn(api, task_id, turn_id)["turn_status"] == "completed"
            ids.append(turns)
            wait_standby(server, count=2)
        assert [run_info(server, t)["standby"] for t in ids[1]] == [True, True]


def test_a_best_of_n_prepares_one_standby_while_its_attempts_run_and_the_rest_after(
    tmp_path: Path, sqlite_url: str, scripted_model: ScriptedModel, repo: Path
) -> None:
    """While a best-of-3 task's agents run (held at the model), one standby is prepared for
    the next task (one posted right after finds it), not three beside the three agents; the
    key is brought up to three once the last attempt ended."""
    for server in make_server(
        tmp_path, sqlite_url, **engine_settings(scripted_model, executor_concurrency=4)
    ):
        api = server.api
        env = api.create_env(repo)
        scripted_model.script = [Say("ok")]
        hold = scripted_model.hold = threading.Event()
        try:
            created = api.create_task(env["id"], "Look", metadata={"best_of_n": 3})
            task_id, first = created["task"]["id"], created["turn"]["id"]
            deadline = time.monotonic() + 60
            while len(scripted_model.requests) < 3:  # every agent has its prompt
                assert time.monotonic() < deadline, "the three agents did not all start"
                time.sleep(0.05)
            time.sleep(1.0)  # a refill begun at any of the three prompts has made its directory
            standbys = list(engine_of(server).attempts_root.glob(".standby-*"))
            assert len(standbys) == 1, standbys
        finally:
            hold.set()
        others = api.get(f"tasks/{task_id}/turns/{first}/sibling_turns").json()
        for turn_id in [first, *(t["id"] for t in others["sibling_turns"])]:
            assert wait_for_turn(api, task_id, turn_id)["turn_status"] == "completed"
        wait_standby(server, count=3, timeout=60)


def test_an_attempt_keeps_its_keys_refill_waiting_until_its_end_also_once_started() -> None:
    """A best-of-N's top-up waits for its last attempt's end: an attempt whose first model
    request went through (no longer keeping fills in the background) still counts."""

    def make(key: AgentKey) -> Prepared:
        raise AssertionError("nothing is refilled here")

    pool = StandbyPool(size=4, max_age=60.0, make=make, drop=lambda p: None)
    try:
        for turn in ("t1", "t2"):
            pool.attempt_running(_key("a"), turn)
            pool.attempt_started(turn)
        assert pool.attempts_running(_key("a")) and not pool.attempts_running(_key("b"))
        pool.attempt_ended("t1")
        assert pool.attempts_running(_key("a"))
        pool.attempt_ended("t2")
        assert not pool.attempts_running(_key("a"))
    finally:
        pool.close()


def test_attempts_waiting_together_each_take_a_standby_being_prepared() -> None:
    """Two attempts arrive while two standbys are being prepared, one fast and one slow:
    each gets one (the second waits for the slow fill instead of starting cold when the
    fast one is taken); a third, with no fill left under way, starts cold at once."""
    first, second = threading.Event(), threading.Event()
    gates = [first, second]
    lock = threading.Lock()

    def make(key: AgentKey) -> Prepared:
        with lock:
            gate = gates.pop(0)
        gate.wait(10)
        proc: Any = _Proc()
        return Prepared(dir=Path("/nonexistent"), base="b", proc=proc, owner="o")

    pool = StandbyPool(size=4, max_age=60.0, make=make, drop=lambda p: None)
    try:
        pool.refill(_key("a"), 2)
        got: list[Prepared | None] = []
        takers = [threading.Thread(target=lambda: got.append(pool.take(_key("a")))) for _ in "ab"]
        for t in takers:
            t.start()
        time.sleep(0.2)
        assert got == []  # both wait for the fills
        first.set()  # one fill ends: one taker has it, the other keeps waiting
        deadline = time.monotonic() + 10
        while len(got) < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(0.2)
        assert len(got) == 1 and got[0] is not None
        second.set()
        for t in takers:
            t.join(10)
        assert len(got) == 2 and got[1] is not None and got[0] is not got[1]
        assert pool.take(_key("a")) is None
    finally:
        first.set()
        second.set()
        pool.close()


def test_a_take_waiting_for_a_fill_hurries_its_sandbox() -> None:
    """Standbys start at the background CPU weight; an attempt that waits for one being
    prepared hurries it (its sandbox started before the wait, or while it waits), and a
    fill nobody waits for stays in the background."""
    started: list[threading.Event] = [threading.Event() for _ in range(3)]
    finish = [threading.Event() for _ in range(3)]
    procs: list[Any] = [_Proc() for _ in range(3)]
    order = iter(range(2))  # a's fills are 0 and 1, b's is 2
    lock = threading.Lock()
    pool: StandbyPool

    def make(key: AgentKey) -> Prepared:
        with lock:
            i = next(order) if key == _key("a") else 2
        if i == 1:
            finish[1].wait(10)  # a's second fill: its sandbox starts only while a taker waits
        pool.started(key, procs[i])
        started[i].set()
        finish[i].wait(10)
        return Prepared(dir=Path("/nonexistent"), base="b", proc=procs[i], owner="o")

    pool = StandbyPool(size=4, max_age=60.0, make=make, drop=lambda p: None)
    try:
        pool.attempt_running(_key("a"), "turn-a")  # attempts of both keys run: their
        pool.attempt_running(_key("b"), "turn-b")  # fills start in the background
        pool.refill(_key("a"), 2)
        assert started[0].wait(5)
        pool.refill(_key("b"), 1)
        assert started[2].wait(5)
        assert not any(p.hurried for p in procs)  # nobody waits: all in the background
        got: list[Prepared | None] = []
        takers = [threading.Thread(target=lambda: got.append(pool.take(_key("a")))) for _ in "xy"]
        for t in takers:
            t.start()
        deadline = time.monotonic() + 5
        while not procs[0].hurried:  # started before the wait: hurried when it begins
            assert time.monotonic() < deadline
            time.sleep(0.01)
        finish[1].set()  # a's second fill starts its sandbox while a taker waits
        assert started[1].wait(5) and procs[1].hurried
        finish[0].set()
        for t in takers:
            t.join(5)
        assert len(got) == 2 and all(p is not None for p in got)
        assert not procs[2].hurried  # b's fill: nobody waited for it
    finally:
        for e in finish:
            e.set()
        pool.close()


def test_fills_leave_the_background_when_the_last_attempt_of_their_key_ends() -> None:
    """A key's fills keep the background weight only while attempts of the key run (a task
    posted right after the last one ended finds its fill at full speed); a fill begun when
    none runs has the normal weight at once."""
    procs: list[Any] = []
    finish = threading.Event()
    lock = threading.Lock()
    pool: StandbyPool

    def make(key: AgentKey) -> Prepared:
        proc: Any = _Proc()
        with lock:
            procs.append(proc)
        pool.started(key, proc)
        finish.wait(10)
        return Prepared(dir=Path("/nonexistent"), base="b", proc=proc, owner="o")

    def started(n: int) -> None:
        deadline = time.monotonic() + 5
        while len(procs) < n:
            assert time.monotonic() < deadline
            time.sleep(0.01)

    pool = StandbyPool(size=4, max_age=60.0, make=make, drop=lambda p: None)
    try:
        pool.attempt_running(_key("a"), "t1")
        pool.attempt_running(_key("a"), "t2")
        pool.refill(_key("a"), 2)
        started(2)
        pool.attempt_ended("t1")
        assert not any(p.hurried for p in procs)  # t2 still runs
        pool.attempt_ended("never-marked")  # an attempt that failed before its prompt
        assert not any(p.hurried for p in procs)
        pool.attempt_ended("t2")
        assert all(p.hurried for p in procs)
        pool.refill(_key("b"), 1)  # no attempt of b runs: normal weight at once
        started(3)
        assert procs[2].hurried
    finally:
        finish.set()
        pool.close()


def test_fills_leave_the_background_once_the_attempts_first_model_request_went_through() -> None:
    """An attempt whose first model request went through (``attempt_started``: its start-up,
    the task's start latency, is behind it) no longer keeps its key's fills in the
    background: back to back, the next task's take waits for a fill further along. Another
    attempt of the key still starting keeps them there; its end afterwards is a no-op."""
    procs: list[Any] = []
    finish = threading.Event()
    pool: StandbyPool

    def make(key: AgentKey) -> Prepared:
        proc: Any = _Proc()
        procs.append(proc)
        pool.started(key, proc)
        finish.wait(10)
        return Prepared(dir=Path("/nonexistent"), base="b", proc=proc, owner="o")

    pool = StandbyPool(size=4, max_age=60.0, make=make, drop=lambda p: None)
    try:
        pool.attempt_running(_key("a"), "t1")
        pool.attempt_running(_key("a"), "t2")
        pool.refill(_key("a"), 1)
        deadline = time.monotonic() + 5
        while not procs:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        pool.attempt_started("t1")
        assert not procs[0].hurried  # t2 still starts
        pool.attempt_started("t2")
        assert procs[0].hurried
        pool.attempt_ended("t1")
        pool.attempt_ended("t2")
    finally:
        finish.set()
        pool.close()


def test_a_fill_that_ended_before_the_attempts_first_model_request_leaves_the_background() -> None:
    """The same when the fill ends first (its standby is ready, waiting for a prompt): it
    was left at the background weight until taken, since only fills under way were hurried
    (``test_the_next_standby_is_prepared_while_the_attempt_runs`` failed once fills got
    quicker: no git fork of the server in them any more)."""
    procs: list[Any] = []
    pool: StandbyPool

    def make(key: AgentKey) -> Prepared:
        proc: Any = _Proc()
        procs.append(proc)
        pool.started(key, proc)
        return Prepared(dir=Path("/nonexistent"), base="b", proc=proc, owner="o")

    pool = StandbyPool(size=4, max_age=60.0, make=make, drop=lambda p: None)
    try:
        pool.attempt_running(_key("a"), "t1")
        pool.refill(_key("a"), 1)
        deadline = time.monotonic() + 5
        while len(pool) < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert not procs[0].hurried  # ready, in the background while t1 starts
        pool.attempt_started("t1")
        assert procs[0].hurried
        pool.attempt_ended("t1")
    finally:
        pool.close()


def test_a_take_does_not_wait_for_a_fill_begun_after_it() -> None:
    """A taker waits for the fills under way when it began, not for one begun later (the
    refill of an attempt that just started): else attempts arriving together would queue
    behind one fill after another instead of starting cold at once."""
    first, later = threading.Event(), threading.Event()
    gates = [first, later]
    lock = threading.Lock()

    def make(key: AgentKey) -> Prepared:
        with lock:
            gate = gates.pop(0)
        gate.wait(10)
        proc: Any = _Proc()
        return Prepared(dir=Path("/nonexistent"), base="b", proc=proc, owner="o")

    pool = StandbyPool(size=4, max_age=60.0, make=make, drop=lambda p: None)
    try:
        pool.refill(_key("a"), 1)
        got: list[Prepared | None] = []
        takers = [threading.Thread(target=lambda: got.append(pool.take(_key("a")))) for _ in "ab"]
        for t in takers:
            t.start()
        time.sleep(0.2)
        assert got == []  # both wait for the one fill under way
        pool.refill(_key("a"), 2)  # a slow fill begun after both takes (an attempt's refill)
        first.set()  # the first fill ends: one taker has it, the other starts cold at once
        for t in takers:
            t.join(3)
        assert not any(t.is_alive() for t in takers), "a taker waits for a later fill"
        assert len(got) == 2 and sum(p is None for p in got) == 1
    finally:
        first.set()
        later.set()
        pool.close()


def test_a_key_whose_take_waited_for_a_fill_keeps_two_on_their_way() -> None:
    """A take that has to wait for a fill under way (tasks posted back to back come faster
    than a fill) gives its key a depth of two for ``max_age``; other keys, and a key whose
    takes found theirs ready, keep one."""
    made: list[Prepared] = []
    gate = threading.Event()
    pool = _pool(4, made, [], gate)
    try:
        pool.refill(_key("a"), 1)
        pool.refill(_key("b"), 1)
        gate.set()
        _settled(pool, 2)
        assert pool.take(_key("b")) is not None  # ready: no wait
        gate.clear()
        pool.refill(_key("a"), 2)  # a's second, held at the gate
        assert pool.take(_key("a")) is not None  # the ready one
        assert pool.depth(_key("a")) == pool.depth(_key("b")) == 1
        got: list[Prepared | None] = []
        taker = threading.Thread(target=lambda: got.append(pool.take(_key("a"))))
        taker.start()
        time.sleep(0.2)
        assert got == []  # it waits for the fill under way
        gate.set()
        taker.join(10)
        assert got and got[0] is not None
        assert pool.depth(_key("a")) == 2 and pool.depth(_key("b")) == 1
        pool._rushed[_key("a")] -= pool.max_age  # as if that wait was max_age ago
        assert pool.depth(_key("a")) == 1
    finally:
        gate.set()
        pool.close()


def test_a_task_whose_start_waited_for_the_standby_leaves_two_for_the_next(
    tmp_path: Path, sqlite_url: str, scripted_model: ScriptedModel, repo: Path
) -> None:
    """Back to back: a task posted while the last one's refill is still being prepared
    waits for it in its start; its own refill then prepares two standbys, so the next task
    takes one begun an attempt earlier instead of waiting again."""
    for server in make_server(tmp_path, sqlite_url, **engine_settings(scripted_model)):
        api = server.api
        env = api.create_env(repo)
        scripted_model.script = [Say("ok")]
        engine = engine_of(server)
        workspaces = engine.workspaces
        hold = threading.Event()
        make = workspaces.make_standby

        def slow_make(key: AgentKey, hold: threading.Event = hold, make: Any = make) -> Prepared:
            hold.wait(30)  # the fill is still under way when the next task starts
            return make(key)  # type: ignore[no-any-return]

        workspaces.standby._make = slow_make
        try:
            edit_task(server, env["id"])  # cold; its refill waits at the hold
            assert engine.standby.busy and len(engine.standby) == 0
            created = api.create_task(env["id"], "Look")
            time.sleep(1.0)  # its start waits for that fill
            hold.set()
            turn = wait_for_task(api, created["task"]["id"])["current_assistant_turn"]
            assert turn["turn_status"] == "completed", turn["error"]
            assert run_info(server, turn["id"])["standby"] is True
            wait_standby(server, count=2, timeout=60)
        finally:
            hold.set()


def test_the_next_standby_is_prepared_while_the_attempt_runs(
    tmp_path: Path, sqlite_url: str, scripted_model: ScriptedModel, repo: Path
) -> None:
    """A task posted right after the last one ended finds a standby ready: the refill
    begins when an attempt's agent has its prompt, not when the attempt ends (then the next
    task waited for that fill in its start)."""
    for server in make_server(tmp_path, sqlite_url, **engine_settings(scripted_model)):
        api = server.api
        env = api.create_env(repo)
        scripted_model.script = [Say("ok")]
        edit_task(server, env["id"])
        wait_standby(server)
        scripted_model.script = [Shell("sleep 15"), Say("ok")]
        asked = len(scripted_model.requests)
        created = api.create_task(env["id"], "Look")
        task_id = created["task"]["id"]
        deadline = time.monotonic() + 30
        while len(scripted_model.requests) == asked:  # its agent has the prompt
            assert time.monotonic() < deadline
            time.sleep(0.02)
        # the attempt (its standby taken) runs its command; the next standby is ready first
        wait_standby(server, count=1, timeout=12)
        now = api.get(f"tasks/{task_id}").json()["current_assistant_turn"]
        assert now["turn_status"] == "in_progress"
        # ... at the normal CPU weight: the attempt's first model request went through, so
        # it no longer keeps its key's fill in the background (not waiting for its end)
        ready = [p for ps in engine_of(server).workspaces.standby._ready.values() for p in ps]
        assert ready and not any(p.proc._background for p in ready)
        turn = wait_for_task(api, task_id)["current_assistant_turn"]
        assert turn["turn_status"] == "completed", turn["error"]
        assert run_info(server, turn["id"])["standby"] is True
