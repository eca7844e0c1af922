"""``wham login``, ``logout``, ``status`` and ``usage``: who you are where, and what is left."""

from __future__ import annotations

import time
import webbrowser
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from .common import print_json
from .context import (
    FAILED,
    USAGE,
    die,
    handles_errors,
    open_client,
    out,
    profile_name,
    selected_profile,
)

if TYPE_CHECKING:  # the SDK loads when a command runs
    from openwham.client.profiles import Profile

JsonOption = typer.Option(False, "--json", help="Print machine-readable JSON")


@handles_errors
def login(
    ctx: typer.Context,
    server: str | None = typer.Option(
        None, "--server", help="openwham base URL (log in to a server instead of chatgpt.com)"
    ),
    token: str | None = typer.Option(None, "--token", help="API token from `wham token create`"),
    name: str | None = typer.Option(
        None, "--name", help="Profile name to save (default: --profile, or 'default')"
    ),
    device: bool = typer.Option(False, "--device", help="Device-code flow (no local browser)"),
    issuer: str | None = typer.Option(
        None, "--issuer", envvar="WHAM_AUTH_ISSUER", help="OAuth issuer (default auth.openai.com)"
    ),
    codex_home: Path | None = typer.Option(
        None, "--codex-home", help="Where auth.json goes (default $CODEX_HOME or ~/.codex)"
    ),
    port: int = typer.Option(1455, "--port", help="Local callback port of the browser flow"),
    no_browser: bool = typer.Option(False, "--no-browser", help="Print the URL, do not open it"),
    as_json: bool = JsonOption,
) -> None:
    """Sign in: to chatgpt.com (browser PKCE or --device), or save an openwham server token."""
    from openwham.client import WhamClient
    from openwham.client.profiles import CHATGPT, Profile, ProfileStore, client_kwargs
    from openwham.client.urls import CHATGPT_BASE_URL, normalize_base_url
    from openwham.codexauth import jwt_claims

    store = ProfileStore()
    if server is not None:
        if token is None:
            die("--server needs --token (create one with `wham token create`)", USAGE)
        try:
            url = normalize_base_url(server)
        except ValueError as e:
            die(str(e), USAGE)
        profile = Profile(name or profile_name(ctx) or "default", "openwham", url, token=token)
        with WhamClient(**client_kwargs(profile)) as wham:
            wham.usage()  # proves the URL and the token before saving them
        store.put(profile, make_default=True)
        who = jwt_claims(token).get("email") or "owner"
        if as_json:
            print_json({"profile": profile.name, "kind": "openwham", "url": url, "email": who})
        else:
            out.print(f"logged in to {url} as {who} (profile {profile.name})", markup=False)
        return
    from openwham.client import login as flows

    home = codex_home or store.select(CHATGPT).auth_home()
    kwargs: dict[str, Any] = {}
    if issuer:
        kwargs["issuer"] = issuer
    if device:

        def show(url: str, code: str) -> None:
            out.print(f"Open {url} and enter the code: [bold]{code}[/]")

        result = flows.login_device(home, on_code=show, **kwargs)
    else:

        def open_browser(url: str) -> None:
            out.print(f"Sign in at: {url}", markup=False)
            if not no_browser:
                webbrowser.open(url)

        result = flows.login_browser(home, port=port, open_browser=open_browser, **kwargs)
    if codex_home is not None:
        store.put(Profile(name or CHATGPT, "chatgpt", CHATGPT_BASE_URL, codex_home=str(codex_home)))
    if as_json:
        print_json(
            {
                "profile": name or CHATGPT,
                "kind": "chatgpt",
                "auth_file": str(result.path),
                "email": result.email,
                "account_id": result.account_id,
                "plan_type": result.plan_type,
            }
        )
    else:
        out.print(f"logged in to chatgpt.com as {result.email or result.account_id}", markup=False)


def _revoke_on_server(profile: Profile) -> tuple[str, str | None]:
    """Revoke an openwham profile's token on its server: (``revoked``, ``already invalid``
    (the server answers 401: revoked, expired or unknown) or ``still valid``; why not)."""
    from openwham.client import AuthError, TransportError, WhamClient, WhamError
    from openwham.client.profiles import client_kwargs
    from openwham.codexauth import jwt_claims

    token_id = jwt_claims(profile.token or "").get("jti")
    try:
        with WhamClient(**client_kwargs(profile)) as wham:
            wham.revoke_token(str(token_id or "-"))
    except AuthError:
        return "already invalid", None
    except TransportError as e:
        return "still valid", str(e)  # "cannot reach URL: why"
    except WhamError as e:
        return "still valid", f"{profile.url} did not revoke it: {e}"
    return "revoked", None


