"""API tokens as rows: named, expiring, listable and revocable.

A token is a JWT (``accounts.issue_token``) whose ``jti`` is the id of its ``api_tokens`` row.
Every request looks the row up (``check``), so a revoked token is refused at once by every
node that shares the database; no node keeps a cache of good tokens. ``last_used_at`` is
written at most once per ``TOUCH_INTERVAL`` per token, so reads do not turn into writes.

Tokens made before this table existed (JWTs without a row) are refused with a message that
says to create a new one: they could be neither listed nor revoked.
"""

from __future__ import annotations

import math
import time
import unicodedata
import uuid
from collections.abc import Collection
from typing import Protocol, TypedDict, TypeVar

from sqlalchemy import Connection, or_, select, update
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value

from openwham.store import models as m
from openwham.store.db import rowcount

from .errors import BadRequest, NotFound, Unauthorized

ID_PREFIX = "tok_"
DEFAULT_NAME = "API token"
MAX_NAME_LENGTH = 100
MAX_DAYS = 3650
MIN_SECONDS = 60
TOUCH_INTERVAL = 60.0
CREATE_HINT = "create a new one with `wham token create`"


def new_token_id() -> str:
    return f"{ID_PREFIX}{uuid.uuid4().hex}"


def clean_name(name: str | None) -> str:
    """The name to store (``DEFAULT_NAME`` when none is given); 400 for a bad one."""
    if name is None:
        return DEFAULT_NAME
    text = name.strip()
    if not text:
        raise BadRequest("The token name must not be empty")
    if len(text) > MAX_NAME_LENGTH:
        raise BadRequest(f"The token name has more than {MAX_NAME_LENGTH} characters")
    if any(unicodedata.category(c).startswith("C") for c in text):
        raise BadRequest("The token name must not contain control characters")
    return text


def lifetime_seconds(days: float | None, default_seconds: int) -> int:
    """``days`` as whole seconds (``default_seconds`` when None); 400 unless positive and at
    most ``MAX_DAYS``."""
    if days is None:
        return default_seconds
    if isinstance(days, bool) or not math.isfinite(days) or days <= 0:
        raise BadRequest("expires_in_days must be a positive number of days")
    if days > MAX_DAYS:
        raise BadRequest(f"expires_in_days must be at most {MAX_DAYS}")
    seconds = int(days * 86400)
    if seconds < MIN_SECONDS:
        raise BadRequest("expires_in_days must be at least one minute")
    return seconds


def record(
    db: Session,
    *,
    user_id: str,
    account_id: str,
    name: str | None,
    ttl_seconds: int,
    now: float,
) -> m.ApiToken:
    """Add the row of a new token (flushed, not committed)."""
    row = m.ApiToken(
        id=new_token_id(),
        user_id=user_id,
        account_id=account_id,
        name=clean_name(name),
        created_at=now,
        expires_at=float(int(now) + ttl_seconds),
    )
    db.add(row)
    db.flush()
    return row


def check(db: Session, token_id: object, user_id: str, now: float) -> m.ApiToken:
    """The row of a token presented by ``user_id``; 401 when unknown, revoked or expired."""
    row = db.get(m.ApiToken, token_id) if isinstance(token_id, str) and token_id else None
    return check_row(row, user_id, now)


def unknown() -> Unauthorized:
    """The 401 for a token without a row (or another user's)."""
    return Unauthorized(
        "Unknown API token (tokens made before tokens could be revoked are no longer "
        f"accepted); {CREATE_HINT}"
    )


class TokenState(Protocol):
    """What a check needs of a token's row: the ORM object or a Core row of its columns."""

    @property
    def user_id(self) -> str: ...
    @property
    def revoked_at(self) -> float | None: ...
    @property
    def expires_at(self) -> float: ...


_Row = TypeVar("_Row", bound=TokenState)


