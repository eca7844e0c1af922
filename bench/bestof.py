"""``python -m bench.bestof``: the wall time of a best-of-4 task over a single attempt (issue 20).

A real ``wham serve`` (scripted model: one command, then an answer; generated repository of
``--files`` files; ``WHAM_EXECUTOR_CONCURRENCY`` = ``--concurrency``) runs, interleaved,
``--runs`` single-attempt tasks and ``--runs`` best-of-4 tasks (``metadata.best_of_n``). Each
is timed from ``POST tasks`` until every attempt is terminal (its turn stream's terminal event;
``--poll``: polling instead); between runs the server is left
idle until the attempts' workspaces are gone and as many standbys as the task had attempts
are prepared and settled (as a person's next task finds it). One warm-up of each kind first
(mirror, standbys). Prints min / median / max of each and the ratio of the medians (target ≤ 1.5),
and the CPU of the server with all it started (sandboxes included where the host has cgroup
v1's cpuacct: ``harness.CpuAccount``). ``--model-delay S``: each model response waits ``S``
seconds first (a real model's latency, which the attempts wait out together; by default the
model answers at once and the ratio is the system's own work).
With several ``--tree`` (each one's ``src`` on ``PYTHONPATH``), one server per tree, the runs
interleaved between them.

With ``--trace DIR`` each server runs under ``bench.traced_serve`` (its trace in
``DIR/trace-K.jsonl``) and every best-of-4 is printed as a timeline: per attempt, the
milliseconds from the POST to each phase's end (claim, standby taken, prompt, held model
requests released, each model request and its answer, turn.completed, the diff written,
when the engine began finishing the attempt ("fin": its result read, the PR item made, the
end written), the terminal state committed, the sandbox's exit), the time its recorder's
calls held their caller (the agent's output thread) and the recorder's writes on its own
thread; with the CPU pressure of the host meanwhile (``/proc/pressure/cpu``: how long some
task waited for a core); and, per run, the processes the server started from the POST
until its standbys were prepared again (git by verb, bwrap, …) with its CPU spent starting
them.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from . import harness as h
from .repo import generate
from .startphases import CODEX_LOG
from .traced_serve import spawn_summary


@dataclass
class Run:
    """One task's run: when it was posted (``time.time()``), its attempts, its wall time and
    the host's CPU pressure meanwhile (microseconds some task waited for a core)."""

    posted: float
    turns: list[str]
    wall: float
    cpu_wait_us: int | None
    #: CPU seconds of the server process itself (its Python: API, gateway, engine threads)
    #: from the POST until the last attempt ended, not counting what it ran
    server_cpu: float = 0.0
    #: CPU seconds of the server and all it started (``WhamServer.cpu_seconds``) from the
    #: POST until the last attempt ended: the work inside the wall (÷ the cores: its floor)
    wall_cpu: float = 0.0
    #: ``time.time()`` once its workspaces were gone and the standbys prepared again
    done: float = 0.0


def cpu_pressure_us() -> int | None:
    """``/proc/pressure/cpu``'s ``some total``: how long, in microseconds since boot, at
    least one task waited for a core (the whole host's, not only this bench's)."""
    try:
        line = Path("/proc/pressure/cpu").read_text().splitlines()[0]
    except (OSError, IndexError):
        return None
    return int(line.rsplit("total=", 1)[1])


