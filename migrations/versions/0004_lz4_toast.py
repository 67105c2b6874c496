"""PostgreSQL: compress the large delivery columns with lz4 instead of pglz.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-06

Every delivery stores its Events API request (about 86 KB for 100 events) and, once
answered, one result per event. PostgreSQL compresses such values when it moves them
out of line (TOAST), with pglz unless told otherwise. pglz is slow: on the end-to-end
benchmark it was a large part of the database's CPU per relayed batch. lz4 compresses
several times faster and about as well on this data (docs/decisions/0015).

Only new values are written with lz4; existing rows keep pglz until rewritten (both are
read transparently). A server built without lz4 keeps pglz, and SQLite has no TOAST.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS = (("deliveries", "body"), ("deliveries", "results"), ("deliveries", "dropped"))


def _lz4_available() -> bool:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return False
    # PostgreSQL 14+ lists lz4 here exactly when the server was built with it.
    row = bind.exec_driver_sql(
        "SELECT 'lz4' = ANY(enumvals) FROM pg_settings WHERE name = 'default_toast_compression'"
    ).first()
    return bool(row and row[0])


def _set_compression(method: str) -> None:
    if not _lz4_available():
        return
    for table, column in COLUMNS:
        op.execute(f"ALTER TABLE {table} ALTER COLUMN {column} SET COMPRESSION {method}")


def upgrade() -> None:
    _set_compression("lz4")


def downgrade() -> None:
    _set_compression("pglz")
