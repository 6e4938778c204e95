"""Connections and migrations: one engine factory, one way to reach schema head.

``LEDGER_DATABASE_URL`` is a plain ``postgresql://`` URL; choosing the driver (asyncpg)
is the ledger's business, so every URL passes through :func:`async_url`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, TypeVar
from urllib.parse import parse_qsl, unquote, urlencode

import asyncpg
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import InterfaceError as SAInterfaceError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from ledger.embedded import EmbeddedPostgres
from ledger.errors import DatabaseUnavailable, InvalidDatabaseURL, NotMigrated
from ledger.settings import Settings

if TYPE_CHECKING:
    from alembic.config import Config

__all__ = [
    "DatabaseURL",
    "Reconnect",
    "alembic_config",
    "async_url",
    "check_migrated",
    "connect_failure",
    "current_wal_lsn",
    "database_url",
    "head_revision",
    "is_transient",
    "make_engine",
    "mask_secrets",
    "migrate",
    "migrate_embedded",
    "open_engine",
    "plain_url",
    "redact",
    "replay_lag",
    "retry_transient",
    "wait_for_replay",
]

T = TypeVar("T")
log = logging.getLogger("ledger.db")

_ROOT = Path(__file__).resolve().parent.parent
_MIGRATIONS = _ROOT / "migrations"


_SCHEMES = ("postgresql+asyncpg://", "postgresql+psycopg://", "postgresql://", "postgres://")


@dataclass(frozen=True, slots=True)
class DatabaseURL:
    """A PostgreSQL URL taken apart: one host or several (a cluster), and its options.

    Accepted forms: ``postgresql://user:pw@host:port/db`` (one server),
    ``postgresql://user@h1:p1,h2:p2/db?target_session_attrs=read-write`` (libpq's
    multi-host form: the first that answers and matches ``target_session_attrs`` is
    used, so after a failover a new connection finds the new primary), and SQLAlchemy's
    ``postgresql+asyncpg://user@/db?host=h1:p1&host=h2:p2`` (what an engine renders).
    """

    userinfo: str  # "user" or "user:password" (still percent-encoded), or ""
    hosts: tuple[str, ...]  # "host:port" or "host" entries (may be empty: the default)
    path: str  # "/dbname" or ""
    query: tuple[tuple[str, str], ...]  # every parameter but ``host``

    @classmethod
    def parse(cls, url: str) -> DatabaseURL:
        """Take ``url`` apart.

        Raises:
            InvalidDatabaseURL: not a postgresql:// URL (the message masks its password).
        """
        prefix = next((p for p in _SCHEMES if url.startswith(p)), None)
        if prefix is None:
            raise InvalidDatabaseURL(
                f"LEDGER_DATABASE_URL must be a postgresql:// URL, got {redact(url)!r}"
            )
        rest = url[len(prefix) :]
        rest, _, query = rest.partition("?")
        netloc, slash, path = rest.partition("/")
        userinfo, at, hostlist = netloc.rpartition("@")
        if not at:
            userinfo, hostlist = "", netloc
        hosts = [h for h in hostlist.split(",") if h]
        params: list[tuple[str, str]] = []
        for key, value in parse_qsl(query, keep_blank_values=True):
            if key == "host" and not value.startswith("/"):
                hosts.append(value)  # SQLAlchemy's multi-host form
            else:
                params.append((key, value))
        return cls(userinfo, tuple(hosts), slash + path, tuple(params))

    @property
    def multi_host(self) -> bool:
        """Whether the URL names more than one server."""
        return len(self.hosts) > 1

    def _query(self, extra: list[tuple[str, str]]) -> str:
        items = extra + list(self.query)
        return "?" + urlencode(items, safe="/:") if items else ""

    def libpq(self) -> str:
        """Return the ``postgresql://`` form (hosts comma-separated) for asyncpg and libpq."""
        auth = f"{self.userinfo}@" if self.userinfo else ""
        return f"postgresql://{auth}{','.join(self.hosts)}{self.path}{self._query([])}"

    def sqlalchemy(self) -> str:
        """Return the ``postgresql+asyncpg://`` form (several hosts as ``?host=``)."""
        auth = f"{self.userinfo}@" if self.userinfo else ""
        if not self.multi_host:
            return f"postgresql+asyncpg://{auth}{''.join(self.hosts)}{self.path}{self._query([])}"
        hosts = [("host", h) for h in self.hosts]
        return f"postgresql+asyncpg://{auth}{self.path}{self._query(hosts)}"

    def redacted(self) -> str:
        """Return the libpq form with the password replaced by ``***``."""
        return redact(self.libpq())


