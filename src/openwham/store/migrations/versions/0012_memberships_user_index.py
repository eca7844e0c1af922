"""memberships.user_id index: a user's accounts without a scan

The primary key (account_id, user_id) leads with the account, so finding a user's accounts (a
token used without an account header, ``wham account list``) read every membership row.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-06 02:40:00
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(op.f("ix_memberships_user_id"), "memberships", ["user_id"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_memberships_user_id"), table_name="memberships")
