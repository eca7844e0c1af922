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
transaction. An S3-compatible store would implement the same four methods
(docs/ARCHITECTURE.md says why there is none yet).
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Iterable
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
        if len(data) > self.max_bytes:
            raise ArtifactTooLarge(f"The artifact {name!r}", len(data), self.max_bytes)
        packed = zlib.compress(data, self.level)
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
        if codec != ZLIB:
            raise ArtifactError(f"The artifact {name!r} has an unknown encoding ({codec})")
        # bounded: a blob that would unpack to more than the cap is refused, not inflated
        inflate = zlib.decompressobj()
        try:
            data = inflate.decompress(packed, self.max_bytes + 1)
        except zlib.error as exc:
            raise ArtifactError(f"The artifact {name!r} is damaged ({exc})") from exc
        if len(data) > self.max_bytes or inflate.unconsumed_tail:
            raise ArtifactTooLarge(f"The artifact {name!r}", len(data), self.max_bytes)
        if not inflate.eof:
            raise ArtifactError(f"The artifact {name!r} is damaged (cut short)")
        return data

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
