"""Storage on both backends: migrations, CRUD, secrets at rest, and the delivery queue."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import Connection, inspect, make_url, select, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from app.crypto import DecryptError, KeyRing, SecretText, new_key_entry
from app.db import repository as repo
from app.db.base import LZ4_FRAME_MAGIC, StoredBody, metadata
from app.db.migrate import alembic_config, at_head, current_revisions, head_revisions, migrate
from app.db.models import Credential, Delivery, DeliveryStatus, Output, OutputStatus
from app.db.session import create_engine
from app.errors import SettingsError

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
REFRESH = "Atzr|IwEBIPlaintextRefreshTokenThatMustNeverBeStored0123456789"
ACCESS = "Atza|IwEBIPlaintextAccessTokenThatMustNeverBeStored9876543210"


@pytest.fixture
def keyring() -> KeyRing:
    return KeyRing.parse(new_key_entry("k1"))


async def _output(
    session: AsyncSession, *, status: OutputStatus = OutputStatus.CONFIGURED
) -> Output:
    output = await repo.create_output(session, name="Shop", advertiser_id="123456", now=T0)
    await repo.set_status(session, output.id, status, now=T0)
    return output


def _new(output_id: str, n: int = 1, connection_id: str | None = None) -> list[repo.NewDelivery]:
    return [
        repo.NewDelivery(
            output_id=output_id,
            source="mparticle",
            body=b'{"eventData": [%d]}' % i,
            index_map=[i],
            connection_id=connection_id,
        )
        for i in range(n)
    ]


# --- Migrations ---------------------------------------------------------------------


async def test_migrations_upgrade_to_head(empty_database_url: str) -> None:
    assert not await at_head(empty_database_url)
    assert await current_revisions(empty_database_url) == ()
    # Two processes starting together: both succeed, the schema is migrated once.
    await asyncio.gather(migrate(empty_database_url), migrate(empty_database_url))
    assert await current_revisions(empty_database_url) == head_revisions()
    assert await at_head(empty_database_url)
    await migrate(empty_database_url)  # idempotent
    assert await at_head(empty_database_url)


async def test_migrations_downgrade_and_upgrade_again(empty_database_url: str) -> None:
    await migrate(empty_database_url)
    engine = create_engine(empty_database_url)

    def downgrade(connection: Connection) -> None:
        config = alembic_config(empty_database_url)
        config.attributes["connection"] = connection
        command.downgrade(config, "base")

    def tables(connection: Connection) -> set[str]:
        return set(inspect(connection).get_table_names()) - {"alembic_version"}

    try:
        async with engine.begin() as connection:
            await connection.run_sync(downgrade)
        async with engine.connect() as connection:
            assert await connection.run_sync(tables) == set()
        await migrate(empty_database_url)
        async with engine.connect() as connection:
            assert await connection.run_sync(tables) == set(metadata.tables)
    finally:
        await engine.dispose()
    assert await at_head(empty_database_url)


async def test_migration_matches_models(engine: AsyncEngine) -> None:
    def differences(connection: object) -> list[object]:
        context = MigrationContext.configure(connection, opts={"compare_type": True})  # type: ignore[arg-type]
        return list(compare_metadata(context, metadata))

    async with engine.connect() as connection:
        assert await connection.run_sync(differences) == []


# --- Outputs ------------------------------------------------------------------------


async def test_output_crud(session: AsyncSession) -> None:
    output = await repo.create_output(
        session,
        name="Shop",
        advertiser_id="123456",
        region="EU",
        data_set_name="shop_events",
        conversion_rules=[{"event": "purchase"}],
        now=T0,
    )
    await session.commit()
    assert output.id.startswith("out_")
    assert output.status == OutputStatus.NEEDS_LOGIN
    assert output.enabled
    assert output.default_rules
    assert output.created_at == T0
    assert output.created_at.tzinfo is not None

    session.expunge_all()
    loaded = await repo.get_output(session, output.id)
    assert loaded is not None
    assert (loaded.region, loaded.data_set_name, loaded.max_event_age_hours) == (
        "EU",
        "shop_events",
        24,
    )
    assert loaded.conversion_rules == [{"event": "purchase"}]
    assert loaded.created_at == T0
    assert loaded.mapping_settings()["region"] == "EU"
    assert "partner_name" not in loaded.mapping_settings()

    later = T0 + timedelta(hours=1)
    updated = await repo.update_output(
        session, output.id, {"name": "Shop EU", "match_keys": "extended"}, now=later
    )
    assert updated is not None
    assert updated.name == "Shop EU"
    assert updated.updated_at == later
    with pytest.raises(SettingsError) as refused:
        await repo.update_output(session, output.id, {"status": "configured"})
    assert refused.value.field == "status"
    with pytest.raises(SettingsError):
        await repo.update_output(session, output.id, {"id": "out_other"})
    assert await repo.update_output(session, "out_missing", {"name": "x"}) is None

    assert await repo.set_status(session, output.id, OutputStatus.CONFIGURED)
    assert not await repo.set_status(session, "out_missing", OutputStatus.CONFIGURED)
    await session.commit()
    assert [o.id for o in await repo.list_outputs(session)] == [output.id]
    assert (await repo.get_output(session, output.id)).status == "configured"  # type: ignore[union-attr]


async def test_delete_output_cascades(session: AsyncSession, keyring: KeyRing) -> None:
    output = await _output(session)
    new = await repo.create_connection(session, output_id=output.id, source="segment", name="web")
    await repo.upsert_credential(session, keyring, output.id, refresh_token=REFRESH)
    await repo.insert_deliveries(session, _new(output.id, 2, new.connection.id), now=T0)
    await session.commit()

    assert await repo.delete_output(session, output.id)
    await session.commit()
    assert not await repo.delete_output(session, output.id)
    assert await repo.get_credential(session, output.id) is None
    assert await repo.get_connection(session, new.connection.id) is None
    assert await repo.list_deliveries(session) == []


# --- Connections --------------------------------------------------------------------


async def test_connection_secret_is_hashed_and_verified(session: AsyncSession) -> None:
    output = await _output(session)
    new = await repo.create_connection(
        session, output_id=output.id, source="mparticle", name="prod"
    )
    await session.commit()
    secret = new.secret.reveal()
    connection = new.connection
    assert repr(new.secret) == "'***'"
    assert connection.key.startswith("rk_")
    assert secret.startswith("rs_")  # never "-", which a command line takes for an option
    assert len(secret) == 3 + 43  # 256 bits in base64url
    assert connection.active
    assert secret not in connection.secret_hash
    assert connection.secret_hash.startswith("scrypt$")

    raw = (await session.execute(text("SELECT * FROM connections"))).one()
    assert all(secret not in str(value) for value in raw)

    assert (await repo.authenticate_connection(session, connection.key, secret)) == connection
    assert await repo.authenticate_connection(session, connection.key, secret + "x") is None
    assert await repo.authenticate_connection(session, "rk_unknown", secret) is None
    assert await repo.get_connection_by_key(session, connection.key) == connection


async def test_connection_crud(session: AsyncSession, keyring: KeyRing) -> None:
    output = await _output(session)
    other = await _output(session)
    first = (
        await repo.create_connection(session, output_id=output.id, source="segment", name="a")
    ).connection
    second = (
        await repo.create_connection(
            session,
            output_id=output.id,
            source="records",
            name="b",
            shared_secret="whsec_signing",
            keyring=keyring,
        )
    ).connection
    await repo.create_connection(session, output_id=other.id, source="segment", name="c")
    await session.commit()
    assert first.key != second.key
    assert [c.id for c in await repo.list_connections(session, output.id)] == [first.id, second.id]

    assert second.shared_secret_ciphertext is not None
    assert "whsec_signing" not in second.shared_secret_ciphertext
    assert repo.shared_secret_of(keyring, second) == SecretText("whsec_signing")
    assert repo.shared_secret_of(keyring, first) is None
    assert await repo.set_shared_secret(session, keyring, first.id, "s2")
    assert repo.shared_secret_of(keyring, first).reveal() == "s2"  # type: ignore[union-attr]
    assert await repo.set_shared_secret(session, keyring, first.id, None)
    assert first.shared_secret_ciphertext is None

    updated = await repo.update_connection(session, first.id, {"active": False, "name": "a2"})
    assert updated is not None
    assert not updated.active
    assert updated.name == "a2"
    with pytest.raises(SettingsError):
        await repo.update_connection(session, first.id, {"output_id": other.id})
    with pytest.raises(SettingsError):
        await repo.update_connection(session, first.id, {"secret_hash": "x"})

    await repo.insert_deliveries(session, _new(output.id, 1, first.id), now=T0)
    assert await repo.delete_connection(session, first.id)
    assert not await repo.delete_connection(session, first.id)
    await session.commit()
    session.expunge_all()
    (delivery,) = await repo.list_deliveries(session, output_id=output.id)
    assert delivery.connection_id is None  # the delivery outlives its connection


# --- Credentials --------------------------------------------------------------------


async def _raw_database_text(session: AsyncSession, database_url: str) -> str:
    """Everything stored, as the database holds it (file bytes on SQLite)."""
    if database_url.startswith("sqlite"):
        path = Path(make_url(database_url).database or "")
        blobs = [p.read_bytes() for p in (path, Path(f"{path}-wal")) if p.exists()]
        return b"".join(blobs).decode("latin-1")
    rows = await session.execute(text("SELECT row_to_json(c)::text FROM credentials c"))
    return "".join(rows.scalars())


async def test_credentials_are_stored_encrypted(
    session: AsyncSession, keyring: KeyRing, database_url: str
) -> None:
    output = await _output(session)
    credential = await repo.upsert_credential(
        session, keyring, output.id, refresh_token=REFRESH, now=T0
    )
    await repo.store_access_token(
        session, keyring, output.id, access_token=ACCESS, expires_at=T0 + timedelta(hours=1)
    )
    await session.commit()
    assert credential.key_id == "k1"
    assert credential.refresh_token_ciphertext.startswith("v1.k1.")

    raw = await _raw_database_text(session, database_url)
    assert "v1.k1." in raw  # the scan does see the credential rows
    assert REFRESH not in raw
    assert ACCESS not in raw
    assert "PlaintextRefreshToken" not in raw
    assert "PlaintextAccessToken" not in raw

    session.expunge_all()
    loaded = await repo.get_credential(session, output.id)
    assert loaded is not None
    assert repo.refresh_token_of(keyring, loaded).reveal() == REFRESH
    assert repo.cached_access_token(keyring, loaded, now=T0).reveal() == ACCESS  # type: ignore[union-attr]
    # Within 5 minutes of expiry the cached token is treated as gone.
    assert repo.cached_access_token(keyring, loaded, now=T0 + timedelta(minutes=56)) is None


async def test_ciphertext_copied_to_another_output_fails(
    session: AsyncSession, keyring: KeyRing
) -> None:
    victim = await _output(session)
    attacker = await _output(session)
    await repo.upsert_credential(session, keyring, victim.id, refresh_token=REFRESH)
    await repo.upsert_credential(session, keyring, attacker.id, refresh_token="attacker-token")
    await session.commit()
    stolen = (await repo.get_credential(session, victim.id)).refresh_token_ciphertext  # type: ignore[union-attr]
    await session.execute(
        text("UPDATE credentials SET refresh_token_ciphertext = :c WHERE output_id = :o"),
        {"c": stolen, "o": attacker.id},
    )
    await session.commit()
    copied = await repo.get_credential(session, attacker.id)
    assert copied is not None
    assert copied.refresh_token_ciphertext == stolen
    with pytest.raises(DecryptError):
        repo.refresh_token_of(keyring, copied)


async def test_upsert_replaces_token_and_drops_cached_access(
    session: AsyncSession, keyring: KeyRing
) -> None:
    output = await _output(session)
    await repo.upsert_credential(session, keyring, output.id, refresh_token="first", now=T0)
    await repo.store_access_token(
        session, keyring, output.id, access_token=ACCESS, expires_at=T0 + timedelta(hours=1)
    )
    await session.commit()
    later = T0 + timedelta(minutes=1)
    credential = await repo.upsert_credential(
        session, keyring, output.id, refresh_token="second", now=later
    )
    await session.commit()
    assert repo.refresh_token_of(keyring, credential).reveal() == "second"
    assert credential.access_token_ciphertext is None
    assert credential.access_token_expires_at is None
    assert credential.created_at == T0
    assert credential.updated_at == later
    # A rotated refresh token from LwA is kept with the new access token.
    assert await repo.store_access_token(
        session, keyring, output.id, access_token="a2", expires_at=later, refresh_token="third"
    )
    rotated = await repo.get_credential(session, output.id)
    assert rotated is not None
    assert repo.refresh_token_of(keyring, rotated).reveal() == "third"
    assert not await repo.store_access_token(
        session, keyring, "out_missing", access_token="a", expires_at=later
    )
    assert await repo.delete_credential(session, output.id)
    assert await repo.get_credential(session, output.id) is None


async def test_rotate_keys(session: AsyncSession) -> None:
    old_entry, new_entry = new_key_entry("k1"), new_key_entry("k2")
    old = KeyRing.parse(old_entry)
    outputs = [await _output(session) for _ in range(3)]
    for n, output in enumerate(outputs):
        await repo.upsert_credential(session, old, output.id, refresh_token=f"token-{n}")
    await repo.store_access_token(
        session, old, outputs[0].id, access_token=ACCESS, expires_at=T0 + timedelta(hours=1)
    )
    hooked = await repo.create_connection(
        session,
        output_id=outputs[0].id,
        source="segment",
        name="s",
        shared_secret="sig",
        keyring=old,
    )
    await session.commit()

    both = KeyRing.parse(f"{new_entry},{old_entry}")
    assert await repo.count_stale_keys(session, both) == 3
    assert await repo.rotate_keys(session, both) == 3 + 1 + 1
    await session.commit()
    assert await repo.count_stale_keys(session, both) == 0
    assert await repo.rotate_keys(session, both) == 0  # nothing left to do

    new_only = KeyRing.parse(new_entry)
    session.expunge_all()
    for n, output in enumerate(outputs):
        credential = await repo.get_credential(session, output.id)
        assert credential is not None
        assert credential.key_id == "k2"
        assert repo.refresh_token_of(new_only, credential).reveal() == f"token-{n}"
    first = await repo.get_credential(session, outputs[0].id)
    assert repo.cached_access_token(new_only, first, now=T0).reveal() == ACCESS  # type: ignore[arg-type,union-attr]
    connection = await repo.get_connection(session, hooked.connection.id)
    assert repo.shared_secret_of(new_only, connection).reveal() == "sig"  # type: ignore[arg-type,union-attr]

    # Rotating under a ring that lacks the key a row is under names the row.
    with pytest.raises(DecryptError, match="credential of output out_"):
        await repo.rotate_keys(session, KeyRing.parse(new_key_entry("k3")))


async def test_lock_for_refresh_serialises_refreshers(
    sessionmaker: async_sessionmaker[AsyncSession], keyring: KeyRing
) -> None:
    async with sessionmaker.begin() as session:
        output = await _output(session)
        await repo.upsert_credential(session, keyring, output.id, refresh_token=REFRESH)

    async with sessionmaker() as first, sessionmaker() as second:
        held = await repo.lock_for_refresh(first, output.id)
        assert held is not None
        waiter = asyncio.create_task(repo.lock_for_refresh(second, output.id))
        await asyncio.sleep(0.5)
        assert not waiter.done(), "a second refresher must wait for the first"
        await repo.store_access_token(
            first, keyring, output.id, access_token=ACCESS, expires_at=T0 + timedelta(hours=1)
        )
        await first.commit()
        after = await asyncio.wait_for(waiter, timeout=10)
        # The second sees the first one's token and need not refresh again.
        assert after is not None
        assert repo.cached_access_token(keyring, after, now=T0).reveal() == ACCESS  # type: ignore[union-attr]
        await second.commit()
    async with sessionmaker() as session:
        assert await repo.lock_for_refresh(session, "out_missing") is None


# --- Deliveries ---------------------------------------------------------------------


async def test_insert_and_list_deliveries(session: AsyncSession) -> None:
    output = await _output(session)
    ids = await repo.insert_deliveries(
        session,
        [
            repo.NewDelivery(
                output_id=output.id,
                source="segment",
                body=b'{"eventData": []}',
                index_map=[0, 2, 3],
                dropped=[{"index": 1, "reason": "missing_match_key"}],
            ),
            *_new(output.id, 2),
        ],
        now=T0,
        batch_id="bat_test",
    )
    await session.commit()
    assert len(ids) == 3
    assert len(set(ids)) == 3
    assert all(i.startswith("dlv_") for i in ids)
    session.expunge_all()
    first = await repo.get_delivery(session, ids[0])
    assert first is not None
    assert first.status == "pending"
    assert first.attempts == 0
    assert first.event_count == 3
    assert first.body == b'{"eventData": []}'
    assert first.index_map == [0, 2, 3]
    assert first.dropped == [{"index": 1, "reason": "missing_match_key"}]
    assert first.next_attempt_at == T0
    assert first.queued_at == T0
    assert first.batch_id == "bat_test"
    assert [d.id for d in await repo.get_deliveries(session, [ids[2], "dlv_missing", ids[0]])] == [
        ids[2],
        ids[0],
    ]
    assert {d.id for d in await repo.list_deliveries(session, batch_id="bat_test")} == set(ids)
    assert await repo.list_deliveries(session, status="delivered") == []
    assert len(await repo.list_deliveries(session, output_id=output.id, limit=2)) == 2
    assert (await repo.count_by_status(session))["pending"] == 3
    assert await repo.queue_depth(session) == 3
    assert await repo.oldest_pending_age(session, now=T0 + timedelta(seconds=90)) == 90.0
    assert await repo.insert_deliveries(session, []) == []


async def test_large_bodies_are_stored_exactly_and_compressed_with_lz4(
    session: AsyncSession, backend: str
) -> None:
    """An Events API request of 100 events (tens of KB) comes back byte for byte. On
    PostgreSQL it is compressed out of line with lz4 (migration 0004), not pglz; on
    SQLite the relay stores it as an LZ4 frame (StoredBody, migration 0005)."""
    output = await _output(session)
    events = b",".join(
        b'{"eventId":"e%d","matchKeys":[{"type":"EMAIL","values":["%064x"]}]}' % (i, i * 7919)
        for i in range(100)
    )
    body = b'{"eventData":[' + events + b"]}"
    assert len(body) > 10_000
    [delivery_id] = await repo.insert_deliveries(
        session,
        [repo.NewDelivery(output_id=output.id, source="mparticle", body=body, index_map=[0])],
        now=T0,
    )
    await session.commit()
    session.expunge_all()
    stored = await repo.get_delivery(session, delivery_id)
    assert stored is not None
    assert stored.body == body
    raw = await session.scalar(
        text("SELECT body FROM deliveries WHERE id = :id"), {"id": delivery_id}
    )
    if backend == "sqlite":
        assert raw.startswith(LZ4_FRAME_MAGIC)
        assert len(raw) < len(body) / 2
    else:
        assert raw == body
    if backend == "postgresql":
        method = await session.scalar(
            text("SELECT pg_column_compression(body) FROM deliveries WHERE id = :id"),
            {"id": delivery_id},
        )
        assert method == "lz4"
        declared = await session.execute(
            text(
                "SELECT attname, attcompression::text FROM pg_attribute "
                "WHERE attrelid = 'deliveries'::regclass AND attname IN "
                "('body', 'results', 'dropped')"
            )
        )
        assert dict(declared.all()) == {
            "body": "l",
            "results": "l",
            "dropped": "l",
        }


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_a_body_stored_before_compression_reads_as_it_was(session: AsyncSession) -> None:
    """Rows written before migration 0005 hold the body as it was sent: read unchanged."""
    output = await _output(session)
    body = b'{"events":[{"eventId":"e1"}]}'
    [old, new] = await repo.insert_deliveries(
        session,
        [
            repo.NewDelivery(output_id=output.id, source="mparticle", body=body, index_map=[0]),
            repo.NewDelivery(output_id=output.id, source="mparticle", body=body, index_map=[0]),
        ],
        now=T0,
    )
    await session.execute(
        text("UPDATE deliveries SET body = :body WHERE id = :id"), {"body": body, "id": old}
    )
    await session.commit()
    session.expunge_all()
    assert [d.body for d in await repo.get_deliveries(session, [old, new])] == [body, body]


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_downgrading_below_0005_stores_bodies_as_they_were_sent(
    empty_database_url: str,
) -> None:
    """An older relay sends a body as it is stored: below revision 0005 every body is
    stored as it was sent again."""
    await migrate(empty_database_url)
    engine = create_engine(empty_database_url)
    body = b'{"events":[{"eventId":"e1"}]}' * 50

    def downgrade(connection: Connection) -> None:
        config = alembic_config(empty_database_url)
        config.attributes["connection"] = connection
        command.downgrade(config, "0004")

    try:
        async with async_sessionmaker(engine, expire_on_commit=False).begin() as session:
            output = await _output(session)
            await repo.insert_deliveries(
                session,
                [
                    repo.NewDelivery(
                        output_id=output.id, source="mparticle", body=body, index_map=[0]
                    )
                ],
                now=T0,
            )
        async with engine.begin() as connection:
            stored = (await connection.execute(text("SELECT body FROM deliveries"))).scalar_one()
            assert stored.startswith(LZ4_FRAME_MAGIC)
            await connection.run_sync(downgrade)
        async with engine.connect() as connection:
            stored = (await connection.execute(text("SELECT body FROM deliveries"))).scalar_one()
        assert stored == body
    finally:
        await engine.dispose()


# SQLAlchemy's dialect classes have untyped constructors.
DIALECTS = (sqlite.dialect(), postgresql.dialect())  # type: ignore[no-untyped-call]


@given(st.binary(max_size=4096))
def test_a_stored_body_reads_back_as_written_on_both_backends(body: bytes) -> None:
    sqlite_dialect, postgresql_dialect = DIALECTS
    for dialect in (sqlite_dialect, postgresql_dialect):
        stored = StoredBody().process_bind_param(body, dialect)
        assert StoredBody().process_result_value(stored, dialect) == body
    assert StoredBody().process_bind_param(body, postgresql_dialect) == body


async def test_claim_due_picks_due_deliveries_of_live_outputs(session: AsyncSession) -> None:
    live = await _output(session)
    reauth = await _output(session, status=OutputStatus.NEEDS_REAUTH)
    disabled = await _output(session)
    await repo.update_output(session, disabled.id, {"enabled": False})
    due = await repo.insert_deliveries(session, _new(live.id, 2), now=T0)
    later = await repo.insert_deliveries(session, _new(live.id, 1), now=T0 + timedelta(minutes=5))
    await repo.insert_deliveries(session, _new(reauth.id, 2) + _new(disabled.id, 1), now=T0)
    await session.commit()

    assert await repo.count_waiting(session) == 3
    assert await repo.count_waiting(session, output_id=reauth.id) == 2
    claimed = await repo.claim_due(session, "w1", 10, T0, 60)
    await session.commit()
    assert sorted(d.id for d in claimed) == sorted(due)
    assert all(
        d.status == "in_flight"
        and d.leased_by == "w1"
        and d.attempts == 1
        and d.lease_expires_at == T0 + timedelta(seconds=60)
        for d in claimed
    )
    assert await repo.claim_due(session, "w1", 10, T0, 60) == []

    # After a new Login with Amazon the waiting deliveries flow again.
    await repo.set_status(session, reauth.id, OutputStatus.CONFIGURED)
    await session.commit()
    assert await repo.count_waiting(session) == 1
    resumed = await repo.claim_due(session, "w1", 10, T0 + timedelta(minutes=5), 60)
    assert {d.output_id for d in resumed} == {live.id, reauth.id}
    assert later[0] in {d.id for d in resumed}
    assert await repo.claim_due(session, "w1", 0, T0, 60) == []


async def test_concurrent_claimers_never_share_a_delivery(
    sessionmaker: async_sessionmaker[AsyncSession],
) -> None:
    async with sessionmaker.begin() as session:
        output = await _output(session)
        ids = await repo.insert_deliveries(session, _new(output.id, 40), now=T0)

    async def claimer(worker: str) -> list[str]:
        got: list[str] = []
        while True:
            async with sessionmaker.begin() as session:
                batch = await repo.claim_due(session, worker, 3, T0, 60)
            if not batch:
                return got
            got += [d.id for d in batch]

    results = await asyncio.gather(*(claimer(f"w{n}") for n in range(4)))
    claimed = [i for result in results for i in result]
    assert len(claimed) == len(set(claimed)), "a delivery was claimed twice"
    assert sorted(claimed) == sorted(ids)


# PostgreSQL only: on SQLite, with one writer, a second claimer waits instead (above).
@pytest.mark.postgres
@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
async def test_skip_locked_while_a_claim_is_uncommitted(
    sessionmaker: async_sessionmaker[AsyncSession],
) -> None:
    async with sessionmaker.begin() as session:
        output = await _output(session)
        await repo.insert_deliveries(session, _new(output.id, 4), now=T0)

    async with sessionmaker() as first, sessionmaker() as second:
        mine = await repo.claim_due(first, "w1", 2, T0, 60)
        # Without committing the first claim, a second process gets the others at once.
        theirs = await asyncio.wait_for(repo.claim_due(second, "w2", 10, T0, 60), timeout=5)
        assert len(mine) == 2
        assert len(theirs) == 2
        assert not {d.id for d in mine} & {d.id for d in theirs}
        await first.commit()
        await second.commit()


async def test_expired_lease_is_claimed_again(session: AsyncSession) -> None:
    output = await _output(session)
    (delivery_id,) = await repo.insert_deliveries(session, _new(output.id), now=T0)
    await session.commit()
    assert [d.id for d in await repo.claim_due(session, "dead-worker", 5, T0, 60)] == [delivery_id]
    await session.commit()
    assert await repo.claim_due(session, "w2", 5, T0 + timedelta(seconds=59), 60) == []
    (again,) = await repo.claim_due(session, "w2", 5, T0 + timedelta(seconds=60), 60)
    await session.commit()
    assert again.id == delivery_id
    assert again.leased_by == "w2"
    assert again.attempts == 2
    # The first worker lost its lease: its late outcome is not recorded.
    assert not await repo.complete(
        session, delivery_id, worker_id="dead-worker", now=T0, status=DeliveryStatus.DELIVERED
    )
    assert await repo.complete(
        session,
        delivery_id,
        worker_id="w2",
        now=T0 + timedelta(seconds=61),
        status=DeliveryStatus.DELIVERED,
        status_code=207,
        results=[{"index": 0, "status": "success"}],
    )
    await session.commit()
    session.expunge_all()
    done = await repo.get_delivery(session, delivery_id)
    assert done is not None
    assert done.status == "delivered"
    assert done.leased_by is None
    assert done.results == [{"index": 0, "status": "success"}]
    assert done.last_status_code == 207


async def test_delivery_state_transitions(session: AsyncSession) -> None:
    output = await _output(session)
    a, b, c, d = await repo.insert_deliveries(session, _new(output.id, 4), now=T0)
    await session.commit()
    assert len(await repo.claim_due(session, "w", 10, T0, 60)) == 4
    now = T0 + timedelta(seconds=1)

    # A retryable failure goes back to pending, due later, optionally with a smaller body.
    assert await repo.reschedule(
        session,
        a,
        worker_id="w",
        now=now,
        next_attempt_at=now + timedelta(seconds=30),
        status_code=429,
        error="x" * 5000,
        body=b'{"eventData": [0]}',
        index_map=[0],
    )
    assert await repo.claim_due(session, "w", 10, now, 60) == []
    (retried,) = await repo.claim_due(session, "w", 10, now + timedelta(seconds=30), 60)
    assert retried.id == a
    assert retried.attempts == 2
    assert retried.last_status_code == 429
    assert retried.body == b'{"eventData": [0]}'
    assert len(retried.last_error or "") == 2000

    with pytest.raises(ValueError, match="complete"):
        await repo.complete(session, b, worker_id="w", now=now, status=DeliveryStatus.PENDING)
    assert await repo.complete(
        session,
        b,
        worker_id="w",
        now=now,
        status=DeliveryStatus.FAILED,
        status_code=400,
        error="bad",
    )
    assert await repo.mark_dead(session, c, worker_id="w", now=now, error="too old")
    assert not await repo.mark_dead(session, c, now=now)  # already dead
    # Graceful shutdown: unsent claims go back without counting the attempt.
    assert await repo.release(session, "w", now=now, delivery_ids=[d]) == 1
    assert await repo.release(session, "w", now=now) == 1  # the re-claimed ``a``
    await session.commit()
    session.expunge_all()
    states = {x.id: x for x in await repo.get_deliveries(session, [a, b, c, d])}
    assert states[d].status == "pending"
    assert states[d].attempts == 0
    assert states[d].leased_by is None
    assert states[a].status == "pending"
    assert states[a].attempts == 1
    assert (states[b].status, states[c].status) == ("failed", "dead")
    assert await repo.mark_dead(session, d, now=now)  # an age sweep takes a pending one

    # The admin's retry: failed and dead go back to the queue, due now, with a fresh age.
    retry_at = T0 + timedelta(days=2)
    for failed in (b, c):
        again = await repo.retry(session, failed, now=retry_at)
        assert again is not None
        assert again.status == "pending"
        assert again.attempts == 0
        assert again.queued_at == retry_at
        assert again.next_attempt_at == retry_at
    assert await repo.retry(session, a) is None  # pending: nothing to retry
    assert await repo.retry(session, "dlv_missing") is None
    await session.commit()
    counts = await repo.count_by_status(session, output_id=output.id)
    assert counts["pending"] == 3
    assert counts["dead"] == 1
    assert counts["delivered"] == 0


async def test_a_delivery_given_up_keeps_its_last_results_and_what_is_left_to_send(
    session: AsyncSession,
) -> None:
    output = await _output(session)
    (delivery_id,) = await repo.insert_deliveries(
        session,
        [
            repo.NewDelivery(
                output_id=output.id,
                source="mparticle",
                body=b'{"events": [0, 1, 2]}',
                index_map=[4, 5, 6],
            )
        ],
        now=T0,
    )
    await session.commit()
    await repo.claim_due(session, "w", 1, T0, 60)
    # A 207 with one event throttled, after RELAY_DELIVERY_MAX_AGE: given up.
    results = [
        {"index": 4, "status": "ok"},
        {"index": 5, "status": "error", "code": "TOO_MANY_REQUESTS"},
        {"index": 6, "status": "ok"},
    ]
    assert await repo.mark_dead(
        session,
        delivery_id,
        now=T0,
        worker_id="w",
        status_code=207,
        error="too old",
        results=results,
        body=b'{"events": [1]}',
        index_map=[5],
    )
    await session.commit()
    session.expunge_all()
    (dead,) = await repo.get_deliveries(session, [delivery_id])
    assert (dead.status, dead.results, dead.index_map, dead.event_count) == (
        "dead",
        results,
        [5],
        1,
    )
    assert dead.body == b'{"events": [1]}'
    # The admin's retry sends only the event that had no final outcome.
    again = await repo.retry(session, delivery_id, now=T0)
    assert again is not None
    assert (again.status, again.body, again.index_map) == ("pending", b'{"events": [1]}', [5])
    with pytest.raises(ValueError, match="index_map"):
        await repo.mark_dead(session, delivery_id, now=T0, body=b"{}")


async def test_prune_in_batches(session: AsyncSession) -> None:
    output = await _output(session)
    ids = await repo.insert_deliveries(session, _new(output.id, 7), now=T0)
    await session.commit()
    claimed = await repo.claim_due(session, "w", 10, T0, 60)
    for n, delivery in enumerate(claimed):
        status = DeliveryStatus.FAILED if n == 0 else DeliveryStatus.DELIVERED
        moment = T0 + timedelta(days=10 if n == 1 else 0)  # one is recent
        await repo.complete(session, delivery.id, worker_id="w", now=moment, status=status)
    await session.commit()

    cutoff = T0 + timedelta(days=7)
    deleted = []
    while True:
        async with session.begin():
            count = await repo.prune_delivered(session, cutoff, batch_size=2)
        deleted.append(count)
        if count < 2:
            break
    assert deleted == [2, 2, 1]
    remaining = {d.id for d in await repo.list_deliveries(session)}
    assert len(remaining) == 2
    assert remaining <= set(ids)


async def test_dropped_batches_are_listed_newest_first_and_pruned_in_batches(
    session: AsyncSession,
) -> None:
    output = await _output(session)
    other = await _output(session)
    dropped = [{"index": 0, "reason": "too_old"}, {"index": 1, "reason": "no_match_key"}]
    for day in range(5):  # T0 - 4 days … T0
        await repo.record_dropped_batch(
            session,
            batch_id=f"bat_day{day}",
            output_id=output.id,
            source="records",
            dropped=dropped,
            now=T0 - timedelta(days=4 - day),
        )
    made = await repo.record_dropped_batch(
        session, output_id=other.id, source="segment", dropped=dropped[:1], now=T0
    )
    assert made.startswith("bat_")
    with pytest.raises(ValueError, match="at least one dropped event"):
        await repo.record_dropped_batch(session, output_id=output.id, source="records", dropped=[])
    await session.commit()

    recent = await repo.recent_dropped_batches(session, output.id, limit=3)
    assert [r.batch_id for r in recent] == ["bat_day4", "bat_day3", "bat_day2"]
    assert (recent[0].dropped_count, recent[0].dropped, recent[0].created_at) == (2, dropped, T0)
    await session.commit()  # ends the read's transaction: each prune below takes its own

    cutoff = T0 - timedelta(days=1, hours=12)  # keeps day 3 (T0 - 1 day) and day 4
    deleted = []
    while True:
        async with session.begin():
            count = await repo.prune_dropped_batches(session, cutoff, batch_size=2)
        deleted.append(count)
        if count < 2:
            break
    assert deleted == [2, 1]
    left = await repo.recent_dropped_batches(session, output.id)
    assert [r.batch_id for r in left] == ["bat_day4", "bat_day3"]
    assert [r.batch_id for r in await repo.recent_dropped_batches(session, other.id)] == [made]


async def test_timestamps_round_trip_as_aware_utc(session: AsyncSession) -> None:
    output = await _output(session)
    local = datetime(2025, 3, 1, 14, 0, tzinfo=UTC).astimezone()  # any offset
    await repo.insert_deliveries(session, _new(output.id), now=local)
    await session.commit()
    session.expunge_all()
    stored = (await session.scalars(select(Delivery))).one()
    assert stored.created_at == local
    assert stored.created_at.utcoffset() == timedelta(0)
    with pytest.raises(Exception, match="naive"):
        await repo.insert_deliveries(session, _new(output.id), now=datetime(2025, 1, 1))
    await session.rollback()
    assert (await session.scalars(select(Credential))).all() == []


async def test_engine_settings(engine: AsyncEngine, backend: str) -> None:
    async with engine.connect() as connection:
        if backend == "sqlite":
            assert (await connection.exec_driver_sql("PRAGMA journal_mode")).scalar() == "wal"
            assert (await connection.exec_driver_sql("PRAGMA foreign_keys")).scalar() == 1
            assert (await connection.exec_driver_sql("PRAGMA busy_timeout")).scalar() == 10000
        else:
            assert (await connection.exec_driver_sql("SELECT 1")).scalar() == 1


async def test_create_engine_accepts_plain_urls_and_new_directories(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'new' / 'x.db'}")
    try:
        assert engine.url.drivername == "sqlite+aiosqlite"
        async with engine.connect() as connection:
            await connection.exec_driver_sql("SELECT 1")
        assert (tmp_path / "new" / "x.db").exists()
    finally:
        await engine.dispose()


async def test_next_due_at(session: AsyncSession) -> None:
    assert await repo.next_due_at(session) is None
    output = await _output(session)
    waiting = await _output(session, status=OutputStatus.NEEDS_REAUTH)
    await repo.insert_deliveries(session, _new(waiting.id), now=T0 - timedelta(hours=1))
    await repo.insert_deliveries(session, _new(output.id, 2), now=T0)
    await session.commit()
    assert await repo.next_due_at(session) == T0
    claimed = await repo.claim_due(session, "w", 1, T0, 60)
    await repo.reschedule(
        session,
        claimed[0].id,
        worker_id="w",
        now=T0,
        next_attempt_at=T0 + timedelta(seconds=30),
    )
    await repo.claim_due(session, "w", 1, T0, 60)
    await session.commit()
    # One in flight until T0+60, one pending until T0+30.
    assert await repo.next_due_at(session) == T0 + timedelta(seconds=30)


@pytest.mark.postgres
@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
async def test_refresh_lock_wait_is_bounded(
    sessionmaker: async_sessionmaker[AsyncSession], keyring: KeyRing
) -> None:
    async with sessionmaker.begin() as session:
        output = await _output(session)
        await repo.upsert_credential(session, keyring, output.id, refresh_token=REFRESH)
    async with sessionmaker() as first, sessionmaker() as second:
        assert await repo.lock_for_refresh(first, output.id) is not None
        with pytest.raises(DBAPIError, match="lock timeout"):
            await repo.lock_for_refresh(second, output.id, timeout_seconds=0.2)
        await second.rollback()
        await first.rollback()
