"""Accounts, users and API tokens (JWTs carrying the claims the Codex CLI reads; the rows that
make them listable and revocable are ``service.tokens``)."""

from __future__ import annotations

import functools
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jwt
from sqlalchemy import CTE, Connection, and_, bindparam, select, true
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from openwham import ids
from openwham.store import models as m
from openwham.store.db import Database

from . import tokens
from .errors import Forbidden, Unauthorized

AUTH_CLAIM = "https://api.openai.com/auth"
PROFILE_CLAIM = "https://api.openai.com/profile"
ISSUER = "openwham"
OWNER_KEY = "owner_user_id"


@dataclass(frozen=True)
class Principal:
    """The caller of a request: a user acting in one of their accounts."""

    user: m.User
    account: m.Account
    token_id: str | None = None  # the API token the request came with (None: web password)

    @property
    def user_id(self) -> str:
        return self.user.id

    @property
    def account_id(self) -> str:
        return self.account.id


def create_account(
    db: Session, *, name: str, email: str, user_name: str | None = None, plan_type: str = "pro"
) -> tuple[m.Account, m.User]:
    """A new account with one owner user (used for the server owner and by tests)."""
    now = time.time()
    account = m.Account(id=ids.new_account_id(), name=name, plan_type=plan_type, created_at=now)
    user = db.scalar(select(m.User).where(m.User.email == email))
    if user is None:
        user = m.User(
            id=ids.new_user_id(), email=email, name=user_name or email, created_at=now, settings={}
        )
        db.add(user)
    db.add(account)
    db.flush()
    db.add(m.Membership(account_id=account.id, user_id=user.id, role="owner", created_at=now))
    db.flush()
    return account, user


def ensure_owner(db: Session, plan_type: str = "pro") -> tuple[m.Account, m.User]:
    """Create the owner account and user on the first start; return them afterwards."""
    state = db.get(m.ServerState, OWNER_KEY)
    if state is not None:
        user = db.get(m.User, state.value)
        if user is not None:
            account = first_account(db, user.id)
            if account is not None:
                return account, user
    account, user = create_account(
        db, name="Personal", email="owner@openwham.local", user_name="Owner", plan_type=plan_type
    )
    if state is None:
        db.add(m.ServerState(key=OWNER_KEY, value=user.id))
    else:
        state.value = user.id
    db.flush()
    return account, user


def ensure_owner_committed(db: Database, plan_type: str = "pro") -> tuple[m.Account, m.User]:
    """``ensure_owner`` in its own transaction, safe when two processes start at once.

    The loser of a first-start race hits a unique key (owner email or state row), rolls back
    and then finds the winner's owner.
    """
    for _ in range(3):
        try:
            with db.session() as session:
                return ensure_owner(session, plan_type=plan_type)
        except IntegrityError:
            continue
    raise RuntimeError("could not create or find the owner account")


def first_account(db: Session, user_id: str) -> m.Account | None:
    return db.scalar(
        select(m.Account)
        .join(m.Membership, m.Membership.account_id == m.Account.id)
        .where(m.Membership.user_id == user_id)
        .order_by(m.Membership.created_at, m.Account.id)
        .limit(1)
    )


def user_accounts(db: Session, user_id: str) -> list[m.Account]:
    return list(
        db.scalars(
            select(m.Account)
            .join(m.Membership, m.Membership.account_id == m.Account.id)
            .where(m.Membership.user_id == user_id)
            .order_by(m.Membership.created_at, m.Account.id)
        )
    )


def issue_token(
    key: bytes,
    user: m.User,
    account: m.Account,
    *,
    ttl_seconds: int,
    now: float | None = None,
    jti: str | None = None,
) -> str:
    """An HS256 JWT with ``exp`` and the ``https://api.openai.com/auth`` claim set.

    Only the signed claims: the server accepts it only with an ``api_tokens`` row whose id is
    ``jti`` (``create_api_token`` makes both).
    """
    issued = int(now if now is not None else time.time())
    claims: dict[str, Any] = {
        "iss": ISSUER,
        "sub": user.id,
        "iat": issued,
        "exp": issued + ttl_seconds,
        "jti": jti or uuid.uuid4().hex,
        "email": user.email,
        AUTH_CLAIM: {
            "chatgpt_account_id": account.id,
            "chatgpt_user_id": user.id,
            "user_id": user.id,
            "chatgpt_plan_type": account.plan_type,
        },
        PROFILE_CLAIM: {"email": user.email, "email_verified": True},
    }
    return jwt.encode(claims, key, algorithm="HS256")


