"""The public Python API: one :class:`Ledger` over the log, its projections and audits.

::

    from ledger import Ledger

    async with await Ledger.connect() as ledger:  # None: the embedded default
        counts = await ledger.ingest(records)
        for p in await ledger.positions():
            print(p.account, p.contract, p.signed_qty, p.realized_pnl)

``Ledger.connect(url)`` takes a plain ``postgresql://`` URL; with none it does exactly
what the ``ledger`` command does (``LEDGER_DATABASE_URL``, else the embedded cluster
under ``LEDGER_HOME``, created, started and migrated on first use). :class:`SyncLedger`
is the same API for scripts and notebooks, without ``await``.

Every write goes through validation (:class:`ledger.ingest.Ingester`): a record or
event the ledger refuses is dead-lettered with its reason and counted, never appended.
Queries catch the projections up with every committed event first, as the CLI does.
Results are frozen dataclasses with ``Decimal`` amounts.

Times: ``as_of`` is event time (what we now know happened by T), ``as_known_at`` is
knowledge time (only what had been recorded by T); both at once answer "what did we
believe at T2 about T1".

This module sits above the read side (it imports ``projections``), like ``ledger.cli``;
``ledger/__init__`` exports :class:`Ledger` lazily so that the core never imports it.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import (
    AsyncIterator,
    Callable,
    Coroutine,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from contextlib import AsyncExitStack, ExitStack, aclosing, asynccontextmanager
from dataclasses import dataclass, field, fields
from datetime import date, datetime
from decimal import Decimal
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, BinaryIO, Concatenate, Literal, ParamSpec, Self, TypeVar

import asyncpg
import orjson
from sqlalchemy.ext.asyncio import AsyncEngine

from ledger.db import (
    check_migrated,
    current_wal_lsn,
    make_engine,
    open_engine,
    replay_lag,
    retry_transient,
    wait_for_replay,
)
from ledger.embedded import EmbeddedPostgres
from ledger.events import Event, LogSealed, ReconciliationCompleted
from ledger.ingest import IngestCounts as _RunCounts
from ledger.ingest import Ingester, RetryOutcome
from ledger.integrity import Problem, append_seal, latest_seal, verify_against
from ledger.settings import Settings
from ledger.sources import InputFormat, Parsed, Rejected, SourceRef, iter_file, parse_message
from ledger.store import (
    Checkpoint,
    EventStore,
    StoredEvent,
    checkpoint_at,
    count_events,
    dead_letter_statuses,
    driver_connection,
    encode_event,
    last_recorded_at,
    log_lag,
    read_counters,
    rejected_rows,
)
from projections import audit, queries
from projections.faults import StreamFault
from projections.pnl import PnlRow
from projections.positions import Method
from projections.queries import Clock
from projections.reconcile import (
    BrokerStatement,
    ReconciliationError,
    ReconciliationResult,
    load_run,
    reconcile,
    record_run,
)
from projections.runner import ProjectionRunner, RebuildResult, parse_session
from projections.store import serving_checkpoint, stream_faults

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

    from projections.report import DayReport

__all__ = [
    "Explanation",
    "HistoryEntry",
    "IngestCounts",
    "Instrument",
    "Ledger",
    "Lot",
    "PnlLine",
    "Position",
    "RejectedRecord",
    "Stats",
    "SyncLedger",
    "TrailEntry",
    "Verification",
]

T = TypeVar("T")
P = ParamSpec("P")
_COUNTS = ("received", "appended", "duplicates", "rejected", "already_rejected", "withheld")
PnlBy = Literal["fill", "day", "account"]
Progress = Callable[[int], None]


def row_of(value: DataclassInstance) -> dict[str, object]:
    """Return a result dataclass as a dict in field order (what the CLI prints)."""
    return {f.name: getattr(value, f.name) for f in fields(value)}


# ----------------------------------------------------------------------- results


@dataclass(frozen=True, slots=True)
class IngestCounts:
    """What an ingest or append did: ``received = appended + duplicates + rejected``
    (``+ withheld``, which only a refused strict ingest has).

    Attributes:
        received: records (or events) received.
        appended: new events written to the log.
        duplicates: records already recorded: events already in the log (idempotent
            re-delivery) and records already in the dead letter (``already_rejected``).
        rejected: records dead-lettered by this call, each with its reason
            (``ledger rejected``).
        by_reason: the rejected records per reason.
        already_rejected: of the duplicates, records an earlier run dead-lettered (the
            same source, line and bytes: a re-ingested file, a redelivered message);
            not dead-lettered again. Like ``rejected``, they are not in the log.
        withheld: valid records a strict ingest did not append because others were bad.
    """

    received: int = 0
    appended: int = 0
    duplicates: int = 0
    rejected: int = 0
    by_reason: Mapping[str, int] = field(default_factory=dict)
    already_rejected: int = 0
    withheld: int = 0

    def __add__(self, other: IngestCounts) -> IngestCounts:
        reasons = dict(self.by_reason)
        for k, v in other.by_reason.items():
            reasons[k] = reasons.get(k, 0) + v
        return IngestCounts(
            self.received + other.received,
            self.appended + other.appended,
            self.duplicates + other.duplicates,
            self.rejected + other.rejected,
            reasons,
            self.already_rejected + other.already_rejected,
            self.withheld + other.withheld,
        )

    @property
    def not_appended(self) -> int:
        """Records of the input that are not in the log: rejected, now or before."""
        return self.rejected + self.already_rejected

    def as_dict(self) -> dict[str, int]:
        """Return the counts under their CLI/JSON names (``ledger ingest -f json``)."""
        return {name: getattr(self, name) for name in _COUNTS}

    @classmethod
    def of(cls, run: _RunCounts) -> IngestCounts:
        """Return the frozen counts of an ingestion run."""
        return cls(
            run.received,
            run.appended,
            run.duplicates,
            run.rejected,
            dict(run.by_reason),
            run.already_rejected,
            run.withheld,
        )


@dataclass(frozen=True, slots=True)
class Position:
    """One position (account, contract) with realized and unrealized P&L."""

    account: str
    contract: str
    signed_qty: Decimal
    side: str
    avg_open_price: Decimal | None
    realized_pnl: Decimal
    fees: Decimal
    net_realized_pnl: Decimal
    unrealized_pnl: Decimal | None
    mark_price: Decimal | None
    opened_at: datetime | None
    last_fill_at: datetime | None
    method: str


@dataclass(frozen=True, slots=True)
class PnlLine:
    """Realized P&L of one fill, one trading day of a position, or one account.

    Amounts are in ``currency``; lines in different currencies are never summed. A key
    the grouping sums across is None (``exec_id`` by day; ``contract``, ``day`` and
    ``exec_id`` by account).
    """

    account: str
    currency: str
    realized_pnl: Decimal
    fees: Decimal
    net_realized_pnl: Decimal
    fills: int
    contract: str | None = None
    day: date | None = None
    exec_id: str | None = None

    @classmethod
    def of(cls, row: PnlRow, method: Method) -> PnlLine:
        """Return a P&L row's line under ``method`` (FIFO or WAC)."""
        return cls(
            account=row.account,
            currency=row.currency,
            realized_pnl=row.realized(method),
            fees=row.fees,
            net_realized_pnl=row.net_realized(method),
            fills=row.fills,
            contract=row.contract,
            day=row.day,
            exec_id=row.exec_id,
        )

    def as_row(self, by: PnlBy) -> dict[str, Any]:
        """Return the line as the CLI prints it for grouping ``by``."""
        row: dict[str, Any] = {"account": self.account}
        if by != "account":
            row["contract"] = self.contract
            row["day"] = self.day
        if by == "fill":
            row["exec_id"] = self.exec_id
        row.update(
            currency=self.currency,
            realized_pnl=self.realized_pnl,
            fees=self.fees,
            net_realized_pnl=self.net_realized_pnl,
            fills=self.fills,
        )
        return row


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    """One change of a position (``detail``) or a compacted end-of-day row (``eod``)."""

    position: int
    kind: str
    exec_id: str | None
    occurred_at: datetime
    day: date
    side: str | None
    qty: Decimal | None
    price: Decimal | None
    qty_before: Decimal
    qty_after: Decimal
    realized_fifo: Decimal
    realized_wac: Decimal
    cum_realized_fifo: Decimal
    cum_realized_wac: Decimal
    fees: Decimal


