"""Turn streams written straight to the connection (server/direct.py) by the server the
project runs: uvicorn with httptools (``wham serve``'s defaults; ``AppThread`` uses them),
over real sockets. Every event once and in order, with the chunked coding intact; a resume
after ``Last-Event-ID``; a client that stops reading dropped and resuming without loss; a
client that goes away leaving nothing behind; and the fallback through ASGI ``send`` (h11,
or a uvicorn whose internals ``direct.find`` does not accept) giving the same bytes."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from conftest import Server, parse_sse
from openwham.server import direct
from openwham.server.fanout import (
    KEEPALIVE,
    KEEPALIVE_FRAME,
    Batch,
    FanOut,
    Frame,
    Limits,
    Subscriber,
)
from openwham.store import events
from support.app_thread import AppThread
from test_fanout import _all_ids, _expected_bytes, _turn, _write


@contextmanager
def _served(server: Server, **config: Any) -> Iterator[tuple[str, int]]:
    thread = AppThread()
    url = thread.start(server.api.client.app, **config)  # type: ignore[attr-defined]
    try:
        host, port = url.removeprefix("http://").rsplit(":", 1)
        yield host, int(port)
    finally:
        thread.stop()


def _wait(predicate: Any, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


class Client:
    """One stream on a raw socket; ``body()`` decodes the chunked coding strictly."""

    def __init__(
        self,
        address: tuple[str, int],
        server: Server,
        task_id: str,
        turn_id: str,
        *,
        last_id: int | None = None,
        query: str = "",
        rcvbuf: int | None = None,
    ) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(30)
        self.sock.connect(address)
        resume = f"Last-Event-ID: {last_id}\r\n" if last_id is not None else ""
        self.sock.sendall(
            f"GET /api/codex/tasks/{task_id}/turns/{turn_id}/stream{query} HTTP/1.1\r\n"
            f"Host: x\r\nAuthorization: Bearer {server.api.token}\r\n{resume}\r\n".encode()
        )
        self.raw = b""

    def read_all(self) -> bytes:
        """Everything until the end of the body (the zero-size chunk)."""
        while not self._complete():
            data = self.sock.recv(1 << 16)
            if not data:
                raise AssertionError(f"connection closed before the body ended: {self.raw!r}")
            self.raw += data
        return self.body()

    def _complete(self) -> bool:
        try:
            self.body()
        except _Incomplete:
            return False
        return True

    def head(self) -> bytes:
        if b"\r\n\r\n" not in self.raw:
            raise _Incomplete
        return self.raw.split(b"\r\n\r\n", 1)[0]

    def body(self) -> bytes:
        head = self.head()
        assert head.startswith(b"HTTP/1.1 200"), head
        assert b"transfer-encoding: chunked" in head.lower(), head
        rest = self.raw.split(b"\r\n\r\n", 1)[1]
        out = b""
        while True:
            if b"\r\n" not in rest:
                raise _Incomplete
            size_line, rest = rest.split(b"\r\n", 1)
            size = int(size_line, 16)  # a malformed size line fails here
            if len(rest) < size + 2:
                raise _Incomplete
            data, crlf, rest = rest[:size], rest[size : size + 2], rest[size + 2 :]
            assert crlf == b"\r\n", (size_line, crlf)
            if size == 0:
                assert rest == b"", rest  # nothing after the body's end
                return out
            out += data

    def close(self) -> None:
        self.sock.close()


class _Incomplete(Exception):
    pass


def _ids(body: bytes) -> list[int]:
    return [int(f["id"]) for f in parse_sse(body.decode()) if "id" in f]


def _attached(hub: FanOut, turn_id: str) -> int:
    return sum(len(t.subs) for (_, tid), t in list(hub.tails.items()) if tid == turn_id)


def test_live_streams_are_written_directly_byte_for_byte(server: Server, repo: Path) -> None:
    """30 live streams (two filtered, two resuming) get what the database holds, in whole
    chunks, written by the tail itself (``hub.direct`` counts them)."""
    task_id, turn_id = _turn(server, repo)
    hub = server.app_state.fanout
    _write(server, task_id, turn_id, 4)
    resume_at = _all_ids(server, turn_id)[1]
    with _served(server) as address:
        plain = [Client(address, server, task_id, turn_id) for _ in range(26)]
        resumed = [Client(address, server, task_id, turn_id, last_id=resume_at) for _ in range(2)]
        query = f"?item_type={events.TASK_TURN_EVENT}"
        filtered = [Client(address, server, task_id, turn_id, query=query) for _ in range(2)]
        clients = plain + resumed + filtered
        _wait(lambda: hub.direct >= len(clients), "every stream to go direct")
        writer = threading.Thread(
            target=_write, args=(server, task_id, turn_id, 60), kwargs={"end": True}
        )
        writer.start()
        bodies = [c.read_all() for c in clients]
        writer.join()
        for c in clients:
            c.close()
        _wait(lambda: not hub.tails, "the tail to end")
    assert hub.direct == len(clients)
    everything = _expected_bytes(server, turn_id)
    assert len(_ids(everything)) == 4 + 60 + 1
    for body in bodies[:26]:
        assert body == everything
    for body in bodies[26:28]:
        assert body == _expected_bytes(server, turn_id, after=resume_at)
    for body in bodies[28:]:
        frames = parse_sse(body.decode())
        assert [f["data"]["item_type"] for f in frames] == [events.TASK_TURN_EVENT]
        assert frames[0]["data"]["payload"]["turn_status"] == "completed"


def test_a_direct_stream_that_stops_reading_is_dropped_and_resumes_without_loss(
    server: Server, repo: Path
) -> None:
    """A client that stops reading: what the server's transport holds unsent grows past the
    bound, the stream ends (after what was written: whole frames), the client reconnects
    with ``Last-Event-ID`` and gets the rest; a reading client beside it misses nothing."""
    task_id, turn_id = _turn(server, repo)
    hub = server.app_state.fanout
    hub.limits = Limits(queue_bytes=64 << 10)
    big = "y" * 4000
    with _served(server) as address:
        fast = Client(address, server, task_id, turn_id)
        slow = Client(address, server, task_id, turn_id, rcvbuf=4096)
        _wait(lambda: hub.direct >= 2, "both streams to go direct")

        def write_big(n: int) -> None:
            for i in range(n):
                with server.app_state.db.session() as s:
                    events.append(
                        s, task_id, turn_id, events.WORK_LOG_MESSAGE, {"id": f"b{i}", "text": big}
                    )
                server.app_state.bus.publish(turn_id)

        fast_body: list[bytes] = []
        reader = threading.Thread(target=lambda: fast_body.append(fast.read_all()))
        reader.start()
        write_big(400)  # ~1.6 MB: more than the kernel takes for a client that does not read
        _wait(lambda: hub.dropped == 1, "the slow stream to be dropped")
        assert _attached(hub, turn_id) == 1
        first = slow.read_all()  # the body ended: the stream was dropped, not broken
        slow.close()
        got = _ids(first)
        assert got and got == _all_ids(server, turn_id)[: len(got)]
        again = Client(address, server, task_id, turn_id, last_id=got[-1])
        _wait(lambda: _attached(hub, turn_id) == 2, "the resumed stream to join")
        _write(server, task_id, turn_id, 3, end=True)
        rest = again.read_all()
        again.close()
        reader.join(30)
        fast.close()
    expected = _all_ids(server, turn_id)
    assert _ids(fast_body[0]) == expected
    assert got + _ids(rest) == expected  # no gap, no duplicate
    assert hub.dropped == 1


def test_a_client_that_goes_away_leaves_nothing_behind(server: Server, repo: Path) -> None:
    task_id, turn_id = _turn(server, repo)
    hub = server.app_state.fanout
    with _served(server) as address:
        clients = [Client(address, server, task_id, turn_id) for _ in range(5)]
        _wait(lambda: hub.direct >= 5, "every stream to go direct")
        _write(server, task_id, turn_id, 2)
        for c in clients[:3]:
            c.close()
        _wait(lambda: _attached(hub, turn_id) == 2, "three streams to leave")
        for c in clients[3:]:
            c.close()
        _wait(lambda: not hub.tails, "the tail to end with its last stream")
        # the server still streams this turn afresh
        late = Client(address, server, task_id, turn_id)
        _wait(lambda: _attached(hub, turn_id) == 1, "a new stream to join")
        _write(server, task_id, turn_id, 1, end=True)
        body = late.read_all()
        late.close()
    assert _ids(body) == _all_ids(server, turn_id)


@pytest.mark.parametrize("fallback", ["h11", "internals_refused"])
def test_the_fallback_through_asgi_send_streams_the_same_bytes(
    server: Server, repo: Path, monkeypatch: pytest.MonkeyPatch, fallback: str
) -> None:
    """Where ``direct.find`` gives no sink (uvicorn's h11 protocol; a uvicorn whose cycle is
    not the one checked, here by clearing ``direct.CYCLE``), the stream goes through ASGI
    ``send`` as before, with the same bytes, and a slow client is still dropped by the
    queue's bound."""
    config: dict[str, Any] = {}
    if fallback == "h11":
        config["http"] = "h11"
    else:
        monkeypatch.setattr(direct, "CYCLE", None)
    task_id, turn_id = _turn(server, repo)
    hub = server.app_state.fanout
    with _served(server, **config) as address:
        clients = [Client(address, server, task_id, turn_id) for _ in range(5)]
        _wait(lambda: _attached(hub, turn_id) == 5, "every stream to join")
        _write(server, task_id, turn_id, 20, end=True)
        bodies = [c.read_all() for c in clients]
        for c in clients:
            c.close()
    assert hub.direct == 0
    assert bodies == [_expected_bytes(server, turn_id)] * 5


