"""``wham env …``: environments (repositories, setup, variables, secrets) of the server."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from .common import print_json
from .context import USAGE, die, handles_errors, open_client, out

if TYPE_CHECKING:
    from openwham.wire import Environment

app = typer.Typer(help="Environments: where tasks run.", no_args_is_help=True)
JsonOption = typer.Option(False, "--json", help="Print machine-readable JSON")


def _pairs(values: list[str], what: str) -> dict[str, str]:
    pairs: dict[str, str] = {}
    for value in values:
        key, sep, val = value.partition("=")
        if not sep or not key:
            die(f"{what} must look like NAME=VALUE, not {value!r}", USAGE)
        pairs[key] = val
    return pairs


def _script(text: str | None, file: Path | None, what: str) -> str | None:
    if text is not None and file is not None:
        die(f"give --{what} or --{what}-file, not both", USAGE)
    if file is not None:
        try:
            return file.read_text()
        except OSError as e:
            die(f"cannot read {file}: {e.strerror}", USAGE)
    return text


def _lines(env: Environment) -> list[str]:
    pin = " (pinned)" if env.is_pinned else ""
    lines = [f"[bold]{env.label}[/]{pin}  [dim]{env.id}[/]", f"  tasks: {env.task_count}"]
    for key, repo in env.repo_map.items():
        lines.append(f"  repo: {repo.repository_full_name or key} ({repo.clone_url or '-'})")
    if env.env_vars:
        lines.append("  variables: " + ", ".join(sorted(env.env_vars)))
    if env.secrets:
        lines.append("  secrets: " + ", ".join(sorted(env.secrets)))
    return lines


def _dump(env: Environment) -> dict[str, Any]:
    return env.model_dump(mode="json")


def _body(
    label: str | None,
    repos: list[str],
    setup: str | None,
    maintenance: str | None,
    variables: list[str],
    secrets: list[str],
    pin: bool | None,
) -> dict[str, Any]:
    body: dict[str, Any] = {}
    if label is not None:
        body["label"] = label
    if repos:
        body["repos"] = repos
    if setup is not None:
        body["setup"] = setup
    if maintenance is not None:
        body["maintenance_setup"] = maintenance
    if variables:
        body["env_vars"] = _pairs(variables, "--var")
    if secrets:
        body["secrets"] = _pairs(secrets, "--secret")
    if pin is not None:
        body["is_pinned"] = pin
    return body


@app.command("list")
@handles_errors
def list_(ctx: typer.Context, as_json: bool = JsonOption) -> None:
    """List environments."""
    with open_client(ctx) as wham:
        envs = wham.list_environments()
    if as_json:
        print_json([_dump(e) for e in envs])
        return
    if not envs:
        out.print("No environments. Create one with `wham env create`.", markup=False)
    for env in envs:
        pin = " (pinned)" if env.is_pinned else ""
        out.print(f"{env.id}  {env.label}{pin}  {env.task_count} task(s)", markup=False)


@app.command("show")
@handles_errors
def show(
    ctx: typer.Context,
    env: str = typer.Argument(..., help="Label or id"),
    as_json: bool = JsonOption,
) -> None:
    """Show one environment (secret values are never shown)."""
    with open_client(ctx) as wham:
        found = wham.get_environment(wham.resolve_environment(env, repo=None).id)
    if as_json:
        print_json(_dump(found))
    else:
        for line in _lines(found):
            out.print(line)


@app.command("resolve")
@handles_errors
def resolve(
    ctx: typer.Context,
    label: str | None = typer.Option(None, "--label", help="Prefer this label or id"),
    repo: Path = typer.Option(Path("."), "--repo", help="The git checkout (default: here)"),
    as_json: bool = JsonOption,
) -> None:
    """Which environment this checkout's tasks would use (the Codex CLI's order)."""
    with open_client(ctx) as wham:
        env = wham.resolve_environment(label, repo=repo)
    if as_json:
        print_json(_dump(env))
    else:
        out.print(f"{env.id}  {env.label}", markup=False)


VarOption = typer.Option([], "--var", help="NAME=VALUE for setup and agent (repeatable)")
SecretOption = typer.Option([], "--secret", help="NAME=VALUE for setup only (repeatable)")


@app.command("create")
@handles_errors
def create(
    ctx: typer.Context,
    label: str = typer.Option(..., "--label", help="Name shown in lists and used by --env"),
    repo: list[str] = typer.Option(..., "--repo", help="Git URL or local path (repeatable)"),
    setup: str | None = typer.Option(None, "--setup", help="Setup script text"),
    setup_file: Path | None = typer.Option(None, "--setup-file", help="Setup script file"),
    maintenance: str | None = typer.Option(None, "--maintenance", help="Maintenance script"),
    var: list[str] = VarOption,
    secret: list[str] = SecretOption,
    pin: bool = typer.Option(False, "--pin", help="Pin it (preferred when resolving)"),
    as_json: bool = JsonOption,
) -> None:
    """Create an environment."""
    script = _script(setup, setup_file, "setup")
    body = _body(label, repo, script, maintenance, var, secret, pin)
    with open_client(ctx) as wham:
        env = wham.create_environment(body)
    if as_json:
        print_json(_dump(env))
    else:
        out.print(f"created {env.id}  {env.label}", markup=False)


@app.command("update")
@handles_errors
def update(
    ctx: typer.Context,
    env: str = typer.Argument(..., help="Label or id"),
    label: str | None = typer.Option(None, "--label", help="New label"),
    repo: list[str] = typer.Option([], "--repo", help="Replace the repositories (repeatable)"),
    setup: str | None = typer.Option(None, "--setup", help="Setup script text"),
    setup_file: Path | None = typer.Option(None, "--setup-file", help="Setup script file"),
    maintenance: str | None = typer.Option(None, "--maintenance", help="Maintenance script"),
    var: list[str] = typer.Option([], "--var", help="Replace the variables: NAME=VALUE"),
    secret: list[str] = typer.Option([], "--secret", help="Set a secret: NAME=VALUE"),
    unset_secret: list[str] = typer.Option([], "--unset-secret", help="Remove a secret"),
    pin: bool | None = typer.Option(None, "--pin/--unpin", help="Pin or unpin"),
    as_json: bool = JsonOption,
) -> None:
    """Change an environment; only the options given change."""
    script = _script(setup, setup_file, "setup")
    body = _body(label, repo, script, maintenance, var, secret, pin)
    if unset_secret:
        body.setdefault("secrets", {}).update(dict.fromkeys(unset_secret))
    if not body:
        die("nothing to change: give at least one option", USAGE)
    with open_client(ctx) as wham:
        env_id = wham.resolve_environment(env, repo=None).id
        changed = wham.update_environment(env_id, body)
    if as_json:
        print_json(_dump(changed))
    else:
        out.print(f"updated {changed.id}  {changed.label}", markup=False)


@app.command("delete")
@handles_errors
def delete(
    ctx: typer.Context,
    env: str = typer.Argument(..., help="Label or id"),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask"),
    as_json: bool = JsonOption,
) -> None:
    """Delete an environment (its tasks stay)."""
    with open_client(ctx) as wham:
        found = wham.resolve_environment(env, repo=None)
        if not yes and not typer.confirm(f"Delete environment {found.label} ({found.id})?"):
            raise typer.Exit(1)
        wham.delete_environment(found.id)
    if as_json:
        print_json({"id": found.id, "deleted": True})
    else:
        out.print(f"deleted {found.id}  {found.label}", markup=False)
