"""``python -m bench.listdiff``: ``tasks/list`` throughput when tasks carry big diffs.

Seeds a fresh SQLite data directory with ``--tasks`` finished tasks, every ``--big-every``-th
with a diff of ``--big-mb`` MB (the others 2 KB), serves the API with uvicorn in a child
process on 127.0.0.1 (no executor: nothing runs), then ``--connections`` bounded asyncio
clients call ``GET tasks/list?limit=100`` for ``--seconds`` and print requests per second,
min/median/p99/max latency and the response size. Loopback only; no sandbox or model needed.

The same numbers with ``--big-every 0`` (no big diffs) give the ratio that matters: a list's
cost must not depend on the size of the diffs of the tasks on it.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import socket
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from openwham import ids
from openwham.config import Settings
from openwham.server.state import AppState
from openwham.service.accounts import create_api_token, ensure_owner
from openwham.store import models as m


def big_diff(size: int, name: str = "big.txt") -> str:
    """A unified diff adding one file of about ``size`` bytes."""
    line = "+" + "x" * 99 + "\n"
    count = max(1, size // len(line))
    head = f"diff --git a/{name} b/{name}\nnew file mode 100644\n--- /dev/null\n+++ b/{name}\n"
    return head + f"@@ -0,0 +1,{count} @@\n" + line * count


def seed(data_dir: Path, tasks: int, big_every: int, big_bytes: int) -> str:
    """Finished tasks written straight into the store; returns the owner's token."""
    state = AppState.open(Settings(data_dir=data_dir, executor="none"))
    db = state.db
    with db.session() as s:
        account, user = ensure_owner(s)
        _, token = create_api_token(s, state.signing_key, user, account, ttl_seconds=3600)
        now = time.time()
        for i in range(tasks):
            task_id = ids.new_task_id()
            user_turn = ids.new_user_turn_id(task_id)
            attempt = ids.new_assistant_turn_id(task_id)
            size = big_bytes if big_every and i % big_every == 0 else 2048
            diff = big_diff(size)
            s.add(
                m.Task(
                    id=task_id,
                    account_id=account.id,
                    user_id=user.id,
                    title=f"task {i}",
                    current_user_turn_id=user_turn,
                    current_turn_id=attempt,
                    created_at=now + i,
                    updated_at=now + i,
                )
            )
            s.add(
                m.Turn(id=user_turn, task_id=task_id, role="user", created_at=now, updated_at=now)
            )
            s.add(
                m.Turn(
                    id=attempt,
                    task_id=task_id,
                    role="assistant",
                    parent_id=user_turn,
                    attempt_placement=0,
                    turn_status="completed",
                    body={
                        "output_items": [
                            {
                                "type": "pr",
                                "pr_title": "t",
                                "pr_message": "m",
                                "output_diff": {
                                    "type": "output_diff",
                                    "diff": diff,
                                    "files_modified": 1,
                                    "lines_added": diff.count("\n+") - 1,
                                    "lines_removed": 0,
                                },
                            }
                        ]
                    },
                    created_at=now + i,
                    updated_at=now + i,
                )
            )
            if i % 20 == 19:
                s.commit()
    db.dispose()
    return token


def serve(data_dir: Path, sock: socket.socket) -> None:
    import uvicorn

    from openwham.server.app import create_app

    app = create_app(Settings(data_dir=data_dir, executor="none"))
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])


async def load(
    url: str, token: str, connections: int, seconds: float
) -> tuple[list[float], int, int]:
    """Latencies (ms) of every answered request, the bytes of one answer, and the errors."""
    latencies: list[float] = []
    errors = 0
    size = 0
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=60) as c:
        end = time.monotonic() + seconds

        async def worker() -> None:
            nonlocal errors, size
            while time.monotonic() < end:
                t0 = time.perf_counter()
                r = await c.get("/backend-api/wham/tasks/list", params={"limit": 100})
                if r.status_code != 200:
                    errors += 1
                    continue
                latencies.append((time.perf_counter() - t0) * 1000)
                size = len(r.content)

        await asyncio.gather(*(worker() for _ in range(connections)))
    return latencies, size, errors


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", type=int, default=100)
    p.add_argument("--big-every", type=int, default=10, help="every Nth task has a big diff")
    p.add_argument("--big-mb", type=float, default=4.0)
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--seconds", type=float, default=10.0)
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="wham-listdiff-") as tmp:
        data_dir = Path(tmp) / "data"
        token = seed(data_dir, a.tasks, a.big_every, int(a.big_mb * 1_000_000))
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        proc = multiprocessing.get_context("spawn").Process(
            target=serve, args=(data_dir, sock), daemon=True
        )
        proc.start()
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    httpx.get(f"{url}/healthz", timeout=1)
                    break
                except httpx.TransportError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
            asyncio.run(load(url, token, 2, 1.0))  # warm-up
            lat, size, errors = asyncio.run(load(url, token, a.connections, a.seconds))
        finally:
            proc.terminate()
            proc.join(5)
    lat.sort()
    p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else float("nan")
    stats: dict[str, Any] = {
        "tasks": a.tasks,
        "big diffs": (a.tasks + a.big_every - 1) // a.big_every if a.big_every else 0,
        "big MB": a.big_mb,
        "connections": a.connections,
        "rps": round(len(lat) / a.seconds, 1),
        "ms min/median/p99/max": (
            f"{lat[0]:.0f}/{statistics.median(lat):.0f}/{p99:.0f}/{lat[-1]:.0f}" if lat else "-"
        ),
        "answer bytes": size,
        "errors": errors,
    }
    print("  ".join(f"{k}: {v}" for k, v in stats.items()))


if __name__ == "__main__":
    main()
