"""The projection runner: the one place the read side does I/O.

It reads the log gap-free in batches from its checkpoint, folds each batch with the
pure folds, and writes the projection rows and the new checkpoint in one transaction.
The checkpoint row is locked for that transaction, so two runners (a live
``ledger project --follow`` and a query command catching up) never apply a batch twice.

A fill that arrives in event order is folded incrementally. A late fill, a bust or a
correction restates its stream: the runner reads the stream's fills as far as its
checkpoint and replays them (:func:`projections.positions.replay`), then rewrites the
stream's history and daily P&L. The projections are therefore a function of the set
of events, not of their arrival order.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
import orjson
from sqlalchemy.ext.asyncio import AsyncEngine

from ledger.events import FillBusted, FillCorrected, FillRecorded, event_from_stored
from ledger.settings import Settings
from ledger.store import Checkpoint, EventStore, LightRow, driver_connection
from ledger.values import Side
from projections import store as sql
from projections.history import HistoryRow, compact
from projections.pnl import trading_day
from projections.positions import (
    FillEffect,
    FillInput,
    FoldError,
    PositionState,
    apply_fill,
    is_in_order,
    new_state,
    replay,
)

__all__ = ["Instrument", "ProjectionRunner", "parse_session", "RebuildResult"]

log = logging.getLogger(__name__)
_STREAM_TYPES = frozenset({"fill", "bust", "correction"})


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


class _Batch:
    """What one batch changes, collected before it is written."""

    def __init__(self) -> None:
        self.effects: dict[str, list[FillEffect]] = defaultdict(list)
        self.realized_before: dict[str, tuple[Decimal, Decimal]] = {}
        self.restate: dict[str, int] = {}  # stream -> highest position seen in this batch
        self.dirty: set[str] = set()
        self.snapshots: list[tuple[str, int, int, datetime, datetime, str]] = []


class ProjectionRunner:
    """Keep the projections of one database up to date with its log."""

    def __init__(
        self,
        engine: AsyncEngine,
        settings: Settings | None = None,
        *,
        batch_size: int = 5000,
        snapshot_every: int = 64,
        cache_size: int = 50_000,
    ) -> None:
        self.engine = engine
        self.settings = settings or Settings()
        self.batch_size = batch_size
        self.snapshot_every = snapshot_every
        self.cache_size = cache_size
        self.session_start, self.session_tz = parse_session(self.settings.session_start)
        self._instruments: dict[str, Instrument] = {}
        self._cache: OrderedDict[str, PositionState] = OrderedDict()
        self._cache_key: tuple[int, int, int] | None = None  # (generation, tx, position)

    # ------------------------------------------------------------------ public

    async def catch_up(self, progress: Callable[[int], None] | None = None) -> int:
        """Project every committed event into the serving generation; return how many."""
        async with self.engine.connect() as sa_conn:
            conn = await driver_connection(sa_conn)
            generation = await sql.ensure_serving(conn)
            applied = await self._drain(conn, generation, progress)
            if applied:
                await self.compact_history(conn, generation)
        return applied

    async def follow(
        self, stop: asyncio.Event, *, poll_interval: float = 1.0, on_batch: Callable[[int], None] | None = None
    ) -> None:
        """Project continuously until ``stop`` is set.

        Woken by NOTIFY on every append, polling every ``poll_interval`` seconds as a
        fallback; after a lost connection it reconnects with backoff and re-reads from
        its checkpoint, so nothing is skipped or applied twice.
        """
        backoff = 0.2
        store = EventStore(self.engine)
        while not stop.is_set():
            try:
                async with store.notifications() as woken:
                    backoff = 0.2
                    while not stop.is_set():
                        woken.clear()
                        applied = await self.catch_up()
                        if on_batch and applied:
                            on_batch(applied)
                        if applied:
                            continue
                        waiters = [
                            asyncio.ensure_future(woken.wait()),
                            asyncio.ensure_future(stop.wait()),
                        ]
                        _, pending = await asyncio.wait(
                            waiters, timeout=poll_interval, return_when=asyncio.FIRST_COMPLETED
                        )
                        for task in pending:
                            task.cancel()
            except (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError) as exc:
                log.warning("projection runner lost the database (%s); retrying in %.1fs", exc, backoff)
                self._cache.clear()
                self._cache_key = None
                try:
                    await asyncio.wait_for(stop.wait(), timeout=backoff)
                except TimeoutError:
                    pass
                backoff = min(backoff * 2, 5.0)
            except Exception as exc:  # noqa: BLE001 - SQLAlchemy wraps connection loss
                if "connect" not in str(exc).lower() and "closed" not in str(exc).lower():
                    raise
                log.warning("projection runner lost the database (%s); retrying", exc)
                self._cache.clear()
                self._cache_key = None
                try:
                    await asyncio.wait_for(stop.wait(), timeout=backoff)
                except TimeoutError:
                    pass
                backoff = min(backoff * 2, 5.0)

    async def rebuild(self, progress: Callable[[int], None] | None = None) -> RebuildResult:
        """Fill a new generation from zero, then swap it in atomically.

        The serving generation answers queries until the swap. A rebuild that is killed
        leaves its generation in ``building``; the next rebuild resumes it.
        """
        started = asyncio.get_running_loop().time()
        async with self.engine.connect() as sa_conn:
            conn = await driver_connection(sa_conn)
            await sql.ensure_serving(conn)
            generation = await conn.fetchval(sql.BUILDING)
            if generation is None:
                generation = await conn.fetchval(sql.NEW_BUILDING)
            events = await self._drain(conn, generation, progress)
            async with conn.transaction():
                await sql.lock_checkpoint(conn, generation)
                await self._drain_batch_in_tx(conn, generation)
                await conn.execute(sql.SWAP, generation)
            await self.compact_history(conn, generation)
            for (retired,) in await conn.fetch(sql.RETIRED):
                async with conn.transaction():
                    for statement in sql.DROP_GENERATION_TABLES:
                        await conn.execute(statement, retired)
                    await conn.execute(sql.FORGET_GENERATION, retired)
        self._cache.clear()
        self._cache_key = None
        elapsed = asyncio.get_running_loop().time() - started
        return RebuildResult(generation, events, elapsed)

    async def compact_history(self, conn: asyncpg.Connection, generation: int) -> int:
        """Collapse detail older than the retention window into end-of-day rows."""
        cutoff = datetime.now(UTC) - timedelta(days=self.settings.history_retention_days)
        cutoff_day = trading_day(cutoff, self.session_start, self.session_tz)
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

    async def _drain(
        self, conn: asyncpg.Connection, generation: int, progress: Callable[[int], None] | None
    ) -> int:
        total = 0
        while True:
            async with conn.transaction():
                row = await sql.lock_checkpoint(conn, generation)
                if row is None or row["status"] == "retired":
                    return total  # swapped away under us: the caller re-reads the serving one
                applied = await self._drain_batch_in_tx(conn, generation, locked=row)
            total += applied
            if progress and applied:
                progress(applied)
            if applied == 0:
                return total

    async def _drain_batch_in_tx(
        self, conn: asyncpg.Connection, generation: int, locked: asyncpg.Record | None = None
    ) -> int:
        """Read, fold and write one batch; the caller holds the checkpoint row lock."""
        if locked is None:
            locked = await conn.fetchrow(sql.LOCK_CHECKPOINT, generation)
            assert locked is not None
        checkpoint = Checkpoint(locked["tx_id"], locked["position"])
        key = (generation, checkpoint.tx_id, checkpoint.position)
        if key != self._cache_key:
            # another runner moved this generation on: what we hold may be stale
            self._cache.clear()
        rows = await EventStore.read_light(conn, checkpoint, self.batch_size)
        if not rows:
            self._cache_key = key
            return 0
        if not self._instruments:
            await self._load_instruments(conn)
        batch = _Batch()
        await self._preload(conn, generation, rows)
        for row in rows:
            self._apply_row(row, batch)
        last = rows[-1]
        end = Checkpoint(last.tx_id, last.global_position)
        await self._restate(conn, generation, batch, end)
        await self._write(conn, generation, batch)
        await conn.execute(sql.ADVANCE, generation, end.tx_id, end.position, len(rows))
        self._cache_key = (generation, end.tx_id, end.position)
        self._trim_cache()
        return len(rows)

    async def _load_instruments(self, conn: asyncpg.Connection) -> None:
        for (payload,) in await conn.fetch(sql.INSTRUMENTS):
            self._add_instrument(orjson.loads(payload))

    def _add_instrument(self, payload: dict[str, Any]) -> None:
        tick_size = Decimal(payload["tick_size"])
        self._instruments.setdefault(
            payload["contract"],
            Instrument(Decimal(payload["tick_value"]) / tick_size, tick_size, payload["currency"]),
        )

    async def _preload(
        self, conn: asyncpg.Connection, generation: int, rows: list[LightRow]
    ) -> None:
        wanted = {r.stream for r in rows if r.type in _STREAM_TYPES} - self._cache.keys()
        if not wanted:
            return
        for stream, state in await conn.fetch(sql.LOAD_STATES, generation, list(wanted)):
            self._cache[stream] = PositionState.from_json(orjson.loads(state))

    def _state(self, stream: str, account: str, contract: str) -> PositionState:
        state = self._cache.get(stream)
        if state is None:
            instrument = self._instrument(contract)
            state = new_state(account, contract, instrument.point_value, instrument.tick_size)
            self._cache[stream] = state
        return state

    def _instrument(self, contract: str) -> Instrument:
        instrument = self._instruments.get(contract)
        if instrument is None:
            raise FoldError(
                f"contract: no instrument event defines {contract!r}, so its fills cannot be "
                "valued (ingest rejects such fills; was this event appended directly?)"
            )
        return instrument

    def _apply_row(self, row: LightRow, batch: _Batch) -> None:
        kind = row.type
        if kind == "fill":
            stream = row.stream
            if stream in batch.restate:
                batch.restate[stream] = row.global_position
                return
            p = orjson.loads(row.payload)
            state = self._state(stream, p["account"], p["contract"])
            fill = FillInput(
                exec_id=p["exec_id"],
                side=Side(p["side"]),
                qty=Decimal(p["qty"]),
                price=Decimal(p["price"]),
                fee=Decimal(p["fee"]),
                occurred_at=datetime.fromisoformat(p["occurred_at"]),
                position=row.global_position,
                order_id=p.get("order_id"),
            )
            if not is_in_order(state, fill.occurred_at, fill.position):
                batch.restate[stream] = row.global_position
                return
            if stream not in batch.realized_before:
                batch.realized_before[stream] = (state.realized_fifo, state.realized_wac)
            batch.effects[stream].append(apply_fill(state, fill))
            batch.dirty.add(stream)
            self._cache.move_to_end(stream)
            if state.fill_count % self.snapshot_every == 0:
                batch.snapshots.append(
                    (
                        stream,
                        row.global_position,
                        row.global_position,
                        fill.occurred_at,
                        row.recorded_at,
                        orjson.dumps(state.to_json()).decode(),
                    )
                )
        elif kind in ("bust", "correction"):
            batch.restate[row.stream] = row.global_position
        elif kind == "instrument":
            self._add_instrument(orjson.loads(row.payload))
        # marks, broker reports, reconciliation runs and seals change no position

    async def _restate(
        self, conn: asyncpg.Connection, generation: int, batch: _Batch, end: Checkpoint
    ) -> None:
        if not batch.restate:
            return
        streams = sorted(batch.restate)
        for statement in sql.FORGET_STREAM:
            await conn.execute(statement, generation, streams)
        recorded_at: datetime = await conn.fetchval("SELECT now()")
        for stream in streams:
            events: list[tuple[int, FillRecorded | FillBusted | FillCorrected]] = []
            for position, payload in await conn.fetch(
                sql.STREAM_FILLS_UPTO, stream, str(end.tx_id), end.position
            ):
                event = event_from_stored(orjson.loads(payload))
                assert isinstance(event, FillRecorded | FillBusted | FillCorrected)
                events.append((position, event))
            account, contract = stream.split("/", 1)
            instrument = self._instrument(contract)
            state, effects = replay(
                account, contract, instrument.point_value, instrument.tick_size, events
            )
            self._cache[stream] = state
            batch.effects[stream] = effects
            batch.realized_before[stream] = (Decimal(0), Decimal(0))
            batch.dirty.add(stream)
            # snapshots of the restated stream, valid from this knowledge on
            batch.snapshots = [s for s in batch.snapshots if s[0] != stream]
            # One snapshot of the restated stream: the whole of what is known at this point.
            # (Intermediate replay states would miss fills known here but later in event
            # order, so they could not serve a tail read by log position.)
            if state.last_key is not None:
                batch.snapshots.append(
                    (
                        stream,
                        batch.restate[stream],
                        state.last_key[1],
                        state.last_key[0],
                        recorded_at,
                        orjson.dumps(state.to_json()).decode(),
                    )
                )

    async def _write(self, conn: asyncpg.Connection, generation: int, batch: _Batch) -> None:
        if batch.dirty:
            rows = []
            for stream in sorted(batch.dirty):
                s = self._cache[stream]
                rows.append(
                    (
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
                        orjson.dumps(s.to_json()).decode(),
                    )
                )
            await conn.execute(sql.UPSERT_POSITIONS, generation, *sql.position_columns(rows))
        history: list[tuple[Any, ...]] = []
        daily: dict[tuple[str, date], list[Any]] = {}
        for stream, effects in batch.effects.items():
            if not effects:
                continue
            state = self._cache[stream]
            cum_fifo, cum_wac = batch.realized_before.get(stream, (Decimal(0), Decimal(0)))
            for e in effects:
                cum_fifo += e.realized_fifo
                cum_wac += e.realized_wac
                day = trading_day(e.occurred_at, self.session_start, self.session_tz)
                history.append(
                    sql.history_record(
                        generation,
                        stream,
                        e.position,
                        "detail",
                        state.account,
                        state.contract,
                        e.exec_id,
                        e.occurred_at,
                        day,
                        e.side.value,
                        e.qty,
                        e.price,
                        e.qty_before,
                        e.qty_after,
                        e.realized_fifo,
                        e.realized_wac,
                        cum_fifo,
                        cum_wac,
                        e.fee,
                    )
                )
                bucket = daily.get((stream, day))
                if bucket is None:
                    daily[(stream, day)] = [
                        state.account,
                        state.contract,
                        e.realized_fifo,
                        e.realized_wac,
                        e.fee,
                        1,
                    ]
                else:
                    bucket[2] += e.realized_fifo
                    bucket[3] += e.realized_wac
                    bucket[4] += e.fee
                    bucket[5] += 1
        if history:
            await conn.copy_records_to_table(
                "proj_history", records=history, columns=sql.HISTORY_COLUMNS
            )
        if daily:
            keys = list(daily)
            values = [daily[k] for k in keys]
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
        if batch.snapshots:
            snaps = batch.snapshots
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

    def _trim_cache(self) -> None:
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
