"""glibc's malloc arenas for a server of many short-lived threads.

glibc gives threads their own arenas (up to 8 per core) and returns little of an arena's
freed memory to the system: a server whose attempts each start a few threads (heartbeat,
title, sandbox output readers, worker threads) grew ~3 MB of RSS per 32 tasks for good
(issue 20, ``python -m bench.memory``; with two arenas it stays within ~1 MB after
warm-up). ``wham serve`` caps the arenas at start, before its threads exist; a
``MALLOC_ARENA_MAX`` set in the environment wins.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_ARENA_MAX = -8  # glibc's mallopt parameter
SERVER_ARENAS = 2


def limit_arenas(count: int = SERVER_ARENAS) -> bool:
    """Cap glibc's malloc arenas at ``count``; whether it was done (not glibc, or the
    environment chose already: nothing to do)."""
    if not sys.platform.startswith("linux") or "MALLOC_ARENA_MAX" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_ARENA_MAX, count))