def own_cpu(pid: int) -> float:
    """CPU seconds of process ``pid`` itself (utime + stime, no children)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_task(
    server: h.WhamServer,
    env_id: str,
    n: int,
    tag: str,
    cpu: list[float] | None = None,
    runs: list[Run] | None = None,
    poll: float = 0.0,
    ready: bool = True,
) -> float:
    """POST a task of ``n`` attempts; seconds until all of them ended. ``cpu`` gets the CPU
    seconds the server and everything it started used from the POST until the
    attempts ended and standbys were prepared again (``WhamServer.cpu_seconds``: the
    attempts' sandboxes, the standbys prepared meanwhile so far, git; where the host has no
    cgroup v1 cpuacct, only the server and its reaped children). The end is seen on each
    attempt's turn stream (``poll`` seconds: by polling the task and the attempts instead, as
    the bench did before: at 20 ms that cost the server ~20 % of a core). Posted once ``n``
    standbys are ready (the pool keeps as many as the largest task of the key asked for): a
    best-of-4 after a pause finds its four as a single finds its one; the wait after the last
    run asked only for that run's ``n``; not before the warm-up runs (``ready``), which are
    what first asks the pool for ``n``)."""
    if ready:
        wait_standbys(server, n)
    cpu0 = server.cpu_seconds()
    body = {
        "new_task": {"environment_id": env_id},
        "input_items": [
            {
                "type": "message",
                "role": "user",
                "content": [{"content_type": "text", "text": f"bench-run-{tag}: say hi"}],
            }
        ],
        "metadata": {"best_of_n": n},
    }
    pressure0, own0 = cpu_pressure_us(), own_cpu(server.process.pid)
    posted, t0 = time.time(), time.perf_counter()
    r = server.client.post(server.api("tasks"), json=body)
    r.raise_for_status()
    task_id, turn = r.json()["task"]["id"], r.json()["turn"]
    ids = [turn["id"], *turn["sibling_turn_ids"]]
    wall = _poll(server, task_id, ids, t0, poll) if poll else _streams(server, task_id, ids, t0)
    pressure1, own1 = cpu_pressure_us(), own_cpu(server.process.pid)
    inside = server.cpu_seconds() - cpu0
    if runs is not None:
        waited = None if pressure0 is None or pressure1 is None else pressure1 - pressure0
        runs.append(Run(posted, ids, wall, waited, own1 - own0, inside))
    for tid in ids:
        server.wait_cleanup(tid)
    wait_standbys(server, n)
    if runs is not None:
        runs[-1].done = time.time()
    if cpu is not None:
        cpu.append(server.cpu_seconds() - cpu0)
    return wall


def _streams(server: h.WhamServer, task_id: str, ids: list[str], t0: float) -> float:
    """Seconds from ``t0`` until every attempt's turn stream delivered its terminal event
    (a client and thread per attempt, as a page per attempt would)."""
    ends: list[float] = []

    def follow(turn_id: str) -> None:
        with httpx.Client(timeout=600, headers=server.client.headers) as client:
            ends.append(server.stream(task_id, turn_id, timeout=600, client=client)[1])

    threads = [threading.Thread(target=follow, args=(turn_id,)) for turn_id in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if len(ends) != len(ids):
        raise RuntimeError(f"task {task_id}: {len(ids) - len(ends)} streams failed")
    return max(ends) - t0


def _poll(server: h.WhamServer, task_id: str, ids: list[str], t0: float, every: float) -> float:
    """Seconds from ``t0`` until polling saw every attempt terminal."""
    deadline = time.monotonic() + 600
    while True:
        r = server.client.get(server.api(f"tasks/{task_id}/turns/{ids[0]}/sibling_turns"))
        r.raise_for_status()
        turns = r.json()["sibling_turns"]
        first = server.client.get(server.api(f"tasks/{task_id}")).json()["current_assistant_turn"]
        statuses = [t.get("turn_status") for t in [first, *turns]]
        if len(statuses) == len(ids) and all(s in h.TERMINAL for s in statuses):
            return time.perf_counter() - t0
        if time.monotonic() > deadline:
            raise RuntimeError(f"task {task_id} never ended: {statuses}")
        time.sleep(every)


def wait_standbys(server: h.WhamServer, n: int, timeout: float = 120) -> None:
    """Until ``n`` standbys are prepared and settled (their index rewritten a second after
    the checkout) and the server's pool holds them ready (their Codex waits for its prompt,
    and a take has each at once: ``WhamServer.standbys_ready``), as after a pause between a
    person's tasks (the next run does not share the cores with their start-ups)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        settled = 0
        for standby in (server.data_dir / "attempts").glob(".standby-*"):
            if (standby / "overlay-lower").is_symlink():  # an overlay: its index is the
                settled += 1  # shared checkout's, settled once per commit
                continue
            git_dir = standby / "workspace" / ".git"
            try:
                if (git_dir / "index").stat().st_mtime - (git_dir / "HEAD").stat().st_mtime > 1:
                    settled += 1
            except OSError:
                continue
        if settled >= n and server.standbys_ready(n) >= n:
            return  # the pool holds them ready: a take has each at once
        time.sleep(0.05)


