"""turn diff stats as columns

Lists show each task's diff stats; reading them from the JSON body meant loading and parsing
bodies that can hold multi-MB diffs. The columns are filled from the bodies already stored.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-04 21:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from openwham.store.models import diff_columns

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_BATCH = 200


def upgrade() -> None:
    with op.batch_alter_table("turns") as batch:
        batch.add_column(sa.Column("diff_files_modified", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("diff_lines_added", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("diff_lines_removed", sa.Integer(), nullable=True))
        batch.add_column(
            sa.Column("has_diff", sa.Boolean(), nullable=False, server_default=sa.false())
        )
    turns = sa.table(
        "turns",
        sa.column("id", sa.String()),
        sa.column("role", sa.String()),
        sa.column("body", sa.JSON()),
        sa.column("diff_files_modified", sa.Integer()),
        sa.column("diff_lines_added", sa.Integer()),
        sa.column("diff_lines_removed", sa.Integer()),
        sa.column("has_diff", sa.Boolean()),
    )
    conn = op.get_bind()
    ids = [row[0] for row in conn.execute(sa.select(turns.c.id).where(turns.c.role == "assistant"))]
    for start in range(0, len(ids), _BATCH):
        chunk = ids[start : start + _BATCH]
        rows = conn.execute(sa.select(turns.c.id, turns.c.body).where(turns.c.id.in_(chunk)))
        for turn_id, body in list(rows):
            values = diff_columns(body)
            if values["has_diff"]:
                conn.execute(sa.update(turns).where(turns.c.id == turn_id).values(**values))


def downgrade() -> None:
    with op.batch_alter_table("turns") as batch:
        batch.drop_column("has_diff")
        batch.drop_column("diff_lines_removed")
        batch.drop_column("diff_lines_added")
        batch.drop_column("diff_files_modified")
