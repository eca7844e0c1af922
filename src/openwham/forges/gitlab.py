"""GitLab (gitlab.com and self-managed): merge requests, REST
``/projects/{id}/merge_requests`` (docs.gitlab.com/api/merge_requests). The project is named
by its URL-encoded path (``group/sub/name``); a draft is a ``Draft:`` title."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from .base import ForgeError, PullRequest, RepoRef, RestForge

DRAFT = "Draft: "


def _pr(data: Any) -> PullRequest:
    if not isinstance(data, dict) or not isinstance(data.get("iid"), int):
        raise ForgeError("GitLab answered a merge request without an iid")
    state = str(data.get("state") or "opened")
    title = str(data.get("title") or "")
    return PullRequest(
        number=int(data["iid"]),
        url=str(data.get("web_url") or ""),
        state={"opened": "open", "locked": "open"}.get(state, state),
        merged=state == "merged",
        draft=bool(data.get("draft") or data.get("work_in_progress")),
        title=title.removeprefix(DRAFT),
        body=str(data.get("description") or ""),
        head=str(data.get("source_branch") or ""),
        base=str(data.get("target_branch") or ""),
        head_sha=data.get("sha"),
        merge_commit_sha=data.get("merge_commit_sha"),
    )


class GitLab(RestForge):
    kind = "gitlab"
    label = "GitLab"

    def auth_headers(self, token: str) -> dict[str, str]:
        return {"PRIVATE-TOKEN": token}

    def _project(self, repo: RepoRef) -> str:
        return f"/projects/{quote(repo.path, safe='')}"

    def create(
        self, repo: RepoRef, *, head: str, base: str, title: str, body: str, draft: bool
    ) -> PullRequest:
        payload = {
            "source_branch": head,
            "target_branch": base,
            "title": f"{DRAFT}{title}" if draft else title,
            "description": body,
        }
        try:
            return _pr(self.call("POST", f"{self._project(repo)}/merge_requests", json=payload)[1])
        except ForgeError as exc:
            if exc.status != 409 or "already exists" not in str(exc).lower():
                raise
        _, found = self.call(
            "GET",
            f"{self._project(repo)}/merge_requests",
            params={"source_branch": head, "state": "all", "per_page": 10},
        )
        for item in found or []:
            if item.get("source_branch") == head:
                return _pr(item)
        raise ForgeError(
            f"GitLab says a merge request for {head} exists but lists none", status=409
        )

    def update(self, repo: RepoRef, number: int, *, title: str, body: str) -> PullRequest:
        path = f"{self._project(repo)}/merge_requests/{number}"
        current = self.get(repo, number)
        full = f"{DRAFT}{title}" if current.draft else title
        return _pr(self.call("PUT", path, json={"title": full, "description": body})[1])

    def get(self, repo: RepoRef, number: int) -> PullRequest:
        return _pr(self.call("GET", f"{self._project(repo)}/merge_requests/{number}")[1])