@dataclass(frozen=True, slots=True)
class TrailEntry:
    """One event of a position's trail, in fold order (see :func:`projections.audit.trail`)."""

    seq: int
    position: int
    type: str
    exec_id: str
    occurred_at: datetime
    recorded_at: datetime
    side: str | None
    qty: Decimal | None
    price: Decimal | None
    fee: Decimal | None
    status: str
    qty_after: Decimal | None
    realized_pnl: Decimal | None
    cum_realized_pnl: Decimal | None
    restated: str
    detail: str


@dataclass(frozen=True, slots=True)
class Instrument:
    """What a reader's view of a contract's numbers needs: its tick size and currency."""

    contract: str
    tick_size: Decimal
    currency: str


@dataclass(frozen=True, slots=True)
class Lot:
    """An open FIFO lot, traced to the fill that opened it."""

    exec_id: str
    qty: Decimal
    price: Decimal
    opened_at: datetime
    fill_position: int | None
    fill_occurred_at: datetime | None
    fill_recorded_at: datetime | None
    order_id: str | None
    fill_side: str | None
    fill_qty: Decimal | None


@dataclass(frozen=True, slots=True)
class Explanation:
    """A position at a point in time and the FIFO lots that make it up."""

    account: str
    contract: str
    clock: str
    at: datetime | None
    signed_qty: Decimal
    side: str
    avg_open_price: Decimal | None
    avg_open_price_wac: Decimal | None
    realized_pnl: Decimal
    fees: Decimal
    opened_at: datetime | None
    last_fill_at: datetime | None
    fill_count: int
    lots: tuple[Lot, ...]
    as_known_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class RejectedRecord:
    """A dead-lettered record and why it was refused."""

    id: int
    received_at: datetime
    source: str
    line: int | None
    index: int | None
    reason: str
    message: str
    status: str
    attempts: int
    retry_outcome: str | None
    raw: bytes


