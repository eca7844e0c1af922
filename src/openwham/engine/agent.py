"""The agent's side of an attempt: :class:`AgentStarter` starts it held in a sandbox (its
home, token and command), :class:`AgentRun` is the state of its run (launch, output, the
early diff, readiness), and an :class:`OutputGate` holds its output back while a standby's
checkout is checked against the branch head."""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from openwham.config import Settings
from openwham.gateway import Gateway, forwarder_path
from openwham.runtimes import codex
from openwham.runtimes.agent import AgentRuntime, Translator
from openwham.sandbox.bwrap import SANDBOX_HOME, SandboxSpec
from openwham.sandbox.disk import DiskBudget
from openwham.sandbox.egress import EgressProxy
from openwham.sandbox.provider import Sandbox, SandboxProvider
from openwham.store.artifacts import ArtifactError, ArtifactStore

from . import diff as diffs
from . import network, storage
from .claim import Claim, Resume
from .control import AttemptFailed, Control, attempt_limits, disk_budget
from .recorder import TurnRecorder
from .standby import STANDBY_PREFIX, AgentKey, Prepared

CLOSE_SECONDS = 10.0  # how long the agent may take to close down after its result is in

OutputSink = Callable[[str, str], None]


class OutputGate:
    """An output sink that holds lines back until :meth:`open` (then passes them on in
    order, and every later line at once); lines of a gate never opened are dropped."""

    def __init__(self, sink: OutputSink) -> None:
        self._sink = sink
        self._held: list[tuple[str, str]] = []
        self._open = False
        self._lock = threading.Lock()

    def __call__(self, stream: str, line: str) -> None:
        with self._lock:
            if not self._open:
                self._held.append((stream, line))
                return
        self._sink(stream, line)

    def open(self) -> None:
        with self._lock:  # the reader waits meanwhile: the order is kept
            for stream, line in self._held:
                self._sink(stream, line)
            self._held.clear()
            self._open = True


def apply_updates(rec: TurnRecorder, updates: list[codex.Update]) -> None:
    """Record the agent's work-log and status changes, in order."""
    for update_ in updates:
        if isinstance(update_, codex.StatusUpdate):
            rec.status(update_.text)
        else:
            rec.message(update_.message)


@dataclass
class AgentRun:
    """One attempt's agent while it runs, fed by its output.

    The diff starts as soon as the agent's last model response goes through the gateway (or,
    failing that, on turn.completed): the launcher kills every process but Codex and runs it
    while Codex finishes its turn (``codex.launcher``, ``after``). Once it is ``written`` and
    Codex reported turn.completed without asking the model again, the result is final: the
    attempt finishes (``ready``) while Codex closes down and the sandbox is torn down.
    ``wake`` is set on that or on the sandbox's end."""

    claim: Claim
    rec: TurnRecorder
    control: Control
    gateway: Gateway
    translator: Translator
    written_marker: str
    #: the runtime's ``interrupt_signal``: a user's cancel interrupts the turn (``Control``)
    interrupt_signal: int | None = None
    run: dict[str, Any] = field(init=False)  # the turn's private ``run`` part
    wake: threading.Event = field(default_factory=threading.Event, init=False)
    written: threading.Event = field(default_factory=threading.Event, init=False)
    ready: threading.Event = field(default_factory=threading.Event, init=False)
    _launched: list[Sandbox] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        self.run = dict(self.claim.body.get("run") or {})

    def early_diff(self) -> None:
        """Signal the launcher to compute the diff now (once)."""
        try:
            proc = self._launched.pop()
        except IndexError:  # signalled already
            return
        proc.signal_command(signal.SIGUSR1)

    def check_ready(self) -> None:
        if (
            self.written.is_set()
            and self.translator.turn_completed
            and not self.gateway.continued_after_final(self.claim.turn_id)
        ):
            self.ready.set()
            self.wake.set()

    def on_output(self, stream: str, line: str) -> None:
        if stream != "stdout":
            if line == self.written_marker:
                self.written.set()
                self.check_ready()
            return
        apply_updates(self.rec, self.translator.feed(line))
        if self.translator.turn_completed and not self.claim.qa_mode:
            self.early_diff()
            self.check_ready()

    def launch(self, prepared: Prepared, standby: bool, sink: OutputSink) -> bool:
        """Give the prepared agent its prompt; False if its sandbox died meanwhile. The prompt
        goes first and the attempt's start is recorded while the agent reads it (queued for
        the recorder's writer); the agent's output waits behind a gate until then, so the
        work log keeps its order. A standby's prompt entry waits for :meth:`record_prompt`:
        the take is settled (and a cache hit's setup log recorded) after the prompt is sent,
        and the work log has them before the prompt, as a cold start has."""
        self._launched[:] = [prepared.proc]
        if not self.claim.qa_mode:
            self.gateway.on_final_response(self.claim.turn_id, self.early_diff)
        self.run["standby"] = standby  # for operators: did the attempt skip the start-up?
        self.control.attach(prepared.proc, self.interrupt_signal)
        gate = OutputGate(sink)
        sent = prepared.proc.send(self.claim.prompt.encode("utf-8", "replace"), gate)
        if prepared.network is not None:  # its proxy events (a standby's held until now)
            prepared.network.attach(self.rec)
        if prepared.repos:  # each repository's base: the diffs, PR pushes and follow-ups'
            self.rec.set(repo_bases=prepared.repos)
        self.rec.set(base_commit_sha=prepared.base, run=self.run)
        if not standby:
            self.record_prompt()
        gate.open()
        return sent

    def record_prompt(self) -> None:
        """The prompt's work-log entry (once; later calls record nothing)."""
        apply_updates(self.rec, self.translator.take_initial())


