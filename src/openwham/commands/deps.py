"""What commands need from the running server, passed explicitly (no globals)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from sqlalchemy.orm import Session

from openwham.config import Settings
from openwham.engine.runner import Runner
from openwham.locks import Locks
from openwham.store.artifacts import ArtifactStore
from openwham.store.db import Database
from openwham.store.events import EventBus
from openwham.store.groupcommit import GroupCommit

__all__ = ["Deps", "ExecutorHandle", "Runner", "open_runner"]


class ExecutorHandle(Protocol):
    """The executor as commands see it. ``enqueue`` runs inside the transaction that wrote
    the attempts (a queue defers its jobs there: no task without its job), ``submit`` after
    the commit (the in-process executor queues them then)."""

    @property
    def problem(self) -> str | None:
        """Why this server cannot run tasks (new ones are refused with it), or ``None``."""
        ...

    def enqueue(self, session: Session, turn_ids: Iterable[str]) -> None: ...

    def submit(self, turn_ids: Iterable[str]) -> None: ...

    def cancel(self, turn_ids: Iterable[str]) -> None: ...

    def drop_stale_setup_cache(self, env_id: str) -> None:
        """After an environment's reset-cache, update or deletion committed: what this node
        keeps of its post-setup cache (snapshots, standbys started from them) that is no
        longer the environment's current cache generation, and that nothing holds, goes now."""
        ...


@dataclass(frozen=True, slots=True)
class Deps:
    """The server's parts a command may use."""

    settings: Settings
    bus: EventBus
    artifacts: ArtifactStore
    locks: Locks
    #: ``None`` when nothing runs attempts in this process (tests, ``WHAM_EXECUTOR=none``)
    executor: ExecutorHandle | None = None
    #: the database's writes (``Database.writes``): on SQLite ``POST tasks`` writes through
    #: its writer thread; ``None``: in the request's own session
    writes: GroupCommit | None = None


def open_runner(settings: Settings, db: Database, bus: EventBus) -> Runner:
    """The executor handle ``wham serve`` starts with the app (gateway, engine, executor)."""
    return Runner(settings, db, bus)
