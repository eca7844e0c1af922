"""Pushing an attempt's change to the environment's git remote (``POST …/pr``).

The service plans the push (branch, parent, message: ``service.prs``); this does the git
part on the host with the repository's mirror: a commit of the diff on its base (or on the
task's last pushed commit), pushed fast-forward only. If a new branch name is taken on the
remote by other history, a ``-<6 characters>`` suffix is tried once (derived from the attempt and
the plan's time, so a push retried after a crash picks the same one); an existing task branch
that moved on the remote is left alone (409). One push per task at a time: the caller holds
the task's lock (``openwham.locks``), which holds across processes and nodes.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from openwham.config import Settings
from openwham.gitauth import GitAuth
from openwham.sandbox.workspace import (
    Mirrors,
    PushRejected,
    RemoteRefused,
    RepositoryRefused,
    WorkspaceError,
    commit_and_push,
    local_repo_policy,
)
from openwham.service.errors import BadGateway, Conflict
from openwham.service.prs import PushPlan

# how long a second push of one task waits for the first (a push is bounded by git's timeout)
LOCK_SECONDS = 120.0


def lock_key(task_id: str) -> str:
    """The lock a task's pushes are serialised by (``openwham.locks``)."""
    return f"pr-push:{task_id}"


def push(settings: Settings, plan: PushPlan, auth: GitAuth | None = None) -> tuple[str, str]:
    """Commit and push ``plan`` (with the account's credential ``auth`` for the remote);
    returns ``(branch, commit)``."""
    data = settings.resolved_data_dir
    scratch = data / "tmp"
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        mirrors = Mirrors(data / "mirrors", local_repo_policy(settings))
        mirror = mirrors.ensure(plan.repo_key, plan.repo_url, auth=auth)
        return _push(mirror, scratch, plan, plan.branch, auth)
    except RemoteRefused as exc:
        raise BadGateway(str(exc)) from exc
    except PushRejected as exc:
        if not plan.new_branch:
            raise Conflict(
                f"The branch {plan.branch} has commits on the remote that openwham did not "
                "push; it was left as it is"
            ) from exc
        digest = hashlib.sha256(f"{plan.turn_id}:{plan.at!r}".encode()).hexdigest()
        suffix = digest[:6]
        try:
            return _push(mirror, scratch, plan, f"{plan.branch}-{suffix}", auth)
        except WorkspaceError as again:
            raise BadGateway(str(again)) from again
    except RepositoryRefused as exc:  # changed since it was accepted: not the remote's fault
        raise Conflict(str(exc)) from exc
    except WorkspaceError as exc:
        raise BadGateway(str(exc)) from exc


def _push(
    mirror: Path, scratch: Path, plan: PushPlan, branch: str, auth: GitAuth | None
) -> tuple[str, str]:
    commit = commit_and_push(
        mirror,
        plan.repo_url,
        base=plan.base,
        diff=plan.diff,
        parent=plan.parent,
        branch=branch,
        message=plan.message,
        author=plan.author,
        at=plan.at,
        scratch=scratch,
        auth=auth,
    )
    return branch, commit
