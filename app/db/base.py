"""Declarative base, naming convention and the column types shared by every model."""

from __future__ import annotations

import base64
import secrets
from datetime import UTC, datetime
from typing import Any, Final

import lz4.frame
from sqlalchemy import JSON, DateTime, Dialect, LargeBinary, MetaData
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase
from sqlalchemy.types import TypeDecorator

# Explicit constraint names, so migrations can refer to them on every backend and
# autogenerate does not see spurious differences.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = MetaData(naming_convention=NAMING_CONVENTION)

# JSON on SQLite (stored as text), JSONB on PostgreSQL.
JSONType = JSON().with_variant(JSONB(), "postgresql")


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp that is always an aware UTC datetime in Python.

    SQLite keeps no offset and compares timestamps as text, so every value is converted
    to UTC before it is stored; naive values are refused rather than guessed at.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime: pass an aware (UTC) datetime")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if not isinstance(value, datetime):
            raise TypeError(f"expected a datetime, got {type(value).__name__}")
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id(prefix: str) -> str:
    """``<prefix>_<16 base32 characters>``: 80 random bits, readable in URLs and logs."""
    return f"{prefix}_{base64.b32encode(secrets.token_bytes(10)).decode('ascii').lower()}"


class Base(DeclarativeBase):
    metadata = metadata


# The four bytes every LZ4 frame starts with. A stored body that starts otherwise was
# written before bodies were compressed (JSON starts with "{").
LZ4_FRAME_MAGIC: Final = b"\x04\x22\x4d\x18"


class StoredBody(TypeDecorator[bytes]):
    """A delivery's request body: compressed with LZ4 on SQLite, as given on PostgreSQL.

    SQLite rewrites a whole row when any column of it changes, so the UPDATE that
    records Amazon's answer wrote the 86 KB body again, and SQLite's log took about
    290 KB per relayed batch while the single write lock was held. PostgreSQL keeps
    an unchanged large value where it is and compresses it itself (lz4 TOAST,
    decision 0015). Compressed here, a body takes a few KB on SQLite, which halves the
    time the write lock is held per batch (docs/decisions/0022-sqlite-body-lz4.md).
    Bodies stored before are read as they are.
    """

    impl = LargeBinary
    cache_ok = True

    def process_bind_param(self, value: bytes | None, dialect: Dialect) -> bytes | None:
        if value is None or dialect.name != "sqlite":
            return value
        return bytes(lz4.frame.compress(value, store_size=True))

    def process_result_value(self, value: Any, dialect: Dialect) -> bytes | None:
        if value is None:
            return None
        stored = bytes(value)
        if dialect.name == "sqlite" and stored.startswith(LZ4_FRAME_MAGIC):
            return bytes(lz4.frame.decompress(stored))
        return stored
