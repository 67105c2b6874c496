"""Every query the relay runs.

Functions take an ``AsyncSession``, ``flush()`` and never commit: the caller's
transaction decides (one request, one transaction). Times are aware UTC datetimes;
queue functions take ``now`` so that tests and the dispatcher agree on the clock.
See docs/decisions/0001-storage-and-queue.md for the queue's design.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final, cast

from sqlalchemy import (
    CursorResult,
    FromClause,
    Select,
    Table,
    Update,
    and_,
    bindparam,
    case,
    delete,
    func,
    insert,
    or_,
    select,
    text,
    union_all,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import defer

from app.crypto import (
    PURPOSE_ACCESS,
    DecryptError,
    KeyRing,
    SecretText,
    dummy_verify,
    hash_secret,
    new_secret,
    verify_secret,
)
from app.db.base import new_id, utcnow
from app.db.models import (
    MAPPING_FIELDS,
    Connection,
    Credential,
    Delivery,
    DeliveryStatus,
    DroppedBatch,
    OAuthState,
    Output,
    OutputStatus,
    Source,
)
from app.errors import SettingsError

OUTPUT_EDITABLE: Final = frozenset({"name", "advertiser_id", "enabled", *MAPPING_FIELDS})
CONNECTION_EDITABLE: Final = frozenset({"name", "active"})
ACCESS_TOKEN_MARGIN: Final = timedelta(minutes=5)
_ERROR_LIMIT: Final = 2000


def _is_postgres(session: AsyncSession) -> bool:
    return session.get_bind().dialect.name == "postgresql"


def _rowcount(result: Any) -> int:
    return int(cast(CursorResult[Any], result).rowcount)


def _check_fields(changes: Mapping[str, Any], allowed: frozenset[str]) -> None:
    for name in changes:
        if name not in allowed:
            raise SettingsError(name, "cannot be set")


# --- Outputs ------------------------------------------------------------------------


async def create_output(
    session: AsyncSession,
    *,
    name: str,
    advertiser_id: str,
    now: datetime | None = None,
    **fields: Any,
) -> Output:
    """A new output in ``needs_login``; ``fields`` are mapping settings or ``enabled``."""
    _check_fields(fields, OUTPUT_EDITABLE)
    moment = now or utcnow()
    output = Output(
        id=new_id("out"),
        name=name,
        advertiser_id=advertiser_id,
        status=OutputStatus.NEEDS_LOGIN,
        created_at=moment,
        updated_at=moment,
        **fields,
    )
    session.add(output)
    await session.flush()
    return output


async def get_output(session: AsyncSession, output_id: str) -> Output | None:
    return await session.get(Output, output_id, populate_existing=True)


async def list_outputs(session: AsyncSession) -> list[Output]:
    result = await session.scalars(select(Output).order_by(Output.created_at, Output.id))
    return list(result)


async def update_output(
    session: AsyncSession,
    output_id: str,
    changes: Mapping[str, Any],
    *,
    now: datetime | None = None,
) -> Output | None:
    """Apply ``changes`` (editable fields only: never id, status or timestamps)."""
    _check_fields(changes, OUTPUT_EDITABLE)
    output = await session.get(Output, output_id)
    if output is None:
        return None
    for name, value in changes.items():
        setattr(output, name, value)
    output.updated_at = now or utcnow()
    await session.flush()
    return output


async def delete_output(session: AsyncSession, output_id: str) -> bool:
    """Delete the output; its credential, connections and deliveries go with it."""
    output = await session.get(Output, output_id)
    if output is None:
        return False
    await session.delete(output)
    await session.flush()
    return True


async def set_status(
    session: AsyncSession,
    output_id: str,
    status: OutputStatus,
    *,
    now: datetime | None = None,
) -> bool:
    result = await session.execute(
        update(Output)
        .where(Output.id == output_id)
        .values(status=OutputStatus(status), updated_at=now or utcnow())
        .execution_options(synchronize_session="fetch")
    )
    return _rowcount(result) == 1


# --- Credentials --------------------------------------------------------------------


_KEEP_ON_UPSERT: Final = ("output_id", "created_at")


async def upsert_credential(
    session: AsyncSession,
    keyring: KeyRing,
    output_id: str,
    *,
    refresh_token: str | SecretText,
    now: datetime | None = None,
) -> Credential:
    """Store ``refresh_token`` (encrypted, bound to the output); drop any cached access token."""
    moment = now or utcnow()
    values = {
        "output_id": output_id,
        "refresh_token_ciphertext": keyring.encrypt(refresh_token, output_id),
        "key_id": keyring.primary_id,
        "access_token_ciphertext": None,
        "access_token_expires_at": None,
        "created_at": moment,
        "updated_at": moment,
    }
    upsert = pg_insert if _is_postgres(session) else sqlite_insert
    statement = upsert(Credential).values(values)
    changed = {key: statement.excluded[key] for key in values if key not in _KEEP_ON_UPSERT}
    result = await session.scalars(
        statement.on_conflict_do_update(
            index_elements=[Credential.output_id], set_=changed
        ).returning(Credential),
        execution_options={"populate_existing": True},
    )
    return result.one()


async def get_credential(session: AsyncSession, output_id: str) -> Credential | None:
    result = await session.scalars(
        select(Credential)
        .where(Credential.output_id == output_id)
        .execution_options(populate_existing=True)
    )
    return result.one_or_none()


async def lock_for_refresh(
    session: AsyncSession, output_id: str, *, timeout_seconds: float = 15.0
) -> Credential | None:
    """The credential, locked until the transaction ends, so one process refreshes at a time.

    PostgreSQL: ``SELECT … FOR UPDATE`` on the row, waiting at most ``timeout_seconds``
    (then a DBAPIError: retry later rather than pile up). SQLite: a no-op write first,
    which takes the database's single write lock (waiting up to the engine's
    ``busy_timeout``). Call it first in a short transaction and re-check the cached
    access token: another process may have refreshed it meanwhile.
    """
    if _is_postgres(session):
        # SET LOCAL takes no bind parameters; the value is a formatted number.
        await session.execute(text(f"SET LOCAL lock_timeout = '{int(timeout_seconds * 1000)}ms'"))
    else:
        await session.execute(
            update(Credential)
            .where(Credential.output_id == output_id)
            .values(output_id=Credential.output_id)
            .execution_options(synchronize_session=False)
        )
    result = await session.scalars(
        select(Credential)
        .where(Credential.output_id == output_id)
        .with_for_update()
        .execution_options(populate_existing=True)
    )
    return result.one_or_none()


async def store_access_token(
    session: AsyncSession,
    keyring: KeyRing,
    output_id: str,
    *,
    access_token: str | SecretText,
    expires_at: datetime,
    refresh_token: str | SecretText | None = None,
    now: datetime | None = None,
) -> bool:
    """Cache a new access token (encrypted); keep a rotated refresh token if LwA sent one."""
    values: dict[str, Any] = {
        "access_token_ciphertext": keyring.encrypt(access_token, output_id, purpose=PURPOSE_ACCESS),
        "access_token_expires_at": expires_at,
        "updated_at": now or utcnow(),
    }
    if refresh_token is not None:
        values["refresh_token_ciphertext"] = keyring.encrypt(refresh_token, output_id)
        values["key_id"] = keyring.primary_id
    result = await session.execute(
        update(Credential)
        .where(Credential.output_id == output_id)
        .values(values)
        .execution_options(synchronize_session="fetch")
    )
    return _rowcount(result) == 1


async def delete_credential(session: AsyncSession, output_id: str) -> bool:
    result = await session.execute(
        delete(Credential)
        .where(Credential.output_id == output_id)
        .execution_options(synchronize_session="fetch")
    )
    return _rowcount(result) == 1


def refresh_token_of(keyring: KeyRing, credential: Credential) -> SecretText:
    """The plaintext refresh token (raises DecryptError if the row was tampered with)."""
    return keyring.decrypt(credential.refresh_token_ciphertext, credential.output_id)


def cached_access_token(
    keyring: KeyRing,
    credential: Credential,
    *,
    now: datetime,
    margin: timedelta = ACCESS_TOKEN_MARGIN,
) -> SecretText | None:
    """The cached access token, or None if absent or expiring within ``margin``."""
    expires_at = credential.access_token_expires_at
    if credential.access_token_ciphertext is None or expires_at is None:
        return None
    if expires_at - margin <= now:
        return None
    return keyring.decrypt(
        credential.access_token_ciphertext, credential.output_id, purpose=PURPOSE_ACCESS
    )


async def rotate_keys(session: AsyncSession, keyring: KeyRing) -> int:
    """Re-encrypt every stored secret under the ring's newest key; returns how many changed.

    Raises DecryptError naming the row if a ciphertext is under a key no longer in the ring.
    """
    changed = 0
    credentials = await session.scalars(
        select(Credential)
        .order_by(Credential.output_id)
        .with_for_update()
        .execution_options(populate_existing=True)
    )
    for credential in credentials:
        owner = credential.output_id
        try:
            rotated = keyring.rotate(credential.refresh_token_ciphertext, owner)
            if rotated != credential.refresh_token_ciphertext:
                credential.refresh_token_ciphertext = rotated
                credential.key_id = keyring.primary_id
                changed += 1
            cached = credential.access_token_ciphertext
            if cached is not None and keyring.needs_rotation(cached):
                credential.access_token_ciphertext = keyring.rotate(
                    cached, owner, purpose=PURPOSE_ACCESS
                )
                changed += 1
        except DecryptError as error:
            raise DecryptError(f"credential of output {owner}: {error.message}") from None
    connections = await session.scalars(
        select(Connection)
        .where(Connection.shared_secret_ciphertext.is_not(None))
        .order_by(Connection.id)
        .with_for_update()
        .execution_options(populate_existing=True)
    )
    for connection in connections:
        token = connection.shared_secret_ciphertext
        if token is None or not keyring.needs_rotation(token):
            continue
        try:
            connection.shared_secret_ciphertext = keyring.rotate(
                token, connection.output_id, purpose=_shared_secret_purpose(connection.id)
            )
        except DecryptError as error:
            raise DecryptError(f"connection {connection.id}: {error.message}") from None
        changed += 1
    await session.flush()
    return changed


async def count_stale_keys(session: AsyncSession, keyring: KeyRing) -> int:
    """Credentials whose refresh token is not under the newest key (0 after rotate_keys)."""
    result = await session.scalar(
        select(func.count()).select_from(Credential).where(Credential.key_id != keyring.primary_id)
    )
    return int(result or 0)


# --- Connections --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NewConnection:
    """A created connection and its secret: the only time the plaintext secret exists."""

    connection: Connection
    secret: SecretText


def _shared_secret_purpose(connection_id: str) -> str:
    return f"shared_secret:{connection_id}"


async def create_connection(
    session: AsyncSession,
    *,
    output_id: str,
    source: Source | str,
    name: str,
    shared_secret: str | SecretText | None = None,
    keyring: KeyRing | None = None,
    now: datetime | None = None,
) -> NewConnection:
    """A new active connection with a random key and secret (stored as a scrypt hash)."""
    if shared_secret is not None and keyring is None:
        raise ValueError("a shared secret needs a key ring to be encrypted")
    moment = now or utcnow()
    secret = new_secret()
    connection = Connection(
        id=new_id("con"),
        output_id=output_id,
        source=Source(source),
        name=name,
        key=f"rk_{secrets.token_urlsafe(18)}",
        # scrypt takes tens of milliseconds: off the event loop.
        secret_hash=await asyncio.to_thread(hash_secret, secret),
        active=True,
        created_at=moment,
        updated_at=moment,
    )
    if shared_secret is not None and keyring is not None:
        connection.shared_secret_ciphertext = keyring.encrypt(
            shared_secret, output_id, purpose=_shared_secret_purpose(connection.id)
        )
    session.add(connection)
    await session.flush()
    return NewConnection(connection=connection, secret=secret)


async def get_connection(session: AsyncSession, connection_id: str) -> Connection | None:
    return await session.get(Connection, connection_id, populate_existing=True)


async def get_connection_by_key(session: AsyncSession, key: str) -> Connection | None:
    result = await session.scalars(select(Connection).where(Connection.key == key))
    return result.one_or_none()


# Built once (every ingest runs it): only the key is bound per request.
_CONNECTION_WITH_OUTPUT: Final = (
    select(Connection, Output)
    .join(Output, Output.id == Connection.output_id)
    .where(Connection.key == bindparam("connection_key"))
    .execution_options(populate_existing=True)
)


async def get_connection_with_output(
    session: AsyncSession, key: str
) -> tuple[Connection, Output] | None:
    """The connection with this key and its output, in one query (every ingest asks)."""
    row = (await session.execute(_CONNECTION_WITH_OUTPUT, {"connection_key": key})).one_or_none()
    return None if row is None else (row[0], row[1])


async def authenticate_connection(
    session: AsyncSession, key: str, secret: str | SecretText
) -> Connection | None:
    """The connection whose key and secret match, else None; the caller checks ``active``.

    An unknown key costs the same hash as a wrong secret, so timing reveals nothing.
    """
    connection = await get_connection_by_key(session, key)
    if connection is None:
        await asyncio.to_thread(dummy_verify, secret)
        return None
    if not await asyncio.to_thread(verify_secret, secret, connection.secret_hash):
        return None
    return connection


async def list_connections(session: AsyncSession, output_id: str) -> list[Connection]:
    result = await session.scalars(
        select(Connection)
        .where(Connection.output_id == output_id)
        .order_by(Connection.created_at, Connection.id)
    )
    return list(result)


async def update_connection(
    session: AsyncSession,
    connection_id: str,
    changes: Mapping[str, Any],
    *,
    now: datetime | None = None,
) -> Connection | None:
    """Apply ``changes`` to ``name`` and/or ``active`` only."""
    _check_fields(changes, CONNECTION_EDITABLE)
    connection = await session.get(Connection, connection_id)
    if connection is None:
        return None
    for name, value in changes.items():
        setattr(connection, name, value)
    connection.updated_at = now or utcnow()
    await session.flush()
    return connection


async def set_shared_secret(
    session: AsyncSession,
    keyring: KeyRing,
    connection_id: str,
    shared_secret: str | SecretText | None,
    *,
    now: datetime | None = None,
) -> bool:
    """Set (encrypted) or clear the connection's webhook signing secret."""
    connection = await session.get(Connection, connection_id)
    if connection is None:
        return False
    connection.shared_secret_ciphertext = (
        None
        if shared_secret is None
        else keyring.encrypt(
            shared_secret, connection.output_id, purpose=_shared_secret_purpose(connection.id)
        )
    )
    connection.updated_at = now or utcnow()
    await session.flush()
    return True


