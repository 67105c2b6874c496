"""SQLite: delivery bodies are stored compressed with LZ4 by the relay.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06

No schema change. From this revision on, the relay writes ``deliveries.body`` on SQLite
as an LZ4 frame (``app.db.base.StoredBody``; docs/decisions/0022) and reads both kinds.
The revision exists so that an older relay, which would send a compressed body to
Amazon as it is, refuses to start on such a database (it does not know revision 0005)
instead. Downgrading writes every compressed body back as it was.
"""

from collections.abc import Sequence

import lz4.frame
import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

LZ4_FRAME_MAGIC = b"\x04\x22\x4d\x18"


def upgrade() -> None:
    """Nothing to change: new bodies are compressed as they are written, and bodies
    stored before are read as they are."""


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "sqlite":
        return
    rows = bind.execute(
        sa.text("SELECT id, body FROM deliveries WHERE substr(body, 1, 4) = :magic"),
        {"magic": LZ4_FRAME_MAGIC},
    ).all()
    for delivery_id, body in rows:
        bind.execute(
            sa.text("UPDATE deliveries SET body = :body WHERE id = :id"),
            {"body": lz4.frame.decompress(body), "id": delivery_id},
        )
