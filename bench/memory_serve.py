"""``python -m bench.memory_serve serve …``: ``wham serve`` that reports where its memory is.

Only used by ``python -m bench.memory``: with ``BENCH_SNAPSHOTS`` set, each ``SIGUSR1`` (after
a ``gc.collect()``) writes ``stats-<n>.json`` there: what glibc's heap holds in use and free
(``mallinfo2``), what SQLite's allocator holds (``sqlite3_memory_used``, every connection's
page cache included), the render cache's entries and bytes (the answers and what keeps
them), Python's allocated blocks, the threads and open files, SQLAlchemy's compiled-statement
caches, the container objects by type, and RSS before and after ``malloc_trim``.
With ``BENCH_TRACEMALLOC=N`` (frames, 0 = off), tracing starts at the first signal (after
the warm-up: tracing the start-up took minutes) and each signal also writes
``snap-<n>.pickle`` so the bench can follow the sites of what was allocated since. With
``BENCH_PEAK_MB=M``, a thread watches the heap's bytes in use and keeps every thread's
stack (and a snapshot, when tracing) at the round's highest point once it is ``M`` MB over
the round's start (``peak-<n>.json``, ``peak-<n>.pickle``).
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import signal
import sys
import threading
import time
import traceback
import tracemalloc
import weakref
from collections import Counter, deque
from pathlib import Path
from types import FrameType
from typing import Any

from bench.heapgrowth import MARK

_dir = os.environ.get("BENCH_SNAPSHOTS", "")
_frames = int(os.environ.get("BENCH_TRACEMALLOC", "0") or 0)
_peak_mb = float(os.environ.get("BENCH_PEAK_MB", "0") or 0)
_render_entries = int(os.environ.get("BENCH_RENDER_ENTRIES", "0") or 0)
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


def _rss(field: str = "VmRSS") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    return 0


_libc = ctypes.CDLL(None)  # not find_library: it runs ldconfig or gcc each time
_libc.mallinfo2.restype = _MallInfo2
_libc.malloc_trim.argtypes = [ctypes.c_size_t]
_libc.malloc.argtypes = [ctypes.c_size_t]
_libc.malloc.restype = ctypes.c_void_p
_libc.free.argtypes = [ctypes.c_void_p]


def _mallinfo() -> _MallInfo2:
    return _libc.mallinfo2()  # type: ignore[no-any-return]


class _Peaks:
    """Watches the heap's bytes in use (every 10 ms) between two dumps and, each time they
    reach a new high at least ``BENCH_PEAK_MB`` over where the round began, keeps every
    thread's stack (and a tracemalloc snapshot when tracing): what held the memory then."""

    def __init__(self, threshold: int) -> None:
        self.threshold = threshold
        self.lock = threading.Lock()
        self.started = False  # by the first dump: the server's start-up is not watched
        self.reset()

    def reset(self) -> None:
        self.base = _mallinfo().uordblks
        self.high = self.base
        self.caught: dict[str, Any] = {}
        self.snapshot: tracemalloc.Snapshot | None = None

    def _run(self) -> None:
        me = threading.get_ident()
        while True:
            time.sleep(0.01)
            used = _mallinfo().uordblks
            with self.lock:
                if used <= self.high:
                    continue
                self.high = used
                if used - self.base < self.threshold:
                    continue
                if self.caught and used - self.caught["in_use"] < 2 << 20:
                    continue
                names = {t.ident: t.name for t in threading.enumerate()}
                stacks = {  # no source lines: linecache would fill the heap it watches
                    f"{names.get(ident, ident)}": [
                        f'File "{f.filename}", line {f.lineno}, in {f.name}'
                        for f in traceback.StackSummary.extract(
                            traceback.walk_stack(frame), limit=12, lookup_lines=False
                        )
                    ][::-1]
                    for ident, frame in sys._current_frames().items()
                    if ident != me
                }
                self.caught = {"in_use": used, "over": used - self.base, "stacks": stacks}
                if _frames:
                    self.snapshot = tracemalloc.take_snapshot()

    def dump(self, n: int) -> dict[str, Any]:
        with self.lock:
            out = {"peak_over": self.high - self.base}
            if self.caught:
                (Path(_dir) / f"peak-{n}.json").write_text(json.dumps(self.caught))
                if self.snapshot is not None:
                    self.snapshot.dump(str(Path(_dir) / f"peak-{n}.pickle"))
            self.reset()
            if not self.started:
                self.started = True
                threading.Thread(target=self._run, name="bench-peaks", daemon=True).start()
        return out


_peaks: _Peaks | None = None
# what the server made, found without gc.get_objects (which skips what ``wham serve``
# froze after its start-up, server/gcpause.py)
_made: dict[str, weakref.WeakSet[Any]] = {"render": weakref.WeakSet(), "engine": weakref.WeakSet()}


