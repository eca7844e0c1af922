"""Forge connections: an account's tokens for GitHub, GitLab or Gitea, used to open pull
requests after a PR branch is pushed (``commands.prs``). Tokens are sealed with the secrets
key and never rendered; a connection applies to the repositories whose URL starts with its
``repo_url_prefix`` (the longest prefix wins), SSH URLs compared in their https form."""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass
from urllib.parse import urlparse

from sqlalchemy import select
from sqlalchemy.orm import Session

from openwham.store import models as m
from openwham.wire.forges import ForgeConnectionCreate, ForgeConnectionInfo

from .accounts import Principal
from .errors import BadRequest, NotFound
from .keys import SecretBox

MAX_CONNECTIONS = 50
DEFAULT_API = {"github": "https://api.github.com", "gitlab": "https://gitlab.com/api/v4"}
_SCP_LIKE = re.compile(r"^(?:[^@/:]+@)?(?P<host>[^/:]+):(?P<path>[^/].*)$")


def comparable_url(url: str) -> str:
    """``url`` as connections' prefixes are compared with it: ``git@host:o/r.git`` and
    ``ssh://git@host[:port]/o/r.git`` become ``https://host/o/r.git``; others unchanged."""
    url = url.strip()
    if "://" not in url and not url.startswith("/"):
        match = _SCP_LIKE.match(url)
        if match:
            return f"https://{match['host']}/{match['path']}"
    parsed = urlparse(url)
    if parsed.scheme in ("ssh", "git+ssh") and parsed.hostname:
        return f"https://{parsed.hostname}{parsed.path}"
    return url


def _default_prefix(kind: str, api_base: str) -> str:
    parsed = urlparse(api_base)
    host = parsed.hostname or ""
    if kind == "github" and host == "api.github.com":
        return "https://github.com/"
    port = f":{parsed.port}" if parsed.port else ""
    return f"{parsed.scheme}://{host}{port}/"


def _check_api_base(value: str) -> str:
    parsed = urlparse(value)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise BadRequest("api_base_url must be an http:// or https:// URL")
    if parsed.username or parsed.password or parsed.query or parsed.fragment:
        raise BadRequest("api_base_url must not carry credentials, a query or a fragment")
    return value.rstrip("/")


def _check_token(value: str, field: str) -> str:
    if not value.strip() or any(c.isspace() or ord(c) < 32 for c in value):
        raise BadRequest(f"{field} must be one word without spaces or control characters")
    return value


def create(
    db: Session, principal: Principal, body: ForgeConnectionCreate, box: SecretBox
) -> m.ForgeConnection:
    given = body.api_base_url or DEFAULT_API.get(body.kind)
    if not given:
        raise BadRequest(f"api_base_url is required for {body.kind} (e.g. https://host/api/v1)")
    api = _check_api_base(given)
    prefix = body.repo_url_prefix or _default_prefix(body.kind, api)
    if not prefix.strip() or any(ord(c) < 32 for c in prefix):
        raise BadRequest("repo_url_prefix must be a URL or path prefix on one line")
    parsed = urlparse(prefix)
    if parsed.scheme and parsed.netloc and not parsed.path:
        prefix += "/"  # https://github.com must not match https://github.com.evil/
    if body.pr_authorship_mode == "bot" and body.bot_token is None:
        raise BadRequest("pr_authorship_mode 'bot' needs a bot_token")
    token = _check_token(body.token, "token")
    bot = _check_token(body.bot_token, "bot_token") if body.bot_token is not None else None
    count = len(list_rows(db, principal))
    if count >= MAX_CONNECTIONS:
        raise BadRequest(f"At most {MAX_CONNECTIONS} forge connections per account")
    row = m.ForgeConnection(
        id=uuid.uuid4().hex,
        account_id=principal.account_id,
        creator_id=principal.user_id,
        kind=body.kind,
        api_base_url=api,
        repo_url_prefix=comparable_url(prefix),
        token=box.seal(token),
        bot_token=box.seal(bot) if bot is not None else None,
        pr_authorship_mode=body.pr_authorship_mode,
        created_at=time.time(),
    )
    db.add(row)
    db.flush()
    return row


def list_rows(db: Session, principal: Principal) -> list[m.ForgeConnection]:
    q = select(m.ForgeConnection).where(m.ForgeConnection.account_id == principal.account_id)
    return list(db.scalars(q.order_by(m.ForgeConnection.created_at, m.ForgeConnection.id)))


def get_row(db: Session, account_id: str, connection_id: str) -> m.ForgeConnection:
    row = db.get(m.ForgeConnection, connection_id)
    if row is None or row.account_id != account_id:
        raise NotFound(f"Forge connection not found: {connection_id}")
    return row


def delete(db: Session, principal: Principal, connection_id: str) -> None:
    db.delete(get_row(db, principal.account_id, connection_id))
    db.flush()


def render(row: m.ForgeConnection) -> ForgeConnectionInfo:
    return ForgeConnectionInfo(
        id=row.id,
        kind=row.kind,
        api_base_url=row.api_base_url,
        repo_url_prefix=row.repo_url_prefix,
        pr_authorship_mode=row.pr_authorship_mode,
        has_bot_token=row.bot_token is not None,
        created_at=row.created_at,
    )


@dataclass(frozen=True, slots=True)
class ForgeTarget:
    """Where and as whom a repository's pull requests are opened."""

    connection_id: str
    kind: str
    api_base_url: str
    repo_path: str  # owner/name (GitLab: group/…/name)
    token: str
    authorship: str  # "user" or "bot"


def match(db: Session, account_id: str, repo_url: str) -> m.ForgeConnection | None:
    """The account's connection for ``repo_url``: the longest matching prefix."""
    url = comparable_url(repo_url)
    rows = db.scalars(select(m.ForgeConnection).where(m.ForgeConnection.account_id == account_id))
    found = [r for r in rows if url.startswith(r.repo_url_prefix)]
    return max(found, key=lambda r: (len(r.repo_url_prefix), r.created_at), default=None)


def target(
    row: m.ForgeConnection, repo_url: str, box: SecretBox, authorship: str | None
) -> ForgeTarget:
    """Open the connection for one repository; :class:`BadRequest` when it asks for a bot
    token the connection lacks or the URL has no repository path under the prefix."""
    mode = authorship or row.pr_authorship_mode
    if mode == "bot" and row.bot_token is None:
        raise BadRequest("This forge connection has no bot_token: pr_authorship_mode 'bot'")
    rest = comparable_url(repo_url)[len(row.repo_url_prefix) :]
    path = rest.strip("/").removesuffix(".git").strip("/")
    if not path or "/" not in path:
        raise BadRequest(
            f"The repository URL {repo_url} names no owner/repository under {row.repo_url_prefix}"
        )
    sealed = row.bot_token if mode == "bot" and row.bot_token is not None else row.token
    return ForgeTarget(
        connection_id=row.id,
        kind=row.kind,
        api_base_url=row.api_base_url,
        repo_path=path,
        token=box.open(sealed),
        authorship=mode,
    )
