"""Create the writeturn_journal table.

Revision ID: 0001_journal
Revises:
Create Date: 2025-11-25

The table is spelled out here rather than taken from writeturn.schema, so this
revision keeps creating the same table when the models change later.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001_journal"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Create writeturn_journal."""
    op.create_table(
        "writeturn_journal",
        sa.Column("namespace", sa.String(200), nullable=False),
        sa.Column("key", sa.String(500), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False, autoincrement=False),
        sa.Column("idempotency_key", sa.String(500), nullable=True),
        sa.Column("writer", sa.String(200), nullable=True),
        sa.Column(
            "committed_at",
            sa.DateTime(timezone=True),
            nullable=False,
            server_default=sa.func.now(),
        ),
        sa.PrimaryKeyConstraint("namespace", "key", "seq", name="pk_writeturn_journal"),
        sa.UniqueConstraint(
            "namespace", "idempotency_key", name="uq_writeturn_journal_idempotency"
        ),
    )


def downgrade() -> None:
    """Drop writeturn_journal and its rows."""
    op.drop_table("writeturn_journal")