def _register() -> None:
    from sqlalchemy import event
    from sqlalchemy.engine import Connection, Engine

    from openwham.service.rendercache import RenderCache

    init = RenderCache.__init__

    def registered(self: RenderCache, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        if _render_entries:  # a smaller bound: the cache is full after a round or two
            self.max_entries = _render_entries
        _made["render"].add(self)

    RenderCache.__init__ = registered  # type: ignore[method-assign]

    def connected(conn: Connection) -> None:
        _made["engine"].add(conn.engine)

    event.listen(Engine, "engine_connect", connected)


_mallctl = getattr(_libc, "mallctl", None)  # jemalloc's, when it was preloaded
if _mallctl is not None:
    _mallctl.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_void_p]
    _mallctl.argtypes += [ctypes.c_void_p, ctypes.c_size_t]
    _mallctl.restype = ctypes.c_int


def _jemalloc(name: str) -> int:
    value = ctypes.c_size_t(0)
    size = ctypes.c_size_t(ctypes.sizeof(value))
    assert _mallctl is not None
    _mallctl(name.encode(), ctypes.byref(value), ctypes.byref(size), None, 0)
    return value.value


def _jemalloc_stats() -> dict[str, Any]:
    """jemalloc's counters (``stats.*`` after an ``epoch`` refresh) in the glibc figures'
    names: bytes allocated, and resident but not allocated as "free"."""
    assert _mallctl is not None
    epoch = ctypes.c_uint64(1)
    _mallctl(b"epoch", None, None, ctypes.byref(epoch), ctypes.sizeof(epoch))
    allocated, resident = _jemalloc("stats.allocated"), _jemalloc("stats.resident")
    return {
        "malloc_in_use": allocated,
        "malloc_mmapped": 0,
        "malloc_free": resident - allocated,  # dirty pages and metadata jemalloc keeps
        "malloc_arena": _jemalloc("stats.mapped"),
        "jemalloc_active": _jemalloc("stats.active"),
        "jemalloc_retained": _jemalloc("stats.retained"),
    }


def _trim() -> None:
    """Give free pages back: glibc's ``malloc_trim``, or every jemalloc arena's purge."""
    if _mallctl is not None:
        _mallctl(b"arena.4096.purge", None, None, None, 0)  # MALLCTL_ARENAS_ALL
    else:
        _libc.malloc_trim(0)


def _native() -> dict[str, Any]:
    out: dict[str, Any] = {}
    if _mallctl is not None:
        out.update(_jemalloc_stats())
    else:
        info = _mallinfo()
        out["malloc_in_use"] = info.uordblks + info.hblkhd  # allocated, small and mmapped
        out["malloc_mmapped"] = info.hblkhd  # of which mmapped (returned at free)
        out["malloc_free"] = info.fordblks  # free in the heaps, not returned to the system
        out["malloc_arena"] = info.arena  # the heaps' size (in use + free)
    import sqlite3  # noqa: F401  (loads the same libsqlite3 the server uses)

    lib = ctypes.CDLL("libsqlite3.so.0")
    lib.sqlite3_memory_used.restype = ctypes.c_int64
    out["sqlite_in_use"] = lib.sqlite3_memory_used()
    out["rss_before_trim"] = _rss()
    _trim()
    out["rss_trimmed"] = _rss()
    out["rss_anon"] = _rss("RssAnon")  # after the trim: the heaps, Python's arenas, stacks
    out["rss_file"] = _rss("RssFile")  # mapped files: the code and libraries' pages touched
    return out


def _pymalloc() -> dict[str, int]:
    """Python's own allocator (``sys._debugmallocstats``, which writes to fd 2): its arenas
    (1 MiB mappings, outside glibc's heap, given back only when wholly empty) and the bytes
    in their blocks in use and free."""
    import re
    import tempfile

    with tempfile.TemporaryFile() as out:
        saved = os.dup(2)
        try:
            os.dup2(out.fileno(), 2)
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        out.seek(0)
        text = out.read().decode(errors="replace")
    found: dict[str, int] = {}
    for key, pattern in (
        ("pymalloc_arenas", r"# arenas allocated current\s*=\s*([\d,]+)"),
        ("pymalloc_in_use", r"# bytes in allocated blocks\s*=\s*([\d,]+)"),
        ("pymalloc_free", r"# bytes in available blocks\s*=\s*([\d,]+)"),
        ("pymalloc_total", r"Total\s*=\s*([\d,]+)"),
    ):
        m = re.search(pattern, text)
        found[key] = int(m.group(1).replace(",", "")) if m else 0
    return found


def _render_cache() -> dict[str, int]:
    """The render caches' entries, answer bytes and everything that holds them (the answer
    objects, keys, digests and tuples; the ordered dict's nodes at ~100 bytes each)."""
    caches = list(_made["render"])
    entries = held = 0
    for cache in caches:
        with cache._lock:
            items = list(cache._entries.items())
        entries += len(items)
        for (kind, ident), (key, value) in items:
            held += 100 + sys.getsizeof((kind, ident)) + sys.getsizeof(ident)
            held += sys.getsizeof((key, value)) + sys.getsizeof(key) + sys.getsizeof(value)
    return {
        "render_cache_entries": entries,
        "render_cache_bytes": sum(c.size for c in caches),
        "render_cache_held": held,
    }


