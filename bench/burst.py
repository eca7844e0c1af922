"""``python -m bench.burst``: N tasks posted at once, wall time until all ended (issue 20).

Real ``wham serve`` processes (scripted model: one command, then an answer; a small generated
repository) side by side, one per ``--tree`` (its ``src`` on ``PYTHONPATH``; default: this
tree) and ``--concurrency`` value (``0`` = the default, the number of cores); rounds alternate
between them so all see the same machine. A round posts ``--tasks`` tasks at once (one thread
per POST) and times from the first POST until every task's attempt is terminal (one
``tasks/list`` every ``--poll`` seconds, so the bench's own requests cost the server little).

Per server it prints min / median / max wall, tasks per minute, and where the time went:

- CPU: seconds used by the server and everything it started (sandboxes, Codex, git; the
  cgroup ``harness.CpuAccount``, where the host has cgroup v1's cpuacct; elsewhere only
  the server and its reaped children, which misses the sandboxes: the line says which) and by
  this process (the scripted model and the clients), per task, and ``floor`` = all of it ÷
  the cores: no schedule of the round on this machine can end sooner;
- per attempt (medians over the round): posted → claimed (queue), claimed → the model's first
  request (workspace, sandbox and Codex start), first → last model request (the agent's
  loop), last request → terminal (diff, result, recording);
- the server's own CPU (its threads: API, engine, gateway) apart from its reaped children's;
- with ``--trace DIR`` (servers under ``bench.traced_serve``, traces kept in ``DIR``) the start
  split in two, medians over each round's attempts: claimed → the prompt written to the agent
  (workspace, sandbox and agent process: the server's side) and the prompt → the model's
  first request (the agent's own start-up in its sandbox), with the claim's own time
  (its reads, and its write waiting for the writer) and the cold workspaces' and sandboxes' times;
  where the server's own threads spent their CPU (``bench.traced_serve``'s sampler, in
  ``DIR/trace-*.samples.json``), and the processes the server started in each round (git
  by verb, bwrap, …) with its CPU spent starting them.

Loopback only; bounded by ``--timeout`` per round.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from . import harness as h
from .repo import generate
from .traced_serve import spawn_summary

PHASES = ("queue", "start", "agent loop", "tail")
#: ``--trace``: the start's parts (see the module's doc)
TRACED = ("claim", "claimed → prompt", "prompt → request", "workspace", "sandbox start")


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def own_cpu() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


@dataclass
class Series:
    name: str
    server: h.WhamServer
    env_id: str
    walls: list[float] = field(default_factory=list)
    cpu_server: list[float] = field(default_factory=list)
    cpu_bench: list[float] = field(default_factory=list)
    phases: dict[str, list[float]] = field(default_factory=lambda: {p: [] for p in PHASES})
    cpu_own: list[float] = field(default_factory=list)
    trace: Path | None = None
    #: ``--trace``: the processes the server started in each round (``spawn_summary``)
    spawns: list[str] = field(default_factory=list)
    traced: dict[str, list[float]] = field(default_factory=lambda: {p: [] for p in TRACED})
    bad: int = 0


def run_round(
    s: Series, clock: h.ModelClock, tasks: int, tag: str, timeout: float, poll: float
) -> list[str]:
    """Post ``tasks`` tasks at once (prompts marked ``bench-run-<tag><i>``); record the wall
    until all ended, the CPU used meanwhile and the attempts' phases. Returns the statuses."""
    server = s.server
    server.client.close()  # fresh connections: an idle kept-alive one may be closing
    server.client = httpx.Client(timeout=60, headers=server.client.headers)
    marks = [f"{tag}{i:03d}" for i in range(tasks)]
    cpu0, own0 = server.cpu_seconds(), own_cpu()
    self0 = server_own_cpu(server.process.pid)
    t0, wall0 = time.perf_counter(), time.time()
    with ThreadPoolExecutor(max_workers=tasks) as pool:
        created = list(
            pool.map(lambda m: server.create_task(s.env_id, f"bench-run-{m}: say hi"), marks)
        )
    pending = {task_id for task_id, _ in created}
    statuses: dict[str, str] = {}
    deadline = time.monotonic() + timeout
    while pending:
        r = server.client.get(server.api("tasks/list"), params={"limit": 100})
        r.raise_for_status()
        for item in r.json()["items"]:
            shown = (item.get("task_status_display") or {}).get("latest_turn_status_display")
            status = (shown or {}).get("turn_status")
            if item["id"] in pending and status in h.TERMINAL:
                statuses[item["id"]] = status
                pending.discard(item["id"])
        if not pending:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"{len(pending)} tasks never ended")
        time.sleep(poll)
    wall = time.perf_counter() - t0
    for _, turn_id in created:  # the attempts' ends (workspace removal, standby refill) count
        ws = server.data_dir / "attempts" / turn_id / "workspace"
        while ws.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    s.walls.append(wall)
    s.cpu_server.append(server.cpu_seconds() - cpu0)
    s.cpu_own.append(server_own_cpu(server.process.pid) - self0)
    s.cpu_bench.append(own_cpu() - own0)
    for task_id, status in statuses.items():
        if status != "completed":
            s.bad += 1
            r = server.client.get(server.api(f"tasks/{task_id}"))
            log(f"  {task_id}: {status} {r.json()['current_assistant_turn'].get('error')}")
    phases(s, clock, created, marks, wall0)
    if s.trace is not None:
        traced(s, [turn_id for _, turn_id in created])
        s.spawns.append(spawn_summary(list(h.iter_trace(s.trace)), wall0, time.time()))
    return list(statuses.values())