def shared_secret_of(keyring: KeyRing, connection: Connection) -> SecretText | None:
    token = connection.shared_secret_ciphertext
    if token is None:
        return None
    return keyring.decrypt(
        token, connection.output_id, purpose=_shared_secret_purpose(connection.id)
    )


async def delete_connection(session: AsyncSession, connection_id: str) -> bool:
    """Delete the connection; its deliveries stay, with ``connection_id`` set to NULL."""
    connection = await session.get(Connection, connection_id)
    if connection is None:
        return False
    await session.delete(connection)
    await session.flush()
    return True


# --- Deliveries ---------------------------------------------------------------------

_FINAL: Final = (DeliveryStatus.DELIVERED, DeliveryStatus.PARTIAL, DeliveryStatus.FAILED)
_QUEUED: Final = (DeliveryStatus.PENDING, DeliveryStatus.IN_FLIGHT)
DELIVERIES: Final = cast(Table, Delivery.__table__)


@dataclass(frozen=True, slots=True)
class NewDelivery:
    """One mapped Events API request to queue."""

    output_id: str
    source: Source | str
    body: bytes
    index_map: Sequence[int]
    connection_id: str | None = None
    dropped: Sequence[Mapping[str, Any]] | None = None


@dataclass(frozen=True, slots=True)
class Lease:
    """Deliveries leased as they are queued, for the dispatcher of the inserting process.

    The first ``count`` rows of an insert are written already claimed (in_flight, held by
    ``worker_id`` until ``expires_at``, attempt 1), exactly as claim_due would leave
    them: the process hands them to its dispatcher after the commit and no claim
    transaction is spent on them. If it dies first, the lease runs out and any process
    claims them again, as for any claim.
    """

    worker_id: str
    expires_at: datetime
    count: int


