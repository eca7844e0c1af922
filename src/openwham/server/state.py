"""What the app keeps for its lifetime: settings, database, keys."""

from __future__ import annotations

from dataclasses import dataclass

from openwham.config import Settings
from openwham.service.keys import SecretBox, secrets_key, signing_key
from openwham.store.db import Database


@dataclass
class AppState:
    settings: Settings
    db: Database
    signing_key: bytes
    secret_box: SecretBox

    @classmethod
    def open(cls, settings: Settings, db: Database | None = None) -> AppState:
        """Open the database (migrating it) and load or create the server keys."""
        database = db or Database(settings.sqlalchemy_url)
        database.migrate()
        return cls(
            settings=settings,
            db=database,
            signing_key=signing_key(settings),
            secret_box=SecretBox(secrets_key(settings)),
        )
