"""``python -m bench.queue`` (or ``./bench/queue``): the queue executor's scale-out (issue 17).

On a throwaway PostgreSQL database, an API node (``wham serve``, ``WHAM_EXECUTOR=queue``,
``WHAM_EXECUTOR_CONCURRENCY=0``) and two ``wham worker`` processes (separate data
directories, the API node's keys copied in; standbys off), real attempts (bubblewrap, the
Codex CLI) against the scripted model, whose every answer takes ``--answer-seconds`` (the
model's time dominates, as with a real model, so two cores can show what a second worker
adds):

1. **throughput**: ``--tasks`` tasks posted at once, wall time until every attempt is
   terminal, as tasks per minute; with one worker (the other stopped by SIGTERM) and with
   both, ``--concurrency`` slots each, ``--runs`` runs of each, interleaved. Target: two
   workers >= 1.8x one.
2. **added start latency**: ``--latency-runs`` single tasks, interleaved between the queue
   (API node + one idle worker) and ``WHAM_EXECUTOR=inprocess`` (one ``wham serve`` on its
   own database): the time from sending ``POST tasks`` to the attempt's claim (its first
   ``in_progress`` status event, stamped by the node that claimed it; same host, same
   clock). The queue adds the commit's NOTIFY, the worker's fetch and its thread hand-off.
   Target: p50 difference <= 50 ms.

Prints min / median / max of each series and the ratios.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from . import harness as h
from .fanout import _small_repo, pct
from .harness import Say, Shell  # type: ignore[attr-defined]
from .load import postgres_database

TARGET_RATIO = 1.8
TARGET_ADDED_MS = 50.0


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def mmm(values: list[float], unit: str = "", scale: float = 1.0) -> str:
    return " / ".join(
        f"{v * scale:.1f}{unit}" for v in (min(values), statistics.median(values), max(values))
    )


class Worker:
    """A ``wham worker`` process with a data directory of its own."""

    def __init__(self, data: Path, env: dict[str, str], concurrency: int) -> None:
        self.data, self.env, self.concurrency = data, env, concurrency
        self.log = data.with_suffix(".log")
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        seen = self.log.read_bytes().count(b"at a time") if self.log.exists() else 0
        n = self.concurrency
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [str(h.WHAM), "worker", "--data-dir", str(self.data), "--concurrency", str(n)],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
            )
        deadline = time.monotonic() + 60
        while self.log.read_bytes().count(b"at a time") <= seen:
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError(f"wham worker did not start; see {self.log}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.process = None


def _statuses(server: h.WhamServer, tasks: list[str]) -> list[str]:
    out = []
    for task_id in tasks:
        turn = server.client.get(server.api(f"tasks/{task_id}")).json()["current_assistant_turn"]
        out.append(str(turn["turn_status"]))
    return out


def batch(server: h.WhamServer, env_id: str, n: int, tag: str, timeout: float) -> float:
    """Post ``n`` tasks at once; seconds until all are terminal (all must complete)."""
    started = time.perf_counter()
    tasks = [server.create_task(env_id, f"{tag} task {i}")[0] for i in range(n)]
    deadline = time.monotonic() + timeout
    while True:
        statuses = _statuses(server, tasks)
        if all(s in h.TERMINAL for s in statuses):
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"{tag}: not done within {timeout:.0f} s: {statuses}")
        time.sleep(0.2)
    took = time.perf_counter() - started
    if statuses.count("completed") != n:
        raise RuntimeError(f"{tag}: not every attempt completed: {statuses}")
    return took


def claim_delay(server: h.WhamServer, env_id: str, tag: str) -> float:
    """Seconds from sending ``POST tasks`` to the attempt's first ``in_progress`` event."""
    sent = time.time()
    task_id, turn_id = server.create_task(env_id, tag)
    frames, _ = server.stream(task_id, turn_id)
    for frame in frames:
        payload: dict[str, Any] = frame.get("payload") or {}
        if frame.get("item_type") == "task_turn_event" and (
            payload.get("turn_status") == "in_progress"
        ):
            return float(frame["timestamp"]) - sent
    raise RuntimeError(f"{tag}: no in_progress event")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.queue", description=__doc__.split("\n")[0])
    p.add_argument("--tasks", type=int, default=8, help="tasks per throughput run (8)")
    p.add_argument("--concurrency", type=int, default=2, help="slots per worker (2)")
    p.add_argument("--answer-seconds", type=float, default=4.0, help="each model answer (4)")
    p.add_argument("--runs", type=int, default=3, help="throughput runs per series (3)")
    p.add_argument("--latency-runs", type=int, default=15, help="start-latency runs each (15)")
    p.add_argument("--only", choices=["throughput", "latency"], help="run one part")
    p.add_argument(
        "--postgres-url",
        default=os.environ.get("WHAM_TEST_POSTGRES_URL"),
        help="an admin URL of a PostgreSQL cluster (./bench/queue starts a throwaway one)",
    )
    args = p.parse_args(argv)
    if not args.postgres_url:
        p.error("needs --postgres-url or WHAM_TEST_POSTGRES_URL (use ./bench/queue)")
    work = Path(tempfile.mkdtemp(prefix="wham-bench-queue-"))
    model, _clock = h.start_model()
    model.script = [Shell("true"), Say("Done.")]  # two answers per attempt
    common = {
        "WHAM_STANDBY_SANDBOXES": "0",
        "WHAM_RATE_LIMIT_PRIMARY": "1000000",
        "WHAM_RATE_LIMIT_SECONDARY": "1000000",
    }
    ok = True
    try:
        repo = _small_repo(work / "repo")
        if args.only != "latency":
            model.delay = args.answer_seconds
            ok &= throughput(args, work, model, repo, common)
        if args.only != "throughput":
            model.delay = 0.0
            ok &= latency(args, work, model, repo, common)
    finally:
        model.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


