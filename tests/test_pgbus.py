"""The event bus across processes (store/pgbus.py): PostgreSQL LISTEN/NOTIFY.

Another process is a real one (``tests/support/remote_writer.py``: appends events and
publishes them as a worker's recorder does). The streams' poll interval is raised far above
the tests' waits, so an event can only arrive through the bus.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import psycopg
import pytest

from conftest import Server, make_server, parse_sse
from openwham.server import fanout
from openwham.store import events
from openwham.store.db import Database
from openwham.store.events import LocalEventBus
from openwham.store.pgbus import PgEventBus, conninfo, event_bus
from support.app_thread import AppThread

WRITER = Path(__file__).parent / "support" / "remote_writer.py"
WAIT = 60.0  # generous: the machine is shared; the streams' own poll is 600 s here


class Writer:
    """``remote_writer.py`` in a process of its own, one step at a time."""

    def __init__(self, url: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(WRITER), url],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def step(self, command: str) -> list[int]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        words = self.proc.stdout.readline().split()
        assert words[:1] == ["ok"], words
        return [int(w) for w in words[1:]]

    def close(self) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("quit\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline().strip() == "bye"
        self.proc.wait(30)


@pytest.fixture
def writer(postgres_url: str) -> Iterator[Writer]:
    w = Writer(postgres_url)
    try:
        yield w
    finally:
        if w.proc.poll() is None:
            w.close()


def _terminate(url: str, pid: int | None) -> None:
    """End one backend (the bus's own connection, whose pid it reported)."""
    assert pid is not None
    with psycopg.connect(conninfo(url), autocommit=True) as conn:
        row = conn.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone()
        assert row == (True,)


async def _listening(bus: PgEventBus, connects: int = 1) -> None:
    with anyio.fail_after(WAIT):
        while not (bus.listening.is_set() and bus.listener_connects >= connects):
            await asyncio.sleep(0.01)
    await asyncio.sleep(0)  # the connect's wake-up of every subscriber has run


def test_the_bus_is_chosen_by_the_database(postgres_url: str, sqlite_url: str) -> None:
    pg, lite = Database(postgres_url), Database(sqlite_url)
    try:
        assert isinstance(event_bus(pg), PgEventBus)
        assert isinstance(event_bus(lite), LocalEventBus)
    finally:
        pg.dispose()
        lite.dispose()


def test_a_publish_in_another_process_wakes_a_subscriber_here(
    postgres_url: str, writer: Writer
) -> None:
    bus = PgEventBus(postgres_url)

    async def main() -> tuple[float, float]:
        here = bus.subscribe("turn-a")
        other = bus.subscribe("turn-b")
        await _listening(bus)
        here.event.clear()
        other.event.clear()
        await anyio.to_thread.run_sync(writer.step, "publish turn-a")
        start = time.monotonic()
        await here.wait(WAIT)
        woke = time.monotonic() - start
        # wait() semantics: nothing new since the last wait, so it waits the timeout out
        start = time.monotonic()
        await here.wait(0.3)
        idle = time.monotonic() - start
        assert not other.event.is_set()  # another turn's subscriber was not woken
        here.close()
        other.close()
        return woke, idle

    try:
        woke, idle = asyncio.run(main())
    finally:
        bus.close()
    assert woke < WAIT / 2
    assert idle >= 0.29
    assert bus.publisher_pid is None  # a process that only subscribes has no publisher


def test_the_listener_survives_the_loss_of_its_connection(
    postgres_url: str, writer: Writer
) -> None:
    """Its backend terminated: it reconnects, wakes every subscriber (what was published
    meanwhile is not lost: they read the rows), and the next publish arrives."""
    bus = PgEventBus(postgres_url)

    async def main() -> None:
        sub = bus.subscribe("turn-a")
        await _listening(bus)
        sub.event.clear()
        first = bus.listener_pid
        await anyio.to_thread.run_sync(_terminate, postgres_url, first)
        await _listening(bus, connects=2)
        assert bus.listener_pid != first
        assert sub.event.is_set()  # woken by the reconnect, with no publish at all
        await sub.wait(0)
        await anyio.to_thread.run_sync(writer.step, "publish turn-a")
        start = time.monotonic()
        await sub.wait(WAIT)
        assert time.monotonic() - start < WAIT / 2
        sub.close()

    try:
        asyncio.run(main())
    finally:
        bus.close()


def test_the_publisher_survives_the_loss_of_its_connection(postgres_url: str) -> None:
    """A publish whose connection died is sent again on a new one."""
    sender, receiver = PgEventBus(postgres_url), PgEventBus(postgres_url)

    async def main() -> None:
        sub = receiver.subscribe("turn-a")
        await _listening(receiver)
        sub.event.clear()
        sender.publish("turn-a")
        await sub.wait(WAIT)
        first = sender.publisher_pid
        await anyio.to_thread.run_sync(_terminate, postgres_url, first)
        sender.publish("turn-a")
        start = time.monotonic()
        await sub.wait(WAIT)
        assert time.monotonic() - start < WAIT / 2
        assert sender.publisher_connects == 2 and sender.publisher_pid != first
        sub.close()

    try:
        asyncio.run(main())
    finally:
        sender.close()
        receiver.close()


# --------------------------------------------------------------------------- streams


@pytest.fixture
def pg_server(tmp_path: Path, postgres_url: str) -> Iterator[Server]:
    yield from make_server(tmp_path, postgres_url)


class StreamReader:
    """One SSE client of the API node, collecting frames as they arrive."""

    def __init__(self) -> None:
        self.buffer = ""
        self.frames: list[dict[str, Any]] = []
        self.ended = False

    @property
    def ids(self) -> list[int]:
        return [int(f["id"]) for f in self.frames if "id" in f]

    async def run(self, client: httpx.AsyncClient, path: str, headers: dict[str, str]) -> None:
        async with client.stream("GET", path, headers=headers) as r:
            assert r.status_code == 200
            async for text in r.aiter_text():
                self.buffer += text
                *done, self.buffer = self.buffer.split("\n\n")
                self.frames += parse_sse("\n\n".join(done) + "\n\n")
        self.ended = True

    async def until(self, event_id: int) -> None:
        with anyio.fail_after(WAIT):
            while event_id not in self.ids:
                await asyncio.sleep(0.01)


def test_a_stream_on_the_api_node_gets_another_process_events_live_in_order(
    pg_server: Server, repo: Path, writer: Writer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker's recorder (another process) appends and publishes; a client streams from
    the API node: it gets every event, in order, each before the next is written (live: the
    stream's own poll is 600 s), across a loss of the API node's listener connection, and
    ``Last-Event-ID`` replays the rest unchanged."""
    monkeypatch.setattr(fanout, "KEEPALIVE_SECONDS", 600.0)
    server = pg_server
    bus = server.app_state.bus
    assert isinstance(bus, PgEventBus)
    env = server.api.create_env(repo)
    created = server.api.create_task(env["id"])
    task_id, turn_id = created["task"]["id"], created["turn"]["id"]
    before = writer.step(f"append {task_id} {turn_id} 3")
    thread = AppThread()
    url = thread.start(server.api.client.app)  # type: ignore[attr-defined]
    headers = {"Authorization": f"Bearer {server.api.token}"}
    path = f"/api/codex/tasks/{task_id}/turns/{turn_id}/stream"

    async def main() -> tuple[list[int], list[int], list[int]]:
        async with httpx.AsyncClient(base_url=url, timeout=WAIT * 2) as client:
            reader = StreamReader()
            running = asyncio.ensure_future(reader.run(client, path, headers))
            await reader.until(before[-1])
            written = list(before)
            for i in range(12):
                if i == 6:  # the API node's listener loses its connection
                    await _listening(bus)
                    await anyio.to_thread.run_sync(
                        _terminate, server.app_state.db.url, bus.listener_pid
                    )
                    await _listening(bus, connects=2)
                new = await anyio.to_thread.run_sync(writer.step, f"append {task_id} {turn_id} 1")
                await reader.until(new[-1])  # before the next one is written
                written += new
            written += await anyio.to_thread.run_sync(writer.step, f"end {task_id} {turn_id}")
            with anyio.fail_after(WAIT):
                await running
            resumed = StreamReader()
            await resumed.run(client, path, {**headers, "Last-Event-ID": str(written[7])})
            return written, reader.ids, resumed.ids

    try:
        written, seen, resumed = asyncio.run(main())
    finally:
        thread.stop()
    with server.app_state.db.session() as s:
        stored = [e.id for e in events.read(s, turn_id, limit=10_000)]
    assert written == stored  # what the other process wrote, and nothing else
    assert seen == stored  # every event, once, in order
    assert resumed == stored[8:]