def redact(url: str) -> str:
    """Return ``url`` with any password (in the user part or a ``password=``) masked."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    before_query, q, query = rest.partition("?")
    netloc, slash, path = before_query.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    if at and ":" in userinfo:
        netloc = f"{userinfo.split(':', 1)[0]}:***@{hosts}"
    if q:
        query = re.sub(r"(^|&)(password=)[^&]*", r"\1\2***", query)
    return f"{scheme}://{netloc}{slash}{path}{q}{query}"


def mask_secrets(text: str, url: str | None) -> str:
    """Return ``text`` with the password of ``url`` (as written and decoded) masked."""
    if not url:
        return text
    userinfo = url.partition("://")[2].partition("/")[0].rpartition("@")[0]
    password = userinfo.partition(":")[2]
    for secret in {password, unquote(password)} - {""}:
        text = text.replace(secret, "***")
    return text


def async_url(url: str) -> str:
    """Return ``url`` with the asyncpg driver named (``postgresql+asyncpg://``).

    Raises:
        InvalidDatabaseURL: not a postgresql:// URL.
    """
    return DatabaseURL.parse(url).sqlalchemy()


def plain_url(url: str) -> str:
    """Return ``url`` as a driver-less ``postgresql://`` URL (what asyncpg.connect takes)."""
    return DatabaseURL.parse(url).libpq()


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
    # (Alembic is imported where it is used: a rebuild worker, which never migrates,
    # starts ~0.07 s sooner without it)
    from alembic.config import Config

    if not (_MIGRATIONS / "env.py").is_file():
        raise NotMigrated(f"migrations not found at {_MIGRATIONS} (install from a source checkout)")
    cfg = Config()
    cfg.set_main_option("script_location", str(_MIGRATIONS))
    cfg.attributes["url"] = url
    return cfg


def head_revision() -> str:
    """Return the newest revision in ``migrations/``."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config("postgresql://unused")).get_current_head()
    assert head is not None
    return head


async def migrate(url: str, revision: str = "head") -> None:
    """Upgrade the database at ``url`` to ``revision`` (idempotent)."""
    from alembic import command

    await asyncio.to_thread(command.upgrade, alembic_config(url), revision)


async def downgrade(url: str, revision: str = "base") -> None:
    """Downgrade the database at ``url`` to ``revision``."""
    from alembic import command

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
    owner: bool = False,
) -> str:
    """Return the URL to use: ``LEDGER_DATABASE_URL``, or the embedded cluster (started).

    The embedded cluster's URL connects as ``ledger_app``; with ``owner``, as the
    cluster's owner (for migrations: :func:`migrate_embedded`).

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
    return cluster.owner_url if owner else cluster.url


async def migrate_embedded(settings: Settings, *, always: bool = True) -> str:
    """Migrate the embedded cluster as its owner, let ``ledger_app`` log in; return its URL.

    Day-to-day work on the embedded cluster runs as ``ledger_app`` (no DDL, no triggers
    to switch off); only the migrations run as the cluster's owner.

    Args:
        settings: the ledger's settings (``LEDGER_DATABASE_URL`` unset).
        always: run the migrations even when the schema is at head (``ledger db init``).
    """
    owner_url = database_url(settings, init=True, owner=True)
    if not always:
        owner = make_engine(owner_url)
        try:
            always = await current_revision(owner) != head_revision()
        finally:
            await owner.dispose()
    if always:
        await migrate(owner_url)
    cluster = EmbeddedPostgres(settings.home)
    await cluster.allow_app_login()
    return cluster.url


@asynccontextmanager
async def open_engine(
    settings: Settings | None = None,
    *,
    announce: Callable[[EmbeddedPostgres], None] | None = None,
) -> AsyncIterator[AsyncEngine]:
    """Yield an engine on a migrated database (the embedded one is migrated on first use).

    On the embedded cluster the engine connects as ``ledger_app``.

    Raises:
        NotMigrated: ``LEDGER_DATABASE_URL`` names a database without the current schema.
        DatabaseUnavailable: the server cannot be reached.
    """
    settings = settings or Settings()
    url = database_url(settings, announce=announce)
    if not settings.database_url:
        await migrate_embedded(settings, always=False)
    engine = make_engine(url)
    try:
        if DatabaseURL.parse(url).multi_host:
            # a cluster may be between primaries right now (a failover takes seconds):
            # wait for one, bounded, rather than fail a command started meanwhile
            await retry_transient(
                lambda: check_migrated(engine), "connecting to the primary", engine=engine
            )
        else:
            await check_migrated(engine)
        yield engine
    finally:
        await engine.dispose()


# ------------------------------------------------------------------ lost connections

_TRANSIENT = (
    OSError,  # refused, reset, unreachable (ConnectionError and TimeoutError included)
    DatabaseUnavailable,
    asyncpg.PostgresConnectionError,  # 08xxx
    asyncpg.InterfaceError,  # the connection was closed under us
    # A held connection that read the server's FATAL (a shutdown) before its socket
    # closed fails with a protocol error ("cannot switch to state 12"); and no host of
    # a multi-host URL is the primary yet (TargetServerAttributeNotMatched), mid-failover.
    asyncpg.InternalClientError,
    asyncpg.exceptions.OperatorInterventionError,  # 57P01 admin/57P02 crash shutdown, 57P03
    asyncpg.exceptions.InsufficientResourcesError,  # too many connections, disk full
    asyncpg.exceptions.TransactionRollbackError,  # serialization failure, deadlock
    # a pooled connection to a primary that was demoted to a standby meanwhile
    asyncpg.exceptions.ReadOnlySQLTransactionError,
    OperationalError,
    SAInterfaceError,
)
# Failures to connect that waiting does not cure; still reported on one line.
_REFUSED = (
    asyncpg.exceptions.InvalidAuthorizationSpecificationError,  # unknown user, no hba entry
    asyncpg.exceptions.InvalidPasswordError,
    asyncpg.exceptions.InvalidCatalogNameError,  # no such database
    asyncpg.exceptions.ClientConfigurationError,
)


def _chain(exc: BaseException) -> list[BaseException]:
    """Return ``exc`` and what caused it (``__cause__``, ``__context__``, a driver's ``orig``)."""
    found: list[BaseException] = []
    todo = [exc]
    seen: set[int] = set()
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        found.append(e)
        for cause in (e.__cause__, e.__context__, getattr(e, "orig", None)):
            if isinstance(cause, BaseException):
                todo.append(cause)
    return found


def is_transient(exc: BaseException) -> bool:
    """Return whether ``exc`` (or what caused it) is worth retrying unchanged.

    The one place that says what a lost database looks like (the consumer, the
    projection runner, ingest and the CLI ask it): lost and refused connections, a
    server shutting down or starting up, no primary among the hosts yet (a failover),
    a demoted primary, and serialization failures are; constraint violations and bad
    data are not.
    """
    for e in _chain(exc):
        if isinstance(e, _TRANSIENT):
            return True
        if isinstance(e, DBAPIError) and e.connection_invalidated:
            return True
    text = str(exc).lower()
    return "connection" in text and ("closed" in text or "lost" in text or "refused" in text)


def connect_failure(exc: BaseException, url: str | None) -> str | None:
    """Return one line describing a failure to reach the database, or None if it is not one.

    The line names the server (password masked) and the driver's reason, never a
    traceback and never the password.
    """
    if not (is_transient(exc) or any(isinstance(e, _REFUSED) for e in _chain(exc))):
        return None
    if any(isinstance(e, asyncpg.exceptions.TransactionRollbackError) for e in _chain(exc)):
        return None  # a serialization failure or deadlock: reached, and refused
    root = next((e for e in _chain(exc) if isinstance(e, _REFUSED)), None)
    if root is None:
        root = next((e for e in _chain(exc) if isinstance(e, _TRANSIENT)), exc)
    where = ""
    if url:
        try:
            where = f" at {DatabaseURL.parse(url).redacted()}"
        except InvalidDatabaseURL:
            where = f" at {redact(url)}"
    return mask_secrets(f"cannot reach the database{where}: {describe(root)}", url)


def describe(exc: BaseException) -> str:
    """Return ``exc`` as ``Type: first line`` (at most 500 characters)."""
    lines = str(exc).replace("\x00", "").strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:500]