Record = dict[str, Any]


def _named(name: str) -> Callable[[Record], bool]:
    return lambda r: r["name"] == name


def _codex(text: str) -> Callable[[Record], bool]:
    return lambda r: r["name"] == "codex_log" and text in r.get("msg", "")


#: the timeline's columns: (heading, which trace records, the n-th of them, its start or end);
#: Codex's own marks (``--codex-log``) as ``bench.startphases`` reads them
COLUMNS: list[tuple[str, Callable[[Record], bool], int, str]] = [
    ("claim", _named("claim"), 0, "t1"),
    ("take", _named("take_standby"), 0, "t1"),
    ("prompt", _named("prompt_sent"), 0, "t0"),
    ("release", _named("gateway_release"), 0, "t1"),
    ("init", _codex("notification: Initialized"), 0, "t0"),
    ("thread", _codex("thread_start_total"), 0, "t0"),
    ("sent", _codex("Sent prompt"), 0, "t0"),
    ("skills", _codex("shadow skill selection"), 0, "t0"),
    ("req1", _named("gateway_request"), 0, "t0"),
    ("ans1", _named("gateway_response"), 0, "t1"),
    ("req2", _named("gateway_request"), 1, "t0"),
    ("ans2", _named("gateway_response"), 1, "t1"),
    ("tc", _named("turn_completed_line"), 0, "t0"),
    ("diff", _named("result_written"), 0, "t0"),
    ("fin", _named("results_finish"), 0, "t0"),
    ("end", _named("recorder_finish"), 0, "t1"),
    ("exit", _named("sandbox_exit"), 0, "t0"),
]
#: the recorder's calls (what they held their caller, e.g. the agent's output thread, for)
RECORDER = ("recorder_message", "recorder_status", "recorder_flush")


def phase_summary(runs: list[tuple[float, str]], events: list[Record]) -> list[str]:
    """Per ``COLUMNS`` phase, min / median / max ms from each attempt's POST (``runs``:
    when it was posted, its turn) to the phase's end, over the attempts that reached it."""
    lines = []
    for heading, match, nth, end in COLUMNS:
        values = []
        for posted, turn in runs:
            found = sorted(
                (e for e in events if e.get("turn") == turn and match(e)), key=lambda e: e["t0"]
            )
            at = found[nth].get(end) if len(found) > nth else None
            if at is not None:
                values.append((at - posted) * 1000)
        if values:
            lines.append(
                f"  {heading:>8}: {min(values):6.0f} {statistics.median(values):6.0f} "
                f"{max(values):6.0f}  (n={len(values)})"
            )
    return lines


