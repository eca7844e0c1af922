"""Turn-stream fan-out: one reader per turn and node, shared by every stream of that turn.

A stream used to read ``turn_events`` itself on every wake-up, so 1,000 streams on one turn
made 1,000 database reads per event and starved the API. Now a ``TurnTail`` per running turn
(per event loop) holds the only bus subscription: when the bus says "turn X has something
new" (or a poll interval passed, so a lost wake-up costs one interval), it reads the new rows
once, encodes each SSE frame once, keeps the newest frames in a bounded in-memory tail and
pushes each batch to every subscriber's bounded queue. The database is read per subscriber
only to replay what lies before the tail (``Last-Event-ID`` older than the tail). A
subscriber whose queue is full is dropped: its stream ends and the client reconnects with
``Last-Event-ID`` (the SDK and browsers' EventSource do), so a slow reader holds neither
memory nor the loop. A stream served by uvicorn's httptools protocol (``wham serve``) hands
the tail a ``direct.Sink`` once it has caught up: the tail then writes each batch to that
stream's connection itself, framed once for all streams at the same place (no task woken,
no ASGI ``send``); the bound is then the bytes the transport holds unsent. The bus is only
``store.events.EventBus``: a bus that carries "turn X
has new events" between nodes (PostgreSQL NOTIFY) plugs in unchanged.

Wire format, ``Last-Event-ID`` replay, event order, keep-alives, token revocation and the
end of a stream are those of ``routers/stream.py`` (its docstring).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from collections.abc import AsyncGenerator, Collection
from dataclasses import dataclass
from typing import Any

import anyio
from sqlalchemy import select
from sqlalchemy.orm import Session

from openwham.service import tokens as api_tokens
from openwham.store import events
from openwham.store import models as m
from openwham.store.db import Database
from openwham.store.events import Event, EventBus

from . import direct
from .direct import Sink

# Read at run time (tests shorten them).
KEEPALIVE_SECONDS = 15.0
# How long a stream waits for the terminal event of an attempt whose status is already
# terminal (a running attempt that was cancelled: its executor writes the last frames).
TERMINAL_GRACE_SECONDS = 5.0
GRACE_POLL_SECONDS = 0.25
READ_LIMIT = 500
# Streams woken per turn of the event loop (``TurnTail._broadcast``).
BROADCAST_SLICE = 64
KEEPALIVE_FRAME = b": keep-alive\n\n"

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Limits:
    """Memory bounds: the tail per turn, and what a subscriber may have queued."""

    tail_frames: int = 1024
    tail_bytes: int = 4 << 20
    queue_batches: int = 256
    queue_bytes: int = 4 << 20


@dataclass(frozen=True, slots=True)
class Frame:
    id: int
    item_type: str
    data: bytes
    terminal: bool


def encode(event: Event) -> Frame:
    """One SSE frame (docs/reference/wham-api.md §5: the payload under ``payload`` and under
    its item type)."""
    data = {
        "id": str(event.id),
        "item_type": event.item_type,
        "timestamp": event.created_at,
        "payload": event.payload,
        event.item_type: event.payload,
    }
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    raw = f"id: {event.id}\nevent: message\ndata: {text}\n\n".encode()
    return Frame(event.id, event.item_type, raw, event.is_terminal)


def synthetic_end(turn_id: str, status: str, body: dict[str, Any]) -> bytes:
    """The last frame of an attempt that became terminal without writing its terminal event
    within the grace period (no id: it is not in ``turn_events``)."""
    latest = body.get("latest_event") or {}
    payload = events.status_payload(
        str(latest.get("text") or status.capitalize()), status, error=body.get("error")
    )
    data = {
        "id": None,
        "item_type": events.TASK_TURN_EVENT,
        "timestamp": payload["created"],
        "payload": payload,
        events.TASK_TURN_EVENT: payload,
        "turn_id": turn_id,
    }
    return f"event: message\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


def select_frames(frames: Collection[Frame], after: int, types: Collection[str] | None) -> bytes:
    """The frames a subscriber is sent: newer than ``after``, of its item types."""
    return b"".join(
        f.data for f in frames if f.id > after and (types is None or f.item_type in types)
    )


class Batch:
    """What the tail read at once, pushed as one object to every subscriber. ``ends``: the
    stream ends after it (``extra`` is then the synthetic end frame, if any)."""

    __slots__ = ("_framed", "_joined", "ends", "extra", "first_id", "frames", "last_id", "size")

    def __init__(self, frames: tuple[Frame, ...], *, extra: bytes = b"", ends: bool = False):
        self.frames, self.extra, self.ends = frames, extra, ends
        self.first_id = frames[0].id if frames else 0
        self.last_id = frames[-1].id if frames else 0
        self.size = sum(len(f.data) for f in frames) + len(extra)
        self._joined: bytes | None = None
        self._framed: bytes | None = None

    def chunk(self, after: int, types: Collection[str] | None) -> bytes:
        """The bytes for a subscriber at ``after``; joined once for all unfiltered ones."""
        if types is None and after < self.first_id:
            if self._joined is None:
                self._joined = b"".join(f.data for f in self.frames) + self.extra
            return self._joined
        return select_frames(self.frames, after, types) + self.extra

    def framed(self, after: int, types: Collection[str] | None) -> bytes:
        """``chunk`` as one chunk of HTTP/1.1's chunked coding (``b""`` when it is empty);
        framed once for every stream that gets all of the batch."""
        if not self.frames or (types is None and after < self.first_id):
            if self._framed is None:
                data = self.chunk(after, types)
                self._framed = direct.chunk(data) if data else b""
            return self._framed
        data = self.chunk(after, types)
        return direct.chunk(data) if data else b""


KEEPALIVE = Batch((), extra=KEEPALIVE_FRAME)


class Subscriber:
    """One stream's bounded queue of batches; ``dropped`` when it overflowed or its token
    was revoked (the stream then ends without an end frame). With a ``sink`` (``go_direct``)
    nothing is queued: ``push`` writes the batch to the stream's connection."""

    __slots__ = (
        "closed",
        "dropped",
        "last",
        "pending",
        "pending_bytes",
        "sink",
        "token_id",
        "types",
        "waiter",
    )

    def __init__(self, token_id: str | None) -> None:
        self.token_id = token_id
        self.pending: deque[Batch] = deque()
        self.pending_bytes = 0
        self.waiter: asyncio.Future[None] | None = None
        self.closed = False
        self.dropped = False
        self.sink: Sink | None = None
        self.last = 0  # with a sink: the last event id written
        self.types: Collection[str] | None = None

    def push(self, batch: Batch, limits: Limits) -> bool:
        """Queue ``batch`` (with a sink: write it); False (and nothing queued or written)
        when that would overflow."""
        if self.sink is not None:
            return self._write(self.sink, batch, limits)
        if self.pending and (
            len(self.pending) >= limits.queue_batches
            or self.pending_bytes + batch.size > limits.queue_bytes
        ):
            return False
        self.pending.append(batch)
        self.pending_bytes += batch.size
        self._wake()
        return True

    def go_direct(
        self, sink: Sink, last: int, types: Collection[str] | None, limits: Limits
    ) -> bool:
        """From now on ``push`` writes to ``sink`` (on the loop, no await: what was queued
        is written first, in order). False: that overflowed (drop the stream)."""
        self.sink, self.last, self.types = sink, last, types
        batches = list(self.pending)
        self.pending.clear()
        self.pending_bytes = 0
        for batch in batches:
            if not self._write(sink, batch, limits):
                return False
            if batch.ends:
                break
        return True

    def _write(self, sink: Sink, batch: Batch, limits: Limits) -> bool:
        """The batch's bytes for this stream to its connection now; False when the client
        is already ``limits.queue_bytes`` behind (unsent in the transport)."""
        if sink.closing():  # the client went away: the stream's task sees the disconnect
            self.close()
            return True
        data = batch.framed(self.last, self.types)
        if data:
            behind = sink.buffered()
            if behind and behind + len(data) > limits.queue_bytes:
                return False
            sink.write(data)
        if batch.last_id > self.last:
            self.last = batch.last_id
        if batch.ends:
            self.close()
        return True

    def close(self, *, dropped: bool = False) -> None:
        self.closed = True
        if dropped:
            self.dropped = True
            self.pending.clear()
            self.pending_bytes = 0
        self._wake()

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def take(self) -> list[Batch]:
        """Every batch queued so far (one write for all of them: a stream that fell behind
        catches up in one send, so the busier the loop, the fewer sends per event); ``[]``
        once closed and drained."""
        while not self.pending:
            if self.closed:
                return []
            self.waiter = asyncio.get_running_loop().create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        batches = list(self.pending)
        self.pending.clear()
        self.pending_bytes = 0
        return batches


