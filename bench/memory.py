"""``python -m bench.memory``: the server's memory over rounds of tasks (issue 20).

A real ``wham serve`` (scripted model, a small generated repository, standby sandboxes as
configured) runs ``--rounds`` rounds of ``--tasks`` tasks posted at once (each agent runs one
command and answers); after each round, once every attempt ended and the server idled
``--settle`` seconds, the server's RSS (``VmRSS``) is read and ``bench.memory_serve`` reports
the rest (glibc's heap, SQLite, the render cache, Python's blocks and objects, threads, open
files, RSS after a ``malloc_trim``).

Growth is judged over the rounds after the first (which warms up ``--tasks`` attempts at
once): for each figure the least-squares slope over the values after rounds 1..N, with its
standard error, per round and per task, and min / median / max of the steps between rounds.
"heap - cache, SQL" is glibc's bytes in use less what the render cache holds (bounded: 512
answers or 32 MB, ``service.rendercache``) and less SQLite's allocator (page caches and
prepared statements of the pooled connections: bounded per connection, reported apart).
The object types whose counts grew are listed by slope. ``--tracemalloc [FRAMES]`` traces
the server's allocations from the warm-up on and ranks the allocation sites by slope over
the rounds (tracing slows the server, and its tables are in the heap then: read growth from
the sites). ``--peak MB`` shows what the server's threads were doing at each round's
highest heap.
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
from . import heapgrowth
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


def snapshot(server: h.WhamServer, directory: Path, n: int) -> dict[str, Any]:
    """The server's memory stats (``bench.memory_serve``), its RSS read first."""
    rss = rss_kb(server.process.pid) * 1024
    os.kill(server.process.pid, signal.SIGUSR1)
    done = directory / f"snap-{n}.done"
    deadline = time.monotonic() + 300
    while not done.exists():
        if time.monotonic() > deadline:
            raise RuntimeError("no snapshot")
        time.sleep(0.1)
    stats: dict[str, Any] = json.loads((directory / f"stats-{n}.json").read_text())
    stats["rss"] = rss
    # the heap less the two bounded caches in it: rendered answers and SQLite's (page
    # caches, prepared statements: reported apart)
    stats["heap_other"] = (
        stats["malloc_in_use"] - stats["render_cache_held"] - stats["sqlite_in_use"]
    )
    return stats


STATS = (
    ("rss", "RSS"),
    ("rss_trimmed", "RSS trimmed"),
    ("rss_anon", "of it anonymous"),
    ("rss_file", "of it files"),
    ("malloc_in_use", "heap in use"),
    ("heap_other", "heap - cache, SQL"),
    ("malloc_mmapped", "of it mmapped"),
    ("malloc_free", "heap free"),
    ("sqlite_in_use", "SQLite"),
    ("render_cache_bytes", "render cache"),
    ("render_cache_held", "cache held"),
    ("traced", "tracemalloc"),
    ("pymalloc_total", "pymalloc arenas"),
    ("pymalloc_free", "of them free"),
)
COUNTS = (
    ("python_objects", "Python objects"),
    ("python_blocks", "Python blocks"),
    ("threads", "threads"),
    ("fds", "open files"),
    ("sqlalchemy_compiled", "SQLAlchemy cache"),
    ("render_cache_entries", "cache entries"),
)


def slope(values: list[float]) -> tuple[float, float]:
    """Least-squares growth per round of ``values`` (one per round) and its standard error
    (0 with fewer than three values)."""
    n = len(values)
    if n < 2:
        return 0.0, 0.0
    xs = range(n)
    mx, my = (n - 1) / 2, statistics.fmean(values)
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, values, strict=True)) / sxx
    if n < 3:
        return b, 0.0
    residual = sum((y - my - b * (x - mx)) ** 2 for x, y in zip(xs, values, strict=True))
    return b, (residual / (n - 2) / sxx) ** 0.5


