"""The queue executor across processes, as across machines: one API node (``wham serve``,
``WHAM_EXECUTOR=queue``, ``WHAM_EXECUTOR_CONCURRENCY=0``) and two ``wham worker`` processes
with data directories of their own (the API node's ``keys/`` copied in, nothing else), on a
throwaway PostgreSQL, running real attempts (bubblewrap, the Codex CLI, the scripted model).

One set of processes serves the module; the tests run in order and leave both workers
running. Which worker ran an attempt is read from the database (the turn's run records its
executor, ``host:pid:nonce``)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from conftest import (
    WHAM,
    LiveServer,
    make_repo,
    postgres_database,
    serve_env,
    start_live_server,
    stop,
)
from support.procs import host_pids, unique_marker, wait_gone
from support.scripted_model import Say, ScriptedModel, Shell

pytestmark = [pytest.mark.postgres, pytest.mark.sandbox, pytest.mark.slow]

PREFIX = "/backend-api/wham"
TERMINAL = ("completed", "failed", "cancelled")


def _sleep(seconds: float, marker: str) -> Shell:
    """A command the agent runs for ``seconds``, findable on the host by ``marker``."""
    return Shell(f"python3 -c 'import time; time.sleep({seconds})' {marker}; echo ok >> notes.txt")


@dataclass
class Worker:
    name: str
    data_dir: Path
    log: Path
    env: dict[str, str]
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> Worker:
        seen = self.log.read_bytes().count(b"attempt(s) at a time") if self.log.exists() else 0
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [str(WHAM), "worker", "--data-dir", str(self.data_dir), "--concurrency", "2"],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, **self.env},
            )
        started = lambda: self.log.read_bytes().count(b"attempt(s) at a time") > seen  # noqa: E731
        assert _wait(started, 60), self.tail()
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def signal(self, sig: int) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    def wait(self, timeout: float) -> int:
        assert self.process is not None
        return self.process.wait(timeout)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""


@dataclass
class Cluster:
    api: LiveServer
    url: str  # PostgreSQL, for reading who ran what
    token: str
    env_id: str
    model: ScriptedModel
    workers: list[Worker] = field(default_factory=list)

    def client(self) -> httpx.Client:
        return httpx.Client(
            base_url=f"{self.api.url}{PREFIX}",
            headers={"Authorization": f"Bearer {self.token}"},
            timeout=60,
        )

    def run_of(self, turn_id: str) -> dict[str, Any]:
        """The attempt's ``run`` record (executor, tries) as the database holds it."""
        with psycopg.connect(self.url.replace("postgresql+psycopg://", "postgresql://")) as c:
            row = c.execute("SELECT body FROM turns WHERE id = %s", (turn_id,)).fetchone()
        assert row is not None
        body = row[0] if isinstance(row[0], dict) else json.loads(row[0])
        return dict(body.get("run") or {})

    def events_of(self, turn_id: str) -> list[tuple[Any, ...]]:
        """The attempt's event rows (id, type, payload) as the database holds them."""
        with psycopg.connect(self.url.replace("postgresql+psycopg://", "postgresql://")) as c:
            rows = c.execute(
                "SELECT * FROM turn_events WHERE turn_id = %s ORDER BY 1", (turn_id,)
            ).fetchall()
        return [tuple(r) for r in rows]

    def worker_of(self, turn_id: str) -> Worker:
        executor = str(self.run_of(turn_id).get("executor") or "")
        pid = int(executor.split(":")[1]) if executor.count(":") == 2 else -1
        for w in self.workers:
            if w.process is not None and w.process.pid == pid:
                return w
        raise AssertionError(f"attempt {turn_id} ran on {executor!r}, no worker of the test")

    def other(self, worker: Worker) -> Worker:
        return next(w for w in self.workers if w is not worker)

    def offering(self) -> int:
        """Workers that offer a ready standby (``store.jobs.offer``)."""
        with psycopg.connect(self.url.replace("postgresql+psycopg://", "postgresql://")) as c:
            row = c.execute(
                "SELECT count(*) FROM wham_standby_offers WHERE keys <> '{}'::jsonb"
            ).fetchone()
        return int(row[0]) if row else 0


