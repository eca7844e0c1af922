"""turns.events_epoch, bumped when an attempt starts over; turn_events ids never reused

A turn stream's in-memory tail (server/fanout.py) holds the newest frames of a turn; when a
requeue or a user's recover deletes the attempt's events, a tail opened before would still
hand those frames to a stream that joins later. The tail reads the epoch before each read of
new rows and forgets what it holds when it changed. On SQLite the table is rebuilt with
``body`` still last (see 0005).

SQLite gave ``turn_events`` a plain ``INTEGER PRIMARY KEY``, which reuses the largest ids once
their rows are deleted: an attempt that started over got ids at or below those its streams
had seen, so a tail (and a client resuming with ``Last-Event-ID``) skipped its new events.
The table is rebuilt with ``AUTOINCREMENT`` (its counter starts at the largest id kept);
PostgreSQL's sequence never goes back.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-05 00:40:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
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
    "body",
)


def _column() -> sa.Column[int]:
    return sa.Column("events_epoch", sa.Integer(), nullable=False, server_default="0")


def upgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        op.add_column("turns", _column())
        return
    with op.batch_alter_table("turns", recreate="always", partial_reordering=[ORDER]) as batch:
        batch.add_column(_column())
    op.create_table(
        "turn_events_new",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("task_id", sa.String(length=200), nullable=False),
        sa.Column("turn_id", sa.String(length=200), nullable=False),
        sa.Column("item_type", sa.String(length=64), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(["task_id"], ["tasks.id"], ondelete="CASCADE"),
        sqlite_autoincrement=True,
    )
    op.execute(
        "INSERT INTO turn_events_new (id, task_id, turn_id, item_type, payload, created_at) "
        "SELECT id, task_id, turn_id, item_type, payload, created_at FROM turn_events"
    )
    op.drop_table("turn_events")
    op.rename_table("turn_events_new", "turn_events")
    op.create_index("ix_turn_events_task_id", "turn_events", ["task_id"], unique=False)
    op.create_index("ix_turn_events_turn_id_id", "turn_events", ["turn_id", "id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("turns") as batch:
        batch.drop_column("events_epoch")