async def insert_deliveries(
    session: AsyncSession,
    items: Sequence[NewDelivery],
    *,
    now: datetime | None = None,
    batch_id: str | None = None,
    lease: Lease | None = None,
) -> list[str]:
    """Queue ``items`` (due now) in one INSERT; returns their ids in order.

    All share ``batch_id`` (a new one if not given): the inbound batch they came from.
    With ``lease``, the first ``lease.count`` of them are queued already claimed.
    """
    rows = await insert_delivery_rows(session, items, now=now, batch_id=batch_id, lease=lease)
    return [row["id"] for row in rows]


async def insert_delivery_rows(
    session: AsyncSession,
    items: Sequence[NewDelivery],
    *,
    now: datetime | None = None,
    batch_id: str | None = None,
    lease: Lease | None = None,
) -> list[dict[str, Any]]:
    """insert_deliveries, returning the rows as written (column name → value)."""
    rows = delivery_rows(items, now=now or utcnow(), batch_id=batch_id, lease=lease)
    await insert_rows(session, rows)
    return rows


def delivery_rows(
    items: Sequence[NewDelivery],
    *,
    now: datetime,
    batch_id: str | None = None,
    lease: Lease | None = None,
) -> list[dict[str, Any]]:
    """The deliveries table's rows for ``items`` (column name → value), one batch id."""
    if not items:
        return []
    batch = batch_id or new_id("bat")
    rows: list[dict[str, Any]] = [
        {
            "id": new_id("dlv"),
            "batch_id": batch,
            "output_id": item.output_id,
            "connection_id": item.connection_id,
            "source": Source(item.source).value,
            "status": DeliveryStatus.PENDING.value,
            "body": item.body,
            "index_map": list(item.index_map),
            "event_count": len(item.index_map),
            "attempts": 0,
            "next_attempt_at": now,
            "queued_at": now,
            "lease_expires_at": None,
            "leased_by": None,
            "last_status_code": None,
            "last_error": None,
            "results": None,
            "dropped": None if item.dropped is None else [dict(d) for d in item.dropped],
            "created_at": now,
            "updated_at": now,
        }
        for item in items
    ]
    if lease is not None:
        for row in rows[: lease.count]:
            row["status"] = DeliveryStatus.IN_FLIGHT.value
            row["leased_by"] = lease.worker_id
            row["lease_expires_at"] = lease.expires_at
            row["attempts"] = 1
    return rows


