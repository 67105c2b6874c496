"""Batches built and serialised by mParticle's official Python SDK map correctly.

The SDK (``mparticle``, the server-to-server client) builds the JSON a real sender
posts; ``ApiClient.sanitize_for_serialization`` is exactly what it puts on the wire.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from mapping_helpers import (
    EMAIL,
    EMAIL_KEY,
    IDFA,
    TS,
    TS_TEXT,
    ZERO_GUID,
    canonical,
    drops,
    events_of,
    run,
    sha256,
    single,
)
from mparticle import (
    ApiClient,
    AppEvent,
    Batch,
    CCPAConsentState,
    CommerceEvent,
    ConsentState,
    DeviceInformation,
    GDPRConsentState,
    Product,
    ProductAction,
    ProductImpression,
    UserIdentities,
)

from app.amazon.mapping import MapResult

AAID = "38400000-8CF0-11BD-B23E-10B96E40000D"
FIRE_ID = "df07c7dc-cea7-4a89-b328-810ff5acb15d"


def wire(batch: Batch) -> dict[str, Any]:
    """The JSON the SDK sends for a batch (its own serialisation, then real JSON)."""
    body: dict[str, Any] = json.loads(json.dumps(ApiClient.sanitize_for_serialization(batch)))
    return body


def send(batch: Batch, **settings_raw: Any) -> MapResult:
    return run("mparticle", wire(batch), settings_raw)


def device(platform: str = "iOS", **fields: Any) -> DeviceInformation:
    info = DeviceInformation()
    info.platform = platform
    info.locale_country = "US"
    for key, value in fields.items():
        setattr(info, key, value)
    return info


def identities(**fields: Any) -> UserIdentities:
    ids = UserIdentities()
    for key, value in fields.items():
        setattr(ids, key, value)
    return ids


def product(sku: str, price: float, quantity: float, **fields: Any) -> Product:
    item = Product(id=sku, name=f"Product {sku}", price=price, quantity=quantity)
    for key, value in fields.items():
        setattr(item, key, value)
    return item


def commerce_event(
    action: str, *products: Product, total: float | None = None, **fields: Any
) -> CommerceEvent:
    product_action = ProductAction(action)
    product_action.products = list(products)
    if total is not None:
        product_action.total_amount = total
    event = CommerceEvent(product_action)
    event.timestamp_unixtime_ms = TS
    for key, value in fields.items():
        setattr(event, key, value)
    return event


def batch_of(*events: Any, **fields: Any) -> Batch:
    batch = Batch()
    batch.environment = "production"
    batch.device_info = fields.pop("device_info", device())
    batch.user_identities = fields.pop("user_identities", identities(email=EMAIL))
    batch.events = list(events)
    for key, value in fields.items():
        setattr(batch, key, value)
    return batch


def test_sdk_serialises_what_the_adapter_reads() -> None:
    body = wire(batch_of(commerce_event("purchase", product("sku1", 10.0, 2), total=20.0)))
    assert body["events"][0]["event_type"] == "commerce_event"
    assert body["events"][0]["data"]["product_action"]["action"] == "purchase"
    assert body["user_identities"] == {"email": EMAIL}
    assert body["device_info"]["platform"] == "iOS"


def test_purchase_with_products() -> None:
    purchase = commerce_event(
        "purchase",
        product("sku1", 19.99, 2, brand="Acme", category="Tools"),
        product("sku2", 5.0, 1),
        total=44.975,
        event_id=6004677780660780000,
        currency_code="eur",
        custom_attributes={"coupon": "FALL", "country_code": "de", "channel": "app"},
    )
    batch = batch_of(
        purchase,
        device_info=device("Android", android_advertising_id=AAID),
        user_identities=identities(email=" Jane.Doe@Example.com ", mobile_number="0555 1234567"),
        ip="203.0.113.7",
    )
    result = send(batch, data_set_name="app_purchases", partner_name="acme_relay")
    assert canonical(result.requests) == canonical(
        [
            {
                "events": [
                    {
                        "eventDescription": {
                            "conversionType": "OFF_AMAZON_PURCHASES",
                            "eventSource": "ANDROID",
                            "name": "Purchase",
                            "eventIngestionMethod": "SERVER_TO_SERVER",
                            "dataSetName": "app_purchases",
                        },
                        "countryCode": "DE",
                        "matchKeys": [
                            {"type": "EMAIL", "values": [sha256("jane.doe@example.com")]},
                            {"type": "PHONE", "values": [sha256("495551234567")]},
                            {"type": "MAID", "values": [AAID.lower()]},
                        ],
                        "eventTime": TS_TEXT,
                        "eventId": "6004677780660780000",
                        "value": 44.98,
                        "currencyCode": "EUR",
                        "unitsSold": 3,
                        "customData": [
                            {"name": "coupon", "value": "FALL", "dataType": "STRING"},
                            {"name": "channel", "value": "app", "dataType": "STRING"},
                        ],
                        "consent": {"geo": {"ipAddress": "203.0.113.7"}},
                        "partner": "acme_relay",
                    }
                ]
            }
        ]
    )
    assert result.dropped == []


def test_add_to_cart() -> None:
    event = commerce_event("add_to_cart", product("sku9", 7.5, 4), total=30.0, currency_code="USD")
    out = single(send(batch_of(event, device_info=device("web"))))
    assert out["eventDescription"] == {
        "conversionType": "ADD_TO_SHOPPING_CART",
        "eventSource": "WEBSITE",
        "name": "Add To Cart",
        "eventIngestionMethod": "SERVER_TO_SERVER",
    }
    assert out["value"] == 30
    assert "currencyCode" not in out
    assert "unitsSold" not in out


def test_custom_event_and_impressions_are_dropped_not_commerce_event() -> None:
    app_event = AppEvent(event_name="Viewed Home", custom_event_type="navigation")
    app_event.timestamp_unixtime_ms = TS
    impression = ProductImpression()
    impression.product_impression_list = "Search results"
    impression.products = [product("sku1", 1.0, 1)]
    impressions_only = CommerceEvent(product_impressions=[impression])
    batch = batch_of(app_event, commerce_event("checkout", product("a", 1.0, 1)), impressions_only)
    body = wire(batch)
    assert [e["event_type"] for e in body["events"]] == [
        "custom_event",
        "commerce_event",
        "commerce_event",
    ]
    result = run("mparticle", body)
    assert drops(result) == {0: "not_commerce_event", 2: "not_commerce_event"}
    assert result.index_maps == [[1]]
    assert single(result)["eventDescription"]["conversionType"] == "CHECKOUT"


SDK_ACTIONS = [
    ("unknown", "OTHER"),
    ("add_to_cart", "ADD_TO_SHOPPING_CART"),
    ("remove_from_cart", "OTHER"),
    ("checkout", "CHECKOUT"),
    ("checkout_option", "OTHER"),
    ("click", "OTHER"),
    ("view_detail", "PAGE_VIEW"),
    ("purchase", "OFF_AMAZON_PURCHASES"),
    ("refund", "OTHER"),
    ("add_to_wishlist", "OTHER"),
    ("remove_from_wish_list", "OTHER"),
]


@pytest.mark.parametrize(
    ("action", "conversion_type"), SDK_ACTIONS, ids=[a for a, _ in SDK_ACTIONS]
)
def test_every_sdk_product_action(action: str, conversion_type: str) -> None:
    out = single(send(batch_of(commerce_event(action, product("a", 2.0, 1), total=2.0))))
    assert out["eventDescription"]["conversionType"] == conversion_type
    assert out["value"] == 2


SDK_PLATFORMS = [
    ("iOS", "IOS"),
    ("tvOS", "IOS"),
    ("Android", "ANDROID"),
    ("fire_tv", "FIRE_TV"),
    ("web", "WEBSITE"),
    ("roku", "OFFLINE"),
    ("alexa", "OFFLINE"),
    ("smart_tv", "OFFLINE"),
    ("xbox", "OFFLINE"),
    ("out_of_band", "OFFLINE"),
    ("Unknown", "OFFLINE"),
]


@pytest.mark.parametrize(("platform", "source"), SDK_PLATFORMS, ids=[p for p, _ in SDK_PLATFORMS])
def test_every_sdk_platform(platform: str, source: str) -> None:
    out = single(send(batch_of(commerce_event("purchase"), device_info=device(platform))))
    assert out["eventDescription"]["eventSource"] == source


@pytest.mark.parametrize(
    ("fields", "maid"),
    [
        ({"ios_advertising_id": IDFA}, IDFA.lower()),
        ({"android_advertising_id": AAID}, AAID.lower()),
        ({"fire_advertising_id": FIRE_ID}, FIRE_ID),
        ({"fire_advertising_id": FIRE_ID, "android_advertising_id": AAID}, AAID.lower()),
        ({"ios_advertising_id": ZERO_GUID, "fire_advertising_id": FIRE_ID}, FIRE_ID),
    ],
    ids=["idfa", "aaid", "fire", "android-before-fire", "zero-idfa-skipped"],
)
def test_device_ids(fields: dict[str, Any], maid: str) -> None:
    batch = batch_of(
        commerce_event("purchase"),
        device_info=device("iOS", **fields),
        user_identities=identities(),
    )
    assert single(send(batch))["matchKeys"] == [{"type": "MAID", "values": [maid]}]


def test_identities_incl_customerid_spelling() -> None:
    ids = identities(
        email="Buyer@Example.com",
        customerid="CRM-1001",
        mobile_number="n/a",
        phone_number_2="(415) 555-2671",
        other="ignored",
        facebook="ignored",
    )
    body = wire(batch_of(commerce_event("purchase"), user_identities=ids))
    assert body["user_identities"]["customerid"] == "CRM-1001"  # the SDK's spelling
    standard = single(run("mparticle", body))["matchKeys"]
    assert standard == [
        {"type": "EMAIL", "values": [sha256("buyer@example.com")]},
        {"type": "PHONE", "values": [sha256("14155552671")]},
    ]
    extended = single(run("mparticle", body, {"match_keys": "extended"}))["matchKeys"]
    assert extended == [*standard, {"type": "MATCH_ID", "values": ["CRM-1001"]}]


def test_user_attributes_for_country_and_extended_keys() -> None:
    info = DeviceInformation()
    info.platform = "web"
    batch = batch_of(
        commerce_event("purchase"),
        device_info=info,
        user_attributes={
            "$Country": "Canada",
            "$FirstName": "Zoë",
            "$City": "Montréal",
            "$State": "Quebec",
            "$Zip": "H2X 1Y4",
        },
    )
    out = single(send(batch, match_keys="extended"))
    assert out["countryCode"] == "CA"
    assert out["matchKeys"] == [
        EMAIL_KEY,
        {"type": "FIRST_NAME", "values": [sha256("zo")]},
        {"type": "CITY", "values": [sha256("montral")]},
        {"type": "STATE", "values": [sha256("qc")]},
        {"type": "POSTAL", "values": [sha256("h2x1y4")]},
    ]


def consent(ccpa_out: bool | None = None, **gdpr: bool) -> ConsentState:
    state = ConsentState()
    if ccpa_out is not None:
        state.ccpa = {"data_sale_opt_out": CCPAConsentState("ccpa_doc_v1", ccpa_out, TS)}
    state.gdpr = {
        purpose: GDPRConsentState(f"{purpose}_v2", consented, TS, "17 Cherry Tree Lane")
        for purpose, consented in gdpr.items()
    }
    return state


PURPOSES = {
    "consent_purpose_user_data": "data_sharing",
    "consent_purpose_ad_storage": "advertising",
}


@pytest.mark.parametrize(
    ("state", "raw", "expected"),
    [
        (
            consent(data_sharing=True, advertising=False),
            PURPOSES,
            {"amznUserData": "GRANTED", "amznAdStorage": "DENIED"},
        ),
        (
            consent(data_sharing=True, advertising=True),
            PURPOSES,
            {"amznUserData": "GRANTED", "amznAdStorage": "GRANTED"},
        ),
        (consent(data_sharing=False), PURPOSES, {"amznUserData": "DENIED"}),
        (
            consent(True, data_sharing=True, advertising=True),
            PURPOSES,
            {"amznUserData": "DENIED", "amznAdStorage": "DENIED"},
        ),
        (consent(False, data_sharing=True), PURPOSES, {"amznUserData": "GRANTED"}),
        (consent(True), {}, {"amznUserData": "DENIED", "amznAdStorage": "DENIED"}),
        (consent(data_sharing=True), {}, None),
        (consent(location_collection=True), PURPOSES, None),
    ],
    ids=[
        "gdpr-granted-denied",
        "gdpr-both-granted",
        "gdpr-denied",
        "ccpa-opt-out-wins",
        "ccpa-not-opted-out",
        "ccpa-only",
        "no-purposes-configured",
        "other-purpose",
    ],
)
def test_consent_state_to_derived_consent(
    state: ConsentState, raw: dict[str, Any], expected: dict[str, str] | None
) -> None:
    body = wire(batch_of(commerce_event("purchase"), consent_state=state))
    assert "consent_state" in body
    out = single(run("mparticle", body, raw))
    if expected is None:
        assert "consent" not in out
    else:
        assert out["consent"] == {"amazonConsent": expected}


def test_consent_state_with_require_granted_and_eu() -> None:
    granted = batch_of(commerce_event("purchase"), consent_state=consent(data_sharing=True))
    denied = batch_of(commerce_event("purchase"), consent_state=consent(data_sharing=False))
    raw = {**PURPOSES, "consent_mode": "require_granted", "region": "EU"}
    assert len(events_of(send(granted, **raw))) == 1
    assert drops(send(denied, **raw)) == {0: "consent_denied"}
    no_signal = batch_of(commerce_event("purchase"))
    assert drops(send(no_signal, region="EU")) == {0: "missing_consent"}


def test_explicit_consent_attributes_win_over_consent_state() -> None:
    event = commerce_event(
        "purchase", custom_attributes={"amzn_user_data": "granted", "amzn_ad_storage": "true"}
    )
    batch = batch_of(event, consent_state=consent(True))
    assert single(send(batch))["consent"] == {
        "amazonConsent": {"amznUserData": "GRANTED", "amznAdStorage": "GRANTED"}
    }


def test_many_sdk_events_keep_order_and_indexes() -> None:
    events: list[Any] = []
    for i in range(12):
        if i % 4 == 3:
            events.append(AppEvent(event_name=f"noise {i}", custom_event_type="other"))
        else:
            events.append(commerce_event("purchase", event_id=f"sdk-{i}"))
    result = send(batch_of(*events))
    assert result.index_maps == [[i for i in range(12) if i % 4 != 3]]
    assert [e["eventId"] for e in events_of(result)] == [f"sdk-{i}" for i in result.index_maps[0]]
    assert drops(result) == {
        3: "not_commerce_event",
        7: "not_commerce_event",
        11: "not_commerce_event",
    }
