"""``python -m bench.memory``: the server's memory over rounds of tasks (issue 20).

A real ``wham serve`` (scripted model, a small generated repository, standby sandboxes as
configured) runs ``--rounds`` rounds of ``--tasks`` tasks posted at once (each agent runs one
command and answers); after each round, once every attempt ended and the server is idle, the
server's RSS (``VmRSS``) is read. Reports RSS per round, growth per round (min / median /
max) and per task. ``--tracemalloc`` starts the server under ``bench.memory_serve`` and prints
the allocation sites that grew most between the first and the last round (tracing slows the
server; its RSS then includes tracemalloc's own tables, so read growth from the sites).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
import tracemalloc
from itertools import pairwise
from pathlib import Path
from typing import Any

from . import harness as h
from .repo import generate


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def run_round(server: h.WhamServer, env_id: str, tasks: int, tag: str) -> None:
    created = [server.create_task(env_id, f"bench-run-{tag}-{i}: say hi") for i in range(tasks)]
    deadline = time.monotonic() + 600
    pending = dict(created)
    while pending:
        for task_id in list(pending):
            r = server.client.get(server.api(f"tasks/{task_id}"))
            r.raise_for_status()
            turn = r.json().get("current_assistant_turn") or {}
            if turn.get("turn_status") in h.TERMINAL:
                if turn["turn_status"] != "completed":
                    log(f"  {task_id}: {turn['turn_status']} {turn.get('error')}")
                del pending[task_id]
        if time.monotonic() > deadline:
            raise RuntimeError(f"{len(pending)} tasks never ended")
        time.sleep(0.2)
    for _, turn_id in created:  # each attempt's end has run (workspace removed)
        ws = server.data_dir / "attempts" / turn_id / "workspace"
        while ws.exists() and time.monotonic() < deadline:
            time.sleep(0.05)


def snapshot(
    server: h.WhamServer, directory: Path, n: int, traced: bool
) -> tuple[dict[str, Any], tracemalloc.Snapshot | None]:
    """The server's memory stats (``bench.memory_serve``) and, if traced, its snapshot."""
    os.kill(server.process.pid, signal.SIGUSR1)
    done = directory / f"snap-{n}.done"
    deadline = time.monotonic() + 120
    while not done.exists():
        if time.monotonic() > deadline:
            raise RuntimeError("no snapshot")
        time.sleep(0.1)
    stats = json.loads((directory / f"stats-{n}.json").read_text())
    stats["rss"] = rss_kb(server.process.pid) * 1024
    snap = tracemalloc.Snapshot.load(str(directory / f"snap-{n}.pickle")) if traced else None
    return stats, snap


STATS = (
    ("rss", "RSS"),
    ("malloc_in_use", "malloc in use"),
    ("malloc_free", "malloc free"),
    ("sqlite_in_use", "SQLite"),
    ("render_cache_bytes", "render cache"),
    ("traced", "tracemalloc"),
)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--tasks", type=int, default=32)
    ap.add_argument("--files", type=int, default=50, help="files in the generated repository")
    ap.add_argument("--settle", type=float, default=3.0, help="seconds idle before reading RSS")
    ap.add_argument("--tracemalloc", action="store_true")
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="wham-bench-memory-", dir="/var/tmp"))
    model, _ = h.start_model()
    model.script = [h.Shell("echo hi"), h.Say("Hi.")]
    server = None
    try:
        repo = generate(work / "repo", args.files)
        snaps = work / "snaps"
        snaps.mkdir()
        server = h.WhamServer.start(
            work / "data",
            model.url,
            log_path=work / "serve.log",
            module="bench.memory_serve",
            extra_env={
                "BENCH_SNAPSHOTS": str(snaps),
                "BENCH_TRACEMALLOC": "1" if args.tracemalloc else "0",
            },
        )
        env_id = server.create_env(repo)
        run_round(server, env_id, 2, "warm")  # mirror, standbys, first imports
        time.sleep(args.settle)
        rss = [rss_kb(server.process.pid)]
        stats, first = snapshot(server, snaps, 1, args.tracemalloc)
        every = [stats]
        snaps_taken = [first] if first is not None else []
        log(f"after warm-up: {rss[0] / 1024:.1f} MB")
        for n in range(args.rounds):
            t0 = time.monotonic()
            run_round(server, env_id, args.tasks, str(n))
            time.sleep(args.settle)
            rss.append(rss_kb(server.process.pid))
            stats, snap = snapshot(server, snaps, n + 2, args.tracemalloc)
            every.append(stats)
            grew = ", ".join(
                f"{label} {(stats[k] - every[-2][k]) / 1024:+.0f}"
                for k, label in STATS
                if k in stats
            )
            log(
                f"round {n + 1}: {args.tasks} tasks in {time.monotonic() - t0:.1f} s, "
                f"RSS {rss[-1] / 1024:.1f} MB; grew (KB): {grew}; "
                f"render cache {stats['render_cache_entries']} entries"
            )
            if snap is not None:  # what grew in this round alone: a cache that fills shows
                snaps_taken.append(snap)
                for stat in snap.compare_to(snaps_taken[-2], "lineno")[:5]:
                    log(f"  {stat.size_diff / 1024:+8.1f} KB {stat.traceback.format()[0].strip()}")
        growth = [(b - a) / 1024 for a, b in pairwise(rss)]
        print(f"RSS after warm-up and each round (MB): {' '.join(f'{k / 1024:.1f}' for k in rss)}")
        print(
            f"growth per round of {args.tasks} (MB): min {min(growth):.2f} "
            f"median {statistics.median(growth):.2f} max {max(growth):.2f}; "
            f"total {(rss[-1] - rss[0]) / 1024:.2f} MB, "
            f"{(rss[-1] - rss[0]) / (args.rounds * args.tasks):.1f} KB per task"
        )
        print("per round (MB), warm-up first:")
        for k, label in STATS:
            if k in every[0]:
                print(f"  {label:>14}: {' '.join(f'{x[k] / 2**20:.2f}' for x in every)}")
        print(f"  Python objects: {' '.join(str(x['python_objects']) for x in every)}")
        if first is not None:
            last = snaps_taken[-1]
            print(f"top {args.top} allocation sites by growth (tracemalloc):")
            for stat in last.compare_to(first, "traceback")[: args.top]:
                print(f"  {stat.size_diff / 1024:+9.1f} KB {stat.count_diff:+7d} blocks")
                for line in stat.traceback.format()[-8:]:
                    print(f"      {line}")
        return 0
    finally:
        if server is not None:
            server.stop()
        model.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
