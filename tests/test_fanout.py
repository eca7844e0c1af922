"""Turn-stream fan-out (server/fanout.py): one database reader per turn for all its streams,
a bounded tail, slow subscribers dropped and resumed with ``Last-Event-ID``.

Events are written as the recorder writes them (``events.append``, commit, ``bus.publish``);
subscribers are the very async generators the stream route returns, driven on an event loop
of the test's own, so hundreds of them cost no sockets. One test goes through HTTP. On
PostgreSQL the events are published on a bus of their own, as by another process, so the
server's streams wake only through LISTEN/NOTIFY (store/pgbus.py).
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from sqlalchemy import event

from conftest import Server, finish_turn, parse_sse
from openwham.server import fanout
from openwham.server.fanout import FanOut, Limits
from openwham.store import events, turnstate
from openwham.store.events import EventBus
from openwham.store.pgbus import PgEventBus
from support.app_thread import AppThread

# the bus events are published on, per server (a remote one on PostgreSQL)
_PUBLISHERS: dict[int, EventBus] = {}


@pytest.fixture(autouse=True)
def _remote_publisher(request: pytest.FixtureRequest) -> Iterator[None]:
    """On PostgreSQL, ``_write`` publishes on another bus instance (another origin): like a
    worker process's recorder, it reaches the server's streams only through NOTIFY."""
    if "any_server" not in request.fixturenames:
        yield
        return
    server: Server = request.getfixturevalue("any_server")
    if not isinstance(server.app_state.bus, PgEventBus):
        yield
        return
    remote = PgEventBus(server.app_state.db.url)
    _PUBLISHERS[id(server)] = remote
    try:
        yield
    finally:
        del _PUBLISHERS[id(server)]
        remote.close()


def _turn(server: Server, repo: Path) -> tuple[str, str]:
    env = server.api.create_env(repo)
    created = server.api.create_task(env["id"])  # executor "none": nothing else writes
    return created["task"]["id"], created["turn"]["id"]


def _write(
    server: Server, task_id: str, turn_id: str, n: int, *, end: bool = False, finish: bool = False
) -> None:
    """``n`` work-log events (and the terminal status event), each committed and published
    on its own, as the recorder does; ``finish``: the terminal event goes with the attempt's
    terminal status, in one transaction, as the engine writes them (without it the turn stays
    ``pending`` with a terminal event, a state the engine never leaves a turn in)."""
    state = server.app_state
    bus = _PUBLISHERS.get(id(server), state.bus)
    for i in range(n):
        with state.db.session() as s:
            events.append(
                s, task_id, turn_id, events.WORK_LOG_MESSAGE, {"id": f"m{i}", "text": "x" * 40}
            )
        bus.publish(turn_id)
    if end:
        with state.db.session() as s:
            if finish:
                assert turnstate.move(s, turn_id, turnstate.Transition.CLAIM)
                assert turnstate.move(s, turn_id, turnstate.Transition.FINISH)
            events.append(
                s,
                task_id,
                turn_id,
                events.TASK_TURN_EVENT,
                events.status_payload("Done", "completed"),
            )
        bus.publish(turn_id)


def _all_ids(server: Server, turn_id: str) -> list[int]:
    with server.app_state.db.session() as s:
        return [e.id for e in events.read(s, turn_id, limit=100_000)]


@contextmanager
def _event_reads(server: Server) -> Iterator[list[str]]:
    """The SELECTs on ``turn_events`` the server makes meanwhile."""
    seen: list[str] = []
    engine = server.app_state.db.engine

    def listen(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT") and "turn_events" in statement:
            seen.append(statement)

    event.listen(engine, "before_cursor_execute", listen)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", listen)


def _expected_bytes(server: Server, turn_id: str, after: int = 0) -> bytes:
    """The stream's bytes after ``after`` as the route wrote them before the fan-out."""
    with server.app_state.db.session() as s:
        rows = events.read(s, turn_id, after=after, limit=100_000)
    want = b""
    for e in rows:
        data = {
            "id": str(e.id),
            "item_type": e.item_type,
            "timestamp": e.created_at,
            "payload": e.payload,
            e.item_type: e.payload,
        }
        text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
        want += f"id: {e.id}\nevent: message\ndata: {text}\n\n".encode()
    return want


def _ids(chunks: list[bytes]) -> list[int]:
    return [int(f["id"]) for f in parse_sse(b"".join(chunks).decode()) if "id" in f]


async def _collect(stream: AsyncIterator[bytes], into: list[bytes] | None = None) -> list[bytes]:
    out = [] if into is None else into
    async for chunk in stream:
        out.append(chunk)
    return out


