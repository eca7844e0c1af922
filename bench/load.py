"""``python -m bench.load`` (or ``./bench/load``): the API under a team's load.

For SQLite and for PostgreSQL, a real ``wham serve`` (``WHAM_EXECUTOR=none``) with N finished
tasks (written by the engine's own ``TurnRecorder``: a work log, an answer, a diff) is driven
on loopback:

1. **burst**: B concurrent ``GET tasks/{id}`` (64 on SQLite, 128 on PostgreSQL), each task's
   details answered once before (``--burst-cold``: not), by each ``--burst-client`` in turn:
   ``fresh`` (``bench.rawburst``: raw sockets, a new connection per request, all written at
   once), ``keepalive`` (raw sockets on connections opened and used once beforehand) and
   ``httpx`` (the first client: asyncio + httpx, a new connection per request); ``/healthz``
   asked in the middle of it, and one more GET after it: how many were served, how many
   refused (503 + Retry-After), latency percentiles (each from the request's start to the
   last byte of its answer), the client's own CPU, and whether the server answers normally
   afterwards.
2. **throughput**: ``wrk`` (Debian's, installed by ``scripts/setup.sh --with-postgres``) on
   task details and on ``tasks/list?limit=100`` at 1, 32 and 128 connections, a few seconds
   each: requests per second, min / p50 / p90 / p99 / max latency, non-2xx answers, the
   server process's CPU per request (``/proc``), and the ratio to the issue's targets.

With ``--tree DIR`` (repeatable) the same seeded database is served by each tree's ``src``
in turn (``PYTHONPATH``), ``--rounds`` times, the trees interleaved so that each sees the
same machine load: before/after in one run, with min/median/max over the rounds.
``--processes 1,2`` does the same for ``wham serve --processes N`` (PostgreSQL only; the
server API-only under the queue executor; CPU per request summed over its processes).

See bench/README.md ("Load").
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from . import harness as h
from . import rawburst
from .repo import generate

LUA = Path(__file__).with_name("load.lua")
# (rps at least, p99 at most in ms) at 32 connections, issue 20
TARGETS = {"details": (1000.0, 50.0), "list": (300.0, 100.0)}
BURST_TARGET_P99_MS = {"sqlite": 50.0, "postgres": 100.0}


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- databases


@contextmanager
def postgres_database(admin_url: str) -> Iterator[str]:
    """A fresh database on the cluster of ``admin_url``, dropped afterwards."""
    import psycopg
    from sqlalchemy.engine import make_url

    plain = admin_url.replace("postgresql+psycopg://", "postgresql://")
    name = f"wham_load_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(plain, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(plain, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# --------------------------------------------------------------------------- seeding

DIFF_LINES = 120


def _diff(n: int) -> str:
    """A diff of one file, ``DIFF_LINES`` changed lines (about 6 kB), as an attempt leaves."""
    lines = [
        f"diff --git a/src/mod{n:04d}.py b/src/mod{n:04d}.py",
        "index 1111111..2222222 100644",
        f"--- a/src/mod{n:04d}.py",
        f"+++ b/src/mod{n:04d}.py",
        f"@@ -1,{DIFF_LINES // 2} +1,{DIFF_LINES // 2} @@",
    ]
    for i in range(DIFF_LINES // 2):
        lines.append(f"-def f{i}(x):  return x + {i}  # the old line of the function")
        lines.append(f"+def f{i}(x):  return x + {i + 1}  # the new line of the function")
    return "\n".join(lines) + "\n"


def finish_tasks(url: str, turns: list[tuple[str, str]]) -> None:
    """Give every pending attempt what a finished one holds, through the engine's recorder:
    a dozen work-log messages (commands and their output), the answer and a PR item."""
    from sqlalchemy import update

    from openwham.engine.recorder import TurnRecorder
    from openwham.service.diffs import diff_stats
    from openwham.store import models as m
    from openwham.store.db import Database
    from openwham.store.events import LocalEventBus
    from openwham.wire.worklog import WorklogMessage

    db = Database(url)
    bus = LocalEventBus()
    try:
        for n, (task_id, turn_id) in enumerate(turns):
            with db.session() as s:
                s.execute(
                    update(m.Turn).where(m.Turn.id == turn_id).values(turn_status="in_progress")
                )
                row = s.get(m.Turn, turn_id)
                assert row is not None
                body = dict(row.body)
            rec = TurnRecorder(db, bus, task_id, turn_id, body)
            now = time.time()
            for i in range(12):
                rec.message(
                    WorklogMessage.model_validate(
                        {
                            "id": f"msg-{n}-{i}",
                            "author": {"role": "tool" if i % 2 else "assistant"},
                            "create_time": now,
                            "update_time": now,
                            "content": {
                                "content_type": "text",
                                "parts": [f"step {i}: ran `pytest -q tests/test_{i}.py`\n" * 8],
                            },
                        }
                    )
                )
            diff = _diff(n)
            stats = diff_stats(diff)
            answer = "I changed the functions to add one and the tests pass."
            rec.finish(
                "completed",
                text="Completed",
                output_items=[
                    {
                        "type": "message",
                        "role": "assistant",
                        "content": [{"content_type": "text", "text": answer}],
                    },
                    {
                        "type": "pr",
                        "pr_title": f"Task {n}",
                        "pr_message": answer,
                        "output_diff": {
                            "type": "output_diff",
                            "repo_id": "bench/repo",
                            "base_commit_sha": "0" * 40,
                            "preapply_patch_base_commit_sha": None,
                            "diff": diff,
                            "external_storage_diff": None,
                            "files_modified": stats.files_modified,
                            "lines_added": stats.lines_added,
                            "lines_removed": stats.lines_removed,
                            "commit_message": f"Task {n}",
                        },
                    },
                ],
            )
    finally:
        db.dispose()


# --------------------------------------------------------------------------- burst


BURST_CLIENTS = ("fresh", "keepalive", "httpx")


@dataclass
class Burst:
    concurrency: int
    client: str = "httpx"
    statuses: dict[int, int] = field(default_factory=dict)
    errors: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    retry_after_missing: int = 0
    healthz_ms: float | None = None
    healthz: dict[str, Any] | None = None
    after_ms: float | None = None
    after_status: int | None = None
    wall_s: float = 0.0
    client_cpu_ms: float = 0.0
    write_ms: float | None = None
    body_bytes: int | None = None
    server_cpu_ms: float | None = None


def burst(srv: h.WhamServer, paths: list[str], concurrency: int, client: str) -> Burst:
    """One burst of ``concurrency`` GETs of ``paths`` (in turn) by ``client``: ``fresh`` and
    ``keepalive`` are ``bench.rawburst``'s (raw sockets: a new connection per request, or
    connections opened and used once beforehand), ``httpx`` the asyncio + httpx client (a
    new connection per request; ~1 ms of the client's CPU per request)."""
    if client == "httpx":
        server0, cpu0 = server_cpu(srv.process.pid), time.thread_time()
        out = asyncio.run(_burst(srv, paths, concurrency))
        out.client_cpu_ms = (time.thread_time() - cpu0) * 1000
        out.server_cpu_ms = (server_cpu(srv.process.pid) - server0) * 1000  # with the GET after
        return out
    host, port = srv.url.removeprefix("http://").rsplit(":", 1)
    headers = {"Authorization": f"Bearer {srv.token}"}
    requests = [
        rawburst.request(paths[i % len(paths)], headers, host, close=False)
        for i in range(concurrency)
    ]
    raw = rawburst.burst(
        (host, int(port)),
        requests,
        keepalive=client == "keepalive",
        warm=rawburst.request("/healthz", {}, host, close=False),
        probe=rawburst.request("/healthz", {}, host, close=True),
        timeout=90,
        server_cpu=lambda: server_cpu(srv.process.pid),
    )
    out = Burst(concurrency, client)
    out.statuses, out.errors = raw.statuses, raw.errors
    out.latencies_ms, out.retry_after_missing = raw.latencies_ms, raw.retry_after_missing
    out.wall_s, out.client_cpu_ms, out.write_ms = raw.wall_s, raw.client_cpu_ms, raw.write_ms
    out.body_bytes, out.server_cpu_ms = raw.body_bytes, raw.server_cpu_ms
    out.healthz_ms = raw.probe_ms
    try:
        out.healthz = dict(json.loads(raw.probe_body)) if raw.probe_status else None
    except ValueError:
        out.healthz = {"error": f"{raw.probe_status}, not JSON"}
    t1 = time.perf_counter()
    r = srv.client.get(srv.url + paths[0])
    out.after_ms = (time.perf_counter() - t1) * 1000
    out.after_status = r.status_code
    return out


async def _burst(srv: h.WhamServer, paths: list[str], concurrency: int) -> Burst:
    out = Burst(concurrency)
    headers = {"Authorization": f"Bearer {srv.token}"}
    limits = httpx.Limits(max_connections=concurrency + 2, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=srv.url, limits=limits, timeout=90) as client:

        async def one(path: str) -> None:
            t0 = time.perf_counter()
            try:
                r = await client.get(path, headers=headers)
            except httpx.HTTPError:
                out.errors += 1
                return
            out.latencies_ms.append((time.perf_counter() - t0) * 1000)
            out.statuses[r.status_code] = out.statuses.get(r.status_code, 0) + 1
            if r.status_code == 503 and "retry-after" not in r.headers:
                out.retry_after_missing += 1

        async def health() -> None:
            await asyncio.sleep(0.05)
            t0 = time.perf_counter()
            try:
                r = await client.get("/healthz")
                out.healthz = dict(r.json())
            except (httpx.HTTPError, ValueError):
                out.healthz = {"error": "no answer"}
            out.healthz_ms = (time.perf_counter() - t0) * 1000

        t0 = time.perf_counter()
        await asyncio.gather(*(one(paths[i % len(paths)]) for i in range(concurrency)), health())
        out.wall_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        r = await client.get(paths[0], headers=headers)
        out.after_ms = (time.perf_counter() - t1) * 1000
        out.after_status = r.status_code
    return out


# --------------------------------------------------------------------------- wrk


def wrk(url: str, token: str, paths: list[str], connections: int, seconds: float) -> dict[str, Any]:
    """One ``wrk`` run over ``paths``; its figures (see load.lua)."""
    binary = shutil.which("wrk")
    if binary is None:
        raise SystemExit("wrk is not installed: run scripts/setup.sh --with-postgres")
    with tempfile.NamedTemporaryFile("w", suffix=".paths") as f:
        f.write("\n".join(paths) + "\n")
        f.flush()
        argv = [
            binary,
            "-t1",
            f"-c{connections}",
            f"-d{max(1, round(seconds))}s",
            "--timeout",
            "30s",
            "-s",
            str(LUA),
            "-H",
            f"Authorization: Bearer {token}",
            url,
        ]
        done = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            env={**os.environ, "BENCH_PATHS": f.name},
            timeout=seconds + 60,
            check=False,
        )
    for line in done.stdout.splitlines():
        if line.startswith("BENCH_JSON "):
            data: dict[str, Any] = json.loads(line.split(" ", 1)[1])
            data["rps"] = data["requests"] / (data["duration_us"] / 1e6)
            return data
    raise RuntimeError(f"wrk printed no result: {done.stdout}\n{done.stderr}")


