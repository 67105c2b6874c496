"""The operator commands, as a shell script runs them (service.md §Command line).

``relay outputs …``, ``relay connections …``, ``relay deliveries list|retry``,
``relay migrate``, ``relay rotate-keys`` and ``relay keygen`` work on the database
that ``RELAY_DATABASE_URL`` names and print tab-separated lines. Each test runs on
both backends, through ``app.cli.main`` with the environment a user would set; one
runs the installed ``relay`` script itself.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import inspect

from app.cli import main
from app.crypto import KeyRing, new_key_entry
from app.db import repository as repo
from app.db.models import DeliveryStatus, OutputStatus
from app.db.session import create_engine, create_sessionmaker

RELAY = str(Path(sys.executable).with_name("relay"))
T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def use_database(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, database_url: str, keys: str
) -> None:
    """The environment of an operator's shell: this database, this key ring."""
    monkeypatch.chdir(tmp_path)  # no developer .env
    monkeypatch.setenv("RELAY_DATABASE_URL", database_url)
    monkeypatch.setenv("RELAY_ENCRYPTION_KEYS", keys)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[str]]:
    """Exit code and the printed lines of ``relay argv…``."""
    code = main(list(argv))
    return code, capsys.readouterr().out.splitlines()


def fields(lines: list[str]) -> list[list[str]]:
    return [line.split("\t") for line in lines]


# --- outputs and connections ------------------------------------------------------------


