"""``python -m bench.memory_serve serve …``: ``wham serve`` that reports where its memory is.

Only used by ``python -m bench.memory``: with ``BENCH_SNAPSHOTS`` set, each ``SIGUSR1`` (after
a ``gc.collect()``) writes ``stats-<n>.json`` there: what glibc's heap holds in use and free
(``mallinfo2``), what SQLite's allocator holds (``sqlite3_memory_used``, every connection's
page cache included), the render cache's entries and bytes, and the Python objects by count.
With ``BENCH_TRACEMALLOC=1`` too, tracing starts before openwham is imported and each signal
also writes ``snap-<n>.pickle`` so the bench can diff allocation sites between rounds.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import json
import os
import signal
import tracemalloc
from pathlib import Path
from types import FrameType
from typing import Any

_dir = os.environ.get("BENCH_SNAPSHOTS", "")
_trace = os.environ.get("BENCH_TRACEMALLOC") == "1"
_count = 0


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _native() -> dict[str, Any]:
    out: dict[str, Any] = {}
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.mallinfo2.restype = _MallInfo2
    info = libc.mallinfo2()
    out["malloc_in_use"] = info.uordblks + info.hblkhd  # allocated, small and mmapped
    out["malloc_free"] = info.fordblks  # free in the heaps, not returned to the system
    import sqlite3  # noqa: F401  (loads the same libsqlite3 the server uses)

    lib = ctypes.CDLL("libsqlite3.so.0")
    lib.sqlite3_memory_used.restype = ctypes.c_int64
    out["sqlite_in_use"] = lib.sqlite3_memory_used()
    return out


def _dump(signum: int, frame: FrameType | None) -> None:
    global _count
    gc.collect()
    _count += 1
    stats = _native()
    from openwham.service.rendercache import RenderCache

    caches = [o for o in gc.get_objects() if isinstance(o, RenderCache)]
    stats["render_cache_entries"] = sum(len(c) for c in caches)
    stats["render_cache_bytes"] = sum(c.size for c in caches)
    stats["python_objects"] = len(gc.get_objects())
    if _trace:
        tracemalloc.take_snapshot().dump(str(Path(_dir) / f"snap-{_count}.pickle"))
        stats["traced"] = tracemalloc.get_traced_memory()[0]
    (Path(_dir) / f"stats-{_count}.json").write_text(json.dumps(stats))
    (Path(_dir) / f"snap-{_count}.done").touch()


def main() -> None:
    if _dir:
        if _trace:
            tracemalloc.start(12)
        signal.signal(signal.SIGUSR1, _dump)
    from openwham.cli.main import main as wham_main

    wham_main()


if __name__ == "__main__":
    main()
