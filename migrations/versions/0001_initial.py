"""Initial schema: outputs, credentials, connections, deliveries.

Revision ID: 0001
Revises:
Create Date: 2025-11-23

Hand-written to match app/db/models.py (constraint names follow the naming convention
in app/db/base.py). Runs on SQLite and PostgreSQL.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
TIMESTAMP = sa.DateTime(timezone=True)
SOURCES = "'mparticle', 'segment', 'records'"


def upgrade() -> None:
    op.create_table(
        "outputs",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("advertiser_id", sa.String(32), nullable=False),
        sa.Column("region", sa.String(2), nullable=False),
        sa.Column("data_set_name", sa.String(100), nullable=True),
        sa.Column("partner_name", sa.String(200), nullable=True),
        sa.Column("max_event_age_hours", sa.Integer(), nullable=False),
        sa.Column("match_keys", sa.String(16), nullable=False),
        sa.Column("consent_mode", sa.String(32), nullable=False),
        sa.Column("consent_purpose_user_data", sa.String(200), nullable=True),
        sa.Column("consent_purpose_ad_storage", sa.String(200), nullable=True),
        sa.Column("consent_category_advertising", sa.String(200), nullable=True),
        sa.Column("conversion_rules", JSON, nullable=False),
        sa.Column("default_rules", sa.Boolean(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.Column("updated_at", TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_outputs")),
        sa.CheckConstraint(
            "status IN ('needs_login', 'configured', 'needs_reauth')",
            name=op.f("ck_outputs_status"),
        ),
        sa.CheckConstraint("region IN ('NA', 'EU', 'FE')", name=op.f("ck_outputs_region")),
    )

    op.create_table(
        "credentials",
        sa.Column("output_id", sa.String(32), nullable=False),
        sa.Column("refresh_token_ciphertext", sa.Text(), nullable=False),
        sa.Column("key_id", sa.String(32), nullable=False),
        sa.Column("access_token_ciphertext", sa.Text(), nullable=True),
        sa.Column("access_token_expires_at", TIMESTAMP, nullable=True),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.Column("updated_at", TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("output_id", name=op.f("pk_credentials")),
        sa.ForeignKeyConstraint(
            ["output_id"],
            ["outputs.id"],
            name=op.f("fk_credentials_output_id_outputs"),
            ondelete="CASCADE",
        ),
    )

    op.create_table(
        "connections",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("output_id", sa.String(32), nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("key", sa.String(64), nullable=False),
        sa.Column("secret_hash", sa.String(255), nullable=False),
        sa.Column("shared_secret_ciphertext", sa.Text(), nullable=True),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.Column("updated_at", TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_connections")),
        sa.ForeignKeyConstraint(
            ["output_id"],
            ["outputs.id"],
            name=op.f("fk_connections_output_id_outputs"),
            ondelete="CASCADE",
        ),
        sa.CheckConstraint(f"source IN ({SOURCES})", name=op.f("ck_connections_source")),
    )
    op.create_index(op.f("ix_connections_key"), "connections", ["key"], unique=True)
    op.create_index(op.f("ix_connections_output_id"), "connections", ["output_id"])

    op.create_table(
        "deliveries",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("batch_id", sa.String(32), nullable=False),
        sa.Column("output_id", sa.String(32), nullable=False),
        sa.Column("connection_id", sa.String(32), nullable=True),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("body", sa.LargeBinary(), nullable=False),
        sa.Column("index_map", JSON, nullable=False),
        sa.Column("event_count", sa.Integer(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", TIMESTAMP, nullable=False),
        sa.Column("queued_at", TIMESTAMP, nullable=False),
        sa.Column("lease_expires_at", TIMESTAMP, nullable=True),
        sa.Column("leased_by", sa.String(64), nullable=True),
        sa.Column("last_status_code", sa.Integer(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("results", JSON, nullable=True),
        sa.Column("dropped", JSON, nullable=True),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.Column("updated_at", TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_deliveries")),
        sa.ForeignKeyConstraint(
            ["output_id"],
            ["outputs.id"],
            name=op.f("fk_deliveries_output_id_outputs"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["connection_id"],
            ["connections.id"],
            name=op.f("fk_deliveries_connection_id_connections"),
            ondelete="SET NULL",
        ),
        sa.CheckConstraint(
            "status IN ('pending', 'in_flight', 'delivered', 'partial', 'failed', 'dead')",
            name=op.f("ck_deliveries_status"),
        ),
        sa.CheckConstraint(f"source IN ({SOURCES})", name=op.f("ck_deliveries_source")),
    )
    op.create_index(op.f("ix_deliveries_batch_id"), "deliveries", ["batch_id"])
    op.create_index(
        op.f("ix_deliveries_status_next_attempt_at"), "deliveries", ["status", "next_attempt_at"]
    )
    op.create_index(
        op.f("ix_deliveries_output_id_created_at"), "deliveries", ["output_id", "created_at"]
    )
    op.create_index(op.f("ix_deliveries_status_updated_at"), "deliveries", ["status", "updated_at"])


def downgrade() -> None:
    op.drop_table("deliveries")
    op.drop_table("connections")
    op.drop_table("credentials")
    op.drop_table("outputs")
