"""The tables: outputs, their credentials, connections into them, deliveries, inbound
batches whose every event was dropped, and Login with Amazon flows in progress.

ORM models only: no wire (API) shapes here and no queries (those are in repository.py).
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    CheckConstraint,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
)
from sqlalchemy.orm import Mapped, mapped_column

from app.db.base import Base, JSONType, StoredBody, UTCDateTime, new_id, utcnow


class OutputStatus(StrEnum):
    NEEDS_LOGIN = "needs_login"
    CONFIGURED = "configured"
    NEEDS_REAUTH = "needs_reauth"


class Source(StrEnum):
    MPARTICLE = "mparticle"
    SEGMENT = "segment"
    RECORDS = "records"


class DeliveryStatus(StrEnum):
    PENDING = "pending"
    IN_FLIGHT = "in_flight"
    DELIVERED = "delivered"
    PARTIAL = "partial"
    FAILED = "failed"
    DEAD = "dead"


def _one_of(column: str, values: type[StrEnum], name: str) -> CheckConstraint:
    allowed = ", ".join(f"'{member.value}'" for member in values)
    return CheckConstraint(f"{column} IN ({allowed})", name=name)


# The mapping settings an output stores (mapping.md §10); everything the API may change.
MAPPING_FIELDS = (
    "region",
    "data_set_name",
    "partner_name",
    "max_event_age_hours",
    "match_keys",
    "consent_mode",
    "consent_purpose_user_data",
    "consent_purpose_ad_storage",
    "consent_category_advertising",
    "conversion_rules",
    "default_rules",
)


class Output(Base):
    """An Amazon CAPI output: where events go and how they are mapped."""

    __tablename__ = "outputs"
    __table_args__ = (
        _one_of("status", OutputStatus, "status"),
        CheckConstraint("region IN ('NA', 'EU', 'FE')", name="region"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=lambda: new_id("out"))
    name: Mapped[str] = mapped_column(String(200))
    advertiser_id: Mapped[str] = mapped_column(String(32))
    region: Mapped[str] = mapped_column(String(2), default="NA")
    data_set_name: Mapped[str | None] = mapped_column(String(100))
    partner_name: Mapped[str | None] = mapped_column(String(200))
    max_event_age_hours: Mapped[int] = mapped_column(Integer, default=24)
    match_keys: Mapped[str] = mapped_column(String(16), default="standard")
    consent_mode: Mapped[str] = mapped_column(String(32), default="forward")
    consent_purpose_user_data: Mapped[str | None] = mapped_column(String(200))
    consent_purpose_ad_storage: Mapped[str | None] = mapped_column(String(200))
    consent_category_advertising: Mapped[str | None] = mapped_column(String(200))
    conversion_rules: Mapped[list[Any]] = mapped_column(JSONType, default=list)
    default_rules: Mapped[bool] = mapped_column(default=True)
    status: Mapped[str] = mapped_column(String(16), default=OutputStatus.NEEDS_LOGIN)
    enabled: Mapped[bool] = mapped_column(default=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    def mapping_settings(self) -> dict[str, Any]:
        """The settings as ``OutputSettings.from_mapping`` takes them (unset ones left out)."""
        values: dict[str, Any] = {
            "advertiser_id": self.advertiser_id,
            **{name: getattr(self, name) for name in MAPPING_FIELDS},
        }
        return {key: value for key, value in values.items() if value is not None}

    def __repr__(self) -> str:
        return f"Output(id={self.id!r}, name={self.name!r}, status={self.status!r})"


class Credential(Base):
    """The LwA tokens of one output, as ciphertexts bound to that output (app.crypto).

    One row per output: ``SELECT … FOR UPDATE`` on it is the cross-process lock that lets
    one process at a time refresh the access token.
    """

    __tablename__ = "credentials"

    output_id: Mapped[str] = mapped_column(
        String(32), ForeignKey("outputs.id", ondelete="CASCADE"), primary_key=True
    )
    refresh_token_ciphertext: Mapped[str] = mapped_column(Text)
    # Key id of refresh_token_ciphertext, so stale rows are found without decrypting.
    key_id: Mapped[str] = mapped_column(String(32))
    access_token_ciphertext: Mapped[str | None] = mapped_column(Text)
    access_token_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    def __repr__(self) -> str:
        return f"Credential(output_id={self.output_id!r}, key_id={self.key_id!r})"


class Connection(Base):
    """One input linked to one output; authenticates with a public key and a hashed secret."""

    __tablename__ = "connections"
    __table_args__ = (_one_of("source", Source, "source"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=lambda: new_id("con"))
    output_id: Mapped[str] = mapped_column(
        String(32), ForeignKey("outputs.id", ondelete="CASCADE"), index=True
    )
    source: Mapped[str] = mapped_column(String(16))
    name: Mapped[str] = mapped_column(String(200))
    key: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    secret_hash: Mapped[str] = mapped_column(String(255))
    # Segment's webhook signing secret, encrypted (purpose "shared_secret:<id>").
    shared_secret_ciphertext: Mapped[str | None] = mapped_column(Text)
    active: Mapped[bool] = mapped_column(default=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    def __repr__(self) -> str:
        return f"Connection(id={self.id!r}, source={self.source!r}, output_id={self.output_id!r})"


class Delivery(Base):
    """One Events API request and its life in the queue (docs/decisions/0001)."""

    __tablename__ = "deliveries"
    __table_args__ = (
        _one_of("status", DeliveryStatus, "status"),
        _one_of("source", Source, "source"),
        # The dispatcher's claim: due pending rows, oldest first.
        Index("ix_deliveries_status_next_attempt_at", "status", "next_attempt_at"),
        # Listing an output's deliveries, newest first.
        Index("ix_deliveries_output_id_created_at", "output_id", "created_at"),
        # Pruning finished rows past retention.
        Index("ix_deliveries_status_updated_at", "status", "updated_at"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=lambda: new_id("dlv"))
    # Groups the deliveries made from one inbound batch.
    batch_id: Mapped[str] = mapped_column(String(32), index=True)
    output_id: Mapped[str] = mapped_column(String(32), ForeignKey("outputs.id", ondelete="CASCADE"))
    connection_id: Mapped[str | None] = mapped_column(
        String(32), ForeignKey("connections.id", ondelete="SET NULL")
    )
    source: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), default=DeliveryStatus.PENDING)
    # The exact request body; resends reuse it byte for byte so eventIds dedupe at Amazon.
    body: Mapped[bytes] = mapped_column(StoredBody)
    # index_map[i] = position in the inbound batch of the body's i-th event.
    index_map: Mapped[list[int]] = mapped_column(JSONType)
    event_count: Mapped[int] = mapped_column(Integer)
    # Claims that may have reached Amazon since the delivery was (re)queued.
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime)
    # When it entered the queue (or was retried): the clock RELAY_DELIVERY_MAX_AGE runs on.
    queued_at: Mapped[datetime] = mapped_column(UTCDateTime)
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    leased_by: Mapped[str | None] = mapped_column(String(64))
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    results: Mapped[list[Any] | None] = mapped_column(JSONType)
    dropped: Mapped[list[Any] | None] = mapped_column(JSONType)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    def __repr__(self) -> str:
        return f"Delivery(id={self.id!r}, status={self.status!r}, attempts={self.attempts!r})"


class DroppedBatch(Base):
    """An inbound batch whose every event was dropped before sending, and why.

    Such a batch has no delivery, so this append-only row, written in the transaction
    that accepts the batch, is its only trace. A batch with at least one forwarded event
    keeps its drops on its first delivery (``Delivery.dropped``) instead: each batch's
    drops are in exactly one place, and counting both places counts each once
    (app/db/stats.py, docs/decisions/0011-drop-records.md).
    """

    __tablename__ = "dropped_batches"
    __table_args__ = (
        _one_of("source", Source, "source"),
        # The output page's counts, hourly chart and list: one output, newest first.
        Index("ix_dropped_batches_output_id_created_at", "output_id", "created_at"),
        # Pruning rows past retention.
        Index("ix_dropped_batches_created_at", "created_at"),
    )

    batch_id: Mapped[str] = mapped_column(
        String(32), primary_key=True, default=lambda: new_id("bat")
    )
    output_id: Mapped[str] = mapped_column(String(32), ForeignKey("outputs.id", ondelete="CASCADE"))
    connection_id: Mapped[str | None] = mapped_column(
        String(32), ForeignKey("connections.id", ondelete="SET NULL")
    )
    source: Mapped[str] = mapped_column(String(16))
    # len(dropped): the events of the batch, every one dropped; summed without JSON functions.
    dropped_count: Mapped[int] = mapped_column(Integer)
    # [{"index", "reason"[, "detail"]}], as the ingest answer gave them.
    dropped: Mapped[list[Any]] = mapped_column(JSONType)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    def __repr__(self) -> str:
        return (
            f"DroppedBatch(batch_id={self.batch_id!r}, output_id={self.output_id!r}, "
            f"dropped_count={self.dropped_count!r})"
        )


class OAuthState(Base):
    """One Login with Amazon flow in progress: single use, expiring, bound to a browser.

    The ``state`` parameter sent to Amazon is this row's id; the PKCE verifier stays
    here, encrypted, and never travels through the browser. ``browser_hash`` is the
    SHA-256 of the random value in the HttpOnly cookie set by /oauth/amazon/start.
    """

    __tablename__ = "oauth_states"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    output_id: Mapped[str] = mapped_column(
        String(32), ForeignKey("outputs.id", ondelete="CASCADE"), index=True
    )
    browser_hash: Mapped[str] = mapped_column(String(64))
    verifier_ciphertext: Mapped[str] = mapped_column(Text)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    used_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    def __repr__(self) -> str:
        return f"OAuthState(output_id={self.output_id!r}, used={self.used_at is not None})"
