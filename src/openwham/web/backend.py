"""What the web UI needs from the server beyond the service layer.

Creating, cancelling and pushing tasks involve the executor, the event bus and the locks,
which live with the server; the UI runs them through the application commands
(``openwham.commands``) with the server's :class:`~openwham.commands.Deps`, the very
commands the API's routers call, so a task made in the browser takes the same path as one
made through the API. Streaming a turn's events goes through the server's fan-out.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from openwham.commands import Deps
from openwham.config import Settings
from openwham.service.keys import SecretBox
from openwham.store.db import Database


class Backend(Protocol):
    @property
    def settings(self) -> Settings: ...

    @property
    def db(self) -> Database: ...

    @property
    def signing_key(self) -> bytes: ...

    @property
    def secret_box(self) -> SecretBox: ...

    @property
    def commands(self) -> Deps:
        """What the application commands take (executor, event bus, artifacts, locks)."""
        ...

    def events(self, turn_id: str, after: int) -> AsyncIterator[bytes]:
        """The turn stream's SSE frames after event ``after`` (the caller checked access)."""
        ...
