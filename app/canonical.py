"""The canonical event model: the seam between sources and destinations.

Source adapters (``app.sources``) turn wire formats into these objects; the Amazon
mapper (``app.amazon.mapping``) turns them into Amazon events. Adapters never see
Amazon types and the mapper never sees a wire format.

Everything that belongs to the user rather than to one event (identities, device
ids, IP, consent state) lives in one ``UserContext`` that every event of a batch
shares, so the mapper can normalise and hash it once per batch instead of once per
event.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from enum import StrEnum
from typing import Any


class Platform(StrEnum):
    """Where the event happened, as the source said it (mapped to eventSource)."""

    IOS = "ios"
    ANDROID = "android"
    FIRE_TV = "fire_tv"
    WEB = "web"
    OFFLINE = "offline"


class EventKind(StrEnum):
    """What kind of message the source sent; conversion rules match on it."""

    COMMERCE = "commerce"  # mParticle commerce_event
    CUSTOM = "custom"  # mParticle custom_event and other non-commerce mParticle events
    TRACK = "track"
    PAGE = "page"
    SCREEN = "screen"
    IDENTIFY = "identify"
    GROUP = "group"
    ALIAS = "alias"
    RECORD = "record"  # one flat conversion record


@dataclass(frozen=True, slots=True)
class Identities:
    """Raw identity values, each tuple in priority order (first usable wins)."""

    emails: tuple[str, ...] = ()
    phones: tuple[str, ...] = ()
    maids: tuple[str, ...] = ()
    match_id: str | None = None
    first_name: str | None = None
    last_name: str | None = None
    address: str | None = None
    city: str | None = None
    state: str | None = None
    postal: str | None = None


@dataclass(frozen=True, slots=True)
class ConsentState:
    """Consent signals that describe the user rather than one event."""

    ccpa_opted_out: bool = False
    # GDPR purpose (lowercased) -> consented
    gdpr: Mapping[str, bool] = field(default_factory=dict)
    # CMP category id -> granted (Segment categoryPreferences, RudderStack ids);
    # None when the source sent no category preferences at all.
    categories: Mapping[str, bool] | None = None


@dataclass(frozen=True, slots=True, eq=False)
class UserContext:
    """Shared by every event of one user in one batch (compared by identity)."""

    identities: Identities = Identities()
    ip: str | None = None
    consent: ConsentState = ConsentState()
    # Country candidates that come from the user or device, in chain order.
    countries: tuple[Any, ...] = ()


@dataclass(frozen=True, slots=True)
class ConsentSignals:
    """Consent values carried by one event (raw; the mapper normalises them)."""

    user_data: Any = None
    ad_storage: Any = None
    tcf: Any = None
    gpp: Any = None


NO_SIGNALS = ConsentSignals()  # shared by every event that carries no consent values


# Not frozen: a frozen dataclass sets each field through object.__setattr__, which is
# slow, and this object is built once per inbound event.
@dataclass(slots=True)
class CanonicalEvent:
    """One inbound event, source-neutral.

    ``index`` is the event's position in the inbound batch; it is how drop reasons
    and Amazon's per-event results are traced back to what the caller sent.
    """

    index: int
    kind: EventKind
    user: UserContext
    source_event: Any  # the inbound event object, for deterministic event ids
    name: str | None = None
    # mParticle product_action.action: None when there is no product_action,
    # "" when the product_action has no usable action.
    action: str | None = None
    time_ms: int | None = None
    event_id: str | None = None
    value: Decimal | None = None
    # The value a purchase carries when the source reads it differently from other
    # events (Segment: total, revenue, value, then the products' sum).
    purchase_value: Decimal | None = None
    currency: str | None = None
    units: Decimal | None = None
    platform: Platform = Platform.OFFLINE
    # Country candidates of this event, tried before the user's.
    countries: tuple[Any, ...] = ()
    # (name, raw value) pairs offered as customData, in payload order.
    attributes: tuple[tuple[str, Any], ...] = ()
    consent: ConsentSignals = NO_SIGNALS
    limited_data_use: bool = False
    # Set by sources whose default rules decide the conversion type themselves
    # (flat records name an Amazon conversion type directly).
    conversion_type: str | None = None
    data_set_name: str | None = None
    # Flat records may name the advertiser; it must be the output's own.
    advertiser_id: str | None = None


@dataclass(frozen=True, slots=True)
class Dropped:
    """An inbound event that is not forwarded, and the one reason why (mapping.md §9)."""

    index: int
    reason: str
    detail: str | None = None  # what was wrong, for invalid_event

    def as_dict(self) -> dict[str, Any]:
        if self.detail is None:
            return {"index": self.index, "reason": self.reason}
        return {"index": self.index, "reason": self.reason, "detail": self.detail}


@dataclass(slots=True)
class ParsedBatch:
    """What a source adapter makes of one inbound payload."""

    events: list[CanonicalEvent] = field(default_factory=list)
    rejects: list[Dropped] = field(default_factory=list)
