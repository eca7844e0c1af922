"""``wham codex-auth``: let the official Codex CLI authenticate to an openwham server."""

from __future__ import annotations

import json
import os
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import typer

from .common import fail, print_json

AUTH_CLAIM = "https://api.openai.com/auth"


def _write_private(path: Path, text: str) -> None:
    """Atomic write with mode 0600 (auth.json holds a bearer token)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def auth_json(token: str, claims: dict[str, Any]) -> dict[str, Any]:
    """The minimal auth.json every Codex command accepts (docs/reference/codex-cli.md §6.3)."""
    account_id = claims[AUTH_CLAIM]["chatgpt_account_id"]
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return {
        "auth_mode": "chatgpt",
        "OPENAI_API_KEY": None,
        "tokens": {
            "id_token": token,
            "access_token": token,
            "refresh_token": "",
            "account_id": account_id,
        },
        "last_refresh": now,
    }


def codex_auth(
    server: str = typer.Option(..., "--server", help="openwham base URL, e.g. http://host:8080"),
    token: str = typer.Option(..., "--token", help="API token from `wham token create`"),
    codex_home: Path = typer.Option(..., "--codex-home", help="CODEX_HOME to write auth.json to"),
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON"),
) -> None:
    """Write CODEX_HOME/auth.json (and a config.toml if none exists) for this server."""
    import jwt  # here, not at the top: every `wham` start imports this module

    base = server.rstrip("/")
    if not base.startswith(("http://", "https://")):
        fail("--server must be an http:// or https:// URL", 2)
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
        claims[AUTH_CLAIM]["chatgpt_account_id"]
    except (jwt.PyJWTError, KeyError, TypeError):
        fail("--token is not an openwham API token (create one with `wham token create`)", 2)
    root = base.removesuffix("/backend-api").removesuffix("/api/codex")
    _write_private(codex_home / "auth.json", json.dumps(auth_json(token, claims), indent=2) + "\n")
    config = codex_home / "config.toml"
    if not config.exists():
        config.write_text(
            "# Written by `wham codex-auth`: Codex talks to this openwham server.\n"
            f'chatgpt_base_url = "{root}/backend-api/"\n'
            'cli_auth_credentials_store = "file"\n'
        )
    if as_json:
        print_json(
            {
                "auth_json": str(codex_home / "auth.json"),
                "config_toml": str(config),
                "codex_cloud_tasks_base_url": f"{root}/backend-api",
                "chatgpt_base_url": f"{root}/backend-api/",
            }
        )
        return
    typer.echo(f"wrote {codex_home / 'auth.json'}")
    typer.echo(f"codex cloud: export CODEX_CLOUD_TASKS_BASE_URL={root}/backend-api")
