"""Forge connections and the body of ``POST …/turns/{id}/pr`` (openwham-defined: the WHAM
backend opens pull requests through its GitHub App, which has no public API)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from openwham.wire.base import StrictWireModel, WireModel

ForgeKind = Literal["github", "gitlab", "gitea"]
Authorship = Literal["user", "bot"]


class ForgeConnectionCreate(StrictWireModel):
    """Body of ``POST …/forge_connections``. ``api_base_url`` defaults to the public
    service's for ``github`` (``https://api.github.com``) and ``gitlab``
    (``https://gitlab.com/api/v4``); Gitea/Forgejo need theirs (``https://host/api/v1``).
    ``repo_url_prefix``: the repositories it opens pull requests for (default: the web
    host of the API, e.g. ``https://github.com/``; SSH URLs match in their https form)."""

    kind: ForgeKind
    token: str = Field(min_length=1, max_length=4096)
    api_base_url: str | None = Field(default=None, max_length=2000)
    repo_url_prefix: str | None = Field(default=None, max_length=2000)
    bot_token: str | None = Field(default=None, min_length=1, max_length=4096)
    pr_authorship_mode: Authorship = "user"


class ForgeConnectionInfo(WireModel):
    """A forge connection as listed: never a token."""

    id: str
    kind: str
    api_base_url: str
    repo_url_prefix: str
    pr_authorship_mode: str
    has_bot_token: bool
    created_at: float


class ForgeConnectionList(WireModel):
    """``GET …/forge_connections``."""

    items: list[ForgeConnectionInfo] = Field(default_factory=list)


class PullRequestOptions(StrictWireModel):
    """Optional body of ``POST …/turns/{turn_id}/pr``: a draft, and whose token opens it
    (the connection's default otherwise)."""

    draft: bool = False
    pr_authorship_mode: Authorship | None = None
