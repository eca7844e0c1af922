"""The post-setup cache under the queue executor (``WHAM_EXECUTOR=queue``): an API node
(``wham serve``, no embedded worker) and a ``wham worker`` with a data directory of its own, on
a throwaway PostgreSQL, running real attempts (bubblewrap, the Codex CLI, the scripted model).
A reset-cache answered by the API node reaches the worker's snapshot and its standby started
from it within a sweep, not only at the worker's next attempt of the environment; with two
workers, a task of an environment with a setup script goes to the worker holding a standby
started from its snapshot."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from support.procs import unique_marker
from support.scripted_model import Say, ScriptedModel
from test_queue_nodes import _new_task, _settled, _wait, queue_cluster

pytestmark = [pytest.mark.postgres, pytest.mark.sandbox, pytest.mark.slow]


def setup_log(c: httpx.Client, task_id: str, turn_id: str) -> list[str]:
    logs = c.get(f"tasks/{task_id}/turns/{turn_id}/logs").json()["logs"]
    return [entry["line"] for entry in logs]


def test_reset_cache_on_the_api_node_removes_the_workers_snapshot_and_standby_within_a_sweep(
    model: ScriptedModel, tmp_path: Path
) -> None:
    model.script = [Say("Done.")]
    setup = {"setup": ["echo installed > ~/marker", "echo setup ran"]}
    with queue_cluster(
        tmp_path / unique_marker("qn-cache"),
        model,
        {"WHAM_STANDBY_SANDBOXES": "1"},
        workers=("worker",),
        environment=setup,
    ) as cluster:
        (worker,) = cluster.workers
        data, env_id = worker.data_dir, cluster.env_id

        def snapshots() -> list[Path]:
            return sorted(p.parent for p in (data / "setup-cache").glob("*/*/ready"))

        def standbys() -> list[Path]:
            return sorted((data / "attempts").glob(".standby-*"))

        with cluster.client() as c:
            first = _new_task(cluster, c, "First")
            (turn,) = _settled(c, first["task"]["id"], 120)
            assert turn["turn_status"] == "completed", turn.get("error")
            assert "setup ran" in setup_log(c, first["task"]["id"], turn["id"])
            (snap,) = snapshots()
            # the worker prepares a standby from the snapshot for the next task
            assert _wait(lambda: len(standbys()) == 1, 90), worker.tail()

            r = c.post(f"environments/{env_id}/reset-cache")
            assert r.status_code in (200, 204), r.text
            asked = time.monotonic()
            assert _wait(lambda: not snapshots() and not standbys(), 20), (
                snapshots(),
                standbys(),
                worker.tail(),
            )
            took = time.monotonic() - asked
            assert took < 12, took  # a sweep (every 5 s), not an expiry
            assert not snap.exists()

            second = _new_task(cluster, c, "Second")
            (turn,) = _settled(c, second["task"]["id"], 120)
            assert turn["turn_status"] == "completed", turn.get("error")
            lines = setup_log(c, second["task"]["id"], turn["id"])
            assert "setup ran" in lines and not any(x.startswith("Resumed") for x in lines)


def warm_then_four(
    model: ScriptedModel, base: Path, standbys: str, environment: dict[str, Any]
) -> tuple[str, list[tuple[str, dict[str, Any], list[str]]]]:
    """Two idle workers (``WHAM_STANDBY_SANDBOXES=standbys``) and an environment with a
    setup script: a first task (setup runs), then four more, each posted once exactly one
    worker offers what it holds. The first task's worker, and per later task the worker
    that ran it, its run record and its setup log."""
    model.script = [Say("Done.")]
    with queue_cluster(
        base, model, {"WHAM_STANDBY_SANDBOXES": standbys}, environment=environment
    ) as cluster:
        workers = cluster.workers
        with cluster.client() as c:
            warm = _new_task(cluster, c, "Warm up")
            (turn,) = _settled(c, warm["task"]["id"], 120)
            assert turn["turn_status"] == "completed", turn.get("error")
            assert "setup ran" in setup_log(c, warm["task"]["id"], turn["id"])
            holder = cluster.worker_of(turn["id"]).name
            later = []
            for i in range(4):
                assert _wait(lambda: cluster.offering() == 1, 90), [w.tail() for w in workers]
                created = _new_task(cluster, c, f"Again {i}")
                (turn,) = _settled(c, created["task"]["id"], 120)
                assert turn["turn_status"] == "completed", turn.get("error")
                lines = setup_log(c, created["task"]["id"], turn["id"])
                ran = cluster.worker_of(turn["id"]).name
                later.append((ran, cluster.run_of(turn["id"]), lines))
    return holder, later


def test_a_task_of_a_setup_environment_goes_to_the_worker_holding_its_snapshots_standby(
    model: ScriptedModel, tmp_path: Path
) -> None:
    """Two idle workers, standbys on, an environment with a setup script, a maintenance
    script, a variable and a secret: after the first task, the worker that ran it holds the
    snapshot and a standby started from it; each next task runs there and takes that
    standby (setup not run, the maintenance script run when the standby was prepared). The
    job is routed by a key computed from the environment's row, no secret decrypted. With
    both idle, either could fetch the job: without the routing, each would land on the other
    worker half the time, which has no snapshot and runs the setup script."""
    environment = {
        "setup": ["sleep 1", "echo installed > ~/marker", "echo setup ran"],
        "maintenance_setup": ['echo "maintained $(cat ~/marker) ${TOKEN:-none}"'],
        "env_vars": {"MODE": "x"},
        "secrets": {"TOKEN": "t0ken-value"},
    }
    base = tmp_path / unique_marker("qn-route")
    holder, later = warm_then_four(model, base, "1", environment)
    for _, run, lines in later:
        assert run.get("standby"), run
        assert lines[0].startswith("Resumed cached container"), lines
        assert "setup ran" not in lines and "maintained installed [redacted]" in lines
    assert [name for name, _, _ in later] == [holder] * 4, (holder, later)


def test_without_standbys_a_task_of_a_setup_environment_goes_to_the_worker_with_its_snapshot(
    model: ScriptedModel, tmp_path: Path
) -> None:
    """Two idle workers, no standbys: after the first task, the worker that ran it holds the
    environment's post-setup snapshot and offers it; each next task runs there and resumes
    it (setup not run). Without the offer, each would land on the other worker half the
    time, which has no snapshot and runs the setup script."""
    environment = {"setup": ["sleep 1", "echo installed > ~/marker", "echo setup ran"]}
    holder, later = warm_then_four(model, tmp_path / unique_marker("qn-snap"), "0", environment)
    for _, run, lines in later:
        assert not run.get("standby"), run
        assert lines[0].startswith("Resumed cached container"), lines
        assert "setup ran" not in lines, lines
    assert [name for name, _, _ in later] == [holder] * 4, (holder, later)
