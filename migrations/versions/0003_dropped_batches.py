"""Inbound batches whose every event was dropped (decision 0011).

Revision ID: 0003
Revises: 0002
Create Date: 2025-11-30

Nothing to backfill: such batches left no row before this table, and the drops of every
other batch stay on its first delivery, where they are still counted.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
TIMESTAMP = sa.DateTime(timezone=True)
SOURCES = "'mparticle', 'segment', 'records'"


def upgrade() -> None:
    op.create_table(
        "dropped_batches",
        sa.Column("batch_id", sa.String(32), nullable=False),
        sa.Column("output_id", sa.String(32), nullable=False),
        sa.Column("connection_id", sa.String(32), nullable=True),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("dropped_count", sa.Integer(), nullable=False),
        sa.Column("dropped", JSON, nullable=False),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.CheckConstraint(f"source IN ({SOURCES})", name=op.f("ck_dropped_batches_source")),
        sa.ForeignKeyConstraint(
            ["connection_id"],
            ["connections.id"],
            name=op.f("fk_dropped_batches_connection_id_connections"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["output_id"],
            ["outputs.id"],
            name=op.f("fk_dropped_batches_output_id_outputs"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("batch_id", name=op.f("pk_dropped_batches")),
    )
    op.create_index(
        op.f("ix_dropped_batches_output_id_created_at"),
        "dropped_batches",
        ["output_id", "created_at"],
    )
    op.create_index(op.f("ix_dropped_batches_created_at"), "dropped_batches", ["created_at"])


def downgrade() -> None:
    op.drop_index(op.f("ix_dropped_batches_created_at"), table_name="dropped_batches")
    op.drop_index(op.f("ix_dropped_batches_output_id_created_at"), table_name="dropped_batches")
    op.drop_table("dropped_batches")