async def insert_rows(session: AsyncSession, rows: Sequence[Mapping[str, Any]]) -> None:
    """Rows made by ``delivery_rows``, in one INSERT."""
    if rows:
        # Core on the table, not the ORM's bulk insert: same statement, less Python per row.
        await session.execute(insert(DELIVERIES), list(rows))


def _due(condition: Any) -> Select[str, datetime]:
    """Deliveries meeting ``condition`` whose output may send (enabled and logged in),
    oldest due first."""
    return (
        select(Delivery.id, Delivery.next_attempt_at)
        .join(Output, Output.id == Delivery.output_id)
        .where(condition, Output.enabled.is_(True), Output.status == OutputStatus.CONFIGURED)
        .order_by(Delivery.next_attempt_at, Delivery.id)
    )


def claim_statement(
    worker_id: str, limit: int, now: datetime, lease_seconds: float, *, skip_locked: bool
) -> Update:
    """The UPDATE that claims up to ``limit`` due deliveries for ``worker_id`` (in_flight,
    leased, attempts + 1), oldest due first, without its RETURNING: one statement,
    atomic by itself.

    Due is pending and past ``next_attempt_at``, or in flight with a lease that ran out
    (the claim of a process that died). Each kind is picked by itself, in the order of
    the ``(status, next_attempt_at)`` index, so a claim reads about ``limit`` rows of
    each, not the whole queue (picking both at once with an OR read and sorted every
    queued row: 1 ms per claim with 1,500 queued); the oldest ``limit`` of the two are
    claimed.

    ``skip_locked`` (PostgreSQL): concurrent claimers in other processes each get
    different rows. The picks are CTEs: PostgreSQL runs a locking CTE exactly once,
    while a plan may scan a subquery again, and each scan that skips locked rows can
    pick others (more than ``limit`` claimed). SQLite has one writer: the UPDATE picks
    and claims under the write lock, so no other connection can claim the same rows
    between the pick and the write.
    """
    kinds = {
        "waiting": and_(Delivery.status == DeliveryStatus.PENDING, Delivery.next_attempt_at <= now),
        "orphaned": and_(
            Delivery.status == DeliveryStatus.IN_FLIGHT, Delivery.lease_expires_at <= now
        ),
    }
    picks: list[FromClause]
    if skip_locked:
        picks = [
            _due(condition).limit(limit).with_for_update(skip_locked=True, of=Delivery).cte(name)
            for name, condition in kinds.items()
        ]
    else:
        picks = [
            _due(condition).limit(limit).correlate(None).subquery(name)
            for name, condition in kinds.items()
        ]
    due = union_all(*(select(pick.c.id, pick.c.next_attempt_at) for pick in picks)).subquery("due")
    oldest = select(due.c.id).order_by(due.c.next_attempt_at, due.c.id).limit(limit)
    if skip_locked:
        picked = oldest.cte("picked")
        target = Delivery.id == picked.c.id
    else:
        target = Delivery.id.in_(oldest.correlate(None).scalar_subquery())
    return (
        update(Delivery)
        .where(target)
        .values(
            status=DeliveryStatus.IN_FLIGHT,
            leased_by=worker_id,
            lease_expires_at=now + timedelta(seconds=lease_seconds),
            attempts=Delivery.attempts + 1,
            updated_at=now,
        )
    )


