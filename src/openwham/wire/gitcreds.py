"""Git credentials for private remotes (openwham-defined; docs/api.md): write-only."""

from __future__ import annotations

from pydantic import Field

from openwham.wire.base import StrictWireModel, WireModel


class GitCredentialCreate(StrictWireModel):
    """Body of ``POST …/git_credentials``: HTTPS (``username`` + ``secret``, a token or
    password) or SSH (``ssh_private_key`` + ``known_hosts``, the server's host key line(s)),
    for the repository URLs that start with ``url_prefix`` (the longest prefix wins)."""

    url_prefix: str = Field(min_length=1, max_length=2000)
    username: str | None = Field(default=None, min_length=1, max_length=200)
    secret: str | None = Field(default=None, min_length=1, max_length=4096)
    ssh_private_key: str | None = Field(default=None, min_length=1, max_length=16384)
    known_hosts: str | None = Field(default=None, min_length=1, max_length=16384)


class GitCredentialInfo(WireModel):
    """A git credential as listed: never its secret or key."""

    id: str
    url_prefix: str
    kind: str  # "https" or "ssh"
    username: str | None = None
    created_at: float


class GitCredentialList(WireModel):
    """``GET …/git_credentials``."""

    items: list[GitCredentialInfo] = Field(default_factory=list)
