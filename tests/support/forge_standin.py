"""A loopback stand-in for the pull-request endpoints of GitHub, GitLab and Gitea, built
from their published REST documentation (docs.github.com/rest/pulls/pulls,
docs.gitlab.com/api/merge_requests, Gitea's swagger ``/repos/{owner}/{repo}/pulls``): it
checks the credentials each expects, keeps pull requests in memory, answers "already exists"
as each does, and can be told to fail (``fail_next``) or to rate-limit."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from support.app_thread import AppThread


@dataclass
class Call:
    method: str
    path: str
    headers: dict[str, str]
    json: Any
    query: dict[str, str]


@dataclass
class ForgeStandIn:
    """``kind``: ``github``, ``gitlab`` or ``gitea``; ``tokens``: accepted tokens."""

    kind: str
    tokens: set[str] = field(default_factory=lambda: {"forge-token-1234"})
    web: str = "https://forge.example"
    calls: list[Call] = field(default_factory=list)
    prs: dict[tuple[str, int], dict[str, Any]] = field(default_factory=dict)
    #: (status, body, headers) answered to the next create request instead of creating
    fail_next: tuple[int, Any, dict[str, str]] | None = None
    url: str = ""
    _runner: AppThread = field(default_factory=AppThread)

    # -- serving ----------------------------------------------------------------------

    def start(self) -> ForgeStandIn:
        prefix = {"github": "/api/v3", "gitlab": "/api/v4", "gitea": "/api/v1"}[self.kind]
        routes = [
            Route(prefix + "/{path:path}", self._handle, methods=["GET", "POST", "PATCH", "PUT"])
        ]
        self.url = self._runner.start(Starlette(routes=routes)) + prefix
        return self

    def stop(self) -> None:
        self._runner.stop()

    def token_of(self, headers: dict[str, str]) -> str | None:
        if self.kind == "gitlab":
            return headers.get("private-token")
        auth = headers.get("authorization", "")
        scheme = "Bearer " if self.kind == "github" else "token "
        return auth.removeprefix(scheme) if auth.startswith(scheme) else None

    async def _handle(self, request: Request) -> Response:
        raw = await request.body()
        body = json.loads(raw) if raw else None
        path = "/" + request.path_params["path"]
        headers = {k.lower(): v for k, v in request.headers.items()}
        self.calls.append(Call(request.method, path, headers, body, dict(request.query_params)))
        if self.token_of(headers) not in self.tokens:
            message = {"gitlab": "401 Unauthorized"}.get(self.kind, "Bad credentials")
            return JSONResponse({"message": message}, status_code=401)
        if self.kind == "gitlab":
            return self._gitlab(request.method, path, body, request.query_params)
        return self._github_like(request.method, path, body, request.query_params)

    def _failure(self) -> Response | None:
        if self.fail_next is None:
            return None
        status, body, headers = self.fail_next
        self.fail_next = None
        return JSONResponse(body, status_code=status, headers=headers)

    # -- GitHub and Gitea: /repos/{owner}/{repo}/pulls[/{number}] ----------------------

    def _github_like(self, method: str, path: str, body: Any, query: Any) -> Response:
        parts = path.strip("/").split("/")
        if len(parts) < 4 or parts[0] != "repos" or parts[3] != "pulls":
            return JSONResponse({"message": "Not Found"}, status_code=404)
        repo = f"{parts[1]}/{parts[2]}"
        if len(parts) == 4 and method == "POST":
            if (failed := self._failure()) is not None:
                return failed
            for pr in self._of(repo):
                if pr["head"]["ref"] == body["head"] and pr["state"] == "open":
                    if self.kind == "github":
                        msg = f"A pull request already exists for {parts[1]}:{body['head']}."
                        return JSONResponse(
                            {"message": "Validation Failed", "errors": [{"message": msg}]},
                            status_code=422,
                        )
                    msg = f"pull request already exists for these targets [id: {pr['id']}]"
                    return JSONResponse({"message": msg}, status_code=409)
            return JSONResponse(self._new(repo, body), status_code=201)
        if len(parts) == 4 and method == "GET":
            found = self._of(repo)
            if "head" in query:  # GitHub's owner:branch filter
                found = [p for p in found if f"{parts[1]}:{p['head']['ref']}" == query["head"]]
            return JSONResponse(found)
        number = int(parts[4])
        pr = self.prs.get((repo, number))
        if pr is None:
            return JSONResponse({"message": "Not Found"}, status_code=404)
        if method == "PATCH":
            pr.update({k: body[k] for k in ("title", "body") if k in body})
        return JSONResponse(pr)

    def _of(self, repo: str) -> list[dict[str, Any]]:
        return [pr for (r, _), pr in sorted(self.prs.items()) if r == repo]

    def _new(self, repo: str, body: dict[str, Any]) -> dict[str, Any]:
        number = len(self._of(repo)) + 1
        pr = {
            "id": 1000 + number,
            "number": number,
            "html_url": f"{self.web}/{repo}/pull{'s' if self.kind == 'gitea' else ''}/{number}",
            "state": "open",
            "merged": False,
            "title": body["title"],
            "body": body.get("body", ""),
            "head": {"ref": body["head"], "sha": "0" * 40},
            "base": {"ref": body["base"], "sha": "1" * 40},
            "merge_commit_sha": None,
        }
        if self.kind == "github":
            pr["draft"] = bool(body.get("draft"))
        self.prs[(repo, number)] = pr
        return pr

    # -- GitLab: /projects/{url-encoded path}/merge_requests[/{iid}] --------------------

    def _gitlab(self, method: str, path: str, body: Any, query: Any) -> Response:
        # Starlette hands the path decoded once: the project's %2F arrives as "/"
        head, sep, rest = path.partition("/merge_requests")
        if not head.startswith("/projects/") or not sep:
            return JSONResponse({"message": "404 Not Found"}, status_code=404)
        project = unquote(head.removeprefix("/projects/"))
        if not rest and method == "POST":
            if (failed := self._failure()) is not None:
                return failed
            for mr in self._of(project):
                if mr["source_branch"] == body["source_branch"] and mr["state"] == "opened":
                    msg = (
                        "Another open merge request already exists for this source branch: "
                        f"!{mr['iid']}"
                    )
                    return JSONResponse({"message": [msg]}, status_code=409)
            iid = len(self._of(project)) + 1
            mr = {
                "id": 5000 + iid,
                "iid": iid,
                "web_url": f"{self.web}/{project}/-/merge_requests/{iid}",
                "state": "opened",
                "draft": body["title"].startswith("Draft:"),
                "title": body["title"],
                "description": body.get("description", ""),
                "source_branch": body["source_branch"],
                "target_branch": body["target_branch"],
                "sha": "0" * 40,
                "merge_commit_sha": None,
            }
            self.prs[(project, iid)] = mr
            return JSONResponse(mr, status_code=201)
        if not rest and method == "GET":
            found = self._of(project)
            if "source_branch" in query:
                found = [m for m in found if m["source_branch"] == query["source_branch"]]
            return JSONResponse(found)
        mr = self.prs.get((project, int(rest.strip("/"))))
        if mr is None:
            return JSONResponse({"message": "404 Not found"}, status_code=404)
        if method == "PUT":
            mr.update({k: body[k] for k in ("title", "description") if k in body})
        return JSONResponse(mr)

    # -- the outside world moves on --------------------------------------------------

    def merge(self, repo: str, number: int) -> None:
        pr = self.prs[(repo, number)]
        if self.kind == "gitlab":
            pr["state"] = "merged"
        else:
            pr.update(state="closed", merged=True, merge_commit_sha="2" * 40)
