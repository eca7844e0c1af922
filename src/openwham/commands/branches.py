"""Branch lookups the composer and task creation need (the repository's mirror or remote)."""

from __future__ import annotations

from sqlalchemy.orm import Session

from openwham.config import Settings
from openwham.engine import branches
from openwham.service import environments as envs
from openwham.service.accounts import Principal
from openwham.service.tasks import BranchLookup


def lookup(settings: Settings) -> BranchLookup:
    """Whether a branch exists, for ``service.tasks.create``'s check before writing."""

    def exists(repo_key: str, url: str, branch: str) -> bool:
        return branches.branch_exists(settings, repo_key, url, branch)

    return exists


def of_environment(db: Session, settings: Settings, principal: Principal, env_id: str) -> list[str]:
    """The branches of the environment's (first) repository, for the composer; ``[]`` when
    it has none or the repository does not answer in a few seconds."""
    env = envs.get_row(db, principal, env_id)
    envs.check_repo_paths(db, env, settings)
    repos = env.body.get("repos") or []
    if not repos:
        return []
    key = str(repos[0])
    return branches.list_branches(settings, key, envs.repo_url(env.body, key))