def growth_line(label: str, values: list[float], tasks: int, unit: float = 1024) -> str:
    """``values`` (after each round, the first round's first) as growth per round: the
    least-squares slope ± its standard error, per task, and min / median / max of the
    round-to-round steps; in KB (``unit`` 1) or counts."""
    b, se = slope(values)
    steps = [y - x for x, y in pairwise(values)] or [0.0]
    name = "KB" if unit == 1024 else ""
    return (
        f"  {label:>16}: slope {b / unit:+9.1f} ± {se / unit:6.1f} {name}/round"
        f" ({b / unit / tasks:+7.2f} per task); steps min {min(steps) / unit:+9.1f}"
        f" median {statistics.median(steps) / unit:+9.1f} max {max(steps) / unit:+9.1f}"
    )


def tracemalloc_slopes(paths: list[Path], top: int, tasks: int) -> None:
    """The allocation sites (whole tracebacks) whose bytes grew most steadily over the
    rounds: least-squares slope of each site's size over the snapshots."""
    sizes: list[dict[tracemalloc.Traceback, int]] = []
    for path in paths:
        snap = tracemalloc.Snapshot.load(str(path)).filter_traces(
            [tracemalloc.Filter(False, tracemalloc.__file__)]
        )
        sizes.append({s.traceback: s.size for s in snap.statistics("traceback")})
        del snap
    sites = set().union(*sizes)
    ranked = sorted(
        ((slope([float(s.get(t, 0)) for s in sizes])[0], t) for t in sites),
        key=lambda x: -x[0],
    )
    total = sum(b for b, _ in ranked)
    print(
        f"tracemalloc, rounds 1..{len(paths)}: all sites {total / 1024:+.1f} KB/round; "
        f"top {top} sites by slope:"
    )
    for b, tb in ranked[:top]:
        row = " ".join(f"{s.get(tb, 0) / 1024:.0f}" for s in sizes)
        print(f"  {b / 1024:+8.1f} KB/round ({b / tasks:+.0f} B/task), KB: {row}")
        for line in tb.format(most_recent_first=True)[:16]:
            if line.strip().startswith("File"):
                print(f"      {line.strip()}")


def type_slopes(every: list[dict[str, int]], top: int) -> None:
    """The object types whose count grew most steadily over the rounds."""
    names = set().union(*every)
    ranked = sorted(
        ((slope([float(t.get(n, 0)) for t in every])[0], n) for n in names),
        key=lambda x: -x[0],
    )
    print(f"object types by growth (gc-tracked), rounds 1..{len(every)}:")
    for b, name in ranked[:top]:
        if b <= 0:
            break
        print(f"  {b:+8.2f}/round {name}: {' '.join(str(t.get(name, 0)) for t in every)}")


IDLE = ("threading.py", "selectors.py", "queue.py", "base_events.py", "/malloc.py")


def container_slopes(paths: list[Path], top: int) -> None:
    """The containers (by id, alive in every round) whose length grew most steadily: a
    registry that keeps an entry per task shows here with the path to it."""
    every = [json.loads(p.read_text()) for p in paths]
    alive = set(every[0]).intersection(*every[1:])
    ranked = sorted(
        ((slope([float(e[i][1]) for e in every])[0], i) for i in alive), key=lambda x: -x[0]
    )
    print(f"containers by growth (alive in rounds 1..{len(every)}, 8+ items):")
    for b, i in ranked[:top]:
        if b <= 0:
            break
        kind, _, path = every[-1][i]
        lengths = " ".join(str(e[i][1]) for e in every)
        print(f"  {b:+8.2f}/round {kind} {path}: {lengths}")
    born = [len(set(e) - set(every[0])) for e in every]
    print(f"  containers of 8+ items not there after round 1: {' '.join(map(str, born))}")


