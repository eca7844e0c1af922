"""What ``wham serve`` starts to run tasks: the model gateway, the engine and an executor.

If bubblewrap cannot create sandboxes here, nothing is started and ``problem`` says why and
how to fix it: the server then refuses new tasks with that message. There is no unsandboxed
mode. A misconfigured model upstream does not stop the server: each attempt fails with the
message that names the setting to fix.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from sqlalchemy.orm import Session

from openwham.config import Settings
from openwham.gateway import (
    Gateway,
    GatewayConfigError,
    GatewayServer,
    check_config,
    default_socket_path,
)
from openwham.gateway.server import MAX_SOCKET_PATH
from openwham.sandbox.provider import BUBBLEWRAP, SandboxProvider
from openwham.store import jobs
from openwham.store.db import Database
from openwham.store.events import EventBus

from .attempt import Engine
from .executor import Executor, InProcessExecutor
from .queue import QueueExecutor
from .setup_cache import cache_generations

log = logging.getLogger(__name__)


def _socket_path(settings: Settings) -> Path:
    path = default_socket_path(settings)
    if len(os.fsencode(path)) <= MAX_SOCKET_PATH:
        return path
    short = Path(tempfile.mkdtemp(prefix="wham-gw-")) / "gateway.sock"
    log.info("data directory path too long for a UNIX socket; gateway socket at %s", short)
    return short


@dataclass
class Runner:
    settings: Settings
    db: Database
    bus: EventBus
    problem: str | None = None
    engine: Engine | None = None
    executor: Executor | None = None
    gateway_server: GatewayServer | None = field(default=None, repr=False)
    #: the sandboxes the engine runs attempts in (bubblewrap; a fake in fast tests)
    sandbox: SandboxProvider = field(default=BUBBLEWRAP, repr=False)

    @property
    def queued(self) -> bool:
        """Whether attempts are procrastinate jobs (``WHAM_EXECUTOR=queue``)."""
        return self.settings.executor == "queue"

    def start(self) -> Runner:
        if self.settings.executor == "none":
            self.problem = None  # API only: another process runs attempts
            return self
        if self.settings.executor not in ("inprocess", "queue"):
            self.problem = (
                f"unknown WHAM_EXECUTOR {self.settings.executor!r}: use inprocess, queue or none"
            )
            return self
        if self.queued and self.settings.executor_concurrency == 0:
            self.problem = None  # API only: `wham worker` nodes run the jobs
            return self
        problem = self.sandbox.selftest()
        if problem is not None:
            self.problem = f"This server cannot run tasks: {problem}"
            log.error("%s", self.problem)
            return self
        for gap in self.sandbox.host_gaps():
            log.warning("sandbox limit not enforced on this host: %s", gap)
        log.info("disk budget: %s", self.sandbox.disk_enforcement(self.settings.sandbox_disk_mb))
        gateway_problem = check_config(self.settings)
        gateway: Gateway | None = None
        socket_path: Path | None = None
        if gateway_problem is None:
            try:
                gateway = Gateway.from_settings(self.settings)
            except GatewayConfigError as exc:
                gateway_problem = str(exc)
        if gateway is not None:
            socket_path = _socket_path(self.settings)
            self.gateway_server = GatewayServer(gateway, socket_path).start()
        else:
            log.error("model upstream: %s (tasks will fail until this is fixed)", gateway_problem)
        self.engine = Engine(
            settings=self.settings,
            db=self.db,
            bus=self.bus,
            gateway=gateway,
            gateway_socket=socket_path,
            gateway_problem=gateway_problem,
            sandbox=self.sandbox,
        )
        executor: InProcessExecutor | QueueExecutor
        if self.queued:
            executor = QueueExecutor(self.engine, self.settings.concurrency)
        else:
            executor = InProcessExecutor(self.engine, self.settings.concurrency)
        executor.start()
        log.info(
            "running tasks%s: %d %s at a time in bubblewrap sandboxes; model %s via %s",
            " from the queue" if self.queued else "",
            executor.concurrency,
            "attempt(s)" if self.queued else "task(s) (a best-of-N task's attempts together)",
            self.settings.model,
            self.settings.model_provider,
        )
        self.executor = executor
        return self

    def enqueue(self, s: Session, turn_ids: Iterable[str]) -> None:
        """Before the commit that creates or requeues pending attempts: under the queue
        executor their jobs go into that same transaction (``store.jobs.defer``)."""
        if self.queued:
            jobs.defer(s, turn_ids)

    def submit(self, turn_ids: Iterable[str]) -> None:
        """After that commit: the in-process executor queues them in memory."""
        if self.executor is not None:
            self.executor.submit(turn_ids)

    def drop_stale_setup_cache(self, env_id: str) -> None:
        """After an environment's reset-cache, update or deletion committed: its standbys
        started from a snapshot and its snapshots of an older cache generation (a changed
        setup script, variable, secret, repository or invalidation key; all of them once it
        is deleted) that no sandbox or attempt holds go now, here (a queue worker's go at its
        next sweep, ``engine.queue``). An update that changed none of those drops nothing."""
        if self.engine is not None:
            current = partial(cache_generations, self.db)
            self.engine.workspaces.drop_stale_caches(current, only=env_id)

    def cancel(self, turn_ids: Iterable[str]) -> None:
        """After a cancel committed: stop the sandboxes here, and under the queue executor
        ask whichever worker runs each attempt to abort it (procrastinate's job abort)."""
        ids = list(turn_ids)
        if self.executor is not None:
            for turn_id in ids:
                self.executor.cancel(turn_id)
        if self.queued and ids:
            with self.db.session() as s:
                jobs.abort(s, ids)

    def stop(self) -> None:
        if self.executor is not None:
            self.executor.stop()
            self.executor = None
        if self.engine is not None:
            self.engine.close()
        if self.gateway_server is not None:
            self.gateway_server.stop()
            self.gateway_server = None
