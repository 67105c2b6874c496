"""Request and response bodies of the admin API (pydantic at the edge only).

Inputs forbid unknown keys, so read-only fields (``id``, ``status``, credentials)
cannot be set through the API: a request naming one is answered 422.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.errors import SettingsError
from app.rules import parse_rules

Region = Literal["NA", "EU", "FE"]
DataSetName = Annotated[
    str, Field(min_length=5, max_length=100, pattern=r"^[A-Za-z][A-Za-z0-9_-]*$")
]
AdvertiserId = Annotated[str, Field(min_length=1, max_length=32, pattern=r"^[0-9]+$")]
Source = Literal["mparticle", "segment", "records"]


class _Input(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    @field_validator("*", mode="after")
    @classmethod
    def _storable_text(cls, value: Any) -> Any:
        # PostgreSQL's text cannot hold U+0000: refused as input (the web UI's forms
        # come here too), not by the database as an outage.
        if isinstance(value, str) and "\x00" in value:
            raise ValueError("must not contain the NUL character (U+0000)")
        return value


class OutputSettingsFields(_Input):
    max_event_age_hours: int | None = Field(default=None, ge=1, le=504)
    match_keys: Literal["standard", "extended"] | None = None
    consent_mode: Literal["forward", "require_granted"] | None = None
    consent_purpose_user_data: str | None = Field(default=None, max_length=100)
    consent_purpose_ad_storage: str | None = Field(default=None, max_length=100)
    consent_category_advertising: str | None = Field(default=None, max_length=100)
    conversion_rules: list[dict[str, Any]] | None = None
    default_rules: bool | None = None
    enabled: bool | None = None

    @field_validator("conversion_rules")
    @classmethod
    def _rules(cls, value: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        if value is not None:
            try:
                parse_rules(value)
            except SettingsError as error:  # pydantic reports ValueErrors as 422s
                raise ValueError(error.message) from None
        return value


class OutputCreate(OutputSettingsFields):
    name: str = Field(min_length=1, max_length=200)
    advertiser_id: AdvertiserId
    region: Region = "NA"
    data_set_name: DataSetName | None = None
    partner_name: str | None = Field(default=None, max_length=256)


class OutputUpdate(OutputSettingsFields):
    name: str | None = Field(default=None, min_length=1, max_length=200)
    advertiser_id: AdvertiserId | None = None
    region: Region | None = None
    data_set_name: DataSetName | None = None
    partner_name: str | None = Field(default=None, max_length=256)


class OutputOut(BaseModel):
    id: str
    name: str
    advertiser_id: str
    region: str
    data_set_name: str | None
    partner_name: str | None
    max_event_age_hours: int
    match_keys: str
    consent_mode: str
    consent_purpose_user_data: str | None
    consent_purpose_ad_storage: str | None
    consent_category_advertising: str | None
    conversion_rules: list[dict[str, Any]]
    default_rules: bool
    status: str
    enabled: bool
    created_at: datetime | None = None
    updated_at: datetime | None = None


class ConnectionCreate(_Input):
    source: Source
    name: str = Field(min_length=1, max_length=200)
    shared_secret: str | None = Field(default=None, min_length=8, max_length=256)


class ConnectionUpdate(_Input):
    name: str | None = Field(default=None, min_length=1, max_length=200)
    active: bool | None = None


class ConnectionOut(BaseModel):
    id: str
    output_id: str
    source: str
    name: str
    key: str
    active: bool
    signed: bool
    created_at: datetime | None = None


class ConnectionCreated(BaseModel):
    id: str
    source: str
    name: str
    key: str
    secret: str = Field(description="Shown once; only a hash is stored.")


class IngestSummary(BaseModel):
    accepted: int
    dropped: list[dict[str, Any]]
    deliveries: list[str]
    outcome: dict[str, Any] | None = None


class SegmentSummary(IngestSummary):
    success: bool


class BulkSummary(BaseModel):
    batches: list[IngestSummary]


class DeliveryOut(BaseModel):
    id: str
    output_id: str
    connection_id: str | None
    source: str
    status: str
    event_count: int
    attempts: int
    next_attempt_at: datetime | None
    created_at: datetime | None
    updated_at: datetime | None
    last_status_code: int | None
    last_error: str | None
    results: list[dict[str, Any]] | None
    dropped: list[dict[str, Any]] | None
    body: dict[str, Any] | None = None


class PreviewOut(BaseModel):
    requests: list[dict[str, Any]]
    dropped: list[dict[str, Any]]


class Problem(BaseModel):
    error: str
    message: str
    field: str | None = None