async def claim_due(
    session: AsyncSession,
    worker_id: str,
    limit: int,
    now: datetime,
    lease_seconds: float,
) -> list[Delivery]:
    """Claim up to ``limit`` due deliveries for ``worker_id`` (``claim_statement``),
    oldest due first.

    Send outside any transaction: the lease, not a row lock, protects the claim while
    the request is in flight. Outputs that are disabled or not ``configured``
    (needs_login, needs_reauth) keep their deliveries waiting. The runtime claims
    through ``app.db.hot`` (the same statement through the driver on PostgreSQL); tests
    hold the two to each other.
    """
    if limit <= 0:
        return []
    statement = claim_statement(
        worker_id, limit, now, lease_seconds, skip_locked=_is_postgres(session)
    )
    result = await session.scalars(
        statement.returning(Delivery),
        execution_options={"populate_existing": True, "synchronize_session": False},
    )
    return sorted(result, key=by_due)


def by_due(delivery: Delivery) -> tuple[datetime, str]:
    """The order deliveries are claimed in: oldest due first, then by id."""
    return (delivery.next_attempt_at, delivery.id)


async def next_due_at(session: AsyncSession) -> datetime | None:
    """When claim_due will next find work (None: nothing queued for a live output).

    Lets the dispatcher sleep until then instead of polling blindly.
    """
    due = case(
        (Delivery.status == DeliveryStatus.IN_FLIGHT, Delivery.lease_expires_at),
        else_=Delivery.next_attempt_at,
    )
    earliest: datetime | None = await session.scalar(
        select(func.min(due))
        .join(Output, Output.id == Delivery.output_id)
        .where(
            Delivery.status.in_(_QUEUED),
            Output.enabled.is_(True),
            Output.status == OutputStatus.CONFIGURED,
        )
    )
    return earliest


def _held_by(delivery_id: str, worker_id: str) -> Any:
    return and_(
        Delivery.id == delivery_id,
        Delivery.status == DeliveryStatus.IN_FLIGHT,
        Delivery.leased_by == worker_id,
    )


# The outcome UPDATE of a held delivery, built once: each outcome only binds its values
# (the SET clause follows the parameters' names), so no statement is built, coerced and
# cache-keyed per delivery (~0.25 ms each, with 100 per-event results as a literal).
_HELD_UPDATE: Final = update(DELIVERIES).where(
    DELIVERIES.c.id == bindparam("held_id"),
    DELIVERIES.c.status == bindparam("held_status"),
    DELIVERIES.c.leased_by == bindparam("held_by"),
)


