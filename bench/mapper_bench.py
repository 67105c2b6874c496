"""Mapper throughput vs the floor on the same bytes (issue: relay core).

Realistic inbound mParticle batches: 100 purchase events of one user, 3 products
each, email + phone + MAID, consent state, custom attributes. Every batch has its
own user, so no cache carries work from one batch to the next.

The floor does the least any relay must do with these bytes: ``orjson.loads`` of
the input, ``orjson.dumps`` of an output of equal size and one SHA-256 per event.
The mapper is measured end to end: decode, adapter, mapper, ``orjson.dumps`` of
the Amazon requests. Both run in this process, interleaved, and the ratio of
their speeds is what we report, because absolute speeds drift on shared machines.

    .venv/bin/python bench/mapper_bench.py [--batches 400] [--rounds 5]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import statistics
import time
from datetime import UTC, datetime
from typing import Any

import orjson

from app.amazon.settings import OutputSettings
from app.pipeline import map_payload

NOW = datetime(2025, 11, 23, 20, 0, tzinfo=UTC)
EVENT_MS = 1763900000000


def make_batch(user: int, events: int = 100) -> bytes:
    batch = {
        "environment": "production",
        "ip": f"203.0.{user % 250}.{user % 200 + 1}",
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


def run_mapper(bodies: list[bytes], settings: OutputSettings) -> int:
    events = 0
    for body in bodies:
        result = map_payload("mparticle", body, settings=settings, now=NOW)
        for request in result.requests:
            orjson.dumps(request)
        events += result.forwarded
    return events


def run_floor(bodies: list[bytes], outputs: list[Any]) -> int:
    events = 0
    for body, output in zip(bodies, outputs, strict=True):
        batch = orjson.loads(body)
        orjson.dumps(output)  # an output of the same size, already built
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
    warm = [make_batch(10_000_000 + n) for n in range(20)]
    run_mapper(warm, settings)  # imports, phone metadata, country database
    rounds_mapper, rounds_floor = [], []
    for r in range(args.rounds):
        bodies = [make_batch(r * args.batches + n) for n in range(args.batches)]
        outputs = []
        for body in bodies:
            result = map_payload("mparticle", body, settings=settings, now=NOW)
            outputs.append(orjson.loads(orjson.dumps(result.requests[0])))
        # The mapper gets batches of users it has never seen (no cache carries over).
        fresh = [make_batch(1_000_000 + r * args.batches + n) for n in range(args.batches)]
        floor_s = mapper_s = 0.0
        floor_n = mapper_n = 0
        # Interleaved in small slices, so both sides see the same machine conditions.
        for i in range(0, args.batches, args.chunk):
            seconds, events = timed(
                run_floor, bodies[i : i + args.chunk], outputs[i : i + args.chunk]
            )
            floor_s, floor_n = floor_s + seconds, floor_n + events
            seconds, events = timed(run_mapper, fresh[i : i + args.chunk], settings)
            mapper_s, mapper_n = mapper_s + seconds, mapper_n + events
        rounds_floor.append(floor_n / floor_s)
        rounds_mapper.append(mapper_n / mapper_s)
    mapper = statistics.median(rounds_mapper)
    floor = statistics.median(rounds_floor)
    ratios = sorted(m / f for m, f in zip(rounds_mapper, rounds_floor, strict=True))
    size = len(make_batch(0))
    print(
        f"machine: {platform.machine()} {os.cpu_count()} cores, python {platform.python_version()}"
    )
    print(
        f"input: {args.batches} batches x 100 events per round, {size / 1024:.0f} KiB per batch, "
        f"{args.rounds} rounds, CPU time"
    )
    print(f"floor  (orjson loads + dumps + sha256/event): {floor:>10,.0f} events/s per core")
    print(f"mapper (decode + adapt + map + dumps):        {mapper:>10,.0f} events/s per core")
    print(
        f"ratio mapper/floor: {mapper / floor:.2f} (rounds {ratios[0]:.2f}..{ratios[-1]:.2f}; "
        f"target >= 0.40)"
    )


if __name__ == "__main__":
    main()
