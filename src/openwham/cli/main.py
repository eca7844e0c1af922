"""``wham``: noun-verb commands; human output by default, ``--json`` for scripts."""

from __future__ import annotations

import typer

from . import codex_auth, serve, tokens

app = typer.Typer(
    name="wham",
    help="openwham: a self-hostable Codex cloud, and a client for it and for chatgpt.com.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.command("serve")(serve.serve)
app.add_typer(tokens.app, name="token")
app.command("codex-auth")(codex_auth.codex_auth)


def main() -> None:
    app()