def test_find_accepts_only_uvicorns_httptools_cycle() -> None:
    assert direct.CYCLE is not None  # the installed uvicorn is one this module accepts
    assert direct.find({"type": "http", "method": "GET"}) is None

    async def plain_send(message: Any) -> None:
        pass

    assert direct.find({"type": "http", direct.SERVER_SEND: plain_send}) is None

    class LookAlike:
        transport = scope = None
        response_started = response_complete = chunked_encoding = disconnected = False

        async def send(self, message: Any) -> None:
            pass

    assert direct.find({"type": "http", direct.SERVER_SEND: LookAlike().send}) is None
    assert direct.chunk(b"abc") == b"3\r\nabc\r\n"
    assert direct.chunk(b"x" * 300) == b"12c\r\n" + b"x" * 300 + b"\r\n"


def test_streams_joining_while_events_are_written_go_direct_without_gap(
    server: Server, repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Joiners at every point of a turn being written, with a tail of 8 frames: most replay
    from the database while the tail queues what comes meanwhile; going direct writes that
    queue first. Each gets every event after its ``Last-Event-ID`` once, in order."""
    task_id, turn_id = _turn(server, repo)
    hub = server.app_state.fanout
    hub.limits = Limits(tail_frames=8)
    queued: list[int] = []  # batches each stream had queued when it went direct
    go_direct = Subscriber.go_direct

    def counted(sub: Subscriber, *args: Any) -> bool:
        queued.append(len(sub.pending))
        return go_direct(sub, *args)

    monkeypatch.setattr(Subscriber, "go_direct", counted)
    with _served(server) as address:
        first = Client(address, server, task_id, turn_id)
        _wait(lambda: hub.direct >= 1, "the first stream to go direct")
        writer = threading.Thread(
            target=_write, args=(server, task_id, turn_id, 150), kwargs={"end": True}
        )
        writer.start()
        joined: list[tuple[int, Client]] = []
        rounds = 0
        while writer.is_alive() or rounds < 2:  # some may join after the end: as valid
            ids = _all_ids(server, turn_id)
            for after in (0, *ids[-1:]):
                joined.append((after, Client(address, server, task_id, turn_id, last_id=after)))
            rounds += 1
            time.sleep(0.05)
        writer.join()
        results = [(after, c.read_all()) for after, c in joined]
        results.append((0, first.read_all()))
        for _, c in [*joined, (0, first)]:
            c.close()
    expected = _all_ids(server, turn_id)
    assert len(results) >= 4
    for after, body in results:
        assert _ids(body) == [i for i in expected if i > after], after
    assert hub.direct == len(queued) > 1
    print("batches queued when going direct:", sorted(queued))  # > 0: timing decides


class _FakeSink:
    def __init__(self, behind: int = 0) -> None:
        self.out: list[bytes] = []
        self.behind = behind
        self.gone = False

    def write(self, data: bytes) -> None:
        self.out.append(data)

    def buffered(self) -> int:
        return self.behind

    def closing(self) -> bool:
        return self.gone


def _frame(i: int, item_type: str = events.WORK_LOG_MESSAGE) -> Frame:
    return Frame(i, item_type, f"id: {i}\n\n".encode(), False)


def test_going_direct_writes_what_was_queued_first_then_each_batch_framed() -> None:
    limits = Limits(queue_bytes=100)
    sub = Subscriber(None)
    assert sub.push(Batch((_frame(1), _frame(2))), limits)
    assert sub.push(Batch((_frame(3),)), limits)
    sink = _FakeSink()
    assert sub.go_direct(sink, 1, None, limits)  # { 1 } was sent while catching up
    assert not sub.pending
    assert sink.out == [direct.chunk(b"id: 2\n\n"), direct.chunk(b"id: 3\n\n")]
    assert sub.push(KEEPALIVE, limits)
    assert sink.out[-1] == direct.chunk(KEEPALIVE_FRAME)
    # filtered: a batch with nothing of the stream's types writes nothing
    typed = Subscriber(None)
    typed_sink = _FakeSink()
    assert typed.go_direct(typed_sink, 0, {events.TASK_TURN_EVENT}, limits)
    assert typed.push(Batch((_frame(4),)), limits)
    assert typed_sink.out == [] and typed.last == 4
    # too far behind: nothing written, the tail drops it
    sink.behind = 90
    before = list(sink.out)
    assert not sub.push(Batch((_frame(5),)), limits)
    assert sink.out == before
    # gone: closed, nothing written
    sink.behind, sink.gone = 0, True
    assert sub.push(Batch((_frame(6),)), limits) and sub.closed and sink.out == before
    # the end: written, then closed
    last = Subscriber(None)
    end_sink = _FakeSink()
    assert last.go_direct(end_sink, 0, None, limits)
    assert last.push(Batch((_frame(7),), ends=True), limits)
    assert last.closed and end_sink.out == [direct.chunk(b"id: 7\n\n")]
