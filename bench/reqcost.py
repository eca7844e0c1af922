"""``python -m bench.reqcost``: what one API request costs the server, without sockets.

Seeds a SQLite data directory with finished tasks (``bench.load``'s recorder-written tasks),
then, in child processes, drives the whole ASGI app in-process (no HTTP client, no socket:
the app is called with a scope and collects its answer) with sequential ``GET tasks/{id}``
and ``GET tasks/list?limit=100``, and prints the wall and CPU time per request. With
``--tree DIR`` (repeatable) each child runs the ``src`` of that tree (``PYTHONPATH``), the
rounds interleaved so every tree sees the same machine load: before/after in one run.
``--profile`` prints cProfile's top functions for the current tree instead.

    .venv/bin/python -m bench.reqcost [--tasks 200] [--requests 300] [--rounds 5]
        [--tree /work/main --tree .] [--profile details|list]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import os
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from . import harness as h
from .load import finish_tasks
from .repo import generate

ROOT = Path(__file__).resolve().parents[1]


def seed(work: Path, tasks: int) -> tuple[Path, str, list[str]]:
    """A data dir with ``tasks`` finished tasks; its token and the details paths."""
    data_dir = work / "data"
    repo = generate(work / "repo", files=3)
    srv = h.WhamServer.start(
        data_dir,
        "http://127.0.0.1:9",
        log_path=work / "serve.log",
        extra_env={"WHAM_EXECUTOR": "none"},
    )
    try:
        env_id = srv.create_env(repo)
        turns = [srv.create_task(env_id, f"cost task {i}") for i in range(tasks)]
        token = srv.token
    finally:
        srv.stop()
    finish_tasks(f"sqlite:///{data_dir / 'openwham.db'}", turns)
    return data_dir, token, [f"{h.PREFIX}/tasks/{t}" for t, _ in turns]


async def _call(app: Any, path: str, token: str) -> tuple[int, int]:
    """One GET through the ASGI app; (status, body bytes)."""
    raw_path, _, query = path.partition("?")
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": raw_path,
        "raw_path": raw_path.encode(),
        "query_string": query.encode(),
        "root_path": "",
        "headers": [(b"host", b"bench"), (b"authorization", f"Bearer {token}".encode())],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            await asyncio.sleep(3600)
        sent = True
        return {"type": "http.request", "body": b"", "more_body": False}

    status = 0
    size = 0

    async def send(message: dict[str, Any]) -> None:
        nonlocal status, size
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            size += len(message.get("body", b""))

    await app(scope, receive, send)
    return status, size


def child(data_dir: Path, token: str, paths: dict[str, list[str]], n: int, profile: str) -> None:
    """Runs in the tree under test: per-request wall and CPU ms for each kind, as JSON."""
    os.environ["WHAM_EXECUTOR"] = "none"
    os.environ["WHAM_DATA_DIR"] = str(data_dir)
    from openwham.config import Settings
    from openwham.server.app import create_app

    app = create_app(Settings())
    out: dict[str, Any] = {}

    async def run() -> None:
        for kind, todo in paths.items():
            for p in todo[:20]:  # warm up
                await _call(app, p, token)
            prof = cProfile.Profile() if profile == kind else None
            wall0, cpu0 = time.perf_counter(), time.process_time()
            if prof:
                prof.enable()
            size = 0
            for i in range(n):
                status, size = await _call(app, todo[i % len(todo)], token)
                if status != 200:
                    raise SystemExit(f"{kind}: status {status}")
            if prof:
                prof.disable()
                stats = pstats.Stats(prof, stream=sys.stderr)
                stats.sort_stats("cumulative").print_stats(45)
                stats.sort_stats("tottime").print_stats(30)
            wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
            out[kind] = {"wall_ms": wall / n * 1000, "cpu_ms": cpu / n * 1000, "bytes": size}

    asyncio.run(run())
    print("REQCOST " + json.dumps(out), flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.reqcost", description=__doc__.split("\n")[0])
    p.add_argument("--tasks", type=int, default=200)
    p.add_argument("--requests", type=int, default=300, help="per kind and round (300)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--tree", action="append", type=Path, default=[], help="source trees")
    p.add_argument("--profile", choices=("details", "list"), default="")
    p.add_argument("--spec-out", type=Path, default=None, help="seed into a kept dir, write spec")
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        spec = json.loads(Path(args.child[1:]).read_text() if args.child[0] == "@" else args.child)
        child(Path(spec["data"]), spec["token"], spec["paths"], spec["n"], args.profile)
        return 0
    if args.spec_out:  # for profilers: python -m bench.reqcost --child @SPEC
        work = Path(tempfile.mkdtemp(prefix="wham-reqcost-", dir="/var/tmp"))
        data_dir, token, details = seed(work, args.tasks)
        paths = {"details": details, "list": [f"{h.PREFIX}/tasks/list?limit=100"]}
        spec0 = {"data": str(data_dir), "token": token, "paths": paths, "n": args.requests}
        args.spec_out.write_text(json.dumps(spec0))
        return 0
    trees = [t.resolve() for t in args.tree] or [ROOT]
    print(f"load average {os.getloadavg()[0]:.2f}", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="wham-reqcost-", dir="/var/tmp") as tmp:
        data_dir, token, details = seed(Path(tmp), args.tasks)
        spec = {
            "data": str(data_dir),
            "token": token,
            "paths": {"details": details, "list": [f"{h.PREFIX}/tasks/list?limit=100"]},
            "n": args.requests,
        }
        results: dict[Path, list[dict[str, Any]]] = {t: [] for t in trees}
        for r in range(1 if args.profile else args.rounds):
            for tree in trees:
                env = {**os.environ, "PYTHONPATH": str(tree / "src")}
                env = {k: v for k, v in env.items() if not k.startswith("WHAM_")}
                argv2 = [sys.executable, "-m", "bench.reqcost", "--child", json.dumps(spec)]
                if args.profile:
                    argv2 += ["--profile", args.profile]
                done = subprocess.run(
                    argv2, cwd=ROOT, env=env, capture_output=True, text=True, check=False
                )
                if args.profile:
                    print(done.stderr[-30000:])
                line = next((x for x in done.stdout.splitlines() if x.startswith("REQCOST ")), None)
                if line is None:
                    raise SystemExit(f"{tree}: no result\n{done.stdout}\n{done.stderr[-3000:]}")
                results[tree].append(json.loads(line.split(" ", 1)[1]))
                print(f"round {r + 1} {tree}: {line}", file=sys.stderr)
    print(f"{'tree':<28} {'kind':<8} {'wall ms min/med/max':>22} {'cpu ms min/med/max':>22} bytes")
    for tree, rounds in results.items():
        for kind in ("details", "list"):
            w = [x[kind]["wall_ms"] for x in rounds]
            c = [x[kind]["cpu_ms"] for x in rounds]
            print(
                f"{str(tree)[-28:]:<28} {kind:<8} "
                f"{min(w):6.2f} /{statistics.median(w):6.2f} /{max(w):6.2f} "
                f"{min(c):6.2f} /{statistics.median(c):6.2f} /{max(c):6.2f} "
                f"{rounds[0][kind]['bytes']}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
