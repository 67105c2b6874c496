"""The only code that talks to the Amazon Events API.

One request per call, through the relay's shared HTTP client. It classifies
nothing: ``results.read_answer`` decides what the answer means.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from app import metrics
from app.http import HttpClient, TransportError


@dataclass(frozen=True, slots=True)
class Answer:
    status: int | None  # None: no HTTP answer (timeout, connection error)
    body: bytes  # as received: read_answer parses only what it needs
    retry_after: str | None
    error: str | None = None


async def send_events(
    http: HttpClient,
    url: str,
    *,
    access_token: str,
    client_id: str,
    account_id: str,
    body: bytes,
) -> Answer:
    headers = {
        "Authorization": f"Bearer {access_token}",
        "Amazon-Ads-ClientId": client_id,
        "Amazon-Ads-AccountId": account_id,
        "Content-Type": "application/json",
        "Accept": "application/json",
    }
    start = time.perf_counter()
    try:
        response = await http.post(url, content=body, headers=headers)
    except TransportError as failure:
        metrics.AMAZON_REQUESTS.labels(status_class="error").inc()
        return Answer(None, b"", None, error=str(failure))
    finally:
        metrics.AMAZON_REQUEST_SECONDS.observe(time.perf_counter() - start)
    metrics.AMAZON_REQUESTS.labels(status_class=metrics.status_class(response.status)).inc()
    return Answer(response.status, response.body, response.headers.get("retry-after"))
