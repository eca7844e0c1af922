"""Does a branch exist in an environment's repository? Asked by ``POST tasks`` before anything
is stored, so a task on a missing branch is refused at once (400) instead of failing later.

Cheap first: a bare mirror (``DATA_DIR/mirrors``, kept by the engine) that already has the
branch answers without any network, from its ref files (``sandbox.workspace.branch_ref``:
no git process in the request). Otherwise ``git ls-remote`` asks the remote itself for that
one ref: one round trip, no clone, no fetch and no mirror lock, so a first task on a large
repository is not held up by a full clone in the request (the attempt fetches the mirror as
it always does). A remote that cannot be reached is a 400 that says so and why.

The web UI's composer lists the branches the same way (:func:`list_branches`), with a short
timeout and an empty list rather than an error: it must never hold up the page.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from openwham.config import Settings
from openwham.gitauth import GitAuth
from openwham.sandbox.workspace import (
    Mirrors,
    RemoteRefused,
    WorkspaceError,
    branch_ref,
    git,
    local_repo_policy,
)
from openwham.service.errors import BadRequest

log = logging.getLogger(__name__)

LS_REMOTE_TIMEOUT = 30.0
LIST_TIMEOUT = 5.0
MAX_BRANCHES = 500
#: Branch search fetches a repository's mirror at most this often (seconds).
FETCH_EVERY = 30.0


def _mirror(settings: Settings, repo_key: str, auth: GitAuth | None) -> Path | None:
    """The engine's bare mirror of the repository, when it has one (not to a caller without
    a credential when it was fetched with one: the remote answers them instead)."""
    mirrors = Mirrors(settings.resolved_data_dir / "mirrors")
    try:
        mirror = mirrors.path(repo_key)
    except ValueError:
        return None
    if auth is None and mirrors.private(repo_key):
        return None
    return mirror if (mirror / "HEAD").exists() else None


def _ls_remote(url: str, *refs: str, timeout: float, auth: GitAuth | None = None) -> list[str]:
    """The branch refs (``refs/heads/…``) the remote answers for ``refs`` (all without)."""
    out = git("ls-remote", "--heads", "--", url, *refs, timeout=timeout, auth=auth, remote=url)
    return [line.split("\t", 1)[-1] for line in out.splitlines() if "\t" in line]


def branch_exists(
    settings: Settings, repo_key: str, url: str, branch: str, auth: GitAuth | None = None
) -> bool:
    """Whether ``branch`` is a branch of the repository at ``url``; :class:`BadRequest` when
    the repository cannot be reached (the message names it and git's reason)."""
    mirror = _mirror(settings, repo_key, auth)
    if mirror is not None and branch_ref(mirror, branch):  # its files: no git forked
        return True
    ref = f"refs/heads/{branch}"
    try:
        return ref in _ls_remote(url, ref, timeout=LS_REMOTE_TIMEOUT, auth=auth)
    except RemoteRefused as exc:
        raise BadRequest(str(exc)) from exc
    except WorkspaceError as exc:
        raise BadRequest(f"Repository not reachable: {url} ({exc.reason})") from exc


def list_branches(
    settings: Settings,
    repo_key: str,
    url: str,
    *,
    limit: int | None = MAX_BRANCHES,
    auth: GitAuth | None = None,
) -> list[str]:
    """The repository's branch names: from its mirror when there is one (no network), else
    from the remote within :data:`LIST_TIMEOUT`; ``[]`` when neither answers."""
    refs: list[str] = []
    mirror = _mirror(settings, repo_key, auth)
    try:
        if mirror is not None:
            out = git("for-each-ref", "--format=%(refname)", "refs/heads/", cwd=mirror)
            refs = out.splitlines()
        elif url:
            refs = _ls_remote(url, timeout=LIST_TIMEOUT, auth=auth)
    except WorkspaceError:
        return []
    names = {ref.strip().removeprefix("refs/heads/") for ref in refs if ref.strip()}
    return sorted(names)[:limit]


class MirrorRefresher:
    """Fetches mirrors for branch search at most every :data:`FETCH_EVERY` seconds per
    repository, and never holds a request longer than :data:`LIST_TIMEOUT` for it: a fetch
    still under way then goes on in the background and the answer uses the refs there are
    (the next search sees the new ones)."""

    def __init__(self, every: float = FETCH_EVERY, wait: float = LIST_TIMEOUT) -> None:
        self.every = every
        self.wait = wait
        self._lock = threading.Lock()
        self._started: dict[Path, float] = {}
        self._running: dict[Path, threading.Thread] = {}

    def refresh(
        self, settings: Settings, repo_key: str, url: str, auth: GitAuth | None = None
    ) -> None:
        mirrors = Mirrors(settings.resolved_data_dir / "mirrors", local_repo_policy(settings))
        try:
            mirror = mirrors.path(repo_key)
        except ValueError:
            return
        if not (mirror / "HEAD").exists() or (auth is None and mirrors.private(repo_key)):
            return  # no clone in a request: list_branches asks the remote instead
        now = time.monotonic()
        with self._lock:
            thread = self._running.get(mirror)
            if thread is None and now - self._started.get(mirror, -self.every) >= self.every:
                self._started[mirror] = now
                thread = threading.Thread(
                    target=self._fetch, args=(mirrors, repo_key, url, mirror, auth), daemon=True
                )
                self._running[mirror] = thread
                thread.start()
        if thread is not None:
            thread.join(self.wait)

    def _fetch(
        self, mirrors: Mirrors, repo_key: str, url: str, mirror: Path, auth: GitAuth | None
    ) -> None:
        try:
            mirrors.ensure(repo_key, url, auth=auth)
        except WorkspaceError:
            pass  # unreachable now: the refs the mirror has are the answer
        finally:
            with self._lock:
                self._running.pop(mirror, None)


#: The process's refresher (mirrors are per node, like their locks).
REFRESHER = MirrorRefresher()


def search_branches(
    settings: Settings, repo_key: str, url: str, auth: GitAuth | None = None
) -> list[str]:
    """The branches branch search offers: the mirror's after a fetch at most every
    :data:`FETCH_EVERY` seconds, else the remote's (:func:`list_branches`)."""
    REFRESHER.refresh(settings, repo_key, url, auth)
    return list_branches(settings, repo_key, url, limit=None, auth=auth)


NO_CREDENTIAL_PROBE_SECONDS = 5.0
NO_CREDENTIAL_HINT = (
    "no git credential of this account matches it: add one (wham git-credential add)"
)


def check_not_refused(url: str) -> None:
    """A repository without a credential, at environment save: :class:`BadRequest` only when
    its remote answers within a few seconds and refuses (it needs a credential); a remote
    that is not reachable from here now is not an error."""
    try:
        git("ls-remote", "--", url, "HEAD", timeout=NO_CREDENTIAL_PROBE_SECONDS, remote=url)
    except RemoteRefused as exc:
        raise BadRequest(f"{exc}; {NO_CREDENTIAL_HINT}") from exc
    except WorkspaceError as exc:
        log.info("saved without checking %s: %s", url, exc.reason)


def check_reachable(url: str, auth: GitAuth | None) -> None:
    """Ask the remote for its HEAD with the account's credential (environment save):
    :class:`BadRequest` naming the URL and what was refused when it does not answer."""
    try:
        git("ls-remote", "--", url, "HEAD", timeout=LS_REMOTE_TIMEOUT, auth=auth, remote=url)
    except RemoteRefused as exc:
        raise BadRequest(str(exc)) from exc
    except WorkspaceError as exc:
        raise BadRequest(f"repository not reachable: {url} ({exc.reason})") from exc
