"""turns.run_id: the fencing token of the run that holds an attempt

Each claim of an attempt (``pending → in_progress``) writes a fresh ``run_id``; every write the
run makes afterwards is conditional on it, and a requeue or a user's recover clears it. A
worker that was judged dead (stalled, or its server restarted) but is still running can then
no longer write to an attempt another worker has claimed since (docs/ARCHITECTURE.md, "Turn
states"). Rows of attempts that are running while this migration runs get none: their runs
(of an older version) pass no token, and a later requeue or claim sets it. On SQLite the
table is rebuilt with ``body`` still last (see 0005).

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-05 10:40:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ORDER = (
    "id",
    "task_id",
    "role",
    "parent_id",
    "attempt_placement",
    "turn_status",
    "discarded",
    "viewed",
    "created_at",
    "updated_at",
    "diff_files_modified",
    "diff_lines_added",
    "diff_lines_removed",
    "has_diff",
    "events_epoch",
    "run_id",
    "body",
)


def _column() -> sa.Column[str]:
    return sa.Column("run_id", sa.String(length=64), nullable=True)


def upgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        op.add_column("turns", _column())
        return
    with op.batch_alter_table("turns", recreate="always", partial_reordering=[ORDER]) as batch:
        batch.add_column(_column())


def downgrade() -> None:
    with op.batch_alter_table("turns") as batch:
        batch.drop_column("run_id")