def reconnect_window() -> float:
    """Seconds a step may keep failing to reach the database before it gives up.

    ``LEDGER_RECONNECT_TIMEOUT`` (default 120): long enough for a failover (seconds) or
    a server restart, short enough that a database that is gone is reported.
    """
    try:
        return max(0.0, float(os.environ.get("LEDGER_RECONNECT_TIMEOUT", "120")))
    except ValueError:
        return 120.0


class Reconnect:
    """A bounded, logged retry: backoff 0.1 s doubling to 5 s, for at most a window.

    Call :meth:`failed` with each transient failure (it returns the delay, or raises
    :class:`DatabaseUnavailable` once the failures have lasted longer than the
    window) and :meth:`succeeded` when the step went through.

    :attr:`failures` counts every retry of the process (all instances): the
    ``ledger_reconnects_total{target="database"}`` metric of a running service.
    """

    failures: ClassVar[int] = 0

    def __init__(self, what: str, *, window: float | None = None, first: float = 0.1) -> None:
        self.what = what
        self.window = reconnect_window() if window is None else window
        self.first = first
        self.delay = first
        self.attempts = 0
        self.since: float | None = None

    def failed(self, exc: BaseException) -> float:
        """Log ``exc``; return the delay before the next try.

        Raises:
            DatabaseUnavailable: the step has failed for longer than the window.
        """
        now = time.monotonic()
        if self.since is None:
            self.since = now
        self.attempts += 1
        Reconnect.failures += 1
        if now - self.since > self.window:
            raise DatabaseUnavailable(
                f"gave up {self.what} after {self.attempts} attempts in "
                f"{now - self.since:.0f} s: {describe(exc)}"
            ) from exc
        delay = self.delay
        self.delay = min(self.delay * 2, 5.0)
        log.warning(
            "lost the database while %s (%s); retry %d in %.1f s",
            self.what,
            describe(exc),
            self.attempts,
            delay,
        )
        return delay

    def succeeded(self) -> None:
        """Reset: the next failure starts a new window."""
        if self.since is not None:
            log.info("%s: the database is back after %d retries", self.what, self.attempts)
        self.since = None
        self.attempts = 0
        self.delay = self.first