async def update_held(
    session: AsyncSession, delivery_id: str, worker_id: str, values: Mapping[str, Any]
) -> bool:
    """Write ``values`` to a delivery ``worker_id`` still holds; False if it no longer does.

    _update(session, _held_by(delivery_id, worker_id), values), with _HELD_UPDATE.
    """
    parameters = {
        **values,
        "held_id": delivery_id,
        "held_status": DeliveryStatus.IN_FLIGHT,
        "held_by": worker_id,
    }
    result = await session.execute(_HELD_UPDATE, parameters)
    return _rowcount(result) == 1


async def _update(session: AsyncSession, where: Any, values: Mapping[str, Any]) -> bool:
    # A Core UPDATE of the table: the ORM's "fetch" synchronisation read the row back
    # for an identity map that these short sessions never use.
    result = await session.execute(update(DELIVERIES).where(where).values(dict(values)))
    return _rowcount(result) == 1


def _outcome(
    now: datetime,
    status_code: int | None,
    error: str | None,
    results: Sequence[Any] | None,
) -> dict[str, Any]:
    values: dict[str, Any] = {
        "lease_expires_at": None,
        "leased_by": None,
        "updated_at": now,
        "last_status_code": status_code,
        "last_error": None if error is None else error[:_ERROR_LIMIT],
    }
    if results is not None:
        values["results"] = list(results)
    return values


async def complete(
    session: AsyncSession,
    delivery_id: str,
    *,
    worker_id: str,
    now: datetime,
    status: DeliveryStatus,
    status_code: int | None = None,
    results: Sequence[Any] | None = None,
    error: str | None = None,
) -> bool:
    """Record a final outcome (delivered, partial or failed).

    False if ``worker_id`` no longer holds the lease (it expired and another process
    claimed the delivery): that process's outcome wins.
    """
    values = completion(
        now=now, status=status, status_code=status_code, results=results, error=error
    )
    return await update_held(session, delivery_id, worker_id, values)


def completion(
    *,
    now: datetime,
    status: DeliveryStatus,
    status_code: int | None = None,
    results: Sequence[Any] | None = None,
    error: str | None = None,
) -> dict[str, Any]:
    """What ``complete`` writes to the held delivery (for ``update_held``)."""
    if status not in _FINAL:
        raise ValueError(f"complete() takes {', '.join(_FINAL)}, not {status}")
    return _outcome(now, status_code, error, results) | {"status": DeliveryStatus(status)}


async def reschedule(
    session: AsyncSession,
    delivery_id: str,
    *,
    worker_id: str,
    now: datetime,
    next_attempt_at: datetime,
    status_code: int | None = None,
    error: str | None = None,
    results: Sequence[Any] | None = None,
    body: bytes | None = None,
    index_map: Sequence[int] | None = None,
) -> bool:
    """Back to pending until ``next_attempt_at`` (a retryable failure).

    ``body``/``index_map`` replace the request when only some events are retried (207
    with TOO_MANY_REQUESTS or INTERNAL_ERROR on some of them).
    """
    values = _outcome(now, status_code, error, results) | {
        "status": DeliveryStatus.PENDING,
        "next_attempt_at": next_attempt_at,
    }
    return await update_held(session, delivery_id, worker_id, _request(values, body, index_map))


def _request(
    values: dict[str, Any], body: bytes | None, index_map: Sequence[int] | None
) -> dict[str, Any]:
    """``values`` and, if given, the request that replaces the delivery's: the events
    still without a final outcome."""
    if body is None:
        return values
    if index_map is None:
        raise ValueError("a new body needs its index_map")
    return values | {"body": body, "index_map": list(index_map), "event_count": len(index_map)}


async def mark_dead(
    session: AsyncSession,
    delivery_id: str,
    *,
    now: datetime,
    worker_id: str | None = None,
    status_code: int | None = None,
    error: str | None = None,
    results: Sequence[Any] | None = None,
    body: bytes | None = None,
    index_map: Sequence[int] | None = None,
) -> bool:
    """Give up (RELAY_DELIVERY_MAX_AGE passed); kept, listed and retryable by the admin.

    With ``worker_id``: the delivery it holds. Without: a pending one (an age sweep never
    takes a delivery from a process that holds it). ``results``, ``body`` and
    ``index_map`` as for ``reschedule``: the last attempt's per-event outcomes are kept,
    and an admin's retry sends only the events that had none.
    """
    where = (
        _held_by(delivery_id, worker_id)
        if worker_id is not None
        else and_(Delivery.id == delivery_id, Delivery.status == DeliveryStatus.PENDING)
    )
    values = _outcome(now, status_code, error, results) | {"status": DeliveryStatus.DEAD}
    return await _update(session, where, _request(values, body, index_map))


async def release(
    session: AsyncSession,
    worker_id: str,
    *,
    now: datetime,
    delivery_ids: Sequence[str] | None = None,
) -> int:
    """Hand back claimed deliveries that were not sent (graceful shutdown).

    They become pending at once and the claim's attempt is not counted. Returns how many.
    """
    where = and_(Delivery.status == DeliveryStatus.IN_FLIGHT, Delivery.leased_by == worker_id)
    if delivery_ids is not None:
        where = and_(where, Delivery.id.in_(list(delivery_ids)))
    result = await session.execute(
        update(DELIVERIES)
        .where(where)
        .values(
            status=DeliveryStatus.PENDING,
            lease_expires_at=None,
            leased_by=None,
            attempts=case((Delivery.attempts > 0, Delivery.attempts - 1), else_=0),
            updated_at=now,
        )
    )
    return _rowcount(result)


