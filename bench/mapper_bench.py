"""Mapper throughput vs the floor on the same bytes (issue: relay core).

Realistic inbound mParticle batches: 100 purchase events of one user, 3 products
each, email + phone + MAID, consent state, custom attributes. Every batch has its
own user, never seen before, so no cache carries per-user work from one batch to the
next; every batch has the same size (fixed-width user numbers and addresses).

The floor does the least any relay must do with these bytes: ``orjson.loads`` of
the input, ``orjson.dumps`` of an output of equal size (checked) and one SHA-256 per
event. The mapper is measured end to end on the same input bytes: decode, adapter,
mapper, ``orjson.dumps`` of the Amazon requests (what ``relay map``, the preview and
ingest's mapping step do; ``app.pipeline.map_payload``). Both run in this process,
interleaved in small slices whose order alternates, timed in CPU time, and the ratio
of their speeds is what we report, because absolute speeds drift on shared machines.

A second line measures the ingest route's decoding as it is today (``strict_json``
and the route's shape check, ``app/api/ingest.py``) in front of the same mapping,
for comparison; it is not the mapper's figure.

    .venv/bin/python bench/mapper_bench.py [--batches 400] [--rounds 5]
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import os
import platform
import statistics
import time
from datetime import UTC, datetime
from typing import Any

import orjson

from app.amazon.settings import OutputSettings
from app.pipeline import map_parsed, map_payload

NOW = datetime(2025, 11, 23, 20, 0, tzinfo=UTC)
USERS = 10_000_000  # user numbers have 8 digits: every batch has the same size
EVENT_MS = 1763900000000


def make_batch(user: int, events: int = 100) -> bytes:
    batch = {
        "environment": "production",
        "ip": f"203.0.{100 + user % 150}.{100 + user // 150 % 150}",
        "mpid": str(7_000_000_000_000_000_000 + user),
        "device_info": {
            "platform": "iOS",
            "ios_advertising_id": f"aebe52e7-03ee-455a-b3c4-{user:012d}",
            "locale_country": "US",
            "device_model": "iPhone15,2",
            "os_version": "17.1",
        },
        "application_info": {"application_name": "Shop", "application_version": "4.2.0"},
        "user_identities": {
            "email": f" Shopper.{user}@Example.com ",
            "mobile_number": f"+1 (415) 555-{user % 10000:04d}",
            "customer_id": f"cust-{user}",
        },
        "user_attributes": {"$firstname": "Jane", "$lastname": "Doe", "$country": "US"},
        "consent_state": {
            "gdpr": {"marketing": {"consented": True, "timestamp_unixtime_ms": EVENT_MS}},
            "ccpa": {"data_sale_opt_out": {"consented": False}},
        },
        "events": [
            {
                "event_type": "commerce_event",
                "data": {
                    "event_id": str(6_004_677_780_660_780_000 + user * 1000 + i),
                    "timestamp_unixtime_ms": EVENT_MS + i * 1000,
                    "currency_code": "usd",
                    "custom_attributes": {
                        "coupon": "FALL",
                        "channel": "app",
                        "loyalty_tier": "gold",
                        "items_in_cart": 3,
                        "amzn_user_data": "granted",
                    },
                    "product_action": {
                        "action": "purchase",
                        "transaction_id": f"T-{user}-{i}",
                        "total_amount": 59.985 + i,
                        "products": [
                            {"id": "sku1", "name": "Shirt", "price": 19.99, "quantity": 1},
                            {"id": "sku2", "name": "Socks", "price": 4.995, "quantity": "2"},
                            {"id": "sku3", "name": "Hat", "price": 30.0, "quantity": 1},
                        ],
                    },
                },
            }
            for i in range(events)
        ],
    }
    return orjson.dumps(batch)


def run_mapper(bodies: list[bytes], settings: OutputSettings, sizes: list[int]) -> int:
    events = 0
    for body in bodies:
        result = map_payload("mparticle", body, settings=settings, now=NOW)
        for request in result.requests:
            sizes.append(len(orjson.dumps(request)))
        events += result.forwarded
    return events


def run_ingest_decoding(bodies: list[bytes], settings: OutputSettings, sizes: list[int]) -> int:
    from app.api.deps import strict_json
    from app.sources import adapter

    events = 0
    for body in bodies:
        payload = strict_json(body)
        adapter("mparticle").parse(payload)  # the route's shape check, as in app/api/ingest.py
        result = map_parsed(payload, "mparticle", settings=settings, now=NOW)
        for request in result.requests:
            sizes.append(len(orjson.dumps(request)))
        events += result.forwarded
    return events


def run_floor(bodies: list[bytes], output: Any) -> int:
    events = 0
    for body in bodies:
        batch = orjson.loads(body)
        orjson.dumps(output)  # an output of the same size as the mapper's, already built
        for event in batch["events"]:
            hashlib.sha256(event["data"]["event_id"].encode()).hexdigest()
            events += 1
    return events


def timed(work: object, *args: object) -> tuple[float, int]:
    # CPU time of this process: other load on a shared machine does not count against
    # either side, which is what "events/s per core" means.
    start = time.process_time()
    events = work(*args)  # type: ignore[operator]
    return time.process_time() - start, events


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=400, help="batches per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--chunk", type=int, default=10, help="batches per interleaved slice")
    args = parser.parse_args()
    settings = OutputSettings.from_mapping(
        {
            "data_set_name": "app_purchases",
            "partner_name": "relay",
            "consent_purpose_user_data": "marketing",
        }
    )
    load_before = os.getloadavg()
    warm = [make_batch(USERS + n) for n in range(20)]
    run_mapper(warm, settings, [])  # imports, phone metadata, country database
    run_ingest_decoding(warm, settings, [])
    # The floor's output: the mapper's own output for a batch of the same size.
    twin = map_payload("mparticle", make_batch(USERS + 999), settings=settings, now=NOW)
    output = orjson.loads(orjson.dumps(twin.requests[0]))
    output_size = len(orjson.dumps(output))
    gc.freeze()  # what setup left alive is not the mapper's garbage to collect
    rounds_mapper, rounds_floor, rounds_ingest, ratios, ingest_ratios = [], [], [], [], []
    for r in range(args.rounds):
        # Users never seen before, in this round or any other (no cache carries over).
        first = USERS + 1000 + r * 2 * args.batches
        bodies = [make_batch(first + n) for n in range(args.batches)]
        ingest_bodies = [make_batch(first + args.batches + n) for n in range(args.batches)]
        seconds = {"floor": 0.0, "mapper": 0.0, "ingest": 0.0}
        events = {"floor": 0, "mapper": 0, "ingest": 0}
        sizes: list[int] = []
        # Interleaved in small slices, so all sides see the same machine conditions;
        # the order alternates, so none is always the one that finds the bytes cached.
        for slice_number, i in enumerate(range(0, args.batches, args.chunk)):
            chunk = slice(i, i + args.chunk)
            runs = [
                ("floor", run_floor, (bodies[chunk], output)),
                ("mapper", run_mapper, (bodies[chunk], settings, sizes)),
                ("ingest", run_ingest_decoding, (ingest_bodies[chunk], settings, sizes)),
            ]
            for side, work, work_args in runs if slice_number % 2 else reversed(runs):
                spent, count = timed(work, *work_args)
                seconds[side] += spent
                events[side] += count
        if set(sizes) != {output_size}:
            raise SystemExit(f"output sizes {sorted(set(sizes))} differ from the floor's")
        speed = {side: events[side] / seconds[side] for side in seconds}
        rounds_floor.append(speed["floor"])
        rounds_mapper.append(speed["mapper"])
        rounds_ingest.append(speed["ingest"])
        ratios.append(speed["mapper"] / speed["floor"])
        ingest_ratios.append(speed["ingest"] / speed["floor"])
    mapper = statistics.median(rounds_mapper)
    floor = statistics.median(rounds_floor)
    ingest = statistics.median(rounds_ingest)
    ratios.sort()
    size = len(make_batch(USERS))
    load_after = os.getloadavg()
    print(
        f"machine: {platform.machine()} {os.cpu_count()} cores, python {platform.python_version()}"
        f", load average {load_before[0]:.2f} before, {load_after[0]:.2f} after"
    )
    print(
        f"input: {args.batches} batches x 100 events per round, {size / 1024:.0f} KiB per batch, "
        f"output {output_size / 1024:.0f} KiB per batch, {args.rounds} rounds, CPU time"
    )
    print(f"floor  (orjson loads + dumps + sha256/event): {floor:>10,.0f} events/s per core")
    print(f"mapper (decode + adapt + map + dumps):        {mapper:>10,.0f} events/s per core")
    print(
        f"ratio mapper/floor: {statistics.median(ratios):.2f} (median of rounds; rounds "
        f"{ratios[0]:.2f}..{ratios[-1]:.2f}; target >= 0.40)"
    )
    print(
        f"for comparison, ingest route decoding (strict_json + shape check) + mapping: "
        f"{ingest:,.0f} events/s per core, ratio {statistics.median(ingest_ratios):.2f}"
    )


if __name__ == "__main__":
    main()