@dataclass
class AgentStarter:
    """Starts the agent (an :class:`AgentRuntime`) held in a sandbox from a
    :class:`SandboxProvider`, for an attempt or a standby: everything a start needs."""

    settings: Settings
    gateway: Gateway
    gateway_socket: Path
    runtime: AgentRuntime
    sandbox: SandboxProvider
    attempts_root: Path
    artifacts: ArtifactStore
    egress: EgressProxy | None = None  # the agent's way out when its environment allows

    def start(
        self,
        key: AgentKey,
        directory: Path,
        base: str,
        *,
        owner: str,
        resume: Resume | None = None,
        env_vars: dict[str, str] | None = None,
        budget: DiskBudget | None = None,
        repos: dict[str, dict[str, str]] | None = None,
        background: bool = False,
    ) -> Prepared:
        """Start the agent in a held sandbox on ``directory/workspace``: it does its start-up
        work and waits for the prompt on stdin (:meth:`Sandbox.send`). A follow-up's agent
        resumes the previous attempt's conversation from a copy of its home. ``repos``: a
        multi-repository workspace's repositories (key -> {dir, branch, sha}), each diffed.
        ``background``: a standby's, at the background CPU weight until it is sent its
        prompt or hurried (``SandboxSpec.background``)."""
        codex_home = directory / storage.CODEX_HOME
        if resume is None:
            codex_home.mkdir(mode=0o700)
        else:
            self.copy_home(resume.previous_turn_id, codex_home)
        home = directory / "home"  # the setup phase's, if there was one
        home.mkdir(mode=0o700, exist_ok=True)
        rw_binds = {home: SANDBOX_HOME, codex_home: self.runtime.home_mount}
        after = ""
        if not key.qa_mode:  # the diff, computed in this sandbox after the agent exits
            out = directory / "out"
            out.mkdir(mode=0o700)
            rw_binds[out] = diffs.OUT_DIR
            after = (
                diffs.scripts([(r["dir"], r["sha"]) for r in repos.values()])
                if repos
                else diffs.script(base)
            )
        summary = network.describe(key.network) if key.network else None
        files = self.runtime.home_files(
            model=key.model,
            reasoning_effort=key.reasoning_effort,
            custom_instructions=key.custom_instructions,
            mcp_servers=json.loads(key.mcp_servers) if key.mcp_servers else None,
            network=summary,
        )
        for name, text in files.items():
            (codex_home / name).unlink(missing_ok=True)  # never through an agent's symlink
            (codex_home / name).write_text(text)
        if budget is None:  # a standby's (or an attempt's without setup): from its checkout
            budget = disk_budget(self.settings, directory)
        limits = attempt_limits(self.settings)
        token = self.gateway.register_attempt(
            owner, model=key.model, ttl_seconds=self._token_ttl(owner)
        )
        ro_binds = self.runtime.binds(
            forwarder=forwarder_path(), gateway_socket=self.gateway_socket
        )
        env = {**(env_vars or {}), **self.runtime.env(token)}
        relay = session = None
        if key.network:  # its own egress session, decided by the environment's policy
            if self.egress is None:
                self.gateway.forget(owner)
                raise AttemptFailed("environment_error", "Agent internet access is unavailable")
            relay = network.EventRelay()
            session = self.egress.open(network.policy(key.network), on_event=relay)
            ro_binds[session.socket] = network.SANDBOX_EGRESS_SOCKET
            env.update(network.proxy_env(self.runtime.egress_listen))
        spec = SandboxSpec(
            workspace=directory / "workspace",
            workspace_readonly=key.qa_mode,
            ro_binds=ro_binds,
            rw_binds=rw_binds,
            env=env,
            network=False,
            limits=limits,
            idle_helpers=self.runtime.idle_helpers,
            disk=budget,
            background=background,
        )
        argv = self.runtime.command(
            qa_mode=key.qa_mode,
            resume_thread=resume.thread_id if resume is not None else None,
            custom_instructions=key.custom_instructions,
            after=after,
            egress=network.SANDBOX_EGRESS_SOCKET if session is not None else None,
            network=summary,
        )
        try:
            proc = self.sandbox.start(spec, argv, hold=True, ready_marker=self.runtime.ready_marker)
        except BaseException:
            self.gateway.forget(owner)
            if session is not None:
                session.close()
            raise
        if session is not None:
            network.close_with(proc, session)
        return Prepared(
            dir=directory, base=base, proc=proc, owner=owner, network=relay, repos=repos or {}
        )

    def copy_home(self, previous_turn_id: str, dest: Path) -> None:
        """Copy the previous attempt's agent home (its session files) once that attempt's
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
        if not owner.startswith(STANDBY_PREFIX):
            return None
        # a standby's token lives until the standby expires, then as long as an attempt
        return (
            float(self.settings.standby_max_age_seconds)
            + attempt_limits(self.settings).wall_clock_seconds
        )
