"""Which ``ArtifactStore`` a node uses (``WHAM_ARTIFACT_STORE``): every node of one
deployment must use the same one, since each reads what the others wrote."""

from __future__ import annotations

from openwham.config import Settings
from openwham.store.artifacts import ArtifactError, ArtifactStore, DatabaseArtifactStore
from openwham.store.db import Database
from openwham.store.s3 import S3ArtifactStore


def open_store(settings: Settings, db: Database) -> ArtifactStore:
    """The configured store (no network yet; :func:`check_store` at start)."""
    max_bytes = settings.artifact_max_mb << 20
    if settings.artifact_store == "s3":
        if not settings.artifact_s3_bucket:
            raise ArtifactError("WHAM_ARTIFACT_STORE=s3 needs WHAM_ARTIFACT_S3_BUCKET")
        return S3ArtifactStore(
            endpoint=settings.artifact_s3_endpoint,
            bucket=settings.artifact_s3_bucket,
            prefix=settings.artifact_s3_prefix,
            region=settings.artifact_s3_region,
            access_key=settings.artifact_s3_access_key_id,
            secret_key=settings.artifact_s3_secret_access_key,
            max_bytes=max_bytes,
        )
    return DatabaseArtifactStore(db, max_bytes)


def check_store(store: ArtifactStore) -> None:
    """Raise :class:`ArtifactError` when the store cannot be used (a missing bucket, wrong
    keys): a node refuses to start rather than fail follow-ups later."""
    if isinstance(store, S3ArtifactStore):
        store.check()