def peak_report(directory: Path, n: int, top: int) -> None:
    """What the server's threads were doing at the round's highest heap (``--peak``)."""
    path = directory / f"peak-{n}.json"
    if not path.exists():
        return
    caught = json.loads(path.read_text())
    log(f"  heap's high point: +{caught['over'] / 2**20:.1f} MB over the round's start; busy:")
    for name, stack in caught["stacks"].items():
        frames = [line for line in stack if line.strip().startswith("File")]
        if not frames or any(idle in frames[-1] for idle in IDLE):
            continue
        log(f"    thread {name}:")
        for line in stack[-8:]:
            log(f"      {line.rstrip()}")
    pickled = directory / f"peak-{n}.pickle"
    before = directory / f"snap-{n - 1}.pickle"
    if pickled.exists() and before.exists():
        peak = tracemalloc.Snapshot.load(str(pickled))
        for stat in peak.compare_to(tracemalloc.Snapshot.load(str(before)), "traceback")[:top]:
            log(f"    {stat.size_diff / 1024:+9.1f} KB {stat.count_diff:+7d} blocks at the peak")
            for line in stat.traceback.format(most_recent_first=True)[:12]:
                if line.strip().startswith("File"):
                    log(f"        {line.strip()}")


JEMALLOC = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"  # Debian's libjemalloc2


class Lock:
    """``--lock PATH``: the machine's benchmark lock (``flock``), held in slices of at most
    ``--slice`` seconds: a run of many rounds lets other benches in between (the servers
    idle meanwhile, which changes no figure read here)."""

    def __init__(self, path: str, slice_seconds: float, pause: float) -> None:
        self.path, self.slice, self.pause = path, slice_seconds, pause
        self.fd = -1
        self.since = 0.0

    def take(self) -> None:
        if not self.path or self.fd >= 0:
            return
        import fcntl

        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        t0 = time.monotonic()
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        self.since = time.monotonic()
        log(f"  lock taken after {self.since - t0:.0f} s; load {os.getloadavg()[0]:.1f}")

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the only descriptor drops the flock
            self.fd = -1

    def maybe_pause(self, next_round: float) -> None:
        """Let others have the lock once the next round would end past the slice."""
        if self.fd < 0 or time.monotonic() + next_round - self.since < self.slice:
            return
        self.release()
        log(f"  lock released for {self.pause:.0f} s")
        time.sleep(self.pause)
        self.take()