@dataclass(frozen=True, slots=True)
class Verification:
    """What ``verify`` found: the log's tamper evidence and the projections' mismatches."""

    events: int
    streams: int
    seals: int
    projections_checked: int
    problems: tuple[Problem, ...]
    catch_up_error: str | None = None
    sealed: LogSealed | None = None
    # streams the projections hold as faulted (an event the fold cannot apply): listed
    # apart, not tamper evidence; each heals with a correction or bust
    faulted_streams: tuple[StreamFault, ...] = ()

    @property
    def ok(self) -> bool:
        """Whether the log and projections verify."""
        return not self.problems and self.catch_up_error is None


@dataclass(frozen=True, slots=True)
class Stats:
    """Ingest counters, projection lag and the live feed's last error.

    ``received = appended + duplicates + rejected`` over every run: ``rejected`` counts
    each dead letter once; a record found dead-lettered already (a re-ingest, a
    redelivery) counts as a duplicate and in ``already_rejected``. ``dead_letters``
    counts the dead letters by status (``pending``, ``resolved``), ``retried`` what
    ``ledger rejected --retry`` did (``resolved`` dead letters, their events
    ``appended`` and ``duplicates``); on a ledger whose counters began with its dead
    letters, ``rejected`` = pending + resolved and ``retried["resolved"]`` = resolved.
    ``last_append_at`` is the record time of the newest event in the log (what the
    service metrics show as ``ledger_last_append_timestamp_seconds``).
    """

    received: int
    appended: int
    duplicates: int
    rejected: int
    rejected_by_reason: Mapping[str, int]
    consume: Mapping[str, int]
    lag_events: int
    lag_seconds: float
    checkpoint: Mapping[str, int] | None
    last_error_at: datetime | None
    last_error: str | None
    faulted_streams: tuple[StreamFault, ...] = ()
    already_rejected: int = 0
    dead_letters: Mapping[str, int] = field(default_factory=dict)
    retried: Mapping[str, int] = field(default_factory=dict)
    last_append_at: datetime | None = None

    @property
    def consistent(self) -> bool:
        """Whether received = appended + duplicates + rejected."""
        return self.received == self.appended + self.duplicates + self.rejected


def _aware(name: str, value: datetime | None) -> None:
    """Refuse a naive time: guessing its zone would shift the answer by the caller's offset.

    Raises:
        ValueError: ``value`` has no zone; the message names the argument and the value.
    """
    if value is not None and (value.tzinfo is None or value.utcoffset() is None):
        raise ValueError(
            f"{name}: {value.isoformat()} has no time zone (naive times are refused, as "
            "ingest refuses them): pass an aware datetime, e.g. tzinfo=UTC"
        )


def _clock(
    as_of: datetime | None, as_known_at: datetime | None, default: Clock = "now"
) -> tuple[Clock, datetime | None, datetime | None]:
    """Return (clock, at, recorded_by) for the two times: both at once is ``as_of``
    at ``as_of`` with only what was recorded by ``as_known_at``.

    Raises:
        ValueError: a time has no zone (naive times are refused, as ingest refuses them).
    """
    _aware("as_of", as_of)
    _aware("as_known_at", as_known_at)
    if as_of is not None:
        return "as_of", as_of, as_known_at
    if as_known_at is not None:
        return "as_known_at", as_known_at, None
    return default, None, None


# ------------------------------------------------------------------------ Ledger