# --------------------------------------------------------------------------- one database


def load() -> float:
    return os.getloadavg()[0]


def percentile(values: list[float], p: float) -> float:
    """Nearest rank, as ``bench.__main__.pct``."""
    s = sorted(values)
    return s[max(0, math.ceil(p / 100 * len(s)) - 1)]


def server_pids(pid: int) -> list[int]:
    """The server and its extra API processes (``--processes``: its children)."""
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            children += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return [pid, *children]


def server_cpu(pid: int) -> float:
    return sum(cpu_seconds(p) for p in server_pids(pid))


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process so far, all its threads (``/proc/PID/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Seeded:
    """A database seeded once, served by each tree in turn."""

    data_dir: Path
    token: str
    details: list[str]
    listing: list[str]


def start_server(
    kind: str,
    url: str | None,
    args: argparse.Namespace,
    work: Path,
    tree: Path | None,
    n: int,
    processes: int = 1,
) -> h.WhamServer:
    env = {"WHAM_EXECUTOR": "none", **({"WHAM_DATABASE_URL": url} if url else {})}
    extra: tuple[str, ...] = ()
    if processes > 1:  # API-only under the queue executor, as --processes needs
        env.update({"WHAM_EXECUTOR": "queue", "WHAM_EXECUTOR_CONCURRENCY": "0"})
        extra = ("--processes", str(processes))
    env.update(dict(kv.split("=", 1) for kv in args.env))
    module = args.server_module
    if tree is not None:  # that tree's openwham, on the same interpreter and packages
        env["PYTHONPATH"] = str(tree / "src")
        module = module or "bench.wham"
    srv = h.WhamServer.start(
        work / f"data-{kind}",
        "http://127.0.0.1:9",
        log_path=work / f"serve-{kind}-{n}.log",
        module=module,
        extra_env=env,
        extra_args=extra,
    )
    deadline = time.monotonic() + 60
    while len(server_pids(srv.process.pid)) < processes and time.monotonic() < deadline:
        time.sleep(0.1)
    if processes > 1:
        time.sleep(3)  # the extra processes import and open the store before they accept
    return srv


def run_database(
    kind: str, url: str | None, args: argparse.Namespace, work: Path
) -> list[dict[str, Any]]:
    """Seed, then every round of every tree (or one run of this tree); one result each."""
    trees: list[Path | None] = list(args.tree) or [None]
    counts = args.processes if kind == "postgres" else [1]
    variants = [(tree, n) for tree in trees for n in counts]
    seeded = None
    results = []
    for r in range(args.rounds):
        for tree, processes in variants:
            srv = start_server(kind, url, args, work, tree, len(results), processes)
            try:
                if seeded is None:
                    seeded = seed(kind, url, args, work, srv)
                srv.token = seeded.token
                srv.client.headers["Authorization"] = f"Bearer {seeded.token}"
                result = measure(kind, args, srv, seeded, processes)
            finally:
                srv.stop()
            result["tree"] = str(tree) if tree is not None else ""
            if len(counts) > 1:
                result["tree"] += f" x{processes}"
            result["round"] = r + 1
            results.append(result)
            report(result, args)
    return results


def seed(
    kind: str, url: str | None, args: argparse.Namespace, work: Path, srv: h.WhamServer
) -> Seeded:
    repo = generate(work / f"repo-{kind}", files=3)
    data_dir = work / f"data-{kind}"
    if url:  # the harness made its token without WHAM_DATABASE_URL: in SQLite
        out = subprocess.run(
            [str(h.WHAM), "token", "create", "--data-dir", str(data_dir)],
            check=True,
            capture_output=True,
            text=True,
            env={**os.environ, "WHAM_DATABASE_URL": url},
        )
        srv.token = out.stdout.strip()
        srv.client.headers["Authorization"] = f"Bearer {srv.token}"
    env_id = srv.create_env(repo)
    log(f"[{kind}] seeding {args.tasks} finished tasks")
    turns = [srv.create_task(env_id, f"load task {i}") for i in range(args.tasks)]
    finish_tasks(url or f"sqlite:///{data_dir / 'openwham.db'}", turns)
    details = [f"{h.PREFIX}/tasks/{task_id}" for task_id, _ in turns]
    listing = [f"{h.PREFIX}/tasks/list?limit=100"]
    return Seeded(data_dir, srv.token, details, listing)


def measure(
    kind: str, args: argparse.Namespace, srv: h.WhamServer, seeded: Seeded, processes: int = 1
) -> dict[str, Any]:
    details, listing = seeded.details, seeded.listing
    result: dict[str, Any] = {"database": kind}
    result["bytes"] = {
        "details": len(srv.client.get(srv.url + details[0]).content),
        "list": len(srv.client.get(srv.url + listing[0]).content),
    }
    burst_n = args.burst or (64 if kind == "sqlite" else 128)
    if not args.burst_cold:  # each task's details answered once before, as a server in use has
        for path in details[:burst_n]:
            srv.client.get(srv.url + path).raise_for_status()
        # Each process keeps its own render cache and the kernel picks the process that
        # accepts a connection: untimed bursts on new connections reach every process.
        for _ in range(2 * processes if processes > 1 else 0):
            burst(srv, details, burst_n, "fresh")
    result["bursts"] = []
    for client in args.burst_client:
        log(f"[{kind}] burst of {burst_n} concurrent GETs ({client} client)")
        result["bursts"].append({**vars(burst(srv, details, burst_n, client)), "load": load()})
        time.sleep(0.5)
    for name, paths in (("details", details), ("list", listing)):
        for c in args.connections:
            log(f"[{kind}] wrk {name} at {c} connection(s), {args.seconds:g} s")
            cpu0 = server_cpu(srv.process.pid)
            run = wrk(srv.url, srv.token, paths, c, args.seconds)
            run["cpu_ms"] = (server_cpu(srv.process.pid) - cpu0) * 1000 / run["requests"]
            run["load"] = load()
            result[f"{name}@{c}"] = run
    t0 = time.perf_counter()
    try:  # a server that stalled under the last run may not answer at all
        ok = srv.client.get(srv.url + details[0], timeout=60)
        result["after_status"] = ok.status_code
    except httpx.HTTPError as exc:
        result["after_status"] = f"no answer ({type(exc).__name__})"
    result["after_ms"] = (time.perf_counter() - t0) * 1000
    return result


def report(result: dict[str, Any], args: argparse.Namespace) -> None:
    kind = result["database"]
    tree = f" [{result['tree']} round {result['round']}]" if result.get("tree") else ""
    print(
        f"\n== {kind}{tree}: {args.tasks} finished tasks; details {result['bytes']['details']} B, "
        f"list?limit=100 {result['bytes']['list']} B"
    )
    for b in result["bursts"]:
        report_burst(kind, b)
    if args.connections:
        print_wrk_header()
    for name in ("details", "list"):
        for c in args.connections:
            r = result[f"{name}@{c}"]
            bad = r["status_errors"] + r["read_errors"] + r["timeouts"] + r["connect_errors"]
            vs = ""
            if c == 32:
                rps_t, p99_t = TARGETS[name]
                vs = (
                    f"  rps/{rps_t:.0f} = {r['rps'] / rps_t:.2f}, "
                    f"p99/{p99_t:.0f} ms = {r['p99_us'] / 1000 / p99_t:.2f}"
                )
            print(
                f"{name:<8} {c:>5} {r['rps']:>7.0f} {r['min_us'] / 1000:>6.1f} "
                f"{r['p50_us'] / 1000:>6.1f} {r['p90_us'] / 1000:>6.1f} "
                f"{r['p99_us'] / 1000:>7.1f} {r['max_us'] / 1000:>7.1f} {bad:>7} "
                f"{r['cpu_ms']:>6.2f}{vs}"
            )
    print(
        f"GET after the wrk runs: {result['after_status']} in {result['after_ms']:.0f} ms",
        flush=True,
    )


def print_wrk_header() -> None:
    print(
        f"{'wrk':<8} {'conns':>5} {'rps':>7} {'min':>6} {'p50':>6} {'p90':>6} {'p99':>7} "
        f"{'max':>7} {'non-2xx':>7} {'cpu ms':>6}  vs target (32 connections)"
    )


def report_burst(kind: str, b: dict[str, Any]) -> None:
    lat = b["latencies_ms"]
    served = b["statuses"].get(200, 0)
    refused = b["statuses"].get(503, 0)
    other = sum(v for k, v in b["statuses"].items() if k not in (200, 503)) + b["errors"]
    written = f", written in {b['write_ms']:.1f} ms" if b["write_ms"] is not None else ""
    cpu = b["server_cpu_ms"]
    server = f", server CPU {cpu:.0f} ms (clock ticks of 10 ms)" if cpu is not None else ""
    print(
        f"burst of {b['concurrency']} concurrent GETs ({b['client']} client): {served} served, "
        f"{refused} refused (503), {other} other/errors, {b['retry_after_missing']} 503 without "
        f"Retry-After; all answered in {b['wall_s'] * 1000:.0f} ms{written}; "
        f"client CPU {b['client_cpu_ms']:.1f} ms{server}; load average {b['load']:.1f}"
    )
    if lat:
        target = BURST_TARGET_P99_MS[kind]
        p99 = percentile(lat, 99)
        print(
            f"  latency ms min/p50/p99/max {min(lat):.1f} / {statistics.median(lat):.1f} / "
            f"{p99:.1f} / {max(lat):.1f}   p99 / target {target:.0f} ms = {p99 / target:.2f}"
        )
    health = "no answer" if b["healthz_ms"] is None else f"{b['healthz_ms']:.1f} ms"
    print(f"  /healthz during it: {health} {json.dumps(b['healthz'])}")
    print(f"  next GET after it: {b['after_status']} in {b['after_ms']:.1f} ms")


def _mmm(values: list[float]) -> str:
    """``min/median/max`` of ``values`` (one decimal)."""
    return f"{min(values):.1f}/{statistics.median(values):.1f}/{max(values):.1f}"


def _by_server(results: list[dict[str, Any]]) -> list[tuple[str, str, list[dict[str, Any]]]]:
    """The rounds of each (database, tree), databases in order."""
    keys = sorted({(r["database"], r["tree"]) for r in results}, key=lambda k: k[0])
    return [
        (kind, tree, [r for r in results if (r["database"], r["tree"]) == (kind, tree)])
        for kind, tree in keys
    ]


def burst_summary(results: list[dict[str, Any]]) -> None:
    """Min / median / max over the rounds of each burst's p50, p99 and the client's CPU."""
    print(
        f"{'db':<8} {'tree':<24} {'burst':<14} {'p50 ms':>17} {'p99 ms':>17} {'max ms':>17} "
        f"{'client cpu ms':>17} {'server cpu ms':>17}"
    )
    for kind, tree, runs in _by_server(results):
        for client in dict.fromkeys(b["client"] for r in runs for b in r["bursts"]):
            bursts = [b for r in runs for b in r["bursts"] if b["client"] == client]
            cols = []
            for f in (
                lambda b: statistics.median(b["latencies_ms"]),
                lambda b: percentile(b["latencies_ms"], 99),
                lambda b: max(b["latencies_ms"]),
                lambda b: b["client_cpu_ms"],
                lambda b: b["server_cpu_ms"],
            ):
                v = [f(b) for b in bursts if b["latencies_ms"] and f(b) is not None]
                cols.append(_mmm(v) if v else "-")
            name = f"{bursts[0]['concurrency']} {client}"
            print(
                f"{kind:<8} {tree[-24:]:<24} {name:<14} {cols[0]:>17} {cols[1]:>17} {cols[2]:>17} "
                f"{cols[3]:>17} {cols[4]:>17}"
            )


def summary(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    """Min / median / max over the rounds, per database, tree and wrk run."""
    print(f"\n== over {args.rounds} round(s), min / median / max")
    burst_summary(results)
    if args.connections:
        print(
            f"{'db':<8} {'tree':<24} {'wrk':<8} {'conns':>5} {'rps':>17} {'p99 ms':>19} "
            f"{'cpu ms':>17}"
        )
    for kind, tree, runs in _by_server(results):
        for name in ("details", "list"):
            for c in args.connections:
                cols = []
                for field_, scale in (("rps", 1.0), ("p99_us", 1000.0), ("cpu_ms", 1.0)):
                    v = [r[f"{name}@{c}"][field_] / scale for r in runs]
                    cols.append(_mmm(v))
                print(
                    f"{kind:<8} {tree[-24:]:<24} {name:<8} {c:>5} {cols[0]:>17} {cols[1]:>19} "
                    f"{cols[2]:>17}"
                )
    loads = [
        r[f"{n}@{c}"]["load"]
        for r in results
        for n in ("details", "list")
        for c in args.connections
    ]
    bursts = [b["load"] for r in results for b in r["bursts"]]
    print(f"load average at the bursts: {min(bursts):.1f}-{max(bursts):.1f}", flush=True)
    if loads:
        print(f"load average during the wrk runs: {min(loads):.1f}-{max(loads):.1f}", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__.split("\n")[0])
    p.add_argument("--db", choices=("sqlite", "postgres", "both"), default="both")
    p.add_argument(
        "--postgres-url",
        default=os.environ.get("WHAM_TEST_POSTGRES_URL"),
        help="an admin URL of a PostgreSQL cluster (./bench/load starts a throwaway one)",
    )
    p.add_argument("--tasks", type=int, default=200, help="finished tasks to seed (200)")
    p.add_argument("--seconds", type=float, default=5.0, help="length of each wrk run (5)")
    p.add_argument(
        "--connections",
        type=lambda s: [int(x) for x in s.split(",") if x],
        default=[1, 32, 128],
        help="wrk connection counts (1,32,128; '' for the bursts only)",
    )
    p.add_argument("--burst", type=int, default=0, help="burst size (64 SQLite, 128 PostgreSQL)")
    p.add_argument(
        "--burst-client",
        default="fresh,keepalive",
        help="comma-separated burst clients, run in turn: fresh (raw sockets, a new connection "
        "per request), keepalive (raw sockets, connections opened and used beforehand), httpx "
        "(asyncio + httpx, a new connection per request; the old client) (fresh,keepalive)",
    )
    p.add_argument(
        "--burst-cold",
        action="store_true",
        help="no warm-up: the first burst finds the render cache empty (a server just started)",
    )
    p.add_argument("--env", action="append", default=[], help="extra KEY=VALUE for wham serve")
    p.add_argument("--server-module", default=None, help="python -m MODULE serve instead of wham")
    p.add_argument("--json", type=Path, default=None, help="also write every figure here")
    p.add_argument(
        "--tree", action="append", type=Path, default=[], help="serve DIR/src (repeatable)"
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="rounds (of the trees or --processes, interleaved: 3; else 1)",
    )
    p.add_argument(
        "--processes",
        default="1",
        help="comma-separated `wham serve --processes` counts to compare, PostgreSQL (1)",
    )
    args = p.parse_args(argv)
    args.processes = [int(n) for n in str(args.processes).split(",")]
    args.burst_client = [c for c in args.burst_client.split(",") if c]
    if not set(args.burst_client) <= set(BURST_CLIENTS):
        p.error(f"--burst-client: one or more of {', '.join(BURST_CLIENTS)}")
    args.tree = [t.resolve() for t in args.tree]
    if args.rounds is None:
        args.rounds = 3 if args.tree or len(args.processes) > 1 else 1
    if args.db in ("postgres", "both") and not args.postgres_url:
        p.error("PostgreSQL needs --postgres-url or WHAM_TEST_POSTGRES_URL (use ./bench/load)")
    log(f"load average: {os.getloadavg()[0]:.2f} ({os.cpu_count()} cores)")
    results = []
    with tempfile.TemporaryDirectory(prefix="wham-load-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        if args.db in ("sqlite", "both"):
            results += run_database("sqlite", None, args, work)
        if args.db in ("postgres", "both"):
            with postgres_database(args.postgres_url) as url:
                results += run_database("postgres", url, args, work)
    if args.rounds > 1:
        summary(results, args)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