class Run:
    """One server (one allocator) and its snapshots."""

    def __init__(self, allocator: str, work: Path, model_url: str, args: Any) -> None:
        self.allocator = allocator
        self.dir = work / allocator
        self.dir.mkdir()
        self.snaps = self.dir / "snaps"
        self.snaps.mkdir()
        env = {
            "BENCH_SNAPSHOTS": str(self.snaps),
            "BENCH_TRACEMALLOC": str(args.tracemalloc),
            "BENCH_PEAK_MB": str(args.peak),
            "BENCH_RENDER_ENTRIES": str(args.render_cache_entries),
            "BENCH_CONTAINERS": "1" if args.containers else "",
        }
        if allocator == "glibc-notcache":  # chunks cached per thread count as in use
            env["GLIBC_TUNABLES"] = "glibc.malloc.tcache_count=0"
        self.heaptrack = args.heaptrack and allocator == "glibc"
        if self.heaptrack:
            env["LD_PRELOAD"] = heapgrowth.PRELOAD
            env["DUMP_HEAPTRACK_OUTPUT"] = str(self.dir / "heaptrack.raw")
            env["BENCH_MARK"] = "1"
        if allocator == "jemalloc":
            if not Path(JEMALLOC).exists():
                raise SystemExit(
                    f"--allocator jemalloc: no {JEMALLOC} (apt-get install libjemalloc2)"
                )
            env["LD_PRELOAD"] = JEMALLOC
            env["MALLOC_CONF"] = args.jemalloc_conf
        self.server = h.WhamServer.start(
            self.dir / "data",
            model_url,
            log_path=self.dir / "serve.log",
            module="bench.memory_serve",
            extra_env=env,
        )
        self.every: list[dict[str, Any]] = []
        self.env_id = ""
        self.took: list[float] = []

    def warm_up(self, repo: Path, settle: float) -> None:
        self.env_id = self.server.create_env(repo)
        run_round(self.server, self.env_id, 2, "warm")  # mirror, standbys, first imports
        time.sleep(settle)
        self.every.append(snapshot(self.server, self.snaps, 1))
        log(f"{self.allocator}: after warm-up {self.every[0]['rss'] / 2**20:.1f} MB")

    def round(self, n: int, tasks: int, settle: float) -> None:
        t0 = time.monotonic()
        run_round(self.server, self.env_id, tasks, str(n))
        self.took.append(time.monotonic() - t0)
        time.sleep(settle)
        stats = snapshot(self.server, self.snaps, n + 2)
        self.every.append(stats)
        grew = ", ".join(
            f"{label} {(stats[k] - self.every[-2][k]) / 1024:+.0f}"
            for k, label in STATS
            if k in stats
        )
        log(
            f"{self.allocator} round {n + 1}: {tasks} tasks in {self.took[-1]:.1f} s, load "
            f"{os.getloadavg()[0]:.1f}, RSS {stats['rss'] / 2**20:.1f} MB; grew (KB): "
            f"{grew}; render cache {stats['render_cache_entries']} entries"
        )
        peak_report(self.snaps, n + 2, 5)

    def report(self, args: Any) -> None:
        every = self.every
        print(
            f"== {self.allocator}: after warm-up and each of {len(every) - 1} rounds of "
            f"{args.tasks} tasks (MB):"
        )
        for k, label in STATS:
            if k in every[0]:
                print(f"  {label:>16}: {' '.join(f'{x[k] / 2**20:.2f}' for x in every)}")
        for k, label in COUNTS:
            print(f"  {label:>16}: {' '.join(str(x[k]) for x in every)}")
        if "peak_over" in every[0]:
            highs = " ".join(f"{x['peak_over'] / 2**20:.1f}" for x in every)
            print(f"  heap's high point over each round's start (MB): {highs}")
        if self.took:
            took = sorted(self.took)
            print(
                f"  round wall (s): min {took[0]:.1f} median {statistics.median(took):.1f} "
                f"max {took[-1]:.1f}"
            )
        rounds = every[1:]
        starts = [2] + [n for n in args.from_round if 2 < n < len(rounds)]
        for start in starts:
            part = rounds[start - 2 :]
            print(
                f"growth per round of {args.tasks} tasks, rounds {start}..{len(rounds)} "
                f"(least squares over the values after rounds {start - 1}..N; steps between):"
            )
            for k, label in STATS:
                if k in every[0]:
                    print(growth_line(label, [float(x[k]) for x in part], args.tasks))
            for k, label in COUNTS:
                print(growth_line(label, [float(x[k]) for x in part], args.tasks, unit=1))
        types = [
            json.loads((self.snaps / f"types-{n}.json").read_text())
            for n in range(2, len(every) + 1)
        ]
        type_slopes(types, args.top)
        if args.containers:
            paths = [self.snaps / f"containers-{n}.json" for n in range(2, len(every) + 1)]
            container_slopes(paths, args.top)
        if args.tracemalloc:
            paths = [self.snaps / f"snap-{n}.pickle" for n in range(2, len(every) + 1)]
            tracemalloc_slopes(paths, args.top, args.tasks)
        if self.heaptrack:
            print(f"(heaptrack, {self.allocator}; marks: 1 = the warm-up, n + 1 = round n)")
            heapgrowth.main([str(self.dir / "heaptrack.raw"), "--from", str(args.heaptrack)])

    def stop(self) -> None:
        if self.heaptrack:  # killed: no frees at exit in the trace
            time.sleep(1)  # heaptrack's writer flushes
            self.server.process.kill()
            self.server.process.wait(10)
        self.server.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--tasks", type=int, default=32)
    ap.add_argument("--files", type=int, default=50, help="files in the generated repository")
    ap.add_argument("--settle", type=float, default=3.0, help="seconds idle before reading RSS")
    ap.add_argument(
        "--tracemalloc",
        type=int,
        nargs="?",
        const=25,
        default=0,
        metavar="FRAMES",
        help="trace allocations (default 25 frames a site) and rank the sites by growth",
    )
    ap.add_argument(
        "--peak",
        type=float,
        default=0,
        metavar="MB",
        help="show what the server's threads did at each round's highest heap once it is "
        "MB over the round's start (and, with --tracemalloc, the sites then; glibc only)",
    )
    ap.add_argument(
        "--render-cache-entries",
        type=int,
        default=0,
        metavar="N",
        help="bound the server's render cache at N answers instead of 512, so that it is "
        "full early and RSS can be judged with it",
    )
    ap.add_argument(
        "--allocator",
        action="append",
        default=[],
        choices=["glibc", "glibc-notcache", "jemalloc"],
        help="one server per allocator (repeatable; their rounds interleaved): glibc, glibc "
        "without its per-thread caches (which mallinfo2 counts as in use), jemalloc "
        f"(preloaded from {JEMALLOC} into the server only)",
    )
    ap.add_argument(
        "--jemalloc-conf",
        default="background_thread:true",
        metavar="CONF",
        help="jemalloc's MALLOC_CONF for --allocator jemalloc (default: its own settings "
        "but a background thread that returns dirty pages while the server idles)",
    )
    ap.add_argument(
        "--from-round",
        type=int,
        action="append",
        default=[],
        metavar="N",
        help="also fit the slopes over rounds N..last (repeatable): whether growth levels off",
    )
    ap.add_argument(
        "--lock",
        default="",
        metavar="PATH",
        help="hold this flock while working, in slices of --slice seconds",
    )
    ap.add_argument("--slice", type=float, default=330.0, metavar="SECONDS")
    ap.add_argument(
        "--minutes",
        type=float,
        default=0,
        help="stop after the round that would end past this many minutes (waits for the "
        "lock included) and report what was measured",
    )
    ap.add_argument("--pause", type=float, default=20.0, metavar="SECONDS")
    ap.add_argument(
        "--containers",
        action="store_true",
        help="walk the server's whole object graph after each round and rank the "
        "containers (dicts, lists, sets, deques) by growth, with their paths (diagnostic: "
        "the walk takes seconds and tens of MB)",
    )
    ap.add_argument(
        "--heaptrack",
        type=int,
        default=0,
        metavar="MARK",
        help="run the glibc server under heaptrack's preload library and report, by "
        "native backtrace, the heap's growth after mark MARK (2 = after round 1) to the last "
        "round (bench.heapgrowth; slows the server several times)",
    )
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args(argv)
    allocators = args.allocator or ["glibc"]

    work = Path(tempfile.mkdtemp(prefix="wham-bench-memory-", dir="/var/tmp"))
    lock = Lock(args.lock, args.slice, args.pause)
    model, _ = h.start_model()
    model.script = [h.Shell("echo hi"), h.Say("Hi.")]
    runs: list[Run] = []
    try:
        repo = generate(work / "repo", args.files)
        lock.take()
        log(f"load average at start: {os.getloadavg()}")
        for allocator in allocators:
            runs.append(Run(allocator, work, model.url, args))
            runs[-1].warm_up(repo, args.settle)
        began = time.monotonic()
        for n in range(args.rounds):
            for run in runs:
                run.round(n, args.tasks, args.settle)
            per_round = sum(r.took[-1] + args.settle + 1 for r in runs)
            if args.minutes and time.monotonic() - began + per_round > args.minutes * 60:
                log(f"stopped after {n + 1} rounds: --minutes {args.minutes}")
                break
            if n + 1 < args.rounds:
                lock.maybe_pause(per_round)
        lock.release()
        for run in runs:
            if run.heaptrack:
                run.stop()
        print(f"load average at the end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
        for run in runs:
            run.report(args)
        return 0
    finally:
        lock.release()
        for run in runs:
            run.stop()
        model.stop()
        if os.environ.get("BENCH_KEEP"):
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