def check_row(row: _Row | None, user_id: str, now: float) -> _Row:
    """:func:`check` on a row the caller loaded (``None``: no such token)."""
    if row is None or row.user_id != user_id:
        raise unknown()
    if row.revoked_at is not None:
        raise Unauthorized(f"This token was revoked; {CREATE_HINT}")
    if row.expires_at <= now:
        raise Unauthorized(f"Token expired; {CREATE_HINT}")
    return row


def is_active(db: Session, token_id: str, now: float | None = None) -> bool:
    """Whether the token still lets its holder in (web sessions signed in with it ask)."""
    row = db.get(m.ApiToken, token_id)
    when = time.time() if now is None else now
    return row is not None and row.revoked_at is None and row.expires_at > when


def active_ids(db: Session, token_ids: Collection[str], now: float | None = None) -> set[str]:
    """Which of ``token_ids`` still let their holders in: one query for many open streams."""
    if not token_ids:
        return set()
    when = time.time() if now is None else now
    rows = db.scalars(
        select(m.ApiToken.id).where(
            m.ApiToken.id.in_(list(token_ids)),
            m.ApiToken.revoked_at.is_(None),
            m.ApiToken.expires_at > when,
        )
    )
    return set(rows)


def touch(db: Session, row: m.ApiToken, now: float) -> None:
    """Record a use, at most once per ``TOUCH_INTERVAL`` (the condition is in the UPDATE, so
    nodes racing on one token write once); commits, the caller has written nothing yet.
    The row shows the new value as committed: set as a change, the session's next query
    wrote it again (on SQLite beginning a write transaction, the database's write lock held
    to the end of the request)."""
    if touch_id(db, row.id, row.last_used_at, now):
        set_committed_value(row, "last_used_at", now)


def touch_id(
    db: Session | Connection, token_id: str, last_used_at: float | None, now: float
) -> bool:
    """:func:`touch` by the token's id and the ``last_used_at`` read with it; whether it
    wrote."""
    if last_used_at is not None and now - last_used_at < TOUCH_INTERVAL:
        return False
    result = db.execute(
        update(m.ApiToken)
        .where(m.ApiToken.id == token_id)
        .where(
            or_(
                m.ApiToken.last_used_at.is_(None),
                m.ApiToken.last_used_at <= now - TOUCH_INTERVAL,
            )
        )
        .values(last_used_at=now)
        .execution_options(synchronize_session=False)
    )
    db.commit()
    return bool(rowcount(result))


def list_for_user(db: Session, user_id: str) -> list[m.ApiToken]:
    """The user's tokens that are not revoked (expired ones too), newest first."""
    return list(
        db.scalars(
            select(m.ApiToken)
            .where(m.ApiToken.user_id == user_id, m.ApiToken.revoked_at.is_(None))
            .order_by(m.ApiToken.created_at.desc(), m.ApiToken.id)
        )
    )


def revoke(db: Session, user_id: str, token_id: str, now: float | None = None) -> m.ApiToken:
    """Revoke one of the user's tokens (flushed, not committed); 404 for an unknown id, one of
    another user, or one already revoked."""
    row = db.get(m.ApiToken, token_id) if len(token_id) <= 200 else None
    if row is None or row.user_id != user_id or row.revoked_at is not None:
        raise NotFound(f"No token {token_id[:80]!r}: see the token list for the ids")
    row.revoked_at = time.time() if now is None else now
    db.flush()
    return row


class TokenInfo(TypedDict):
    """A token as the API, the CLI and the web page show it (never the JWT itself)."""

    id: str
    name: str
    created_at: float
    last_used_at: float | None
    expires_at: float
    expired: bool
    current: bool


def describe(row: m.ApiToken, *, now: float, current_id: str | None = None) -> TokenInfo:
    """``row`` as shown; ``current``: whether it is the token of the request (``current_id``)."""
    return {
        "id": row.id,
        "name": row.name,
        "created_at": row.created_at,
        "last_used_at": row.last_used_at,
        "expires_at": row.expires_at,
        "expired": row.expires_at <= now,
        "current": row.id == current_id,
    }
