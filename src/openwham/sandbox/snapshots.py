"""Post-setup snapshots: what a successful setup script left, reused by later attempts.

A snapshot is taken from an overlay workspace (``sandbox.overlay``) right after its setup
script succeeded and before the agent starts: the attempt's upper directory (every file the
script wrote or deleted in ``/workspace``, ignored ones such as ``node_modules/`` included)
is *renamed* into the cache, a fresh empty upper directory takes its place and the snapshot
is stacked read-only between it and the checkout, so taking it costs a rename for the
workspace. The home directory is copied (``cp -a --reflink=auto``: a reflink where the file
system allows). A later attempt with the same key stacks the same directory under its own
empty upper directory and gets a copy of the home: the kernel copies a snapshot file up into
the attempt's upper directory before changing it, so no attempt can change the snapshot or
another attempt's files, and the snapshot is never bound into a sandbox.

``root/<environment hash>/<key>.<random>/`` holds ``upper`` (or ``tree``, a copied clone
workspace), ``home``, ``lease`` (sandboxes using it hold a shared ``flock``) and ``ready``
(written last: JSON with the creation time, size, the commit and branch of the checkout under
it, each repository's of a multi-repository workspace, the environment and its cache
generation; its mtime is the last use).
The key holds no commit: an attempt at another commit (a branch that moved, another branch)
stacks the snapshot over the checkout it was taken over and checks its own commit out on top
(``engine.workspace``). Snapshots expire ``max_age`` seconds after they were taken; a
different key for the same environment (changed setup script, variables, secrets or cache
invalidation key) makes the older ones stale; beyond ``max_bytes`` the least recently used
go. Only what no sandbox holds is removed. The directory is the server's
(mode 0700): a snapshot holds whatever the setup script wrote, secrets included.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import posixpath
import shutil
import subprocess
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from . import overlay
from .bwrap import SANDBOX_WORKSPACE, Limits, SandboxSpec
from .provider import SandboxProvider
from .workspace import WorkspaceError

READY = "ready"
_MOVE_LIMITS = Limits(wall_clock_seconds=600, max_processes=64, memory_bytes=2 << 30)


def cache_key(parts: Mapping[str, object]) -> str:
    """The hash of what a snapshot depends on (never a secret's value: the engine's key has
    the secrets only as the cache generation's hash of their sealed tokens)."""
    text = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _env_dir(env: str) -> str:
    return hashlib.sha256(env.encode()).hexdigest()[:24]


@dataclass(frozen=True)
class RepoAt:
    """One repository of a multi-repository snapshot: its key, its directory in the
    workspace, and the commit and branch it was at when the snapshot was taken."""

    key: str
    dir: str
    commit: str
    branch: str


@dataclass(frozen=True)
class Snapshot:
    """One snapshot in the cache."""

    path: Path
    created: float
    size: int
    #: the commit and branch of the shared checkout it was taken over (its upper directory
    #: only fits that checkout; a later attempt at another commit checks that one out on top)
    commit: str = ""
    branch: str = ""
    #: a multi-repository workspace's repositories, in order (``()``: one repository, which
    #: is the workspace; ``commit`` and ``branch`` are then the first one's)
    repos: tuple[RepoAt, ...] = ()
    #: the environment it belongs to and its cache generation when it was taken (what the
    #: environment's row hashes to: reset-cache and changed setup inputs make another;
    #: :meth:`Snapshots.environments`, :meth:`Snapshots.clear`)
    env: str = ""
    generation: str = ""

    @property
    def upper(self) -> Path:
        return self.path / "upper"

    @property
    def home(self) -> Path:
        return self.path / "home"

    @property
    def tree(self) -> Path:
        """A copied workspace (:meth:`Snapshots.take_copy`), for clone workspaces."""
        return self.path / "tree"


def _read(ready: Path) -> Snapshot | None:
    try:
        meta = json.loads(ready.read_text())
        return Snapshot(
            ready.parent,
            float(meta["created"]),
            int(meta["size"]),
            str(meta.get("commit") or ""),
            str(meta.get("branch") or ""),
            tuple(
                RepoAt(str(r["key"]), str(r["dir"]), str(r["commit"]), str(r["branch"]))
                for r in meta.get("repos") or ()
            ),
            str(meta.get("env") or ""),
            str(meta.get("generation") or ""),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _du(path: Path) -> int:
    total = 0
    for dirpath, dirnames, filenames in os.walk(path):
        for name in (*dirnames, *filenames):
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
    return total


def copy_tree(src: Path, dest: Path) -> None:
    """``src``'s contents into the existing directory ``dest`` with owners, modes, links,
    device nodes (overlay whiteouts) and extended attributes; reflinks where possible."""
    proc = subprocess.run(
        ["cp", "-a", "--reflink=auto", "--", f"{src}/.", str(dest)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise OSError(f"copying {src} failed: {proc.stderr.strip()[-500:]}")


class Snapshots:
    """The post-setup snapshot cache in ``root`` (see the module docstring)."""

    def __init__(
        self, root: Path, *, max_age: float, max_bytes: int, idle_seconds: float = 600.0
    ) -> None:
        self.root = root
        self.max_age = max_age
        self.max_bytes = max_bytes
        #: a snapshot used this recently stays (an attempt on it may be between sandboxes)
        self.idle_seconds = idle_seconds

    def _all(self) -> list[Snapshot]:
        found = []
        for ready in self.root.glob(f"*/*/{READY}"):
            snap = _read(ready)
            if snap is not None:
                found.append(snap)
        return found

    def find(self, env: str, key: str) -> Snapshot | None:
        """The newest fresh snapshot of ``env`` under ``key`` (its last use set to now), or
        ``None``; stale snapshots of ``env`` (another key) and expired ones are removed."""
        self.evict(env=env, key=key)
        now = time.time()
        best: Snapshot | None = None
        for ready in (self.root / _env_dir(env)).glob(f"{key}.*/{READY}"):
            snap = _read(ready)
            if snap is None or not snap.commit or now - snap.created >= self.max_age:
                continue
            if best is None or snap.created > best.created:
                best = snap
        if best is not None:
            os.utime(best.path / READY)
        return best

    def has(self, env: str, key: str) -> bool:
        """Whether ``env`` has a snapshot under ``key`` that has not expired (nothing is
        touched: what the queue executor offers other workers)."""
        now = time.time()
        for ready in (self.root / _env_dir(env)).glob(f"{key}.*/{READY}"):
            snap = _read(ready)
            if snap is not None and snap.commit and now - snap.created < self.max_age:
                return True
        return False

    def fresh(self, snap: Snapshot, env: str, key: str | None) -> bool:
        """Whether ``snap`` is still ``env``'s snapshot under ``key`` and not expired (a
        standby started from it is served only then); its last use is set to now."""
        ready = snap.path / READY
        if (
            key is None
            or snap.path.parent != self.root / _env_dir(env)
            or not snap.path.name.startswith(f"{key}.")
            or time.time() - snap.created >= self.max_age
        ):
            return False
        try:
            os.utime(ready)
        except FileNotFoundError:
            return False
        return True

    def hold(self, snap: Snapshot) -> IO[bytes] | None:
        """A shared ``flock`` on ``snap``'s lease, for an attempt or standby using it between
        its sandboxes (each sandbox holds its own): removal then waits until it is closed.
        ``None`` when ``snap`` is gone or being removed."""
        try:
            lease = open(snap.path / overlay.LEASE, "rb")  # noqa: SIM115 - the caller closes it
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(lease, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            lease.close()
            return None
        if not (snap.path / READY).exists():  # renamed away before the lock
            lease.close()
            return None
        return lease

    def take(
        self,
        env: str,
        key: str,
        workspace: Path,
        home: Path,
        *,
        commit: str,
        branch: str,
        generation: str = "",
    ) -> Snapshot:
        """Freeze ``workspace``'s upper directory and a copy of ``home`` as ``env``'s
        snapshot under ``key`` and stack it under a new empty upper directory of
        ``workspace`` (no sandbox may have the overlay mounted meanwhile); ``commit`` and
        ``branch``: the shared checkout under it."""
        layers = overlay.of(workspace)
        if layers is None or layers.snapshot is not None:
            raise ValueError(f"{workspace} is not a fresh overlay workspace")
        tmp = self._staging(env)
        try:
            (tmp / "home").mkdir(mode=0o700)
            copy_tree(home, tmp / "home")
            layers.upper.rename(tmp / "upper")
            layers.upper.mkdir(mode=0o755)
            snap = self._publish(tmp, env, key, commit, branch, generation=generation)
        except BaseException:
            if not layers.upper.exists() and (tmp / "upper").is_dir():
                (tmp / "upper").rename(layers.upper)  # the attempt keeps what setup wrote
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        overlay.stack(workspace, snap.upper)
        self.evict()
        return snap

    def take_copy(
        self,
        env: str,
        key: str,
        workspace: Path,
        home: Path,
        *,
        commit: str,
        branch: str,
        repos: tuple[RepoAt, ...] = (),
        generation: str = "",
    ) -> Snapshot:
        """The snapshot of a clone workspace (no overlay: ``WHAM_WORKSPACE_OVERLAY=false``, a
        server that is not root, or a multi-repository workspace, ``repos``: each one's
        commit and branch): a copy of the whole workspace and of ``home``
        (``cp -a --reflink=auto``: reflinks where the file system has them, else every byte;
        a later attempt copies it back, :meth:`use_copy`). The attempt keeps its own."""
        tmp = self._staging(env)
        try:
            for name, src in (("tree", workspace), ("home", home)):
                (tmp / name).mkdir(mode=0o700)
                copy_tree(src, tmp / name)
            snap = self._publish(tmp, env, key, commit, branch, repos, generation)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.evict()
        return snap

    def _staging(self, env: str) -> Path:
        """A new private directory to build one of ``env``'s snapshots in, with its lease
        file (``.tmp-*``: what a crash leaves of it goes at the next start)."""
        (self.root / _env_dir(env)).mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.root, 0o700)
        tmp = self.root / f".tmp-{uuid.uuid4().hex}"
        tmp.mkdir(mode=0o700)
        try:
            (tmp / overlay.LEASE).touch()
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return tmp

    def _publish(
        self,
        tmp: Path,
        env: str,
        key: str,
        commit: str,
        branch: str,
        repos: tuple[RepoAt, ...] = (),
        generation: str = "",
    ) -> Snapshot:
        """Seal ``tmp`` as ``env``'s snapshot under ``key``: its ``ready`` file written last,
        then renamed into the environment's directory (made by ``_staging``) in one step."""
        size = _du(tmp)
        created = time.time()
        meta: dict[str, object] = {
            "created": created,
            "size": size,
            "commit": commit,
            "branch": branch,
            "env": env,
            "generation": generation,
        }
        if repos:
            meta["repos"] = [dataclasses.asdict(r) for r in repos]
        (tmp / READY).write_text(json.dumps(meta))
        final = self.root / _env_dir(env) / f"{key}.{uuid.uuid4().hex[:12]}"
        tmp.rename(final)
        return Snapshot(final, created, size, commit, branch, repos, env, generation)

    def use_copy(self, snap: Snapshot, workspace: Path, home: Path) -> None:
        """Start the clone workspace ``workspace`` (not there yet) and ``home`` (empty) as
        copies of ``snap``'s; the caller makes the workspace's sibling object link."""
        workspace.mkdir(mode=0o755)
        copy_tree(snap.tree, workspace)
        copy_tree(snap.home, home)

    def use(self, snap: Snapshot, workspace: Path, home: Path) -> None:
        """Start ``workspace`` (a fresh overlay, nothing written yet) and ``home`` (empty)
        from ``snap``."""
        overlay.stack(workspace, snap.upper)
        copy_tree(snap.home, home)

    def evict(self, *, env: str | None = None, key: str | None = None) -> list[Path]:
        """Remove expired snapshots, ``env``'s under another key than ``key``, and the least
        recently used beyond ``max_bytes``: those no sandbox holds and none used for
        ``idle_seconds``; returns what went."""
        now = time.time()
        removed = []
        kept = []
        snaps = sorted(self._all(), key=lambda s: (s.path / READY).stat().st_mtime, reverse=True)
        guard = min(self.idle_seconds, self.max_age)
        recent = set()  # used within ``guard``: counted in the size, never removed
        for snap in snaps:
            if now - (snap.path / READY).stat().st_mtime < guard:
                kept.append(snap)
                recent.add(snap.path)
                continue
            stale = now - snap.created >= self.max_age or (
                env is not None
                and key is not None
                and snap.path.parent.name == _env_dir(env)
                and not snap.path.name.startswith(f"{key}.")
            )
            if stale and self._remove(snap.path):
                removed.append(snap.path)
            elif not stale:
                kept.append(snap)
        total = 0
        for snap in kept:  # most recently used first
            total += snap.size
            if total > self.max_bytes and snap.path not in recent and self._remove(snap.path):
                removed.append(snap.path)
                total -= snap.size
        return removed

    def clear(self, env: str, keep: str | None = None) -> list[Path]:
        """Remove every snapshot of ``env`` that no sandbox holds (``keep``: but those of
        that cache generation)."""
        removed = []
        for path in (self.root / _env_dir(env)).glob("*.*"):
            if keep is not None:
                snap = _read(path / READY)
                if snap is not None and snap.generation == keep:
                    continue
            if self._remove(path):
                removed.append(path)
        return removed

    def environments(self) -> dict[str, set[str]]:
        """The environments this cache holds snapshots of, each with the cache generations
        they were taken at (snapshots that recorded none are left out)."""
        found: dict[str, set[str]] = {}
        for snap in self._all():
            if snap.env:
                found.setdefault(snap.env, set()).add(snap.generation)
        return found

    def _remove(self, path: Path) -> bool:
        try:
            with open(path / overlay.LEASE, "rb") as f:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    return False  # a sandbox runs on it
                trash = self.root / f".trash-{uuid.uuid4().hex}"
                path.rename(trash)
        except FileNotFoundError:
            return False
        shutil.rmtree(trash, ignore_errors=True)
        return True

    def sweep(self) -> None:
        """At start: what a crash left half made or half removed, then :meth:`evict`."""
        for junk in (*self.root.glob(".tmp-*"), *self.root.glob(".trash-*")):
            shutil.rmtree(junk, ignore_errors=True)
        self.evict()


def _cwd(subdir: str) -> str | None:
    """Where git runs in the sandbox: the workspace, or one repository of it."""
    if not subdir:
        return None
    if "/" in subdir or subdir.startswith("."):
        raise ValueError(f"bad repository directory {subdir!r}")
    return posixpath.join(SANDBOX_WORKSPACE, subdir)


class CheckoutFailed(RuntimeError):
    """The attempt's commit could not be checked out over a snapshot (its output says why)."""


# Runs in a sandbox on the attempt's overlay (the snapshot stacked over the checkout it was
# taken over): the setup script's files are the attempt's own there, so git runs where the
# agent would, with the snapshot's .git config, never on the host.
_MOVE = """\
set -eu
from=$1 to=$2 branch=$3 origin=$4
g() { git -c core.hooksPath=/dev/null -c core.fsmonitor= -c core.quotePath=false "$@"; }
head=$(g rev-parse --verify HEAD)
if [ "$head" != "$from" ]; then
  echo "the cached container is at ${head:0:12}, not at ${from:0:12}"
  exit 3
fi
if [ "$from" != "$to" ]; then
  t=$(mktemp -d)
  g diff --name-only --no-renames -z "$from" "$to" | sort -zu > "$t/incoming"
  { g diff --name-only --no-renames -z HEAD; g ls-files -z -o --exclude-standard; } \\
    | sort -zu > "$t/local"
  comm -z -12 "$t/incoming" "$t/local" > "$t/both"
  while IFS= read -r -d '' p; do
    if g cat-file -e "$from:$p" 2>/dev/null; then
      g checkout -q "$from" -- "$p"
    else
      rm -rf -- "$p"
    fi
    echo "Dropped the setup script's change to $p: the new commits change it"
  done < "$t/both"
  rm -rf "$t"
fi
g checkout -q -B "$branch"
if ! out=$(g reset -q --keep "$to" 2>&1); then
  echo "$out"
  echo "Reset every tracked file to ${to:0:12}: the setup script's changes to them are dropped"
  g reset -q --hard "$to"
fi
if [ -n "$origin" ]; then
  g update-ref "refs/remotes/origin/$branch" "$origin"
  g branch -q --set-upstream-to="origin/$branch" "$branch"
fi
"""


def check_out(
    sandbox: SandboxProvider,
    workspace: Path,
    *,
    start: str,
    commit: str,
    branch: str,
    origin: str | None,
    subdir: str = "",
) -> list[str]:
    """Move ``workspace`` (a snapshot stacked over its checkout at ``start``) to ``commit`` on
    ``branch``, as ``git checkout`` would in a kept container: only the files the commits
    between change are written (the mirror, bound read-only, has their objects; nothing is
    fetched); ignored and untracked files stay; a tracked file the setup script changed keeps
    its change unless the new commits change it too (then theirs wins, and the line saying so
    is returned for the setup log). ``origin``: what ``origin/<branch>`` is set to (the
    branch's head; ``None`` leaves it). ``subdir``: the repository of a multi-repository
    workspace (``workspace/<subdir>``). :class:`CheckoutFailed` when git fails."""
    spec = SandboxSpec(workspace=workspace, limits=_MOVE_LIMITS, cwd=_cwd(subdir))
    argv = ["/bin/bash", "-c", _MOVE, "openwham-checkout", start, commit, branch, origin or ""]
    result = sandbox.run(spec, argv)
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    if not result.ok:
        why = result.killed_reason or f"exit {result.exit_code}"
        detail = "; ".join([*lines, *result.stderr.strip().splitlines()][-5:])
        raise CheckoutFailed(f"git checkout of {commit[:12]} failed ({why}): {detail}")
    return lines


# A change applied over a snapshot, in a sandbox for the same reason as _MOVE. ``base`` set (a
# follow-up): the tracked and untracked files are first put back to the commit, so the
# previous attempt's change, which already holds what its setup did to them, lands on the
# commit as it did there; ignored files (the setup's installs) stay.
_APPLY = """\
set -eu
base=$1
g() { git -c core.hooksPath=/dev/null -c core.fsmonitor= -c core.quotePath=false "$@"; }
cat > /tmp/.openwham-change.diff
if [ -n "$base" ]; then
  g reset -q --hard "$base"
  g clean -q -fd
fi
g apply --whitespace=nowarn --check /tmp/.openwham-change.diff
g apply --whitespace=nowarn /tmp/.openwham-change.diff
"""


def apply_change(
    sandbox: SandboxProvider,
    workspace: Path,
    diff: str,
    *,
    what: str,
    base: str | None = None,
    subdir: str = "",
) -> None:
    """Apply ``diff`` to ``workspace`` (a snapshot stacked over its checkout) in a sandbox,
    never with host git: the snapshot's ``.git`` is what the setup script left, and host git
    would run the filter drivers its config and attributes name, as root. ``base``: a
    follow-up's commit, to which the tracked and untracked (not ignored) files go back first.
    ``subdir``: the repository of a multi-repository workspace it applies to.
    :class:`~openwham.sandbox.workspace.WorkspaceError` saying ``what`` did not apply."""
    spec = SandboxSpec(workspace=workspace, limits=_MOVE_LIMITS, cwd=_cwd(subdir))
    argv = ["/bin/bash", "-c", _APPLY, "openwham-apply", base or ""]
    result = sandbox.run(spec, argv, stdin=diff.encode())
    if not result.ok:
        detail = (result.killed_reason or result.stderr.strip() or result.stdout.strip())[-2000:]
        raise WorkspaceError(f"{what} does not apply: {detail}")
