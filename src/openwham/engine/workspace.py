"""Where an attempt's workspace and started agent come from: a standby's, or made now.

:class:`Workspaces` holds what that takes (mirrors, the attempts' root, the standby pool, the
egress proxy for setup scripts, the :class:`AgentStarter`). A standby is taken only for an
attempt with no starting diff that is not a follow-up, and either plain (one repository, no
setup script, variables or secrets) or of an environment with a setup script and a post-setup
snapshot (the standby was started from that snapshot, its maintenance script run when it was
prepared; one repository or several: see docs/ARCHITECTURE.md): its agent gets the prompt at
once, while the mirror is fetched, with its output held back and its model requests waiting
in the gateway until the fetch shows the standby's checkout is still the branch head (every
repository's, for several); otherwise it is dropped and the attempt starts
cold (clone at the branch, the follow-up's tree or the starting diff, the setup script or the
snapshot and maintenance script, then the agent). The post-setup cache's steps (its key, a
hit, a snapshot taken) are ``engine.setup_cache``'s.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, TypeVar, cast

from openwham.config import Settings
from openwham.gateway import Gateway
from openwham.sandbox import bwrap, overlay
from openwham.sandbox.bwrap import Limits, SandboxSpec
from openwham.sandbox.disk import DiskBudget
from openwham.sandbox.egress import EgressProxy
from openwham.sandbox.provider import BUBBLEWRAP, SandboxProvider
from openwham.sandbox.snapshots import RepoAt, Snapshots
from openwham.sandbox.workspace import (
    Checkouts,
    Mirrors,
    WorkspaceError,
    apply_patch,
    branch_ref,
    create_repo_workspace,
    start_commit,
    workspace_at,
)

from . import setup as setup_phase
from . import storage
from .agent import AgentRun, AgentStarter, OutputGate
from .claim import Claim, RepoCheckout, Resume, standby_setup
from .control import AttemptFailed, Control, attempt_limits, disk_budget, over_disk
from .recorder import TurnRecorder
from .setup_cache import (
    RepoTarget,
    Resumed,
    SetupCache,
    forget,
    record_resumed,
    record_standby_resumed,
)
from .standby import STANDBY_PREFIX, AgentKey, FromSnapshot, Prepared, StandbyPool

STANDBY_READY_SECONDS = 30.0
#: ``DATA_DIR/attempts/.ready-standbys/<standby directory name>``: an empty file per standby
#: the pool holds ready (one a take has at once: ``StandbyPool``'s ready list), written and
#: removed under the pool's lock; what an operator or a benchmark sees of the pool
READY_STANDBYS = ".ready-standbys"
#: setup inputs of standby keys kept (the pool holds at most a few keys; older ones go)
MAX_STANDBY_SETUPS = 64

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class StandbySetup:
    """What a standby of an environment with a setup script needs beyond its key: where its
    snapshot is, the agent's variables, and the maintenance script with its variables and
    secrets (never in a key: keys are hashed into the queue's offers, ``engine.queue``)."""

    env_id: str
    cache: str
    #: the environment's cache generation (``claim.cache_generation``) when it was kept
    generation: str
    env_vars: dict[str, str]
    secrets: dict[str, str] = field(repr=False)
    maintenance: str
    #: a multi-repository environment's repositories (``Claim.repos``; ``()``: one)
    repos: tuple[RepoCheckout, ...] = ()


@dataclass
class Workspaces:
    """Prepares attempts' workspaces and agents, and keeps the standbys (``standby``).
    ``agents`` is ``None`` without a model gateway: then nothing is prepared."""

    settings: Settings
    sandbox: SandboxProvider
    gateway: Gateway | None
    mirrors: Mirrors
    attempts_root: Path
    egress: EgressProxy
    agents: AgentStarter | None
    #: overlay workspaces over shared checkouts (``None``: a clone per attempt)
    checkouts: Checkouts | None = None
    #: post-setup snapshots (``None``: every attempt runs its setup script)
    snapshots: Snapshots | None = None
    standby: StandbyPool = field(init=False)
    #: the post-setup cache's steps (``engine.setup_cache``), over ``snapshots``
    cache: SetupCache = field(init=False)
    #: standby key -> its setup inputs, for keys with a setup script (``make_standby``)
    _setups: OrderedDict[AgentKey, StandbySetup] = field(init=False, default_factory=OrderedDict)
    _setups_lock: threading.Lock = field(init=False, default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.cache = SetupCache(self.sandbox, self.checkouts, self.snapshots)
        self.standby = StandbyPool(
            size=self.settings.standby_sandboxes if self.agents is not None else 0,
            max_age=float(self.settings.standby_max_age_seconds),
            make=self.make_standby,
            drop=self.drop_standby,
            settle=lambda prepared: settle_index(self.sandbox, prepared.dir / "workspace"),
            shown=self._show_ready,
        )
        (self.attempts_root / READY_STANDBYS).mkdir(mode=0o700, exist_ok=True)

    def _show_ready(self, prepared: Prepared, ready: bool) -> None:
        """A standby entered (``ready``) or left the pool's ready list: its file in
        :data:`READY_STANDBYS` made or removed."""
        path = self.attempts_root / READY_STANDBYS / prepared.dir.name
        if not ready:
            path.unlink(missing_ok=True)
            return
        try:
            path.touch()
        except FileNotFoundError:  # another server of the data directory closed: it went
            path.parent.mkdir(mode=0o700, exist_ok=True)
            path.touch()

    def close(self) -> None:
        """Drop the standby sandboxes (the server is stopping), and the directory of their
        ready files once it is empty (another server's standbys keep it)."""
        self.standby.close()
        with contextlib.suppress(OSError):
            (self.attempts_root / READY_STANDBYS).rmdir()

    def prepare(
        self, claim: Claim, rec: TurnRecorder, control: Control, agent: AgentRun, attempt_dir: Path
    ) -> Prepared:
        """The attempt's workspace in ``attempt_dir`` and its agent, launched with the prompt
        (``agent.launch``): a standby's when one fits, else made now."""
        assert self.gateway is not None

        # the fetch runs beside the prompt (a standby's first model request waits for it,
        # ``_fits``): begun once a ready standby has its prompt, since starting its thread
        # waits until the thread runs (up to ~100 ms with four attempts starting on two
        # cores); begun before a take that waits for a fill under way or finds none
        def fetch() -> Background[Path]:
            return Background(lambda: self._fetch(claim), f"fetch-{claim.turn_id[-8:]}")

        storage.remove_tree(attempt_dir)
        gate = OutputGate(agent.on_output)
        fetched = None
        prepared = self.take_standby(claim, attempt_dir, wait=False)
        if prepared is None:
            # a take that may wait for a fill (as long as the fill takes): the heartbeat
            # beats meanwhile, else another server could take the attempt for orphaned
            rec.start()
            fetched = fetch()
            prepared = self.take_standby(claim, attempt_dir)
        if prepared is not None and not agent.launch(prepared, True, gate):  # died meanwhile
            self._abandon(prepared, control)
            prepared = None
            control.check()  # or was killed by a cancel
        if fetched is None:
            fetched = fetch()
        rec.start()  # its writer, the heartbeat (also while a large repository is fetched);
        # after a ready standby's prompt: its Thread.start waits until the thread runs
        try:
            mirror = fetched.result()
            fits = prepared is not None and self._fits(claim, prepared, mirror)
        except WorkspaceError as exc:
            if prepared is not None:
                self._abandon(prepared, control)
            raise AttemptFailed("workspace_error", str(exc)) from exc
        if prepared is not None and not fits:
            self._abandon(prepared, control)
            prepared = None
        if prepared is not None:
            self.gateway.release(claim.turn_id)
            if prepared.resumed is not None:  # while the model request is under way; the
                # agent's output stays held until then, so the setup log still comes first
                record_standby_resumed(rec, prepared.resumed)
            agent.record_prompt()  # after the setup log, as on a cold start
            gate.open()
            self._refill(claim)
            return prepared
        control.check()
        prepared = self.prepare_cold(claim, rec, mirror, attempt_dir, control)
        agent.launch(prepared, False, agent.on_output)
        self._refill(claim)
        return prepared

    def _fetch(self, claim: Claim) -> Path:
        """The attempt's mirror fetched (one fetch for the attempts of a prompt)."""
        return self.mirrors.ensure(
            claim.repo_key, claim.repo_url, auth=claim.git_auth, group=claim.prompt_turn_id
        )

    def _fits(self, claim: Claim, prepared: Prepared, mirror: Path) -> bool:
        """Whether a standby's checkout is where the attempt starts: the branch head of the
        fetched mirror; a multi-repository standby's, every repository where a cold start
        would check it out (``_repo_targets``: the task's branch where the repository has
        it, else its default branch; their mirrors fetched now)."""
        if not claim.repos:  # read once per fetch for the attempts of a prompt
            return self.mirrors.branch_head(claim.repo_key, claim.branch) == prepared.base
        targets = self._repo_targets(claim, mirror, None)
        return prepared.repos == {t.at.key: _repo_base(t.at) for t in targets}

    def _refill(self, claim: Claim) -> None:
        """Start preparing the next standby for this attempt's key now that its agent has
        the prompt, not when it ends: a task posted right after this one ends then finds one
        ready instead of waiting for a fill begun at that end (``StandbyPool.take`` waits for
        fills under way); for a single attempt of a key whose tasks came back to back faster
        than a fill, two (``StandbyPool.depth``). One for a best-of-N: the rest of its N, and
        topping the key up to a larger recent count (``StandbyPool.refill``), wait for the
        attempts' ends (:meth:`refill`), so the N agents do not share the cores with N
        workspaces, sandboxes and Codex start-ups for the next task (their git, forks and
        Python run in this process, beside the agents' gateway and output, whatever the
        sandboxes' CPU weight)."""
        key = self.standby_key(claim)
        count = 1
        if key is not None:  # its key's fills keep to the background while it starts
            self.standby.attempt_running(key, claim.turn_id)
            assert self.gateway is not None
            turn_id = claim.turn_id
            self.gateway.on_first_request(turn_id, lambda: self.standby.attempt_started(turn_id))
            if claim.attempts == 1:
                count = self.standby.depth(key)
        self.refill(claim, top_up=False, count=count)

    def ended(self, claim: Claim, *, refill: bool) -> None:
        """The attempt ended (whatever its outcome): see ``StandbyPool.attempt_ended``. With
        ``refill``, the key's standbys are brought up to the task's count (and a larger
        recent one, :meth:`refill`) once no other attempt of the key runs: the last of a
        best-of-N's attempts to end does it, so its fills do not run beside the others."""
        self.standby.attempt_ended(claim.turn_id)
        key = self.standby_key(claim)
        if refill and not (key is not None and self.standby.attempts_running(key)):
            self.refill(claim)

    def refill(self, claim: Claim, *, top_up: bool = True, count: int | None = None) -> None:
        """Prepare standbys for attempts like ``claim``'s in the background, when it has a
        standby key (:meth:`standby_key`): as many as its task's attempts (``count``: that
        many); ``top_up``: see ``StandbyPool.refill``."""
        key = self.standby_key(claim)
        if key is None:
            return
        if key.setup:
            with self._setups_lock:
                self._setups[key] = StandbySetup(
                    env_id=claim.env_id,
                    cache=self.cache.key(claim) or "",
                    generation=claim.cache_generation,
                    env_vars=dict(claim.env_vars),
                    secrets=dict(claim.secrets),
                    maintenance=claim.maintenance_script,
                    repos=claim.repos,
                )
                self._setups.move_to_end(key)
                while len(self._setups) > MAX_STANDBY_SETUPS:
                    self._setups.popitem(last=False)
        self.standby.refill(key, claim.attempts if count is None else count, top_up=top_up)

    def standby_key(self, claim: Claim) -> AgentKey | None:
        """The standby key of attempts like ``claim``'s, or ``None`` when they take none: a
        plain attempt's is ``claim.key``; an environment with a setup script has one when its
        post-setup cache is used (``SetupCache.key``), and it adds that key and the
        maintenance script, so a standby is never served after the snapshot it stacks was
        invalidated (reset-cache, a changed setup script, variables, secrets or cache
        invalidation key) nor with another maintenance script; the egress policy is
        ``claim.key.network`` either way. Its ``setup`` part is ``claim.standby_setup`` of
        the environment's cache generation, as the queue's routing computes it from the row
        (``Claims.standby_key``); taking one checks the snapshot key itself
        (``SetupCache.fresh``)."""
        if not (claim.repo_key and claim.repo_url and claim.branch):
            return None
        if claim.plain:
            return claim.key
        if self.cache.key(claim) is None:  # several clones without a snapshot: none either
            return None
        setup = standby_setup(claim.env_id, claim.cache_generation, claim.maintenance_script)
        return dataclasses.replace(claim.key, setup=setup)

    def _abandon(self, standby: Prepared, control: Control) -> None:
        """Nothing of a standby's run that did not fit is kept."""
        control.attach(None)
        self.drop_standby(standby)

    def prepare_cold(
        self, claim: Claim, rec: TurnRecorder, mirror: Path, attempt_dir: Path, control: Control
    ) -> Prepared:
        """Clone the workspace at the branch (a follow-up: the previous attempt's tree on the
        task's base; else the starting diff), run the setup script, start the agent. With a
        post-setup snapshot of the environment: start from it (checking the attempt's commit
        out on top when it was taken at another) and run the maintenance script instead."""
        with contextlib.ExitStack() as held:  # leases of the snapshot used, until the agent's
            return self._prepare_cold(claim, rec, mirror, attempt_dir, control, held)

    def _prepare_cold(
        self,
        claim: Claim,
        rec: TurnRecorder,
        mirror: Path,
        attempt_dir: Path,
        control: Control,
        held: contextlib.ExitStack,
    ) -> Prepared:
        assert self.agents is not None
        attempt_dir.mkdir(parents=True, mode=0o700)
        workspace = attempt_dir / "workspace"
        resume = claim.resume if isinstance(claim.resume, Resume) else None
        repos: dict[str, dict[str, str]] = {}
        targets: list[RepoTarget] = []  # a multi-repository attempt's
        cache = self.cache.use(claim, held)
        try:
            if claim.repos:
                targets[:] = self._repo_targets(claim, mirror, resume)
                self.cache.resume_repos(claim, cache, targets, attempt_dir)
                if cache.hit is not None and not self.cache.apply_repo_changes(
                    claim, resume, workspace, targets
                ):
                    cache.miss()  # as without a snapshot: fresh clones and setup
                    forget(attempt_dir)
                if cache.hit is None:
                    self._clone_repos(targets, workspace, resume)
                repos = {t.at.key: _repo_base(t.at) for t in targets}
                base = targets[0].at.commit
            else:
                at = resume.base if resume is not None else None  # the task's base
                # the head as read once per fetch: prepare's fetch (or a later one)
                base = self.mirrors.start_commit(claim.repo_key, claim.branch, at, "the repository")
                self.cache.resume(claim, cache, mirror, base, attempt_dir)
                if cache.hit is not None and not self.cache.apply_change(
                    claim, resume, workspace, base
                ):
                    cache.miss()  # as if there were no snapshot: a fresh workspace and setup
                    forget(attempt_dir)
                if cache.hit is None:
                    workspace_at(
                        mirror,
                        workspace,
                        claim.branch,
                        claim.repo_url,
                        base,
                        checkouts=self.checkouts,
                    )
        except WorkspaceError as exc:
            raise AttemptFailed("workspace_error", str(exc)) from exc
        home = attempt_dir / "home"
        if not home.exists():
            home.mkdir(mode=0o700)
        if cache.hit is None:
            try:
                if resume is not None and resume.tree and not claim.repos:
                    apply_patch(workspace, resume.tree, what="The previous attempt's change")
            except WorkspaceError as exc:
                raise AttemptFailed("workspace_error", str(exc)) from exc
            if claim.patch and resume is None:  # the first repository's
                first = workspace / claim.repos[0].dir if claim.repos else workspace
                try:
                    apply_patch(first, claim.patch)
                except WorkspaceError as exc:
                    raise AttemptFailed("failed_to_apply_patch_error", str(exc)) from exc
        control.check()
        budget = disk_budget(self.settings, attempt_dir)  # from here on, what it writes
        if cache.hit is not None:
            self._maintenance(claim, rec, attempt_dir, control, budget, cache.hit, base)
        elif claim.setup_script.strip():
            self._setup(claim, rec, attempt_dir, control, budget)
            # only what the setup script wrote: no starting diff or previous change in it
            changed = resume is not None and bool(resume.tree or resume.repo_trees)
            if cache.key is not None and not claim.patch and not changed:
                repos_at = tuple(t.at for t in targets)
                self.cache.take(claim, cache, rec, attempt_dir, base, repos_at)
            elif cache.key is not None:
                rec.set(setup_cache={"used": False, "saved": False})
        return self.agents.start(
            claim.key,
            attempt_dir,
            base,
            owner=claim.turn_id,
            resume=resume,
            env_vars=claim.env_vars,
            budget=budget,
            repos=repos,
        )

    def _repo_targets(self, claim: Claim, mirror: Path, resume: Resume | None) -> list[RepoTarget]:
        """Where every repository of a multi-repository environment starts (``mirror``: the
        first one's, fetched already; the others' are fetched now): at the task's branch
        where the repository has it, else at its default branch (the first one too: the
        branch may be another's only, ``service.tasks``); a follow-up at the branch and
        commit the previous attempt started from. In the environment's order."""
        targets: list[RepoTarget] = []
        for i, repo in enumerate(claim.repos):
            own = mirror if i == 0 else self.mirrors.ensure(repo.key, repo.url, auth=repo.auth)
            before = resume.repo_bases.get(repo.key) if resume is not None else None
            at: str | None = None
            if isinstance(before, dict) and before.get("branch") and before.get("sha"):
                branch, at = str(before["branch"]), str(before["sha"])
            elif i == 0 and resume is not None:
                branch, at = claim.branch, resume.base
            elif branch_ref(own, claim.branch) is not None:
                branch = claim.branch
            else:
                branch = repo.default_branch
            sha = start_commit(own, branch, at, f"the repository {repo.url}")
            targets.append(RepoTarget(RepoAt(repo.key, repo.dir, sha, branch), own, repo.url))
        return targets

    def _clone_repos(
        self, targets: list[RepoTarget], workspace: Path, resume: Resume | None
    ) -> None:
        """Every repository cloned into ``workspace/<dir>`` at its target (a follow-up's
        with the previous attempt's change of it)."""
        workspace.mkdir()
        for i, target in enumerate(targets):
            at = target.at
            create_repo_workspace(
                target.mirror, workspace, at.dir, at.branch, target.url, at=at.commit
            )
            tree = resume.tree if resume is not None and i == 0 else None
            if resume is not None and i > 0:
                tree = resume.repo_trees.get(at.key)
            if tree:
                apply_patch(
                    workspace / at.dir, tree, what=f"The previous attempt's change of {at.dir}"
                )

    def _maintenance(
        self,
        claim: Claim,
        rec: TurnRecorder,
        attempt_dir: Path,
        control: Control,
        budget: DiskBudget | None,
        hit: Resumed,
        base: str,
    ) -> None:
        """On a cache hit: say so (and which commit the snapshot was taken at, when the
        attempt checked out another), and run the maintenance script (like the setup script:
        network through the egress proxy, variables and secrets) if there is one."""
        maintenance = bool(claim.maintenance_script.strip())
        resumed = record_resumed(rec, hit.snapshot, base, maintenance, hit.repos)
        preface = (resumed, *hit.lines)
        if not claim.maintenance_script.strip():
            setup_phase.note(rec, preface)
            return
        self._setup(
            claim,
            rec,
            attempt_dir,
            control,
            budget,
            script=claim.maintenance_script,
            preface=(*preface, "Running maintenance script"),
            what="maintenance script",
        )
        rec.status("Ran maintenance script")

    def _setup(
        self,
        claim: Claim,
        rec: TurnRecorder,
        attempt_dir: Path,
        control: Control,
        budget: DiskBudget | None,
        *,
        script: str | None = None,
        preface: tuple[str, ...] = (),
        what: str = "setup script",
    ) -> None:
        """The environment's setup script (engine/setup.py), or ``script`` (the maintenance
        script); a failure fails the attempt with its exit code, and its log stays on the
        turn."""
        limits = dataclasses.replace(
            attempt_limits(self.settings),
            wall_clock_seconds=float(self.settings.setup_timeout_seconds),
        )
        result = setup_phase.run(
            claim.setup_script if script is None else script,
            workspace=attempt_dir / "workspace",
            home=attempt_dir / "home",
            env={**claim.env_vars, **claim.secrets},
            egress=self.egress,
            limits=limits,
            rec=rec,
            attach=control.attach,
            sandbox=self.sandbox,
            disk=budget,
            preface=preface,
        )
        control.check()
        if result.disk_reason is not None:
            raise over_disk(result.disk_reason)
        if result.exit_code == setup_phase.LAUNCHER_FAILED and not result.killed_reason:
            raise AttemptFailed("setup_failed", f"The {what} could not start (see the setup log)")
        if result.stalled:  # the watchdog: stopped or defunct, it would never have ended
            raise AttemptFailed("sandbox_stalled", f"The {what}'s sandbox {result.killed_reason}")
        if not result.ok:
            why = result.killed_reason or f"exited with code {result.exit_code}"
            raise AttemptFailed("setup_failed", f"The {what} {why} (see the setup log)")

    def take_standby(
        self, claim: Claim, attempt_dir: Path, *, wait: bool = True
    ) -> Prepared | None:
        """A standby for this attempt, moved to ``attempt_dir`` with its token handed over
        and held (the caller checks the branch head, then releases it). Not used with a
        starting diff: the agent reads the repository's config and AGENTS.md at start-up,
        before the patch could be applied. ``wait``: see ``StandbyPool.take``."""
        if claim.patch or claim.resume is not None or self.gateway is None:
            return None
        key = self.standby_key(claim)
        if key is None:
            return None
        prepared = self.standby.take(key, wait=wait)
        if prepared is None:
            return None
        made = prepared.resumed
        # expired or removed since (its key is the claim's: not invalidated otherwise)
        if made is not None and not self.cache.fresh(made, claim):
            self.drop_standby(prepared)
            return None
        if not self.gateway.reassign(prepared.owner, claim.turn_id, hold=True):
            self.drop_standby(prepared)
            return None
        os.rename(prepared.dir, attempt_dir)
        return dataclasses.replace(prepared, dir=attempt_dir, owner=claim.turn_id)

    def make_standby(self, key: AgentKey) -> Prepared:
        """A standby for ``key`` (the pool calls this in a background thread)."""
        assert self.agents is not None
        directory = self.attempts_root / f"{STANDBY_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:12]}"
        directory.mkdir(mode=0o700)
        with contextlib.ExitStack() as held:  # the snapshot's lease until the agent has its own
            return self._make_standby(key, directory, held)

    def _make_standby(self, key: AgentKey, directory: Path, held: contextlib.ExitStack) -> Prepared:
        assert self.agents is not None
        try:
            mirror = self.mirrors.ensure(key.repo_key, key.repo_url, fetch=False)
            made: FromSnapshot | None = None
            env_vars: dict[str, str] | None = None
            repos: dict[str, dict[str, str]] | None = None
            if key.setup:
                with self._setups_lock:
                    setup = self._setups.get(key)
                if setup is None:
                    raise RuntimeError("its setup inputs are no longer kept")
                made = self._from_snapshot(key, setup, mirror, directory, held)
                base, env_vars = made.base, setup.env_vars
                repos = {at.key: _repo_base(at) for at in made.repos} or None
            else:  # the head as read once per fetch (a take checks it after its own)
                head = self.mirrors.start_commit(key.repo_key, key.branch, None, "the repository")
                base = workspace_at(
                    mirror,
                    directory / "workspace",
                    key.branch,
                    key.repo_url,
                    head,
                    checkouts=self.checkouts,
                )
            prepared = self.agents.start(
                key,
                directory,
                base,
                owner=directory.name,
                env_vars=env_vars,
                repos=repos,
                background=True,
            )
            self.standby.started(key, prepared.proc)  # hurried if an attempt waits for it
            prepared.resumed = made
        except BaseException:
            storage.remove_tree(directory)
            raise
        # taking it renames the directory: only once bwrap has resolved the binds
        if not prepared.proc.wait_ready(STANDBY_READY_SECONDS):
            result = prepared.proc.kill("standby sandbox did not start")
            self.drop_standby(prepared)
            raise RuntimeError(f"the standby sandbox did not start: {result.stderr[-500:]}")
        return prepared

    def _from_snapshot(
        self,
        key: AgentKey,
        setup: StandbySetup,
        mirror: Path,
        directory: Path,
        held: contextlib.ExitStack,
    ) -> FromSnapshot:
        """A standby's workspace and home from the environment's snapshot, at the branch head
        of the mirror, with the maintenance script run on them (network, variables and
        secrets, as on a cache hit). Run here, not when the standby is taken: the agent is
        already started on the workspace then, and a second sandbox on a mounted overlay's
        upper directory would leave two inconsistent views (docs/ARCHITECTURE.md)."""
        snap = self.cache.held_snapshot(setup.env_id, setup.cache, held)
        repos: tuple[RepoAt, ...] = ()
        if setup.repos:  # every repository at the key's branch where it has it
            targets = self._standby_targets(key, setup.repos, mirror)
            lines = self.cache.stack_repos(snap, targets, directory)
            base, repos = targets[0].at.commit, tuple(t.at for t in targets)
        else:
            head = self.mirrors.branch_head(key.repo_key, key.branch)
            if head is None:
                raise RuntimeError(f"the mirror has no branch {key.branch}")
            base = head
            lines = self.cache.stack(snap, mirror, base, key.branch, key.repo_url, directory)
        if not setup.maintenance.strip():
            return FromSnapshot(snap, base, tuple(lines), repos=repos)
        collected = setup_phase.Collected()
        ran_at = time.time()
        result = setup_phase.run(
            setup.maintenance,
            workspace=directory / "workspace",
            home=directory / "home",
            env={**setup.env_vars, **setup.secrets},
            egress=self.egress,
            limits=dataclasses.replace(
                attempt_limits(self.settings),
                wall_clock_seconds=float(self.settings.setup_timeout_seconds),
            ),
            rec=collected,
            attach=lambda _proc: None,
            sandbox=self.sandbox,
            disk=disk_budget(self.settings, directory),
        )
        if not result.ok:  # the attempt that finds no standby runs it again and says why
            why = result.killed_reason or f"exit {result.exit_code}"
            raise RuntimeError(f"the maintenance script failed ({why})")
        return FromSnapshot(
            snap,
            base,
            tuple(lines),
            tuple(collected.lines),
            tuple(collected.events),
            ran_at,
            repos,
        )

    def _standby_targets(
        self, key: AgentKey, repos: tuple[RepoCheckout, ...], mirror: Path
    ) -> list[RepoTarget]:
        """Where each repository of a multi-repository standby starts, as ``_repo_targets``
        picks it for a new task on ``key.branch`` (its mirrors as they are: the take fetches
        them and checks, ``_fits``); ``mirror``: the first one's."""
        targets: list[RepoTarget] = []
        for i, repo in enumerate(repos):
            own = mirror if i == 0 else self.mirrors.ensure(repo.key, repo.url, fetch=False)
            has = branch_ref(own, key.branch) is not None
            branch = key.branch if has else repo.default_branch
            sha = branch_ref(own, branch)
            if sha is None:
                raise RuntimeError(f"the mirror of {repo.url} has no branch {branch}")
            targets.append(RepoTarget(RepoAt(repo.key, repo.dir, sha, branch), own, repo.url))
        return targets

    def snapshot_keys(self) -> list[AgentKey]:
        """The standby keys with a setup script whose post-setup snapshot is here (of those
        whose setup inputs are kept): an attempt of one that finds no standby anywhere still
        resumes the snapshot here instead of running its setup script elsewhere (the queue
        executor offers them, ``engine.queue``)."""
        snapshots = self.snapshots
        if snapshots is None:
            return []
        with self._setups_lock:
            setups = list(self._setups.items())
        return [key for key, setup in setups if snapshots.has(setup.env_id, setup.cache)]

    def reset_cache(self, env_id: str, keep: str | None = None) -> list[Path]:
        """After ``POST environments/{id}/reset-cache``: drop the environment's standbys
        started from a snapshot, then remove its snapshots that no sandbox, attempt or
        standby being prepared holds (those go at a later attempt or on expiry, or at a later
        :meth:`drop_stale_caches`); returns what went. ``keep``: the environment's current
        cache generation, whose standbys and snapshots stay."""
        with self._setups_lock:
            keys = {
                key
                for key, setup in self._setups.items()
                if setup.env_id == env_id and (keep is None or setup.generation != keep)
            }
            for key in keys:
                del self._setups[key]
        self.standby.discard(lambda key: key in keys)
        return self.cache.clear(env_id, keep)

    def drop_stale_caches(
        self, current: Callable[[list[str]], dict[str, str]], only: str | None = None
    ) -> list[str]:
        """What a reset-cache answered by another node (the queue executor's workers: their
        sweep calls this every few seconds) or a changed or deleted environment left here
        (the node that answered it calls this for that environment, ``only``): the standbys
        and snapshots of an environment whose cache generation is no longer ``current``'s
        (environment id -> generation, read from the database; absent: the environment is
        gone), as :meth:`reset_cache` drops them. Returns those environments."""
        held = self.cache.environments()
        with self._setups_lock:
            for setup in self._setups.values():
                held.setdefault(setup.env_id, set()).add(setup.generation)
        if only is not None:
            held = {only: held[only]} if only in held else {}
        if not held:
            return []
        now = current(sorted(held))
        stale = [env for env, gens in held.items() if gens - {now.get(env)}]
        for env_id in stale:
            removed = self.reset_cache(env_id, keep=now.get(env_id))
            if removed:
                log.info("stale post-setup snapshots of %s removed: %d", env_id, len(removed))
        return stale

    def drop_standby(self, prepared: Prepared) -> None:
        prepared.proc.kill("standby sandbox dropped")
        if self.gateway is not None:
            self.gateway.forget(prepared.owner)
        storage.remove_tree(prepared.dir)


class Background(Generic[T]):
    """``fn()`` run on a thread of its own from now on; :meth:`result` waits for its value
    (or raises its exception). Nobody need wait: a daemon thread that ends by itself."""

    def __init__(self, fn: Callable[[], T], name: str) -> None:
        self._done = threading.Event()
        self._value: T | None = None
        self._error: BaseException | None = None
        self._fn = fn
        threading.Thread(target=self._run, name=name, daemon=True).start()

    def _run(self) -> None:
        try:
            self._value = self._fn()
        except BaseException as exc:  # the waiter's to raise
            self._error = exc
        finally:
            self._done.set()

    def result(self) -> T:
        self._done.wait()
        if self._error is not None:
            raise self._error
        return cast(T, self._value)


def _repo_base(at: RepoAt) -> dict[str, str]:
    """A repository's entry in an attempt's ``repo_bases`` (``Prepared.repos``)."""
    return {"dir": at.dir, "branch": at.branch, "sha": at.commit}


_SETTLE_LIMITS = Limits(wall_clock_seconds=60, max_processes=64, memory_bytes=1 << 30)


def settle_index(sandbox: SandboxProvider, workspace: Path) -> None:
    """Rewrite a standby's index as the agent's git will see it. A fresh clone's index holds
    the host's view of each file (owner, and entries "smudged" as racily clean because the
    files and the index were written within one second), so the first ``git status`` or
    ``add`` inside the sandbox re-reads every file and rewrites the index (60 ms for 5,000
    files, paid by the agent's first git command or the diff). The pool calls this a second
    after the clone while the standby is unused, in a sandbox of its own (same uid mapping
    as the agent's), on files that are still the clone's own. Not for an overlay workspace:
    its checkout's index was settled once when the checkout was made, and a second mount of
    the upper directory beside the standby's own would leave the two views inconsistent."""
    if overlay.of(workspace) is not None:
        return
    with contextlib.suppress(OSError, bwrap.SandboxUnavailable):
        sandbox.run(
            SandboxSpec(workspace=workspace, limits=_SETTLE_LIMITS),
            ["git", "-c", "core.hooksPath=/dev/null", "update-index", "-q", "--refresh"],
        )


def remove_orphaned_standbys(root: Path) -> None:
    """Standby directories of a server process that is gone (its sandboxes died with it),
    and their files in :data:`READY_STANDBYS`."""
    for path in root.glob(f"{STANDBY_PREFIX}*"):
        if _orphaned(path):
            storage.remove_tree(path)
    for path in root.glob(f"{READY_STANDBYS}/*"):
        if _orphaned(path):
            path.unlink(missing_ok=True)


def _orphaned(path: Path) -> bool:
    """Whether a standby's directory (or its ready file) is of a server process that is gone
    (or of this one's pid: a process before it)."""
    pid = path.name.removeprefix(STANDBY_PREFIX).split("-", 1)[0]
    return not pid.isdigit() or not Path(f"/proc/{pid}").exists() or int(pid) == os.getpid()


def shared_checkouts(settings: Settings, sandbox: SandboxProvider, root: Path) -> Checkouts | None:
    """The shared checkouts of overlay workspaces, or ``None`` (a clone per attempt) when
    they are off, the sandbox is not bubblewrap (only its launch mounts the overlay) or the
    host cannot mount overlays; logged either way."""
    if not settings.workspace_overlay:
        log.info("workspaces: a clone per attempt (WHAM_WORKSPACE_OVERLAY=false)")
        return None
    if sandbox is not BUBBLEWRAP:
        log.info("workspaces: a clone per attempt (the sandbox provider is not bubblewrap)")
        return None
    checkouts = Checkouts(root, keep=settings.checkout_cache)
    if not checkouts.enabled:
        log.warning(
            "workspaces: a clone per attempt (every file written per attempt, seconds for a "
            "large repository): overlay workspaces are unavailable: %s",
            checkouts.reason,
        )
        return None
    checkouts.sweep()
    log.info("workspaces: overlays over shared checkouts in %s", root)
    return checkouts


def setup_snapshots(
    settings: Settings, checkouts: Checkouts | None, root: Path
) -> Snapshots | None:
    """The post-setup snapshot cache (an overlay layer per snapshot with overlay workspaces,
    else a copy of the workspace: ``checkouts`` is ``None``); crash leftovers and expired
    snapshots are removed now."""
    if checkouts is None:
        log.info("post-setup cache: copies of clone workspaces (no overlay workspaces)")
    snapshots = Snapshots(
        root,
        max_age=float(settings.setup_cache_max_age_seconds),
        max_bytes=settings.setup_cache_max_mb << 20,
    )
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    snapshots.sweep()
    return snapshots