def server_own_cpu(pid: int) -> float:
    """CPU of the server process's own threads (``utime + stime``), without its children."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:13]) / os.sysconf("SC_CLK_TCK")


def traced(s: Series, turn_ids: list[str]) -> None:
    """The start's parts of this round's attempts, from the server's trace (``TRACED``)."""
    assert s.trace is not None
    wanted = set(turn_ids)
    spans: dict[str, dict[str, list[dict[str, float]]]] = {t: {} for t in turn_ids}
    for record in h.iter_trace(s.trace):
        turn = record.get("turn")
        if turn in wanted:
            spans[turn].setdefault(record["name"], []).append(record)
    per: dict[str, list[float]] = {p: [] for p in TRACED}
    for turn in turn_ids:
        mine = {name: sorted(found, key=lambda r: r["t0"]) for name, found in spans[turn].items()}
        claim, prompt = mine.get("claim"), mine.get("prompt_sent")
        request = mine.get("gateway_request")
        if claim and claim[0].get("t1"):
            per["claim"].append(claim[0]["t1"] - claim[0]["t0"])
            if prompt:
                per["claimed → prompt"].append(prompt[0]["t0"] - claim[0]["t1"])
        if prompt and request:
            per["prompt → request"].append(request[0]["t0"] - prompt[0]["t0"])
        for part, name in (
            ("workspace", "create_workspace"),
            ("sandbox start", "bwrap_start_call"),
        ):
            done = [r["t1"] - r["t0"] for r in mine.get(name, []) if r.get("t1")]
            if done:
                per[part].append(sum(done))
    for part in TRACED:
        if per[part]:
            s.traced[part].append(statistics.median(per[part]))


def phases(
    s: Series, clock: h.ModelClock, created: list[tuple[str, str]], marks: list[str], t0: float
) -> None:
    """Each attempt's phases from its row (claimed at ``run.started_at``, ended at the
    terminal event) and the model's clock (wall-clock times, same host)."""
    db = sqlite3.connect(f"file:{s.server.data_dir / 'openwham.db'}?mode=ro", uri=True)
    try:
        per: dict[str, list[float]] = {p: [] for p in PHASES}
        for (_, turn_id), mark in zip(created, marks, strict=True):
            row = db.execute("SELECT body FROM turns WHERE id = ?", (turn_id,)).fetchone()
            end = db.execute(
                "SELECT max(created_at) FROM turn_events WHERE turn_id = ?", (turn_id,)
            ).fetchone()
            arrivals = clock.arrivals_wall.get(mark) or []
            if row is None or end is None or not arrivals:
                continue
            claimed = float((json.loads(row[0]).get("run") or {}).get("started_at") or 0)
            if not claimed:
                continue
            per["queue"].append(claimed - t0)
            per["start"].append(arrivals[0] - claimed)
            per["agent loop"].append(arrivals[-1] - arrivals[0])
            per["tail"].append(float(end[0]) - arrivals[-1])
        for p in PHASES:
            if per[p]:
                s.phases[p].append(statistics.median(per[p]))
    finally:
        db.close()


