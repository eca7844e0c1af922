"""The web UI mounted on the app: its pages, its static files, and its ``Backend``.

``ServerBackend`` gives the UI the operations that need the executor or the event bus by
calling the API's own handlers, so the browser and the API share one code path.
"""

from __future__ import annotations

import json
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

from .routers import tasks as task_routes
from .state import AppState


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
        return self.state.fanout.frames(turn_id, after, None)

    def branches(self, db: Session, principal: Principal, env_id: str) -> list[str]:
        env = envs.get_row(db, principal, env_id)
        envs.check_repo_paths(db, env, self.settings)
        repos = env.body.get("repos") or []
        if not repos:
            return []
        key = str(repos[0])
        return branch_checks.list_branches(self.settings, key, envs.repo_url(env.body, key))


def mount(app: FastAPI, state: AppState) -> None:
    """Serve the UI at ``/`` (pages) and ``/static`` (CSS, JS); the API keeps its prefixes."""
    ui = WebUI(ServerBackend(state))
    token_pages.add_routes(ui)
    app.include_router(ui.router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
