"""``wham token create``: an API token (JWT) for the owner account."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from .common import DataDirOption, print_json, settings_for

app = typer.Typer(help="API tokens for this server.", no_args_is_help=True)


@app.command("create")
def create(
    data_dir: Path | None = DataDirOption,
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of the bare token"),
    ttl_days: float | None = typer.Option(
        None, "--ttl-days", help="Lifetime in days (default: WHAM_TOKEN_TTL_SECONDS, 30 days)"
    ),
) -> None:
    """Print a new API token for the owner account (use it as Authorization: Bearer)."""
    from openwham.service.accounts import ensure_owner_committed, issue_token
    from openwham.service.keys import signing_key
    from openwham.store.db import Database

    settings = settings_for(data_dir)
    ttl = int(ttl_days * 86400) if ttl_days is not None else settings.token_ttl_seconds
    if ttl <= 0:
        typer.echo("error: --ttl-days must be positive", err=True)
        raise typer.Exit(2)
    db = Database(settings.sqlalchemy_url)
    try:
        db.migrate()
        account, user = ensure_owner_committed(db, plan_type=settings.plan_type)
        now = time.time()
        token = issue_token(signing_key(settings), user, account, ttl_seconds=ttl, now=now)
        account_id, user_id, email = account.id, user.id, user.email
    finally:
        db.dispose()
    if as_json:
        print_json(
            {
                "token": token,
                "account_id": account_id,
                "user_id": user_id,
                "email": email,
                "expires_at": int(now) + ttl,
            }
        )
    else:
        typer.echo(token)
