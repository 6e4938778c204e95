"""Connections and migrations: one engine factory, one way to reach schema head.

``LEDGER_DATABASE_URL`` is a plain ``postgresql://`` URL; choosing the driver (asyncpg)
is the ledger's business, so every URL passes through :func:`async_url`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from ledger.embedded import EmbeddedPostgres
from ledger.errors import DatabaseUnavailable, NotMigrated
from ledger.settings import Settings

__all__ = [
    "alembic_config",
    "async_url",
    "check_migrated",
    "database_url",
    "head_revision",
    "make_engine",
    "migrate",
    "open_engine",
]

_ROOT = Path(__file__).resolve().parent.parent
_MIGRATIONS = _ROOT / "migrations"


def async_url(url: str) -> str:
    """Return ``url`` with the asyncpg driver named (``postgresql+asyncpg://``)."""
    for prefix in (
        "postgresql+asyncpg://",
        "postgresql+psycopg://",
        "postgresql://",
        "postgres://",
    ):
        if url.startswith(prefix):
            return "postgresql+asyncpg://" + url[len(prefix) :]
    raise ValueError(f"LEDGER_DATABASE_URL must be a postgresql:// URL, got {url!r}")


def plain_url(url: str) -> str:
    """Return ``url`` as a driver-less ``postgresql://`` URL (what asyncpg.connect takes)."""
    return "postgresql://" + async_url(url).removeprefix("postgresql+asyncpg://")


def make_engine(url: str, *, pool_size: int = 5) -> AsyncEngine:
    """Create the async engine for ``url``."""
    return create_async_engine(
        async_url(url),
        pool_size=pool_size,
        max_overflow=10,
        # no pre-ping: it costs three round trips a checkout; a connection lost to a
        # server restart fails its statement, and the callers that live long (the
        # runner, the consumer) retry with backoff
        pool_pre_ping=False,
        connect_args={
            "server_settings": {
                "application_name": "position-ledger",
                "idle_in_transaction_session_timeout": "300000",
                # a generic plan made while the log was small would scan it forever
                "plan_cache_mode": "force_custom_plan",
                # Short indexed queries over a big log get big cost estimates, and past
                # jit_above_cost PostgreSQL compiles them first: 143 ms of JIT for the
                # 10 ms instrument lookup at 3.8M events. Nothing here gains from JIT.
                "jit": "off",
            }
        },
    )


def alembic_config(url: str) -> Config:
    """Return an Alembic config pointed at the project's migrations and ``url``."""
    if not (_MIGRATIONS / "env.py").is_file():
        raise NotMigrated(f"migrations not found at {_MIGRATIONS} (install from a source checkout)")
    cfg = Config()
    cfg.set_main_option("script_location", str(_MIGRATIONS))
    cfg.attributes["url"] = url
    return cfg


def head_revision() -> str:
    """Return the newest revision in ``migrations/``."""
    head = ScriptDirectory.from_config(alembic_config("postgresql://unused")).get_current_head()
    assert head is not None
    return head


async def migrate(url: str, revision: str = "head") -> None:
    """Upgrade the database at ``url`` to ``revision`` (idempotent)."""
    await asyncio.to_thread(command.upgrade, alembic_config(url), revision)


async def downgrade(url: str, revision: str = "base") -> None:
    """Downgrade the database at ``url`` to ``revision``."""
    await asyncio.to_thread(command.downgrade, alembic_config(url), revision)


async def current_revision(engine: AsyncEngine) -> str | None:
    """Return the database's schema revision, or None when it has no ledger schema.

    Raises:
        DatabaseUnavailable: the server cannot be reached.
    """
    try:
        async with engine.connect() as conn:
            exists = await conn.scalar(text("SELECT to_regclass('alembic_version') IS NOT NULL"))
            if not exists:
                return None
            revision = await conn.scalar(text("SELECT version_num FROM alembic_version"))
            return None if revision is None else str(revision)
    except (OSError, OperationalError, DBAPIError) as exc:
        if isinstance(exc, DBAPIError) and not isinstance(exc, OperationalError):
            orig = getattr(exc, "orig", None)
            if orig is None or "connect" not in type(orig).__name__.lower():
                raise
        raise DatabaseUnavailable(f"cannot reach the database: {exc}") from exc


async def check_migrated(engine: AsyncEngine) -> None:
    """Raise unless the database is at the newest schema revision.

    Raises:
        NotMigrated: no ledger schema, or an older one.
        DatabaseUnavailable: the server cannot be reached.
    """
    current = await current_revision(engine)
    head = head_revision()
    if current is None:
        raise NotMigrated("the database has no ledger schema")
    if current != head:
        raise NotMigrated(f"the database schema is at revision {current}, the ledger needs {head}")


# ------------------------------------------------------------- where the ledger lives


def database_url(
    settings: Settings,
    *,
    init: bool = False,
    announce: Callable[[EmbeddedPostgres], None] | None = None,
) -> str:
    """Return the URL to use: ``LEDGER_DATABASE_URL``, or the embedded cluster (started).

    The one rule for every entry point (the CLI and :class:`ledger.Ledger`): with
    ``LEDGER_DATABASE_URL`` unset the embedded cluster under ``LEDGER_HOME`` is created
    and started on first use.

    Args:
        settings: the ledger's settings.
        init: the caller is ``ledger db init`` (it says where the cluster is itself).
        announce: called with the cluster when this call created or started it.

    Raises:
        EmbeddedPostgresError: the embedded cluster cannot be created or started.
    """
    if settings.database_url:
        return settings.database_url
    cluster = EmbeddedPostgres(settings.home)
    created = cluster.init()
    started = cluster.start()
    if (created or started) and not init and announce is not None:
        announce(cluster)
    return cluster.url


@asynccontextmanager
async def open_engine(
    settings: Settings | None = None,
    *,
    announce: Callable[[EmbeddedPostgres], None] | None = None,
) -> AsyncIterator[AsyncEngine]:
    """Yield an engine on a migrated database (the embedded one is migrated on first use).

    Raises:
        NotMigrated: ``LEDGER_DATABASE_URL`` names a database without the current schema.
        DatabaseUnavailable: the server cannot be reached.
    """
    settings = settings or Settings()
    url = database_url(settings, announce=announce)
    engine = make_engine(url)
    try:
        if not settings.database_url and await current_revision(engine) != head_revision():
            await migrate(url)
        await check_migrated(engine)
        yield engine
    finally:
        await engine.dispose()