def timeline(run: Run, events: list[dict[str, Any]], title: str) -> str:
    """A best-of-4's timeline: per attempt, ms from the POST to the end of each phase
    (``COLUMNS``), and its recorder's writes (count, ms in all, the longest)."""
    lines = [
        f"{title}: wall {run.wall * 1000:.0f} ms; the server process's own CPU meanwhile "
        f"{run.server_cpu * 1000:.0f} ms; host CPU pressure (some task waiting for a core) "
        f"{'?' if run.cpu_wait_us is None else f'{run.cpu_wait_us / 1000:.0f} ms'}",
        "  attempt   "
        + "".join(f"{c[0]:>8}" for c in COLUMNS)
        + "  rec n / ms / max  writes n / ms / max",
    ]
    for turn in run.turns:
        mine = [e for e in events if e.get("turn") == turn]
        cells = []
        for _, match, nth, end in COLUMNS:
            found = sorted((e for e in mine if match(e)), key=lambda e: e["t0"])
            at = found[nth].get(end) if len(found) > nth else None
            cells.append(f"{(at - run.posted) * 1000:8.0f}" if at is not None else f"{'-':>8}")
        writes = [e["t1"] - e["t0"] for e in mine if e["name"] in RECORDER and e.get("t1")]
        rec = f"{len(writes):>3} / {sum(writes) * 1000:4.0f} / {max(writes or [0]) * 1000:3.0f}"
        db = [e["t1"] - e["t0"] for e in mine if e["name"] == "recorder_write" and e.get("t1")]
        rec += f"  {len(db):>3} / {sum(db) * 1000:4.0f} / {max(db or [0]) * 1000:3.0f}"
        lines.append(f"  …{turn[-8:]}" + "".join(cells) + "  " + rec)
    return "\n".join(lines)