def _still_valid(problem: str, claims: dict[str, Any]) -> str:
    """The error line of a logout whose token the server did not revoke: how long it stays
    valid and how to revoke it there."""
    exp = claims.get("exp")
    until = (
        time.strftime(" until %Y-%m-%d %H:%M UTC", time.gmtime(exp))
        if isinstance(exp, int | float)
        else ""
    )
    return (
        f"{problem}; the token is still valid{until}: revoke it on the server "
        f"(`wham token revoke {claims.get('jti') or 'ID'}` or the web UI's Tokens page)"
    )


@handles_errors
def logout(ctx: typer.Context, as_json: bool = JsonOption) -> None:
    """Sign out of the chosen profile. chatgpt.com: revoke and remove auth.json. An openwham
    profile: revoke its token on the server, then forget the profile; when the server cannot
    be reached the profile is forgotten all the same, and the exit code is 1 with a line saying
    the token is still valid."""
    from openwham.client.profiles import ProfileStore
    from openwham.codexauth import jwt_claims

    profile = selected_profile(ctx)
    result: dict[str, Any] = {"profile": profile.name, "kind": profile.kind}
    problem: str | None = None
    if profile.kind == "chatgpt":
        from openwham.client import login as flows

        had = flows.logout(profile.auth_home())
        text = f"logged out of chatgpt.com ({profile.auth_home() / 'auth.json'})"
    else:
        state, problem = _revoke_on_server(profile) if profile.token else ("none", None)
        had = ProfileStore().remove(profile.name) or bool(profile.token)
        text = f"removed profile {profile.name} ({profile.url})"
        if state == "revoked":
            text = f"revoked the token on {profile.url}; {text}"
        elif state == "already invalid":
            text = f"the server already refused the token (revoked or expired); {text}"
        claims = jwt_claims(profile.token or "")
        result.update(token=state, token_id=claims.get("jti"))
        if problem is not None:
            problem = _still_valid(problem, claims)
            result["error"] = problem
    result["was_logged_in"] = had
    if as_json:
        print_json(result)
    else:
        out.print(text if had else f"{profile.name}: not logged in", markup=False)
    if problem is not None:
        die(problem, FAILED)


def _describe(profile: Profile) -> dict[str, Any]:
    from openwham.codexauth import jwt_claims

    row: dict[str, Any] = {"profile": profile.name, "kind": profile.kind, "url": profile.url}
    if profile.kind == "openwham":
        claims = jwt_claims(profile.token or "")
        exp = claims.get("exp")
        row.update(
            logged_in=bool(profile.token),
            email=claims.get("email"),
            expires_at=exp,
            expired=isinstance(exp, int | float) and exp < time.time(),
        )
        return row
    from openwham.client import login as flows

    status = flows.auth_status(profile.auth_home())
    row["auth_file"] = str(profile.auth_home() / "auth.json")
    row["logged_in"] = status is not None
    if status is not None:
        row.update(
            email=status.email,
            plan_type=status.plan_type,
            account_id=status.account_id,
            expires_at=status.expires_at,
            mode=status.mode,
        )
    return row


@handles_errors
def status(ctx: typer.Context, as_json: bool = JsonOption) -> None:
    """Who is logged in where, for every profile (* marks the one in use)."""
    from openwham.client.profiles import ProfileStore

    store = ProfileStore()
    current = selected_profile(ctx).name
    rows = [_describe(p) for p in store.all()]
    if current not in {r["profile"] for r in rows}:
        rows.insert(0, _describe(selected_profile(ctx)))
    for row in rows:
        row["current"] = row["profile"] == current
    if as_json:
        print_json(rows)
        return
    for row in rows:
        mark = "*" if row["current"] else " "
        if row["logged_in"]:
            who = row.get("email") or row.get("account_id") or "?"
            extra = " (expired)" if row.get("expired") else ""
            state = f"logged in as {who}{extra}"
        else:
            state = "not logged in"
        out.print(f"{mark} {row['profile']}  {row['url']}  {state}", markup=False)


@handles_errors
def usage(ctx: typer.Context, as_json: bool = JsonOption) -> None:
    """Rate-limit windows: how much is used and when each resets."""
    from . import render

    with open_client(ctx) as wham:
        payload = wham.usage()
    rows = render.usage_rows(payload)
    if as_json:
        print_json({"plan_type": payload.plan_type, "windows": rows})
        return
    out.print(f"plan: {payload.plan_type}", markup=False)
    for row in rows:
        hours = row["limit_window_seconds"] / 3600
        span = f"{hours:g}h" if hours < 48 else f"{hours / 24:g}d"
        out.print(
            f"{row['window']:<9} {render.bar(row['used_percent'])} {row['used_percent']:>3}% "
            f"of {span}, resets {row['resets'] or '-'}",
            markup=False,
        )
