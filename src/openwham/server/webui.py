"""The web UI mounted on the app: its pages, its static files, and its ``Backend``.

``ServerBackend`` gives the UI the server's parts: the application commands' dependencies
(the UI and the API's routers call the same ``openwham.commands``) and the turn-stream
fan-out.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from openwham.commands import Deps
from openwham.config import Settings
from openwham.service.keys import SecretBox
from openwham.store.db import Database
from openwham.web import forges as forge_pages
from openwham.web import gitcreds as gitcred_pages
from openwham.web import tokens as token_pages
from openwham.web import writeonly
from openwham.web.routes import STATIC, WebUI

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

    @property
    def commands(self) -> Deps:
        return self.state.commands

    def events(self, turn_id: str, after: int) -> AsyncIterator[bytes]:
        return self.state.fanout.frames(turn_id, after, None)


def mount(app: FastAPI, state: AppState) -> None:
    """Serve the UI at ``/`` (pages) and ``/static`` (CSS, JS); the API keeps its prefixes."""
    ui = WebUI(ServerBackend(state))
    token_pages.add_routes(ui)
    writeonly.add_routes(ui, forge_pages.PAGE)
    writeonly.add_routes(ui, gitcred_pages.PAGE)
    app.include_router(ui.router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