def traced(trace: Path | None, k: int, codex_log: bool, extra: dict[str, str]) -> str | None:
    """With ``trace`` (a directory): server ``k`` runs under ``bench.traced_serve``, its
    trace in ``trace/trace-K.jsonl`` (``extra`` gets its environment; ``codex_log``: Codex's
    own log too); returns the module to run, else ``None`` (plain ``wham``)."""
    if trace is None:
        return None
    trace.mkdir(parents=True, exist_ok=True)
    (trace / f"trace-{k}.jsonl").unlink(missing_ok=True)
    extra["BENCH_TRACE"] = str((trace / f"trace-{k}.jsonl").resolve())
    if codex_log:
        extra["BENCH_CODEX_RUST_LOG"] = CODEX_LOG
    return "bench.traced_serve"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.bestof", description=__doc__)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--files", type=int, default=5000)
    ap.add_argument("--concurrency", type=int, default=4, help="WHAM_EXECUTOR_CONCURRENCY")
    ap.add_argument(
        "--tree",
        action="append",
        type=Path,
        default=[],
        help="source trees, one server each, runs interleaved (default: this tree)",
    )
    ap.add_argument(
        "--trace",
        type=Path,
        default=None,
        help="run the servers under bench.traced_serve, keep their traces in this directory "
        "and print each best-of-4's timeline per attempt",
    )
    ap.add_argument(
        "--poll",
        type=float,
        default=0.0,
        help="see the attempts' ends by polling every this many seconds (the bench's way "
        "before: 0.02) instead of following their turn streams",
    )
    ap.add_argument(
        "--codex-log",
        action="store_true",
        help="with --trace: Codex's own log too (its start-up marks in the timelines)",
    )
    ap.add_argument(
        "--model-delay",
        type=float,
        default=0.0,
        help="seconds each model response waits before its first output item (a real "
        "model's latency; default 0: the scripted model answers at once, so the ratio is "
        "the system's own overhead)",
    )
    h.add_mode_argument(ap)
    args = ap.parse_args(argv)
    variants = [(t.resolve(), m) for t in (args.tree or [h.ROOT]) for m in (args.mode or [""])]
    trees = [f"{t} {m}".strip() for t, m in variants]

    work = Path(tempfile.mkdtemp(prefix="wham-bench-bestof-", dir="/var/tmp"))
    model, _ = h.start_model()
    model.script = [h.Shell("echo hi"), h.Say("Hi.")]
    model.delay = args.model_delay
    servers: list[h.WhamServer] = []
    try:
        repo = generate(work / "repo", args.files)
        envs: list[str] = []
        for k, (tree, mode) in enumerate(variants):
            extra = {
                "WHAM_EXECUTOR_CONCURRENCY": str(args.concurrency),
                "PYTHONPATH": str(tree / "src"),
            }
            if mode:
                extra["WHAM_CODEX_MODE"] = mode
            module = traced(args.trace, k, args.codex_log, extra)
            servers.append(
                h.WhamServer.start(
                    work / f"data-{k}",
                    model.url,
                    log_path=work / f"serve-{k}.log",
                    module=module,
                    extra_env=extra,
                )
            )
            envs.append(servers[-1].create_env(repo))
        for server, env_id in zip(servers, envs, strict=True):
            run_task(server, env_id, 1, "warm-1", poll=args.poll, ready=False)
            run_task(server, env_id, 4, "warm-4", poll=args.poll, ready=False)
        single: list[list[float]] = [[] for _ in trees]
        best: list[list[float]] = [[] for _ in trees]
        cpu1: list[list[float]] = [[] for _ in trees]
        cpu4: list[list[float]] = [[] for _ in trees]
        runs4: list[list[Run]] = [[] for _ in trees]
        runs1: list[list[Run]] = [[] for _ in trees]
        for i in range(args.runs):
            for k, (server, env_id) in enumerate(zip(servers, envs, strict=True)):
                best[k].append(
                    run_task(server, env_id, 4, f"4-{i}", cpu4[k], runs4[k], poll=args.poll)
                )
                single[k].append(
                    run_task(server, env_id, 1, f"1-{i}", cpu1[k], runs1[k], poll=args.poll)
                )
                print(
                    f"tree {k} run {i + 1}: single {single[k][-1]:.2f} s, "
                    f"best-of-4 {best[k][-1]:.2f} s",
                    file=sys.stderr,
                )
        for k, tree in enumerate(trees):
            if args.trace is not None:
                print(f"{tree}: timelines of the best-of-4s")
                events = list(h.iter_trace(args.trace / f"trace-{k}.jsonl"))
                for i, run in enumerate(runs4[k]):
                    print(timeline(run, events, f"best-of-4 run {i + 1}"))
                print(f"{tree}: processes the server started, from the POST until the standbys")
                print("  were prepared again (bench.traced_serve's spawn points)")
                for name, runs in (("best-of-4", runs4[k]), ("single", runs1[k])):
                    for i, run in enumerate(runs):
                        print(
                            f"  {name} run {i + 1}: {spawn_summary(events, run.posted, run.done)}"
                        )
        for k, tree in enumerate(trees):
            print(f"{tree}:")
            for name, values in (("single attempt", single[k]), ("best-of-4", best[k])):
                print(
                    f"  {name:<16} s: min {min(values):.2f} median "
                    f"{statistics.median(values):.2f} max {max(values):.2f}"
                )
            ratio = statistics.median(best[k]) / statistics.median(single[k])
            print(f"  best-of-4 / single, medians: {ratio:.2f} (target <= 1.5)")
            c1, c4 = statistics.median(cpu1[k]), statistics.median(cpu4[k])
            cores = os.cpu_count() or 1
            print(
                f"  CPU ({servers[k].cpu_scope}), median: single {c1:.2f} s, best-of-4 "
                f"{c4:.2f} s; best-of-4 floor on {cores} cores {c4 / cores:.2f} s "
                f"= {c4 / cores / statistics.median(single[k]):.2f} x the single's wall"
            )
            w1 = statistics.median(r.wall_cpu for r in runs1[k])
            w4 = statistics.median(r.wall_cpu for r in runs4[k])
            print(
                f"  CPU within the wall (POST to the last attempt's end), median: single "
                f"{w1:.2f} s, best-of-4 {w4:.2f} s; ÷ {cores} cores: {w1 / cores:.2f} / "
                f"{w4 / cores:.2f} s (the wall can be no shorter)"
            )
            o1 = statistics.median(r.server_cpu for r in runs1[k])
            o4 = statistics.median(r.server_cpu for r in runs4[k])
            print(
                f"  the server process's own CPU until the end, median: single {o1:.2f} s, "
                f"best-of-4 {o4:.2f} s"
            )
        return 0
    finally:
        for server in servers:
            server.stop()
        model.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
