"""What the app keeps for its lifetime: settings, database, keys."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from openwham.commands import Deps, Runner, open_runner
from openwham.commands.prs import PrRefresher
from openwham.config import Settings
from openwham.locks import Locks, database_locks
from openwham.service.artifacts import check_store, open_store
from openwham.service.keys import SecretBox, check_fingerprint, secrets_key, signing_key
from openwham.service.rendercache import RenderCache
from openwham.store import jobs
from openwham.store.artifacts import ArtifactStore
from openwham.store.db import Database
from openwham.store.events import EventBus, LocalEventBus
from openwham.store.pgbus import event_bus

from .fanout import FanOut
from .readqueue import ReadQueue


def read_threads(settings: Settings) -> int:
    """``WHAM_READ_THREADS``, or its default by database (see ``Settings.read_threads``)."""
    if settings.read_threads is not None:
        wanted = settings.read_threads
    else:
        wanted = 2 if settings.sqlalchemy_url.startswith("sqlite") else 4
    return max(1, min(wanted, settings.db_pool_size))


@dataclass
class AppState:
    settings: Settings
    db: Database
    signing_key: bytes
    secret_box: SecretBox
    #: locks shared with every process and node on this database (PR pushes)
    locks: Locks
    #: wakes turn streams: across processes and nodes on PostgreSQL (``store.pgbus``)
    bus: EventBus = field(default_factory=LocalEventBus)
    runner: Runner | None = None
    fanout: FanOut = field(init=False)
    #: what later attempts read of earlier ones, on every node (forks copy, deletes remove)
    artifacts: ArtifactStore = field(init=False)
    #: rendered task details and list items, keyed by a digest of their rows
    renders: RenderCache = field(default_factory=RenderCache)
    #: asks forges whether the pull requests of tasks being read are still open
    pr_refresher: PrRefresher = field(default_factory=PrRefresher)

    #: the hot reads' threads, at most ``WHAM_READ_THREADS`` (``server.readqueue``)
    readers: ReadQueue = field(init=False)

    def __post_init__(self) -> None:
        self.fanout = FanOut(self.db, self.bus)
        self.artifacts = open_store(self.settings, self.db)
        self.readers = ReadQueue(read_threads(self.settings))

    @property
    def commands(self) -> Deps:
        """What application commands (``openwham.commands``) take from the app."""
        return Deps(
            settings=self.settings,
            bus=self.bus,
            artifacts=self.artifacts,
            locks=self.locks,
            executor=self.runner,
            writes=self.db.writes,
        )

    @classmethod
    def open(cls, settings: Settings, db: Database | None = None) -> AppState:
        """Open the database (migrating it), load or create the server keys and check that
        they are the database's (:class:`KeysMismatch` otherwise), and that the artifact
        store can be used (``ArtifactError`` otherwise). Under ``WHAM_EXECUTOR=queue``,
        apply the job queue's schema (``QueueConfigError`` when not on PostgreSQL)."""
        data_dir = settings.resolved_data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(data_dir, 0o700)  # database, keys, mirrors, attempts: the server's alone
        database = db or Database(settings.sqlalchemy_url, request_pool=settings.db_pool_size)
        database.migrate()
        if settings.executor == "queue":  # QueueConfigError: not PostgreSQL
            jobs.apply_schema(database)
        signing, sealing = signing_key(settings), secrets_key(settings)
        with database.session() as s:  # KeysMismatch: this node's keys are not the others'
            check_fingerprint(s, settings, signing, sealing)
        state = cls(
            settings=settings,
            db=database,
            signing_key=signing,
            secret_box=SecretBox(sealing),
            locks=database_locks(database.url, data_dir),
            bus=event_bus(database),
        )
        check_store(state.artifacts)
        state.runner = open_runner(settings, database, state.bus)
        return state
