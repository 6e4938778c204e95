"""Shared fixtures: a private PostgreSQL started by pytest-postgresql, schema by Alembic.

The server is started once per test session (never one that merely happens to be
running); the schema is built once into a template database by running the real
migrations, and every test gets its own database cloned from that template.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import psycopg
import pytest
from pytest_postgresql import factories
from pytest_postgresql.executors import PostgreSQLExecutor
from sqlalchemy.ext.asyncio import AsyncEngine

from ledger.db import make_engine, migrate
from ledger.store import EventStore, UncheckedEventStore

HERE = Path(__file__).resolve().parent
PG_CTL = HERE / "pg_ctl_as_postgres"
TEMPLATE = "ledger_template"

postgresql_proc = factories.postgresql_proc(
    executable=str(PG_CTL),
    port=None,
    postgres_options="-c max_connections=200 -c fsync=on",
)


def _admin(proc: PostgreSQLExecutor, dbname: str = "postgres") -> psycopg.Connection:
    return psycopg.connect(
        host=proc.host, port=proc.port, user=proc.user, dbname=dbname, autocommit=True
    )


def server_url(proc: PostgreSQLExecutor, dbname: str) -> str:
    """Return the plain postgresql:// URL of ``dbname`` on the test server."""
    return f"postgresql://{proc.user}@{proc.host}:{proc.port}/{dbname}"


@pytest.fixture(scope="session")
def pg_server(postgresql_proc: PostgreSQLExecutor) -> PostgreSQLExecutor:
    """Return the session's PostgreSQL server, with a migrated template database."""
    with _admin(postgresql_proc) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{TEMPLATE}"')
        conn.execute(f'CREATE DATABASE "{TEMPLATE}"')
    asyncio.run(migrate(server_url(postgresql_proc, TEMPLATE)))
    return postgresql_proc


def _new_database(proc: PostgreSQLExecutor, template: str = TEMPLATE) -> str:
    name = f"t_{uuid.uuid4().hex[:12]}"
    with _admin(proc) as conn:
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    return name


def _drop_database(proc: PostgreSQLExecutor, name: str) -> None:
    with _admin(proc) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def db_url(pg_server: PostgreSQLExecutor) -> Iterator[str]:
    """Yield the URL of a fresh, migrated database of the test's own."""
    name = _new_database(pg_server)
    yield server_url(pg_server, name)
    _drop_database(pg_server, name)


@pytest.fixture
def empty_db_url(pg_server: PostgreSQLExecutor) -> Iterator[str]:
    """Yield the URL of a fresh database with no schema at all."""
    name = _new_database(pg_server, template="template0")
    yield server_url(pg_server, name)
    _drop_database(pg_server, name)


@pytest.fixture
async def engine(db_url: str) -> AsyncIterator[AsyncEngine]:
    """Yield an async engine on the test's database."""
    eng = make_engine(db_url, pool_size=12)
    yield eng
    await eng.dispose()


@pytest.fixture
def store(engine: AsyncEngine) -> UncheckedEventStore:
    """Return an unchecked event store on the test's database.

    Unchecked: tests of the store's own mechanics (and of the projections) append
    events without defining their instruments first; the checked store is
    ``checked_store``.
    """
    return UncheckedEventStore(engine)


@pytest.fixture
def checked_store(engine: AsyncEngine) -> EventStore:
    """Return the checked event store (what the CLI, ingest and consume use)."""
    return EventStore(engine)


@pytest.fixture
def cli_env(db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Point the CLI at the test's database; return the environment for subprocesses."""
    monkeypatch.setenv("LEDGER_DATABASE_URL", db_url)
    monkeypatch.setenv("LEDGER_HOME", str(tmp_path / "home"))
    env = dict(os.environ)
    env["LEDGER_DATABASE_URL"] = db_url
    env["LEDGER_HOME"] = str(tmp_path / "home")
    return env