def fmt(values: list[float], unit: str = "s") -> str:
    if not values:
        return "-"
    return (
        f"{min(values):.2f} / {statistics.median(values):.2f} / {max(values):.2f}"
        f"{' ' + unit if unit else ''}"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.burst", description=__doc__)
    ap.add_argument("--tasks", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3, help="rounds per server (3)")
    ap.add_argument("--files", type=int, default=50, help="files in the generated repository")
    ap.add_argument("--tree", action="append", type=Path, default=[], help="source trees")
    ap.add_argument(
        "--concurrency",
        type=int,
        action="append",
        default=None,
        help="WHAM_EXECUTOR_CONCURRENCY per server (repeat; 0 = default; default: 0 and 32)",
    )
    ap.add_argument("--settle", type=float, default=3.0, help="idle seconds between rounds")
    ap.add_argument("--poll", type=float, default=0.1, help="seconds between status polls")
    ap.add_argument("--timeout", type=float, default=300.0, help="bound per round (s)")
    ap.add_argument("--keep", action="store_true", help="keep the data dirs and logs")
    ap.add_argument(
        "--trace",
        type=Path,
        default=None,
        help="run the servers under bench.traced_serve, their traces kept in this directory, "
        "and split the start (see above)",
    )
    args = ap.parse_args(argv)
    levels = args.concurrency or [0, 32]
    trees = [t.resolve() for t in args.tree] or [h.ROOT]

    work = Path(tempfile.mkdtemp(prefix="wham-bench-burst-", dir="/var/tmp"))
    model, clock = h.start_model()
    model.script = [h.Shell("echo hi"), h.Say("Hi.")]
    series: list[Series] = []
    try:
        repo = generate(work / "repo", args.files)
        for t, tree in enumerate(trees):
            for c in levels:
                extra = {"PYTHONPATH": str(tree / "src")}
                if c:
                    extra["WHAM_EXECUTOR_CONCURRENCY"] = str(c)
                name = f"{str(tree)[-24:]} c={c or 'default'}"
                trace = None
                if args.trace is not None:
                    args.trace.mkdir(parents=True, exist_ok=True)
                    trace = (args.trace / f"trace-{t}-{c}.jsonl").resolve()
                    trace.unlink(missing_ok=True)
                    extra["BENCH_TRACE"] = str(trace)
                    extra["BENCH_SAMPLE"] = str(trace.with_suffix(".samples.json"))
                srv = h.WhamServer.start(
                    work / f"data-{t}-{c}",
                    model.url,
                    log_path=work / f"serve-{t}-{c}.log",
                    module="bench.traced_serve" if trace else None,
                    extra_env=extra,
                )
                series.append(Series(name, srv, srv.create_env(repo), trace=trace))
        for k, s in enumerate(series):  # mirror, checkout, standbys, imports
            run_round(s, clock, 2, f"9{k:02d}", args.timeout, args.poll)
            s.walls.clear(), s.cpu_server.clear(), s.cpu_bench.clear(), s.cpu_own.clear()
            s.phases = {p: [] for p in PHASES}
            s.traced = {p: [] for p in TRACED}
            s.spawns.clear()
        for n in range(args.runs):
            for k, s in enumerate(series):
                time.sleep(args.settle)
                run_round(s, clock, args.tasks, f"{n + 1}{k:02d}", args.timeout, args.poll)
                log(
                    f"{s.name} round {n + 1}: {s.walls[-1]:.1f} s, CPU server "
                    f"{s.cpu_server[-1]:.1f} s + bench {s.cpu_bench[-1]:.1f} s"
                )
        cores = os.cpu_count() or 1
        print(f"{args.tasks} tasks at once; min / median / max over {args.runs} rounds:")
        for s in series:
            med = statistics.median(s.walls)
            total = [a + b for a, b in zip(s.cpu_server, s.cpu_bench, strict=True)]
            print(f"  {s.name}")
            print(
                f"    wall {fmt(s.walls)}  ({args.tasks * 60 / med:.1f} tasks/min)"
                f"  not completed: {s.bad}"
            )
            print(
                f"    CPU ({s.server.cpu_scope}) {fmt(s.cpu_server)}, bench (model, clients) "
                f"{fmt(s.cpu_bench)}; per task {statistics.median(s.cpu_server) / args.tasks:.3f}"
                f" + {statistics.median(s.cpu_bench) / args.tasks:.3f} s;"
                f" floor (all CPU / {cores} cores) {fmt([x / cores for x in total])};"
                f" the server's own threads {fmt(s.cpu_own)}"
            )
            print(
                "    per attempt, median of each round: "
                + "; ".join(f"{p} {fmt(s.phases[p])}" for p in PHASES)
            )
            if s.trace is not None:
                print(
                    "    the start's parts, median of each round: "
                    + "; ".join(f"{p} {fmt(s.traced[p])}" for p in TRACED)
                )
                for n, spawned in enumerate(s.spawns):
                    print(f"    round {n + 1}, processes the server started: {spawned}")
        return 0
    finally:
        for s in series:
            s.server.stop()
        model.stop()
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
