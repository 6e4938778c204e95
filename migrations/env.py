"""Async Alembic environment: the only place the schema changes."""

from __future__ import annotations

import asyncio
import os

from alembic import context
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from ledger.db import async_url
from ledger.schema import metadata as ledger_metadata

config = context.config
target_metadata = [ledger_metadata]
try:  # the read side's tables, once that package defines them
    from projections.schema import metadata as projection_metadata

    target_metadata.append(projection_metadata)
except ImportError:  # pragma: no cover - only before the projections exist
    pass


def _url() -> str:
    url = config.attributes.get("url") or os.environ.get("LEDGER_DATABASE_URL")
    if not url:
        raise RuntimeError("set LEDGER_DATABASE_URL (postgresql://user@host:port/dbname)")
    return async_url(str(url))


def _run(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=target_metadata)
    with context.begin_transaction():
        context.run_migrations()


async def _run_async() -> None:
    engine = create_async_engine(_url())
    async with engine.connect() as connection:
        await connection.run_sync(_run)
        await connection.commit()
    await engine.dispose()


def run_migrations_online() -> None:
    """Run the migrations against the configured database."""
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
    else:
        asyncio.run(_run_async())


if context.is_offline_mode():
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    run_migrations_online()
