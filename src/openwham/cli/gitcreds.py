"""``wham git-credential add|list|remove``: the account's credentials for private git
remotes. Secrets come from stdin and keys from a file, never from the command line (where
`ps` and shell history would show them)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from .common import print_json
from .context import USAGE, die, handles_errors, open_client, out

if TYPE_CHECKING:
    from openwham.wire.gitcreds import GitCredentialInfo

app = typer.Typer(
    help="Credentials for private git remotes (HTTPS tokens, SSH deploy keys).",
    no_args_is_help=True,
)
JsonOption = typer.Option(False, "--json", help="Print machine-readable JSON")


def _line(c: GitCredentialInfo) -> str:
    who = f" as {c.username}" if c.username else ""
    return f"{c.id}  {c.kind}{who}  for {c.url_prefix}"


@app.command("add")
@handles_errors
def add(
    ctx: typer.Context,
    url_prefix: str = typer.Argument(..., help="Repository URLs it serves, e.g. https://host/org/"),
    username: str | None = typer.Option(None, "--username", help="HTTPS user name"),
    secret_stdin: bool = typer.Option(
        False, "--secret-stdin", help="Read the HTTPS token or password from stdin"
    ),
    ssh_key: Path | None = typer.Option(None, "--ssh-key", help="SSH private key file"),
    known_hosts: str | None = typer.Option(
        None, "--known-hosts", help="The server's known_hosts line(s) (SSH)"
    ),
    as_json: bool = JsonOption,
) -> None:
    """Add a credential: HTTPS (--username U --secret-stdin) or SSH (--ssh-key, --known-hosts)."""
    body: dict[str, object] = {"url_prefix": url_prefix}
    if ssh_key is not None:
        if secret_stdin or username:
            die("give either --username/--secret-stdin (HTTPS) or --ssh-key (SSH)", USAGE)
        if not known_hosts:
            die("--ssh-key needs --known-hosts (e.g. from ssh-keyscan HOST)", USAGE)
        try:
            body["ssh_private_key"] = ssh_key.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            die(f"cannot read {ssh_key}: {exc}", USAGE)
        body["known_hosts"] = known_hosts
    else:
        if not username or not secret_stdin:
            die("pass --username U --secret-stdin (token on stdin), or --ssh-key", USAGE)
        lines = [x.strip() for x in sys.stdin.read().splitlines() if x.strip()]
        if not lines:
            die("give the secret on stdin (e.g. `printf '%s' \"$TOKEN\" | wham …`)", USAGE)
        body["username"], body["secret"] = username, lines[0]
    with open_client(ctx) as wham:
        made = wham.create_git_credential(body)
    if as_json:
        print_json(made.model_dump(mode="json"))
    else:
        out.print(f"added {_line(made)}", markup=False)


@app.command("list")
@handles_errors
def list_(ctx: typer.Context, as_json: bool = JsonOption) -> None:
    """List the account's git credentials (never their secrets or keys)."""
    with open_client(ctx) as wham:
        found = wham.list_git_credentials().items
    if as_json:
        print_json([c.model_dump(mode="json") for c in found])
        return
    if not found:
        out.print("No git credentials. Add one with `wham git-credential add`.", markup=False)
    for c in found:
        out.print(_line(c), markup=False)


@app.command("remove")
@handles_errors
def remove(ctx: typer.Context, credential_id: str = typer.Argument(..., help="Its id")) -> None:
    """Remove a git credential."""
    with open_client(ctx) as wham:
        wham.delete_git_credential(credential_id)
    out.print(f"removed {credential_id}", markup=False)