def create_api_token(
    db: Session,
    key: bytes,
    user: m.User,
    account: m.Account,
    *,
    ttl_seconds: int,
    name: str | None = None,
    now: float | None = None,
) -> tuple[m.ApiToken, str]:
    """A new API token: its row (flushed, not committed) and the JWT naming it."""
    when = time.time() if now is None else now
    row = tokens.record(
        db, user_id=user.id, account_id=account.id, name=name, ttl_seconds=ttl_seconds, now=when
    )
    return row, issue_token(key, user, account, ttl_seconds=ttl_seconds, now=when, jti=row.id)


def _principal_query(membership: Any, *columns: Any) -> Any:
    """The token's row, its user and an account (``columns`` of them), built once: a
    statement built per request cost as much as running it (its cache key is memoised on
    the statement object)."""
    return (
        select(*columns)
        .join_from(m.ApiToken, m.User, m.User.id == m.ApiToken.user_id)
        .outerjoin(m.Membership, and_(m.Membership.user_id == m.User.id, membership))
        .outerjoin(m.Account, m.Account.id == m.Membership.account_id)
        .where(m.ApiToken.id == bindparam("jti"), m.User.id == bindparam("user_id"))
        .order_by(m.Membership.created_at, m.Account.id)
        .limit(1)
    )


def _columns(model: Any, prefix: str) -> list[Any]:
    return [c.label(f"{prefix}{c.key}") for c in model.__table__.c]


_FOR_ACCOUNT = m.Membership.account_id == bindparam("account_id")
_ENTITIES = (m.ApiToken, m.User, m.Account)
# the same as Core columns, for the hot reads (no ORM objects to load or to roll back)
_TOKEN = m.ApiToken.__table__.c
_READ_COLUMNS = (
    *(_TOKEN.id, _TOKEN.user_id, _TOKEN.revoked_at, _TOKEN.expires_at, _TOKEN.last_used_at),
    *_columns(m.User, "user__"),
    *_columns(m.Account, "account__"),
)
_PRINCIPAL = _principal_query(true(), *_ENTITIES)
_PRINCIPAL_FOR_ACCOUNT = _principal_query(_FOR_ACCOUNT, *_ENTITIES)
_READ_PRINCIPAL = _principal_query(true(), *_READ_COLUMNS)
_READ_PRINCIPAL_FOR_ACCOUNT = _principal_query(_FOR_ACCOUNT, *_READ_COLUMNS)


@functools.lru_cache(maxsize=1024)
def _verified_claims(token: str, key: bytes) -> dict[str, Any]:
    """The claims of a token whose signature checked out, kept per token: verifying it is a
    pure function of the token and the key. Expiry is checked by the caller on every use, and
    revocation by the token's row (``authenticate``). Failures are not kept."""
    try:
        claims: dict[str, Any] = jwt.decode(
            token,
            key,
            algorithms=["HS256"],
            issuer=ISSUER,
            options={"require": ["exp", "sub", "iss"]},
        )
    except jwt.ExpiredSignatureError as exc:
        raise Unauthorized("Token expired; create a new one with `wham token create`") from exc
    except jwt.PyJWTError as exc:
        raise Unauthorized("Invalid bearer token") from exc
    return claims


def authenticate(db: Session, key: bytes, token: str, account_header: str | None) -> Principal:
    """Check a bearer token (signature, expiry, and its row: not revoked) and pick the account
    (header, else the user's first account). Records the token's use (``tokens.touch``)."""
    now = time.time()
    user_id, jti = _claims(key, token, now)
    # One query on every request: the token's row, its user and the account (the header's,
    # if the user is a member; else the user's first), instead of one query for each.
    found = (
        db.execute(
            _PRINCIPAL_FOR_ACCOUNT if account_header else _PRINCIPAL,
            {"jti": jti, "user_id": user_id, "account_id": account_header},
        ).first()
        if jti
        else None
    )
    if found is None:
        raise _no_row(db, user_id)
    row, user, account = found
    tokens.check_row(row, user.id, now)
    if account is None:
        raise _no_account(account_header)
    tokens.touch(db, row, now)
    return Principal(user=user, account=account, token_id=row.id)