def _wait(done: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _message(prompt: str) -> list[dict[str, Any]]:
    return [
        {"type": "message", "role": "user", "content": [{"content_type": "text", "text": prompt}]}
    ]


def _post(c: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
    r = c.post("tasks", json=body)
    assert r.status_code == 200, r.text
    return dict(r.json())


def _new_task(cluster: Cluster, c: httpx.Client, prompt: str, n: int = 1) -> dict[str, Any]:
    body: dict[str, Any] = {
        "new_task": {"environment_id": cluster.env_id},
        "input_items": _message(prompt),
    }
    if n > 1:
        body["metadata"] = {"best_of_n": n}
    return _post(c, body)


def _attempts(c: httpx.Client, task_id: str) -> list[dict[str, Any]]:
    mapping = c.get(f"tasks/{task_id}/turns").json()["turn_mapping"]
    return [e["turn"] for e in mapping.values() if e["turn"]["role"] == "assistant"]


def _settled(c: httpx.Client, task_id: str, timeout: float) -> list[dict[str, Any]]:
    """The task's attempts once all are terminal (fails the test after ``timeout``)."""
    found: list[dict[str, Any]] = []

    def done() -> bool:
        nonlocal found
        found = _attempts(c, task_id)
        return bool(found) and all(t["turn_status"] in TERMINAL for t in found)

    assert _wait(done, timeout), found
    return found


def _running(cluster: Cluster, marker: str, timeout: float = 90) -> None:
    """Wait until the agent runs the command carrying ``marker`` (on some worker)."""
    assert _wait(lambda: bool(host_pids(marker)), timeout), [w.tail() for w in cluster.workers]


@contextlib.contextmanager
def queue_cluster(
    base: Path,
    model: ScriptedModel,
    settings: dict[str, str],
    workers: tuple[str, ...] = ("worker-a", "worker-b"),
    environment: dict[str, Any] | None = None,
) -> Iterator[Cluster]:
    """A throwaway PostgreSQL, an API node (``WHAM_EXECUTOR_CONCURRENCY=0``) with a token
    and one environment of a new repository (``environment``: more of its fields), and a
    ``wham worker`` per name in ``workers`` (a data directory of its own holding the API
    node's ``keys/`` only); ``settings``: more of every node's settings. All stopped after."""
    base.mkdir()
    with postgres_database() as url:
        env = {**serve_env(model), "WHAM_DATABASE_URL": url, "WHAM_EXECUTOR": "queue", **settings}
        api = start_live_server(base / "api", {**env, "WHAM_EXECUTOR_CONCURRENCY": "0"})
        started: list[Worker] = []
        try:
            token = subprocess.run(
                [str(WHAM), "token", "create", "--data-dir", str(base / "api")],
                check=True,
                capture_output=True,
                text=True,
                env={**os.environ, **env},
            ).stdout.strip()
            repo = make_repo(base / "repo")
            r = httpx.post(
                f"{api.url}{PREFIX}/environments",
                json={"label": "acme/widgets", "repos": [str(repo)], **(environment or {})},
                headers={"Authorization": f"Bearer {token}"},
            )
            assert r.status_code == 201, r.text
            for name in workers:
                data = base / name
                data.mkdir(mode=0o700)
                shutil.copytree(base / "api" / "keys", data / "keys")  # all a worker needs
                started.append(Worker(name, data, base / f"{name}.log", env).start())
            yield Cluster(api, url, token, r.json()["id"], model, started)
        finally:
            for w in started:
                w.stop()
            stop(api)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, model: ScriptedModel) -> Iterator[Cluster]:
    base = tmp_path_factory.mktemp("queue-nodes") / unique_marker("qn")
    settings = {"WHAM_STANDBY_SANDBOXES": "0", "WHAM_ATTEMPT_MAX_TRIES": "3"}
    with queue_cluster(base, model, settings) as made:
        yield made


def test_twelve_tasks_with_a_best_of_two_all_complete_and_both_workers_ran_some(
    cluster: Cluster,
) -> None:
    marker = unique_marker("qn-batch")
    cluster.model.script = [_sleep(1, marker), Say("Done.")]
    with cluster.client() as c:
        tasks = [_new_task(cluster, c, "Best of two", n=2)["task"]["id"]]
        tasks += [_new_task(cluster, c, f"Task {i}")["task"]["id"] for i in range(11)]
        attempts = [t for task_id in tasks for t in _settled(c, task_id, 300)]
    assert len(attempts) == 13
    assert [t["turn_status"] for t in attempts] == ["completed"] * 13, [
        t.get("error") for t in attempts
    ]
    ran = {cluster.worker_of(t["id"]).name for t in attempts}
    assert ran == {"worker-a", "worker-b"}


def test_a_stream_on_the_api_node_gets_every_event_of_a_workers_attempt_live(
    cluster: Cluster,
) -> None:
    marker = unique_marker("qn-stream")
    cluster.model.script = [_sleep(2, marker), Say("Streamed.")]
    with cluster.client() as c:
        created = _new_task(cluster, c, "Stream me")
        task_id, turn_id = created["task"]["id"], created["turn"]["id"]
        path = f"tasks/{task_id}/turns/{turn_id}/stream"
        live: list[tuple[float, dict[str, Any]]] = []
        with c.stream("GET", path, timeout=120) as r:
            assert r.status_code == 200
            frame: dict[str, Any] = {}
            for line in r.iter_lines():
                if line.startswith(":"):
                    continue
                if not line:
                    if frame:
                        live.append((time.monotonic(), frame))
                    frame = {}
                    continue
                key, _, value = line.partition(": ")
                frame[key] = value
        _settled(c, task_id, 60)
        replay = c.get(path, timeout=60).text
    assert cluster.worker_of(turn_id) in cluster.workers
    ids = [int(f["id"]) for _, f in live]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    replayed = [
        int(line.split(": ", 1)[1]) for line in replay.splitlines() if line.startswith("id: ")
    ]
    assert ids == replayed  # every event, once, in order
    events = [json.loads(f["data"]) for _, f in live]
    assert events[-1]["item_type"] == "task_turn_event"
    assert "completed" in json.dumps(events[-1])
    # live: the agent's work arrived while the attempt still ran (its command takes 2 s)
    worked = [
        at for (at, _), e in zip(live, events, strict=True) if e["item_type"] == "work_log_message"
    ]
    assert worked and live[-1][0] - worked[0] >= 1.0, events


def test_a_follow_up_runs_on_the_other_worker(cluster: Cluster) -> None:
    cluster.model.script = [Say("First answer.")]
    with cluster.client() as c:
        created = _new_task(cluster, c, "Remember the word PAPAYA")
        task_id = created["task"]["id"]
        (first,) = _settled(c, task_id, 120)
        assert first["turn_status"] == "completed", first.get("error")
        ran_first = cluster.worker_of(first["id"])
        ran_first.signal(signal.SIGTERM)  # idle: it exits, the other one must take the follow-up
        assert ran_first.wait(30) == 0, ran_first.tail()
        try:
            cluster.model.requests.clear()
            cluster.model.script = [Say("Second answer.")]
            follow = _post(
                c,
                {
                    "follow_up": {"task_id": task_id, "turn_id": first["id"]},
                    "input_items": _message("And once more"),
                },
            )
            turn_id = follow["turn"]["id"]
            assert _wait(
                lambda: (
                    c.get(f"tasks/{task_id}").json()["current_assistant_turn"]["turn_status"]
                    in TERMINAL
                ),
                120,
            )
            turn = c.get(f"tasks/{task_id}").json()["current_assistant_turn"]
            assert turn["id"] == turn_id
            assert turn["turn_status"] == "completed", turn.get("error")
            assert cluster.worker_of(turn_id) is cluster.other(ran_first)
            # it resumed the first attempt's session, read from the database by the other node
            assert any("PAPAYA" in json.dumps(body) for body in cluster.model.requests)
        finally:
            ran_first.start()


def test_sigterm_hands_running_attempts_back_without_counting_a_try(cluster: Cluster) -> None:
    marker = unique_marker("qn-term")
    cluster.model.script = [_sleep(30, marker), Say("Done.")]
    with cluster.client() as c:
        created = _new_task(cluster, c, "Hand me back")
        task_id, turn_id = created["task"]["id"], created["turn"]["id"]
        _running(cluster, marker)
        stopped = cluster.worker_of(turn_id)
        cluster.model.script = [Say("Done elsewhere.")]
        stopped.signal(signal.SIGTERM)
        assert stopped.wait(30) == 0, stopped.tail()
        assert wait_gone(marker, timeout=5) == []
        try:
            (turn,) = _settled(c, task_id, 120)
            assert turn["turn_status"] == "completed", turn.get("error")
            assert cluster.worker_of(turn_id) is cluster.other(stopped)
            assert cluster.run_of(turn_id)["tries"] == 1  # the handed-back run did not count
        finally:
            stopped.start()


def test_cancel_on_the_api_node_kills_the_sandbox_on_the_worker_within_2_seconds(
    cluster: Cluster,
) -> None:
    marker = unique_marker("qn-cancel")
    cluster.model.script = [_sleep(120, marker), Say("Never.")]
    with cluster.client() as c:
        created = _new_task(cluster, c, "Cancel me")
        task_id = created["task"]["id"]
        _running(cluster, marker)
        asked = time.monotonic()
        r = c.post(f"tasks/{task_id}/cancel")
        assert r.status_code == 200, r.text
        left = wait_gone(marker, timeout=2.0)
        took = time.monotonic() - asked
        assert left == [], f"the sandbox still ran {took:.1f} s after the cancel"
        (turn,) = _settled(c, task_id, 30)
        assert turn["turn_status"] == "cancelled"
    print(f"cancel across processes: sandbox gone {took:.2f} s after the request")


def test_sigkill_of_a_worker_mid_attempt_completes_on_the_other(cluster: Cluster) -> None:
    marker = unique_marker("qn-kill")
    cluster.model.script = [_sleep(30, marker), Say("Done.")]
    with cluster.client() as c:
        created = _new_task(cluster, c, "Survive a crash")
        task_id, turn_id = created["task"]["id"], created["turn"]["id"]
        _running(cluster, marker)
        killed = cluster.worker_of(turn_id)
        cluster.model.script = [Say("Done after the crash.")]
        killed.signal(signal.SIGKILL)
        at = time.monotonic()
        killed.wait(10)
        assert wait_gone(marker, timeout=10) == []  # its sandbox died with it
        try:
            (turn,) = _settled(c, task_id, 120)
            took = time.monotonic() - at
            assert turn["turn_status"] == "completed", turn.get("error")
            assert cluster.worker_of(turn_id) is cluster.other(killed)
            assert cluster.run_of(turn_id)["tries"] == 2
            assert took <= 60, f"completed {took:.0f} s after the kill"
        finally:
            killed.start()
    print(f"SIGKILL of a worker: the attempt completed on the other {took:.1f} s later")


def test_a_stalled_worker_that_wakes_up_stops_its_sandbox_and_writes_nothing(
    cluster: Cluster,
) -> None:
    """Run fencing across machines: a worker freezes mid-attempt (SIGSTOP: alive, but its
    heartbeats stop), the other worker's sweep requeues the attempt and runs it again. When the
    frozen worker wakes up (SIGCONT) while the other is still running it, its run finds its
    token gone: it kills its own sandbox and writes nothing more (no "Cancelled", no result),
    so the attempt ends with the other worker's result (docs/ARCHITECTURE.md, "Run
    fencing"). Without fencing the woken run sees the attempt in progress and goes on."""
    marker, again = unique_marker("qn-stall"), unique_marker("qn-again")
    cluster.model.script = [_sleep(300, marker), Say("Done.")]
    with cluster.client() as c:
        created = _new_task(cluster, c, "Survive a stall")
        task_id, turn_id = created["task"]["id"], created["turn"]["id"]
        _running(cluster, marker)
        stalled = cluster.worker_of(turn_id)
        cluster.model.script = [_sleep(15, again), Say("Done after the stall.")]
        stalled.signal(signal.SIGSTOP)
        woken = False
        try:
            _running(cluster, again, timeout=150)  # the other worker runs it again
            assert cluster.worker_of(turn_id) is cluster.other(stalled)
            assert host_pids(marker), "the frozen worker's sandbox should still be running"
            stalled.signal(signal.SIGCONT)
            woken = True
            assert wait_gone(marker, timeout=15) == [], stalled.tail()
            assert host_pids(again), "the other worker's run should still be going"
            (turn,) = _settled(c, task_id, 120)
            assert turn["turn_status"] == "completed", turn.get("error")
            assert cluster.worker_of(turn_id) is cluster.other(stalled)
            assert cluster.run_of(turn_id)["tries"] == 2
            assert "Done after the stall." in json.dumps(turn)
            texts = [json.dumps(e[3:]) for e in cluster.events_of(turn_id)]
            assert not any("Cancelled" in t or "superseded" in t for t in texts)
            assert stalled.process is not None and stalled.process.poll() is None
            assert "superseded" in stalled.tail()
        finally:
            if not woken:
                stalled.signal(signal.SIGCONT)


def test_a_worker_whose_keys_are_not_the_databases_is_refused_at_start(
    cluster: Cluster, tmp_path: Path
) -> None:
    data = tmp_path / "stranger"  # no keys copied: it makes its own, which do not match
    out = subprocess.run(
        [str(WHAM), "worker", "--data-dir", str(data)],
        env={**os.environ, **cluster.workers[0].env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 1, out.stderr
    assert "are not the ones this database was first started with" in out.stderr
    assert not (data / "attempts").exists()  # refused before it ran anything


def test_wham_serve_under_the_queue_runs_attempts_with_its_embedded_worker(
    model: ScriptedModel, tmp_path: Path
) -> None:
    """Without ``WHAM_EXECUTOR_CONCURRENCY=0`` one ``wham serve`` is API node and worker."""
    model.script = [Say("Embedded.")]
    with postgres_database() as url:
        env = {**serve_env(model), "WHAM_DATABASE_URL": url, "WHAM_EXECUTOR": "queue"}
        env["WHAM_STANDBY_SANDBOXES"] = "0"
        srv = start_live_server(tmp_path / unique_marker("qn-embedded"), env)
        try:
            token = subprocess.run(
                [str(WHAM), "token", "create", "--data-dir", str(srv.data_dir)],
                check=True,
                capture_output=True,
                text=True,
                env={**os.environ, **env},
            ).stdout.strip()
            headers = {"Authorization": f"Bearer {token}"}
            with httpx.Client(base_url=f"{srv.url}{PREFIX}", headers=headers, timeout=60) as c:
                r = c.post(
                    "environments",
                    json={"label": "acme/w", "repos": [str(make_repo(tmp_path / "repo"))]},
                )
                assert r.status_code == 201, r.text
                created = _post(
                    c,
                    {"new_task": {"environment_id": r.json()["id"]}, "input_items": _message("Hi")},
                )
                (turn,) = _settled(c, created["task"]["id"], 120)
            assert turn["turn_status"] == "completed", turn.get("error")

            def jobs_left() -> int:
                with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://")) as c:
                    row = c.execute(
                        "SELECT count(*) FROM procrastinate_jobs WHERE queueing_lock = %s",
                        (turn["id"],),
                    ).fetchone()
                return int(row[0]) if row else -1

            assert _wait(lambda: jobs_left() == 0, 30)  # it ran as a job, deleted once it ended
        finally:
            stop(srv)


def test_a_task_goes_to_the_worker_that_holds_a_matching_standby(
    model: ScriptedModel, tmp_path: Path
) -> None:
    """Two idle workers, standbys on: after the first task, the worker that ran it holds a
    standby for the next one like it, and each next task runs there (with both idle, either
    could fetch the job: without the preference each would land on it half the time)."""
    model.script = [Say("Warm.")]
    base = tmp_path / unique_marker("qn-standby")
    with queue_cluster(base, model, {"WHAM_STANDBY_SANDBOXES": "1"}) as cluster:
        workers = cluster.workers
        with cluster.client() as c:
            warm = _new_task(cluster, c, "Warm up")
            first = warm["turn"]["id"]
            _settled(c, warm["task"]["id"], 120)
            holder = cluster.worker_of(first)
            ran = []
            for i in range(4):
                assert _wait(lambda: cluster.offering() == 1, 60), [w.tail() for w in workers]
                created = _new_task(cluster, c, f"Like the first {i}")
                (turn,) = _settled(c, created["task"]["id"], 120)
                assert turn["turn_status"] == "completed", turn.get("error")
                ran.append(cluster.worker_of(turn["id"]).name)
        assert ran == [holder.name] * 4, (holder.name, ran)
