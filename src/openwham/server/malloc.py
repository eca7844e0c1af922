"""glibc's malloc arenas for a server of many short-lived threads.

glibc gives threads their own arenas (up to 8 per core) and returns little of an arena's
freed memory to the system: a server whose attempts each start a few threads (heartbeat,
title, sandbox output readers, worker threads) grew ~3 MB of RSS per 32 tasks for good
(issue 20, ``python -m bench.memory``; with two arenas it stays within ~1 MB after
warm-up). ``wham serve`` caps the arenas at start, before its threads exist; a
``MALLOC_ARENA_MAX`` set in the environment wins.

What glibc still keeps is memory freed inside its heaps, between blocks in use: each round
of tasks left ~0.6 to 1.6 MB more of it (``mallinfo2``'s free bytes, ``python -m bench.memory``)
while the bytes in use grew only by the render cache's bounded entries. ``malloc_trim(0)``
hands those free pages back (``madvise``); ``wham serve`` and ``wham worker`` call it every
``TRIM_INTERVAL_SECONDS`` from a thread of its own (a few ms for a heap of ~150 MB).

glibc serves a block of 128 KiB or more with a mapping of its own, given back at ``free``,
but it raises that threshold to the size of any such block freed (up to 32 MiB), and from
then on serves blocks up to that size from the heap: one 20 MiB buffer freed whole (the
engine read every diff into one, engine/files.py) made each later one a 20 MiB hole in the
heap that stayed until it was trimmed (the RSS jumped by ~20 MB between rounds of tasks).
``wham serve`` and ``wham worker`` fix the threshold at ``MMAP_THRESHOLD`` (1 MiB), which
also stops it moving: a transient block of 1 MiB or more goes back to the system when freed.
A ``MALLOC_MMAP_THRESHOLD_`` in the environment wins.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
import time

M_ARENA_MAX = -8  # glibc's mallopt parameters
M_MMAP_THRESHOLD = -3
SERVER_ARENAS = 2
MMAP_THRESHOLD = 1 << 20
TRIM_INTERVAL_SECONDS = 10.0


def _mallopt(param: int, value: int, env: str) -> bool:
    """glibc's ``mallopt(param, value)`` unless ``env`` is set (the environment chose);
    whether it was done."""
    if not sys.platform.startswith("linux") or env in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(param, value))


def limit_arenas(count: int = SERVER_ARENAS) -> bool:
    """Cap glibc's malloc arenas at ``count``; whether it was done (not glibc, or the
    environment chose already: nothing to do)."""
    return _mallopt(M_ARENA_MAX, count, "MALLOC_ARENA_MAX")


def fix_mmap_threshold(size: int = MMAP_THRESHOLD) -> bool:
    """Serve blocks of ``size`` bytes or more with mappings of their own, given back when
    freed, and keep the threshold there; whether it was done."""
    return _mallopt(M_MMAP_THRESHOLD, size, "MALLOC_MMAP_THRESHOLD_")


def trim() -> bool:
    """Give the free pages inside glibc's heaps back to the system; whether any were."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        malloc_trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return False
    malloc_trim.argtypes = [ctypes.c_size_t]
    malloc_trim.restype = ctypes.c_int
    return bool(malloc_trim(0))


def start_trimming(interval: float = TRIM_INTERVAL_SECONDS) -> threading.Thread | None:
    """``trim`` every ``interval`` seconds in a daemon thread (None where there is no
    ``malloc_trim``)."""
    if not sys.platform.startswith("linux") or not hasattr(ctypes.CDLL(None), "malloc_trim"):
        return None

    def run() -> None:
        while True:
            time.sleep(interval)
            trim()

    thread = threading.Thread(target=run, name="malloc-trim", daemon=True)
    thread.start()
    return thread
