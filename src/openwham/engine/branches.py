"""Does a branch exist in an environment's repository? Asked by ``POST tasks`` before anything
is stored, so a task on a missing branch is refused at once (400) instead of failing later.

Cheap first: a bare mirror (``DATA_DIR/mirrors``, kept by the engine) that already has the
branch answers without any network. Otherwise ``git ls-remote`` asks the remote itself for that
one ref: one round trip, no clone, no fetch and no mirror lock, so a first task on a large
repository is not held up by a full clone in the request (the attempt fetches the mirror as
it always does). A remote that cannot be reached is a 400 that says so and why.

The web UI's composer lists the branches the same way (:func:`list_branches`), with a short
timeout and an empty list rather than an error: it must never hold up the page.
"""

from __future__ import annotations

from pathlib import Path

from openwham.config import Settings
from openwham.sandbox.workspace import Mirrors, WorkspaceError, branch_head, git
from openwham.service.errors import BadRequest

LS_REMOTE_TIMEOUT = 30.0
LIST_TIMEOUT = 5.0
MAX_BRANCHES = 500


def _mirror(settings: Settings, repo_key: str) -> Path | None:
    """The engine's bare mirror of the repository, when it has one."""
    try:
        mirror = Mirrors(settings.resolved_data_dir / "mirrors").path(repo_key)
    except ValueError:
        return None
    return mirror if (mirror / "HEAD").exists() else None


def _ls_remote(url: str, *refs: str, timeout: float) -> list[str]:
    """The branch refs (``refs/heads/…``) the remote answers for ``refs`` (all without)."""
    out = git("ls-remote", "--heads", "--", url, *refs, timeout=timeout)
    return [line.split("\t", 1)[-1] for line in out.splitlines() if "\t" in line]


def branch_exists(settings: Settings, repo_key: str, url: str, branch: str) -> bool:
    """Whether ``branch`` is a branch of the repository at ``url``; :class:`BadRequest` when
    the repository cannot be reached (the message names it and git's reason)."""
    mirror = _mirror(settings, repo_key)
    if mirror is not None and branch_head(mirror, branch):
        return True
    ref = f"refs/heads/{branch}"
    try:
        return ref in _ls_remote(url, ref, timeout=LS_REMOTE_TIMEOUT)
    except WorkspaceError as exc:
        raise BadRequest(f"Repository not reachable: {url} ({exc.reason})") from exc


def list_branches(settings: Settings, repo_key: str, url: str) -> list[str]:
    """The repository's branch names: from its mirror when there is one (no network), else
    from the remote within :data:`LIST_TIMEOUT`; ``[]`` when neither answers."""
    refs: list[str] = []
    mirror = _mirror(settings, repo_key)
    try:
        if mirror is not None:
            out = git("for-each-ref", "--format=%(refname)", "refs/heads/", cwd=mirror)
            refs = out.splitlines()
        elif url:
            refs = _ls_remote(url, timeout=LIST_TIMEOUT)
    except WorkspaceError:
        return []
    names = {ref.strip().removeprefix("refs/heads/") for ref in refs if ref.strip()}
    return sorted(names)[:MAX_BRANCHES]
