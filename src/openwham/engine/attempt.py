"""``Engine.run_turn``: one attempt from ``pending`` to a terminal status.

Claim the turn (``pending → in_progress``, conditional, so two executors never run one turn),
prepare the workspace (mirror, clone at the branch, ``pre_apply_patch``), run the Codex CLI in a
bubblewrap sandbox that reaches its model only through the gateway, turn its JSONL into the
work log and status line, compute the diff in a second sandbox, and write the result.
Everything the attempt does is recorded by a :class:`TurnRecorder` as it happens.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import socket
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from openwham.config import Settings
from openwham.gateway import Gateway, forwarder_path
from openwham.gateway.server import MAX_SOCKET_PATH
from openwham.redaction import secrets_in_diff
from openwham.runtimes.agent import AgentRuntime, Translator
from openwham.runtimes.codex import CODEX
from openwham.sandbox import bwrap, disk
from openwham.sandbox.bwrap import SANDBOX_HOME, Limits, SandboxSpec
from openwham.sandbox.disk import DiskBudget
from openwham.sandbox.egress import AddressGuard, EgressProxy
from openwham.sandbox.provider import BUBBLEWRAP, Sandbox, SandboxProvider
from openwham.sandbox.workspace import (
    Mirrors,
    WorkspaceError,
    apply_patch,
    branch_head,
    create_workspace,
    local_repo_policy,
    reset_to,
)
from openwham.service.artifacts import check_store, open_store
from openwham.store import events, turnstate
from openwham.store import models as m
from openwham.store.artifacts import ArtifactError, ArtifactStore
from openwham.store.db import Database
from openwham.store.events import EventBus
from openwham.store.status import TurnStatus

from . import diff as diffs
from . import setup as setup_phase
from . import storage
from .agent import AgentRun, OutputGate, apply_updates
from .claim import Claim, Claims, Resume
from .control import DISK_SETTING, Stopped, over_disk
from .control import AttemptFailed as AttemptFailed  # re-exported: executors import them here
from .control import Control as Control
from .diff import DiffError
from .recorder import TurnRecorder, latest_event
from .result import pr_item, redactor
from .standby import AgentKey, Prepared, StandbyPool
from .titling import Titles

log = logging.getLogger(__name__)

WAITING = "Waiting"
COMPLETED = "Completed"
FAILED = "Failed"
CANCELLED = "Cancelled"
STATUS_POLL_SECONDS = 1.0
HEARTBEAT_POLL_SECONDS = 0.5
STANDBY_READY_SECONDS = 30.0
CLOSE_SECONDS = 10.0  # how long Codex may take to close down after its result is in
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

    def __post_init__(self) -> None:
        data = self.settings.resolved_data_dir
        self.claims = Claims(self.settings, self.db, self.bus, self.executor_id)
        self.titles = Titles(self.settings, self.db, self.bus)
        self.artifacts = open_store(self.settings, self.db)
        check_store(self.artifacts)  # a worker with a wrong bucket or keys stops here
        self.mirrors = Mirrors(data / "mirrors", local_repo_policy(self.settings))
        self.attempts_root = data / "attempts"
        self.attempts_root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.attempts_root, 0o700)
        self.egress = EgressProxy(
            _socket_dir(data / "run" / "egress"),
            AddressGuard.from_setting(self.settings.egress_allow_networks),
        )
        _remove_orphaned_standbys(self.attempts_root)
        storage.sweep(self.attempts_root, self.db, self.artifacts)
        storage.sweep_scratch(data / "tmp")
        self.standby = StandbyPool(
            size=self.settings.standby_sandboxes if self.gateway is not None else 0,
            max_age=float(self.settings.standby_max_age_seconds),
            make=self._make_standby,
            drop=self._drop_standby,
            settle=lambda prepared: _settle_index(self.sandbox, prepared.dir / "workspace"),
        )

    def close(self) -> None:
        """Drop the standby sandboxes (the server is stopping)."""
        self.standby.close()
        self.egress.stop()

    @property
    def limits(self) -> Limits:
        s = self.settings
        return Limits(
            wall_clock_seconds=float(s.attempt_timeout_seconds),
            max_processes=s.sandbox_max_processes,
            memory_bytes=s.sandbox_memory_mb << 20,
            max_file_bytes=s.sandbox_max_file_mb << 20,
            cpus=s.sandbox_cpus,
            stall_seconds=s.attempt_stall_seconds,
        )

    # ------------------------------------------------------------------ entry point

    def run_turn(self, turn_id: str, control: Control | None = None) -> str | None:
        """Run one pending attempt to its end. Returns its final status, or ``None`` when the
        turn was not pending (already claimed, cancelled or deleted)."""
        control = control or Control()
        claim = self._claim(turn_id)
        if claim is None:
            return None
        rec = TurnRecorder(
            self.db, self.bus, claim.task_id, turn_id, claim.body, redactor(self.gateway, claim)
        )
        self.titles.start(
            claim,
            None if self.gateway_problem else self.gateway,
            self.gateway_socket,
        )  # beside the attempt: it never waits for the title
        attempt_dir = self.attempts_root / turn_id
        alive = threading.Event()
        threading.Thread(
            target=_keep_alive, args=(rec, alive), name=f"heartbeat-{turn_id[-8:]}", daemon=True
        ).start()
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
            alive.set()
            if self.gateway is not None:  # its usage is recorded: nothing reads it again
                self.gateway.revoke(turn_id)
                self.gateway.forget(turn_id)
            if (
                claim.repo_key
                and claim.repo_url
                and claim.branch
                and claim.plain
                and control.reason != "shutdown"
            ):
                # the next task like this one starts warm, each of its attempts
                self.standby.refill(claim.key, claim.attempts)
            # keeps what follow-ups need, and stores it for the other nodes
            storage.tidy(self.attempts_root, self.db, turn_id, self.artifacts)

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

        # workspace and sandbox: a standby's, or made now
        storage.remove_tree(attempt_dir)
        gateway = self.gateway
        agent = AgentRun(
            claim,
            rec,
            control,
            gateway,
            self.runtime.translator(claim.prompt),
            self.runtime.written_marker,
        )
        translator, run, wake, ready = agent.translator, agent.run, agent.wake, agent.ready
        on_output, launch = agent.on_output, agent.launch

        # A standby's agent gets the prompt at once, while the mirror is fetched: its output
        # is held back and its model requests wait in the gateway until the fetch shows the
        # standby's checkout is still the branch head (the fetch ends long before Codex's
        # first request). If the branch moved, the standby is dropped and the attempt starts
        # cold; nothing of the standby's run is kept.
        def abandon(standby: Prepared) -> None:
            control.attach(None)
            self._drop_standby(standby)

        gate = OutputGate(on_output)
        prepared = self._take_standby(claim, attempt_dir)
        if prepared is not None and not launch(prepared, True, gate):  # died meanwhile
            abandon(prepared)
            prepared = None
            control.check()  # or was killed by a cancel
        try:
            mirror = self.mirrors.ensure(claim.repo_key, claim.repo_url)
            fits = prepared is not None and branch_head(mirror, claim.branch) == prepared.base
        except WorkspaceError as exc:
            if prepared is not None:
                abandon(prepared)
            raise AttemptFailed("workspace_error", str(exc)) from exc
        if prepared is not None and not fits:
            abandon(prepared)
            prepared = None
        if prepared is not None:
            self.gateway.release(claim.turn_id)
            gate.open()
        else:
            control.check()
            prepared = self._prepare_cold(claim, rec, mirror, attempt_dir, control)
            launch(prepared, False, on_output)
        base, proc = prepared.base, prepared.proc
        proc.notify_on_exit(wake)
        try:
            result = self._wait(proc, rec, control, wake, ready)
            if result is None and proc.check_disk():  # what it wrote since the last measure
                result = proc.wait()
            disk_budget = proc.spec.disk
            if disk_budget is not None:  # the diff's own sandbox, if any, measures here
                disk_budget = dataclasses.replace(disk_budget, paths=(attempt_dir,))
            return self._result(
                claim, rec, control, translator, result, base, attempt_dir, run, disk_budget
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

    def _result(
        self,
        claim: Claim,
        rec: TurnRecorder,
        control: Control,
        translator: Translator,
        result: bwrap.SandboxResult | None,
        base: str,
        attempt_dir: Path,
        run: dict[str, Any],
        disk_budget: DiskBudget | None = None,
    ) -> str:
        """Finish the attempt from what Codex reported and the diff the launcher wrote
        (``result`` is ``None`` when the sandbox is still closing down after both)."""
        assert self.gateway is not None
        self.gateway.revoke(claim.turn_id)
        usage = self.gateway.usage(claim.turn_id)
        self.titles.ensure(claim, control=control)
        if claim.title is not None and claim.title.usage is not None:
            run["title_usage"] = claim.title.usage  # the title request's tokens
        # the thread id: a follow-up resumes this conversation (codex.resume_argv)
        rec.set(run={**run, "usage": dataclasses.asdict(usage), "thread_id": translator.thread_id})
        killed_reason = result.killed_reason if result is not None else None
        outcome = translator.finish(
            result.exit_code if result is not None else None,
            killed_reason=killed_reason,
            upstream_error=self.gateway.last_error(claim.turn_id),
            stderr=_without(result.stderr, self.runtime.written_marker)
            if result is not None
            else "",
        )
        apply_updates(rec, list(outcome.updates))
        control.check()
        if result is not None and result.disk_reason is not None:
            raise over_disk(result.disk_reason)
        if outcome.status != "completed" and result is not None and result.stalled:
            raise AttemptFailed("sandbox_stalled", f"The agent's sandbox {result.killed_reason}")
        if outcome.status != "completed":
            error = outcome.error
            raise AttemptFailed(
                error.code if error else "agent_error",
                error.message if error else "The agent failed",
            )

        # the result
        answer = outcome.final_message or ""
        items: list[dict[str, Any]] = []
        if answer:
            items.append(
                {
                    "type": "message",
                    "role": "assistant",
                    "content": [{"content_type": "text", "text": answer}],
                }
            )
        if not claim.qa_mode:
            try:
                if self.gateway.continued_after_final(claim.turn_id):
                    # the launcher's diff started at a response that did not end the turn
                    # after all; the sandbox has ended since, so compute it anew
                    log.warning("attempt %s: the agent went on after its diff", claim.turn_id)
                    diff = diffs.workspace_diff(
                        attempt_dir / "workspace", base, scratch=attempt_dir, disk=disk_budget
                    )
                else:  # written by the launcher's `after` script (codex.WRITTEN_MARKER)
                    diff = diffs.read_result(attempt_dir / "out", killed_reason=killed_reason)
            except diffs.DiskExceeded as exc:
                raise over_disk(str(exc)) from exc
            except DiffError as exc:
                raise AttemptFailed("diff_error", str(exc)) from exc
            if diff.text:
                items.append(pr_item(self.db, claim, base, diff.text, answer))
                # the stored diff is redacted: remember (names and files only) which
                # secrets the real change holds, so a push can refuse it (service.prs)
                rec.set(
                    diff_secrets=secrets_in_diff(
                        redactor(self.gateway, claim, named=True), diff.text
                    )
                )
        control.check()
        return rec.finish(TurnStatus.COMPLETED, text=COMPLETED, output_items=items)

    def _prepare_cold(
        self, claim: Claim, rec: TurnRecorder, mirror: Path, attempt_dir: Path, control: Control
    ) -> Prepared:
        attempt_dir.mkdir(parents=True, mode=0o700)
        workspace = attempt_dir / "workspace"
        resume = claim.resume if isinstance(claim.resume, Resume) else None
        try:
            base = create_workspace(mirror, workspace, claim.branch, claim.repo_url)
            if resume is not None:  # the previous attempt's tree, on the task's base
                reset_to(workspace, resume.base)
                base = resume.base
                if resume.tree:
                    apply_patch(workspace, resume.tree, what="The previous attempt's change")
        except WorkspaceError as exc:
            raise AttemptFailed("workspace_error", str(exc)) from exc
        if claim.patch and resume is None:
            try:
                apply_patch(workspace, claim.patch)
            except WorkspaceError as exc:
                raise AttemptFailed("failed_to_apply_patch_error", str(exc)) from exc
        control.check()
        (attempt_dir / "home").mkdir(mode=0o700)
        budget = self._disk_budget(attempt_dir)  # from here on, what the attempt writes
        if claim.setup_script.strip():
            self._setup(claim, rec, attempt_dir, control, budget)
        return self._start_agent(
            claim.key,
            attempt_dir,
            base,
            owner=claim.turn_id,
            resume=resume,
            env_vars=claim.env_vars,
            budget=budget,
        )

    def _disk_budget(self, directory: Path) -> DiskBudget | None:
        """What an attempt's directory may hold: what it holds now (the checkout) plus
        ``WHAM_SANDBOX_DISK_MB``, for every sandbox of the attempt (None: no budget)."""
        mb = self.settings.sandbox_disk_mb
        if mb <= 0:
            return None
        start = disk.usage([directory])
        return DiskBudget(
            paths=(directory,),
            max_bytes=start + (mb << 20),
            start_bytes=start,
            what="the attempt",
            limit_mb=mb,
            setting=DISK_SETTING,
        )

    def _setup(
        self,
        claim: Claim,
        rec: TurnRecorder,
        attempt_dir: Path,
        control: Control,
        budget: DiskBudget | None,
    ) -> None:
        """The environment's setup script (engine/setup.py); a failure fails the attempt
        with its exit code, and its log stays on the turn."""
        limits = dataclasses.replace(
            self.limits, wall_clock_seconds=float(self.settings.setup_timeout_seconds)
        )
        result = setup_phase.run(
            claim.setup_script,
            workspace=attempt_dir / "workspace",
            home=attempt_dir / "home",
            env={**claim.env_vars, **claim.secrets},
            egress=self.egress,
            limits=limits,
            rec=rec,
            attach=control.attach,
            disk=budget,
        )
        control.check()
        if result.disk_reason is not None:
            raise over_disk(result.disk_reason)
        if result.exit_code == setup_phase.LAUNCHER_FAILED and not result.killed_reason:
            raise AttemptFailed(
                "setup_failed", "The setup script could not start (see the setup log)"
            )
        if result.stalled:  # the watchdog: stopped or defunct, it would never have ended
            raise AttemptFailed(
                "sandbox_stalled", f"The setup script's sandbox {result.killed_reason}"
            )
        if not result.ok:
            why = result.killed_reason or f"exited with code {result.exit_code}"
            raise AttemptFailed("setup_failed", f"The setup script {why} (see the setup log)")

    def _start_agent(
        self,
        key: AgentKey,
        directory: Path,
        base: str,
        *,
        owner: str,
        resume: Resume | None = None,
        env_vars: dict[str, str] | None = None,
        budget: DiskBudget | None = None,
    ) -> Prepared:
        """Start Codex in a held sandbox on ``directory/workspace``: it does its start-up
        work and waits for the prompt on stdin (:meth:`Sandbox.send`). A follow-up's
        Codex resumes the previous attempt's conversation from a copy of its Codex home."""
        assert self.gateway is not None and self.gateway_socket is not None
        codex_home = directory / "codex-home"
        if resume is None:
            codex_home.mkdir(mode=0o700)
        else:
            self._copy_codex_home(resume.previous_turn_id, codex_home)
        home = directory / "home"  # the setup phase's, if there was one
        home.mkdir(mode=0o700, exist_ok=True)
        rw_binds = {home: SANDBOX_HOME, codex_home: self.runtime.home_mount}
        after = ""
        if not key.qa_mode:  # the diff, computed in this sandbox after Codex exits
            out = directory / "out"
            out.mkdir(mode=0o700)
            rw_binds[out] = diffs.OUT_DIR
            after = diffs.script(base)
        files = self.runtime.home_files(
            model=key.model,
            reasoning_effort=key.reasoning_effort,
            custom_instructions=key.custom_instructions,
            mcp_servers=json.loads(key.mcp_servers) if key.mcp_servers else None,
        )
        for name, text in files.items():
            (codex_home / name).unlink(missing_ok=True)  # never through an agent's symlink
            (codex_home / name).write_text(text)
        if budget is None:  # a standby's (or an attempt's without setup): from its checkout
            budget = self._disk_budget(directory)
        token = self.gateway.register_attempt(
            owner, model=key.model, ttl_seconds=self._token_ttl(owner)
        )
        spec = SandboxSpec(
            workspace=directory / "workspace",
            workspace_readonly=key.qa_mode,
            ro_binds=self.runtime.binds(
                forwarder=forwarder_path(), gateway_socket=self.gateway_socket
            ),
            rw_binds=rw_binds,
            env={**(env_vars or {}), **self.runtime.env(token)},
            network=False,
            limits=self.limits,
            idle_helpers=self.runtime.idle_helpers,
            disk=budget,
        )
        argv = self.runtime.command(
            qa_mode=key.qa_mode,
            resume_thread=resume.thread_id if resume is not None else None,
            custom_instructions=key.custom_instructions,
            after=after,
        )
        try:
            proc = self.sandbox.start(spec, argv, hold=True, ready_marker=self.runtime.ready_marker)
        except BaseException:
            self.gateway.forget(owner)
            raise
        return Prepared(dir=directory, base=base, proc=proc, owner=owner)

    def _copy_codex_home(self, previous_turn_id: str, dest: Path) -> None:
        """Copy the previous attempt's Codex home (its session files) once that attempt's
        sandbox is gone: this node's files, else its stored session (engine/storage.py)."""
        try:
            storage.restore_codex_home(
                self.attempts_root,
                self.artifacts,
                previous_turn_id,
                dest,
                wait=CLOSE_SECONDS + 5,
            )
        except ArtifactError as exc:
            raise AttemptFailed("follow_up_error", str(exc)) from exc

    def _token_ttl(self, owner: str) -> float | None:
        if not owner.startswith(_STANDBY_PREFIX):
            return None
        # a standby's token lives until the standby expires, then as long as an attempt
        return float(self.settings.standby_max_age_seconds) + self.limits.wall_clock_seconds

    def _take_standby(self, claim: Claim, attempt_dir: Path) -> Prepared | None:
        """A standby for this attempt, moved to ``attempt_dir`` with its token handed over
        and held (the caller checks the branch head, then releases it). Not used with a
        starting diff: Codex reads the repository's config and AGENTS.md at start-up, before
        the patch could be applied."""
        if claim.patch or claim.resume is not None or not claim.plain or self.gateway is None:
            return None
        prepared = self.standby.take(claim.key)
        if prepared is None:
            return None
        if not self.gateway.reassign(prepared.owner, claim.turn_id, hold=True):
            self._drop_standby(prepared)
            return None
        os.rename(prepared.dir, attempt_dir)
        return dataclasses.replace(prepared, dir=attempt_dir, owner=claim.turn_id)

    def _make_standby(self, key: AgentKey) -> Prepared:
        directory = self.attempts_root / f"{_STANDBY_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:12]}"
        directory.mkdir(mode=0o700)
        try:
            mirror = self.mirrors.ensure(key.repo_key, key.repo_url, fetch=False)
            base = create_workspace(mirror, directory / "workspace", key.branch, key.repo_url)
            prepared = self._start_agent(key, directory, base, owner=directory.name)
        except BaseException:
            storage.remove_tree(directory)
            raise
        # taking it renames the directory: only once bwrap has resolved the binds
        if not prepared.proc.wait_ready(STANDBY_READY_SECONDS):
            result = prepared.proc.kill("standby sandbox did not start")
            self._drop_standby(prepared)
            raise RuntimeError(f"the standby sandbox did not start: {result.stderr[-500:]}")
        return prepared

    def _drop_standby(self, prepared: Prepared) -> None:
        prepared.proc.kill("standby sandbox dropped")
        if self.gateway is not None:
            self.gateway.forget(prepared.owner)
        storage.remove_tree(prepared.dir)

    def _wait(
        self,
        proc: Sandbox,
        rec: TurnRecorder,
        control: Control,
        wake: threading.Event,
        ready: threading.Event,
    ) -> bwrap.SandboxResult | None:
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
            if rec.gone or self._cancelled_elsewhere(rec.turn_id):
                control.cancel("cancelled")

    def _cancelled_elsewhere(self, turn_id: str) -> bool:
        with self.db.sessions() as s:
            status = s.scalar(select(m.Turn.turn_status).where(m.Turn.id == turn_id))
        return status != TurnStatus.IN_PROGRESS

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
        for turn_id in turn_ids:
            with self.db.session() as s:
                turn = s.get(m.Turn, turn_id)
                if turn is None or turn.turn_status != TurnStatus.PENDING:
                    continue
                if (turn.body.get("latest_event") or {}).get("text") == WAITING:
                    continue
                body = {**turn.body, "latest_event": latest_event(WAITING)}
                if turnstate.wait(s, turn_id, body=body):
                    events.append(
                        s,
                        turn.task_id,
                        turn_id,
                        events.TASK_TURN_EVENT,
                        events.status_payload(WAITING, TurnStatus.PENDING),
                    )
            self.bus.publish(turn_id)

    def release(self, turn_id: str, rec: TurnRecorder | None, note: str) -> str:
        """Put an attempt back to ``pending`` without counting a try (graceful shutdown)."""
        if rec is not None:
            rec.flush()
            rec.gone = True
        with self.db.session() as s:
            turn = s.get(m.Turn, turn_id)
            if turn is None or turn.turn_status != TurnStatus.IN_PROGRESS:
                return str(turn.turn_status) if turn else "deleted"
            tries = int((turn.body.get("run") or {}).get("tries") or 1)
            if not requeue(s, turn, note, tries=max(0, tries - 1)):  # moved meanwhile
                now = s.scalar(select(m.Turn.turn_status).where(m.Turn.id == turn_id))
                return str(now or "deleted")
        self.bus.publish(turn_id)
        return "pending"