async def retry(
    session: AsyncSession, delivery_id: str, *, now: datetime | None = None
) -> Delivery | None:
    """Put a failed or dead delivery back in the queue, due now, with a fresh age and count.

    None if there is no such delivery or it is not failed/dead.
    """
    moment = now or utcnow()
    result = await session.scalars(
        update(Delivery)
        .where(
            Delivery.id == delivery_id,
            Delivery.status.in_([DeliveryStatus.FAILED, DeliveryStatus.DEAD]),
        )
        .values(
            status=DeliveryStatus.PENDING,
            next_attempt_at=moment,
            queued_at=moment,
            attempts=0,
            lease_expires_at=None,
            leased_by=None,
            updated_at=moment,
        )
        .returning(Delivery),
        execution_options={"populate_existing": True, "synchronize_session": False},
    )
    return result.one_or_none()


async def get_delivery(session: AsyncSession, delivery_id: str) -> Delivery | None:
    return await session.get(Delivery, delivery_id, populate_existing=True)


async def get_deliveries(session: AsyncSession, delivery_ids: Sequence[str]) -> list[Delivery]:
    """The deliveries with these ids, in the order given (missing ones left out)."""
    if not delivery_ids:
        return []
    result = await session.scalars(
        select(Delivery)
        .where(Delivery.id.in_(list(delivery_ids)))
        .execution_options(populate_existing=True)
    )
    found = {delivery.id: delivery for delivery in result}
    return [found[i] for i in delivery_ids if i in found]


# Far past any queue, and inside the 64-bit integer both databases take for OFFSET.
MAX_OFFSET: Final = 1_000_000_000


async def list_deliveries(
    session: AsyncSession,
    *,
    output_id: str | None = None,
    status: DeliveryStatus | str | None = None,
    batch_id: str | None = None,
    limit: int = 100,
    offset: int = 0,
) -> list[Delivery]:
    """Newest first. ``body`` is not loaded (it can be large): use get_delivery for it."""
    statement = select(Delivery).options(defer(Delivery.body, raiseload=True))
    if output_id is not None:
        statement = statement.where(Delivery.output_id == output_id)
    if status is not None:
        statement = statement.where(Delivery.status == DeliveryStatus(status))
    if batch_id is not None:
        statement = statement.where(Delivery.batch_id == batch_id)
    result = await session.scalars(
        statement.order_by(Delivery.created_at.desc(), Delivery.id.desc())
        .limit(limit)
        .offset(offset)
    )
    return list(result)


async def count_by_status(session: AsyncSession, *, output_id: str | None = None) -> dict[str, int]:
    statement = select(Delivery.status, func.count()).group_by(Delivery.status)
    if output_id is not None:
        statement = statement.where(Delivery.output_id == output_id)
    rows = await session.execute(statement)
    counts = {status.value: 0 for status in DeliveryStatus}
    counts.update({status: int(count) for status, count in rows})
    return counts


async def queue_depth(session: AsyncSession) -> int:
    """Deliveries not yet finished (pending or in flight), waiting ones included."""
    result = await session.scalar(
        select(func.count()).select_from(Delivery).where(Delivery.status.in_(_QUEUED))
    )
    return int(result or 0)


async def oldest_pending_age(session: AsyncSession, *, now: datetime) -> float:
    """Seconds since the oldest unfinished delivery was queued; 0.0 if there is none."""
    oldest = await session.scalar(
        select(func.min(Delivery.queued_at)).where(Delivery.status.in_(_QUEUED))
    )
    if oldest is None:
        return 0.0
    return max(0.0, (now - oldest).total_seconds())


async def count_waiting(session: AsyncSession, *, output_id: str | None = None) -> int:
    """Unfinished deliveries held back because their output is disabled or not configured
    (needs_login, needs_reauth): they flow again once the output is logged in."""
    statement = (
        select(func.count())
        .select_from(Delivery)
        .join(Output, Output.id == Delivery.output_id)
        .where(
            Delivery.status.in_(_QUEUED),
            or_(Output.enabled.is_(False), Output.status != OutputStatus.CONFIGURED),
        )
    )
    if output_id is not None:
        statement = statement.where(Delivery.output_id == output_id)
    return int(await session.scalar(statement) or 0)


