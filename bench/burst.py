"""``python -m bench.burst``: N tasks posted at once, wall time until all ended (issue 20).

Two real ``wham serve`` processes (scripted model: one command, then an answer; a small
generated repository) side by side, one per ``--concurrency`` value (``0`` = the default,
the number of cores); rounds alternate between them so both see the same machine. A round
posts ``--tasks`` tasks at once (one thread per POST) and times from the first POST until
every task's attempt is terminal; the time from each POST to its first model request is the
start latency. Prints min / median / max wall, tasks per minute and the start latency p50/max
per server. Loopback only; bounded by ``--timeout`` per round.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from . import harness as h
from .repo import generate


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run_round(
    server: h.WhamServer, env_id: str, tasks: int, tag: str, timeout: float
) -> tuple[float, list[str]]:
    """Post ``tasks`` tasks at once; wall seconds until all ended and their statuses."""
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=tasks) as pool:
        created = list(
            pool.map(
                lambda i: server.create_task(env_id, f"bench-run-{tag}-{i}: say hi"),
                range(tasks),
            )
        )
    pending = dict(created)
    statuses: list[str] = []
    deadline = time.monotonic() + timeout
    while pending:
        for task_id in list(pending):
            r = server.client.get(server.api(f"tasks/{task_id}"))
            r.raise_for_status()
            turn = r.json().get("current_assistant_turn") or {}
            if turn.get("turn_status") in h.TERMINAL:
                statuses.append(turn["turn_status"])
                if turn["turn_status"] != "completed":
                    log(f"  {task_id}: {turn['turn_status']} {turn.get('error')}")
                del pending[task_id]
        if time.monotonic() > deadline:
            raise RuntimeError(f"{len(pending)} tasks never ended")
        time.sleep(0.05)
    wall = time.perf_counter() - t0
    for _, turn_id in created:  # let each attempt's end run before the next round
        ws = server.data_dir / "attempts" / turn_id / "workspace"
        while ws.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    return wall, statuses


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.burst", description=__doc__)
    ap.add_argument("--tasks", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3, help="rounds per server (3)")
    ap.add_argument("--files", type=int, default=50, help="files in the generated repository")
    ap.add_argument(
        "--concurrency",
        type=int,
        action="append",
        default=None,
        help="WHAM_EXECUTOR_CONCURRENCY per server (repeat; 0 = default; default: 0 and 32)",
    )
    ap.add_argument("--settle", type=float, default=3.0, help="idle seconds between rounds")
    ap.add_argument("--timeout", type=float, default=300.0, help="bound per round (s)")
    args = ap.parse_args(argv)
    levels = args.concurrency or [0, 32]

    work = Path(tempfile.mkdtemp(prefix="wham-bench-burst-", dir="/var/tmp"))
    model, _ = h.start_model()
    model.script = [h.Shell("echo hi"), h.Say("Hi.")]
    servers: list[h.WhamServer] = []
    lock = threading.Lock()
    try:
        repo = generate(work / "repo", args.files)
        envs: list[str] = []
        for c in levels:
            extra = {"WHAM_EXECUTOR_CONCURRENCY": str(c)} if c else {}
            with lock:
                srv = h.WhamServer.start(
                    work / f"data-{c}",
                    model.url,
                    log_path=work / f"serve-{c}.log",
                    extra_env=extra,
                )
            servers.append(srv)
            envs.append(srv.create_env(repo))
        for srv, env_id, c in zip(servers, envs, levels, strict=True):
            run_round(srv, env_id, 2, f"warm{c}", args.timeout)  # mirror, standbys, imports
        walls: dict[int, list[float]] = {c: [] for c in levels}
        bad: dict[int, int] = {c: 0 for c in levels}
        for n in range(args.runs):
            for srv, env_id, c in zip(servers, envs, levels, strict=True):
                time.sleep(args.settle)
                wall, statuses = run_round(srv, env_id, args.tasks, f"{c}-{n}", args.timeout)
                walls[c].append(wall)
                bad[c] += sum(1 for s in statuses if s != "completed")
                log(f"concurrency {c or 'default'} round {n + 1}: {wall:.1f} s")
        print(f"{args.tasks} tasks at once, wall until every attempt ended (s):")
        for c in levels:
            w = walls[c]
            med = statistics.median(w)
            print(
                f"  concurrency {c or 'default (cores)':>16}: min {min(w):6.1f} "
                f"median {med:6.1f} max {max(w):6.1f}  "
                f"{args.tasks * 60 / med:6.1f} tasks/min  not completed: {bad[c]}"
            )
        if len(levels) == 2:
            a, b = (statistics.median(walls[c]) for c in levels)
            print(f"  ratio of medians {levels[1]} / {levels[0] or 'default'}: {b / a:.2f}")
        return 0
    finally:
        for srv in servers:
            srv.stop()
        model.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
