"""The forge protocol, the pull request every forge answers with, and its errors."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import httpx

KINDS = ("github", "gitlab", "gitea")
TIMEOUT = httpx.Timeout(15.0, connect=5.0)


@dataclass(frozen=True, slots=True)
class RepoRef:
    """A repository on a forge: ``path`` is ``owner/name`` (GitLab: ``group/sub/name``)."""

    path: str

    @property
    def owner(self) -> str:
        return self.path.rsplit("/", 1)[0]

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]


@dataclass(frozen=True, slots=True)
class PullRequest:
    """What openwham keeps of a forge's pull request (merge request on GitLab)."""

    number: int
    url: str
    state: str  # "open", "closed" or "merged"
    merged: bool
    draft: bool
    title: str
    body: str
    head: str
    base: str
    head_sha: str | None = None
    merge_commit_sha: str | None = None


class ForgeError(Exception):
    """A forge refused or failed a request. ``status`` is the HTTP status openwham answers
    with (409 the forge refused what was asked, 429 its rate limit, 502 it failed or
    refused the credentials); ``retry_after`` is in seconds when the forge said."""

    def __init__(self, message: str, *, status: int = 502, retry_after: float | None = None):
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


class Forge(Protocol):
    """One forge's pull-request API, for one repository owner's token."""

    kind: str

    def create(
        self, repo: RepoRef, *, head: str, base: str, title: str, body: str, draft: bool
    ) -> PullRequest:
        """Open a pull request; one for ``head`` that exists already is answered instead."""
        ...

    def update(self, repo: RepoRef, number: int, *, title: str, body: str) -> PullRequest:
        """Change a pull request's title and description (a later push of the task)."""
        ...

    def get(self, repo: RepoRef, number: int) -> PullRequest:
        """The pull request as the forge has it now (its state, merged or not)."""
        ...


Transport = httpx.BaseTransport | None


class RestForge:
    """What the three forges share: one HTTP client, JSON, and how errors read."""

    kind = "forge"
    label = "forge"

    def __init__(self, api_base: str, token: str, *, transport: Transport = None) -> None:
        self.api_base = api_base.rstrip("/")
        self._client = httpx.Client(
            base_url=self.api_base,
            headers={**self.auth_headers(token), "User-Agent": "openwham"},
            timeout=TIMEOUT,
            transport=transport,
            follow_redirects=False,
            trust_env=False,
        )

    def auth_headers(self, token: str) -> dict[str, str]:
        raise NotImplementedError

    def create(
        self, repo: RepoRef, *, head: str, base: str, title: str, body: str, draft: bool
    ) -> PullRequest:
        raise NotImplementedError

    def update(self, repo: RepoRef, number: int, *, title: str, body: str) -> PullRequest:
        raise NotImplementedError

    def get(self, repo: RepoRef, number: int) -> PullRequest:
        raise NotImplementedError

    def close(self) -> None:
        self._client.close()

    def call(
        self, method: str, path: str, *, ok: Callable[[int], bool] | None = None, **kw: Any
    ) -> tuple[int, Any]:
        """``(status, JSON)``; a failure the caller does not accept is a :class:`ForgeError`
        whose message names the forge, the request and what it said (never the token)."""
        where = f"{self.label} {method} {self.api_base}{path}"
        try:
            response = self._client.request(method, path, **kw)
        except httpx.HTTPError as exc:
            raise ForgeError(f"{where} failed: {type(exc).__name__}: {exc}") from exc
        try:
            data = response.json() if response.content else None
        except ValueError:
            data = None
        status = response.status_code
        if (ok or (lambda s: 200 <= s < 300))(status):
            return status, data
        raise self.error(where, response, data)

    def error(self, where: str, response: httpx.Response, data: Any) -> ForgeError:
        status = response.status_code
        said = _message(data) or response.reason_phrase or ""
        retry = _retry_after(response)
        limited = status == 429 or (
            status == 403 and response.headers.get("x-ratelimit-remaining") == "0"
        )
        if limited:
            return ForgeError(
                f"{where}: rate limited by the forge ({said}); try again "
                + (f"in {retry:.0f} s" if retry is not None else "later"),
                status=429,
                retry_after=retry,
            )
        if status in (401, 403):
            return ForgeError(
                f"{where}: the forge refused the connection's token ({status} {said})",
                status=502,
            )
        if status in (404, 409, 422):
            return ForgeError(f"{where}: {status} {said}", status=409)
        return ForgeError(f"{where}: {status} {said}", status=502)


def _message(data: Any) -> str:
    """The forge's own words: GitHub's ``message`` and ``errors[].message``, GitLab's
    ``message`` (a string, list or map) or ``error``, Gitea's ``message``."""
    if not isinstance(data, dict):
        return ""
    parts: list[str] = []
    msg = data.get("message", data.get("error"))
    if isinstance(msg, str):
        parts.append(msg)
    elif isinstance(msg, list):
        parts += [str(m) for m in msg]
    elif isinstance(msg, dict):
        parts += [f"{k}: {v}" for k, v in msg.items()]
    for err in data.get("errors") or []:
        if isinstance(err, dict) and err.get("message"):
            parts.append(str(err["message"]))
    return "; ".join(p for p in parts if p)[:500]


def _retry_after(response: httpx.Response) -> float | None:
    import time

    value = response.headers.get("retry-after")
    if value and value.strip().isdigit():
        return float(value)
    reset = response.headers.get("x-ratelimit-reset")
    if reset and reset.strip().isdigit():
        return max(0.0, float(reset) - time.time())
    return None


def forge_for(kind: str, api_base: str, token: str, *, transport: Transport = None) -> RestForge:
    """The forge client of ``kind`` (one of :data:`KINDS`)."""
    from .gitea import Gitea
    from .github import GitHub
    from .gitlab import GitLab

    classes: dict[str, type[RestForge]] = {"github": GitHub, "gitlab": GitLab, "gitea": Gitea}
    if kind not in classes:
        raise ValueError(f"unknown forge kind {kind!r}")
    return classes[kind](api_base, token, transport=transport)
