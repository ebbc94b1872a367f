"""Refresh tokens and the refresh trail carry their user: the key every statement that finds a token by its
hash can route by (docs/scaling.md).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    for table in ("refresh_tokens", "session_uses"):
        op.add_column(table, sa.Column("user_id", sa.String(36), nullable=True))
    op.execute("UPDATE refresh_tokens AS t SET user_id = f.user_id FROM refresh_families AS f WHERE f.id = t.family_id")
    op.execute("UPDATE session_uses AS t SET user_id = f.user_id FROM refresh_families AS f WHERE f.id = t.family_id")
    for table in ("refresh_tokens", "session_uses"):
        op.alter_column(table, "user_id", nullable=False)


def downgrade() -> None:
    op.drop_column("session_uses", "user_id")
    op.drop_column("refresh_tokens", "user_id")
