"""``Engine.run_turn``: one attempt from ``pending`` to a terminal status.

The engine orchestrates its parts: claim the turn (claim.py: ``pending → in_progress``,
conditional, so two executors never run one turn), take a standby or prepare the workspace
and start the agent (workspace.py, agent.py: the Codex CLI in a sandbox that reaches its model
only through the gateway), follow the agent's output into the work log and status line
(agent.py), and write the result with its diff (result.py). Everything the attempt does is
recorded by a :class:`TurnRecorder` as it happens.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import socket
import tempfile
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import select

from openwham.config import Settings
from openwham.gateway import Gateway
from openwham.gateway.server import MAX_SOCKET_PATH
from openwham.runtimes.agent import AgentRuntime
from openwham.runtimes.appserver import codex_runtime
from openwham.runtimes.codex import CODEX
from openwham.sandbox.bwrap import Limits, SandboxResult
from openwham.sandbox.egress import AddressGuard, EgressProxy
from openwham.sandbox.provider import BUBBLEWRAP, Sandbox, SandboxProvider
from openwham.sandbox.workspace import Mirrors, local_repo_policy
from openwham.service.artifacts import check_store, open_store
from openwham.store import models as m
from openwham.store.artifacts import ArtifactStore
from openwham.store.db import Database
from openwham.store.events import EventBus
from openwham.store.status import TurnStatus

from . import storage, turns
from .agent import CLOSE_SECONDS, AgentRun, AgentStarter
from .claim import Claim, Claims
from .control import AttemptFailed as AttemptFailed  # re-exported: executors import them here
from .control import Control as Control
from .control import Stopped, attempt_limits
from .recorder import SUPERSEDED, TurnRecorder
from .result import Results, redactor
from .standby import AgentKey
from .titling import Titles
from .workspace import Workspaces, remove_orphaned_standbys, setup_snapshots, shared_checkouts

log = logging.getLogger(__name__)

FAILED = "Failed"
CANCELLED = "Cancelled"
STATUS_POLL_SECONDS = 1.0
HEARTBEAT_POLL_SECONDS = 0.5
#: how long an ended agent's last lines may take to be read before its outcome is judged
#: (a reader waits for the database only when its recorder's queue is full)
OUTPUT_DRAIN_SECONDS = 60.0
CLOSED_MARKER = storage.CLOSED_MARKER


@dataclass
class Engine:
    """Runs attempts. One per process; ``run_turn`` is safe to call from many threads."""

    settings: Settings
    db: Database
    bus: EventBus
    gateway: Gateway | None
    gateway_socket: Path | None
    gateway_problem: str | None = None
    executor_id: str = field(
        default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    )
    #: makes the attempts' sandboxes (sandbox/provider.py; a fake in fast tests)
    sandbox: SandboxProvider = BUBBLEWRAP
    #: the coding agent the attempts run (runtimes/agent.py; the Codex CLI)
    runtime: AgentRuntime = CODEX
    #: what later attempts read of earlier ones on any node (engine/storage.py)
    artifacts: ArtifactStore = field(init=False, repr=False)
    #: an attempt's workspace and started agent, and the standbys (engine/workspace.py)
    workspaces: Workspaces = field(init=False, repr=False)
    #: finishes an attempt with its result (engine/result.py; only with a gateway)
    results: Results = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.runtime is CODEX:  # the default: Codex run as WHAM_CODEX_MODE says
            self.runtime = codex_runtime(self.settings.codex_mode)
        self._runs: dict[str, str | None] = {}  # turn id -> the run id this process runs
        data = self.settings.resolved_data_dir
        self.claims = Claims(self.settings, self.db, self.bus, self.executor_id)
        self.titles = Titles(self.settings, self.db, self.bus)
        self.artifacts = open_store(self.settings, self.db)
        check_store(self.artifacts)  # a worker with a wrong bucket or keys stops here
        self.attempts_root = data / "attempts"
        self.attempts_root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.attempts_root, 0o700)
        egress = EgressProxy(
            _socket_dir(data / "run" / "egress"),
            AddressGuard.from_setting(self.settings.egress_allow_networks),
        )
        remove_orphaned_standbys(self.attempts_root)
        storage.sweep(self.attempts_root, self.db, self.artifacts)
        self.orphans = storage.OrphanSweeper(self.db, self.artifacts).start()
        storage.sweep_scratch(data / "tmp")
        agents = None
        if self.gateway is not None:
            self.results = Results(self.db, self.gateway, self.titles, self.sandbox)
            if self.gateway_socket is not None:
                agents = AgentStarter(
                    self.settings,
                    self.gateway,
                    self.gateway_socket,
                    self.runtime,
                    self.sandbox,
                    self.attempts_root,
                    self.artifacts,
                    egress,
                )
        checkouts = shared_checkouts(self.settings, self.sandbox, data / "checkouts")
        self.workspaces = Workspaces(
            self.settings,
            self.sandbox,
            self.gateway,
            Mirrors(data / "mirrors", local_repo_policy(self.settings)),
            self.attempts_root,
            egress,
            agents,
            checkouts,
            setup_snapshots(self.settings, checkouts, data / "setup-cache"),
        )
        self.standby = self.workspaces.standby  # the queue executor offers its ready ones

    def close(self) -> None:
        """Drop the standby sandboxes (the server is stopping)."""
        self.orphans.stop()
        self.workspaces.close()
        self.workspaces.egress.stop()

    @property
    def limits(self) -> Limits:
        return attempt_limits(self.settings)

    # ------------------------------------------------------------------ entry point

    def run_turn(self, turn_id: str, control: Control | None = None) -> str | None:
        """Run one pending attempt to its end. Returns its final status, or ``None`` when the
        turn was not pending (already claimed, cancelled or deleted)."""
        control = control or Control()
        claim = self._claim(turn_id)
        if claim is None:
            return None
        self._runs[turn_id] = claim.run_id
        rec = TurnRecorder(
            self.db,
            self.bus,
            claim.task_id,
            turn_id,
            claim.body,
            redactor(self.gateway, claim),
            run_id=claim.run_id,
            on_gone=control.cancel,  # a run that lost its attempt stops at once
            # the work log flushed and the heartbeat beaten by its writer while the attempt
            # runs (also while a large repository is being cloned), so no other server takes
            # the attempt for orphaned
            beat=HEARTBEAT_POLL_SECONDS,
            start=False,  # by ``Workspaces.prepare``, once the prompt is sent (a standby's)
        )
        self.titles.start(
            claim,
            None if self.gateway_problem else self.gateway,
            self.gateway_socket,
        )  # beside the attempt: it never waits for the title
        attempt_dir = self.attempts_root / turn_id
        try:
            return self._run(claim, rec, control, attempt_dir)
        except Stopped:
            self.titles.ensure(claim, wait=False)
            return self._stopped(claim, rec, control)
        except AttemptFailed as exc:
            self.titles.ensure(claim)
            return rec.finish(
                TurnStatus.FAILED, text=FAILED, error={"code": exc.code, "message": exc.message}
            )
        except Exception as exc:  # a bug or a host problem: fail the attempt, keep serving
            log.exception("attempt %s failed unexpectedly", turn_id)
            with contextlib.suppress(Exception):
                self.titles.ensure(claim)
            message = f"openwham could not run this attempt: {type(exc).__name__}: {exc}"
            return rec.finish(
                TurnStatus.FAILED,
                text=FAILED,
                error={"code": "internal_error", "message": message[:2000]},
            )
        finally:
            rec.stop_beating()
            superseded = rec.gone_reason == SUPERSEDED  # another run holds the attempt now
            # its key's fills leave the background if it was the last; the next task like
            # this one starts warm, each of its attempts (refilled once the last one ended)
            self.workspaces.ended(claim, refill=not superseded and control.reason != "shutdown")
            if superseded:
                self._superseded(claim, attempt_dir)
            else:
                self._runs.pop(turn_id, None)
                if self.gateway is not None:  # its usage is recorded: nothing reads it again
                    self.gateway.revoke(turn_id)
                    self.gateway.forget(turn_id)
                # keeps what follow-ups need, and stores it for the other nodes
                storage.tidy(self.attempts_root, self.db, turn_id, self.artifacts)

    def _superseded(self, claim: Claim, attempt_dir: Path) -> None:
        """The end of a run whose attempt was requeued (and maybe claimed again) under it:
        it writes nothing (no session to the store, no standby refill); its files and
        gateway token go unless a newer run of the attempt is in this process."""
        if self._runs.get(claim.turn_id) != claim.run_id:
            return
        self._runs.pop(claim.turn_id, None)
        if self.gateway is not None:
            self.gateway.revoke(claim.turn_id)
            self.gateway.forget(claim.turn_id)
        storage.remove_tree(attempt_dir)

    # ------------------------------------------------------------------ claiming

    def standby_key(self, turn_id: str) -> AgentKey | None:
        """The standby a pending attempt would take, read without claiming it (the queue
        executor routes its job to a worker holding one); ``None`` when it would take none."""
        return self.claims.standby_key(turn_id)

    def _claim(self, turn_id: str) -> Claim | None:
        return self.claims.claim(turn_id)

    # ------------------------------------------------------------------ running

    def _run(self, claim: Claim, rec: TurnRecorder, control: Control, attempt_dir: Path) -> str:
        if self.gateway is None or self.gateway_socket is None or self.gateway_problem:
            raise AttemptFailed(
                "model_config_error",
                f"The model upstream is not configured: {self.gateway_problem or 'no gateway'}",
            )
        if not claim.repo_key or not claim.repo_url:
            raise AttemptFailed("environment_error", "The environment has no repository")
        if not claim.prompt.strip():
            raise AttemptFailed("invalid_input", "The task has no prompt")
        if isinstance(claim.resume, str):
            raise AttemptFailed("follow_up_error", claim.resume)
        if claim.secrets_problem:
            raise AttemptFailed(
                "environment_error", f"The environment's secrets: {claim.secrets_problem}"
            )

        # workspace and sandbox: a standby's, or made now (engine/workspace.py)
        agent = AgentRun(
            claim,
            rec,
            control,
            self.gateway,
            self.runtime.translator(claim.prompt),
            self.runtime.written_marker,
            self.runtime.interrupt_signal,
        )
        wake, ready = agent.wake, agent.ready
        prepared = self.workspaces.prepare(claim, rec, control, agent, attempt_dir)
        base, proc = prepared.base, prepared.proc
        proc.notify_on_exit(wake)
        try:
            result = self._wait(proc, rec, control, wake, ready)
            if result is not None and not proc.drain(OUTPUT_DRAIN_SECONDS):
                log.warning("attempt %s: the agent's output was still being read", claim.turn_id)
            if result is None and proc.check_disk():  # what it wrote since the last measure
                result = proc.wait()
            disk_budget = proc.spec.disk
            if disk_budget is not None:  # the diff's own sandbox, if any, measures here
                disk_budget = dataclasses.replace(disk_budget, paths=(attempt_dir,))
            return self.results.finish(
                claim, rec, control, agent, result, base, attempt_dir, disk_budget, prepared.repos
            )
        finally:
            control.attach(None)
            if proc.poll() is None and ready.is_set():  # Codex is closing down
                with contextlib.suppress(TimeoutError):
                    proc.wait(timeout=CLOSE_SECONDS)
            if proc.poll() is None:
                proc.kill("attempt ended")
            storage.compact_codex_home(attempt_dir / storage.CODEX_HOME)
            with contextlib.suppress(OSError):  # a follow-up may copy its Codex home now
                (attempt_dir / CLOSED_MARKER).touch()

    def _wait(
        self,
        proc: Sandbox,
        rec: TurnRecorder,
        control: Control,
        wake: threading.Event,
        ready: threading.Event,
    ) -> SandboxResult | None:
        """Wait for the sandbox to end, or for the attempt's result to be ``ready`` (then
        ``None``), while watching for a cancel made by another process (this process's
        cancels arrive through ``control``). ``wake`` is set on either."""
        while True:
            wake.wait(STATUS_POLL_SECONDS)
            result = proc.poll()
            if result is not None:
                return result
            if ready.is_set():
                return None
            gone = rec.gone_reason or ("cancelled" if rec.gone else self._stopped_elsewhere(rec))
            if gone:
                control.cancel(gone)

    def _stopped_elsewhere(self, rec: TurnRecorder) -> str | None:
        """Whether another process cancelled the attempt or took it from this run (then
        ``superseded``: requeued, maybe claimed by another worker)."""
        with self.db.sessions() as s:
            row = s.execute(
                select(m.Turn.turn_status, m.Turn.run_id).where(m.Turn.id == rec.turn_id)
            ).first()
        if row is not None and rec.run_id is not None and row.run_id != rec.run_id:
            return SUPERSEDED
        return (
            None if row is not None and row.turn_status == TurnStatus.IN_PROGRESS else "cancelled"
        )

    def _stopped(self, claim: Claim, rec: TurnRecorder, control: Control) -> str:
        if control.reason == "shutdown":
            return self.release(claim.turn_id, rec, "The server stopped; this attempt will resume")
        return rec.finish(
            TurnStatus.CANCELLED,
            text=CANCELLED,
            error={"code": "cancelled", "message": "The attempt was cancelled"},
        )

    def mark_waiting(self, turn_ids: list[str]) -> None:
        """Show "Waiting" on attempts queued behind busy workers."""
        turns.mark_waiting(self.db, self.bus, turn_ids)

    def release(self, turn_id: str, rec: TurnRecorder | None, note: str) -> str:
        """Put an attempt back to ``pending`` without counting a try (graceful shutdown)."""
        return turns.release(self.db, self.bus, turn_id, rec, note)


def _socket_dir(path: Path) -> Path:
    """``path``, or a short temporary directory when socket paths in it would be too long."""
    if len(os.fsencode(path)) + len("/0123456789abcdef.sock") <= MAX_SOCKET_PATH:
        return path
    return Path(tempfile.mkdtemp(prefix="wham-egress-"))