_STANDBY_PREFIX = ".standby-"


_SETTLE_LIMITS = Limits(wall_clock_seconds=60, max_processes=64, memory_bytes=1 << 30)


def _settle_index(sandbox: SandboxProvider, workspace: Path) -> None:
    """Rewrite a standby's index as the agent's git will see it. A fresh clone's index holds
    the host's view of each file (owner, and entries "smudged" as racily clean because the
    files and the index were written within one second), so the first ``git status`` or
    ``add`` inside the sandbox re-reads every file and rewrites the index (60 ms for 5,000
    files, paid by the agent's first git command or the diff). The pool calls this a second
    after the clone while the standby is unused, in a sandbox of its own (same uid mapping
    as the agent's), on files that are still the clone's own."""
    with contextlib.suppress(OSError, bwrap.SandboxUnavailable):
        sandbox.run(
            SandboxSpec(workspace=workspace, limits=_SETTLE_LIMITS),
            ["git", "-c", "core.hooksPath=/dev/null", "update-index", "-q", "--refresh"],
        )


def _socket_dir(path: Path) -> Path:
    """``path``, or a short temporary directory when socket paths in it would be too long."""
    if len(os.fsencode(path)) + len("/0123456789abcdef.sock") <= MAX_SOCKET_PATH:
        return path
    return Path(tempfile.mkdtemp(prefix="wham-egress-"))


