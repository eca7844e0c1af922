"""Reading files an agent wrote, with a cap, without allocating the cap.

``f.read(limit)`` on a buffered file allocates ``limit`` bytes before it reads and shrinks
the result afterwards. The engine reads every attempt's diff (cap 20 MiB) and every file of
its Codex home (cap ``WHAM_ARTIFACT_MAX_MB``, 64 MiB) that way, almost always a few KB: a
block of 20 to 64 MiB per read. Freed whole (an empty diff), such a block also raised glibc's
mmap threshold to its size, so every later one came from the heap and left ~20 MiB free in
it after each round of tasks (issue 20, ``python -m bench.memory``). Here the first read
asks for what the file holds (plus one byte, to see it is over); only a file that grew since
it was looked at is read on in pieces.
"""

from __future__ import annotations

import os
from typing import BinaryIO

CHUNK = 1 << 20


def read_capped(f: BinaryIO, limit: int) -> bytes:
    """At most ``limit`` bytes of ``f`` from where it is, allocating about what it holds."""
    if limit <= 0:
        return b""
    size = os.fstat(f.fileno()).st_size - f.tell()
    data = f.read(max(0, min(limit, size + 1)))
    if len(data) <= size or len(data) >= limit:
        return data
    parts, got = [data], len(data)  # it grew since fstat: the rest in pieces
    while got < limit and (chunk := f.read(min(limit - got, CHUNK))):
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)
