"""Branch lookups the composer and task creation need (the repository's mirror or remote)."""

from __future__ import annotations

from sqlalchemy.orm import Session

from openwham.config import Settings
from openwham.engine import branches
from openwham.service import environments as envs
from openwham.service import gitcreds, github
from openwham.service.accounts import Principal
from openwham.service.tasks import BranchLookup
from openwham.wire import GitHubBranchPage


def lookup(settings: Settings, db: Session, account_id: str) -> BranchLookup:
    """Whether a branch exists, for ``service.tasks.prepare``'s check before writing (with
    the account's git credential for the repository)."""

    def exists(repo_key: str, url: str, branch: str) -> bool:
        auth = gitcreds.auth_for(db, account_id, url, gitcreds.settings_box(settings))
        return branches.branch_exists(settings, repo_key, url, branch, auth)

    return exists


def of_environment(db: Session, settings: Settings, principal: Principal, env_id: str) -> list[str]:
    """The branches of the environment's repositories, for the composer (each mirror fetched
    at most every 30 s, as branch search does): with several repositories, every branch any
    of them has (a task may name one that only some have: the others start at their default
    branch); ``[]`` when they have none or do not answer in a few seconds."""
    env = envs.get_row(db, principal, env_id)
    envs.check_repo_paths(db, env, settings)
    box = gitcreds.settings_box(settings)
    found: set[str] = set()
    for key in (str(k) for k in env.body.get("repos") or []):
        url = envs.repo_url(env.body, key)
        auth = gitcreds.auth_for(db, principal.account_id, url, box)
        found.update(branches.search_branches(settings, key, url, auth))
    return sorted(found)[: branches.MAX_BRANCHES]


def search(
    db: Session,
    settings: Settings,
    principal: Principal,
    repo_id: str,
    *,
    query: str | None,
    cursor: str | None,
    limit: int | None,
) -> GitHubBranchPage:
    """``GET github/branches/{repo_id}/search``: the account's repository ``repo_id`` (404
    otherwise), its branches from the mirror (fetched at most every 30 s) or the remote."""
    github.page_bounds(cursor, limit)  # a bad page is a 400 before any git runs
    found = github.repository(db, principal, repo_id)
    envs.check_repo_paths(db, envs.get_row(db, principal, found.env_id), settings)
    auth = gitcreds.auth_for(db, principal.account_id, found.url, gitcreds.settings_box(settings))
    names = branches.search_branches(settings, found.key, found.url, auth)
    return github.branches_page(
        names, default_branch=found.repo.default_branch, query=query, cursor=cursor, limit=limit
    )
