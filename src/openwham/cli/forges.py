"""``wham forge add|list|remove``: the account's connections to GitHub, GitLab and Gitea,
which open pull requests after `wham task pr` pushes a branch. Tokens are read from stdin,
never from the command line (where `ps` and shell history would show them)."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import typer

from .common import print_json
from .context import USAGE, die, handles_errors, open_client, out

if TYPE_CHECKING:
    from openwham.wire.forges import ForgeConnectionInfo

app = typer.Typer(
    help="Forges (GitHub, GitLab, Gitea) that open pull requests.", no_args_is_help=True
)
JsonOption = typer.Option(False, "--json", help="Print machine-readable JSON")


def _line(c: ForgeConnectionInfo) -> str:
    bot = ", bot token" if c.has_bot_token else ""
    who = f"{c.pr_authorship_mode}{bot}"
    return f"{c.id}  {c.kind}  {c.api_base_url}  for {c.repo_url_prefix}  ({who})"


def _tokens(text: str, bot: bool) -> tuple[str, str | None]:
    """The token (first line of stdin) and, with ``--bot-token-stdin``, the bot's (second)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        die("give the token on stdin (e.g. `printf '%s' \"$TOKEN\" | wham forge add …`)", USAGE)
    if bot and len(lines) < 2:
        die("--bot-token-stdin: give the token and the bot's token on two lines of stdin", USAGE)
    return lines[0], (lines[1] if bot else None)


@app.command("add")
@handles_errors
def add(
    ctx: typer.Context,
    kind: str = typer.Argument(..., help="github, gitlab or gitea"),
    api_url: str | None = typer.Option(
        None, "--api-url", help="API base (default: api.github.com, gitlab.com/api/v4)"
    ),
    repo_prefix: str | None = typer.Option(
        None, "--repo-prefix", help="Repository URLs it serves (default: the API's web host)"
    ),
    token_stdin: bool = typer.Option(
        False, "--token-stdin", help="Read the token from stdin (required)"
    ),
    bot_token_stdin: bool = typer.Option(
        False, "--bot-token-stdin", help="Also read a bot token (second line of stdin)"
    ),
    bot: bool = typer.Option(False, "--bot", help="Open pull requests as the bot by default"),
    as_json: bool = JsonOption,
) -> None:
    """Connect a forge: `wham task pr` then opens pull requests there."""
    if not token_stdin:
        die("pass --token-stdin and give the token on stdin", USAGE)
    token, bot_token = _tokens(sys.stdin.read(), bot_token_stdin)
    body: dict[str, object] = {"kind": kind, "token": token}
    if api_url:
        body["api_base_url"] = api_url
    if repo_prefix:
        body["repo_url_prefix"] = repo_prefix
    if bot_token is not None:
        body["bot_token"] = bot_token
    if bot:
        body["pr_authorship_mode"] = "bot"
    with open_client(ctx) as wham:
        made = wham.create_forge_connection(body)
    if as_json:
        print_json(made.model_dump(mode="json"))
    else:
        out.print(f"connected {_line(made)}", markup=False)


@app.command("list")
@handles_errors
def list_(ctx: typer.Context, as_json: bool = JsonOption) -> None:
    """List the account's forge connections (never their tokens)."""
    with open_client(ctx) as wham:
        found = wham.list_forge_connections().items
    if as_json:
        print_json([c.model_dump(mode="json") for c in found])
        return
    if not found:
        out.print("No forge connections. Add one with `wham forge add`.", markup=False)
    for c in found:
        out.print(_line(c), markup=False)


@app.command("remove")
@handles_errors
def remove(ctx: typer.Context, connection_id: str = typer.Argument(..., help="Its id")) -> None:
    """Remove a forge connection (pull requests already opened stay)."""
    with open_client(ctx) as wham:
        wham.delete_forge_connection(connection_id)
    out.print(f"removed {connection_id}", markup=False)
