"""The hot reads' threads: at most N at once, and a busy thread takes the next read itself.

Task details and lists read and render in a worker thread (``server.deps.Reader``). Through
``anyio.to_thread.run_sync`` each read was one hand-off: the event loop queued it and woke an
idle worker thread (a futex wake with the GIL held, a cancel scope, the worker pool's run
variables), and the worker handed the answer back. Under a burst (64 task details arriving
together, issue 20) that was ~15 % of the server's time with the GIL, the loop's part of it
repeated for every request although both threads were busy anyway.

Here ``threads`` threads of the queue's own take reads from one FIFO queue: a read queued
while every thread is busy is only appended (no wake-up); the thread that finishes takes it
next, without going back through the event loop. A thread is woken only when one is idle,
started only when fewer than ``threads`` exist, and ends after ``idle_seconds`` without work.
Each answer goes back with ``call_soon_threadsafe``.

Cancellation is as with ``run_sync`` without ``abandon_on_cancel``: a read cancelled before a
thread took it is dropped; one already running is waited for (shielded) before the
cancellation goes on, so a read never outlives its request's slot in the admission gate and
the request pool's connections stay within the gate's count.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import anyio

T = TypeVar("T")

IDLE_SECONDS = 10.0


@dataclass(eq=False)
class _Read(Generic[T]):
    fn: Callable[[], T]
    future: asyncio.Future[T]
    loop: asyncio.AbstractEventLoop
    started: bool = False
    done: threading.Event = field(default_factory=threading.Event)


class ReadQueue:
    """Runs ``fn`` in one of at most ``threads`` threads, first come first served."""

    def __init__(self, threads: int, *, idle_seconds: float = IDLE_SECONDS) -> None:
        self.threads = max(1, threads)
        self.idle_seconds = idle_seconds
        self._cond = threading.Condition(threading.Lock())
        self._queue: deque[_Read[Any]] = deque()
        self._workers = 0
        self._idle = 0
        #: reads taken from the queue, and the threads woken or started for them: a read
        #: queued while every thread was busy cost no hand-off of its own
        self.reads = 0
        self.handoffs = 0

    @property
    def workers(self) -> int:
        """The queue's threads now (busy or idle)."""
        return self._workers

    async def run(self, fn: Callable[[], T]) -> T:
        loop = asyncio.get_running_loop()
        read: _Read[T] = _Read(fn, loop.create_future(), loop)
        with self._cond:
            self._queue.append(read)
            if self._idle:  # a thread waits for work: wake one (a no-op if it is woken)
                self.handoffs += 1
                self._cond.notify()
            elif self._workers < self.threads:
                self._workers += 1
                self.handoffs += 1
                threading.Thread(target=self._work, name="wham-read", daemon=True).start()
            # else every thread is busy: the first to finish takes it
        try:
            return await read.future
        except asyncio.CancelledError:
            with self._cond:
                running = read.started
                if not running:
                    self._queue.remove(read)
            if running and not read.done.is_set():  # let it end within the request
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(read.done.wait)
            raise

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._queue:
                    self._idle += 1
                    try:
                        woken = self._cond.wait(self.idle_seconds)
                    finally:
                        self._idle -= 1
                    if not woken and not self._queue:  # idle for long: end
                        self._workers -= 1
                        return
                read = self._queue.popleft()
                read.started = True
                self.reads += 1
            result, error = None, None
            try:
                result = read.fn()
            except BaseException as exc:  # handed to the awaiting request, raised there
                error = exc
            try:
                read.loop.call_soon_threadsafe(_settle, read.future, result, error)
            except RuntimeError:  # the loop closed meanwhile (the server stopped)
                pass
            finally:
                read.done.set()


def _settle(future: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    if future.done():  # cancelled meanwhile
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)
