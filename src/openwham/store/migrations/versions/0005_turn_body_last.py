"""turns: the JSON body becomes the last column (SQLite)

SQLite stores a row's columns in table order, and a value too big for its page goes to a
chain of overflow pages: reading any column after a multi-MB body walks that chain. Lists
read a turn's status, times and diff stats, never its body; with the body last they no longer
pay for the diff it holds. PostgreSQL keeps big values out of line (TOAST), so order does not
matter there and its table is left as it is.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04 21:40:00
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
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
    "body",
)


def upgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    with op.batch_alter_table("turns", recreate="always", partial_reordering=[ORDER]):
        pass


def downgrade() -> None:
    """Column order carries no meaning to read back; nothing to undo."""
