"""The refresh trail: every use of a session (login and refreshes) with its IP and user agent, and each
session's latest IP and user agent.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("refresh_families", sa.Column("last_user_agent", sa.String(512), nullable=True))
    op.add_column("refresh_families", sa.Column("last_ip", sa.String(64), nullable=True))
    op.create_table(
        "session_uses",
        sa.Column("family_id", sa.String(36), nullable=False),
        sa.Column("used_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ip", sa.String(64), nullable=True),
        sa.Column("user_agent", sa.String(512), nullable=True),
        sa.ForeignKeyConstraint(
            ["family_id"],
            ["refresh_families.id"],
            name="fk_session_uses_family_id_refresh_families",
            ondelete="CASCADE",
        ),
    )
    op.create_index("ix_session_uses_family_id_used_at", "session_uses", ["family_id", "used_at"])
    # Sessions that exist already: their login is their first (and so far only known) use.
    op.execute("UPDATE refresh_families SET last_ip = ip, last_user_agent = user_agent")
    op.execute(
        "INSERT INTO session_uses (family_id, used_at, ip, user_agent) "
        "SELECT id, last_used_at, ip, user_agent FROM refresh_families"
    )


def downgrade() -> None:
    op.drop_index("ix_session_uses_family_id_used_at", table_name="session_uses")
    op.drop_table("session_uses")
    op.drop_column("refresh_families", "last_ip")
    op.drop_column("refresh_families", "last_user_agent")