def authenticate_for_read(
    db: Session, key: bytes, token: str, account_header: str | None
) -> Principal:
    """``authenticate`` for the hot reads (``server.deps.Reader``): the same checks and
    answers, the same one query on every request (so a revocation holds at once on every
    node), but read as Core columns; the principal's user and account are detached copies
    of their rows, for reads that use the ids (loading ORM objects, and rolling a session
    holding them back, cost about a fifth of a cached task details request)."""
    now = time.time()
    user_id, jti = _claims(key, token, now)
    found = (
        db.connection()
        .execute(
            _READ_PRINCIPAL_FOR_ACCOUNT if account_header else _READ_PRINCIPAL,
            {"jti": jti, "user_id": user_id, "account_id": account_header},
        )
        .first()
        if jti
        else None
    )
    if found is None:
        raise _no_row(db, user_id)
    values = found._mapping
    tokens.check_row(found, str(values["user_id"]), now)
    if values["account__id"] is None:
        raise _no_account(account_header)
    user = m.User(**{c.key: values[f"user__{c.key}"] for c in m.User.__table__.c})
    account = m.Account(**{c.key: values[f"account__{c.key}"] for c in m.Account.__table__.c})
    tokens.touch_id(db, found.id, found.last_used_at, now)
    return Principal(user=user, account=account, token_id=found.id)


@dataclass(frozen=True)
class Claims:
    """A bearer token whose signature and expiry checked out, for a read that looks its row
    up in its own statement (``principal_cte``): the statement's parameters and when."""

    user_id: str
    jti: str
    account_header: str | None
    now: float

    @property
    def params(self) -> dict[str, Any]:
        return {"jti": self.jti, "user_id": self.user_id, "account_id": self.account_header}


class Recheck(Exception):
    """The token's row (or its user, or the account) did not let a one-statement read
    through: the caller answers with the full check (``authenticate_for_read``), whose
    refusal is the exact answer."""


def read_claims(key: bytes, token: str, account_header: str | None) -> Claims | None:
    """The token's verified claims (401 as ``authenticate`` for a bad or expired one), or
    None for a token without a ``jti`` (the full check refuses it)."""
    now = time.time()
    user_id, jti = _claims(key, token, now)
    return None if jti is None else Claims(user_id, jti, account_header, now)


# A one-statement read's first columns: the token's row and the account's id (the reads
# that use it need no more of the principal; the full check builds it).
_CTE_COLUMNS = (*_READ_COLUMNS[:5], m.Account.id.label("account__id"))
PRINCIPAL_WIDTH = len(_CTE_COLUMNS)
_CTE_PRINCIPAL = _principal_query(true(), *_CTE_COLUMNS)
_CTE_PRINCIPAL_FOR_ACCOUNT = _principal_query(_FOR_ACCOUNT, *_CTE_COLUMNS)


def principal_cte(for_account: bool) -> CTE:
    """The token's row and the account's id (``authenticate_for_read``'s one query: the
    header's account if the user is a member, else the user's first) as a CTE named
    ``principal``: a read joins it to its own statement, so the token's row is still read
    on every request, in the same round trip (and snapshot) as the data."""
    query = _CTE_PRINCIPAL_FOR_ACCOUNT if for_account else _CTE_PRINCIPAL
    cte: CTE = query.cte("principal")
    return cte


class _TokenRow:
    __slots__ = ("expires_at", "id", "last_used_at", "revoked_at", "user_id")

    def __init__(self, values: Sequence[Any]) -> None:
        self.id, self.user_id, self.revoked_at, self.expires_at, self.last_used_at = values[:5]


def account_of(conn: Connection, values: Sequence[Any], claims: Claims) -> str:
    """The caller's account id from a one-statement read's first ``PRINCIPAL_WIDTH`` values
    (``principal_cte``'s columns), read in this request: ``Recheck`` unless the token's row,
    its user and an account were found and the token is neither revoked nor expired.
    Records the token's use as ``authenticate`` does."""
    token = _TokenRow(values)
    account_id = values[PRINCIPAL_WIDTH - 1]
    if token.id is None or account_id is None:
        raise Recheck
    try:
        tokens.check_row(token, claims.user_id, claims.now)
    except Unauthorized as exc:
        raise Recheck from exc
    tokens.touch_id(conn, token.id, token.last_used_at, claims.now)
    return str(account_id)


def _claims(key: bytes, token: str, now: float) -> tuple[str, str | None]:
    """The verified token's user id and ``jti`` (``None`` if it has none); 401 if expired."""
    claims = _verified_claims(token, key)
    if not isinstance(claims.get("exp"), int | float) or claims["exp"] <= now:
        raise Unauthorized("Token expired; create a new one with `wham token create`")
    jti = claims.get("jti")
    return str(claims["sub"]), jti if isinstance(jti, str) and jti else None


def _no_row(db: Session, user_id: str) -> Unauthorized:
    """The 401 when the token's row and user were not found together."""
    if db.get(m.User, user_id) is None:
        return Unauthorized("Invalid bearer token")
    return tokens.unknown()


def _no_account(account_header: str | None) -> Forbidden:
    if account_header:
        # Same answer whether the account exists or not: no hint about other accounts.
        return Forbidden("ChatGPT-Account-Id is not an account of this user")
    return Forbidden("This user belongs to no account")