async def _until_attached(hub: FanOut, turn_id: str, count: int) -> None:
    """Wait until ``count`` subscribers follow the turn's tail."""
    with anyio.fail_after(30):
        while sum(len(t.subs) for (_, tid), t in hub.tails.items() if tid == turn_id) < count:
            await asyncio.sleep(0.01)


def test_200_subscribers_get_every_event_once_in_order_from_one_reader(
    any_server: Server, repo: Path
) -> None:
    server = any_server
    task_id, turn_id = _turn(server, repo)
    hub = server.app_state.fanout
    n = 60

    async def main() -> list[list[bytes]]:
        streams = [_collect(hub.frames(turn_id, 0, None)) for _ in range(200)]
        tasks = [asyncio.ensure_future(s) for s in streams]
        await _until_attached(hub, turn_id, 200)
        await anyio.to_thread.run_sync(lambda: _write(server, task_id, turn_id, n, end=True))
        with anyio.fail_after(60):
            return list(await asyncio.gather(*tasks))

    with _event_reads(server) as reads:
        results = asyncio.run(main())
    expected = _all_ids(server, turn_id)
    assert len(expected) == n + 1  # n messages, the terminal event
    for chunks in results:
        assert _ids(chunks) == expected  # every event, in order, exactly once, then the end
    # one reader: O(events) reads, where one read per subscriber per event would be 12,000+
    assert len(reads) <= 2 * len(expected) + 10, len(reads)
    assert not hub.tails  # the tail went with its last stream


def test_a_subscriber_that_stops_reading_is_dropped_and_resumes_without_loss(
    any_server: Server, repo: Path
) -> None:
    server = any_server
    task_id, turn_id = _turn(server, repo)
    hub = FanOut(server.app_state.db, server.app_state.bus, Limits(queue_batches=4))
    _write(server, task_id, turn_id, 1)  # what the slow one reads before it stops

    async def main() -> tuple[list[bytes], list[bytes], list[bytes]]:
        fast: list[bytes] = []
        follower = asyncio.ensure_future(_collect(hub.frames(turn_id, 0, None), fast))
        slow_stream = hub.frames(turn_id, 0, None)
        slow = [await slow_stream.__anext__()]  # joined and read once, then reads no more
        await _until_attached(hub, turn_id, 2)
        for _ in range(12):  # one batch at a time: the follower has each before the next
            before = len(_ids(fast))
            await anyio.to_thread.run_sync(lambda: _write(server, task_id, turn_id, 1))
            with anyio.fail_after(30):
                while len(_ids(fast)) == before:
                    await asyncio.sleep(0.01)
        assert hub.dropped == 1
        slow += await _collect(slow_stream)  # what it still gets: nothing, its stream ended
        await anyio.to_thread.run_sync(lambda: _write(server, task_id, turn_id, 5, end=True))
        resumed = await _collect(hub.frames(turn_id, _ids(slow)[-1], None))
        with anyio.fail_after(30):
            await follower
        return fast, slow, resumed

    fast, slow, resumed = asyncio.run(main())
    expected = _all_ids(server, turn_id)
    assert _ids(fast) == expected
    assert len(_ids(slow)) < len(expected)
    assert _ids(slow) + _ids(resumed) == expected  # no gap, no duplicate


