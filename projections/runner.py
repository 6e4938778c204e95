"""The projection runner: the one place the read side does I/O.

It reads the log gap-free from its checkpoint, folds what it reads with the pure folds,
and writes the projection rows and the new checkpoint in one transaction. The
checkpoint row is locked by that transaction and checked against where the runner
started, so two runners (a live ``ledger project --follow`` and a query command
catching up) never apply anything twice: the second one finds the checkpoint moved,
drops what it folded, and starts again from the new checkpoint.

A fill that arrives in event order is folded incrementally. A late fill, a bust or a
correction restates its stream: the runner reads the stream's events as far as its
read position and replays them, then rewrites the stream's history and daily P&L. The
projections are therefore a function of the set of events, not of their arrival order.

Throughput (``scripts/bench_replay``): three connections work at once. One reads the
next page of the log while the current one is folded; one reads what folding needs
(cached states, streams to restate); one writes, so PostgreSQL stores page *n* while
Python folds page *n + 1*. A transaction covers one page when following the log and
many pages (``rebuild_flush_events``) in a rebuild, where a kill costs at most that
much work. Memory is bounded by the page size and the state cache, never the log.

Python's folding is the bottleneck of a rebuild, and streams are independent: a rebuild
of a long log (``partition_min_events``) splits the streams between
``rebuild_workers`` processes up to the log's end when it starts (see
:mod:`projections.partition`), joins them, then catches up and swaps as usual.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import sys
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
import orjson
from sqlalchemy.ext.asyncio import AsyncEngine

from ledger.db import Reconnect, is_transient, retry_transient
from ledger.schema import NOTIFY_CHANNEL
from ledger.settings import Settings
from ledger.store import (
    INSTRUMENTS_SQL,
    Checkpoint,
    EventStore,
    LightRow,
    driver_connection,
    ensure_log_statistics,
)
from ledger.values import point_value
from projections import store as sql
from projections.faults import UNFOLDABLE, culprit_in_rows
from projections.history import HistoryRow, compact
from projections.pagefold import (
    E_OCCURRED_AT,
    E_POSITION,
    MARK_EVERY,
    FoldScope,
    Marks,
    Page,
    Restated,
    StreamRow,
    collect,
    fold_rows,
    restate_stream,
    stream_row,
    trim_journal,
)
from projections.pnl import trading_day
from projections.positions import (
    FoldError,
    PositionState,
    new_state,
)

__all__ = ["Instrument", "ProjectionRunner", "RebuildResult", "parse_session", "point_value"]

log = logging.getLogger(__name__)
_STREAM_TYPES = frozenset({"fill", "bust", "correction"})
_DEFAULT_BATCH = 5000
_REBUILD_FLUSH_EVENTS = 200_000
_JOURNAL_ROWS = 250_000
_YIELD_EVERY = 512  # rows folded between chances for other tasks to run
_MAX_WORKERS = 4  # rebuild worker processes by default: one per core, at most this
_PARTITION_MIN_EVENTS = 200_000  # shorter logs gain little: a worker takes ~1 s to start


@dataclass(frozen=True, slots=True)
class Instrument:
    """What the folds need to know about a contract."""

    point_value: Decimal
    tick_size: Decimal
    currency: str


@dataclass(frozen=True, slots=True)
class RebuildResult:
    """What a rebuild did."""

    generation: int
    events: int
    seconds: float


def parse_session(value: str | None) -> tuple[time | None, ZoneInfo | None]:
    """Parse ``LEDGER_SESSION_START`` (``"17:00 America/Chicago"``) into time and zone.

    Raises:
        ValueError: the value is not ``HH:MM`` optionally followed by an IANA zone name.
    """
    if not value:
        return None, None
    parts = value.split()
    try:
        start = time.fromisoformat(parts[0])
        zone = ZoneInfo(parts[1]) if len(parts) > 1 else None
    except (ValueError, KeyError, IndexError) as exc:
        raise ValueError(
            f"LEDGER_SESSION_START must be 'HH:MM [Area/City]', got {value!r}: {exc}"
        ) from None
    return start, zone


@contextlib.contextmanager
def _fewer_collections() -> Iterator[None]:
    """Run the cyclic garbage collector less often while a long drain allocates.

    A drain allocates and frees millions of small objects (rows, effects, history
    lines) that never form cycles; the default thresholds rescan the state cache over
    and over (about 16% of a rebuild's time). Restored afterwards.
    """
    before = gc.get_threshold()
    gc.set_threshold(100_000, 50, 1000)
    try:
        yield
    finally:
        gc.set_threshold(*before)


def _positive_env(name: str, default: int) -> int:
    """Return the positive integer in environment variable ``name``, or ``default``."""
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"{name} must be a positive integer, got {raw!r}")
    return value


def _default_batch_size() -> int:
    """Return ``LEDGER_PROJECTION_BATCH`` (events per page) or 5000."""
    return _positive_env("LEDGER_PROJECTION_BATCH", _DEFAULT_BATCH)


async def _watch(
    proc: asyncio.subprocess.Process, progress: Callable[[int], None] | None
) -> tuple[int, str]:
    """Forward a rebuild worker's progress lines; return its exit status and error tail."""
    assert proc.stdout is not None and proc.stderr is not None
    errors = asyncio.ensure_future(proc.stderr.read())
    async for line in proc.stdout:
        text = line.strip()
        if progress is not None and text.isdigit():
            progress(int(text))
    code = await proc.wait()
    return code, (await errors).decode(errors="replace")[-2000:].strip()


class _Conflict(Exception):
    """Another runner moved the checkpoint since we read it: start again from it."""


class _Retired(Exception):
    """The generation was swapped away (or is gone): nothing more to do on it."""


@dataclass(slots=True)
class _Flush:
    """What one transaction writes besides its pages' rows."""

    start: Checkpoint
    end: Checkpoint = field(default_factory=Checkpoint)  # of its last page
    events: int = 0
    dirty: set[str] = field(default_factory=set)
    # stream -> day -> [account, contract, realized fifo, realized wac, fees, fills]
    daily: dict[str, dict[date, list[Any]]] = field(default_factory=dict)
    tx: Any = None  # the asyncpg transaction, once the first page is written


@dataclass(slots=True)
class _Connections:
    reader: asyncpg.Connection  # reads the next page while the current one is folded
    aux: asyncpg.Connection  # cached states and restated streams, for the fold
    writer: asyncpg.Connection  # the transaction


class ProjectionRunner:
    """Keep the projections of one database up to date with its log."""

    def __init__(
        self,
        engine: AsyncEngine,
        settings: Settings | None = None,
        *,
        batch_size: int | None = None,
        snapshot_every: int = 64,
        cache_size: int = 50_000,
    ) -> None:
        self.engine = engine
        self.settings = settings or Settings()
        self.batch_size = batch_size or _default_batch_size()
        self.snapshot_every = snapshot_every
        self.cache_size = cache_size
        # events per transaction in a rebuild (live catch-up commits every page); a killed
        # rebuild loses at most this much work. LEDGER_REBUILD_FLUSH overrides it.
        self.rebuild_flush_events = _positive_env("LEDGER_REBUILD_FLUSH", _REBUILD_FLUSH_EVENTS)
        self.session_start, self.session_tz = parse_session(self.settings.session_start)
        self._utc_days = self.session_start is None and self.session_tz is None
        self._instruments: dict[str, Instrument] = {}
        self._cache: OrderedDict[str, PositionState] = OrderedDict()
        # per cached stream: the latest recorded_at of the events its state holds
        self._known: dict[str, datetime] = {}
        self._cache_key: tuple[int, int, int] | None = None  # (generation, tx, position)
        # Restating from memory: while a drain that began at the start of the log keeps
        # its cache, every fill, bust and correction of a stream passed through _fold, so
        # a restatement can replay them from here instead of reading the stream back.
        # None: off. Streams evicted from the cache or over the row budget are "lost"
        # and restate from the log as before. Bounded by journal_rows rows in all.
        self.journal_rows = _JOURNAL_ROWS
        self._journal: dict[str, list[StreamRow]] | None = None
        self._journal_lost: set[str] = set()
        # per journaled stream: states after every MARK_EVERYth fill, so a restatement
        # replays and rewrites from the last mark before its change (None with no journal)
        self._marks: dict[str, Marks] | None = None
        self.mark_every = MARK_EVERY
        self._log_has_statistics = False  # see ledger.store.ensure_log_statistics
        # A rebuild of a log of at least partition_min_events events splits the streams
        # between rebuild_workers processes (projections.partition); 1: never.
        self.rebuild_workers = _positive_env(
            "LEDGER_REBUILD_WORKERS", min(os.cpu_count() or 1, _MAX_WORKERS)
        )
        self.partition_min_events = _positive_env(
            "LEDGER_REBUILD_PARTITION_MIN", _PARTITION_MIN_EVENTS
        )
        self._journal_size = 0
        # Faulted streams of the generation being folded (projections.faults): set aside
        # until a row of theirs (a correction or bust) lets them replay. None: not loaded.
        self._faulted: set[str] | None = None

    # ------------------------------------------------------------------ public

    async def catch_up(self, progress: Callable[[int], None] | None = None) -> int:
        """Project every committed event into the serving generation; return how many.

        A serving generation that has projected nothing yet, on a log long enough to
        split (``partition_min_events``), is replaced by a rebuild instead, which splits
        the streams between processes (``ledger project`` on a fresh, long log).
        """
        async with self._connections() as conns:
            generation = await sql.ensure_serving(conns.writer)
            if not await self._worth_a_split_rebuild(conns.aux, generation):
                applied = await self._drain(conns, generation, progress, self.batch_size)
                # Always: the window moves with the clock (and its setting), not only
                # with new events; with nothing old enough this is one empty index scan.
                # (Not on a generation a rebuild swapped away meanwhile: it is being
                # dropped.)
                row = await conns.aux.fetchrow(sql.CHECKPOINT, generation)
                if row is not None and row["status"] == "serving":
                    await self.compact_history(conns.writer, generation)
                return applied
        return (await self.rebuild(progress)).events

    async def catch_up_retrying(self, progress: Callable[[int], None] | None = None) -> int:
        """:meth:`catch_up`, retried when the database is lost midway (bounded, logged).

        Safe: every page commits with its checkpoint, so a retry goes on from the last
        committed page (the in-memory states of the failed attempt are dropped). This is
        what ``ledger project`` does before it follows, so a server restart or a
        failover during that first catch-up is survived.
        """
        return await retry_transient(
            lambda: self.catch_up(progress),
            "catching up the projections",
            engine=self.engine,
            on_retry=self._forget_cache,
        )

    async def _worth_a_split_rebuild(self, conn: asyncpg.Connection, generation: int) -> bool:
        """Return whether ``generation`` has projected nothing of a log long enough to
        split (see catch_up)."""
        if self.rebuild_workers < 2:
            return False
        row = await conn.fetchrow(sql.CHECKPOINT, generation)
        if row is None or (row["tx_id"], row["position"]) != (0, 0):
            return False
        return await self._split_end(conn) is not None

    async def _split_end(self, conn: asyncpg.Connection) -> Checkpoint | None:
        """Return the log's present end if a rebuild would split the log up to it (it
        holds at least ``partition_min_events`` events and workers are allowed)."""
        if self.rebuild_workers < 2:
            return None
        head = await conn.fetchrow(sql.LOG_HEAD)
        if head is None:
            return None
        end = Checkpoint(head[0], head[1])
        logged: int = await conn.fetchval(sql.COUNT_UPTO, str(end.tx_id), end.position)
        return end if logged >= self.partition_min_events else None

    async def follow(
        self,
        stop: asyncio.Event,
        *,
        poll_interval: float = 1.0,
        on_batch: Callable[[int], None] | None = None,
        compact_interval: float = 60.0,
        recheck: float = 0.002,
    ) -> None:
        """Project continuously until ``stop`` is set.

        Woken by NOTIFY on every append, polling every ``poll_interval`` seconds as a
        fallback; after a lost connection it reconnects with backoff, LISTENs again and
        re-reads from its checkpoint, so nothing is skipped or applied twice.

        At the head of the log each wake-up commits what it read at once, so the fixed
        cost of a wake-up bounds the lag: the connections are kept from one wake-up to
        the next (not three pool checkouts and check-ins each time), and history is
        compacted every ``compact_interval`` seconds (its window is days long), not
        after every page. A NOTIFY whose events the gap-free read cannot see yet (a
        transaction older than theirs is still open, anywhere on the server) is looked
        at again after ``recheck`` seconds, doubling up to ``poll_interval``, rather
        than at the next NOTIFY or poll.
        """
        # bounded: a database gone for longer than LEDGER_RECONNECT_TIMEOUT ends it
        reconnect = Reconnect("following the log", first=0.2)
        while not stop.is_set():
            try:
                async with self._listen() as (woken, listener), self._connections() as conns:
                    reconnect.succeeded()
                    await self._follow_connected(
                        conns,
                        woken,
                        listener,
                        stop,
                        on_batch,
                        (poll_interval, compact_interval, recheck),
                    )
            except Exception as exc:
                # A held connection that read the server's FATAL (a shutdown) before its
                # socket closed fails with a protocol error instead: it is as lost.
                if not is_transient(exc):
                    raise
                backoff = reconnect.failed(exc)  # logs it; gives up past the window
                self._forget_cache()
                # the server restarted or went away: every pooled connection is suspect
                with contextlib.suppress(Exception):
                    await self.engine.dispose()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=backoff)

    async def _follow_connected(
        self,
        conns: _Connections,
        woken: asyncio.Event,
        listener: asyncpg.Connection,
        stop: asyncio.Event,
        on_batch: Callable[[int], None] | None,
        timing: tuple[float, float, float],
    ) -> None:
        """Follow on one set of connections until ``stop``; a lost connection raises.

        ``timing`` is ``(poll_interval, compact_interval, recheck)`` of :meth:`follow`.
        """
        poll_interval, compact_interval, recheck = timing
        clock = asyncio.get_running_loop().time
        generation = await sql.ensure_serving(conns.writer)
        compacted_at: float | None = None
        hidden_wait: float | None = None  # set while announced events may be hidden
        while not stop.is_set():
            if woken.is_set():
                woken.clear()
                hidden_wait = recheck
            # the first pass of a session re-reads from the checkpoint: after a reconnect
            applied = await self._drain(conns, generation, None, self.batch_size)
            if on_batch and applied:
                on_batch(applied)
            if compacted_at is None or clock() - compacted_at >= compact_interval:
                row = await conns.aux.fetchrow(sql.CHECKPOINT, generation)
                if row is not None and row["status"] == "serving":
                    await self.compact_history(conns.writer, generation)
                compacted_at = clock()
            if applied or woken.is_set():
                continue
            serving = await sql.ensure_serving(conns.writer)
            if serving != generation:
                generation = serving  # a rebuild swapped its generation in
                continue
            if listener.is_closed():
                # the server went away while we slept: LISTEN again
                raise ConnectionError("the LISTEN connection was closed")
            waiters = [
                asyncio.ensure_future(woken.wait()),
                asyncio.ensure_future(stop.wait()),
            ]
            _, pending = await asyncio.wait(
                waiters,
                timeout=poll_interval if hidden_wait is None else hidden_wait,
                return_when=asyncio.FIRST_COMPLETED,
            )
            for task in pending:
                task.cancel()
            if hidden_wait is not None and not woken.is_set():
                hidden_wait = hidden_wait * 2 if hidden_wait * 2 < poll_interval else None

    async def rebuild(self, progress: Callable[[int], None] | None = None) -> RebuildResult:
        """Fill a new generation from zero, then swap it in atomically.

        The serving generation answers queries until the swap. A rebuild that is killed
        leaves its generation in ``building``; the next rebuild resumes it from its last
        committed transaction.
        """
        started = asyncio.get_running_loop().time()
        events = 0
        self._forget_cache()
        try:
            async with self._connections() as conns:
                conn = conns.writer
                await sql.ensure_serving(conn)
                generation = await conn.fetchval(sql.BUILDING)
                if generation is None:
                    generation = await conn.fetchval(sql.NEW_BUILDING)
                events += await self._rebuild_in_parts(conn, generation, progress)
                while True:
                    events += await self._drain(
                        conns, generation, progress, self.rebuild_flush_events
                    )
                    try:
                        events += await self._swap(conns, generation)
                        break
                    except (_Conflict, _Retired):
                        self._forget_cache()
                        row = await conns.aux.fetchrow(sql.CHECKPOINT, generation)
                        if row is None or row["status"] != "building":
                            break  # another rebuild swapped it in (or replaced it): done
                        # another rebuild moved its checkpoint on: catch up, retry
                for (retired,) in await conn.fetch(sql.RETIRED):
                    async with conn.transaction():
                        for statement in sql.DROP_GENERATION_TABLES:
                            await conn.execute(statement, retired)
                        await conn.execute(sql.FORGET_GENERATION, retired)
        finally:
            self._forget_cache()
        elapsed = asyncio.get_running_loop().time() - started
        return RebuildResult(generation, events, elapsed)

    async def _rebuild_in_parts(
        self,
        conn: asyncpg.Connection,
        generation: int,
        progress: Callable[[int], None] | None,
    ) -> int:
        """Project the log up to its present end into ``generation`` with one worker
        process per part of the streams, if it is long enough (or a killed rebuild left
        parts to resume); then move the generation's checkpoint to that end.

        Returns:
            The events the parts projected (0 when the log is not split).
        """
        parts = await conn.fetch(sql.PARTITIONS, generation)
        if not parts:
            end = await self._split_end(conn)
            if end is None:
                return 0
            async with conn.transaction():
                row = await sql.lock_checkpoint(conn, generation)
                if row is None or (row["status"], row["tx_id"], row["position"]) != (
                    "building",
                    0,
                    0,
                ):
                    return 0  # a rebuild in one process has begun it: it goes on
                await conn.execute(
                    sql.CREATE_PARTITIONS, generation, self.rebuild_workers, end.tx_id, end.position
                )
            parts = await conn.fetch(sql.PARTITIONS, generation)
        end = Checkpoint(parts[0]["end_tx_id"], parts[0]["end_position"])
        pending = [r["part"] for r in parts if (r["tx_id"], r["position"]) != end]
        if pending:
            await self._run_workers(generation, pending, parts[0]["parts"], end, progress)
        async with conn.transaction():
            events: int = await conn.fetchval(sql.COUNT_UPTO, str(end.tx_id), end.position)
            joined = await conn.execute(
                sql.JOIN_PARTITIONS, generation, end.tx_id, end.position, events
            )
            await conn.execute(sql.DROP_PARTITIONS, generation)
        return events if joined == "UPDATE 1" else 0

    async def _run_workers(
        self,
        generation: int,
        pending: list[int],
        parts: int,
        end: Checkpoint,
        progress: Callable[[int], None] | None,
    ) -> None:
        """Project each part in ``pending``: the first in this process, the others in
        worker processes started first (each takes about a second to import); wait for
        all of them."""
        from projections.partition import PartitionRunner, WorkerConfig  # (imports us)

        configs = [
            WorkerConfig(
                url=self.engine.url.render_as_string(hide_password=False),
                generation=generation,
                part=part,
                parts=parts,
                parent=os.getpid(),
                settings=self.settings.model_dump(mode="json"),
                batch_size=self.batch_size,
                snapshot_every=self.snapshot_every,
                cache_size=self.cache_size,
                flush_events=self.rebuild_flush_events,
                journal_rows=self.journal_rows,
                mark_every=self.mark_every,
            )
            for part in pending
        ]
        procs: list[asyncio.subprocess.Process] = []
        watching: list[asyncio.Future[tuple[int, str]]] = []
        try:
            for config in configs[1:]:
                proc = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "projections.partition",
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE,
                )
                procs.append(proc)
                assert proc.stdin is not None
                proc.stdin.write(config.to_json().encode())
                await proc.stdin.drain()
                proc.stdin.close()
                watching.append(asyncio.ensure_future(_watch(proc, progress)))
            await PartitionRunner(self.engine, configs[0], end).project(generation, progress)
            outcomes = await asyncio.gather(*watching)
        finally:
            for proc in procs:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
            for task in watching:
                task.cancel()
        for config, (code, errors) in zip(configs[1:], outcomes, strict=True):
            if code != 0:
                raise RuntimeError(
                    f"rebuild worker {config.part + 1} of {parts} exited with status {code}: "
                    f"{errors}"
                )

    async def compact_history(self, conn: asyncpg.Connection, generation: int) -> int:
        """Collapse detail older than the retention window into end-of-day rows."""
        cutoff_day = self._compaction_cutoff()
        async with conn.transaction():
            rows = await conn.fetch(sql.OLD_DETAIL_GROUPS, generation, cutoff_day)
            if not rows:
                return 0
            history: list[HistoryRow] = []
            streams: dict[tuple[str, str], str] = {}
            for r in rows:
                streams[(r["account"], r["contract"])] = r["stream"]
                history.append(
                    HistoryRow(
                        account=r["account"],
                        contract=r["contract"],
                        position=r["position"],
                        exec_id=r["exec_id"] or "",
                        occurred_at=r["occurred_at"],
                        qty_before=r["qty_before"],
                        qty_after=r["qty_after"],
                        realized_fifo=r["realized_fifo"],
                        realized_wac=r["realized_wac"],
                        cum_realized_fifo=r["cum_realized_fifo"],
                        cum_realized_wac=r["cum_realized_wac"],
                        fees=r["fees"],
                        kind=r["kind"],
                        day=r["day"],
                    )
                )
            # Every row of the selected groups lies before the cutoff day: compact them all.
            compacted = compact(history, datetime.now(UTC))
            groups = sorted({(r["stream"], r["day"]) for r in rows})
            await conn.execute(
                sql.DELETE_OLD_GROUPS, generation, [g[0] for g in groups], [g[1] for g in groups]
            )
            records = [
                sql.history_record(
                    generation,
                    streams[(h.account, h.contract)],
                    h.position,
                    h.kind,
                    h.account,
                    h.contract,
                    h.exec_id or None,
                    h.occurred_at,
                    h.day,
                    None,
                    None,
                    None,
                    h.qty_before,
                    h.qty_after,
                    h.realized_fifo,
                    h.realized_wac,
                    h.cum_realized_fifo,
                    h.cum_realized_wac,
                    h.fees,
                )
                for h in compacted
            ]
            await conn.copy_records_to_table(
                "proj_history", records=records, columns=sql.HISTORY_COLUMNS
            )
            return len(rows) - len(records)

    # ---------------------------------------------------------------- internals

    @contextlib.asynccontextmanager
    async def _connections(self) -> AsyncIterator[_Connections]:
        async with (
            self.engine.connect() as reader,
            self.engine.connect() as aux,
            self.engine.connect() as writer,
        ):
            try:
                yield _Connections(
                    await driver_connection(reader),
                    await driver_connection(aux),
                    await driver_connection(writer),
                )
            except BaseException as exc:
                if isinstance(exc, Exception) and is_transient(exc):
                    # SQLAlchemy never saw these fail (we drive asyncpg directly): make
                    # sure the pool does not hand them out again
                    for sa_conn in (reader, aux, writer):
                        with contextlib.suppress(Exception):
                            await sa_conn.invalidate()
                raise

    @contextlib.asynccontextmanager
    async def _listen(self) -> AsyncIterator[tuple[asyncio.Event, asyncpg.Connection]]:
        """LISTEN for appends on a connection of our own; yield the wake-up and it."""
        woken = asyncio.Event()

        def _on_notify(*_: object) -> None:
            woken.set()

        async with self.engine.connect() as sa_conn:
            conn = await driver_connection(sa_conn)
            await conn.add_listener(NOTIFY_CHANNEL, _on_notify)
            try:
                yield woken, conn
            finally:
                if not conn.is_closed():
                    with contextlib.suppress(Exception):
                        await conn.remove_listener(NOTIFY_CHANNEL, _on_notify)
                else:
                    # a dead connection must not go back to the pool as if it were fine
                    with contextlib.suppress(Exception):
                        await sa_conn.invalidate()

    def _forget_cache(self) -> None:
        self._cache.clear()
        self._known.clear()
        self._cache_key = None
        self._journal = None
        self._marks = None
        self._journal_lost.clear()
        self._journal_size = 0
        self._faulted = None

    def _journal_trim(self) -> None:
        """Keep the journal within its row budget: forget the least recently used
        streams' rows (they restate from the log)."""
        journal = self._journal
        if journal is None or self._journal_size <= self.journal_rows:
            return
        target = self.journal_rows * 3 // 4
        for stream in list(self._cache):
            if self._journal_size <= target:
                break
            if stream in journal:
                self._journal_drop(stream)
        if self._journal_size > target:
            for stream in list(journal):
                if self._journal_size <= target:
                    break
                self._journal_drop(stream)

    def _journal_drop(self, stream: str) -> None:
        """Stop remembering ``stream``: it restates from the log from now on."""
        journal = self._journal
        if journal is None:
            return
        rows = journal.pop(stream, None)
        if rows is not None:
            self._journal_size -= len(rows)
        if self._marks is not None:
            self._marks.pop(stream, None)
        self._journal_lost.add(stream)

    async def _read(self, conn: asyncpg.Connection, after: Checkpoint) -> list[LightRow]:
        return await EventStore.read_light(conn, after, self.batch_size)

    async def _drain(
        self,
        conns: _Connections,
        generation: int,
        progress: Callable[[int], None] | None,
        flush_events: int,
    ) -> int:
        """Project everything committed into ``generation``; return how many events."""
        total = 0
        if not self._log_has_statistics:
            self._log_has_statistics = await ensure_log_statistics(conns.aux)
        while True:
            row = await self._checkpoint(conns.aux, generation)
            if row is None or row["status"] == "retired":
                return total  # swapped away: the caller re-reads the serving one
            start = Checkpoint(row["tx_id"], row["position"])
            if self._cache_key != (generation, start.tx_id, start.position):
                self._forget_cache()  # another runner moved it on: the cache may be stale
            try:
                with _fewer_collections():
                    total += await self._pipeline(conns, generation, start, progress, flush_events)
                return total
            except _Conflict:
                self._forget_cache()
            except _Retired:
                self._forget_cache()
                return total
            except BaseException:
                # rolled back (or never committed): the cached states are ahead of the rows
                self._forget_cache()
                raise

    async def _pipeline(
        self,
        conns: _Connections,
        generation: int,
        start: Checkpoint,
        progress: Callable[[int], None] | None,
        flush_events: int,
    ) -> int:
        """Read, fold and write pages until the log is drained, three connections at once."""
        writer = conns.writer
        flush = _Flush(start)
        total = 0
        if (
            self._journal is None
            and not self._cache
            and start.tx_id == 0
            and start.position == 0
            and self.journal_rows > 0
        ):
            # from the start of the log with nothing cached: every stream event comes
            # through _fold from here on, so memory holds whole streams
            self._journal = {}
            self._marks = {}
            self._journal_lost.clear()
            self._journal_size = 0
        write: asyncio.Task[int] | None = None
        nxt: asyncio.Task[list[LightRow]] | None = asyncio.ensure_future(
            self._read(conns.reader, start)
        )
        try:
            while nxt is not None:
                rows = await nxt
                nxt = None
                if not rows:
                    break
                last = rows[-1]
                end = Checkpoint(last.tx_id, last.global_position)
                # A short page is the head of the log: commit what we have rather than
                # keep reading a trickle of new events into one ever-growing transaction
                # (live projections would lag by a whole flush).
                if len(rows) >= self.batch_size:
                    nxt = asyncio.ensure_future(self._read(conns.reader, end))
                page = await self._fold(conns.aux, generation, rows, end, flush)
                if write is not None:
                    total += await write
                    write = None
                self._trim_cache(keep=flush.dirty)
                flush.events += len(rows)
                flush.end = end
                if flush.tx is None:
                    flush.tx = await self._begin(writer, generation, flush.start)
                if flush.events >= flush_events:
                    positions = self._position_rows(flush.dirty)
                    write = asyncio.ensure_future(
                        self._write_and_commit(writer, generation, page, flush, positions, progress)
                    )
                    flush = _Flush(end)
                else:
                    write = asyncio.ensure_future(self._write_page(writer, generation, page))
            if write is not None:
                total += await write
                write = None
            if flush.tx is not None:
                total += await self._commit(
                    writer, generation, flush, self._position_rows(flush.dirty), progress
                )
            return total
        finally:
            for task in (nxt, write):
                if task is None:
                    continue
                if not task.done():
                    task.cancel()
                    with contextlib.suppress(BaseException):
                        await task
                elif not task.cancelled():
                    # a read ahead that failed while the fold raised first: its error is
                    # the same lost connection, already handled; retrieve it so asyncio
                    # does not print it as "Task exception was never retrieved"
                    task.exception()
            if not writer.is_closed() and writer.is_in_transaction():
                # failed or cancelled half way: never hand the pool an open transaction
                with contextlib.suppress(Exception):
                    await writer.execute("ROLLBACK")

    async def _begin(self, conn: asyncpg.Connection, generation: int, start: Checkpoint) -> Any:
        """Open a transaction holding the checkpoint row, which must still be at ``start``."""
        tx = conn.transaction()
        await tx.start()
        try:
            locked = await self._lock_checkpoint(conn, generation)
            if locked is None or locked["status"] == "retired":
                raise _Retired
            if (locked["tx_id"], locked["position"]) != (start.tx_id, start.position):
                raise _Conflict
        except BaseException:
            await tx.rollback()
            raise
        return tx

    async def _write_page(self, conn: asyncpg.Connection, generation: int, page: Page) -> int:
        await self._write(conn, generation, page)
        return 0

    async def _write_and_commit(
        self,
        conn: asyncpg.Connection,
        generation: int,
        page: Page,
        flush: _Flush,
        positions: list[sql.PositionRow],
        progress: Callable[[int], None] | None,
    ) -> int:
        await self._write(conn, generation, page)
        return await self._commit(conn, generation, flush, positions, progress)

    async def _commit(
        self,
        conn: asyncpg.Connection,
        generation: int,
        flush: _Flush,
        positions: list[sql.PositionRow],
        progress: Callable[[int], None] | None,
    ) -> int:
        """Write the flush's positions, daily P&L and checkpoint, and commit."""
        end = flush.end
        await self._write_flush(conn, generation, flush, positions, end)
        await flush.tx.commit()
        self._cache_key = (generation, end.tx_id, end.position)
        if progress:
            progress(flush.events)
        return flush.events

    async def _write_flush(
        self,
        conn: asyncpg.Connection,
        generation: int,
        flush: _Flush,
        positions: list[sql.PositionRow],
        end: Checkpoint,
    ) -> None:
        if positions:
            await conn.execute(sql.UPSERT_POSITIONS, generation, *sql.position_columns(positions))
        if flush.daily:
            keys: list[tuple[str, date]] = []
            values: list[list[Any]] = []
            for stream, days in flush.daily.items():
                for day, value in days.items():
                    keys.append((stream, day))
                    values.append(value)
            if keys:
                await conn.execute(
                    sql.ADD_PNL_DAILY,
                    generation,
                    [k[0] for k in keys],
                    [k[1] for k in keys],
                    [v[0] for v in values],
                    [v[1] for v in values],
                    [v[2] for v in values],
                    [v[3] for v in values],
                    [v[4] for v in values],
                    [v[5] for v in values],
                )
        await self._advance(conn, generation, end, flush.events)

    # The checkpoint this runner reads, holds and moves (a rebuild worker has its own).

    async def _checkpoint(self, conn: asyncpg.Connection, generation: int) -> Any:
        """Return the checkpoint row (tx_id, position, events, status), or None."""
        return await conn.fetchrow(sql.CHECKPOINT, generation)

    async def _lock_checkpoint(self, conn: asyncpg.Connection, generation: int) -> Any:
        return await sql.lock_checkpoint(conn, generation)

    async def _advance(
        self, conn: asyncpg.Connection, generation: int, end: Checkpoint, events: int
    ) -> None:
        await conn.execute(sql.ADVANCE, generation, end.tx_id, end.position, events)

    async def _faulted_streams(self, conn: asyncpg.Connection, generation: int) -> set[str]:
        """Return the streams of ``generation`` held as faulted (that this runner folds)."""
        return {r[0] for r in await conn.fetch(sql.FAULTED_STREAMS, generation)}

    async def _swap(self, conns: _Connections, generation: int) -> int:
        """Take the last events, compact, and swap ``generation`` in: one transaction."""
        conn = conns.writer
        row = await conns.aux.fetchrow(sql.CHECKPOINT, generation)
        if row is None or row["status"] != "building":
            raise _Conflict
        start = Checkpoint(row["tx_id"], row["position"])
        if self._cache_key != (generation, start.tx_id, start.position):
            self._forget_cache()
        flush = _Flush(start)
        flush.tx = await self._begin(conn, generation, start)
        try:
            rows = await self._read(conn, start)
            end = start
            if rows:
                end = Checkpoint(rows[-1].tx_id, rows[-1].global_position)
                page = await self._fold(conns.aux, generation, rows, end, flush)
                flush.events = len(rows)
                await self._write(conn, generation, page)
            await self._write_flush(conn, generation, flush, self._position_rows(flush.dirty), end)
            # compacted before it serves: no reader sees a window of raw detail
            await self.compact_history(conn, generation)
            await conn.execute(sql.RETIRE_SERVING, generation)
            await conn.execute(sql.SERVE, generation)
            await flush.tx.commit()
        except BaseException:
            await flush.tx.rollback()
            raise
        return flush.events

    async def _load_instruments(self, conn: asyncpg.Connection) -> None:
        for (payload,) in await conn.fetch(INSTRUMENTS_SQL):
            self._add_instrument(orjson.loads(payload))

    def _add_instrument(self, payload: dict[str, Any]) -> None:
        tick_size = Decimal(payload["tick_size"])
        self._instruments.setdefault(
            payload["contract"],
            Instrument(
                point_value(Decimal(payload["tick_value"]), tick_size),
                tick_size,
                payload["currency"],
            ),
        )

    def _instrument(self, contract: str) -> Instrument:
        instrument = self._instruments.get(contract)
        if instrument is None:
            raise FoldError(
                f"contract: no instrument event defines {contract!r}, so its fills cannot be "
                "valued (ingest rejects such fills; was this event appended directly?)"
            )
        return instrument

    async def _preload(
        self, conn: asyncpg.Connection, generation: int, rows: list[LightRow]
    ) -> None:
        cache = self._cache
        wanted = list({r.stream for r in rows if r.type in _STREAM_TYPES and r.stream not in cache})
        if not wanted:
            return
        loaded = await conn.fetch(sql.LOAD_STATES, generation, wanted)
        if not loaded:
            return
        for stream, state in loaded:
            cache[stream] = PositionState.from_json(orjson.loads(state))
        # the newest recorded_at of each loaded stream's events; erring late is safe (an
        # as-known-at query then picks an older snapshot), erring early would not be
        for stream, recorded in await conn.fetch(sql.LATEST_RECORDED, [r[0] for r in loaded]):
            self._known[stream] = recorded

    def _state(self, stream: str, account: str, contract: str) -> PositionState:
        state = self._cache.get(stream)
        if state is None:
            instrument = self._instrument(contract)
            state = new_state(account, contract, instrument.point_value, instrument.tick_size)
            self._cache[stream] = state
        return state

    def _compaction_cutoff(self) -> date:
        """Return the first trading day inside the retention window: detail history of
        the days before it is compacted into end-of-day rows."""
        cutoff = datetime.now(UTC) - timedelta(days=self.settings.history_retention_days)
        return trading_day(cutoff, self.session_start, self.session_tz)

    def _day(self, occurred_at: datetime) -> date:
        if self._utc_days and occurred_at.tzinfo is UTC:
            return occurred_at.date()
        return trading_day(occurred_at, self.session_start, self.session_tz)

    async def _fold(
        self,
        conn: asyncpg.Connection,
        generation: int,
        rows: list[LightRow],
        end: Checkpoint,
        flush: _Flush,
    ) -> Page:
        """Fold one page into the cached states; return what it writes."""
        if not self._instruments:
            await self._load_instruments(conn)
        if self._faulted is None:
            self._faulted = await self._faulted_streams(conn, generation)
        await self._preload(conn, generation, rows)
        page = Page(end)
        if self._faulted:
            self._retry_faulted(page, rows)
        scope = FoldScope(
            self._cache,
            self._known,
            self._journal,
            self._journal_lost,
            self.snapshot_every,
            self._state,
            self._add_instrument,
            self._marks,
            self._utc_days,
            self._day,
            self.mark_every,
        )
        journaled = 0
        for lo in range(0, len(rows), _YIELD_EVERY):
            if lo:
                # let the writer's round trips (COPY of the previous page) go on while
                # this page folds, rather than all wait for the end of the page
                await asyncio.sleep(0)
            journaled += fold_rows(scope, page, rows, lo, min(lo + _YIELD_EVERY, len(rows)))
        if self._journal is not None:
            self._journal_size += journaled
        if page.restate:
            await self._restate(conn, page, rows)
        self._journal_trim()
        collect(page, generation, self._cache, flush.daily, flush.dirty, self._utc_days, self._day)
        for stream in page.faults:
            # what earlier pages of the transaction did to it is wiped with it
            flush.dirty.discard(stream)
            flush.daily.pop(stream, None)
        return page

    def _retry_faulted(self, page: Page, rows: list[LightRow]) -> None:
        """Send every faulted stream with a row in ``rows`` (or whose contract an
        instrument row defines) to a replay of the whole stream: a correction or bust
        of the offending execution heals it; anything else leaves it faulted."""
        faulted = self._faulted
        assert faulted is not None
        restate = page.restate
        defined: set[str] = set()
        for row in rows:
            stream = row.stream
            if stream in faulted:
                if row.type in _STREAM_TYPES and stream not in restate:
                    restate[stream] = row.global_position
            elif row.type == "instrument":
                defined.add(orjson.loads(row.payload)["contract"])
        if defined:
            for stream in faulted:
                if stream not in restate and stream.split("/", 1)[1] in defined:
                    restate[stream] = page.end.position

    async def _restate(self, conn: asyncpg.Connection, page: Page, rows: list[LightRow]) -> None:
        """Replay every stream of ``page.restate`` up to the page's end, from its journal
        or else from the log, rewriting its history and daily P&L from the first fill
        that changed, or from the last mark before it (see ``restate_stream``)."""
        streams = sorted(page.restate)
        journal = self._journal
        lost = self._journal_lost
        marks_of = self._marks
        first_new: dict[str, int] = {}
        for row in rows:  # in log order: the first row of each stream in this page
            if row.stream in page.restate and row.stream not in first_new:
                first_new[row.stream] = row.global_position
        floor = self._compaction_cutoff()
        faulted = self._faulted or set()
        for stream in streams:
            if stream in faulted:
                # a faulted stream has no rows left: it replays whole, from the log
                first_new[stream] = -1
                self._journal_drop(stream)
        # every row of a journaled stream up to the page's end went through _fold: the
        # journal holds them all, or (trimmed) all that a replay from a mark needs
        from_log = streams if journal is None else [s for s in streams if s in lost]
        if journal is not None and marks_of is not None:
            for stream in streams:
                if stream in lost:
                    continue
                marks = marks_of.get(stream)
                if marks is None:
                    # (replays from its first fill and takes marks as it goes)
                    marks = marks_of[stream] = Marks(every=self.mark_every)
                events = journal.setdefault(stream, [])
                try:
                    restated = self._replay(page, stream, events, first_new[stream], floor, marks)
                except UNFOLDABLE:
                    # forget its journal and marks: the replay from the log faults it
                    self._journal_drop(stream)
                    restated = None
                if restated is None:  # reaches before the trimmed journal: whole stream
                    from_log.append(stream)
                    continue
                self._journal_size -= trim_journal(events, marks)
                self._restated(page, stream, events, restated)
        if not from_log:
            return
        by_stream: dict[str, list[StreamRow]] = {s: [] for s in from_log}
        end = page.end
        for stream, position, kind, payload, recorded_at in await conn.fetch(
            sql.STREAMS_FILLS_UPTO, sorted(from_log), str(end.tx_id), end.position
        ):
            by_stream[stream].append(stream_row(position, kind, payload, recorded_at))
        for stream in sorted(from_log):
            events = by_stream[stream]
            marks = None
            if journal is not None and marks_of is not None and stream not in lost:
                # the journal takes the whole stream again, until marks trim it
                self._journal_size += len(events) - len(journal.get(stream, ()))
                journal[stream] = events
                marks = marks_of[stream]
                marks.trimmed = False
            try:
                restated = self._replay(page, stream, events, first_new[stream], floor, marks)
            except UNFOLDABLE as exc:
                self._fault(page, stream, events, exc)
                continue
            if restated is None:  # pragma: no cover - a whole stream always replays
                raise RuntimeError(f"stream {stream} did not replay from its whole log")
            if marks is not None:
                self._journal_size -= trim_journal(events, marks)
            if stream in faulted:
                faulted.discard(stream)
                page.healed.add(stream)
            self._restated(page, stream, events, restated)

    def _fault(
        self, page: Page, stream: str, events: list[StreamRow], error: BaseException
    ) -> None:
        """Set ``stream`` aside: it cannot be folded up to the page's end (``events`` are
        all its rows so far). Its fault is written with the page, its other rows are
        wiped, and it replays from the log whenever a row of its own comes."""
        contract = stream.split("/", 1)[1]
        instrument = self._instruments.get(contract)
        grid = None if instrument is None else (instrument.point_value, instrument.tick_size)
        culprit = culprit_in_rows(stream, events, grid, error) if events else None
        position = culprit.position if culprit else page.restate[stream]
        reason = culprit.reason if culprit else f"{type(error).__name__}: {error}"
        log.warning(
            "stream %s is faulted at log position %s (%s); it is set aside, every other "
            "stream goes on",
            stream,
            position,
            reason,
        )
        page.faults[stream] = (position, culprit.exec_id if culprit else None, reason)
        page.healed.discard(stream)
        for rewritten in (page.effects, page.cum_before, page.seed, page.forget):
            rewritten.pop(stream, None)
        page.snapshots = [s for s in page.snapshots if s[0] != stream]
        self._cache.pop(stream, None)
        self._known.pop(stream, None)
        self._journal_drop(stream)
        if self._faulted is not None:
            self._faulted.add(stream)

    def _replay(
        self,
        page: Page,
        stream: str,
        events: list[StreamRow],
        first_new: int,
        floor: date,
        marks: Marks | None,
    ) -> Restated | None:
        account, contract = stream.split("/", 1)
        instrument = self._instrument(contract)
        folded = page.effects.get(stream)  # what the page folded before the restatement
        return restate_stream(
            new_state(account, contract, instrument.point_value, instrument.tick_size),
            events,
            first_new,
            self._utc_days,
            self._day,
            floor,
            marks,
            (folded[0][E_OCCURRED_AT], folded[0][E_POSITION]) if folded else None,
        )

    def _restated(
        self, page: Page, stream: str, events: list[StreamRow], restated: Restated
    ) -> None:
        """Take a replayed stream's state, and what it rewrites, into ``page``."""
        state = restated.state
        if restated.forget is not None:
            page.forget[stream] = restated.forget
        if restated.seed is not None:
            page.seed[stream] = restated.seed
        self._cache[stream] = state
        self._cache.move_to_end(stream)
        latest = max((e[8] for e in events), default=None)
        known = self._known.get(stream)
        if latest is None or (known is not None and known > latest):
            latest = known  # (a trimmed journal's rows need not hold the latest)
        if latest is not None:
            self._known[stream] = latest
        page.effects[stream] = restated.effects
        page.cum_before[stream] = restated.cum_before
        # The page's earlier snapshots of the stream are superseded by one snapshot of
        # the whole of what is known at this point. (Intermediate replay states would
        # miss fills known here but later in event order, so they could not serve a tail
        # read by log position.)
        page.snapshots = [s for s in page.snapshots if s[0] != stream]
        if state.last_key is not None and latest is not None:
            page.snapshots.append(
                (
                    stream,
                    page.restate[stream],
                    state.last_key[1],
                    state.last_key[0],
                    latest,
                    state.json_text(),
                )
            )

    def _position_rows(self, streams: set[str]) -> list[sql.PositionRow]:
        rows = []
        cache = self._cache
        for stream in sorted(streams):
            s = cache[stream]
            rows.append(
                sql.PositionRow(
                    stream,
                    s.account,
                    s.contract,
                    s.signed_qty,
                    s.avg_open_price("fifo"),
                    s.avg_open_price("wac"),
                    s.realized_fifo,
                    s.realized_wac,
                    s.fees,
                    s.opened_at,
                    s.closed_at,
                    s.last_fill_at,
                    s.fill_count,
                    s.last_key[1] if s.last_key else 0,
                    s.json_text(),
                )
            )
        return rows

    async def _write(self, conn: asyncpg.Connection, generation: int, page: Page) -> None:
        """Write one page's rows inside the open transaction (not its positions)."""
        if page.faults or page.healed:
            await self._write_faults(conn, generation, page)
        if page.forget:
            streams = list(page.forget)
            days = [f[0] for f in page.forget.values()]
            await conn.execute(
                sql.FORGET_HISTORY,
                generation,
                streams,
                days,
                [f[1] for f in page.forget.values()],
                [f[2] for f in page.forget.values()],
            )
            await conn.execute(sql.FORGET_DAILY, generation, streams, days)
        if page.history:
            await conn.copy_to_table(
                "proj_history",
                source=memoryview("".join(page.history).encode()),
                columns=sql.HISTORY_COLUMNS,
                format="text",
            )
        if page.snapshots:
            snaps = page.snapshots
            await conn.execute(
                sql.INSERT_SNAPSHOTS,
                generation,
                [s[0] for s in snaps],
                [s[1] for s in snaps],
                [s[2] for s in snaps],
                [s[3] for s in snaps],
                [s[4] for s in snaps],
                [s[5] for s in snaps],
            )

    async def _write_faults(self, conn: asyncpg.Connection, generation: int, page: Page) -> None:
        """Record the page's faulted streams (wiping their other rows) and clear the
        faults of the streams it healed (their rows follow, rewritten whole)."""
        if page.healed:
            await conn.execute(sql.HEAL_FAULTS, generation, sorted(page.healed))
        if page.faults:
            streams = sorted(page.faults)
            for statement in sql.WIPE_STREAMS:
                await conn.execute(statement, generation, streams)
            faults = [page.faults[s] for s in streams]
            await conn.execute(
                sql.RECORD_FAULTS,
                generation,
                streams,
                [s.split("/", 1)[0] for s in streams],
                [s.split("/", 1)[1] for s in streams],
                [f[0] for f in faults],
                [f[1] for f in faults],
                [f[2] for f in faults],
            )

    def _trim_cache(self, keep: set[str]) -> None:
        """Evict the least recently used states, never one the open transaction holds."""
        cache = self._cache
        excess = len(cache) - self.cache_size
        if excess <= 0:
            return
        for stream in list(cache):
            if excess <= 0:
                break
            if stream in keep:
                continue
            del cache[stream]
            self._known.pop(stream, None)
            self._journal_drop(stream)
            excess -= 1