class Ledger:
    """The position ledger: append, project, query on both clocks, audit.

    Create one with :meth:`connect` and use it as an async context manager (or call
    :meth:`close`). One instance may serve many concurrent tasks.
    """

    def __init__(
        self, engine: AsyncEngine, settings: Settings, *, stack: AsyncExitStack | None = None
    ) -> None:
        """Wrap an engine on a migrated database (prefer :meth:`connect`)."""
        self.engine = engine
        self.settings = settings
        self.store = EventStore(engine)
        self._stack = stack
        # LEDGER_READ_URL: a hot standby that answers the read-only queries
        self.read_engine: AsyncEngine | None = None
        # its replay lag when it answered the last such query (None: the primary did)
        self.standby_lag: dict[str, object] | None = None
        self._session_start, self._session_tz = parse_session(settings.session_start)

    @classmethod
    async def connect(
        cls,
        url: str | None = None,
        *,
        settings: Settings | None = None,
        announce: Callable[[EmbeddedPostgres], None] | None = None,
    ) -> Ledger:
        """Open the ledger at ``url``, or where the ``ledger`` command would (None).

        Args:
            url: a ``postgresql://`` URL of a migrated database; None: the environment's
                ``LEDGER_DATABASE_URL``, else the embedded cluster (created, started and
                migrated on first use).
            settings: the settings to use (default: read from ``LEDGER_*``).
            announce: called when the embedded cluster was created or started.

        Raises:
            NotMigrated: the database at ``url`` lacks the current schema
                (``ledger db init`` migrates it).
            DatabaseUnavailable: the server cannot be reached.
        """
        settings = settings or Settings()
        if url is not None:
            settings = settings.model_copy(update={"database_url": url})
        stack = AsyncExitStack()
        try:
            engine = await stack.enter_async_context(open_engine(settings, announce=announce))
            read_engine = None
            if settings.read_url:
                read_engine = make_engine(settings.read_url, pool_size=2)
                stack.push_async_callback(read_engine.dispose)
                await check_migrated(read_engine)
        except BaseException:
            await stack.aclose()
            raise
        ledger = cls(engine, settings, stack=stack)
        ledger.read_engine = read_engine
        return ledger

    @classmethod
    def connect_sync(
        cls, url: str | None = None, *, settings: Settings | None = None
    ) -> SyncLedger:
        """Return a :class:`SyncLedger` (the same API without ``await``)."""
        return SyncLedger(url, settings=settings)

    async def close(self) -> None:
        """Release the connections (the engine, when this ledger opened it)."""
        if self._stack is not None:
            stack, self._stack = self._stack, None
            await stack.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @asynccontextmanager
    async def _conn(self) -> AsyncIterator[asyncpg.Connection]:
        async with self.engine.connect() as sa_conn:
            yield await driver_connection(sa_conn)

    @asynccontextmanager
    async def _read(self, catch_up: bool) -> AsyncIterator[asyncpg.Connection]:
        """Yield a connection for a query, the projections caught up first if asked.

        With ``LEDGER_READ_URL`` (:attr:`read_engine`) the connection is the standby's:
        nothing is written there, so no catch-up runs (projections are written on the
        primary, by ``ledger project --follow`` or the consumer's projection process)
        and the answer is what the primary had projected as far as the standby has
        replayed; its replay lag is kept in :attr:`standby_lag`.
        """
        if self.read_engine is not None:
            async with self.read_engine.connect() as sa_conn:
                conn = await driver_connection(sa_conn)
                self.standby_lag = await replay_lag(conn)
                yield conn
            return
        if catch_up:
            await self.runner().catch_up()
        async with self._conn() as conn:
            yield conn

    async def _wait_for_replay(self, conn: asyncpg.Connection) -> None:
        """Wait until the standby behind ``conn`` has replayed the primary's present WAL."""
        async with self._conn() as primary:
            await wait_for_replay(conn, await current_wal_lsn(primary))

    def runner(self) -> ProjectionRunner:
        """Return a projection runner on this ledger's database."""
        return ProjectionRunner(self.engine, self.settings)

    # ----------------------------------------------------------------- writing

    async def ingest(
        self,
        records: Iterable[Mapping[str, object] | bytes | str],
        *,
        source: str = "api",
        input_format: InputFormat = "auto",
        batch_size: int = 1000,
        strict: bool = False,
    ) -> IngestCounts:
        """Validate and append records (native or ProjectX JSON), dead-lettering the rest.

        Each record is a mapping, or one JSON document as text or bytes, exactly as a
        line of a JSON Lines file (``source`` and its 1-based number name it in
        ``ledger rejected``). With ``strict``, nothing is appended when any record is
        bad (see :meth:`ingest_files`).
        """
        items: list[Any] = []
        for number, record in enumerate(records, start=1):
            data = record if isinstance(record, bytes) else None
            if isinstance(record, str):
                data = record.encode()
            elif data is None:
                data = orjson.dumps(record)
            items += parse_message(data, SourceRef(source, line=number), input_format)
        run = await Ingester(self.store, batch_size=batch_size).ingest(items, strict=strict)
        return IngestCounts.of(run)

    async def ingest_file(
        self,
        file: str | Path | BinaryIO,
        *,
        input_format: InputFormat = "auto",
        batch_size: int = 1000,
        progress: Progress | None = None,
        name: str | None = None,
        strict: bool = False,
    ) -> IngestCounts:
        """Validate and append a JSON Lines, ProjectX JSON or CSV file (a path or handle).

        ``name`` names a handle in ``ledger rejected`` (default ``-``). With ``strict``,
        see :meth:`ingest_files`.
        """
        source: str | Path | tuple[BinaryIO, str]
        source = file if isinstance(file, str | Path) else (file, name or "-")
        return await self.ingest_files(
            [source],
            input_format=input_format,
            batch_size=batch_size,
            progress=progress,
            strict=strict,
        )

    async def ingest_files(
        self,
        files: Sequence[str | Path | tuple[BinaryIO, str]],
        *,
        input_format: InputFormat = "auto",
        batch_size: int = 1000,
        progress: Progress | None = None,
        strict: bool = False,
    ) -> IngestCounts:
        """Validate and append files (paths, or ``(handle, name)`` pairs) as one input.

        Without ``strict`` each batch is its own transaction: what is valid is appended,
        the rest dead-lettered. With ``strict`` the whole input is one transaction: if
        any record is bad (rejected, or dead-lettered by an earlier run), nothing is
        appended, the bad records are dead-lettered and the valid ones counted as
        ``withheld``; a lost database then fails the call (nothing appended) instead
        of being retried.
        """
        ingester = Ingester(self.store, batch_size=batch_size)
        with ExitStack() as stack:

            def records() -> Iterator[Parsed | Rejected]:
                for file in files:
                    if isinstance(file, str | Path):
                        # read in step with the writes, closed when the call ends
                        handle = stack.enter_context(open(file, "rb"))
                        yield from iter_file(handle, str(file), input_format)
                    else:
                        yield from iter_file(file[0], file[1], input_format)

            run = await ingester.ingest(records(), progress, strict=strict)
        return IngestCounts.of(run)

    async def append(self, events: Sequence[Event], *, source: str = "api") -> IngestCounts:
        """Validate and append events, all in one transaction; refused ones are
        dead-lettered with their reason (off-tick price, unknown instrument or execution).
        """
        items = [
            Parsed(SourceRef(source, index=i), e, encode_event(e)[0].encode())
            for i, e in enumerate(events)
        ]
        return IngestCounts.of(await Ingester(self.store).write_batch(items))

    async def retry_rejected(self) -> list[RetryOutcome]:
        """Re-ingest pending dead letters whose cause may be gone; return each outcome."""
        return await Ingester(self.store).retry_rejected()

    async def rejected(self) -> list[RejectedRecord]:
        """Return every dead-lettered record with its reason, oldest first."""
        async with self._conn() as conn:
            rows = await rejected_rows(conn)
        return [
            RejectedRecord(
                id=r["id"],
                received_at=r["received_at"],
                source=r["source"],
                line=r["line"],
                index=r["idx"],
                reason=r["reason"],
                message=r["message"],
                status=r["status"],
                attempts=r["attempts"],
                retry_outcome=r["retry_outcome"],
                raw=bytes(r["raw"]),
            )
            for r in rows
        ]

    # -------------------------------------------------------------------- log

    async def log(
        self, *, stream: str | None = None, after: int = 0, limit: int = 100
    ) -> list[StoredEvent]:
        """Return events in read order (one stream's in version order), after a position."""
        if stream:
            events = await self.store.read_stream(stream)
            return [e for e in events if e.global_position > after][:limit]
        checkpoint = Checkpoint()
        if after:
            async with self._conn() as conn:
                checkpoint = await checkpoint_at(conn, after)
        events, _ = await self.store.read_all(checkpoint, limit=limit)
        return events

    async def events(
        self,
        after: Checkpoint = Checkpoint(),  # noqa: B008 - an immutable NamedTuple
        *,
        batch: int = 1000,
        poll: float = 1.0,
        stop: asyncio.Event | None = None,
    ) -> AsyncIterator[StoredEvent]:
        """Yield every committed event after ``after``, then new ones as they commit.

        Gap-free: events come in read order (an event whose transaction commits late is
        yielded late, never skipped), so a reader that remembers the last event's
        ``(tx_id, global_position)`` as its checkpoint resumes exactly. It wakes on the
        append NOTIFY, and polls every ``poll`` seconds in case a wake-up is missed.
        Ends when ``stop`` is set.
        """
        async with self.store.notifications() as woken:
            while stop is None or not stop.is_set():
                woken.clear()
                async with aclosing(self.store.pages(after, limit=batch)) as pages:
                    async for page, end in pages:
                        for event in page:
                            yield event
                        after = end
                        if stop is not None and stop.is_set():
                            return
                waits = [asyncio.ensure_future(woken.wait())]
                if stop is not None:
                    waits.append(asyncio.ensure_future(stop.wait()))
                try:
                    await asyncio.wait(waits, timeout=poll, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for w in waits:
                        w.cancel()

    # ------------------------------------------------------------ projections

    async def project(self, progress: Progress | None = None, *, seal: bool = True) -> int:
        """Catch the projections up with the log; return how many events were applied.

        With ``seal`` (the default, as ``ledger project`` does) a seal over the log as
        projected is appended when there is something new to seal.
        """
        # a restart or failover midway is retried from the last page committed
        applied = await self.runner().catch_up_retrying(progress)
        if seal:  # a retry finds nothing new to seal
            await retry_transient(
                lambda: append_seal(self.engine), "sealing the log", engine=self.engine
            )
        return applied

    async def follow(self, stop: asyncio.Event) -> None:
        """Keep the projections up to date with the log until ``stop`` is set."""
        await self.runner().follow(stop)

    async def rebuild(self, progress: Progress | None = None) -> RebuildResult:
        """Rebuild the projections from zero into a new generation and swap it in."""
        return await self.runner().rebuild(progress)

    async def count_events(self) -> int:
        """Return how many events the log holds."""
        async with self._conn() as conn:
            return await count_events(conn)

    async def positions(
        self,
        *,
        account: str | None = None,
        contract: str | None = None,
        method: Method = "fifo",
        as_of: datetime | None = None,
        as_known_at: datetime | None = None,
        include_flat: bool = False,
        catch_up: bool = True,
        faults: list[StreamFault] | None = None,
    ) -> list[Position]:
        """Return positions now, at event time ``as_of``, at knowledge time
        ``as_known_at``, or both (the projections are caught up first).

        A faulted stream (an event in it cannot be folded) is left out and appended to
        ``faults`` when given.

        Raises:
            StreamFaulted: ``account`` and ``contract`` name one stream, and it is
                faulted; the message names the event and the way out.
        """
        clock, at, recorded_by = _clock(as_of, as_known_at)
        async with self._read(catch_up) as conn:
            rows = await queries.position_rows(
                conn,
                account=account,
                contract=contract,
                method=method,
                clock=clock,
                at=at,
                include_flat=include_flat,
                recorded_by=recorded_by,
                faults=faults,
            )
        return [Position(**r) for r in rows]

    async def pnl(
        self,
        *,
        by: PnlBy = "day",
        account: str | None = None,
        date_from: date | None = None,
        date_to: date | None = None,
        method: Method = "fifo",
        as_of: datetime | None = None,
        as_known_at: datetime | None = None,
        catch_up: bool = True,
        faults: list[StreamFault] | None = None,
    ) -> list[PnlLine]:
        """Return realized P&L per fill, trading day or account, one line per currency.

        A faulted stream is left out and appended to ``faults`` when given.
        """
        clock, at, recorded_by = _clock(as_of, as_known_at)
        async with self._read(catch_up) as conn:
            rows = await queries.pnl_rows(
                conn,
                by=by,
                account=account,
                date_from=date_from,
                date_to=date_to,
                clock=clock,
                at=at,
                session_start=self._session_start,
                session_tz=self._session_tz,
                recorded_by=recorded_by,
                faults=faults,
            )
        return [PnlLine.of(r, method) for r in rows]

    async def history(
        self,
        account: str,
        contract: str,
        *,
        time_from: datetime | None = None,
        time_to: datetime | None = None,
        as_of: datetime | None = None,
        as_known_at: datetime | None = None,
        catch_up: bool = True,
    ) -> list[HistoryEntry]:
        """Return every change of one position (older days compacted to end-of-day rows)."""
        clock, at, recorded_by = _clock(as_of, as_known_at)
        async with self._read(catch_up) as conn:
            rows = await queries.history_rows(
                conn,
                account=account,
                contract=contract,
                time_from=time_from,
                time_to=time_to,
                clock=clock,
                at=at,
                session_start=self._session_start,
                session_tz=self._session_tz,
                recorded_by=recorded_by,
            )
        return [HistoryEntry(**r) for r in rows]

    # ---------------------------------------------------------------- audits

    async def trail(
        self,
        account: str,
        contract: str,
        *,
        as_of: datetime | None = None,
        as_known_at: datetime | None = None,
    ) -> list[TrailEntry]:
        """Return every event that made a position, in fold order, with busts and
        restatements.

        Raises:
            AuditError: the position has no events on this clock, or no instrument.
        """
        clock, at, recorded_by = _clock(as_of, as_known_at)
        async with self._read(False) as conn:
            try:
                rows = await audit.trail(
                    conn, account, contract, clock=clock, at=at, recorded_by=recorded_by
                )
            except LookupError as exc:
                raise audit.AuditError(str(exc)) from None
        return [TrailEntry(**r) for r in rows]

    async def explain(
        self,
        account: str,
        contract: str,
        *,
        as_of: datetime | None = None,
        as_known_at: datetime | None = None,
    ) -> Explanation:
        """Return a position at a time and the FIFO lots that make it up.

        Raises:
            AuditError: the position has no fills on this clock, or no instrument.
        """
        clock, at, recorded_by = _clock(as_of, as_known_at, default="as_of")
        async with self._read(False) as conn:
            try:
                data = await audit.explain(
                    conn, account, contract, clock=clock, at=at, recorded_by=recorded_by
                )
            except LookupError as exc:
                raise audit.AuditError(str(exc)) from None
        lots = tuple(Lot(**lot) for lot in data.pop("lots"))
        return Explanation(**data, lots=lots)

    async def reconcile(
        self,
        *,
        cutoff: datetime,
        statement: BrokerStatement | None = None,
        price_tolerance: Decimal | None = None,
        pnl_tolerance: Decimal = Decimal("0.01"),
        record: bool = True,
    ) -> ReconciliationResult:
        """Compare positions with the broker's as of ``cutoff`` and record the run.

        Args:
            cutoff: the reconciliation time (event time).
            statement: a broker statement (:func:`projections.reconcile.parse_statement`);
                None: the log's ``broker_position`` events.
            price_tolerance: the largest average-price difference that is not a break
                (None: half a tick of each instrument).
            pnl_tolerance: the largest daily realized P&L difference that is not a break.
            record: append the run (with its breaks) to the log.

        Raises:
            ReconciliationError: a tolerance is negative, or a contract is undefined.
            ValueError: ``cutoff`` has no time zone.
        """
        _aware("cutoff", cutoff)
        async with self._conn() as conn:
            try:
                result = await reconcile(
                    conn,
                    cutoff=cutoff,
                    statement=statement,
                    price_tolerance=price_tolerance,
                    pnl_tolerance=pnl_tolerance,
                    session_start=self._session_start,
                    session_tz=self._session_tz,
                )
            except LookupError as exc:
                raise ReconciliationError(str(exc)) from None
        if record:
            await record_run(self.store, result.event)
        return result

    async def instruments(self, contracts: Iterable[str]) -> dict[str, Instrument]:
        """Return the tick size and currency of each defined contract of ``contracts``
        (an undefined one is left out), for showing prices and money to a reader."""
        found: dict[str, Instrument] = {}
        async with self._read(False) as conn:
            for contract in sorted(set(contracts)):
                grid = await queries.instrument_display(conn, contract)
                if grid is not None:
                    found[contract] = Instrument(contract, grid[0], grid[1])
        return found

    async def reconciliation(self, run_id: str) -> ReconciliationCompleted:
        """Return a stored reconciliation run by its id.

        Raises:
            ReconciliationError: no run has this id.
        """
        async with self._conn() as conn:
            return await load_run(conn, run_id)

    async def report(
        self, day: date, *, as_known_at: datetime | None = None, progress: Progress | None = None
    ) -> DayReport:
        """Return trading day ``day``'s end-of-day report (``progress`` is called with 1
        for each stream replayed).

        Raises:
            AuditError: a contract with fills has no instrument.
            ValueError: ``as_known_at`` has no time zone.
        """
        from projections.report import build_report

        _aware("as_known_at", as_known_at)

        async with self._read(False) as conn:
            try:
                return await build_report(
                    conn,
                    day,
                    session_start=self._session_start,
                    session_tz=self._session_tz,
                    as_known_at=as_known_at,
                    progress=progress,
                )
            except LookupError as exc:
                raise audit.AuditError(str(exc)) from None

    async def write_report(
        self,
        day: date,
        out_dir: Path,
        *,
        as_known_at: datetime | None = None,
        warnings: list[str] | None = None,
        progress: Progress | None = None,
    ) -> list[Path]:
        """Write ``day``'s report (HTML, CSV and Parquet) into ``out_dir``; return the files.

        What a reader must know before trusting the figures (a stream left out because
        it cannot be folded, projections behind the log or faulted) is shown on the
        page and appended to ``warnings`` when given.

        Raises:
            AuditError: a contract is undefined, or ``out_dir`` cannot be written.
        """
        from projections.report import write_report

        report = await self.report(day, as_known_at=as_known_at, progress=progress)
        if warnings is not None:
            warnings.extend(report.warnings())
        try:
            return write_report(report, out_dir)
        except OSError as exc:
            raise audit.AuditError(f"--out: cannot write into {str(out_dir)!r}: {exc}") from None
        except ValueError as exc:
            raise audit.AuditError(f"report: {exc}") from None

    async def verify(
        self,
        *,
        projections: bool = True,
        seal: bool = False,
        against: LogSealed | None = None,
        progress: Progress | None = None,
        stream_progress: Progress | None = None,
        catch_up_progress: Progress | None = None,
    ) -> Verification:
        """Recompute the log's hash chains, heads and seals; compare the projections
        with a fresh replay (after catching them up); with ``seal``, seal a log that
        verifies; with ``against`` (a seal kept outside the database, see
        :meth:`latest_seal`), also check that the log still reaches it.

        ``catch_up_progress`` is called with the events projected while catching up,
        ``progress`` with the events whose hash chain was checked, ``stream_progress``
        with 1 per stream replayed against its projection."""
        catch_up_error = None
        if projections:
            try:
                await self.runner().catch_up(catch_up_progress)
            except Exception as exc:  # a tampered log may not project at all
                catch_up_error = f"projections cannot catch up: {exc}"
        if self.read_engine is not None:
            # the log and projections as the standby has them, once it has replayed
            # what the primary had when the catch-up above ended
            async with self._read(False) as conn:
                await self._wait_for_replay(conn)
                report = await audit.verify(
                    conn,
                    check_projections=projections,
                    progress=progress,
                    stream_progress=stream_progress,
                )
                faults = await queries.faulted_streams(conn)
                if against is not None:
                    report.problems.extend(await verify_against(conn, against))
        else:
            async with self._conn() as conn:
                report = await audit.verify(
                    conn,
                    check_projections=projections,
                    progress=progress,
                    stream_progress=stream_progress,
                )
                faults = await queries.faulted_streams(conn)
                if against is not None:
                    report.problems.extend(await verify_against(conn, against))
        # the log's own verdict decides the seal: a seal covers the log, not projections
        sealed = await append_seal(self.engine) if seal and report.ok else None
        return Verification(
            events=report.events,
            streams=report.streams,
            seals=report.seals,
            projections_checked=report.projections_checked,
            problems=tuple(report.problems),
            catch_up_error=catch_up_error,
            sealed=sealed,
            faulted_streams=tuple(faults),
        )

    async def faulted_streams(self) -> list[StreamFault]:
        """Return the streams the projections hold as faulted (an event in each cannot
        be folded; a correction or bust of its execution heals it), after catching up."""
        async with self._read(True) as conn:
            return await queries.faulted_streams(conn)

    async def seal(self) -> LogSealed | None:
        """Append a seal over the log (None when nothing is new since the last one)."""
        return await append_seal(self.engine)

    async def latest_seal(self) -> LogSealed | None:
        """Return the seal reaching furthest into the log, to keep outside the database
        (:func:`ledger.integrity.seal_record` writes it down; ``verify(against=...)``
        checks a log against it)."""
        async with self._conn() as conn:
            return await latest_seal(conn)

    async def stats(self) -> Stats:
        """Return ingest counters, the projections' lag and the feed's last error."""
        async with self._conn() as conn:
            counters = {r["name"]: r for r in await read_counters(conn)}
            dead_letters = await dead_letter_statuses(conn)
            last_append_at = await last_recorded_at(conn)
            serving = await serving_checkpoint(conn)
            faults: list[StreamFault] = []
            if serving is None:  # nothing projected yet: every event is behind
                lag_events, seconds = await log_lag(conn, None)
                checkpoint = None
            else:
                generation, tx_id, position = serving
                lag_events, seconds = await log_lag(conn, Checkpoint(tx_id, position))
                checkpoint = {"generation": generation, "tx_id": tx_id, "position": position}
                faults = await stream_faults(conn, generation)

        def value(name: str) -> int:
            row = counters.get(name)
            return int(row["value"]) if row is not None else 0

        errors = counters.get("consume.errors")
        return Stats(
            received=value("received"),
            appended=value("appended"),
            duplicates=value("duplicates"),
            rejected=value("rejected"),
            rejected_by_reason={
                n.removeprefix("rejected."): int(r["value"])
                for n, r in counters.items()
                if n.startswith("rejected.")
            },
            consume={
                n.removeprefix("consume."): int(r["value"])
                for n, r in counters.items()
                if n.startswith("consume.")
            },
            lag_events=lag_events,
            lag_seconds=round(seconds, 3) if seconds is not None else 0.0,
            checkpoint=checkpoint,
            last_error_at=errors["updated_at"] if errors is not None else None,
            last_error=errors["note"] if errors is not None else None,
            faulted_streams=tuple(faults),
            already_rejected=value("already_rejected"),
            dead_letters={
                "pending": dead_letters.get("pending", 0),
                "resolved": dead_letters.get("resolved", 0),
            },
            retried={
                name: value(f"retried.{name}") for name in ("resolved", "appended", "duplicates")
            },
            last_append_at=last_append_at,
        )


# -------------------------------------------------------------------- SyncLedger


def _blocking(
    method: Callable[Concatenate[Ledger, P], Coroutine[Any, Any, T]],
) -> Callable[Concatenate[SyncLedger, P], T]:
    """Return ``method`` of :class:`Ledger` as a blocking method of :class:`SyncLedger`
    (same parameters, same result, same docstring)."""

    def call(self: SyncLedger, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return self._run(method(self._ledger, *args, **kwargs))

    call.__name__ = method.__name__
    call.__qualname__ = f"SyncLedger.{method.__name__}"
    call.__doc__ = method.__doc__
    return call


class SyncLedger:
    """The :class:`Ledger` API without ``await``, for scripts and notebooks.

    It runs its own event loop on a background thread, so it also works where a loop
    is already running (Jupyter). Use it as a context manager, or call :meth:`close`::

        with SyncLedger() as ledger:
            print(ledger.positions())
    """

    def __init__(self, url: str | None = None, *, settings: Settings | None = None) -> None:
        """Open the ledger at ``url`` (None: as the ``ledger`` command would)."""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="ledger-sync", daemon=True
        )
        self._thread.start()
        try:
            self._ledger = self._run(Ledger.connect(url, settings=settings))
        except BaseException:
            self._stop_loop()
            raise

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    @property
    def ledger(self) -> Ledger:
        """The async ledger underneath (its methods must run on this wrapper's loop)."""
        return self._ledger

    def close(self) -> None:
        """Release the connections and stop the background loop."""
        if self._loop.is_closed():
            return
        try:
            self._run(self._ledger.close())
        finally:
            self._stop_loop()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    ingest = _blocking(Ledger.ingest)
    ingest_file = _blocking(Ledger.ingest_file)
    ingest_files = _blocking(Ledger.ingest_files)
    append = _blocking(Ledger.append)
    retry_rejected = _blocking(Ledger.retry_rejected)
    rejected = _blocking(Ledger.rejected)
    log = _blocking(Ledger.log)
    project = _blocking(Ledger.project)
    rebuild = _blocking(Ledger.rebuild)
    count_events = _blocking(Ledger.count_events)
    positions = _blocking(Ledger.positions)
    pnl = _blocking(Ledger.pnl)
    history = _blocking(Ledger.history)
    trail = _blocking(Ledger.trail)
    explain = _blocking(Ledger.explain)
    reconcile = _blocking(Ledger.reconcile)
    instruments = _blocking(Ledger.instruments)
    reconciliation = _blocking(Ledger.reconciliation)
    report = _blocking(Ledger.report)
    write_report = _blocking(Ledger.write_report)
    verify = _blocking(Ledger.verify)
    seal = _blocking(Ledger.seal)
    faulted_streams = _blocking(Ledger.faulted_streams)
    stats = _blocking(Ledger.stats)
