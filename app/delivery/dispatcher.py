"""The dispatcher: claims due deliveries and sends each as one Events API request.

Runs inside every ``relay serve`` process. A claim is one statement that leases what
it takes (``repository.claim_statement``: SKIP LOCKED on PostgreSQL), the request is
sent outside any transaction, and the outcome is written by another statement that
only succeeds while this process still holds the lease. A process that dies
loses nothing: its leases run out and another process claims the work again.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import secrets
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import orjson
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_delay,
    wait_exponential_jitter,
)

from app import lwa, metrics
from app.amazon.client import Answer, send_events
from app.amazon.endpoints import Endpoints
from app.amazon.results import Reading, Verdict, read_answer
from app.crypto import SecretText
from app.db import repository as repo
from app.db.base import utcnow
from app.db.hot import Claimed, HotStatements, SessionStatements
from app.db.models import Delivery, DeliveryStatus, Output, OutputStatus
from app.delivery.policy import FIRST_DELAY, MAX_DELAY, backoff_seconds
from app.http import HttpClient
from app.logs import get_logger
from app.tokens import NotLoggedInError, TokenService

log = get_logger(__name__)

IDLE_POLL_SECONDS = 1.0  # other processes may queue work this one is not told about
# Backpressure: deliveries this process queued without a free slot, while its claim loop
# keeps finding more due work than it has slots for. Past this many, ingest answers 503
# with Retry-After rather than accepting without bound: at the 150-270 deliveries/s one
# worker sustained in the end-to-end bench (docs/benchmarks.md), that is 4-7 s of work
# already waiting.
BACKLOG_LIMIT = 1_000


@dataclass(frozen=True, slots=True)
class DispatcherConfig:
    client_id: str
    max_age_seconds: float
    lease_seconds: float
    concurrency: int = 16
    shutdown_grace_seconds: float = 10.0
    # The backoff policy (service.md: first retry after 1 s, doubling, capped at 5 min);
    # injectable so tests exercise the real policy at a faster pace.
    first_retry_seconds: float = FIRST_DELAY
    max_retry_seconds: float = MAX_DELAY


def worker_name() -> str:
    """Who holds a lease: host, pid and a random part. In containers every relay is
    pid 1, and a hostname cut to fit can lose the part that tells replicas apart
    (Kubernetes ends pod names with it), so host and pid alone could name two processes
    alike, and one's release would hand back the other's deliveries."""
    return f"{socket.gethostname()[:40]}:{os.getpid()}:{secrets.token_hex(4)}"


class Dispatcher:
    def __init__(
        self,
        sessionmaker: async_sessionmaker[AsyncSession],
        http: HttpClient,
        tokens: TokenService,
        endpoints: Endpoints,
        config: DispatcherConfig,
        *,
        clock: Callable[[], datetime] = utcnow,
        rng: random.Random | None = None,
        worker_id: str | None = None,
        autocommit: async_sessionmaker[AsyncSession] | None = None,
        statements: HotStatements | None = None,
    ) -> None:
        self._sessionmaker = sessionmaker
        # Outcomes are one UPDATE each: no BEGIN and COMMIT round trips, and on
        # PostgreSQL straight through the driver (app/db/hot.py).
        self._statements = statements or SessionStatements(autocommit or sessionmaker)
        self._http = http
        self._tokens = tokens
        self._endpoints = endpoints
        self._config = config
        self._clock = clock
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not security
        self.worker_id = worker_id or worker_name()
        self._wake = asyncio.Event()
        self._stopping = False
        self._in_flight: set[asyncio.Task[None]] = set()
        # Slots promised to ingest transactions still running (Handoff): counted as busy,
        # so the claim loop does not fill them meanwhile.
        self._reserved = 0
        self._slot_freed = asyncio.Event()
        self._no_reservation = asyncio.Event()
        self._no_reservation.set()
        self._backlog = 0
        self._stopped = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # --- life cycle --------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="relay-dispatcher")

    def handoff(self, output: Output) -> Handoff:
        """A handoff for deliveries an ingest request of this process is about to queue."""
        return Handoff(self, output)

    @property
    def overloaded(self) -> bool:
        """Ingest should refuse for now: far more is queued here than is being sent."""
        return self._backlog >= BACKLOG_LIMIT

    def queued(self, count: int) -> None:
        """``count`` deliveries were queued pending by this process (no slot for them)."""
        if self._task is not None:  # a process without a running dispatcher never refuses
            self._backlog += count

    def _reserve(self, wanted: int) -> int:
        if self._task is None or self._stopping or wanted <= 0:
            return 0  # not running (create_app(dispatcher=False)), or shutting down
        free = self._config.concurrency - len(self._in_flight) - self._reserved
        granted = max(0, min(wanted, free))
        self._reserved += granted
        if granted:
            self._no_reservation.clear()
        return granted

    def _unreserve(self, count: int) -> None:
        self._reserved -= count
        if self._reserved == 0:
            self._no_reservation.set()
        if count:
            # Only the wait for a free slot hears this: waking the claim loop itself
            # would spend a claim transaction on rows this process just handed over.
            self._slot_freed.set()

    def _start_sends(self, deliveries: Sequence[Delivery], output: Output) -> None:
        for delivery in deliveries:
            self._start_send(delivery, output)

    def _start_send(self, delivery: Delivery, output: Output) -> None:
        task = asyncio.create_task(self._send_one(delivery, output))
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)

    def wake(self) -> None:
        """New work was queued by this process: claim now instead of at the next poll."""
        self._wake.set()

    async def stop(self) -> None:
        """Stop claiming; let in-flight sends finish for a while, then hand back the rest."""
        self._stopping = True
        self._stopped.set()
        self._wake.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        # Ingest transactions holding slots end within moments: wait for their handoffs,
        # so that what they leased is sent or released below, not left to its lease.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                self._no_reservation.wait(), timeout=self._config.shutdown_grace_seconds
            )
        if self._in_flight:
            _, pending = await asyncio.wait(
                self._in_flight, timeout=self._config.shutdown_grace_seconds
            )
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        async with self._sessionmaker() as session, session.begin():
            released = await repo.release(session, self.worker_id, now=self._clock())
        if released:
            log.info("dispatcher_released", deliveries=released)

    async def _run(self) -> None:
        while not self._stopping:
            if len(self._in_flight) + self._reserved >= self._config.concurrency:
                await self._wait_for_a_free_slot()
                continue
            # Cleared before the claim, not after it: a wake() that comes while this
            # round claims or plans its sleep must cut that sleep short, not be lost.
            self._wake.clear()
            try:
                claimed = await self._claim()
            except Exception:  # the database may be away for a while: keep trying
                log.exception("dispatcher_claim_failed")
                claimed = []
                await asyncio.sleep(IDLE_POLL_SECONDS)
            for delivery, output in claimed:
                self._start_send(delivery, output)
            if not claimed:
                await self._idle()

    async def _wait_for_a_free_slot(self) -> None:
        """All slots busy: nothing can be claimed until a send ends, so wait for one
        (or for stop) instead of asking the database again and again meanwhile. Slots
        reserved by ingest transactions come back through _slot_freed."""
        self._slot_freed.clear()
        waiters = {
            asyncio.ensure_future(self._stopped.wait()),
            asyncio.ensure_future(self._slot_freed.wait()),
        }
        try:
            await asyncio.wait(
                {*self._in_flight, *waiters},
                timeout=IDLE_POLL_SECONDS,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            for waiter in waiters:
                waiter.cancel()

    async def _idle(self) -> None:
        delay = IDLE_POLL_SECONDS
        with contextlib.suppress(Exception):
            async with self._sessionmaker() as session:
                due = await repo.next_due_at(session)
            if due is not None:
                delay = min(delay, max((due - self._clock()).total_seconds(), 0.0))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout=max(delay, 0.005))

    async def _claim(self) -> list[Claimed]:
        free = self._config.concurrency - len(self._in_flight) - self._reserved
        if free <= 0:  # _run waits for a free slot first; this only guards the arithmetic
            return []
        # One statement with the outputs it needs (app/db/hot.py): on PostgreSQL one
        # round trip, where a session took five (BEGIN, pick, claim, output, COMMIT).
        claimed = await self._statements.claim_due(
            self.worker_id, free, self._clock(), self._config.lease_seconds
        )
        # An estimate, corrected by every claim: one that found less than it could
        # take means no due work is waiting (other processes may have taken ours).
        if len(claimed) < free:
            self._backlog = 0
        else:
            self._backlog = max(0, self._backlog - len(claimed))
        return claimed

    # --- one delivery ------------------------------------------------------------------

    async def _send_one(self, delivery: Delivery, output: Output) -> None:
        try:
            await self._deliver(delivery, output)
        except asyncio.CancelledError:
            raise
        except Exception:  # never lose the delivery: its lease brings it back
            log.exception("delivery_crashed", delivery_id=delivery.id)

    def _too_old(self, delivery: Delivery, now: datetime) -> bool:
        return (now - delivery.queued_at).total_seconds() > self._config.max_age_seconds

    async def _deliver(self, delivery: Delivery, output: Output) -> None:
        # An attempt (token, send, and the one refresh and resend after a 401) ends by
        # half the lease, and writing its outcome may take the other half
        # (_record_while_leased). Unbounded, a slow answer plus a refresh plus a resend
        # could outlast the lease: another claim would then send the batch while this
        # one still waits, and this one's outcome would overwrite the other's.
        budget = self._config.lease_seconds / 2
        try:
            async with asyncio.timeout(budget):
                exchanged = await self._exchange(delivery, output)
        except TimeoutError:
            error = f"no answer within {budget:g} s (half the delivery lease)"
            await self._retry(delivery, None, None, error=error)
            return
        if exchanged is not None:
            await self._record_while_leased(delivery, *exchanged)

    async def _exchange(self, delivery: Delivery, output: Output) -> tuple[Answer, Reading] | None:
        """Amazon's answer to this attempt and its reading; None if the attempt ended
        before an answer worth recording (handed back, or rescheduled)."""
        try:
            token = await self._tokens.access_token(output.id, output.region)
        except lwa.InvalidGrantError:
            # The output is needs_reauth now: hand the delivery back uncounted; it waits.
            await self._release(delivery, "reauth")
            return None
        except NotLoggedInError:
            await self._release(delivery, "reauth")
            return None
        except lwa.LwaError as error:
            await self._retry(delivery, None, None, error=f"token refresh failed: {error}")
            return None
        answer = await self._send(delivery, output, token)
        reading = read_answer(answer.status, answer.body, answer.retry_after, delivery.index_map)
        if reading.verdict is Verdict.REFRESH:
            # One refresh and one resend (service.md: 401 → refresh, retry once).
            try:
                token = await self._tokens.access_token(output.id, output.region, stale=token)
            except lwa.InvalidGrantError:
                await self._release(delivery, "reauth")
                return None
            except (lwa.LwaError, NotLoggedInError) as error:
                await self._retry(delivery, 401, None, error=f"token refresh failed: {error}")
                return None
            answer = await self._send(delivery, output, token)
            reading = read_answer(
                answer.status, answer.body, answer.retry_after, delivery.index_map
            )
            if reading.verdict is Verdict.REFRESH:
                reading = Reading(
                    Verdict.RETRY,
                    pending_positions=list(range(delivery.event_count)),
                    error="401 after a fresh token",
                )
        return answer, reading

    async def _send(self, delivery: Delivery, output: Output, token: SecretText) -> Answer:
        return await send_events(
            self._http,
            self._endpoints.events(output.region),
            access_token=token.reveal(),
            client_id=self._config.client_id,
            account_id=output.advertiser_id,
            body=delivery.body,
        )

    async def _record_while_leased(
        self, delivery: Delivery, answer: Answer, reading: Reading
    ) -> None:
        """Amazon has answered: writing that down is worth a few tries. If the database
        is away for a moment (restarted, out of connections), giving up would let the
        lease run out and the batch be sent again; Amazon dedupes by eventId, but a
        resend is work and noise. Tries stop at half the lease, well before another
        process may claim the delivery; after that the lease brings it back as usual."""
        began = time.monotonic()
        try:
            await self._record(delivery, answer, reading)
        except (DBAPIError, OSError):
            # The usual write succeeds at once; only a failed one pays for the retrier.
            retrying = AsyncRetrying(
                stop=stop_after_delay(self._config.lease_seconds / 2 - (time.monotonic() - began)),
                wait=wait_exponential_jitter(multiplier=0.2, max=5.0),
                retry=retry_if_exception_type((DBAPIError, OSError)),
                reraise=True,
            )
            async for attempt in retrying:
                with attempt:
                    await self._record(delivery, answer, reading)
        for result in reading.results:  # counted once, however many tries it took
            if not result.ok:
                metrics.EVENTS_REJECTED.labels(code=result.code or "UNKNOWN").inc()

    async def _record(self, delivery: Delivery, answer: Answer, reading: Reading) -> None:
        earlier = delivery.results or []
        results = [*earlier, *[r.as_dict() for r in reading.results]]
        if reading.verdict is Verdict.DONE:
            ok = sum(1 for r in earlier if r.get("status") == "ok") + sum(
                1 for r in reading.results if r.ok
            )
            status = (
                DeliveryStatus.DELIVERED
                if ok == len(results)
                else DeliveryStatus.FAILED
                if ok == 0
                else DeliveryStatus.PARTIAL
            )
            await self._complete(delivery, status, answer.status, results, None)
        elif reading.verdict is Verdict.FAILED:
            await self._complete(
                delivery, DeliveryStatus.FAILED, answer.status, results, reading.error
            )
        elif reading.verdict is Verdict.SPLIT and delivery.event_count > 1:
            await self._split(delivery)
        else:
            await self._retry(
                delivery,
                answer.status,
                reading,
                results=results,
                error=reading.error or answer.error,
            )

    async def _complete(
        self,
        delivery: Delivery,
        status: DeliveryStatus,
        status_code: int | None,
        results: list[dict[str, Any]],
        error: str | None,
    ) -> None:
        held = await self._statements.update_held(
            delivery.id,
            self.worker_id,
            repo.completion(
                now=self._clock(),
                status=status,
                status_code=status_code,
                results=results,
                error=error,
            ),
        )
        metrics.DELIVERIES.labels(outcome=status.value if held else "lost_lease").inc()
        log.info(
            "delivery_done",
            delivery_id=delivery.id,
            status=status.value,
            events=delivery.event_count,
            http_status=status_code,
        )

    async def _retry(
        self,
        delivery: Delivery,
        status_code: int | None,
        reading: Reading | None,
        *,
        results: list[dict[str, Any]] | None = None,
        error: str | None = None,
    ) -> None:
        now = self._clock()
        body = index_map = None
        if reading is not None and 0 < len(reading.pending_positions) < delivery.event_count:
            # Only the events without a final outcome are sent again, unchanged.
            events = orjson.loads(delivery.body)["events"]
            body = orjson.dumps({"events": [events[p] for p in reading.pending_positions]})
            index_map = [delivery.index_map[p] for p in reading.pending_positions]
        async with self._sessionmaker() as session, session.begin():
            if self._too_old(delivery, now):
                await repo.mark_dead(
                    session,
                    delivery.id,
                    now=now,
                    worker_id=self.worker_id,
                    status_code=status_code,
                    error=error,
                    results=results,
                    body=body,
                    index_map=index_map,
                )
                outcome = "dead"
            else:
                delay = backoff_seconds(
                    delivery.attempts,
                    reading.retry_after if reading else None,
                    self._rng,
                    first=self._config.first_retry_seconds,
                    cap=self._config.max_retry_seconds,
                )
                await repo.reschedule(
                    session,
                    delivery.id,
                    worker_id=self.worker_id,
                    now=now,
                    next_attempt_at=now + timedelta(seconds=delay),
                    status_code=status_code,
                    error=error,
                    results=results,
                    body=body,
                    index_map=index_map,
                )
                outcome = "retry"
        if outcome == "retry":
            # The claim loop may be asleep for a whole poll interval, planned while this
            # delivery was in flight: let it plan again around the new next_attempt_at,
            # or a retry due in 1 s (or after a Retry-After of 0) waits for the next poll.
            self.wake()
        metrics.DELIVERIES.labels(outcome=outcome).inc()
        log.info(
            "delivery_retry" if outcome == "retry" else "delivery_dead",
            delivery_id=delivery.id,
            attempts=delivery.attempts,
            http_status=status_code,
            error=error,
        )

    async def _release(self, delivery: Delivery, outcome: str) -> None:
        async with self._sessionmaker() as session, session.begin():
            await repo.release(
                session, self.worker_id, now=self._clock(), delivery_ids=[delivery.id]
            )
        metrics.DELIVERIES.labels(outcome=outcome).inc()

    async def _split(self, delivery: Delivery) -> None:
        """413: the first half stays in this delivery, the second becomes a new one."""
        events = orjson.loads(delivery.body)["events"]
        half = len(events) // 2
        now = self._clock()
        async with self._sessionmaker() as session, session.begin():
            held = await repo.reschedule(
                session,
                delivery.id,
                worker_id=self.worker_id,
                now=now,
                next_attempt_at=now,
                status_code=413,
                error="split in two: request too large",
                body=orjson.dumps({"events": events[:half]}),
                index_map=delivery.index_map[:half],
            )
            # Only while this process holds the lease: a process that lost it must not
            # queue a second half next to the one the new holder may queue.
            if held:
                await repo.insert_deliveries(
                    session,
                    [
                        repo.NewDelivery(
                            output_id=delivery.output_id,
                            source=delivery.source,
                            body=orjson.dumps({"events": events[half:]}),
                            index_map=delivery.index_map[half:],
                            connection_id=delivery.connection_id,
                        )
                    ],
                    now=now,
                    batch_id=delivery.batch_id,
                )
        metrics.DELIVERIES.labels(outcome="split" if held else "lost_lease").inc()
        self.wake()


class Handoff:
    """Deliveries queued by an ingest request, sent by this process without a claim.

    Before the insert, ``lease`` takes free slots of the dispatcher and returns the lease
    to write with the rows (repository.Lease); after the commit, ``start`` sends them.
    If the transaction fails, ``cancel`` gives the slots back: nothing was queued. Only
    for an output that may send now (enabled and logged in): other deliveries wait in
    the queue, as the claim would leave them.
    """

    def __init__(self, dispatcher: Dispatcher, output: Output) -> None:
        self._dispatcher = dispatcher
        self._output = output
        self._granted = 0
        self._deliveries: list[Delivery] = []
        self._sendable = output.enabled and output.status == OutputStatus.CONFIGURED

    @property
    def count(self) -> int:
        """Deliveries handed over so far."""
        return len(self._deliveries)

    def lease(self, wanted: int, now: datetime) -> repo.Lease | None:
        if not self._sendable:
            return None
        granted = self._dispatcher._reserve(wanted)
        if granted == 0:
            return None
        self._granted += granted
        expires_at = now + timedelta(seconds=self._dispatcher._config.lease_seconds)
        return repo.Lease(self._dispatcher.worker_id, expires_at, granted)

    def add(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """The leased rows as inserted: the dispatcher sends these after the commit."""
        self._deliveries.extend(Delivery(**row) for row in rows)

    def start(self) -> None:
        """The transaction committed: send what was leased."""
        granted, self._granted = self._granted, 0
        self._dispatcher._unreserve(granted)
        self._dispatcher._start_sends(self._deliveries, self._output)

    def cancel(self) -> None:
        """The transaction failed: nothing was queued; give the slots back."""
        granted, self._granted = self._granted, 0
        self._deliveries.clear()
        self._dispatcher._unreserve(granted)
