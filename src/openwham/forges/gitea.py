"""Gitea and Forgejo: REST ``/repos/{owner}/{repo}/pulls`` (the Gitea API's swagger); a
draft is a ``WIP:`` title, as Gitea marks work in progress."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from .base import ForgeError, PullRequest, RepoRef, RestForge

DRAFT = "WIP: "


def _pr(data: Any) -> PullRequest:
    if not isinstance(data, dict) or not isinstance(data.get("number"), int):
        raise ForgeError("Gitea answered a pull request without a number")
    merged = bool(data.get("merged"))
    head, base = data.get("head") or {}, data.get("base") or {}
    title = str(data.get("title") or "")
    return PullRequest(
        number=int(data["number"]),
        url=str(data.get("html_url") or ""),
        state="merged" if merged else str(data.get("state") or "open"),
        merged=merged,
        draft=bool(data.get("draft")) or title.startswith(DRAFT),
        title=title.removeprefix(DRAFT),
        body=str(data.get("body") or ""),
        head=str(head.get("ref") or ""),
        base=str(base.get("ref") or ""),
        head_sha=head.get("sha"),
        merge_commit_sha=data.get("merge_commit_sha"),
    )


class Gitea(RestForge):
    kind = "gitea"
    label = "Gitea"

    def auth_headers(self, token: str) -> dict[str, str]:
        return {"Authorization": f"token {token}"}

    def _repo(self, repo: RepoRef) -> str:
        if repo.path.count("/") != 1:
            raise ForgeError(f"{repo.path!r} is not an owner/repository path on Gitea", status=409)
        return f"/repos/{quote(repo.owner, safe='')}/{quote(repo.name, safe='')}"

    def create(
        self, repo: RepoRef, *, head: str, base: str, title: str, body: str, draft: bool
    ) -> PullRequest:
        payload = {"title": f"{DRAFT}{title}" if draft else title, "body": body}
        payload |= {"head": head, "base": base}
        try:
            return _pr(self.call("POST", f"{self._repo(repo)}/pulls", json=payload)[1])
        except ForgeError as exc:
            if exc.status != 409 or "already exists" not in str(exc).lower():
                raise
        _, found = self.call("GET", f"{self._repo(repo)}/pulls", params={"state": "all"})
        for item in found or []:
            if (item.get("head") or {}).get("ref") == head:
                return _pr(item)
        raise ForgeError(f"Gitea says a pull request for {head} exists but lists none", status=409)

    def update(self, repo: RepoRef, number: int, *, title: str, body: str) -> PullRequest:
        current = self.get(repo, number)
        full = f"{DRAFT}{title}" if current.draft else title
        path = f"{self._repo(repo)}/pulls/{number}"
        return _pr(self.call("PATCH", path, json={"title": full, "body": body})[1])

    def get(self, repo: RepoRef, number: int) -> PullRequest:
        return _pr(self.call("GET", f"{self._repo(repo)}/pulls/{number}")[1])
