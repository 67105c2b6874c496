"""Every Prometheus metric of the relay, declared once, with bounded labels only.

Labels never carry ids, names or raw paths: ``source`` is one of the registered
sources, ``reason`` a drop reason of mapping.md §9, ``code`` one of Amazon's error
codes, ``outcome`` and ``status_class`` small fixed sets.

Several worker processes: when ``PROMETHEUS_MULTIPROC_DIR`` is set (``relay serve``
sets it for more than one worker) the client library writes each process's values
to files there and ``render`` merges them, so any worker answers for all.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector

EVENTS_RECEIVED = Counter(
    "relay_events_received_total", "Inbound events received, by source.", ["source"]
)
EVENTS_FORWARDED = Counter(
    "relay_events_forwarded_total", "Events queued for Amazon, by source.", ["source"]
)
EVENTS_DROPPED = Counter(
    "relay_events_dropped_total",
    "Events not forwarded, by source and reason.",
    ["source", "reason"],
)
EVENTS_REJECTED = Counter(
    "relay_events_rejected_total", "Events Amazon rejected, by Amazon's error code.", ["code"]
)
CUSTOM_DATA_SKIPPED = Counter(
    "relay_custom_data_skipped_total",
    "Custom attributes not sent as customData (bad name, null/object value, past 13).",
    ["source"],
)
DELIVERIES = Counter(
    "relay_deliveries_total",
    "Delivery attempts by outcome (delivered, partial, retry, failed, dead, reauth).",
    ["outcome"],
)
AMAZON_REQUESTS = Counter(
    "relay_amazon_requests_total",
    "Requests to the Amazon Events API by status class (2xx, 4xx, 5xx, error).",
    ["status_class"],
)
TOKEN_REFRESHES = Counter(
    "relay_token_refreshes_total",
    "Login with Amazon token refreshes by outcome (ok, invalid_grant, error).",
    ["outcome"],
)
INGEST_SECONDS = Histogram(
    "relay_ingest_seconds",
    "Time to accept one inbound request (map + durable write).",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
AMAZON_REQUEST_SECONDS = Histogram(
    "relay_amazon_request_seconds",
    "Duration of one Events API request.",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
BATCH_EVENTS = Histogram(
    "relay_batch_events",
    "Events per inbound batch.",
    buckets=(1, 5, 10, 25, 50, 100, 250, 500, 1000),
)


# The values of app.db.models.OutputStatus (not imported: metrics stays free of the ORM).
OUTPUT_STATUSES = ("needs_login", "configured", "needs_reauth")


def status_class(status: int | None) -> str:
    return "error" if status is None else f"{status // 100}xx"


class QueueGauges:
    """Gauges read from the database at scrape time (set just before render): the
    queue, and the states an operator must act on (dead deliveries, outputs needing a
    new Login with Amazon), which counters over a time window only approximate."""

    def __init__(
        self,
        depth: float,
        oldest_seconds: float,
        dead: float = 0,
        outputs_by_status: Mapping[str, int] | None = None,
    ) -> None:
        self.depth = depth
        self.oldest_seconds = oldest_seconds
        self.dead = dead
        self.outputs_by_status = outputs_by_status or {}

    def collect(self) -> Iterable[Metric]:
        yield GaugeMetricFamily(
            "relay_queue_depth", "Deliveries waiting to be sent.", value=self.depth
        )
        yield GaugeMetricFamily(
            "relay_queue_oldest_seconds",
            "Age of the oldest delivery waiting to be sent.",
            value=self.oldest_seconds,
        )
        yield GaugeMetricFamily(
            "relay_deliveries_dead",
            "Deliveries that ran out of time (kept, retryable by an admin).",
            value=self.dead,
        )
        outputs = GaugeMetricFamily(
            "relay_outputs", "Outputs by status (needs_login, configured, ...).", labels=["status"]
        )
        for status in OUTPUT_STATUSES:  # every status, zero included: alerts see 0, not absent
            outputs.add_metric([status], self.outputs_by_status.get(status, 0))
        yield outputs


def render(queue: QueueGauges | None = None) -> bytes:
    """The Prometheus text exposition for this process, or for all workers."""
    registry = CollectorRegistry()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    else:
        from prometheus_client import REGISTRY

        registry = REGISTRY
    text = generate_latest(registry)
    if queue is not None:
        extra = CollectorRegistry()
        extra.register(queue)
        text += generate_latest(extra)
    return text
