"""What the web UI needs from the server beyond the service layer.

Creating, cancelling and pushing tasks and streaming their events involve the executor and
the event bus, which live with the server. The server hands the UI an object with these
methods (``server.webui.ServerBackend``), which calls the very handlers the API uses, so a
task made in the browser takes the same path as one made through the API.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol

from sqlalchemy.orm import Session

from openwham.config import Settings
from openwham.service.accounts import Principal
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

    def create_task(self, db: Session, principal: Principal, body: Any) -> dict[str, Any]:
        """``POST tasks`` (a new task or a follow-up); returns its JSON answer."""
        ...

    def cancel_task(self, db: Session, principal: Principal, task_id: str) -> None:
        """``POST tasks/{id}/cancel``: stops queued and running attempts."""
        ...

    def push_branch(
        self, db: Session, principal: Principal, task_id: str, turn_id: str
    ) -> dict[str, Any]:
        """``POST tasks/{id}/turns/{turn_id}/pr``: the pushed branch's record."""
        ...

    def events(self, turn_id: str, after: int) -> AsyncIterator[bytes]:
        """The turn stream's SSE frames after event ``after`` (the caller checked access)."""
        ...

    def branches(self, db: Session, principal: Principal, env_id: str) -> list[str]:
        """The branches of the environment's (first) repository, for the composer; ``[]``
        when the repository does not answer in a few seconds."""
        ...
