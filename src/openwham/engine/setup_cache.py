"""The post-setup cache's part in preparing a workspace (``sandbox.snapshots`` holds the files).

:class:`SetupCache` holds what the cache needs (the snapshots, the shared checkouts they
stack on, the sandbox its git runs in) and does the cache's steps of an attempt or a
standby: the key (:meth:`SetupCache.key`), a hit (the snapshot found, held and stacked, the
attempt's commit checked out on top), a follow-up's change or a starting diff applied over
it, and a snapshot taken after a successful setup script. :class:`CacheUse` is one attempt's
use of it as explicit state: its key, the snapshot it resumed, and the leases it holds until
its agent's sandbox holds its own. ``engine.workspace`` calls these in order; the status lines
and ``setup_cache`` a hit records are :func:`record_resumed` and
:func:`record_standby_resumed`. See docs/ARCHITECTURE.md, "Post-setup cache".
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select

from openwham.sandbox import overlay
from openwham.sandbox.provider import SandboxProvider
from openwham.sandbox.snapshots import (
    CheckoutFailed,
    RepoAt,
    Snapshot,
    Snapshots,
    apply_change,
    cache_key,
    check_out,
)
from openwham.sandbox.workspace import (
    Checkouts,
    WorkspaceError,
    branch_ref,
    overlay_workspace,
    share_objects,
    share_repo_objects,
)
from openwham.store import models as m
from openwham.store.db import Database
from openwham.wire.common import naive_iso

from . import setup as setup_phase
from . import storage
from .claim import Claim, Resume, cache_generation
from .recorder import TurnRecorder
from .standby import FromSnapshot

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Resumed:
    """A cache hit: the snapshot an attempt started from, and what checking its commit out
    on top said (for the setup log)."""

    snapshot: Snapshot
    lines: tuple[str, ...] = ()
    #: a multi-repository attempt's: where each repository was checked out
    repos: tuple[RepoAt, ...] = ()


@dataclass(frozen=True)
class RepoTarget:
    """Where one repository of a multi-repository attempt starts (``at``: its key, directory,
    commit and branch), the mirror its objects come from and its URL."""

    at: RepoAt
    mirror: Path
    url: str


@dataclass
class CacheUse:
    """One attempt's use of the post-setup cache: its key (``None``: the cache is not used),
    the snapshot it resumed (``hit``; ``None``: it runs the setup script), and the leases on
    snapshots it holds (``held``: closed by its owner once the agent's sandbox holds its
    own, so a reset-cache never removes a snapshot from under it between its sandboxes)."""

    key: str | None
    held: contextlib.ExitStack
    hit: Resumed | None = None

    def miss(self) -> None:
        """The snapshot is not used after all (the attempt starts without it)."""
        self.hit = None


@dataclass
class SetupCache:
    """The post-setup cache as ``engine.workspace`` uses it (``snapshots`` ``None``: off,
    every attempt runs its setup script)."""

    sandbox: SandboxProvider
    checkouts: Checkouts | None
    snapshots: Snapshots | None

    @property
    def overlays(self) -> bool:
        """Whether workspaces are overlays (a snapshot is a layer, else a copy)."""
        return self.checkouts is not None and self.checkouts.enabled

    def key(self, claim: Claim) -> str | None:
        """The post-setup cache key of this attempt (``sandbox.snapshots``), or ``None`` when
        the cache is not used: off, no setup script or a deleted environment. No commit in it:
        an attempt at another commit checks its own out on top of the snapshot (a branch that
        moved needs only its new commits, not the setup script again). A multi-repository
        environment's holds each repository's key, URL and directory (each one's commit and
        branch are the snapshot's record, checked out on top the same way)."""
        if (
            self.snapshots is None
            or not claim.setup_cache
            or not claim.env_id
            or not claim.setup_script.strip()
        ):
            return None
        parts: dict[str, object] = {
            "environment": claim.env_id,
            "setup": claim.setup_script,
            "env_vars": claim.env_vars,
            # the secrets as sealed (through the generation, a hash of their tokens; a
            # value sent again keeps its token): no hash of a secret's value is kept on disk
            "generation": claim.cache_generation,
            "invalidation": claim.cache_invalidation_key,
            "repository": claim.repo_key,
            # an overlay layer and a copied workspace are used differently
            "layout": "overlay" if self.overlays else "copy",
        }
        if claim.repos:  # always clones: a copy of the whole workspace
            parts["layout"] = "repos"
            parts["repositories"] = [[r.key, r.url, r.dir] for r in claim.repos]
        return cache_key(parts)

    def use(self, claim: Claim, held: contextlib.ExitStack) -> CacheUse:
        """The attempt's use of the cache, before anything is found."""
        return CacheUse(self.key(claim), held)

    def resume(
        self, claim: Claim, use: CacheUse, mirror: Path, base: str, attempt_dir: Path
    ) -> None:
        """Set ``use.hit`` when the environment has a snapshot under ``use.key``: the
        workspace and home of ``attempt_dir`` made from it (an overlay over the checkout it
        was taken over, the snapshot stacked on it, then ``base`` on the task's branch
        checked out on top when that is another commit or branch). No hit (and nothing left
        in ``attempt_dir``) when there is none or it cannot be used: the attempt then runs the
        setup script as without one."""
        if use.key is None or self.snapshots is None:
            return
        snap = self.snapshots.find(claim.env_id, use.key)
        lease = self.snapshots.hold(snap) if snap is not None else None
        if snap is None or lease is None:
            return
        use.held.callback(lease.close)  # a reset-cache does not remove it under the attempt
        try:
            lines = self.stack(snap, mirror, base, claim.branch, claim.repo_url, attempt_dir)
        except (WorkspaceError, OSError, CheckoutFailed, overlay.OverlayUnavailable) as exc:
            log.warning("post-setup snapshot %s not used for %s: %s", snap.path, claim.turn_id, exc)
            forget(attempt_dir)
            return
        use.hit = Resumed(snap, tuple(lines))

    def apply_change(self, claim: Claim, resume: Resume | None, workspace: Path, base: str) -> bool:
        """A follow-up's previous change (its tracked and untracked files back at ``base``
        first: the change holds what setup did to them) or the starting diff, applied over
        the snapshot in a sandbox (``snapshots.apply_change``: its ``.git`` is the setup
        script's). ``False`` when it does not apply there (an ignored file the change adds,
        say): the caller starts again without the snapshot, where it applies as it would
        have without a cache or fails saying why."""
        try:
            if resume is not None and resume.tree:
                apply_change(
                    self.sandbox,
                    workspace,
                    resume.tree,
                    what="The previous attempt's change",
                    base=base,
                )
            elif claim.patch and resume is None:
                apply_change(self.sandbox, workspace, claim.patch, what="The starting diff")
        except WorkspaceError as exc:
            log.warning("post-setup snapshot not used for %s: %s", claim.turn_id, exc)
            return False
        return True

    def resume_repos(
        self, claim: Claim, use: CacheUse, targets: list[RepoTarget], attempt_dir: Path
    ) -> None:
        """:meth:`resume` for a multi-repository attempt: the copied workspace and home of
        the environment's snapshot, each repository's objects linked to its mirror and its
        own commit and branch (``targets``) checked out on top where they differ from the
        snapshot's. No hit when the snapshot's repositories are not the attempt's."""
        if use.key is None or self.snapshots is None:
            return
        snap = self.snapshots.find(claim.env_id, use.key)
        wanted = [(t.at.key, t.at.dir) for t in targets]
        if snap is None or [(r.key, r.dir) for r in snap.repos] != wanted:
            return
        lease = self.snapshots.hold(snap)
        if lease is None:
            return
        use.held.callback(lease.close)
        try:
            lines = self.stack_repos(snap, targets, attempt_dir)
        except (WorkspaceError, OSError, CheckoutFailed, ValueError) as exc:
            log.warning("post-setup snapshot %s not used for %s: %s", snap.path, claim.turn_id, exc)
            forget(attempt_dir)
            return
        use.hit = Resumed(snap, tuple(lines), tuple(t.at for t in targets))

    def stack_repos(self, snap: Snapshot, targets: list[RepoTarget], directory: Path) -> list[str]:
        """``directory``'s workspace and home from a multi-repository snapshot, each
        repository's objects linked to its mirror and its target checked out on top where it
        differs from the snapshot's; returns what the checkouts said (for the setup log).
        ``ValueError`` when the snapshot's repositories are not ``targets``'."""
        assert self.snapshots is not None
        if [(r.key, r.dir) for r in snap.repos] != [(t.at.key, t.at.dir) for t in targets]:
            raise ValueError("the snapshot's repositories are not the environment's")
        workspace, home = directory / "workspace", directory / "home"
        home.mkdir(mode=0o700)
        for target in targets:
            share_repo_objects(target.mirror, workspace, target.at.dir)
        self.snapshots.use_copy(snap, workspace, home)
        lines: list[str] = []
        for target, was in zip(targets, snap.repos, strict=True):
            at = target.at
            if (was.commit, was.branch) == (at.commit, at.branch):
                continue
            moved = check_out(
                self.sandbox,
                workspace,
                start=was.commit,
                commit=at.commit,
                branch=at.branch,
                origin=branch_ref(target.mirror, at.branch),
                subdir=at.dir,
            )
            lines += [f"{at.dir}: {line}" for line in moved]
        return lines

    def apply_repo_changes(
        self, claim: Claim, resume: Resume | None, workspace: Path, targets: list[RepoTarget]
    ) -> bool:
        """:meth:`apply_change` for a multi-repository attempt: a follow-up's previous change
        of each repository (its tracked and untracked files back at that repository's commit
        first), or the starting diff on the first one, each in a sandbox in its directory."""
        try:
            for i, target in enumerate(targets):
                at = target.at
                if resume is not None:
                    tree = resume.tree if i == 0 else resume.repo_trees.get(at.key)
                    if tree:
                        apply_change(
                            self.sandbox,
                            workspace,
                            tree,
                            what=f"The previous attempt's change of {at.dir}",
                            base=at.commit,
                            subdir=at.dir,
                        )
                elif claim.patch and i == 0:
                    what = "The starting diff"
                    apply_change(self.sandbox, workspace, claim.patch, what=what, subdir=at.dir)
        except WorkspaceError as exc:
            log.warning("post-setup snapshot not used for %s: %s", claim.turn_id, exc)
            return False
        return True

    def stack(
        self, snap: Snapshot, mirror: Path, base: str, branch: str, url: str, directory: Path
    ) -> list[str]:
        """``directory``'s workspace (an overlay over the checkout ``snap`` was taken over,
        ``snap`` stacked on it; or a copy of a clone workspace's snapshot) and home (a copy of
        its home), with ``base`` on ``branch``
        checked out on top when that is another commit or branch; returns what the checkout
        said (for the setup log)."""
        assert self.snapshots is not None
        workspace, home = directory / "workspace", directory / "home"
        home.mkdir(mode=0o700)
        if self.checkouts is not None and self.checkouts.enabled:
            overlay_workspace(mirror, workspace, self.checkouts, snap.branch, snap.commit, url)
            self.snapshots.use(snap, workspace, home)
        else:  # a clone workspace: the snapshot is a copy (Snapshots.take_copy)
            share_objects(mirror, workspace)
            self.snapshots.use_copy(snap, workspace, home)
        if (snap.commit, snap.branch) == (base, branch):
            return []
        return check_out(
            self.sandbox,
            workspace,
            start=snap.commit,
            commit=base,
            branch=branch,
            origin=branch_ref(mirror, branch),
        )

    def take(
        self,
        claim: Claim,
        use: CacheUse,
        rec: TurnRecorder,
        attempt_dir: Path,
        base: str,
        repos: tuple[RepoAt, ...] = (),
    ) -> None:
        """Keep what the setup script left for the environment's next attempts; a failure
        only costs the next attempt its setup again. ``repos``: a multi-repository
        workspace's repositories (a copy of the whole workspace, each one's commit and
        branch recorded)."""
        assert self.snapshots is not None and use.key is not None
        started = time.monotonic()
        workspace, home = attempt_dir / "workspace", attempt_dir / "home"
        try:
            if repos:
                snap = self.snapshots.take_copy(
                    claim.env_id,
                    use.key,
                    workspace,
                    home,
                    commit=base,
                    branch=repos[0].branch,
                    repos=repos,
                    generation=claim.cache_generation,
                )
            else:
                take = self.snapshots.take if self.overlays else self.snapshots.take_copy
                snap = take(
                    claim.env_id,
                    use.key,
                    workspace,
                    home,
                    commit=base,
                    branch=claim.branch,
                    generation=claim.cache_generation,
                )
        except (OSError, ValueError) as exc:
            log.warning("no post-setup snapshot for %s: %s", claim.turn_id, exc)
            rec.set(setup_cache={"used": False, "saved": False})
            return
        took = time.monotonic() - started
        lease = self.snapshots.hold(snap)  # the attempt's workspace stacks it from now on
        if lease is not None:
            use.held.callback(lease.close)
        log.info("post-setup snapshot %s: %d bytes in %.4f s", snap.path, snap.size, took)
        rec.set(
            setup_cache={
                "used": False,
                "saved": True,
                "size": snap.size,
                "created": naive_iso(snap.created),
                "commit": base,
            }
        )

    def held_snapshot(self, env_id: str, key: str, held: contextlib.ExitStack) -> Snapshot:
        """``env_id``'s snapshot under ``key``, held (``held``) for a standby being made;
        :class:`RuntimeError` when there is none."""
        snap = self.snapshots.find(env_id, key) if self.snapshots else None
        lease = self.snapshots.hold(snap) if self.snapshots and snap else None
        if snap is None or lease is None:
            raise RuntimeError("the environment has no post-setup snapshot")
        held.callback(lease.close)
        return snap

    def fresh(self, made: FromSnapshot, claim: Claim) -> bool:
        """Whether the snapshot a standby was started from is still the claim's and not
        expired (``Snapshots.fresh``)."""
        return self.snapshots is not None and self.snapshots.fresh(
            made.snapshot, claim.env_id, self.key(claim)
        )

    def clear(self, env_id: str, keep: str | None = None) -> list[Path]:
        """Remove ``env_id``'s snapshots that nothing holds (after a reset-cache; ``keep``:
        but those of that cache generation)."""
        return self.snapshots.clear(env_id, keep) if self.snapshots is not None else []

    def environments(self) -> dict[str, set[str]]:
        """The environments with snapshots here, each with their cache generations."""
        return self.snapshots.environments() if self.snapshots is not None else {}


def cache_generations(db: Database, env_ids: list[str]) -> dict[str, str]:
    """The current cache generation (``claim.cache_generation``) of each of ``env_ids`` that
    still exists, read from their rows."""
    with db.sessions() as s:
        rows = s.execute(
            select(m.Environment.id, m.Environment.body, m.Environment.secrets).where(
                m.Environment.id.in_(env_ids)
            )
        ).all()
    return {
        str(env_id): cache_generation(dict(body or {}), dict(secrets or {}))
        for env_id, body, secrets in rows
    }


def forget(attempt_dir: Path) -> None:
    """Empty ``attempt_dir`` (a workspace made from a snapshot that could not be used)."""
    for entry in attempt_dir.iterdir():
        if entry.is_symlink():
            entry.unlink()
        else:
            storage.remove_tree(entry)


def record_resumed(
    rec: TurnRecorder,
    snap: Snapshot,
    base: str,
    maintenance: bool,
    repos: tuple[RepoAt, ...] = (),
) -> str:
    """Say on ``rec`` that the attempt resumes ``snap`` at ``base`` (status line and
    ``setup_cache``; ``repos``: a multi-repository attempt's, each one that moved is named);
    returns the status line."""
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(snap.created))
    moved = f"commit {snap.commit[:7]}→{base[:7]}, " if snap.commit != base else ""
    if repos:
        moves = [
            f"{at.dir} {was.commit[:7]}→{at.commit[:7]}"
            for at, was in zip(repos, snap.repos, strict=False)
            if was.commit != at.commit
        ]
        moved = f"commits {', '.join(moves)}, " if moves else ""
    resumed = f"Resumed cached container from {when} ({moved}setup script not run)"
    rec.status(resumed)
    rec.set(
        setup_cache={
            "used": True,
            "created": naive_iso(snap.created),
            "commit": snap.commit,
            "checked_out": base,
            "maintenance": maintenance,
        }
    )
    return resumed


def record_standby_resumed(rec: TurnRecorder, made: FromSnapshot) -> None:
    """A standby from a snapshot was taken: the same status lines, setup log and
    ``setup_cache`` as a cache hit started now, the maintenance script's output and
    proxy events being those of its run when the standby was prepared (said so)."""
    resumed = record_resumed(rec, made.snapshot, made.base, bool(made.ran_at), made.repos)
    preface = (resumed, *made.lines)
    if not made.ran_at:
        setup_phase.note(rec, (*preface, "Started in a sandbox prepared in advance"))
        return
    when = time.strftime("%H:%M:%S UTC", time.gmtime(made.ran_at))
    key = setup_phase.note(
        rec,
        (
            *preface,
            f"Ran maintenance script at {when}, when this sandbox was prepared in advance",
        ),
    )
    if made.log:
        rec.setup_log(key, list(made.log))
    for event in made.events:
        rec.proxy_event(event)
    rec.status("Ran maintenance script")
