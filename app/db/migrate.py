"""Run Alembic programmatically: ``relay migrate``, ``relay serve`` and /readyz use this.

Two relay processes starting together must migrate once: on PostgreSQL the upgrade runs
in one transaction holding an advisory lock, so the second waits, then finds the schema
at head; on SQLite ``BEGIN IMMEDIATE`` takes the database's write lock for the same
effect. PostgreSQL and SQLite both have transactional DDL, so a failed migration leaves
the schema as it was.
"""

from __future__ import annotations

import asyncio
import functools
from pathlib import Path
from typing import Final

import structlog
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from app.config import ConfigError, mask_database_url
from app.db.session import create_engine

log = structlog.get_logger(__name__)

# Next to the package in a checkout or editable install; in the working directory when
# the package is installed into site-packages and migrations/ is copied beside it.
_CANDIDATES: Final = (
    Path(__file__).resolve().parents[2] / "migrations",
    Path.cwd() / "migrations",
)
# Any constant works as long as nothing else in the database uses it: "relaymig" in ASCII.
ADVISORY_LOCK_ID: Final = 0x72656C61796D6967


def migrations_dir() -> Path:
    for candidate in _CANDIDATES:
        if (candidate / "env.py").is_file():
            return candidate
    raise ConfigError(f"migrations not found (looked in {', '.join(map(str, _CANDIDATES))})")


def alembic_config(database_url: str | None = None) -> Config:
    """An Alembic config for the relay's migrations (no alembic.ini needed)."""
    config = Config()
    # ConfigParser interpolates '%': escape it in the path.
    config.set_main_option("script_location", str(migrations_dir()).replace("%", "%%"))
    if database_url is not None:
        config.attributes["database_url"] = database_url
    return config


@functools.cache
def head_revisions() -> tuple[str, ...]:
    """The revisions the code expects (migration files do not change while running)."""
    return tuple(ScriptDirectory.from_config(alembic_config()).get_heads())


def _current(connection: Connection) -> tuple[str, ...]:
    return tuple(MigrationContext.configure(connection).get_current_heads())


def _upgrade(connection: Connection, config: Config) -> tuple[tuple[str, ...], tuple[str, ...]]:
    before = _current(connection)
    config.attributes["connection"] = connection
    command.upgrade(config, "head")
    return before, _current(connection)


async def migrate(database_url: str) -> None:
    """Upgrade the database at ``database_url`` to head (idempotent, safe to run concurrently)."""
    engine = create_engine(database_url)
    try:
        async with engine.begin() as connection:
            if connection.dialect.name == "postgresql":
                # Released at commit: the next process then sees the upgraded schema.
                await connection.execute(
                    text("SELECT pg_advisory_xact_lock(:id)"), {"id": ADVISORY_LOCK_ID}
                )
            else:
                await connection.exec_driver_sql("BEGIN IMMEDIATE")
            before, after = await connection.run_sync(_upgrade, alembic_config(database_url))
    finally:
        await engine.dispose()
    if before != after:
        log.info(
            "database_migrated",
            database=mask_database_url(database_url),
            revision_from=",".join(before) or None,
            revision_to=",".join(after),
        )


def upgrade_to_head(database_url: str) -> None:
    """``migrate`` for synchronous callers (the CLI); not from inside a running event loop."""
    asyncio.run(migrate(database_url))


async def current_revisions(bind: AsyncEngine | str) -> tuple[str, ...]:
    """The revisions the database is at (empty if it was never migrated)."""
    engine = create_engine(bind) if isinstance(bind, str) else bind
    try:
        async with engine.connect() as connection:
            return await connection.run_sync(_current)
    finally:
        if isinstance(bind, str):
            await engine.dispose()


async def at_head(bind: AsyncEngine | str) -> bool:
    """Whether the database is at the code's head revision (for /readyz).

    Pass the app's engine to reuse its pool; a URL opens and closes a private engine.
    """
    return set(await current_revisions(bind)) == set(head_revisions())
