"""``python -m bench.eventlat`` (or ``./bench/eventlat``): event latency across nodes.

A worker's recorder in one process, a client streaming from an API node in another (issue
17): on a throwaway PostgreSQL database,

1. a real ``wham serve`` (``WHAM_EXECUTOR=none``: the API node, it runs no attempts) on
   ``WHAM_DATABASE_URL``; one environment (a small local repository);
2. per run: ``POST tasks`` (the attempt stays pending), ``--clients`` streams of its turn
   opened on the API node (raw asyncio sockets, ``bench.fanout.Stream``), then a recorder
   process (``python -m bench.eventlat recorder …``: the engine's own ``TurnRecorder`` on
   the bus a worker gets, ``store.pgbus.event_bus``) claims the attempt and writes
   ``--events`` work-log messages ``--interval`` apart, then the terminal event;
3. each client records, per event, its arrival (``time.time()``) against the event's own
   ``timestamp`` (the recorder's ``time.time()`` when it appended the row; same host, same
   clock): commit, NOTIFY, the API node's listener, its turn tail's read and the SSE write.

Prints per run p50 / p99 / max, then over the runs min / median / max of p50 and p99 and the
pooled p50 / p99 against the target (p99 <= 100 ms), and whether every stream got every
event once and in order. Loopback only; bounded by ``--timeout`` per run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from . import harness as h
from .fanout import Stream, _small_repo, pct
from .load import postgres_database

TARGET_P99_MS = 100.0


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- the recorder


def recorder(url: str, task_id: str, turn_id: str, count: int, interval: float) -> None:
    """The worker side: claim the attempt, record ``count`` messages, finish it."""
    from openwham.engine.recorder import TurnRecorder
    from openwham.store import models as m
    from openwham.store import turnstate
    from openwham.store.db import Database
    from openwham.store.pgbus import event_bus
    from openwham.wire.worklog import WorklogMessage

    db = Database(url)
    bus = event_bus(db)
    try:
        with db.session() as s:
            row = s.get(m.Turn, turn_id)
            assert row is not None
            body = dict(row.body)
            assert turnstate.claim(s, turn_id, body=body, run="bench")
        bus.publish(turn_id)  # a worker's bus is connected long before: connect it now
        time.sleep(0.3)
        rec = TurnRecorder(db, bus, task_id, turn_id, body)
        for i in range(count):
            now = time.time()
            rec.message(
                WorklogMessage.model_validate(
                    {
                        "id": f"msg-{i}",
                        "author": {"role": "tool" if i % 2 else "assistant"},
                        "create_time": now,
                        "update_time": now,
                        "content": {"content_type": "text", "parts": [f"step {i}\n" * 4]},
                    }
                )
            )
            time.sleep(interval)
        rec.finish("completed", text="Completed", output_items=[])
    finally:
        bus.close()
        db.dispose()


# --------------------------------------------------------------------------- one run


async def _follow(server: h.WhamServer, task_id: str, turn_id: str, args: Any) -> list[Stream]:
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    path = f"{h.PREFIX}/tasks/{task_id}/turns/{turn_id}/stream"
    streams = [Stream(host, int(port), path, server.token) for _ in range(args.clients)]
    conns = [await s.connect() for s in streams]
    followers = [
        asyncio.ensure_future(s.follow(r, w)) for s, (r, w) in zip(streams, conns, strict=True)
    ]
    await asyncio.sleep(0.2)  # the turn's tail is open: the stream answered
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.eventlat",
        "recorder",
        args.url,
        task_id,
        turn_id,
        str(args.events),
        str(args.interval),
        cwd=h.ROOT,
    )
    await asyncio.wait_for(asyncio.gather(*followers), args.timeout)
    if await proc.wait() != 0:
        raise RuntimeError("the recorder process failed")
    return streams


def one(server: h.WhamServer, env_id: str, run: int, args: Any) -> dict[str, Any]:
    task_id, turn_id = server.create_task(env_id, f"event latency run {run}")
    streams = asyncio.run(_follow(server, task_id, turn_id, args))
    expected = args.events + 1  # the messages and the terminal event
    complete = all(
        len(s.ids) == expected and s.ids == sorted(set(s.ids)) and not s.reconnects for s in streams
    )
    latencies = [lat for s in streams for lat in s.latencies]
    return {"latencies": latencies, "complete": complete}


def ms(value: float) -> str:
    return f"{value * 1000:.1f}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["recorder"]:
        url, task_id, turn_id, count, interval = argv[1:6]
        recorder(url, task_id, turn_id, int(count), float(interval))
        return 0
    p = argparse.ArgumentParser(prog="python -m bench.eventlat", description=__doc__.split("\n")[0])
    p.add_argument(
        "--postgres-url",
        default=os.environ.get("WHAM_TEST_POSTGRES_URL"),
        help="an admin URL of a PostgreSQL cluster (./bench/eventlat starts a throwaway one)",
    )
    p.add_argument("--runs", type=int, default=5, help="runs (5)")
    p.add_argument("--events", type=int, default=200, help="events per run (200)")
    p.add_argument("--interval", type=float, default=0.02, help="seconds between events (0.02)")
    p.add_argument("--clients", type=int, default=1, help="streams of the turn (1)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per run at most (120)")
    args = p.parse_args(argv)
    if not args.postgres_url:
        p.error("needs --postgres-url or WHAM_TEST_POSTGRES_URL (use ./bench/eventlat)")
    log(f"load average: {os.getloadavg()[0]:.2f} ({os.cpu_count()} cores)")
    runs: list[dict[str, Any]] = []
    with (
        tempfile.TemporaryDirectory(prefix="wham-eventlat-", dir="/var/tmp") as tmp,
        postgres_database(args.postgres_url) as url,
    ):
        args.url = url
        work = Path(tmp)
        server = h.WhamServer.start(
            work / "api",
            "http://127.0.0.1:9/v1",  # runs no attempts: no model needed
            log_path=work / "api.log",
            extra_env={"WHAM_DATABASE_URL": url, "WHAM_EXECUTOR": "none"},
        )
        try:
            env_id = server.create_env(_small_repo(work / "repo"))
            for run in range(args.runs):
                result = one(server, env_id, run, args)
                lat = result["latencies"]
                log(
                    f"run {run + 1}: {len(lat)} events, p50 {ms(pct(lat, 50))} ms, "
                    f"p99 {ms(pct(lat, 99))} ms, max {ms(max(lat))} ms, "
                    f"complete {result['complete']}"
                )
                runs.append(result)
        finally:
            server.stop()
    p50s = [pct(r["latencies"], 50) for r in runs]
    p99s = [pct(r["latencies"], 99) for r in runs]
    pooled = [lat for r in runs for lat in r["latencies"]]
    print(
        f"event latency, recorder process -> PostgreSQL NOTIFY -> API node -> SSE client "
        f"({args.runs} runs x {args.events} events, {args.clients} client(s), "
        f"{args.interval * 1000:.0f} ms apart)"
    )
    print(
        "  p50 over runs (min / median / max): "
        + " / ".join(ms(v) for v in (min(p50s), statistics.median(p50s), max(p50s)))
        + " ms"
    )
    print(
        "  p99 over runs (min / median / max): "
        + " / ".join(ms(v) for v in (min(p99s), statistics.median(p99s), max(p99s)))
        + " ms"
    )
    p99 = pct(pooled, 99)
    print(
        f"  pooled: p50 {ms(pct(pooled, 50))} ms, p99 {ms(p99)} ms, max {ms(max(pooled))} ms; "
        f"target p99 <= {TARGET_P99_MS:.0f} ms: {p99 * 1000 / TARGET_P99_MS:.2f} of it "
        f"({'met' if p99 * 1000 <= TARGET_P99_MS else 'NOT met'})"
    )
    print(f"  every stream got every event once, in order: {all(r['complete'] for r in runs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
