"""Push PR: commit an attempt's change on the task's branch and push it, then open (or
update) the pull request on the repository's forge when the account has a connection for it
(GitHub, GitLab, Gitea: ``openwham.forges``); keep its state fresh when the task is read."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from typing import Any

from sqlalchemy.orm import Session

from openwham.engine import prs as engine_prs
from openwham.forges import ForgeError, PullRequest, RepoRef, forge_for
from openwham.locks import LockTimeout
from openwham.service import forges, gitcreds, prs
from openwham.service.accounts import Principal
from openwham.service.errors import BadGateway, Conflict, RateLimited, ServiceError
from openwham.service.keys import SecretBox
from openwham.service.tasks import get_task_row
from openwham.store import models as m
from openwham.store.db import Database
from openwham.wire import ExternalPullRequest
from openwham.wire.forges import PullRequestOptions

from .deps import Deps

log = logging.getLogger(__name__)

#: how often one node asks a forge for one task's pull request state (seconds)
REFRESH_EVERY = 60.0


def push(
    db: Session,
    deps: Deps,
    principal: Principal,
    task_id: str,
    turn_id: str,
    *,
    options: PullRequestOptions | None = None,
    box: SecretBox | None = None,
    link_base: str | None = None,
) -> ExternalPullRequest:
    """Push the attempt's change (engine/prs.py). A push of another attempt that a crash cut
    short is finished first (service/prs.py). One push per task at a time across processes
    and nodes (``deps.locks``); 409 when another push holds it too long. With a forge
    connection for the repository (and ``box`` to open its token) the pull request is opened
    after the push, or updated when the task has one."""
    options = options or PullRequestOptions()
    try:
        with deps.locks.hold(engine_prs.lock_key(task_id), engine_prs.LOCK_SECONDS):
            earlier = prs.unfinished(db, principal, task_id, turn_id)
            if earlier is not None:
                try:
                    _push(db, deps, principal, earlier)
                except ServiceError:  # it cannot be finished (the branch moved): it is dropped
                    db.rollback()
                    prs.drop_unfinished(db, principal, task_id)
                    db.commit()
            plans = prs.plans(db, principal, task_id, turn_id)
            if all(p.existing is not None for p in plans):
                entries = [ExternalPullRequest.model_validate(p.existing) for p in plans]
            else:
                entries = _push(db, deps, principal, plans)
            if box is None:
                return entries[0]
            link = _link(deps, link_base, task_id)
            opened = [
                _open_on_forge(db, principal, plan, entry, options, box, link)
                for plan, entry in zip(plans, entries, strict=True)
            ]
            return opened[0]  # a multi-repository task's others: its external_pull_requests
    except LockTimeout as exc:  # another node's push of this task is still running
        raise Conflict(str(exc)) from exc


def _push(
    db: Session, deps: Deps, principal: Principal, plans: list[prs.PushPlan]
) -> list[ExternalPullRequest]:
    """Push each plan (one per changed repository), each with its own repository's
    credential; all are reserved first, so a crash anywhere is finished the same way."""
    prs.reserve_all(db, principal, plans)
    db.commit()  # kept before the push; no transaction held while git talks to the remote
    box = gitcreds.settings_box(deps.settings)
    entries = []
    for plan in plans:
        auth = gitcreds.auth_for(db, principal.account_id, plan.repo_url, box)
        branch, commit = engine_prs.push(deps.settings, plan, auth)
        entry = prs.record(db, principal, plan, branch=branch, commit=commit)
        db.commit()
        entries.append(ExternalPullRequest.model_validate(entry))
    prs.finish_repos(db, principal, plans)
    db.commit()
    return entries


def _link(deps: Deps, link_base: str | None, task_id: str) -> str | None:
    base = deps.settings.public_url or link_base
    return f"{base.rstrip('/')}/codex/tasks/{task_id}" if base else None


def _as_wire(pr: PullRequest) -> dict[str, Any]:
    return {
        "number": pr.number,
        "url": pr.url,
        "state": pr.state,
        "merged": pr.merged,
        "draft": pr.draft,
        "title": pr.title,
        "body": pr.body,
        "head": pr.head,
        "base": pr.base,
        "head_sha": pr.head_sha,
        "merge_commit_sha": pr.merge_commit_sha,
    }


def _forge_failed(exc: ForgeError) -> ServiceError:
    """The forge's refusal as openwham's answer: 409, 429 (with when to retry) or 502."""
    if exc.status == 429:
        extra = {"retry_after": exc.retry_after} if exc.retry_after is not None else None
        return RateLimited(str(exc), extra=extra)
    if exc.status == 409:
        return Conflict(str(exc))
    return BadGateway(str(exc))


def _open_on_forge(
    db: Session,
    principal: Principal,
    plan: prs.PushPlan,
    entry: ExternalPullRequest,
    options: PullRequestOptions,
    box: SecretBox,
    link: str | None,
) -> ExternalPullRequest:
    row = forges.match(db, principal.account_id, plan.repo_url)
    if row is None:
        return entry  # no forge connection: the pushed branch is the answer
    target = forges.target(row, plan.repo_url, box, options.pr_authorship_mode)
    task = get_task_row(db, principal, plan.task_id)
    turn = db.get(m.Turn, plan.turn_id)
    assert turn is not None
    title, body = prs.pr_text(db, task, turn, link)
    recorded = prs.forge_pr(db, principal, plan.task_id, plan.repo_key if plan.entry_id else "")
    forge = forge_for(target.kind, target.api_base_url, target.token)
    repo = RepoRef(target.repo_path)
    try:
        if (
            recorded is not None
            and recorded.get("connection_id") == row.id
            and recorded.get("repo_path") == target.repo_path
            and isinstance(recorded.get("number"), int)
        ):  # a later push of the task: the same pull request, its text brought up to date
            pr = forge.update(repo, int(recorded["number"]), title=title, body=body)
        else:
            pr = forge.create(
                repo,
                head=entry.pull_request.head or plan.branch,
                base=entry.pull_request.base or "",
                title=title,
                body=body,
                draft=options.draft,
            )
    except ForgeError as exc:
        raise _forge_failed(exc) from exc
    finally:
        forge.close()
    stored = prs.record_forge(
        db,
        task,
        plan.turn_id,
        connection_id=row.id,
        repo_path=target.repo_path,
        pr=_as_wire(pr),
        now=time.time(),
        repo_key=plan.repo_key if plan.entry_id else "",
    )
    db.commit()
    return ExternalPullRequest.model_validate(stored)


class PrRefresher:
    """Asks forges for the state of tasks' pull requests (open, closed, merged) when the
    tasks are read, at most every :data:`REFRESH_EVERY` seconds per task on this node, in
    the background: a read never waits for a forge. A merged pull request is not asked
    again."""

    def __init__(self, every: float = REFRESH_EVERY) -> None:
        self.every = every
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}

    def soon(self, database: Database, box: SecretBox, task_ids: Iterable[str]) -> None:
        now = time.monotonic()
        due: list[str] = []
        with self._lock:
            for task_id in task_ids:
                if now - self._last.get(task_id, -self.every) >= self.every:
                    self._last[task_id] = now
                    due.append(task_id)
            if len(self._last) > 10_000:  # bounded: forget the oldest half
                for key in sorted(self._last, key=self._last.__getitem__)[:5_000]:
                    del self._last[key]
        if due:
            threading.Thread(
                target=self._refresh, args=(database, box, due), name="pr-refresh", daemon=True
            ).start()

    def _refresh(self, database: Database, box: SecretBox, task_ids: list[str]) -> None:
        for task_id in task_ids:
            try:
                refresh(database, box, task_id)
            except Exception:  # a forge or a database hiccup: the next read tries again
                log.warning("pull request state of %s not refreshed", task_id, exc_info=True)


def refresh(database: Database, box: SecretBox, task_id: str) -> bool:
    """Ask the forge for the task's pull request and record it when it changed; whether it
    did. Tasks without a forge pull request, or with a merged one, are left alone."""
    changed = False
    with database.session() as s:
        task = s.get(m.Task, task_id)
        if task is None:
            return False
        for repo_key, recorded in prs.forge_records(task):  # a multi-repository task: each
            if recorded.get("state") == "merged":
                continue
            row = s.get(m.ForgeConnection, str(recorded.get("connection_id")))
            if row is None or row.account_id != task.account_id:
                continue
            forge = forge_for(row.kind, row.api_base_url, box.open(row.token))
            try:
                pr = forge.get(RepoRef(str(recorded["repo_path"])), int(recorded["number"]))
            finally:
                forge.close()
            wanted = prs.entry_id(task.id, repo_key) if repo_key else None
            entries = [
                e for e in task.body.get("external_pull_requests") or [] if isinstance(e, dict)
            ]
            entry = next((e for e in entries if e.get("id") == wanted), None) if wanted else None
            if not wanted:
                entry = entries[0] if entries else None
            current = (entry or {}).get("pull_request") or {}
            fresh = _as_wire(pr)
            if all(current.get(k) == v for k, v in fresh.items()):
                continue  # unchanged: nothing written, so nothing cached is invalidated
            prs.record_forge(
                s,
                task,
                None,
                connection_id=row.id,
                repo_path=str(recorded["repo_path"]),
                pr=fresh,
                now=time.time(),
                repo_key=repo_key,
            )
            changed = True
        return changed