async def prune_delivered(
    session: AsyncSession,
    older_than: datetime,
    batch_size: int = 500,
    *,
    statuses: Sequence[DeliveryStatus] = (DeliveryStatus.DELIVERED, DeliveryStatus.PARTIAL),
) -> int:
    """Delete one batch of finished deliveries last updated before ``older_than``.

    Returns how many were deleted. Call it in its own short transaction, repeatedly,
    until it returns less than ``batch_size``: small batches keep locks and WAL short.
    Failed and dead deliveries are kept by default: an operator may still retry them.
    """
    chosen = (
        select(Delivery.id)
        .where(Delivery.status.in_(list(statuses)), Delivery.updated_at < older_than)
        .limit(batch_size)
    )
    result = await session.execute(
        delete(Delivery)
        .where(Delivery.id.in_(chosen.correlate(None).scalar_subquery()))
        .execution_options(synchronize_session=False)
    )
    return _rowcount(result)


# --- Batches whose every event was dropped ---------------------------------------------


async def record_dropped_batch(
    session: AsyncSession,
    *,
    output_id: str,
    source: Source | str,
    dropped: Sequence[Mapping[str, Any]],
    connection_id: str | None = None,
    batch_id: str | None = None,
    now: datetime | None = None,
) -> str:
    """Keep the trace of a batch that queued no delivery (every event dropped); its id.

    A plain INSERT of a new row: concurrent ingests never wait on one another here, as
    they would on a shared counter row.
    """
    row = dropped_batch_row(
        output_id=output_id,
        source=source,
        dropped=dropped,
        connection_id=connection_id,
        batch_id=batch_id,
        now=now or utcnow(),
    )
    await insert_dropped_batch_row(session, row)
    return str(row["batch_id"])


def dropped_batch_row(
    *,
    output_id: str,
    source: Source | str,
    dropped: Sequence[Mapping[str, Any]],
    now: datetime,
    connection_id: str | None = None,
    batch_id: str | None = None,
) -> dict[str, Any]:
    """The dropped_batches row of a batch that queued no delivery."""
    if not dropped:
        raise ValueError("a dropped batch has at least one dropped event")
    return {
        "batch_id": batch_id or new_id("bat"),
        "output_id": output_id,
        "connection_id": connection_id,
        "source": Source(source).value,
        "dropped_count": len(dropped),
        "dropped": [dict(d) for d in dropped],
        "created_at": now,
    }


async def insert_dropped_batch_row(session: AsyncSession, row: Mapping[str, Any]) -> None:
    await session.execute(insert(DroppedBatch).values(dict(row)))


async def recent_dropped_batches(
    session: AsyncSession, output_id: str, *, limit: int = 10
) -> list[DroppedBatch]:
    """The output's latest batches whose every event was dropped, newest first."""
    result = await session.scalars(
        select(DroppedBatch)
        .where(DroppedBatch.output_id == output_id)
        .order_by(DroppedBatch.created_at.desc(), DroppedBatch.batch_id.desc())
        .limit(limit)
    )
    return list(result)


async def prune_dropped_batches(
    session: AsyncSession, older_than: datetime, batch_size: int = 500
) -> int:
    """Delete one batch of dropped-batch rows created before ``older_than``; how many.

    Like prune_delivered: call it in short transactions until it returns less than
    ``batch_size``. The rows are history only (nothing retries a drop), so all go.
    """
    chosen = (
        select(DroppedBatch.batch_id).where(DroppedBatch.created_at < older_than).limit(batch_size)
    )
    result = await session.execute(
        delete(DroppedBatch)
        .where(DroppedBatch.batch_id.in_(chosen.correlate(None).scalar_subquery()))
        .execution_options(synchronize_session=False)
    )
    return _rowcount(result)


# --- Login with Amazon flows -----------------------------------------------------------


async def create_oauth_state(
    session: AsyncSession,
    *,
    state_id: str,
    output_id: str,
    browser_hash: str,
    verifier_ciphertext: str,
    expires_at: datetime,
    now: datetime | None = None,
) -> None:
    session.add(
        OAuthState(
            id=state_id,
            output_id=output_id,
            browser_hash=browser_hash,
            verifier_ciphertext=verifier_ciphertext,
            expires_at=expires_at,
            used_at=None,
            created_at=now or utcnow(),
        )
    )
    await session.flush()


async def use_oauth_state(
    session: AsyncSession, state_id: str, *, now: datetime
) -> OAuthState | None:
    """Mark the flow used and return it, once: a second call, or an expired flow, gets None.

    One UPDATE … WHERE used_at IS NULL: two callbacks racing with the same state cannot
    both win, in one process or many.
    """
    result = await session.scalars(
        update(OAuthState)
        .where(
            OAuthState.id == state_id,
            OAuthState.used_at.is_(None),
            OAuthState.expires_at > now,
        )
        .values(used_at=now)
        .returning(OAuthState),
        execution_options={"populate_existing": True, "synchronize_session": False},
    )
    return result.one_or_none()


async def get_oauth_state(session: AsyncSession, state_id: str) -> OAuthState | None:
    return await session.get(OAuthState, state_id, populate_existing=True)


async def prune_oauth_states(session: AsyncSession, *, older_than: datetime) -> int:
    result = await session.execute(
        delete(OAuthState)
        .where(OAuthState.expires_at < older_than)
        .execution_options(synchronize_session=False)
    )
    return _rowcount(result)
