"""What a later attempt needs from an earlier one, readable on every node: ``ArtifactStore``.

An attempt's files live in the data directory of the node that ran it; a follow-up or a
fork may run on another node (workers have their own data directories). What such a later
attempt reads of an earlier one goes through an :class:`ArtifactStore`: blobs addressed by
the attempt's turn id and a name (today one: the attempt's compacted Codex home, packed by
``engine.artifacts``). The attempt's diff is not one: it is in the turn's body in the
database, which every node reads already.

:class:`DatabaseArtifactStore` is the default: the ``artifacts`` table, zlib-compressed
(session rollouts are JSON lines, a fifth to a tenth of their size once compressed), each
blob at most ``max_bytes`` before compression (``WHAM_ARTIFACT_MAX_MB``); a row goes with
its turn (``ON DELETE CASCADE``), so deleting a task deletes its artifacts in the same
transaction. ``store.s3.S3ArtifactStore`` keeps the same blobs in an S3-compatible bucket
(``WHAM_ARTIFACT_STORE=s3``).
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Iterable, Iterator
from typing import Protocol

from sqlalchemy import delete, select

from . import models as m
from .db import Database

MAX_MB_SETTING = "WHAM_ARTIFACT_MAX_MB"
ZLIB = "zlib"
_CHUNK = 500  # ids per IN (...) list


class ArtifactError(Exception):
    """An artifact could not be stored or read; the message says why, for a user."""


class ArtifactTooLarge(ArtifactError):
    """More than the store keeps (``WHAM_ARTIFACT_MAX_MB``); the message names the setting."""

    def __init__(self, what: str, size: int, max_bytes: int) -> None:
        super().__init__(
            f"{what} is {_mb(size)} MB, more than the {_mb(max_bytes, up=False)} MB an "
            f"artifact may hold ({MAX_MB_SETTING})"
        )
        self.size, self.max_bytes = size, max_bytes


def _mb(n: int, *, up: bool = True) -> str:
    """``n`` bytes in MB to a tenth, rounded up (a size just over the cap never reads as
    the cap) or down."""
    tenths = -(-n * 10 // (1 << 20)) if up else n * 10 // (1 << 20)
    return f"{tenths / 10:.1f}".removesuffix(".0")


class ArtifactStore(Protocol):
    """Blobs by (turn id, name), shared by every node of one deployment."""

    #: the most one artifact may hold (uncompressed); ``put`` refuses more
    max_bytes: int

    def put(self, turn_id: str, name: str, data: bytes) -> None:
        """Store (or replace) the artifact; :class:`ArtifactTooLarge` above ``max_bytes``."""
        ...

    def get(self, turn_id: str, name: str) -> bytes | None:
        """The artifact, or ``None`` when there is none; never more than ``max_bytes``
        (:class:`ArtifactTooLarge`, also for a stored one that would unpack to more)."""
        ...

    def present(self, turn_ids: Iterable[str], name: str) -> set[str]:
        """Which of ``turn_ids`` have an artifact called ``name`` (without reading them)."""
        ...

    def delete(self, turn_ids: Iterable[str]) -> None:
        """Delete every artifact of these turns."""
        ...

    def turns(self) -> Iterator[str]:
        """Every turn id with an artifact stored: the orphan sweep (``engine.storage``)
        deletes those whose turn is gone, which a store outside the database's transactions
        can be left with."""
        ...


def deflate(name: str, data: bytes, max_bytes: int, level: int = 6) -> bytes:
    """``data`` compressed for a store; :class:`ArtifactTooLarge` above ``max_bytes``."""
    if len(data) > max_bytes:
        raise ArtifactTooLarge(f"The artifact {name!r}", len(data), max_bytes)
    return zlib.compress(data, level)


def inflate(name: str, codec: str, packed: bytes, max_bytes: int) -> bytes:
    """A stored blob uncompressed, with a bound: one that would inflate to more than
    ``max_bytes`` is refused (:class:`ArtifactTooLarge`), not inflated."""
    if codec != ZLIB:
        raise ArtifactError(f"The artifact {name!r} has an unknown encoding ({codec})")
    stream = zlib.decompressobj()
    try:
        data = stream.decompress(packed, max_bytes + 1)
    except zlib.error as exc:
        raise ArtifactError(f"The artifact {name!r} is damaged ({exc})") from exc
    if len(data) > max_bytes or stream.unconsumed_tail:
        raise ArtifactTooLarge(f"The artifact {name!r}", len(data), max_bytes)
    if not stream.eof:
        raise ArtifactError(f"The artifact {name!r} is damaged (cut short)")
    return data


def _chunks(ids: Iterable[str]) -> Iterable[list[str]]:
    items = list(dict.fromkeys(ids))
    for start in range(0, len(items), _CHUNK):
        yield items[start : start + _CHUNK]


class DatabaseArtifactStore:
    """The ``artifacts`` table on the deployment's database (SQLite or PostgreSQL)."""

    def __init__(self, db: Database, max_bytes: int, *, level: int = 6) -> None:
        self.db = db
        self.max_bytes = max_bytes
        self.level = level

    def put(self, turn_id: str, name: str, data: bytes) -> None:
        packed = deflate(name, data, self.max_bytes, self.level)
        with self.db.session() as s:
            row = s.get(m.Artifact, (turn_id, name))
            if row is None:
                row = m.Artifact(turn_id=turn_id, name=name)
                s.add(row)
            row.codec, row.size, row.data, row.created_at = ZLIB, len(data), packed, time.time()

    def get(self, turn_id: str, name: str) -> bytes | None:
        with self.db.sessions() as s:
            row = s.execute(
                select(m.Artifact.codec, m.Artifact.data).where(
                    m.Artifact.turn_id == turn_id, m.Artifact.name == name
                )
            ).first()
        if row is None:
            return None
        codec, packed = row
        return inflate(name, codec, packed, self.max_bytes)

    def present(self, turn_ids: Iterable[str], name: str) -> set[str]:
        found: set[str] = set()
        with self.db.sessions() as s:
            for chunk in _chunks(turn_ids):
                found.update(
                    s.scalars(
                        select(m.Artifact.turn_id).where(
                            m.Artifact.turn_id.in_(chunk), m.Artifact.name == name
                        )
                    )
                )
        return found

    def delete(self, turn_ids: Iterable[str]) -> None:
        with self.db.session() as s:
            for chunk in _chunks(turn_ids):
                s.execute(delete(m.Artifact).where(m.Artifact.turn_id.in_(chunk)))

    def turns(self) -> Iterator[str]:
        # rows go with their turn (ON DELETE CASCADE): none is an orphan, but the sweep
        # stays one code path for every store
        with self.db.sessions() as s:
            yield from s.scalars(select(m.Artifact.turn_id).distinct())