def test_replay_from_the_database_joins_the_tail_without_gap_or_duplicate(
    any_server: Server, repo: Path
) -> None:
    """Joiners at every point, while events are written: those older than the (small) tail
    replay from the database first, then take the tail and what follows."""
    server = any_server
    task_id, turn_id = _turn(server, repo)
    hub = FanOut(server.app_state.db, server.app_state.bus, Limits(tail_frames=8))

    async def main() -> list[tuple[int, list[bytes]]]:
        first = asyncio.ensure_future(_collect(hub.frames(turn_id, 0, None)))
        await _until_attached(hub, turn_id, 1)
        writer = threading.Thread(
            target=_write,
            args=(server, task_id, turn_id, 120),
            kwargs={"end": True, "finish": True},  # a joiner may come after the very end
        )
        joined: list[tuple[int, asyncio.Future[list[bytes]]]] = []
        writer.start()
        seen: set[int] = set()
        while writer.is_alive():
            ids = await anyio.to_thread.run_sync(_all_ids, server, turn_id)
            for after in (0, *ids[:: max(1, len(ids) // 4)]):
                if after not in seen:
                    seen.add(after)
                    joined.append(
                        (after, asyncio.ensure_future(_collect(hub.frames(turn_id, after, None))))
                    )
            await asyncio.sleep(0.02)
        await anyio.to_thread.run_sync(writer.join)
        with anyio.fail_after(60):
            results = [(after, await f) for after, f in joined]
            results.append((0, await first))
        return results

    results = asyncio.run(main())
    expected = _all_ids(server, turn_id)
    assert len(results) > 10
    replayed = 0
    for after, chunks in results:
        want = [i for i in expected if i > after]
        assert _ids(chunks) == want, after
        replayed += bool(want) and after < expected[-9]
    assert replayed  # some started before the tail, so read from the database


def test_a_stream_opened_as_the_attempt_ends_ends_at_its_terminal_event(
    any_server: Server, repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The attempt ends (status and terminal event, one commit) between a new tail's read of
    the status and its read of the rows: a client resuming at the terminal event
    (``Last-Event-ID`` of the end: its connection dropped just after it) gets nothing more
    and its stream ends at once, not a second, synthetic end after the grace period. (With a
    status that never became terminal this hung the replay test above.)"""
    server = any_server
    task_id, turn_id = _turn(server, repo)
    _write(server, task_id, turn_id, 3)
    with server.app_state.db.session() as s:
        before = fanout._state(s, turn_id)  # what a read just before the commit sees
    assert before[0] not in events.TERMINAL_STATUSES
    finish_turn(server, turn_id)
    expected = _all_ids(server, turn_id)
    read_state = fanout._state
    stale = [before]

    def state_read_before_the_commit(s: Any, tid: str) -> tuple[str | None, int]:
        return stale.pop() if stale else read_state(s, tid)

    monkeypatch.setattr(fanout, "_state", state_read_before_the_commit)
    monkeypatch.setattr(fanout, "TERMINAL_GRACE_SECONDS", 60.0)
    hub = FanOut(server.app_state.db, server.app_state.bus)

    async def main() -> list[bytes]:
        with anyio.fail_after(10):
            return await _collect(hub.frames(turn_id, expected[-1], None))

    assert asyncio.run(main()) == []
    assert not stale and not hub.tails
    stale.append(before)  # a stream from the start: every event, ending at the terminal one
    assert _ids(asyncio.run(_collect(hub.frames(turn_id, 0, None)))) == expected
    assert not hub.tails


def test_the_tail_and_the_queues_stay_bounded(server: Server, repo: Path) -> None:
    task_id, turn_id = _turn(server, repo)
    limits = Limits(tail_frames=50, tail_bytes=6_000, queue_batches=3, queue_bytes=10_000)
    hub = FanOut(server.app_state.db, server.app_state.bus, limits)
    _write(server, task_id, turn_id, 1)

    async def main() -> tuple[int, int]:
        reader = asyncio.ensure_future(_collect(hub.frames(turn_id, 0, None)))
        stalled = hub.frames(turn_id, 0, None)
        await stalled.__anext__()
        await _until_attached(hub, turn_id, 2)
        tail = next(iter(hub.tails.values()))
        most_frames = most_bytes = 0
        for _ in range(40):
            await anyio.to_thread.run_sync(lambda: _write(server, task_id, turn_id, 10))
            most_frames = max(most_frames, len(tail.frames))
            most_bytes = max(most_bytes, tail.bytes)
            for sub in tail.subs:
                assert len(sub.pending) <= limits.queue_batches
                assert sub.pending_bytes <= limits.queue_bytes
        await anyio.to_thread.run_sync(lambda: _write(server, task_id, turn_id, 0, end=True))
        with anyio.fail_after(30):
            await reader
        await stalled.aclose()
        return most_frames, most_bytes

    most_frames, most_bytes = asyncio.run(main())
    assert 0 < most_frames <= 50 and 0 < most_bytes <= 6_000
    assert hub.dropped == 1 and not hub.tails


def test_item_type_filters_and_a_reconnect_after_the_end(server: Server, repo: Path) -> None:
    task_id, turn_id = _turn(server, repo)
    hub = server.app_state.fanout
    _write(server, task_id, turn_id, 3)
    finish_turn(server, turn_id)

    async def main() -> tuple[list[bytes], list[bytes], list[bytes]]:
        statuses = await _collect(hub.frames(turn_id, 0, {events.TASK_TURN_EVENT}))
        everything = await _collect(hub.frames(turn_id, 0, None))
        after_end = await _collect(hub.frames(turn_id, _ids(everything)[-1], None))
        return statuses, everything, after_end

    statuses, everything, after_end = asyncio.run(main())
    frames = parse_sse(b"".join(statuses).decode())
    assert {f["data"]["item_type"] for f in frames} == {events.TASK_TURN_EVENT}
    assert frames[-1]["data"]["payload"]["turn_status"] == "completed"
    assert _ids(everything) == _all_ids(server, turn_id)
    assert after_end == []


def test_the_wire_format_over_http_is_unchanged(server: Server, repo: Path) -> None:
    """Byte for byte what the stream sent before the fan-out, for several clients at once."""
    task_id, turn_id = _turn(server, repo)
    _write(server, task_id, turn_id, 2, end=True)
    want = _expected_bytes(server, turn_id)
    thread = AppThread()
    url = thread.start(server.api.client.app)  # type: ignore[attr-defined]
    try:

        async def main() -> list[bytes]:
            headers = {"Authorization": f"Bearer {server.api.token}"}
            path = f"/api/codex/tasks/{task_id}/turns/{turn_id}/stream"
            async with httpx.AsyncClient(base_url=url, timeout=30) as client:

                async def one() -> bytes:
                    r = await client.get(path, headers=headers)
                    assert r.status_code == 200
                    assert r.headers["content-type"] == "text/event-stream; charset=utf-8"
                    return r.content

                return list(await asyncio.gather(*(one() for _ in range(20))))

        bodies = asyncio.run(main())
    finally:
        thread.stop()
    assert bodies == [want] * 20


def test_a_cancelled_attempt_without_its_terminal_event_ends_with_a_synthetic_one(
    server: Server, repo: Path, monkeypatch: Any
) -> None:
    monkeypatch.setattr(fanout, "TERMINAL_GRACE_SECONDS", 0.3)
    _, turn_id = _turn(server, repo)
    from openwham.store import models as m

    with server.app_state.db.session() as s:
        turn = s.get(m.Turn, turn_id)
        assert turn is not None
        turn.turn_status = "cancelled"

    async def main() -> list[list[bytes]]:
        hub = server.app_state.fanout
        return list(
            await asyncio.gather(*(_collect(hub.frames(turn_id, 0, None)) for _ in range(3)))
        )

    for chunks in asyncio.run(main()):
        frames = parse_sse(b"".join(chunks).decode())
        assert frames[-1]["data"]["id"] is None
        assert frames[-1]["data"]["payload"]["turn_status"] == "cancelled"


def test_a_stream_joining_after_the_attempt_started_over_gets_no_deleted_frames(
    any_server: Server, repo: Path
) -> None:
    """Recovery requeues a running attempt (``turnstate.requeue`` deletes its events in the
    same transaction, as ``engine.turns.requeue`` does): a tail opened before must not
    hand the deleted frames to a stream that joins later."""
    from openwham.store import models as m
    from openwham.store import turnstate

    server = any_server
    task_id, turn_id = _turn(server, repo)
    db = server.app_state.db
    with db.session() as s:
        turn = s.get(m.Turn, turn_id)
        assert turn is not None
        assert turnstate.claim(s, turn_id, body=dict(turn.body), run="r1")
    hub = server.app_state.fanout
    _write(server, task_id, turn_id, 5)
    old = _all_ids(server, turn_id)

    def start_over() -> None:
        with db.session() as s:
            turn = s.get(m.Turn, turn_id)
            assert turn is not None
            assert turnstate.requeue(s, turn_id, body=dict(turn.body))
            events.clear(s, turn_id, [events.WORK_LOG_MESSAGE, events.LOG, events.TASK_TURN_EVENT])
            events.append(s, task_id, turn_id, events.LOG, {"text": "again", "created": 0.0})
        _PUBLISHERS.get(id(server), server.app_state.bus).publish(turn_id)

    async def main() -> tuple[list[bytes], list[bytes]]:
        first: list[bytes] = []
        opened = asyncio.ensure_future(_collect(hub.frames(turn_id, 0, None), first))
        with anyio.fail_after(30):
            while _ids(first) != old:  # the tail holds the first run's frames
                await asyncio.sleep(0.01)
        await anyio.to_thread.run_sync(start_over)
        new = await anyio.to_thread.run_sync(_all_ids, server, turn_id)
        with anyio.fail_after(30):
            while _ids(first)[-1:] != new[-1:]:  # the tail read the new run's first event
                await asyncio.sleep(0.01)
        late = asyncio.ensure_future(_collect(hub.frames(turn_id, 0, None)))
        await _until_attached(hub, turn_id, 2)
        await anyio.to_thread.run_sync(lambda: _write(server, task_id, turn_id, 2, end=True))
        with anyio.fail_after(60):
            return await opened, await late

    first, late = asyncio.run(main())
    now = _all_ids(server, turn_id)
    assert not set(old) & set(now)
    assert _ids(late) == now  # only what the database holds, in order
    assert _ids(first) == old + now  # an open stream keeps what it was sent