def _queue_nodes(
    url: str, work: Path, model: Any, concurrency: int, common: dict[str, str], names: list[str]
) -> tuple[h.WhamServer, list[Worker]]:
    env = {"WHAM_DATABASE_URL": url, "WHAM_EXECUTOR": "queue", **common}
    api = h.WhamServer.start(
        work / "api",
        model.url,
        log_path=work / "api.log",
        extra_env={**env, "WHAM_EXECUTOR_CONCURRENCY": "0"},
    )
    worker_env = h._clean_env(
        {
            "WHAM_MODEL_PROVIDER": "openai-compatible",
            "WHAM_MODEL_BASE_URL": model.url,
            "WHAM_MODEL_API_KEY": "sk-bench-anything",
            "WHAM_MODEL": h.MODEL,
            **env,
        }
    )
    workers = []
    for name in names:
        data = work / name
        data.mkdir(mode=0o700)
        shutil.copytree(work / "api" / "keys", data / "keys")
        workers.append(Worker(data, worker_env, concurrency))
    return api, workers


def throughput(
    args: argparse.Namespace, work: Path, model: Any, repo: Path, common: dict[str, str]
) -> bool:
    log(
        f"throughput: {args.tasks} tasks per run, {args.concurrency} slots per worker, "
        f"model answers {args.answer_seconds:.1f} s (2 per attempt), {args.runs} runs each"
    )
    (work / "tp").mkdir()
    with postgres_database(args.postgres_url) as url:
        api, (a, b) = _queue_nodes(
            url, work / "tp", model, args.concurrency, common, ["worker-a", "worker-b"]
        )
        try:
            env_id = api.create_env(repo)
            a.start()
            b.start()
            model_delay = model.delay
            model.delay = 0.0
            batch(api, env_id, 2 * args.concurrency, "warm-up", 300)  # both workers' mirrors
            model.delay = model_delay
            one: list[float] = []
            two: list[float] = []
            for run in range(args.runs):
                b.stop()
                took = batch(api, env_id, args.tasks, f"one-{run}", 900)
                one.append(args.tasks / took * 60)
                log(f"  run {run + 1}: 1 worker  {took:6.1f} s  {one[-1]:5.1f} tasks/min")
                b.start()
                took = batch(api, env_id, args.tasks, f"two-{run}", 900)
                two.append(args.tasks / took * 60)
                log(f"  run {run + 1}: 2 workers {took:6.1f} s  {two[-1]:5.1f} tasks/min")
        finally:
            for w in (a, b):
                w.stop()
            api.stop()
    ratio = statistics.median(two) / statistics.median(one)
    print(f"throughput, tasks/min (min / median / max): 1 worker  {mmm(one)}")
    print(f"throughput, tasks/min (min / median / max): 2 workers {mmm(two)}")
    print(f"throughput ratio (medians): {ratio:.2f}x (target >= {TARGET_RATIO}x)")
    return ratio >= TARGET_RATIO


def latency(
    args: argparse.Namespace, work: Path, model: Any, repo: Path, common: dict[str, str]
) -> bool:
    log(f"start latency: POST tasks -> claim, {args.latency_runs} runs each, interleaved")
    (work / "lat").mkdir()
    with (
        postgres_database(args.postgres_url) as queue_url,
        postgres_database(args.postgres_url) as inproc_url,
    ):
        api, (w,) = _queue_nodes(queue_url, work / "lat", model, 2, common, ["worker"])
        inproc = h.WhamServer.start(
            work / "lat" / "inprocess",
            model.url,
            log_path=work / "lat" / "inprocess.log",
            extra_env={
                "WHAM_DATABASE_URL": inproc_url,
                "WHAM_EXECUTOR": "inprocess",
                "WHAM_EXECUTOR_CONCURRENCY": "2",
                **common,
            },
        )
        try:
            w.start()
            envs = {"queue": api.create_env(repo), "inprocess": inproc.create_env(repo)}
            servers = {"queue": api, "inprocess": inproc}
            for name in servers:  # warm-up: mirrors cloned, pools and threads started
                claim_delay(servers[name], envs[name], f"warm-up {name}")
            found: dict[str, list[float]] = {"queue": [], "inprocess": []}
            for run in range(args.latency_runs):
                for name in ("inprocess", "queue") if run % 2 else ("queue", "inprocess"):
                    found[name].append(claim_delay(servers[name], envs[name], f"{name} {run}"))
                    time.sleep(0.5)  # the attempt's end (tidy, title) out of the way
        finally:
            w.stop()
            api.stop()
            inproc.stop()
    for name, values in found.items():
        print(
            f"start latency, POST -> claim, ms (min / median / max): {name:9s} "
            f"{mmm(values, scale=1000)}  p90 {pct(values, 90) * 1000:.1f}"
        )
    added = (statistics.median(found["queue"]) - statistics.median(found["inprocess"])) * 1000
    print(
        f"added start latency of queue over inprocess, p50: {added:.1f} ms "
        f"(target <= {TARGET_ADDED_MS:.0f} ms)"
    )
    return added <= TARGET_ADDED_MS


if __name__ == "__main__":
    raise SystemExit(main())
