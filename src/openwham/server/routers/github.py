"""The GitHub-shaped reads (wham-api.md §8.2) from the account's environments and mirrors
(service/github.py says what an installation and a repository id are here)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from openwham.commands import branches as branch_commands
from openwham.service import environments as envs
from openwham.service import github
from openwham.wire import (
    GitHubBranchPage,
    GitHubInstallationEvents,
    GitHubInstallations,
    GitHubInstallationsV2,
    GitHubRepo,
    GitHubRepository,
    GitHubRepositoryPage,
    GitHubUserHandle,
)

from ..deps import PrincipalDep, SessionDep, StateDep

router = APIRouter(tags=["github"])

QueryText = Annotated[str | None, Query(max_length=200)]
Cursor = Annotated[str | None, Query(max_length=200)]
Limit = Annotated[int | None, Query()]


@router.get("/github/installations", response_model=GitHubInstallations)
def installations(principal: PrincipalDep, db: SessionDep) -> GitHubInstallations:
    return GitHubInstallations(installations=github.installations(db, principal))


@router.get("/github/installations/v2", response_model=GitHubInstallationsV2)
def installations_v2(principal: PrincipalDep, db: SessionDep) -> GitHubInstallationsV2:
    return GitHubInstallationsV2(
        memberships=github.installations(db, principal), other=[], likely_on_old_access_token=False
    )


@router.get("/github/installations/events", response_model=GitHubInstallationEvents)
def installation_events(principal: PrincipalDep) -> GitHubInstallationEvents:
    """No installation misses webhook events: openwham reads the repositories itself."""
    return GitHubInstallationEvents(installations_without_events=[])


@router.get("/github/installations/events/v2", response_model=GitHubInstallationEvents)
def installation_events_v2(principal: PrincipalDep) -> GitHubInstallationEvents:
    return installation_events(principal)


@router.get("/github/repositories/search/all-installations", response_model=GitHubRepositoryPage)
def search_repositories(
    principal: PrincipalDep,
    db: SessionDep,
    query: QueryText = None,
    cursor: Cursor = None,
    limit: Limit = None,
) -> GitHubRepositoryPage:
    return github.repositories_page(db, principal, query=query, cursor=cursor, limit=limit)


@router.get("/github/repositories/v2/{installation_id}", response_model=GitHubRepositoryPage)
def installation_repositories(
    installation_id: str,
    principal: PrincipalDep,
    db: SessionDep,
    query: QueryText = None,
    cursor: Cursor = None,
    limit: Limit = None,
) -> GitHubRepositoryPage:
    return github.repositories_page(
        db, principal, installation=installation_id, query=query, cursor=cursor, limit=limit
    )


@router.get("/github/repositories/{repo_id}", response_model=GitHubRepository)
def repository(repo_id: str, principal: PrincipalDep, db: SessionDep) -> GitHubRepository:
    return github.render_repository(github.repository(db, principal, repo_id))


@router.get("/github/branches/{repo_id}/search", response_model=GitHubBranchPage)
def search_branches(
    repo_id: str,
    state: StateDep,
    principal: PrincipalDep,
    db: SessionDep,
    query: QueryText = None,
    cursor: Cursor = None,
    limit: Limit = None,
) -> GitHubBranchPage:
    """Branches of the repository, the default one first, matching ``query``."""
    return branch_commands.search(
        db, state.settings, principal, repo_id, query=query, cursor=cursor, limit=limit
    )


@router.get("/environments/{env_id}/repos", response_model=list[GitHubRepo])
def environment_repos(env_id: str, principal: PrincipalDep, db: SessionDep) -> list[GitHubRepo]:
    """The environment's repositories in its order (a bare array, like the other lists)."""
    row = envs.get_row(db, principal, env_id)
    repo_map = row.body.get("repo_map") or {}
    return [GitHubRepo.model_validate(repo_map[key]) for key in row.body.get("repos") or []]


@router.get("/task_suggestions/github/user_handle", response_model=GitHubUserHandle)
def user_handle(principal: PrincipalDep) -> GitHubUserHandle:
    """openwham knows no GitHub account of the user: ``null``."""
    return GitHubUserHandle(github_handle=None)
