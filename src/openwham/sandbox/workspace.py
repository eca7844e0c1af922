"""Bare mirrors per repository and cheap per-attempt clones.

A mirror is fetched under an exclusive file lock, so concurrent attempts on one repository
neither clone twice nor read a half-fetched mirror. A workspace is ``git clone --shared`` of
the mirror: it borrows the mirror's objects instead of copying the whole history into every
attempt (time and disk per attempt for a large history). The borrowing goes through
:data:`~openwham.sandbox.bwrap.SHARED_OBJECTS` beside the workspace: on the host a symlink to
the mirror's ``objects`` in the attempt's directory (which no sandbox binds), in the sandbox a
read-only bind beside ``/workspace``; the workspace's ``objects/info/alternates`` names it by
a relative path, so it resolves in both and after the attempt's directory is renamed. The
sandbox user maps to the files' owner, so only the read-only bind keeps an agent from
rewriting a shared object and poisoning every later workspace (never hard links: those would
be writable). Mirrors never run ``git gc`` (``gc.auto=0``), so no object a workspace borrows
disappears. The clone's own config is written by git, never copied from the repository.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path

from openwham import lifeline
from openwham.config import Settings
from openwham.gitauth import GitAuth, git_call, refusal
from openwham.gitpaths import LocalRepoPolicy
from openwham.locks import file_lock as _locked  # per node: mirrors are the node's own
from openwham.sandbox import bwrap, overlay
from openwham.sandbox.bwrap import SHARED_OBJECTS

# The workspace's alternates entry, relative to its ``.git/objects``: the workspace's sibling.
_ALTERNATE = f"../../../{SHARED_OBJECTS}"

GIT_TIMEOUT = 600
log = logging.getLogger(__name__)

# Host-side git runs with no system/global config, no hooks and no prompts.
_GIT_ENV = {
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_CONFIG_GLOBAL": os.devnull,
    "GIT_TERMINAL_PROMPT": "0",
    "GIT_ASKPASS": "",
    "SSH_ASKPASS": "",
    "GIT_AUTHOR_NAME": "openwham",
    "GIT_AUTHOR_EMAIL": "openwham@localhost",
    "GIT_COMMITTER_NAME": "openwham",
    "GIT_COMMITTER_EMAIL": "openwham@localhost",
}
_SAFE = [
    "-c",
    "core.hooksPath=/dev/null",
    "-c",
    "core.fsmonitor=",
    "-c",
    "protocol.ext.allow=never",
    "-c",
    "gc.auto=0",  # a mirror's objects are borrowed by workspaces: never pruned or repacked
]


class WorkspaceError(RuntimeError):
    """A workspace could not be prepared; the message is shown to the user as is."""

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        #: git's own reason (its first error line), for callers that word their own message
        self.reason = reason or message


class RemoteRefused(WorkspaceError):
    """The remote refused the credential (or the lack of one): the message names the URL and
    what was refused, never the credential."""


class RepositoryRefused(WorkspaceError):
    """Git must not open this local repository (data directory, ``WHAM_LOCAL_REPO_ROOTS``)."""


def git(
    *args: str,
    cwd: Path | None = None,
    input: str | None = None,
    env: dict[str, str] | None = None,
    timeout: float = GIT_TIMEOUT,
    auth: GitAuth | None = None,
    remote: str | None = None,
) -> str:
    """Host-side git (no system/global config, hooks, prompts or ext transport); its output,
    or :class:`WorkspaceError` when it fails or takes longer than ``timeout`` seconds.
    ``auth``: the credential for this one call (``openwham.gitauth``); ``remote``: the URL
    a refusal names (:class:`RemoteRefused`)."""
    with git_call(auth) as call:
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": os.devnull,
            **_GIT_ENV,
            **call.env,
            **(env or {}),
        }
        return _run_git([*call.args, *args], cwd, input, env, timeout, call.fds, remote)


def _run_git(
    args: list[str],
    cwd: Path | None,
    input: str | None,
    env: dict[str, str],
    timeout: float,
    fds: tuple[int, ...],
    remote: str | None,
) -> str:
    name = next((a for a in args if not a.startswith("-") and "=" not in a), "")
    layers = overlay.of(cwd) if cwd is not None else None
    merged = cwd.absolute() if layers is not None and cwd is not None else None
    if merged is not None:  # the overlay is mounted only in a mount namespace of its own
        args, cwd = ["-C", str(merged), *args], None
    try:
        before = [overlay.mount_line(layers, merged)] if layers and merged else []
        # a killed server's fetch or push ends with it; started without a preexec_fn (vfork)
        argv = lifeline.command(["git", *_SAFE, *args], mount_namespace=bool(before), before=before)
        proc = subprocess.run(
            argv,
            cwd=cwd,
            env=env,
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            pass_fds=fds,  # the credential's in-memory files (openwham.gitauth)
        )
    except subprocess.TimeoutExpired as exc:
        raise WorkspaceError(
            f"git {name} timed out after {timeout:g} s", f"no answer in {timeout:g} s"
        ) from exc
    except OSError as exc:
        raise WorkspaceError(f"git {name} could not run: {exc}", str(exc)) from exc
    if proc.returncode != 0:
        lines = [x.strip() for x in proc.stderr.splitlines() if x.strip()]
        reason = lines[0].removeprefix("fatal: ")[:500] if lines else f"git exit {proc.returncode}"
        what = refusal(proc.stderr) if remote else None
        if what is not None:
            message = f"repository not reachable: {what} for {remote}"
            raise RemoteRefused(message, message)
        raise WorkspaceError(f"git {name} failed: {proc.stderr.strip()[-2000:]}", reason)
    return proc.stdout


def local_repo_policy(settings: Settings) -> LocalRepoPolicy:
    """The engine's check before git opens a local repository: never the data directory,
    and inside ``WHAM_LOCAL_REPO_ROOTS`` when set. (Unset, which account may use local paths
    at all is decided per account when an environment is saved and a task is started.)"""
    return LocalRepoPolicy(settings.resolved_data_dir, settings.local_repo_root_paths)


#: how long the first call of an ``ensure`` group sets the group's freshness
GROUP_SECONDS = 60.0


class Mirrors:
    """``root/<key>.git``: one bare mirror per repository key.

    A local repository is judged by ``policy`` (default: never inside ``root``) before every
    clone and fetch: the directory may have changed since its environment was saved, e.g. a
    ``.git`` file or alternates now pointing into the data directory.
    """

    def __init__(self, root: Path, policy: LocalRepoPolicy | None = None) -> None:
        self.root = root
        self.policy = policy or LocalRepoPolicy(data_dir=root)
        # key -> when this process's last successful fetch (or clone) of it began, and with
        # which credential: a caller that asked before then gets refs as new as its own
        # fetch would have brought (read and written under the key's lock)
        self._fetched: dict[str, tuple[float, GitAuth | None]] = {}
        # (key, group) -> when the group's first call asked (``ensure``'s ``group``)
        self._asked: dict[tuple[str, str], float] = {}
        self._asked_lock = threading.Lock()
        # (key, branch) -> the fetch it was read after (``_fetched``'s entry) and the head

    def check(self, url: str) -> None:
        """Raise :class:`RepositoryRefused` when git must not open the local repository
        ``url``."""
        path = url.removeprefix("file://") if url.startswith("file:///") else url
        if path.startswith("/") and (reason := self.policy.refusal(path)) is not None:
            raise RepositoryRefused(reason)

    def path(self, key: str) -> Path:
        if not key or "/" in key or key.startswith("."):
            raise ValueError(f"bad repository key {key!r}")
        return self.root / f"{key}.git"

    def private(self, key: str) -> bool:
        """Whether the mirror was ever fetched with a credential: its refs are then not
        answered to a caller without one (mirrors are shared by every account)."""
        return (self.root / f"{key}.private").exists()

    def ensure(
        self,
        key: str,
        url: str,
        *,
        fetch: bool = True,
        auth: GitAuth | None = None,
        group: str = "",
    ) -> Path:
        """Clone the mirror on first use, else fetch it (unless ``fetch`` is false), with
        ``auth`` for that call only (never stored in the mirror's config). Fetches are one at
        a time per mirror; one that began after this call asked, with the same credential,
        counts as this call's: N attempts claimed together (a burst, a best-of-N) wait for
        one or two fetches, not N in a row. ``group``: calls answering one request (a
        best-of-N task's attempts, by the turn of their prompt) ask as of the group's first
        call (within ``GROUP_SECONDS``), so one fetch serves them all: its attempts asked
        a few milliseconds apart, the first fetch began before the later ones asked, and
        those waited for a second one before their model requests were let through."""
        mirror = self.path(key)
        self.check(url)
        asked = time.monotonic()
        if group:
            with self._asked_lock:
                for old in [g for g, t in self._asked.items() if asked - t > GROUP_SECONDS]:
                    del self._asked[old]
                asked = self._asked.setdefault((key, group), asked)
        with _locked(self.root / f"{key}.lock"):
            if auth is not None:
                (self.root / f"{key}.private").touch()
            # a clone cut short by a crash left its temporary directory: none is in use now
            for stale in self.root.glob(f".{key}.*"):
                if "." not in stale.name[len(key) + 2 :]:  # mkdtemp's suffix, not "key.x"'s
                    shutil.rmtree(stale, ignore_errors=True)
            began = time.monotonic()
            last = self._fetched.get(key)
            fresh = last is not None and last[0] >= asked and last[1] == auth
            if not (mirror / "HEAD").exists():
                tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=self.root))
                try:
                    git(
                        "clone", "--mirror", "--quiet", url, str(tmp / "m.git"),
                        auth=auth, remote=url,
                    )  # fmt: skip
                    shutil.rmtree(mirror, ignore_errors=True)
                    (tmp / "m.git").rename(mirror)
                except RemoteRefused:
                    raise
                except WorkspaceError as exc:
                    raise WorkspaceError(f"Cannot clone repository {url}: {exc}") from exc
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
                self._fetched[key] = (began, auth)
            elif fetch and not fresh:
                try:
                    git(
                        "fetch", "--prune", "--quiet", "origin",
                        cwd=mirror, auth=auth, remote=url,
                    )  # fmt: skip
                except RemoteRefused:
                    raise
                except WorkspaceError as exc:
                    raise WorkspaceError(f"Cannot fetch repository {url}: {exc}") from exc
                self._fetched[key] = (began, auth)
        return mirror

    def branch_head(self, key: str, branch: str) -> str | None:
        """The commit ``branch`` points at in the mirror of ``key`` (``None``: no such branch),
        read from its ref files (:func:`branch_ref`): the attempts of a best-of-N check their
        standbys against it right after one shared fetch, and each ``git rev-parse`` was a
        fork of the server (160-230 ms each at load 7; the read was once per fetch since, and
        still forked for each attempt asking while it ran)."""
        return branch_ref(self.path(key), branch)

    def start_commit(self, key: str, branch: str, at: str | None, where: str) -> str:
        """:func:`start_commit` in the mirror of ``key``."""
        return _start(self.branch_head(key, branch), self.path(key), branch, at, where)


def branch_head(mirror: Path, branch: str) -> str | None:
    """The commit ``branch`` points at in the mirror, or ``None`` if there is no such branch."""
    ref = f"refs/heads/{branch}^{{commit}}"
    try:
        return git("rev-parse", "--verify", "--quiet", ref, cwd=mirror).strip() or None
    except WorkspaceError:
        return None


_OBJECT_ID = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")


def branch_ref(git_dir: Path, branch: str) -> str | None:
    """The object ``refs/heads/<branch>`` names in the bare repository ``git_dir`` (a
    mirror), or ``None`` when it has no such branch: read from git's files, its loose ref
    and else ``packed-refs``, as git reads them, without running git (each ``git rev-parse``
    is a fork of the server: ~11 ms of a 22 ms ``POST tasks`` on a quiet machine). Git only
    ever writes a commit to a branch. Where the files do not answer plainly (another ref
    storage, a symbolic ref, a name with an odd part, anything unreadable) git answers
    (:func:`branch_head`). Both files are replaced by renames, and git writes a ref's packed
    entry before it removes the loose one, so a fetch or ``pack-refs`` under way never makes
    a branch look missing."""
    parts = branch.split("/")
    if not branch or any(p in ("", ".", "..") or "\x00" in p for p in parts):
        return branch_head(git_dir, branch)
    try:
        config = (git_dir / "config").read_text(errors="replace").lower()
        if "refstorage" in config:  # e.g. reftable: not files git reads as below
            return branch_head(git_dir, branch)
        try:
            text = git_dir.joinpath("refs", "heads", *parts).read_text().strip()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            text = None  # not loose (or a directory of longer names): packed, or none
        if text is not None:
            return text if _OBJECT_ID.fullmatch(text) else branch_head(git_dir, branch)
        try:
            packed = (git_dir / "packed-refs").read_text()
        except FileNotFoundError:
            return None
    except OSError:
        return branch_head(git_dir, branch)
    name = f"refs/heads/{branch}"
    for line in packed.splitlines():
        oid, _, ref = line.partition(" ")
        if ref == name:
            return oid if _OBJECT_ID.fullmatch(oid) else branch_head(git_dir, branch)
    return None


def _share_objects(mirror: Path, directory: Path) -> None:
    """``directory/SHARED_OBJECTS`` -> the mirror's objects (the sandbox binds it read-only)."""
    objects = mirror.resolve() / "objects"
    link = directory / SHARED_OBJECTS
    if not link.is_symlink():
        link.symlink_to(objects, target_is_directory=True)
    elif link.resolve() != objects:  # one workspace per directory: never re-point another's
        raise WorkspaceError(f"{link} already shares another repository's objects")


def _checkout(
    mirror: Path,
    dest: Path,
    branch: str,
    origin_url: str,
    sha: str | None,
    alternate: str | None = None,
) -> str:
    """A ``git clone --shared`` of the mirror at ``branch`` (reset to ``sha`` when given)
    in ``dest``, its objects borrowed through the relative alternates entry (``alternate``:
    another than the sibling :data:`SHARED_OBJECTS`, whose link the caller made)."""
    if alternate is None:
        _share_objects(mirror, dest.parent)
    git("clone", "--quiet", "--shared", "--no-checkout", "--branch", branch, str(mirror), str(dest))
    (dest / ".git" / "objects" / "info" / "alternates").write_text(f"{alternate or _ALTERNATE}\n")
    # the checkout, through the relative entry
    git("reset", "--quiet", "--hard", *([sha] if sha else []), cwd=dest)
    git("remote", "set-url", "origin", origin_url, cwd=dest)
    if sha is not None and len(sha) in (40, 64) and all(c in "0123456789abcdef" for c in sha):
        return sha  # a commit's full name (``start_commit``'s): HEAD is it now
    return git("rev-parse", "HEAD^{commit}", cwd=dest).strip()


def create_workspace(
    mirror: Path,
    dest: Path,
    branch: str,
    origin_url: str,
    *,
    checkouts: Checkouts | None = None,
    at: str | None = None,
) -> str:
    """Make ``branch`` of the mirror the workspace ``dest``, borrowing the mirror's objects
    through ``dest``'s sibling :data:`SHARED_OBJECTS` (the sandbox binds it read-only);
    returns the base commit sha. ``at``: the branch is set to that commit instead of its head
    (a follow-up starts from the task's original base, wherever the branch is now). With
    ``checkouts`` (and overlays available), ``dest`` is an overlay over the shared checkout of
    that commit (``sandbox.overlay``); else a clone."""
    if dest.exists():
        raise WorkspaceError(f"workspace {dest} already exists")
    sha = start_commit(mirror, branch, at, "the repository")
    return workspace_at(mirror, dest, branch, origin_url, sha, checkouts=checkouts)


def workspace_at(
    mirror: Path,
    dest: Path,
    branch: str,
    origin_url: str,
    sha: str,
    *,
    checkouts: Checkouts | None = None,
) -> str:
    """:func:`create_workspace` at ``sha``, the commit :func:`start_commit` (or
    ``Mirrors.start_commit``) found: no git run to find it again. Returns ``sha``."""
    if dest.exists():
        raise WorkspaceError(f"workspace {dest} already exists")
    if checkouts is None or not checkouts.enabled:
        return _checkout(mirror, dest, branch, origin_url, sha)
    overlay_workspace(mirror, dest, checkouts, branch, sha, origin_url)
    return sha


def overlay_workspace(
    mirror: Path, dest: Path, checkouts: Checkouts, branch: str, sha: str, origin_url: str
) -> None:
    """``dest`` as an overlay over the shared checkout of ``branch`` at ``sha`` (made now
    unless it is there): a fresh workspace's, or the one a post-setup snapshot was taken over
    (``sandbox.snapshots``), whose upper directory only fits that checkout."""
    if dest.exists():
        raise WorkspaceError(f"workspace {dest} already exists")
    tree = checkouts.ensure(mirror, branch, sha, origin_url)
    _share_objects(mirror, dest.parent)
    overlay.make(tree, dest)


def share_objects(mirror: Path, dest: Path) -> None:
    """A clone workspace ``dest`` copied from elsewhere (a post-setup snapshot) borrows the
    mirror's objects as a fresh clone does: through its sibling :data:`SHARED_OBJECTS`,
    which its alternates name by a relative path."""
    _share_objects(mirror, dest.parent)


def start_commit(mirror: Path, branch: str, at: str | None, where: str) -> str:
    """The commit a workspace starts at: ``branch``'s head in the mirror, or ``at`` (a
    follow-up's original base) when given; :class:`WorkspaceError` naming ``where``."""
    return _start(branch_ref(mirror, branch), mirror, branch, at, where)


def _start(head: str | None, mirror: Path, branch: str, at: str | None, where: str) -> str:
    if head is None:
        raise WorkspaceError(f"Branch {branch!r} does not exist in {where}")
    if at is None:
        return head
    try:
        return git("rev-parse", "--verify", "--quiet", f"{at}^{{commit}}", cwd=mirror).strip()
    except WorkspaceError as exc:
        raise WorkspaceError(f"The task's base commit {at[:12]} is no longer in {where}") from exc


def create_repo_workspace(
    mirror: Path, workspace: Path, name: str, branch: str, origin_url: str, at: str | None = None
) -> str:
    """One repository of a multi-repository workspace: a clone of the mirror at ``branch``
    (at commit ``at`` when given) in ``workspace/name``; returns its base commit. Its objects
    are borrowed through ``<workspace's parent>/SHARED_OBJECTS/name`` (a directory of links,
    one per repository, each bound read-only at ``/mirror-objects/<name>`` in the sandbox:
    ``sandbox.bwrap``), named by a relative alternates entry as a single workspace's are.
    Always a clone: overlay checkouts are per single workspace."""
    dest = workspace / name
    if not name or "/" in name or name.startswith(".") or dest.exists():
        raise WorkspaceError(f"bad or used repository directory {name!r}")
    sha = start_commit(mirror, branch, at, f"the repository {origin_url}")
    share_repo_objects(mirror, workspace, name)
    return _checkout(mirror, dest, branch, origin_url, sha, f"../../../../{SHARED_OBJECTS}/{name}")


def share_repo_objects(mirror: Path, workspace: Path, name: str) -> None:
    """The link ``<workspace's parent>/SHARED_OBJECTS/name`` to ``mirror``'s objects, through
    which the repository ``workspace/name`` of a multi-repository workspace borrows them
    (a fresh clone's, or one copied from a post-setup snapshot)."""
    links = workspace.parent / SHARED_OBJECTS
    links.mkdir(mode=0o700, exist_ok=True)
    if links.is_symlink():
        raise WorkspaceError(f"{links} is a single workspace's link")
    (links / name).symlink_to(mirror.resolve() / "objects", target_is_directory=True)


def _settle_index(tree: Path) -> None:
    """Rewrite the checkout's index as the sandbox sees its files (owner uid 1000 there, 0
    here) once the clock has passed the checkout's second: otherwise every workspace's first
    ``git status`` re-reads all files (owner changed, "racily clean" entries) and writes the
    index into the attempt's upper directory. Nothing but git runs; no agent is involved."""
    time.sleep(1.02 - time.time() % 1)
    spec = bwrap.SandboxSpec(
        workspace=tree, limits=bwrap.Limits(wall_clock_seconds=GIT_TIMEOUT), network=False
    )
    result = bwrap.run(spec, ["git", "-c", "core.fsmonitor=", "status", "--porcelain"])
    if not result.ok or result.stdout.strip():
        raise WorkspaceError(f"the shared checkout {tree} is not clean: {result.stderr[-500:]}")


class Checkouts:
    """``root/<repository>/<commit>.<branch hash>/``: a checkout per (repository, branch,
    commit), the read-only lower layer of every overlay workspace made at it.

    Each holds ``tree`` (the checkout, its objects borrowed from the mirror as a workspace's
    are), ``mirror-objects``, ``lease`` (sandboxes using it hold a shared ``flock``) and
    ``ready`` (written last; its mtime is the last use). Made under a file lock, so
    concurrent attempts at one commit make it once. :meth:`evict` removes the least recently
    used beyond ``keep`` that no sandbox holds and none used for ``idle_seconds``;
    :meth:`sweep` (at start) removes what a crash left half made or half removed.
    """

    def __init__(self, root: Path, *, keep: int = 16, idle_seconds: float = 600.0) -> None:
        self.root = root
        self.keep = keep
        self.idle_seconds = idle_seconds
        reason = overlay.unavailable()
        self.enabled = reason is None
        self.reason = reason

    def path(self, mirror: Path, branch: str, sha: str) -> Path:
        key = mirror.name.removesuffix(".git")
        if not key or key.startswith(".") or len(sha) < 40 or not sha.isalnum():
            raise ValueError(f"bad checkout key {key!r} {sha!r}")
        return self.root / key / f"{sha}.{hashlib.sha256(branch.encode()).hexdigest()[:12]}"

    def ensure(self, mirror: Path, branch: str, sha: str, origin_url: str) -> Path:
        """The checkout's ``tree``, made now unless it was made before."""
        d = self.path(mirror, branch, sha)
        with _locked(d.parent / f".{d.name}.lock"):
            ready = d / "ready"
            if ready.exists():
                os.utime(ready)
            else:
                shutil.rmtree(d, ignore_errors=True)  # a crash cut it short: nobody uses it
                d.mkdir(parents=True, mode=0o700)
                (d / overlay.LEASE).touch()
                _checkout(mirror, d / "tree", branch, origin_url, sha)
                _settle_index(d / "tree")
                ready.touch()
        self.evict()
        return d / "tree"

    def evict(self) -> list[Path]:
        """Remove the checkouts beyond ``keep`` (least recently used first) that no sandbox
        holds and that were not used for ``idle_seconds``; returns what it removed."""
        made = sorted(self.root.glob("*/*/ready"), key=lambda p: p.stat().st_mtime, reverse=True)
        removed = []
        now = time.time()
        for ready in made[self.keep :]:
            d = ready.parent
            try:
                if now - ready.stat().st_mtime < self.idle_seconds:
                    continue
                with _locked(d.parent / f".{d.name}.lock"), open(d / overlay.LEASE, "rb") as f:
                    try:
                        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        continue  # a sandbox runs on it
                    trash = self.root / f".trash-{uuid.uuid4().hex}"
                    d.rename(trash)
            except FileNotFoundError:
                continue
            shutil.rmtree(trash, ignore_errors=True)
            removed.append(d)
        return removed

    def sweep(self) -> None:
        """At start: remove what a crash left (``.trash-*``, checkouts never made ready)."""
        for trash in self.root.glob(".trash-*"):
            shutil.rmtree(trash, ignore_errors=True)
        for d in self.root.glob("*/*"):
            if d.is_dir() and not (d / "ready").exists():
                with _locked(d.parent / f".{d.name}.lock"):
                    if not (d / "ready").exists():
                        shutil.rmtree(d, ignore_errors=True)


def apply_patch(
    dest: Path, diff: str, *, what: str = "The starting diff (pre_apply_patch)"
) -> None:
    """Apply a ``pre_apply_patch`` (or a follow-up's starting tree, ``what`` names it); a
    patch that does not apply says where it failed."""
    try:
        git("apply", "--whitespace=nowarn", "--check", "-", cwd=dest, input=diff)
    except WorkspaceError as exc:
        detail = str(exc).removeprefix("git apply failed: ")
        raise WorkspaceError(f"{what} does not apply: {detail}") from exc
    git("apply", "--whitespace=nowarn", "-", cwd=dest, input=diff)


class PushRejected(WorkspaceError):
    """The remote refused the push (the branch exists there with other history)."""


def commit_and_push(
    mirror: Path,
    url: str,
    *,
    base: str,
    diff: str,
    parent: str | None,
    branch: str,
    message: str,
    author: tuple[str, str],
    at: float,
    scratch: Path,
    auth: GitAuth | None = None,
) -> str:
    """Commit ``diff`` (against ``base``) as a child of ``parent`` (default ``base``), dated
    ``at`` (the same inputs make the same commit: a retried push is a no-op), and push
    it to ``refs/heads/<branch>`` at ``url``; returns the commit. No work tree is involved:
    a scratch bare repository borrows the mirror's objects, the diff is applied to an index
    (``git apply --cached``), and the commit is pushed from there (fast-forward only)."""
    repo = Path(tempfile.mkdtemp(prefix="pr-", dir=scratch))
    try:
        git("init", "--quiet", "--bare", "--template=", str(repo))
        (repo / "objects" / "info").mkdir(parents=True, exist_ok=True)
        (repo / "objects" / "info" / "alternates").write_text(f"{mirror / 'objects'}\n")
        index = {"GIT_INDEX_FILE": str(repo / "index")}
        git("read-tree", base, cwd=repo, env=index)
        try:
            git(
                "apply",
                "--cached",
                "--binary",
                "--whitespace=nowarn",
                "-",
                cwd=repo,
                input=diff,
                env=index,
            )
        except WorkspaceError as exc:
            detail = str(exc).removeprefix("git apply failed: ")
            raise WorkspaceError(f"The attempt's diff does not apply to {base}: {detail}") from exc
        tree = git("write-tree", cwd=repo, env=index).strip()
        name, email = author
        who = {
            "GIT_AUTHOR_NAME": name,
            "GIT_AUTHOR_EMAIL": email,
            "GIT_COMMITTER_NAME": name,
            "GIT_COMMITTER_EMAIL": email,
            "GIT_AUTHOR_DATE": f"{int(at)} +0000",
            "GIT_COMMITTER_DATE": f"{int(at)} +0000",
        }
        commit = git(
            "commit-tree",
            tree,
            "-p",
            parent or base,
            "-F",
            "-",
            cwd=repo,
            input=message,
            env=who,
        ).strip()
        try:
            git(
                "push", "--quiet", url, f"{commit}:refs/heads/{branch}",
                cwd=repo, auth=auth, remote=url,
            )  # fmt: skip
        except RemoteRefused:
            raise
        except WorkspaceError as exc:
            text = str(exc)
            if any(w in text for w in ("rejected", "non-fast-forward", "fetch first")):
                raise PushRejected(text) from exc
            raise WorkspaceError(f"Cannot push to {url}: {text}") from exc
        return commit
    finally:
        shutil.rmtree(repo, ignore_errors=True)