def _sqlalchemy() -> dict[str, int]:
    engines = list(_made["engine"])
    compiled = sum(len(e._compiled_cache or ()) for e in engines)
    return {"sqlalchemy_engines": len(engines), "sqlalchemy_compiled": compiled}


_CONTAINERS = (dict, list, set, frozenset, deque, tuple)


def _containers(least: int = 8) -> dict[str, list[Any]]:
    """``BENCH_CONTAINERS=1``: every container of ``least`` items or more reachable from the
    modules and the threads' frames (frozen objects too, which ``gc.get_objects`` leaves out),
    by id: its type, length and a path from a module (``module.attr.key…``), so that the bench
    can find a registry that keeps one entry per task. A breadth-first walk of the whole
    object graph: seconds, and a transient heap of tens of MB (a diagnostic run only)."""
    parent: dict[int, tuple[int, str]] = {}
    keep: dict[int, Any] = {}  # what was walked stays alive until the paths are made
    queue: deque[Any] = deque()

    def push(obj: Any, up: int, label: str) -> None:
        i = id(obj)
        if i in parent or isinstance(obj, (str, bytes, int, float, type(None), bool)):
            return
        parent[i] = (up, label)
        keep[i] = obj
        queue.append(obj)

    for name, module in list(sys.modules.items()):
        if module is not None:
            push(module, 0, name)
    for ident, top in sys._current_frames().items():
        push(top, 0, f"<thread {ident}>")
    found: dict[str, list[Any]] = {}
    while queue:
        obj = queue.popleft()
        me = id(obj)
        try:
            if isinstance(obj, dict):
                for k, v in list(obj.items()):
                    label = k if isinstance(k, str) else f"[{type(k).__name__}]"
                    push(v, me, label[:40])
                    push(k, me, "<key>")
                n = len(obj)
            elif isinstance(obj, _CONTAINERS):
                for v in list(obj):
                    push(v, me, "[]")
                n = len(obj)
            else:
                for v in gc.get_referents(obj):
                    push(v, me, "" if isinstance(v, dict) else f"<{type(v).__name__}>")
                continue
        except Exception:  # a container changed by another thread meanwhile
            continue
        if n >= least and not isinstance(obj, (tuple, frozenset)):
            found[str(me)] = [type(obj).__name__, n, me]
    for row in found.values():
        labels: list[str] = []
        i = row.pop()
        while i and len(labels) < 24:
            i, label = parent[i]
            labels.append(label)
        row.append(".".join(label for label in reversed(labels) if label))
    keep.clear()  # it holds this frame (a cycle): freed now, not at some later collection
    parent.clear()
    return found


def _dump(signum: int, frame: FrameType | None) -> None:
    global _count
    _count += 1
    if os.environ.get("BENCH_MARK"):  # a mark in heaptrack's trace (bench.heapgrowth)
        _libc.free(_libc.malloc(MARK + _count))
    peak = _peaks.dump(_count) if _peaks is not None else {}  # before this dump allocates
    gc.collect()
    stats = _native()
    stats.update(peak)
    objects = gc.get_objects()
    stats.update(_render_cache())
    stats.update(_pymalloc())
    stats.update(_sqlalchemy())
    stats["python_objects"] = len(objects) + gc.get_freeze_count()
    stats["python_blocks"] = sys.getallocatedblocks()
    stats["threads"] = len(os.listdir("/proc/self/task"))
    stats["python_threads"] = threading.active_count()
    stats["fds"] = len(os.listdir("/proc/self/fd"))
    types = Counter(f"{type(o).__module__}.{type(o).__qualname__}" for o in objects)
    del objects
    if _frames and not tracemalloc.is_tracing():  # from the first dump: tracing the
        tracemalloc.start(_frames)  # start-up (imports) took minutes; growth is newer
    if _frames:
        tracemalloc.take_snapshot().dump(str(Path(_dir) / f"snap-{_count}.pickle"))
        stats["traced"] = tracemalloc.get_traced_memory()[0]
    (Path(_dir) / f"types-{_count}.json").write_text(json.dumps(types))
    if os.environ.get("BENCH_CONTAINERS"):
        found = _containers()
        (Path(_dir) / f"containers-{_count}.json").write_text(json.dumps(found))
    (Path(_dir) / f"stats-{_count}.json").write_text(json.dumps(stats))
    (Path(_dir) / f"snap-{_count}.done").touch()


def main() -> None:
    # jemalloc (``--allocator jemalloc``) is this process's allocator only: not its children's
    os.environ.pop("LD_PRELOAD", None)
    os.environ.pop("MALLOC_CONF", None)
    os.environ.pop("GLIBC_TUNABLES", None)
    if _dir:
        signal.signal(signal.SIGUSR1, _dump)
        _register()
        if _peak_mb:
            global _peaks
            _peaks = _Peaks(int(_peak_mb * 2**20))
    from openwham.cli.main import main as wham_main

    wham_main()


if __name__ == "__main__":
    main()
