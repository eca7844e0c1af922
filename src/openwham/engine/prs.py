"""Pushing an attempt's change to the environment's git remote (``POST …/pr``).

The service plans the push (branch, parent, message: ``service.prs``); this does the git
part on the host with the repository's mirror: a commit of the diff on its base (or on the
task's last pushed commit), pushed fast-forward only. If a new branch name is taken on the
remote by other history, a ``-<6 characters>`` suffix is tried once (derived from the attempt and
the plan's time, so a push retried after a crash picks the same one); an existing task branch
that moved on the remote is left alone (409). One push per task at a time in this process.
"""

from __future__ import annotations

import hashlib
import threading
from collections import defaultdict
from pathlib import Path

from openwham.config import Settings
from openwham.sandbox.workspace import (
    Mirrors,
    PushRejected,
    RepositoryRefused,
    WorkspaceError,
    commit_and_push,
    local_repo_policy,
)
from openwham.service.errors import BadGateway, Conflict
from openwham.service.prs import PushPlan

_locks: defaultdict[str, threading.Lock] = defaultdict(threading.Lock)
_locks_guard = threading.Lock()


def task_lock(task_id: str) -> threading.Lock:
    with _locks_guard:
        return _locks[task_id]


def push(settings: Settings, plan: PushPlan) -> tuple[str, str]:
    """Commit and push ``plan``; returns ``(branch, commit)``."""
    data = settings.resolved_data_dir
    scratch = data / "tmp"
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        mirrors = Mirrors(data / "mirrors", local_repo_policy(settings))
        mirror = mirrors.ensure(plan.repo_key, plan.repo_url)
        return _push(mirror, scratch, plan, plan.branch)
    except PushRejected as exc:
        if not plan.new_branch:
            raise Conflict(
                f"The branch {plan.branch} has commits on the remote that openwham did not "
                "push; it was left as it is"
            ) from exc
        digest = hashlib.sha256(f"{plan.turn_id}:{plan.at!r}".encode()).hexdigest()
        suffix = digest[:6]
        try:
            return _push(mirror, scratch, plan, f"{plan.branch}-{suffix}")
        except WorkspaceError as again:
            raise BadGateway(str(again)) from again
    except RepositoryRefused as exc:  # changed since it was accepted: not the remote's fault
        raise Conflict(str(exc)) from exc
    except WorkspaceError as exc:
        raise BadGateway(str(exc)) from exc


def _push(mirror: Path, scratch: Path, plan: PushPlan, branch: str) -> tuple[str, str]:
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
    )
    return branch, commit
