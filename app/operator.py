"""Operator commands without the web UI: outputs, connections, deliveries, key rotation.

They work on the relay's database directly (RELAY_DATABASE_URL), one transaction
per command, and print plain text a shell script can read.
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from sqlalchemy.ext.asyncio import AsyncSession

from app.auth import write_key
from app.config import Settings
from app.crypto import KeyRing, keyring_from_settings
from app.db import repository as repo
from app.db.migrate import migrate
from app.db.models import DeliveryStatus
from app.db.session import create_engine, create_sessionmaker


@asynccontextmanager
async def _session(settings: Settings) -> AsyncIterator[AsyncSession]:
    await migrate(settings.database_url)
    engine = create_engine(settings.database_url)
    try:
        async with create_sessionmaker(engine)() as session, session.begin():
            yield session
    finally:
        await engine.dispose()


async def rotate_keys(settings: Settings) -> int:
    keyring = keyring_from_settings(settings)
    async with _session(settings) as session:
        return await repo.rotate_keys(session, keyring)


def _fail(message: str) -> int:
    print(f"relay: {message}")
    return 1


async def _outputs(session: AsyncSession, args: argparse.Namespace) -> int:
    if args.action == "list":
        for output in await repo.list_outputs(session):
            print(
                f"{output.id}\t{output.status}\t{output.region}\t{output.advertiser_id}\t{output.name}"
            )
        return 0
    if args.action == "show":
        found = await repo.get_output(session, args.id)
        if found is None:
            return _fail(f"no output {args.id}")
        output = found
        for key, value in {
            "id": output.id,
            "name": output.name,
            "status": output.status,
            "advertiser_id": output.advertiser_id,
            **output.mapping_settings(),
        }.items():
            print(f"{key}\t{value}")
        return 0
    if args.action == "create":
        output = await repo.create_output(
            session,
            name=args.name,
            advertiser_id=args.advertiser_id,
            region=args.region,
            data_set_name=args.data_set_name,
            partner_name=args.partner_name,
        )
        print(f"{output.id}\tneeds_login: open /ui/outputs/{output.id} and click Login with Amazon")
        return 0
    if not await repo.delete_output(session, args.id):
        return _fail(f"no output {args.id}")
    print(f"deleted {args.id}")
    return 0


async def _connections(session: AsyncSession, args: argparse.Namespace, keyring: KeyRing) -> int:
    if args.action == "list":
        for connection in await repo.list_connections(session, args.output_id):
            state = "active" if connection.active else "inactive"
            print(
                f"{connection.id}\t{connection.source}\t{state}\t{connection.key}\t{connection.name}"
            )
        return 0
    if args.action == "create":
        if await repo.get_output(session, args.output_id) is None:
            return _fail(f"no output {args.output_id}")
        created = await repo.create_connection(
            session, output_id=args.output_id, source=args.source, name=args.name, keyring=keyring
        )
        connection, secret = created.connection, created.secret.reveal()
        print(f"id\t{connection.id}\nkey\t{connection.key}\nsecret\t{secret}")
        print(f"write_key\t{write_key(connection.key, secret)}")
        print("The secret is shown once; only its hash is stored.")
        return 0
    if args.action == "delete":
        done = await repo.delete_connection(session, args.id)
    else:
        done = (
            await repo.update_connection(session, args.id, {"active": args.action == "activate"})
            is not None
        )
    return 0 if done else _fail(f"no connection {args.id}")


async def _deliveries(session: AsyncSession, args: argparse.Namespace) -> int:
    if args.action == "list":
        for d in await repo.list_deliveries(
            session, output_id=args.output_id, status=args.status, limit=args.limit
        ):
            print(
                f"{d.id}\t{d.status}\t{d.event_count} events\t{d.attempts} attempts\t"
                f"{d.last_status_code or '-'}\t{d.last_error or ''}"
            )
        return 0
    ids = list(args.ids)
    if args.all_dead:
        ids += [
            d.id
            for d in await repo.list_deliveries(session, status=DeliveryStatus.DEAD, limit=100_000)
        ]
    if not ids:
        return _fail("name delivery ids or --all-dead")
    failed = 0
    for delivery_id in ids:
        if await repo.retry(session, delivery_id) is None:
            print(f"{delivery_id}\tnot retried (no such delivery, or not failed/dead)")
            failed += 1
        else:
            print(f"{delivery_id}\tqueued again")
    return 1 if failed else 0


async def run(settings: Settings, args: argparse.Namespace) -> int:
    keyring = keyring_from_settings(settings)
    async with _session(settings) as session:
        if args.command == "outputs":
            return await _outputs(session, args)
        if args.command == "connections":
            return await _connections(session, args, keyring)
        return await _deliveries(session, args)
