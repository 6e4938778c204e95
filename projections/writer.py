"""Writing what the fold produced: pages, then positions, daily P&L and checkpoint.

One transaction holds the generation's checkpoint row (``FOR UPDATE``) from its first
page to its commit and checks it still stands where the drain started, so two runners
never apply anything twice: the second finds the checkpoint moved (:class:`Conflict`),
drops what it folded and starts again from the new checkpoint. Each page's history,
snapshots and faults are written as soon as it is folded (COPY, while the next page
folds); the positions and daily P&L of every stream the transaction touched, and the
new checkpoint, are written once, at its commit. A rebuild worker keeps a checkpoint of
its own (:mod:`projections.partition` overrides the three checkpoint methods).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any

import asyncpg

from ledger.pgarray import text_array, value_array
from ledger.store import Checkpoint
from projections import store as sql
from projections.cache import StreamCache
from projections.history import HistoryRow, compact
from projections.pagefold import Page, PositionColumns

__all__ = ["Conflict", "Flush", "PageWriter", "Retired"]


class Conflict(Exception):
    """Another runner moved the checkpoint since we read it: start again from it."""


class Retired(Exception):
    """The generation was swapped away (or is gone): nothing more to do on it."""


@dataclass(slots=True)
class Flush:
    """What one transaction writes besides its pages' rows."""

    start: Checkpoint
    end: Checkpoint = field(default_factory=Checkpoint)  # of its last page
    events: int = 0
    dirty: set[str] = field(default_factory=set)
    # stream -> day -> [account, contract, realized fifo, realized wac, fees, fills]
    daily: dict[str, dict[date, list[Any]]] = field(default_factory=dict)
    tx: Any = None  # the asyncpg transaction, once the first page is written


class PageWriter(StreamCache):
    """Write folded pages inside a transaction that holds the checkpoint; commit."""

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

    async def _begin(self, conn: asyncpg.Connection, generation: int, start: Checkpoint) -> Any:
        """Open a transaction holding the checkpoint row, which must still be at ``start``."""
        tx = conn.transaction()
        await tx.start()
        try:
            locked = await self._lock_checkpoint(conn, generation)
            if locked is None or locked["status"] == "retired":
                raise Retired
            if (locked["tx_id"], locked["position"]) != (start.tx_id, start.position):
                raise Conflict
        except BaseException:
            await tx.rollback()
            raise
        return tx

    async def _write(self, conn: asyncpg.Connection, generation: int, page: Page) -> None:
        """Write one page's rows inside the open transaction (not its positions)."""
        if page.faults or page.healed:
            await self._write_faults(conn, generation, page)
        if page.forget:
            streams = text_array(list(page.forget))
            days = value_array([f[0] for f in page.forget.values()])
            await conn.execute(
                sql.FORGET_HISTORY,
                generation,
                streams,
                days,
                value_array([f[1] for f in page.forget.values()]),
                value_array([f[2] for f in page.forget.values()]),
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
                text_array([s[0] for s in snaps]),
                value_array([s[1] for s in snaps]),
                value_array([s[2] for s in snaps]),
                value_array([s[3] for s in snaps]),
                value_array([s[4] for s in snaps]),
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

    async def _write_page(self, conn: asyncpg.Connection, generation: int, page: Page) -> int:
        await self._write(conn, generation, page)
        return 0

    async def _write_and_commit(
        self,
        conn: asyncpg.Connection,
        generation: int,
        page: Page,
        flush: Flush,
        positions: PositionColumns,
        progress: Callable[[int], None] | None,
    ) -> int:
        await self._write(conn, generation, page)
        return await self._commit(conn, generation, flush, positions, progress)

    async def _commit(
        self,
        conn: asyncpg.Connection,
        generation: int,
        flush: Flush,
        positions: PositionColumns,
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
        flush: Flush,
        positions: PositionColumns,
        end: Checkpoint,
    ) -> None:
        if positions[0]:  # (the streams: any at all)
            await conn.execute(sql.UPSERT_POSITIONS, generation, *sql.position_params(positions))
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
                    text_array([k[0] for k in keys]),
                    value_array([k[1] for k in keys]),
                    text_array([v[0] for v in values]),
                    text_array([v[1] for v in values]),
                    value_array([v[2] for v in values]),
                    value_array([v[3] for v in values]),
                    value_array([v[4] for v in values]),
                    value_array([v[5] for v in values]),
                )
        await self._advance(conn, generation, end, flush.events)

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
