"""GitHub (github.com and GitHub Enterprise Server): REST ``/repos/{owner}/{repo}/pulls``
(docs.github.com/rest/pulls/pulls)."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from .base import ForgeError, PullRequest, RepoRef, RestForge

ALREADY = "pull request already exists"


def _pr(data: Any) -> PullRequest:
    if not isinstance(data, dict) or not isinstance(data.get("number"), int):
        raise ForgeError("GitHub answered a pull request without a number")
    merged = bool(data.get("merged") or data.get("merged_at"))
    head, base = data.get("head") or {}, data.get("base") or {}
    return PullRequest(
        number=int(data["number"]),
        url=str(data.get("html_url") or ""),
        state="merged" if merged else str(data.get("state") or "open"),
        merged=merged,
        draft=bool(data.get("draft")),
        title=str(data.get("title") or ""),
        body=str(data.get("body") or ""),
        head=str(head.get("ref") or ""),
        base=str(base.get("ref") or ""),
        head_sha=head.get("sha"),
        merge_commit_sha=data.get("merge_commit_sha"),
    )


class GitHub(RestForge):
    kind = "github"
    label = "GitHub"

    def auth_headers(self, token: str) -> dict[str, str]:
        return {
            "Authorization": f"Bearer {token}",
            "Accept": "application/vnd.github+json",
            "X-GitHub-Api-Version": "2022-11-28",
        }

    def _repo(self, repo: RepoRef) -> str:
        if repo.path.count("/") != 1:
            raise ForgeError(f"{repo.path!r} is not an owner/repository path on GitHub", status=409)
        return f"/repos/{quote(repo.owner, safe='')}/{quote(repo.name, safe='')}"

    def create(
        self, repo: RepoRef, *, head: str, base: str, title: str, body: str, draft: bool
    ) -> PullRequest:
        payload = {"title": title, "body": body, "head": head, "base": base, "draft": draft}
        try:
            return _pr(self.call("POST", f"{self._repo(repo)}/pulls", json=payload)[1])
        except ForgeError as exc:
            if exc.status != 409 or ALREADY not in str(exc).lower():
                raise
        # 422 "A pull request already exists for owner:head": answer that one
        _, found = self.call(
            "GET",
            f"{self._repo(repo)}/pulls",
            params={"head": f"{repo.owner}:{head}", "state": "all", "per_page": 10},
        )
        for item in found or []:
            if (item.get("head") or {}).get("ref") == head:
                return _pr(item)
        raise ForgeError(f"GitHub says a pull request for {head} exists but lists none", status=409)

    def update(self, repo: RepoRef, number: int, *, title: str, body: str) -> PullRequest:
        path = f"{self._repo(repo)}/pulls/{number}"
        return _pr(self.call("PATCH", path, json={"title": title, "body": body})[1])

    def get(self, repo: RepoRef, number: int) -> PullRequest:
        return _pr(self.call("GET", f"{self._repo(repo)}/pulls/{number}")[1])
