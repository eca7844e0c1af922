"""Rendered answers keyed by a digest of every row they were rendered from.

Rendering task details (parsing the turns' JSON bodies, validating them into wire models and
serialising those) costs several times the queries that read the rows (issue 20). The
answer is a pure function of those rows, so it is kept under a digest of them: a request
still reads the rows (and its token's row) from the database, and a hit only skips the
rendering. Any write, on any node, changes a row, hence the digest: nothing stale can be
served, and nothing has to be invalidated. No timestamps are trusted (``updated_at`` is not
bumped by every write).

Bounded by entries and by bytes, least recently used out first: memory stays flat however
many tasks are read.
"""

from __future__ import annotations

import hashlib
import pickle
import threading
from collections import OrderedDict
from collections.abc import Hashable, Iterable, Sequence
from typing import Any

MAX_ENTRIES = 512
MAX_BYTES = 32 << 20


def digest(rows: Iterable[Sequence[Any]], *extra: Any) -> bytes:
    """A 128-bit digest of rows and of ``extra`` (what else the rendering depends on: the
    inline-diff limit). The values are pickled in one call (self-delimiting, so no two inputs
    run together; equal values pickled differently only cost a miss) and hashed with SHA-256,
    which this kind of CPU runs in hardware: a value-by-value BLAKE2 loop in Python cost a
    tenth of a cached request."""
    data = pickle.dumps(([tuple(row) for row in rows], extra), protocol=5)
    return hashlib.sha256(data).digest()[:16]


class RenderCache:
    """A thread-safe LRU of rendered answers (bytes) under ``(kind, id, digest)``."""

    def __init__(self, max_entries: int = MAX_ENTRIES, max_bytes: int = MAX_BYTES) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.size = 0
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[tuple[str, str], tuple[Hashable, bytes]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, kind: str, ident: str, key: Hashable) -> bytes | None:
        """The answer kept for ``(kind, ident)`` if it was rendered from ``key`` (a digest,
        or the rows themselves when they are small)."""
        with self._lock:
            entry = self._entries.get((kind, ident))
            if entry is None or entry[0] != key:
                self.misses += 1
                return None
            self._entries.move_to_end((kind, ident))
            self.hits += 1
            return entry[1]

    def get_many(self, kind: str, wanted: Sequence[tuple[str, Hashable]]) -> list[bytes | None]:
        """``get`` of each ``(ident, key)``, under one hold of the lock (a list page asks
        for a hundred)."""
        out: list[bytes | None] = []
        with self._lock:
            for ident, key in wanted:
                entry = self._entries.get((kind, ident))
                if entry is None or entry[0] != key:
                    self.misses += 1
                    out.append(None)
                    continue
                self._entries.move_to_end((kind, ident))
                self.hits += 1
                out.append(entry[1])
        return out

    def put(self, kind: str, ident: str, key: Hashable, value: bytes) -> None:
        """One entry per ``(kind, ident)``: a newer rendering replaces the older one."""
        if len(value) > self.max_bytes // 8:
            return  # a huge answer (a multi-MB diff) would push out everything else
        with self._lock:
            old = self._entries.pop((kind, ident), None)
            if old is not None:
                self.size -= len(old[1])
            self._entries[(kind, ident)] = (key, value)
            self.size += len(value)
            while self._entries and (
                len(self._entries) > self.max_entries or self.size > self.max_bytes
            ):
                _, (_, dropped) = self._entries.popitem(last=False)
                self.size -= len(dropped)

    def __len__(self) -> int:
        return len(self._entries)