def _without(text: str, line: str) -> str:
    """``text`` without the lines equal to ``line``."""
    return "\n".join(x for x in text.split("\n") if x != line)


def _remove_orphaned_standbys(root: Path) -> None:
    """Standby directories of a server process that is gone (its sandboxes died with it)."""
    for path in root.glob(f"{_STANDBY_PREFIX}*"):
        pid = path.name.removeprefix(_STANDBY_PREFIX).split("-", 1)[0]
        if not pid.isdigit() or not Path(f"/proc/{pid}").exists() or int(pid) == os.getpid():
            storage.remove_tree(path)


def _keep_alive(rec: TurnRecorder, done: threading.Event) -> None:
    """Flush the work log and beat the heartbeat while the attempt runs (also while a large
    repository is being cloned), so no other server takes the attempt for orphaned."""
    while not done.wait(HEARTBEAT_POLL_SECONDS):
        rec.heartbeat()


def requeue(
    s: Session,
    turn: m.Turn,
    note: str,
    *,
    tries: int | None = None,
    recover: bool = False,
    seen: float | None = None,
) -> bool:
    """Put an attempt back to ``pending`` to start again from scratch: its results, status
    lines (a terminal one would end a new stream at once), work log and setup log go, a
    ``log`` event says why. ``tries`` replaces the count of runs. A running attempt
    (``turnstate.requeue``), or with ``recover`` a failed or cancelled one
    (``turnstate.recover``); whether it applied (someone else may have moved it first).
    ``seen``: only if its ``updated_at`` is still that (see ``turnstate.requeue``)."""
    body = dict(turn.body)
    if tries is not None:
        body["run"] = {**(body.get("run") or {}), "tries": tries}
    body.update(
        output_items=[],
        worklog={"messages": []},
        error=None,
        latest_event=latest_event(WAITING),
        base_commit_sha=None,
        logs=None,
        proxy_events=None,
    )
    if recover:
        moved = turnstate.recover(s, turn.id, body=body)
    else:
        moved = turnstate.requeue(s, turn.id, body=body, seen=seen)
    if not moved:
        return False
    # its setup log goes with it; the server's notes (log events without a key) stay
    notes = [e.payload for e in events.read(s, turn.id, item_types=[events.LOG], limit=10_000)]
    events.clear(s, turn.id, [events.WORK_LOG_MESSAGE, events.LOG, events.TASK_TURN_EVENT])
    for payload in notes:
        if "key" not in payload:
            events.append(s, turn.task_id, turn.id, events.LOG, payload)
    events.append(s, turn.task_id, turn.id, events.LOG, {"text": note, "created": time.time()})
    events.append(
        s,
        turn.task_id,
        turn.id,
        events.TASK_TURN_EVENT,
        events.status_payload(WAITING, TurnStatus.PENDING),
    )
    return True