async def retry_transient(
    step: Callable[[], Awaitable[T]],
    what: str,
    *,
    engine: AsyncEngine | None = None,
    on_retry: Callable[[], None] | None = None,
    window: float | None = None,
) -> T:
    """Run ``step`` until it succeeds, retrying transient failures (bounded, logged).

    Only for steps that are safe to run again: an append of events with their ids
    (a retry finds the committed ones as duplicates), a projection catch-up (it goes
    on from its checkpoint). Between tries the engine's pooled connections are
    dropped (they may point at a server that is gone) and ``on_retry`` runs.

    Raises:
        DatabaseUnavailable: the failures lasted longer than the window.
    """
    policy = Reconnect(what, window=window)
    while True:
        try:
            result = await step()
        except Exception as exc:
            if not is_transient(exc):
                raise
            delay = policy.failed(exc)
            if engine is not None:
                try:
                    await engine.dispose()
                except Exception as dispose_exc:  # the pool's sockets are dead anyway
                    log.debug("disposing the pool: %s", describe(dispose_exc))
            if on_retry is not None:
                on_retry()
            await asyncio.sleep(delay)
            continue
        policy.succeeded()
        return result


# ----------------------------------------------------------------- hot standby reads

# Asked on the server that answered the reads: how far its replay is behind what it
# has received, and how old the last transaction it replayed is (the primary's commit
# time: it also grows while the primary is idle).
_REPLAY_LAG = """
SELECT pg_is_in_recovery() AS in_recovery,
       pg_last_wal_receive_lsn()::text AS received_lsn,
       pg_last_wal_replay_lsn()::text AS replayed_lsn,
       pg_wal_lsn_diff(pg_last_wal_receive_lsn(), pg_last_wal_replay_lsn())::bigint
           AS replay_behind_bytes,
       extract(epoch FROM now() - pg_last_xact_replay_timestamp())::float8
           AS replay_lag_seconds,
       pg_last_xact_replay_timestamp() AS last_replayed_commit_at
"""
_BEHIND = """
SELECT pg_is_in_recovery()
       AND pg_wal_lsn_diff($1::text::pg_lsn, coalesce(pg_last_wal_replay_lsn(), '0/0')) > 0
"""
_CURRENT_LSN = "SELECT pg_current_wal_lsn()::text"


async def replay_lag(conn: asyncpg.Connection) -> dict[str, object] | None:
    """Return the replay position and lag of the server behind ``conn`` (a standby)."""
    row = await conn.fetchrow(_REPLAY_LAG)
    return dict(row) if row is not None else None


async def current_wal_lsn(conn: asyncpg.Connection) -> str:
    """Return the primary's present WAL position (``pg_current_wal_lsn``)."""
    return str(await conn.fetchval(_CURRENT_LSN))


async def wait_for_replay(conn: asyncpg.Connection, lsn: str, within: float = 30.0) -> None:
    """Wait until the standby behind ``conn`` has replayed the primary's WAL up to ``lsn``.

    Raises:
        DatabaseUnavailable: it has not within ``within`` seconds.
    """
    deadline = asyncio.get_running_loop().time() + within
    while await conn.fetchval(_BEHIND, lsn):
        if asyncio.get_running_loop().time() > deadline:
            raise DatabaseUnavailable(
                f"the standby (LEDGER_READ_URL) has not replayed up to {lsn} in {within:.0f} s"
            )
        await asyncio.sleep(0.05)
