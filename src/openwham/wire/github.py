"""GitHub integration endpoints (wham-api.md §8.2); openwham answers them minimally."""

from typing import Any

from pydantic import Field

from openwham.wire.base import WireModel
from openwham.wire.environments import GitHubRepo


class GitHubInstallation(WireModel):
    """A GitHub App installation on a user or organisation account."""

    id: str | int
    account_login: str | None = None
    account_id: int | None = None
    account_type: str | None = None
    account_avatar_url: str | None = None
    html_url: str | None = None
    events: list[str] = Field(default_factory=list)


class GitHubInstallations(WireModel):
    """``GET /github/installations``."""

    installations: list[GitHubInstallation] = Field(default_factory=list)


class GitHubInstallationsV2(WireModel):
    """``GET /github/installations/v2``."""

    memberships: list[GitHubInstallation] = Field(default_factory=list)
    other: list[GitHubInstallation] = Field(default_factory=list)
    likely_on_old_access_token: bool = False


class GitHubInstallationEvents(WireModel):
    """``GET /github/installations/events/v2``."""

    installations_without_events: list[Any] = Field(default_factory=list)


class GitHubRepository(GitHubRepo):
    """``GET /github/repositories/{repo_id}``: a repo plus its merge-commit message settings."""

    merge_commit_message: str | None = None
    merge_commit_title: str | None = None
    squash_merge_commit_message: str | None = None
    squash_merge_commit_title: str | None = None


class GitHubBranch(WireModel):
    """A branch name."""

    branch: str


class GitHubBranchPage(WireModel):
    """``GET /github/branches/{repo_id}/search``: ``{items, cursor}``."""

    items: list[GitHubBranch] = Field(default_factory=list)
    cursor: str | None = None


class GitHubUserHandle(WireModel):
    """``GET /task_suggestions/github/user_handle``."""

    github_handle: str | None = None


class GitHubRepositoryPage(WireModel):
    """``GET /github/repositories/v2/{installation_id}`` and
    ``…/repositories/search/all-installations``: not captured from chatgpt.com; openwham
    answers ``{repositories, cursor}`` (docs/api.md)."""

    repositories: list[GitHubRepository] = Field(default_factory=list)
    cursor: str | None = None
