"""The GitHub-shaped reads of Codex cloud (wham-api.md §8.2), answered from the account's
environments: the web composer and other official clients pick repositories and branches
through them.

openwham has no GitHub App, so an "installation" is what the app would be installed on: one
per repository owner found in the account's environments (any host; a GitLab group or a
local path's parent directory is an owner too). Ids are derived from what they stand for, so
they are stable across requests and nodes without being stored: a repository's id is its
environment key (``repo-<hash of the clone URL>``), an installation's ``inst-<hash of the
owner>``. Only repositories of the caller's account are ever listed or found.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass
from urllib.parse import urlparse

from sqlalchemy.orm import Session

from openwham.service import environments as envs
from openwham.service.accounts import Principal
from openwham.service.errors import BadRequest, NotFound
from openwham.wire import GitHubRepo
from openwham.wire.github import (
    GitHubBranch,
    GitHubBranchPage,
    GitHubInstallation,
    GitHubRepository,
    GitHubRepositoryPage,
)

#: Branch and repository pages: the default size and the most a caller may ask for.
PAGE_SIZE = 100
MAX_PAGE_SIZE = 500


@dataclass(frozen=True, slots=True)
class AccountRepo:
    """One repository of the account: its key, its record and the environment it is in."""

    key: str
    repo: GitHubRepo
    env_id: str

    @property
    def owner(self) -> str:
        return (self.repo.owner.login if self.repo.owner else None) or ""

    @property
    def url(self) -> str:
        return str(self.repo.clone_url or self.repo.git_url or "")


def installation_id(owner: str) -> str:
    """The id of the pseudo-installation for ``owner`` (case-insensitive, like GitHub)."""
    return "inst-" + hashlib.sha256(owner.lower().encode()).hexdigest()[:16]


def _account_id(owner: str) -> int:
    """A stable positive number for ``owner`` (GitHub's ``account_id`` is an integer)."""
    return int(hashlib.sha256(owner.lower().encode()).hexdigest()[:12], 16)


def _owner_url(url: str, owner: str) -> str | None:
    """``https://host/owner`` for a web-hosted repository; ``None`` for SSH or local paths."""
    parsed = urlparse(url)
    if parsed.scheme in ("http", "https") and parsed.hostname and owner:
        port = f":{parsed.port}" if parsed.port else ""
        return f"{parsed.scheme}://{parsed.hostname}{port}/{owner}"
    return None


def account_repos(db: Session, principal: Principal) -> list[AccountRepo]:
    """Every repository of the account's environments, once each (the first environment in
    the list's order, pinned first, gives its record), in full-name order."""
    seen: dict[str, AccountRepo] = {}
    for row in envs.list_rows(db, principal):
        for key, info in (row.body.get("repo_map") or {}).items():
            if key not in seen:
                seen[key] = AccountRepo(str(key), GitHubRepo.model_validate(info), row.id)
    return sorted(seen.values(), key=lambda r: str(r.repo.repository_full_name or "").lower())


def repository(db: Session, principal: Principal, repo_id: str) -> AccountRepo:
    """The account's repository ``repo_id``; 404 when the account has none by that id."""
    for found in account_repos(db, principal):
        if found.key == repo_id:
            return found
    raise NotFound(f"Repository not found: {repo_id}")


def render_repository(found: AccountRepo) -> GitHubRepository:
    """The repository as ``GET github/repositories/{id}`` answers it; git forges other than
    GitHub have no merge-message settings, so those carry GitHub's defaults."""
    return GitHubRepository.model_validate(
        {
            **found.repo.model_dump(mode="json"),
            "id": found.key,
            "merge_commit_message": "PR_TITLE",
            "merge_commit_title": "MERGE_MESSAGE",
            "squash_merge_commit_message": "COMMIT_MESSAGES",
            "squash_merge_commit_title": "COMMIT_OR_PR_TITLE",
        }
    )


def installations(db: Session, principal: Principal) -> list[GitHubInstallation]:
    """One pseudo-installation per repository owner, in name order."""
    owners: dict[str, GitHubInstallation] = {}
    for found in account_repos(db, principal):
        owner = found.owner
        if not owner or owner.lower() in owners:
            continue
        kind = found.repo.owner.type if found.repo.owner and found.repo.owner.type else "User"
        owners[owner.lower()] = GitHubInstallation(
            id=installation_id(owner),
            account_login=owner,
            account_id=_account_id(owner),
            account_type=kind,
            account_avatar_url=None,
            html_url=_owner_url(found.url, owner),
            events=[],
        )
    return sorted(owners.values(), key=lambda inst: str(inst.account_login).lower())


def page_bounds(cursor: str | None, limit: int | None) -> tuple[int, int]:
    """(offset, size) from an opaque cursor and a page size; a bad cursor is a 400."""
    size = PAGE_SIZE if limit is None else limit
    if not 1 <= size <= MAX_PAGE_SIZE:
        raise BadRequest(f"limit must be between 1 and {MAX_PAGE_SIZE}")
    if not cursor:
        return 0, size
    try:
        text = base64.urlsafe_b64decode(cursor.encode("ascii") + b"==").decode("ascii")
        kind, _, number = text.partition(":")
        offset = int(number)
    except (UnicodeError, ValueError, binascii.Error):
        raise BadRequest("Invalid cursor") from None
    if kind != "o" or offset < 0:
        raise BadRequest("Invalid cursor")
    return offset, size


def _next_cursor(offset: int, size: int, total: int) -> str | None:
    if offset + size >= total:
        return None
    return base64.urlsafe_b64encode(f"o:{offset + size}".encode()).decode().rstrip("=")


def repositories_page(
    db: Session,
    principal: Principal,
    *,
    installation: str | None = None,
    query: str | None = None,
    cursor: str | None = None,
    limit: int | None = None,
) -> GitHubRepositoryPage:
    """The account's repositories, of one installation (404 when unknown) or all, whose full
    name contains ``query`` (case-insensitive), a page at a time."""
    found = account_repos(db, principal)
    if installation is not None:
        found = [r for r in found if r.owner and installation_id(r.owner) == installation]
        if not found:
            raise NotFound(f"Installation not found: {installation}")
    if query:
        wanted = query.lower()
        found = [r for r in found if wanted in str(r.repo.repository_full_name or "").lower()]
    offset, size = page_bounds(cursor, limit)
    return GitHubRepositoryPage(
        repositories=[render_repository(r) for r in found[offset : offset + size]],
        cursor=_next_cursor(offset, size, len(found)),
    )


def branches_page(
    names: list[str],
    *,
    default_branch: str | None,
    query: str | None,
    cursor: str | None,
    limit: int | None,
) -> GitHubBranchPage:
    """``names`` filtered by ``query`` (case-insensitive substring), the default branch first,
    then in name order, a page at a time."""
    offset, size = page_bounds(cursor, limit)
    wanted = (query or "").lower()
    matching = sorted(
        (name for name in set(names) if wanted in name.lower()),
        key=lambda name: (name != default_branch, name.lower(), name),
    )
    return GitHubBranchPage(
        items=[GitHubBranch(branch=name) for name in matching[offset : offset + size]],
        cursor=_next_cursor(offset, size, len(matching)),
    )
