"""An attempt's result: the PR output item of its diff, and what its records are cleaned of."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from openwham.gateway import Gateway
from openwham.redaction import Redactor
from openwham.service.diffs import diff_stats
from openwham.store import models as m
from openwham.store.db import Database

from .claim import Claim


def redactor(gateway: Gateway | None, claim: Claim, *, named: bool = False) -> Redactor:
    """What an attempt's records are cleaned of: the environment's secrets and the model
    upstream's credentials (an upstream error could echo them into Codex's own error), each
    also in its encodings. ``named``: keyed by the secret's name (for ``secrets_in_diff``)."""
    values: dict[str, str] = {}
    upstream = gateway.upstream.secrets() if gateway is not None else []
    for i, value in enumerate(upstream):
        values[f"(the model upstream's credential {i + 1})" if named else value] = value
    for name, value in claim.secrets.items():
        values[name if named else value] = value
    return Redactor(values)


def pr_item(db: Database, claim: Claim, base: str, diff: str, answer: str) -> dict[str, Any]:
    """The ``pr`` output item of a diff, titled by the task."""
    stats = diff_stats(diff)
    with db.sessions() as s:
        title = s.scalar(select(m.Task.title).where(m.Task.id == claim.task_id)) or "Changes"
    return {
        "type": "pr",
        "pr_title": title,
        "pr_message": answer,
        "output_diff": {
            "type": "output_diff",
            "repo_id": claim.repo_key,
            "base_commit_sha": base,
            "preapply_patch_base_commit_sha": base if claim.patch else None,
            "diff": diff,
            "external_storage_diff": None,
            "files_modified": stats.files_modified,
            "lines_added": stats.lines_added,
            "lines_removed": stats.lines_removed,
            "commit_message": title,
        },
    }