def test_outputs_and_connections_from_creation_to_deletion(
    database_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    use_database(monkeypatch, tmp_path, database_url, new_key_entry("k1"))
    code, lines = run(
        capsys,
        "outputs", "create", "--name", "EU shop", "--advertiser-id", "987654",
        "--region", "EU", "--data-set-name", "eu_purchases", "--partner-name", "acme",
    )  # fmt: skip
    assert code == 0
    ((output_id, next_step),) = fields(lines)
    assert output_id.startswith("out_")
    assert next_step == f"needs_login: open /ui/outputs/{output_id} and click Login with Amazon"

    assert run(capsys, "outputs", "list") == (
        0,
        [f"{output_id}\tneeds_login\tEU\t987654\tEU shop"],
    )
    code, lines = run(capsys, "outputs", "show", output_id)
    shown = dict(fields(lines))
    assert code == 0
    assert shown["id"] == output_id
    assert shown["name"] == "EU shop"
    assert shown["status"] == "needs_login"
    assert shown["advertiser_id"] == "987654"
    assert shown["region"] == "EU"
    assert shown["data_set_name"] == "eu_purchases"
    assert shown["partner_name"] == "acme"

    code, lines = run(
        capsys, "connections", "create", "--output-id", output_id,
        "--source", "mparticle", "--name", "web",
    )  # fmt: skip
    assert code == 0
    created = {line[0]: line[1] for line in fields(lines) if len(line) == 2}
    assert lines[-1] == "The secret is shown once; only its hash is stored."
    connection_id, key, secret = created["id"], created["key"], created["secret"]
    assert key.startswith("rk_")
    assert created["write_key"]  # the Segment-style single credential

    async def authenticates(secret: str) -> bool:
        engine = create_engine(database_url)
        try:
            async with create_sessionmaker(engine)() as session:
                found = await repo.authenticate_connection(session, key, secret)
                return found is not None and found.id == connection_id
        finally:
            await engine.dispose()

    # The secret printed is the one that authenticates, and only it.
    assert asyncio.run(authenticates(secret))
    assert not asyncio.run(authenticates(secret + "x"))

    listed = [connection_id, "mparticle", "active", key, "web"]
    assert run(capsys, "connections", "list", "--output-id", output_id) == (
        0,
        ["\t".join(listed)],
    )
    assert run(capsys, "connections", "deactivate", connection_id) == (0, [])
    _, lines = run(capsys, "connections", "list", "--output-id", output_id)
    assert fields(lines)[0][2] == "inactive"
    assert run(capsys, "connections", "activate", connection_id) == (0, [])
    _, lines = run(capsys, "connections", "list", "--output-id", output_id)
    assert fields(lines)[0][2] == "active"

    assert run(capsys, "connections", "delete", connection_id) == (0, [])
    assert run(capsys, "connections", "list", "--output-id", output_id) == (0, [])
    assert run(capsys, "connections", "delete", connection_id) == (
        1,
        [f"relay: no connection {connection_id}"],
    )
    assert run(
        capsys, "connections", "create", "--output-id", "out_missing",
        "--source", "segment", "--name", "x",
    ) == (1, ["relay: no output out_missing"])  # fmt: skip

    assert run(capsys, "outputs", "delete", output_id) == (0, [f"deleted {output_id}"])
    assert run(capsys, "outputs", "list") == (0, [])
    assert run(capsys, "outputs", "show", output_id) == (1, [f"relay: no output {output_id}"])
    assert run(capsys, "outputs", "delete", output_id) == (1, [f"relay: no output {output_id}"])


# --- deliveries ---------------------------------------------------------------------------


async def seed_deliveries(database_url: str) -> tuple[str, dict[str, str]]:
    """An output with one delivery in each state an operator meets: dead, failed,
    in flight and delivered. Returns the output's id and the deliveries' ids by state."""
    engine = create_engine(database_url)
    try:
        async with create_sessionmaker(engine)() as session:
            output = await repo.create_output(session, name="Shop", advertiser_id="1", now=T0)
            await repo.set_status(session, output.id, OutputStatus.CONFIGURED, now=T0)
            new = [
                repo.NewDelivery(
                    output_id=output.id, source="mparticle", body=b"{}", index_map=[0, 1]
                )
                for _ in range(4)
            ]
            dead, failed, in_flight, delivered = await repo.insert_deliveries(session, new, now=T0)
            await session.commit()
            await repo.claim_due(session, "w", 10, T0, 60)
            now = T0 + timedelta(seconds=1)
            await repo.mark_dead(session, dead, worker_id="w", now=now, error="too old")
            await repo.complete(
                session, failed, worker_id="w", now=now,
                status=DeliveryStatus.FAILED, status_code=400, error="bad request",
            )  # fmt: skip
            await repo.complete(
                session, delivered, worker_id="w", now=now,
                status=DeliveryStatus.DELIVERED, status_code=207,
            )  # fmt: skip
            await session.commit()
            ids = {"dead": dead, "failed": failed, "in_flight": in_flight, "delivered": delivered}
            return output.id, ids
    finally:
        await engine.dispose()


def test_deliveries_are_listed_and_failed_or_dead_ones_retried(
    database_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    output_id, ids = asyncio.run(seed_deliveries(database_url))
    use_database(monkeypatch, tmp_path, database_url, new_key_entry("k1"))

    code, lines = run(capsys, "deliveries", "list", "--output-id", output_id)
    assert code == 0
    assert sorted(row[0] for row in fields(lines)) == sorted(ids.values())
    assert run(capsys, "deliveries", "list", "--status", "dead") == (
        0,
        [f"{ids['dead']}\tdead\t2 events\t1 attempts\t-\ttoo old"],
    )
    assert run(capsys, "deliveries", "list", "--status", "failed") == (
        0,
        [f"{ids['failed']}\tfailed\t2 events\t1 attempts\t400\tbad request"],
    )
    assert len(run(capsys, "deliveries", "list", "--limit", "1")[1]) == 1

    # Only failed and dead deliveries go back; the exit code says whether all did.
    code, lines = run(capsys, "deliveries", "retry", ids["failed"], ids["delivered"], "dlv_missing")
    assert code == 1
    assert lines == [
        f"{ids['failed']}\tqueued again",
        f"{ids['delivered']}\tnot retried (no such delivery, or not failed/dead)",
        "dlv_missing\tnot retried (no such delivery, or not failed/dead)",
    ]
    assert run(capsys, "deliveries", "retry", "--all-dead") == (
        0,
        [f"{ids['dead']}\tqueued again"],
    )
    code, lines = run(capsys, "deliveries", "list", "--status", "pending")
    assert sorted(row[0] for row in fields(lines)) == sorted([ids["dead"], ids["failed"]])
    assert all(row[3] == "0 attempts" for row in fields(lines))  # a fresh start
    assert run(capsys, "deliveries", "retry", "--all-dead") == (
        1,
        ["relay: name delivery ids or --all-dead"],
    )


# --- migrate, keys ------------------------------------------------------------------------


def test_migrate_creates_the_schema_and_is_idempotent(
    empty_database_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    use_database(monkeypatch, tmp_path, empty_database_url, new_key_entry("k1"))
    for _ in range(2):
        assert run(capsys, "migrate") == (0, ["relay: database is at the latest revision"])

    async def tables() -> set[str]:
        engine = create_engine(empty_database_url)
        try:
            async with engine.connect() as connection:
                return set(await connection.run_sync(lambda c: inspect(c).get_table_names()))
        finally:
            await engine.dispose()

    assert {"outputs", "connections", "deliveries", "alembic_version"} <= asyncio.run(tables())


def test_keygen_entries_rotate_every_stored_secret(
    database_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, (old_entry,) = run(capsys, "keygen", "--key-id", "k1")
    assert code == 0
    assert old_entry.startswith("k1:")
    new_entry = run(capsys, "keygen")[1][0]
    assert new_entry.startswith("k")
    assert new_entry != old_entry
    old, both = KeyRing.parse(old_entry), KeyRing.parse(f"{new_entry},{old_entry}")

    async def store_tokens() -> list[str]:
        engine = create_engine(database_url)
        try:
            async with create_sessionmaker(engine)() as session:
                outputs = [
                    await repo.create_output(session, name=f"o{n}", advertiser_id="1")
                    for n in range(2)
                ]
                for n, output in enumerate(outputs):
                    await repo.upsert_credential(session, old, output.id, refresh_token=f"t{n}")
                await session.commit()
                return [output.id for output in outputs]
        finally:
            await engine.dispose()

    async def key_ids_and_tokens(output_ids: list[str]) -> list[tuple[str, str]]:
        engine = create_engine(database_url)
        try:
            async with create_sessionmaker(engine)() as session:
                found = []
                for output_id in output_ids:
                    credential = await repo.get_credential(session, output_id)
                    assert credential is not None
                    token = repo.refresh_token_of(both, credential).reveal()
                    found.append((credential.key_id, token))
                return found
        finally:
            await engine.dispose()

    output_ids = asyncio.run(store_tokens())
    use_database(monkeypatch, tmp_path, database_url, f"{new_entry},{old_entry}")
    rotated = "relay: re-encrypted {} secret(s) under the newest key"
    assert run(capsys, "rotate-keys") == (0, [rotated.format(2)])
    new_id = new_entry.partition(":")[0]
    assert asyncio.run(key_ids_and_tokens(output_ids)) == [(new_id, "t0"), (new_id, "t1")]
    assert run(capsys, "rotate-keys") == (0, [rotated.format(0)])


# --- the installed script -----------------------------------------------------------------


def test_the_installed_script_runs_the_same_commands(database_url: str, tmp_path: Path) -> None:
    env = {
        **{name: value for name, value in os.environ.items() if not name.startswith("RELAY_")},
        "RELAY_DATABASE_URL": database_url,
        "RELAY_ENCRYPTION_KEYS": new_key_entry("k1"),
    }

    def relay(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [RELAY, *argv], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
        )

    created = relay("outputs", "create", "--name", "Shop", "--advertiser-id", "42")
    assert created.returncode == 0, created.stderr
    output_id = created.stdout.split("\t")[0]
    listed = relay("outputs", "list")
    assert listed.stdout == f"{output_id}\tneeds_login\tNA\t42\tShop\n"
    missing = relay("deliveries", "retry", "dlv_missing")
    assert missing.returncode == 1
    assert missing.stdout == "dlv_missing\tnot retried (no such delivery, or not failed/dead)\n"
    usage = relay("deliveries", "retry", "--bogus")
    assert usage.returncode == 2
    assert "unrecognized arguments: --bogus" in usage.stderr
