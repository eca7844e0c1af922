"""Git credentials: an account's HTTPS tokens and SSH deploy keys for private remotes,
matched to a repository by URL prefix (the longest wins; a prefix that ends in a host gets
``/``, so ``https://github.com/`` never matches ``https://github.com.evil/``). Secrets and keys
are sealed with the secrets key, never rendered, and opened only for host git's calls
(``openwham.gitauth``)."""

from __future__ import annotations

import re
import time
import uuid
from urllib.parse import urlparse

from sqlalchemy import select
from sqlalchemy.orm import Session

from openwham.config import Settings
from openwham.gitauth import GitAuth, matches
from openwham.store import models as m
from openwham.wire.gitcreds import GitCredentialCreate, GitCredentialInfo

from .accounts import Principal
from .errors import BadRequest, NotFound
from .keys import SecretBox, secrets_key

MAX_CREDENTIALS = 100
_SCP_LIKE = re.compile(r"^[A-Za-z0-9._-]+@[A-Za-z0-9.-]+:(?!//)")
_KEY = re.compile(
    r"^-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----\n.*\n-----END [A-Z0-9 ]*PRIVATE KEY-----$", re.S
)


def _prefix(raw: str, kind: str) -> str:
    prefix = raw.strip()
    if not prefix or any(ord(c) < 32 or c == "\x7f" for c in prefix):
        raise BadRequest("url_prefix must be a repository URL prefix on one line")
    if _SCP_LIKE.match(prefix):
        if kind != "ssh":
            raise BadRequest("url_prefix user@host:path is an SSH URL: give ssh_private_key")
        return prefix
    parsed = urlparse(prefix)
    allowed = ("https", "http") if kind == "https" else ("ssh", "git+ssh")
    if parsed.scheme not in allowed or not parsed.netloc:
        want = "https:// or http://" if kind == "https" else "ssh:// or user@host:"
        raise BadRequest(f"url_prefix must start with {want} for this kind of credential")
    if parsed.password is not None or (kind == "https" and parsed.username):
        raise BadRequest("url_prefix must not carry credentials (user:password@)")
    if parsed.query or parsed.fragment:
        raise BadRequest("url_prefix must not carry a query or a fragment")
    if not parsed.path:
        prefix += "/"  # https://github.com must not match https://github.com.evil/
    return prefix


def create(
    db: Session, principal: Principal, body: GitCredentialCreate, box: SecretBox
) -> m.GitCredential:
    https = body.secret is not None or body.username is not None
    ssh = body.ssh_private_key is not None or body.known_hosts is not None
    if https == ssh:
        raise BadRequest(
            'Give either "username" and "secret" (HTTPS) or "ssh_private_key" and '
            '"known_hosts" (SSH)'
        )
    if https:
        if body.username is None or body.secret is None:
            raise BadRequest('An HTTPS credential needs both "username" and "secret"')
        if any(c.isspace() or ord(c) < 32 for c in body.username + body.secret):
            raise BadRequest("username and secret must be one word without control characters")
        kind, sealed, hosts = "https", box.seal(body.secret), None
    else:
        if body.ssh_private_key is None or body.known_hosts is None:
            raise BadRequest('An SSH credential needs both "ssh_private_key" and "known_hosts"')
        key = body.ssh_private_key.replace("\r\n", "\n").strip()
        if not _KEY.match(key):
            raise BadRequest("ssh_private_key must be a PEM/OpenSSH private key (-----BEGIN …)")
        hosts = body.known_hosts.replace("\r\n", "\n").strip()
        lines = [x for x in hosts.splitlines() if x.strip()]
        if not lines or any(len(x.split()) < 3 or "\0" in x for x in lines):
            raise BadRequest("known_hosts must be known_hosts lines: HOST KEYTYPE KEY")
        kind, sealed = "ssh", box.seal(key + "\n")
    prefix = _prefix(body.url_prefix, kind)
    if len(list_rows(db, principal)) >= MAX_CREDENTIALS:
        raise BadRequest(f"At most {MAX_CREDENTIALS} git credentials per account")
    row = m.GitCredential(
        id="gitcred_" + uuid.uuid4().hex,
        account_id=principal.account_id,
        creator_id=principal.user_id,
        kind=kind,
        url_prefix=prefix,
        username=body.username if kind == "https" else None,
        secret=sealed,
        known_hosts=hosts,
        created_at=time.time(),
    )
    db.add(row)
    db.flush()
    return row


def list_rows(db: Session, principal: Principal) -> list[m.GitCredential]:
    q = select(m.GitCredential).where(m.GitCredential.account_id == principal.account_id)
    return list(db.scalars(q.order_by(m.GitCredential.created_at, m.GitCredential.id)))


def delete(db: Session, principal: Principal, credential_id: str) -> None:
    row = db.get(m.GitCredential, credential_id)
    if row is None or row.account_id != principal.account_id:
        raise NotFound(f"Git credential not found: {credential_id}")
    db.delete(row)
    db.flush()


def render(row: m.GitCredential) -> GitCredentialInfo:
    return GitCredentialInfo(
        id=row.id,
        url_prefix=row.url_prefix,
        kind=row.kind,
        username=row.username,
        created_at=row.created_at,
    )


def match(db: Session, account_id: str, url: str) -> m.GitCredential | None:
    """The account's credential for ``url``: the longest matching prefix."""
    rows = db.scalars(select(m.GitCredential).where(m.GitCredential.account_id == account_id))
    found = [r for r in rows if matches(r.url_prefix, url)]
    return max(found, key=lambda r: (len(r.url_prefix), r.created_at), default=None)


def auth_for(db: Session, account_id: str, url: str, box: SecretBox) -> GitAuth | None:
    """The opened credential host git uses for ``url`` on behalf of ``account_id``."""
    row = match(db, account_id, url)
    return opened(row, box) if row is not None else None


def opened(row: m.GitCredential, box: SecretBox) -> GitAuth:
    """``row`` with its secret or key decrypted, for one git call."""
    return GitAuth(
        url_prefix=row.url_prefix,
        kind="ssh" if row.kind == "ssh" else "https",
        username=row.username,
        secret=box.open(row.secret),
        known_hosts=row.known_hosts,
    )


def settings_box(settings: Settings) -> SecretBox:
    """The secrets key's box, for callers without the app's (commands, the engine)."""
    return SecretBox(secrets_key(settings))
