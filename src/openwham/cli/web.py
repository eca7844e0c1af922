"""``wham web set-password`` / ``clear-password``: the owner's password for the web UI.

The browser can also sign in with an API token (``wham token create``); a password is
easier to type on a phone. Setting or clearing it signs every browser out.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from .common import DataDirOption, fail, print_json, settings_for

app = typer.Typer(help="The web UI served by `wham serve`.", no_args_is_help=True)


def _store(data_dir: Path | None, password: str | None) -> None:
    from openwham.service.accounts import ensure_owner_committed
    from openwham.service.errors import ServiceError
    from openwham.service.webauth import set_owner_password
    from openwham.store.db import Database

    settings = settings_for(data_dir)
    db = Database(settings.sqlalchemy_url)
    try:
        db.migrate()
        ensure_owner_committed(db, plan_type=settings.plan_type)
        with db.session() as session:
            set_owner_password(session, password)
    except ServiceError as exc:
        fail(exc.detail, 2)
    finally:
        db.dispose()


@app.command("set-password")
def set_password(
    data_dir: Path | None = DataDirOption,
    password_stdin: bool = typer.Option(
        False, "--password-stdin", help="Read the password from standard input (one line)"
    ),
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON"),
) -> None:
    """Set the owner's web UI password (asks twice on a terminal); signs all browsers out."""
    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        if not sys.stdin.isatty():
            fail("no terminal to ask on: pipe the password in with --password-stdin", 2)
        password = typer.prompt("New password", hide_input=True, confirmation_prompt=True)
    _store(data_dir, password)
    if as_json:
        print_json({"password_set": True})
    else:
        typer.echo("Password set. Sign in at the server's address with it.")


@app.command("clear-password")
def clear_password(
    data_dir: Path | None = DataDirOption,
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON"),
) -> None:
    """Remove the owner's web UI password (API tokens still sign in); signs all browsers out."""
    _store(data_dir, None)
    if as_json:
        print_json({"password_set": False})
    else:
        typer.echo("Password removed.")