@dataclass(frozen=True, slots=True)
class Attached:
    """What a subscriber finds when it joins: everything after ``base`` that the tail holds;
    older events come from the database. ``ended``: the tail has ended and ``end`` is the
    last thing to send after ``frames``."""

    base: int
    frames: tuple[Frame, ...]
    ended: bool
    end: bytes


@dataclass(frozen=True, slots=True)
class _Opened:
    status: str | None
    epoch: int
    frames: list[Frame]  # oldest first
    base: int
    last: int
    ended: bool


def _state(s: Session, turn_id: str) -> tuple[str | None, int]:
    """The turn's status and events epoch (``None, 0`` once it is deleted)."""
    row = s.execute(
        select(m.Turn.turn_status, m.Turn.events_epoch).where(m.Turn.id == turn_id)
    ).first()
    return (None, 0) if row is None else (row[0], row[1])


def _open(db: Database, turn_id: str, limits: Limits) -> _Opened:
    """The turn's status and its newest events, as many as the tail holds."""
    with db.sessions() as s:
        status, epoch = _state(s, turn_id)  # before the rows: a restart after shows later
        if status is None:
            return _Opened(None, 0, [], 0, 0, True)
        rows = s.scalars(
            select(m.TurnEvent)
            .where(m.TurnEvent.turn_id == turn_id)
            .order_by(m.TurnEvent.id.desc())
            .limit(limits.tail_frames)
        ).all()
        frames: list[Frame] = []
        size = 0
        for r in rows:
            frame = encode(
                Event(r.id, r.task_id, r.turn_id, r.item_type, dict(r.payload), r.created_at)
            )
            if frames and size + len(frame.data) > limits.tail_bytes:
                break
            frames.append(frame)
            size += len(frame.data)
        frames.reverse()
        complete = len(frames) == len(rows) and len(rows) < limits.tail_frames
        base = 0 if complete or not frames else frames[0].id - 1
        last = frames[-1].id if frames else 0
        # A terminal event ends the stream, whatever the status read before it said: the
        # attempt may have ended between the two reads (statements are not one snapshot), and
        # a joiner at that very event (Last-Event-ID of the end) would otherwise wait for
        # the grace period and get a second, synthetic end (or, with no status, forever).
        ended = any(f.terminal for f in frames)
        if not ended and status in events.TERMINAL_STATUSES:
            row = s.scalars(
                select(m.TurnEvent)
                .where(
                    m.TurnEvent.turn_id == turn_id,
                    m.TurnEvent.item_type == events.TASK_TURN_EVENT,
                )
                .order_by(m.TurnEvent.id.desc())
                .limit(1)
            ).first()
            ended = bool(row and row.payload.get("turn_status") in events.TERMINAL_STATUSES)
        return _Opened(status, epoch, frames, base, last, ended)


