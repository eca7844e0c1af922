"""``server.readqueue.ReadQueue``: the hot reads' threads (no server, no database)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

import pytest

from openwham.server.readqueue import ReadQueue


def test_reads_queued_while_the_threads_are_busy_cost_no_hand_off_and_keep_their_order() -> None:
    queue = ReadQueue(2)
    release = threading.Event()
    inside = peak = 0
    order: list[int] = []
    lock = threading.Lock()

    def read(i: int) -> int:
        nonlocal inside, peak
        with lock:
            inside += 1
            peak = max(peak, inside)
            order.append(i)
        release.wait(10)
        time.sleep(0.002)
        with lock:
            inside -= 1
        return i * 10

    async def main() -> list[int]:
        tasks = [asyncio.create_task(queue.run(lambda i=i: read(i))) for i in range(12)]
        await _until(lambda: inside == 2)  # both threads hold a read, ten wait in the queue
        release.set()
        return await asyncio.gather(*tasks)

    assert asyncio.run(main()) == [i * 10 for i in range(12)]
    assert peak == 2
    assert order[:2] == sorted(order[:2]) and order[2:] == list(range(2, 12))  # FIFO
    assert queue.reads == 12
    assert queue.handoffs == 2  # the two threads' starts; the other ten were taken by them


async def _until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)


def test_an_error_is_raised_in_the_awaiting_request() -> None:
    queue = ReadQueue(1)

    def broken() -> int:
        raise LookupError("no such task")

    async def main() -> None:
        with pytest.raises(LookupError, match="no such task"):
            await queue.run(broken)
        assert await queue.run(lambda: 7) == 7  # the thread goes on

    asyncio.run(main())


def test_a_cancelled_read_is_dropped_if_queued_and_waited_for_if_running() -> None:
    queue = ReadQueue(1)
    release = threading.Event()
    ran: list[str] = []

    def slow() -> None:
        ran.append("slow")
        release.wait(10)
        time.sleep(0.2)
        ran.append("slow done")

    async def main() -> None:
        running = asyncio.create_task(queue.run(slow))
        queued = asyncio.create_task(queue.run(lambda: ran.append("queued")))
        await _until(lambda: ran == ["slow"])
        queued.cancel()
        with pytest.raises(asyncio.CancelledError):
            await queued
        running.cancel()
        await asyncio.sleep(0.05)
        assert not running.done()  # held until its read ends
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await running
        assert ran == ["slow", "slow done"]  # the running read ended first
        assert await queue.run(lambda: 1) == 1

    asyncio.run(main())
    assert "queued" not in ran


def test_idle_threads_end_and_come_back() -> None:
    queue = ReadQueue(2, idle_seconds=0.1)
    ours: set[threading.Thread] = set()

    def read(value: int) -> int:
        ours.add(threading.current_thread())
        time.sleep(0.05)
        return value

    async def main() -> None:
        both = await asyncio.gather(queue.run(lambda: read(1)), queue.run(lambda: read(2)))
        assert both == [1, 2] and len(ours) == 2  # two threads, at once
        deadline = time.monotonic() + 10
        while queue.workers and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert queue.workers == 0
        for thread in ours:
            thread.join(5)
            assert not thread.is_alive()
        assert await queue.run(lambda: 3) == 3  # a new thread starts

    asyncio.run(main())
