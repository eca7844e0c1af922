"""The web UI mounted on the app: its pages, its static files, and its ``Backend``.

``ServerBackend`` gives the UI the operations that need the executor or the event bus by
calling the API's own handlers, so the browser and the API share one code path.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from sqlalchemy.orm import Session

from openwham.config import Settings
from openwham.engine import branches as branch_checks
from openwham.service import environments as envs
from openwham.service.accounts import Principal
from openwham.service.keys import SecretBox
from openwham.store.db import Database
from openwham.web import tokens as token_pages
from openwham.web.routes import STATIC, WebUI

from .routers import stream
from .routers import tasks as task_routes
from .state import AppState

# The composer's branch list must never hold up the page: a remote that is slow to answer
# gives an empty list (the field still takes any name, checked at submit).
LS_REMOTE_TIMEOUT = 5.0
MAX_BRANCHES = 500


class ServerBackend:
    def __init__(self, state: AppState) -> None:
        self.state = state

    @property
    def settings(self) -> Settings:
        return self.state.settings

    @property
    def db(self) -> Database:
        return self.state.db

    @property
    def signing_key(self) -> bytes:
        return self.state.signing_key

    @property
    def secret_box(self) -> SecretBox:
        return self.state.secret_box

    def create_task(self, db: Session, principal: Principal, body: Any) -> dict[str, Any]:
        response = task_routes.create_task(self.state, principal, db, body)
        data: dict[str, Any] = json.loads(bytes(response.body))
        return data

    def cancel_task(self, db: Session, principal: Principal, task_id: str) -> None:
        task_routes.cancel(task_id, self.state, principal, db)

    def push_branch(
        self, db: Session, principal: Principal, task_id: str, turn_id: str
    ) -> dict[str, Any]:
        return task_routes.create_pr(task_id, turn_id, self.state, principal, db)

    def events(self, turn_id: str, after: int) -> AsyncIterator[bytes]:
        return stream._frames(self.state, turn_id, after, None)

    def branches(self, db: Session, principal: Principal, env_id: str) -> list[str]:
        env = envs.get_row(db, principal, env_id)
        envs.check_repo_paths(db, env, self.settings)
        repos = env.body.get("repos") or []
        if not repos:
            return []
        key = str(repos[0])
        return list_branches(self.settings, key, envs.repo_url(env.body, key))


def _git(args: list[str], timeout: float) -> str | None:
    """Host-side git as ``engine.branches`` runs it (no config, prompts or ext transport)."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.devnull}
    env.update(branch_checks._ENV)
    try:
        proc = subprocess.run(
            ["git", "-c", "protocol.ext.allow=never", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except (subprocess.TimeoutExpired, OSError):
        return None
    return proc.stdout if proc.returncode == 0 else None


def list_branches(settings: Settings, key: str, url: str) -> list[str]:
    """The repository's branches: from its mirror when there is one (no network), else from
    ``git ls-remote --heads`` with a short timeout; ``[]`` when neither answers."""
    # the engine's mirror of the repository (sandbox.workspace.Mirrors: root/<key>.git)
    mirror = settings.resolved_data_dir / "mirrors" / f"{key}.git"
    out: str | None = None
    if "/" not in key and not key.startswith(".") and (mirror / "HEAD").exists():
        out = _git(
            ["--git-dir", str(mirror), "for-each-ref", "--format=%(refname)", "refs/heads/"],
            LS_REMOTE_TIMEOUT,
        )
    if out is None and url:
        listed = _git(["ls-remote", "--heads", "--", url], LS_REMOTE_TIMEOUT)
        out = "\n".join(line.split("\t", 1)[-1] for line in (listed or "").splitlines())
    names = sorted(
        {ref.strip().removeprefix("refs/heads/") for ref in (out or "").splitlines() if ref.strip()}
    )
    return names[:MAX_BRANCHES]


def mount(app: FastAPI, state: AppState) -> None:
    """Serve the UI at ``/`` (pages) and ``/static`` (CSS, JS); the API keeps its prefixes."""
    ui = WebUI(ServerBackend(state))
    token_pages.add_routes(ui)
    app.include_router(ui.router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