def _read(db: Database, turn_id: str, after: int) -> tuple[list[Event], str | None, int]:
    """New rows after ``after``, and the turn's status and events epoch, read before them
    (an epoch that changed means the rows the tail holds may be gone)."""
    with db.sessions() as s:
        status, epoch = _state(s, turn_id)
        batch = events.read(s, turn_id, after=after, limit=READ_LIMIT)
        return batch, status, epoch


def _replay(db: Database, turn_id: str, after: int, until: int) -> list[Event]:
    with db.sessions() as s:
        return events.read(s, turn_id, after=after, until=until, limit=READ_LIMIT)


def _body(db: Database, turn_id: str) -> dict[str, Any]:
    with db.sessions() as s:
        body = s.scalar(select(m.Turn.body).where(m.Turn.id == turn_id))
    return dict(body or {})


def _active(db: Database, token_ids: set[str]) -> set[str]:
    with db.sessions() as s:
        return api_tokens.active_ids(s, token_ids)


class TurnTail:
    """The one reader of a turn on this node (and event loop), and its subscribers."""

    def __init__(self, hub: FanOut, key: tuple[asyncio.AbstractEventLoop, str]) -> None:
        self.hub, self.key, self.turn_id = hub, key, key[1]
        self.frames: deque[Frame] = deque()
        self.bytes = 0
        self.base = 0  # every event of the turn with a larger id (up to last) is in frames
        self.last = 0
        self.epoch = 0  # the turn's events_epoch the frames belong to
        self.subs: set[Subscriber] = set()
        self.users = 0  # streams joined or joining
        self.ended = False
        self.end = b""
        self.reads = 0
        self.ready = asyncio.Event()
        self.failed: BaseException | None = None
        self._bus = hub.bus.subscribe(self.turn_id)  # before the first read: nothing missed
        self._task = asyncio.get_running_loop().create_task(self._run())

    # ------------------------------------------------------------------ subscribers

    def attach(self, sub: Subscriber) -> Attached:
        """Join (on the loop, no await: nothing pushed later is also in ``frames``)."""
        if not self.ended:
            self.subs.add(sub)
        return Attached(self.base, tuple(self.frames), self.ended, self.end)

    def leave(self, sub: Subscriber) -> None:
        self.subs.discard(sub)
        self.users -= 1
        if self.users <= 0 and not self.ended:
            self._stop()

    async def _broadcast(self, batch: Batch) -> None:
        """Queue ``batch`` for every stream, ``BROADCAST_SLICE`` streams per turn of the event
        loop: each woken stream writes in the loop's next turn, so API requests that became
        ready meanwhile wait for one slice of writes, not for a thousand."""
        limits = self.hub.limits
        for i, sub in enumerate(list(self.subs)):
            if i and i % BROADCAST_SLICE == 0:
                await asyncio.sleep(0)
            if sub.closed:
                continue
            if not sub.push(batch, limits):
                self.drop(sub)

    def drop(self, sub: Subscriber) -> None:
        """End a stream that fell too far behind (the client resumes with Last-Event-ID)."""
        self.subs.discard(sub)
        sub.close(dropped=True)
        self.hub.dropped += 1

    # ------------------------------------------------------------------ the reader

    def _keep(self, frames: list[Frame]) -> None:
        limits = self.hub.limits
        for frame in frames:
            self.frames.append(frame)
            self.bytes += len(frame.data)
        while self.frames and (
            len(self.frames) > limits.tail_frames or self.bytes > limits.tail_bytes
        ):
            old = self.frames.popleft()
            self.bytes -= len(old.data)
            self.base = old.id

    def _forget(self) -> None:
        """The attempt started over (requeue, recover: its events were deleted): drop the
        frames held, so joiners read what is left from the database. Streams already open
        keep what they were sent; new events have larger ids and follow as usual."""
        self.frames.clear()
        self.bytes = 0
        self.base = self.last

    async def _finish(self, batch: Batch | None) -> None:
        """End every stream (after ``batch``) and leave the hub: a later stream of the turn
        opens a new tail, which reads the turn afresh (a recovered attempt starts over)."""
        self.ended = True
        if batch is not None:
            self.end = batch.extra
            await self._broadcast(batch)
        for sub in self.subs:
            sub.close()
        self.subs.clear()
        self._stop()

    def _stop(self) -> None:
        if self.hub.tails.get(self.key) is self:
            del self.hub.tails[self.key]
        self._bus.close()
        if asyncio.current_task() is not self._task:
            self._task.cancel()

    async def _run(self) -> None:
        try:
            await self._follow()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a database error: the streams end, clients reconnect
            log.exception("turn stream reader of %s failed", self.turn_id)
            self.failed = exc
            self.ready.set()
            await self._finish(None)

    async def _follow(self) -> None:
        db, turn_id = self.hub.db, self.turn_id
        opened = await anyio.to_thread.run_sync(_open, db, turn_id, self.hub.limits)
        self.reads += 1
        self._keep(opened.frames)
        self.base = max(self.base, opened.base)
        self.last = opened.last
        self.epoch = opened.epoch
        self.ready.set()
        if opened.status is None or opened.ended:
            await self._finish(Batch((), ends=True))
            return
        now = time.monotonic()
        grace = now + TERMINAL_GRACE_SECONDS if opened.status in events.TERMINAL_STATUSES else None
        sent = recheck = now
        more = False  # the last read was full: read again without waiting
        while True:
            keepalive = KEEPALIVE_SECONDS
            if more:
                more = False
            else:
                if grace is not None:
                    timeout = GRACE_POLL_SECONDS
                else:
                    timeout = max(0.0, min(sent, recheck) + keepalive - time.monotonic())
                await self._bus.wait(timeout)
            batch, status, epoch = await anyio.to_thread.run_sync(_read, db, turn_id, self.last)
            self.reads += 1
            now = time.monotonic()
            if epoch != self.epoch:
                self.epoch = epoch
                self._forget()
            if batch:
                frames = []
                for event in batch:
                    frames.append(encode(event))
                    if event.is_terminal:
                        break
                self.last = frames[-1].id
                self._keep(frames)
                out = Batch(tuple(frames), ends=frames[-1].terminal)
                if out.ends:
                    await self._finish(out)
                    return
                await self._broadcast(out)
                sent = now
                # a cancelled attempt's executor is still writing: wait for its end again
                grace = now + TERMINAL_GRACE_SECONDS if status in events.TERMINAL_STATUSES else None
                more = len(batch) == READ_LIMIT
            elif status is None:
                await self._finish(Batch((), ends=True))
                return
            elif status in events.TERMINAL_STATUSES:
                grace = grace if grace is not None else now + TERMINAL_GRACE_SECONDS
                if now >= grace:
                    body = await anyio.to_thread.run_sync(_body, db, turn_id)
                    end = synthetic_end(turn_id, status, body)
                    await self._finish(Batch((), extra=end, ends=True))
                    return
            if now >= recheck + keepalive:
                await self._check_tokens()
                recheck = time.monotonic()
            if now >= sent + keepalive - 0.01:
                await self._broadcast(KEEPALIVE)
                sent = now

    async def _check_tokens(self) -> None:
        """End the streams whose API token was revoked or expired (one query for all)."""
        ids = {s.token_id for s in self.subs if s.token_id is not None}
        if not ids:
            return
        active = await anyio.to_thread.run_sync(_active, self.hub.db, ids)
        for sub in list(self.subs):
            if sub.token_id is not None and sub.token_id not in active:
                self.subs.discard(sub)
                sub.close(dropped=True)


