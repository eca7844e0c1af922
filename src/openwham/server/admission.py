"""The admission gate: at most as many requests at work as the request pool has connections.

Request handlers are synchronous (SQLAlchemy sessions in AnyIO's worker threads). Without a
gate, more requests than connections took threads and then waited in ``pool.connect()``
inside them; once every worker thread waited so, the requests that held connections could
not get a thread back to finish, and nothing moved until the pool's 30 s timeout (issue 20,
confirmed with a stack dump: 40 threads in ``QueuePool._do_get`` under ``get_principal``).

The gate sits in front of the app, in async code, before any thread is taken:

- at most ``capacity`` requests (the request pool's size) are admitted at once, so every
  admitted request gets its connection without waiting, and a thread only ever waits for
  work that is running;
- the next ones wait on the event loop (no thread, no connection) in a FIFO queue of at most
  ``queue`` requests, each for at most ``wait`` seconds;
- beyond that, or after that wait, the answer is ``503`` with ``Retry-After`` at once.

A streamed response (``text/event-stream``: the turn streams) gives its slot back as soon as
its headers go out: a stream lives for minutes and reads the database through the engine's
pool in short steps, never through the request pool. ``/healthz`` and static files do not
pass the gate, so a load balancer's probe is answered under any load.
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

RETRY_AFTER_SECONDS = 1
# Paths that need no database connection from the request pool.
EXEMPT = ("/healthz", "/static/")


@dataclass(frozen=True)
class GateStats:
    capacity: int
    queue: int
    active: int
    waiting: int
    refused: int


class Gate:
    """A FIFO semaphore with a bounded queue of waiters and a bounded wait (event loop only)."""

    def __init__(self, capacity: int, queue: int, wait: float) -> None:
        self.capacity = max(1, capacity)
        self.queue = max(0, queue)
        self.wait = wait
        self.active = 0
        self.refused = 0
        self._waiters: deque[anyio.Event] = deque()

    def stats(self) -> GateStats:
        return GateStats(self.capacity, self.queue, self.active, len(self._waiters), self.refused)

    async def acquire(self) -> bool:
        """Take a slot; ``False`` when the queue is full or the wait ran out."""
        if self.active < self.capacity and not self._waiters:
            self.active += 1
            return True
        if len(self._waiters) >= self.queue:
            self.refused += 1
            return False
        ready = anyio.Event()
        self._waiters.append(ready)
        try:
            with anyio.move_on_after(self.wait):
                await ready.wait()
        except BaseException:  # cancelled (the server stops): leave no slot behind
            if ready.is_set():
                self.release()
            else:
                self._waiters.remove(ready)
            raise
        if ready.is_set():
            return True  # the releaser handed its slot over (``active`` unchanged)
        self._waiters.remove(ready)
        self.refused += 1
        return False

    def release(self) -> None:
        """Hand the slot to the first waiter, or free it."""
        if self._waiters:
            self._waiters.popleft().set()
        else:
            self.active -= 1


class AdmissionGate:
    """ASGI middleware around the app: every HTTP request but ``EXEMPT`` passes ``gate``."""

    def __init__(self, app: ASGIApp, gate: Gate) -> None:
        self.app = app
        self.gate = gate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or str(scope.get("path", "")).startswith(EXEMPT):
            await self.app(scope, receive, send)
            return
        if not await self.gate.acquire():
            await _busy(send)
            return
        held = True

        async def send_and_release(message: Message) -> None:
            nonlocal held
            if held and message["type"] == "http.response.start" and _streamed(message):
                held = False
                self.gate.release()
            await send(message)

        try:
            await self.app(scope, receive, send_and_release)
        finally:
            if held:
                self.gate.release()


def _streamed(message: Message) -> bool:
    for name, value in message.get("headers", []):
        if name.lower() == b"content-type":
            return bytes(value).lower().startswith(b"text/event-stream")
    return False


async def _busy(send: Send) -> None:
    body = json.dumps(
        {"detail": f"The server is busy; retry in {RETRY_AFTER_SECONDS} second(s)"}
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 503,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"retry-after", str(RETRY_AFTER_SECONDS).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
