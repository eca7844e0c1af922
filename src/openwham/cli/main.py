"""``wham``: noun-verb commands; human output by default, ``--json`` for scripts."""

from __future__ import annotations

import typer

from . import account, codex_auth, envs, forges, gitcreds, serve, tasks, tokens, web, worker

app = typer.Typer(
    name="wham",
    help="openwham: a self-hostable Codex cloud, and a client for it and for chatgpt.com.\n\n"
    "Client commands talk to the profile chosen with --profile (or $WHAM_PROFILE, or "
    "$WHAM_URL + $WHAM_TOKEN, or the default profile, else chatgpt.com).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,
)


def _print_version(value: bool) -> None:
    """``--version``: print the installed package's version and stop."""
    if value:
        from openwham import __version__

        typer.echo(f"wham {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    ctx: typer.Context,
    profile: str | None = typer.Option(
        None, "--profile", "-p", help="Profile to use (see `wham status`)"
    ),
    version: bool = typer.Option(
        False,
        "--version",
        help="Print the version and exit",
        callback=_print_version,
        is_eager=True,
    ),
) -> None:
    """Global options."""
    ctx.obj = {"profile": profile}


app.add_typer(tasks.app, name="task")
app.add_typer(envs.app, name="env")
app.add_typer(forges.app, name="forge")
app.add_typer(gitcreds.app, name="git-credential")
app.command("usage")(account.usage)
app.command("login")(account.login)
app.command("logout")(account.logout)
app.command("status")(account.status)
app.command("serve")(serve.serve)
app.command("worker")(worker.worker)
app.add_typer(tokens.app, name="token")
app.command("codex-auth")(codex_auth.codex_auth)
app.add_typer(web.app, name="web")


def main() -> None:
    app()
