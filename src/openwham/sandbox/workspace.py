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

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from openwham.config import Settings
from openwham.gitpaths import LocalRepoPolicy
from openwham.lifeline import die_with_parent
from openwham.locks import file_lock as _locked  # per node: mirrors are the node's own
from openwham.sandbox.bwrap import SHARED_OBJECTS

# The workspace's alternates entry, relative to its ``.git/objects``: the workspace's sibling.
_ALTERNATE = f"../../../{SHARED_OBJECTS}"

GIT_TIMEOUT = 600

# Host-side git runs with no system/global config, no hooks and no prompts.
_GIT_ENV = {
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_CONFIG_GLOBAL": os.devnull,
    "GIT_TERMINAL_PROMPT": "0",
    "GIT_SSH_COMMAND": "ssh -o BatchMode=yes",
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


class RepositoryRefused(WorkspaceError):
    """Git must not open this local repository (data directory, ``WHAM_LOCAL_REPO_ROOTS``)."""


def git(
    *args: str,
    cwd: Path | None = None,
    input: str | None = None,
    env: dict[str, str] | None = None,
    timeout: float = GIT_TIMEOUT,
) -> str:
    """Host-side git (no system/global config, hooks, prompts or ext transport); its output,
    or :class:`WorkspaceError` when it fails or takes longer than ``timeout`` seconds."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.devnull,
        **_GIT_ENV,
        **(env or {}),
    }
    try:
        proc = subprocess.run(
            ["git", *_SAFE, *args],
            cwd=cwd,
            env=env,
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            preexec_fn=die_with_parent(),  # a killed server's fetch or push ends with it
        )
    except subprocess.TimeoutExpired as exc:
        raise WorkspaceError(
            f"git {args[0]} timed out after {timeout:g} s", f"no answer in {timeout:g} s"
        ) from exc
    except OSError as exc:
        raise WorkspaceError(f"git {args[0]} could not run: {exc}", str(exc)) from exc
    if proc.returncode != 0:
        lines = [x.strip() for x in proc.stderr.splitlines() if x.strip()]
        reason = lines[0].removeprefix("fatal: ")[:500] if lines else f"git exit {proc.returncode}"
        raise WorkspaceError(f"git {args[0]} failed: {proc.stderr.strip()[-2000:]}", reason)
    return proc.stdout


def local_repo_policy(settings: Settings) -> LocalRepoPolicy:
    """The engine's check before git opens a local repository: never the data directory,
    and inside ``WHAM_LOCAL_REPO_ROOTS`` when set. (Unset, which account may use local paths
    at all is decided per account when an environment is saved and a task is started.)"""
    return LocalRepoPolicy(settings.resolved_data_dir, settings.local_repo_root_paths)


class Mirrors:
    """``root/<key>.git``: one bare mirror per repository key.

    A local repository is judged by ``policy`` (default: never inside ``root``) before every
    clone and fetch: the directory may have changed since its environment was saved, e.g. a
    ``.git`` file or alternates now pointing into the data directory.
    """

    def __init__(self, root: Path, policy: LocalRepoPolicy | None = None) -> None:
        self.root = root
        self.policy = policy or LocalRepoPolicy(data_dir=root)

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

    def ensure(self, key: str, url: str, *, fetch: bool = True) -> Path:
        """Clone the mirror on first use, else fetch it (unless ``fetch`` is false)."""
        mirror = self.path(key)
        self.check(url)
        with _locked(self.root / f"{key}.lock"):
            # a clone cut short by a crash left its temporary directory: none is in use now
            for stale in self.root.glob(f".{key}.*"):
                if "." not in stale.name[len(key) + 2 :]:  # mkdtemp's suffix, not "key.x"'s
                    shutil.rmtree(stale, ignore_errors=True)
            if not (mirror / "HEAD").exists():
                tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=self.root))
                try:
                    git("clone", "--mirror", "--quiet", url, str(tmp / "m.git"))
                    shutil.rmtree(mirror, ignore_errors=True)
                    (tmp / "m.git").rename(mirror)
                except WorkspaceError as exc:
                    raise WorkspaceError(f"Cannot clone repository {url}: {exc}") from exc
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
            elif fetch:
                try:
                    git("fetch", "--prune", "--quiet", "origin", cwd=mirror)
                except WorkspaceError as exc:
                    raise WorkspaceError(f"Cannot fetch repository {url}: {exc}") from exc
        return mirror


def branch_head(mirror: Path, branch: str) -> str | None:
    """The commit ``branch`` points at in the mirror, or ``None`` if there is no such branch."""
    ref = f"refs/heads/{branch}^{{commit}}"
    try:
        return git("rev-parse", "--verify", "--quiet", ref, cwd=mirror).strip() or None
    except WorkspaceError:
        return None


def create_workspace(mirror: Path, dest: Path, branch: str, origin_url: str) -> str:
    """Clone ``branch`` of the mirror into ``dest``, borrowing the mirror's objects through
    ``dest``'s sibling :data:`SHARED_OBJECTS` (the sandbox binds it read-only); returns the
    base commit sha."""
    if dest.exists():
        raise WorkspaceError(f"workspace {dest} already exists")
    if branch_head(mirror, branch) is None:
        raise WorkspaceError(f"Branch {branch!r} does not exist in the repository")
    objects = mirror.resolve() / "objects"
    link = dest.parent / SHARED_OBJECTS
    if not link.is_symlink():
        link.symlink_to(objects, target_is_directory=True)
    elif link.resolve() != objects:  # one workspace per directory: never re-point another's
        raise WorkspaceError(f"{link} already shares another repository's objects")
    git("clone", "--quiet", "--shared", "--no-checkout", "--branch", branch, str(mirror), str(dest))
    (dest / ".git" / "objects" / "info" / "alternates").write_text(f"{_ALTERNATE}\n")
    git("reset", "--quiet", "--hard", cwd=dest)  # the checkout, through the relative entry
    git("remote", "set-url", "origin", origin_url, cwd=dest)
    return git("rev-parse", "HEAD^{commit}", cwd=dest).strip()


def reset_to(dest: Path, sha: str) -> None:
    """Point a fresh workspace's branch at ``sha`` (a follow-up starts from the task's
    original base commit, wherever the branch is now)."""
    try:
        git("reset", "--quiet", "--hard", f"{sha}^{{commit}}", cwd=dest)
    except WorkspaceError as exc:
        raise WorkspaceError(
            f"The task's base commit {sha[:12]} is no longer in the repository"
        ) from exc


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
            git("push", "--quiet", url, f"{commit}:refs/heads/{branch}", cwd=repo)
        except WorkspaceError as exc:
            text = str(exc)
            if any(w in text for w in ("rejected", "non-fast-forward", "fetch first")):
                raise PushRejected(text) from exc
            raise WorkspaceError(f"Cannot push to {url}: {text}") from exc
        return commit
    finally:
        shutil.rmtree(repo, ignore_errors=True)
