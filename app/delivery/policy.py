"""When to try a delivery again (service.md §Delivery semantics); pure.

First retry after 1 s, doubling, capped at 5 minutes, ±20 % jitter; Amazon's
Retry-After wins when it is given (capped at an hour by ``results``). The retries
are persisted in the database between attempts, which is why this is a few lines
here rather than an in-process retry library such as stamina.
"""

from __future__ import annotations

import random

FIRST_DELAY = 1.0
MAX_DELAY = 300.0
JITTER = 0.2


def backoff_seconds(
    attempts: int,
    retry_after: float | None,
    rng: random.Random,
    *,
    first: float = FIRST_DELAY,
    cap: float = MAX_DELAY,
) -> float:
    """Seconds to wait after the ``attempts``-th failed attempt (1-based).

    ``first`` and ``cap`` are the service's 1 s and 5 minutes; they are parameters
    (``DispatcherConfig``) so that fault tests can run the same policy in milliseconds.
    """
    if retry_after is not None:
        return retry_after
    base = min(first * 2.0 ** max(attempts - 1, 0), cap)
    return base * (1 + rng.uniform(-JITTER, JITTER))
