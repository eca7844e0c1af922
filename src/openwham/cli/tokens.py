"""``wham token create|list|revoke``: the owner's API tokens, straight in the server's database
(run them where the server's data directory is; remote users manage their own tokens through
the API, the SDK or the web UI's Tokens page)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import typer

from .common import DataDirOption, fail, print_json, settings_for

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from openwham.service.tokens import TokenInfo

app = typer.Typer(help="API tokens for this server.", no_args_is_help=True)

T = TypeVar("T")


@contextmanager
def _owner_session(data_dir: Path | None) -> Iterator[tuple[Session, str, int]]:
    """A committed-on-success session on the data directory's database, the owner's user id
    and the server's default token lifetime."""
    from openwham.service.accounts import ensure_owner_committed
    from openwham.store.db import Database

    settings = settings_for(data_dir)
    db = Database(settings.sqlalchemy_url)
    try:
        db.migrate()
        _, user = ensure_owner_committed(db, plan_type=settings.plan_type)
        with db.session() as session:
            yield session, user.id, settings.token_ttl_seconds
    finally:
        db.dispose()


def _service(fn: Callable[[], T]) -> T:
    """Runs ``fn``; a bad value (``ServiceError``) is one error line, exit 2 (usage) or 1."""
    from openwham.service.errors import BadRequest, ServiceError

    try:
        return fn()
    except ServiceError as exc:
        fail(exc.detail, 2 if isinstance(exc, BadRequest) else 1)


def _public(info: TokenInfo) -> dict[str, object]:
    """A token's fields without ``current`` (which means nothing outside a request)."""
    return {k: v for k, v in info.items() if k != "current"}


def _when(ts: float | None) -> str:
    if ts is None:
        return "never"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M UTC")


@app.command("create")
def create(
    data_dir: Path | None = DataDirOption,
    as_json: bool = typer.Option(False, "--json", help="Print JSON (with the token's id)"),
    name: str | None = typer.Option(
        None, "--name", help="What the token is for, shown by `wham token list`"
    ),
    expires_in: float | None = typer.Option(
        None,
        "--expires-in",
        metavar="DAYS",
        help="Lifetime in days (default: WHAM_TOKEN_TTL_SECONDS, 30 days)",
    ),
    ttl_days: float | None = typer.Option(None, "--ttl-days", hidden=True),
) -> None:
    """Print a new API token for the owner account (use it as Authorization: Bearer)."""
    from openwham.service import tokens
    from openwham.service.accounts import create_api_token, ensure_owner
    from openwham.service.keys import KeysMismatch, check_fingerprint, secrets_key, signing_key

    days = expires_in if expires_in is not None else ttl_days
    settings = settings_for(data_dir)
    key = signing_key(settings)
    now = time.time()
    with _owner_session(data_dir) as (session, _, default_ttl):
        try:  # a token signed with other keys than the servers' would be refused by them
            check_fingerprint(session, settings, key, secrets_key(settings))
        except KeysMismatch as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1) from exc
        ttl = _service(lambda: tokens.lifetime_seconds(days, default_ttl))
        account, user = ensure_owner(session)
        row, token = _service(
            lambda: create_api_token(
                session, key, user, account, ttl_seconds=ttl, name=name, now=now
            )
        )
        info = {
            "token": token,
            **_public(tokens.describe(row, now=now)),
            "account_id": account.id,
            "user_id": user.id,
            "email": user.email,
        }
    if as_json:
        print_json(info)
    else:
        typer.echo(token)


@app.command("list")
def list_tokens(
    data_dir: Path | None = DataDirOption,
    as_json: bool = typer.Option(False, "--json", help="Print JSON"),
) -> None:
    """The owner's tokens that are not revoked: id, name, created, last used, expiry."""
    from openwham.service import tokens

    now = time.time()
    with _owner_session(data_dir) as (session, user_id, _):
        rows = [tokens.describe(r, now=now) for r in tokens.list_for_user(session, user_id)]
    if as_json:
        print_json([_public(row) for row in rows])
        return
    if not rows:
        typer.echo("no tokens (create one with `wham token create`)")
        return
    typer.echo(f"{'ID':<36}  {'NAME':<20}  {'CREATED':<20}  {'LAST USED':<20}  EXPIRES")
    for row in rows:
        expires = _when(row["expires_at"]) + (" (expired)" if row["expired"] else "")
        typer.echo(
            f"{row['id']:<36}  {row['name'][:20]:<20}  {_when(row['created_at']):<20}  "
            f"{_when(row['last_used_at']):<20}  {expires}"
        )


@app.command("revoke")
def revoke(
    token_id: str = typer.Argument(..., metavar="ID", help="The token's id (`wham token list`)"),
    data_dir: Path | None = DataDirOption,
    as_json: bool = typer.Option(False, "--json", help="Print JSON"),
) -> None:
    """Revoke one of the owner's tokens: every server on this database refuses it at once."""
    from openwham.service import tokens

    now = time.time()
    with _owner_session(data_dir) as (session, user_id, _):
        row = _service(lambda: tokens.revoke(session, user_id, token_id, now=now))
        info = tokens.describe(row, now=now)
    if as_json:
        print_json({**_public(info), "revoked_at": now})
    else:
        typer.echo(f"revoked {info['id']} ({info['name']})")