class FanOut:
    """The node's turn tails; ``frames`` is what a turn stream sends."""

    def __init__(self, db: Database, bus: EventBus, limits: Limits | None = None) -> None:
        self.db, self.bus = db, bus
        self.limits = limits or Limits()
        self.tails: dict[tuple[asyncio.AbstractEventLoop, str], TurnTail] = {}
        self.dropped = 0  # subscribers dropped for a full queue (for tests and benchmarks)
        self.direct = 0  # streams the tails wrote to directly (``direct.Sink``), likewise

    def tail(self, turn_id: str) -> TurnTail:
        key = (asyncio.get_running_loop(), turn_id)
        tail = self.tails.get(key)
        if tail is None:
            tail = self.tails[key] = TurnTail(self, key)
        return tail

    async def frames(
        self,
        turn_id: str,
        after: int,
        types: Collection[str] | None,
        token_id: str | None = None,
        sink: Sink | None = None,
    ) -> AsyncGenerator[bytes, None]:
        """The stream's bytes after event ``after``; with ``token_id``, it ends within
        ``KEEPALIVE_SECONDS`` of that token being revoked or expiring. With ``sink``, what
        comes once the stream caught up is written to it by the tail, not yielded: the
        generator then waits for the stream's end (the caller sends the body's end)."""
        tail = self.tail(turn_id)
        tail.users += 1
        sub = Subscriber(token_id)
        try:
            await tail.ready.wait()
            if tail.failed is not None:
                return
            start = tail.attach(sub)
            last = after
            while last < start.base:  # before the tail: from the database
                batch = await anyio.to_thread.run_sync(_replay, self.db, turn_id, last, start.base)
                frames = []
                for event in batch:
                    frames.append(encode(event))
                    if event.is_terminal:
                        break
                chunk = select_frames(frames, last, types)
                if chunk:
                    yield chunk
                if frames and frames[-1].terminal:
                    return
                last = frames[-1].id if len(batch) == READ_LIMIT else start.base
            held: list[Frame] = []
            for frame in start.frames:
                if frame.id <= last:
                    continue
                held.append(frame)
                if frame.terminal:
                    break
            chunk = select_frames(held, last, types)
            if chunk:
                yield chunk
            if held:
                if held[-1].terminal:
                    return
                last = held[-1].id
            if start.ended:
                if start.end:
                    yield start.end
                return
            if sink is not None:
                self.direct += 1
                if not sub.go_direct(sink, last, types, self.limits):
                    tail.drop(sub)
                    return
            while True:
                batches = await sub.take()
                if not batches:
                    return
                chunks = []
                for item in batches:
                    chunks.append(item.chunk(last, types))
                    last = max(last, item.last_id)
                    if item.ends:
                        break
                chunk = b"".join(chunks)
                if chunk:
                    yield chunk
                if item.ends:
                    return
        finally:
            tail.leave(sub)
