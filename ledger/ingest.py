"""Ingestion: records in, events appended or dead-lettered, counts that always add up.

A batch is written in one transaction: its valid events are appended and its rejected
records are dead-lettered together, so a crash loses neither and a caller (the CLI, the
live consumer) may acknowledge its input once :meth:`Ingester.write_batch` returns.

Beyond what a single record can show, every event is checked against the log by the
store's checks (:mod:`ledger.validation`): its contract must have an ``instrument``
event (``UNKNOWN_INSTRUMENT``), a fill's price must lie on that instrument's tick grid
(``OFF_TICK_PRICE``, never rounded) and its quantity be a whole number of the size
increment (``OFF_SIZE_INCREMENT``); a bust or correction must name an execution the log
has (``UNKNOWN_EXECUTION``). Here a refused event is dead-lettered instead of refusing
the batch; it can be re-ingested once its cause is gone (``ledger rejected --retry``),
through the same checks.

received = appended + duplicates + rejected, for every batch and every run.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import asyncpg

from ledger.db import retry_transient
from ledger.errors import IdempotencyConflict, RejectReason
from ledger.sources import Parsed, Rejected, SourceRef, parse_message
from ledger.store import (
    BUMP_COUNTERS_SQL,
    DEAD_LETTER_SQL,
    PENDING_REJECTED_SQL,
    RETRIED_SQL,
    EventStore,
    driver_connection,
)

__all__ = ["IngestCounts", "Ingester", "RetryOutcome"]

Item = Parsed | Rejected

_DEAD_LETTER = DEAD_LETTER_SQL
_BUMP = BUMP_COUNTERS_SQL
_PENDING = PENDING_REJECTED_SQL
_RETRIED = RETRIED_SQL


@dataclass
class IngestCounts:
    """What happened to the records of a run."""

    received: int = 0
    appended: int = 0
    duplicates: int = 0
    rejected: int = 0
    by_reason: Counter[str] = field(default_factory=Counter)

    def add(self, other: IngestCounts) -> None:
        """Add another batch's counts to these."""
        self.received += other.received
        self.appended += other.appended
        self.duplicates += other.duplicates
        self.rejected += other.rejected
        self.by_reason.update(other.by_reason)

    def as_dict(self) -> dict[str, int]:
        """Return the four counts under their CLI/JSON names."""
        return {
            "received": self.received,
            "appended": self.appended,
            "duplicates": self.duplicates,
            "rejected": self.rejected,
        }

    def counter_rows(self) -> tuple[list[str], list[int]]:
        """Return (names, values) for the persistent counters table."""
        names = ["received", "appended", "duplicates", "rejected"]
        values = [self.received, self.appended, self.duplicates, self.rejected]
        for reason, n in sorted(self.by_reason.items()):
            names.append(f"rejected.{reason}")
            values.append(n)
        return names, values


@dataclass(frozen=True, slots=True)
class RetryOutcome:
    """What ``ledger rejected --retry`` did with one dead-lettered record."""

    id: int
    status: str
    detail: str


class Ingester:
    """Validate records against the log and write them, a batch per transaction."""

    def __init__(self, store: EventStore, *, batch_size: int = 1000) -> None:
        self.store = store
        self.batch_size = batch_size

    async def ingest(
        self, items: Iterable[Item], progress: Callable[[int], None] | None = None
    ) -> IngestCounts:
        """Write every item, in batches; return the run's counts."""
        total = IngestCounts()
        batch: list[Item] = []
        for item in items:
            batch.append(item)
            if len(batch) >= self.batch_size:
                total.add(await self._write_retrying(batch))
                if progress:
                    progress(len(batch))
                batch = []
        if batch:
            total.add(await self._write_retrying(batch))
            if progress:
                progress(len(batch))
        return total

    async def _write_retrying(self, items: Sequence[Item]) -> IngestCounts:
        """:meth:`write_batch`, retried when the database is lost (a restart, a failover).

        A batch whose commit was not acknowledged is written again: its events carry
        their ids, so whatever did commit comes back as duplicates, never twice in the
        log. Bounded and logged (``LEDGER_RECONNECT_TIMEOUT``); past it, one clear error.
        """

        # (nothing to forget between tries: the store caches only committed instruments)
        return await retry_transient(
            lambda: self.write_batch(items),
            f"writing a batch of {len(items)} records",
            engine=self.store.engine,
        )

    async def write_batch(self, items: Sequence[Item]) -> IngestCounts:
        """Append the valid events and dead-letter the rest, in one transaction."""
        async with self.store.engine.connect() as sa_conn:
            conn = await driver_connection(sa_conn)
            while True:
                try:
                    async with conn.transaction():
                        return await self._write(conn, items)
                except IdempotencyConflict as conflict:
                    items = [_as_conflict(i, conflict) for i in items]

    async def _write(self, conn: asyncpg.Connection, items: Sequence[Item]) -> IngestCounts:
        checked = await self._check(conn, items)
        accepted = [i for i in checked if isinstance(i, Parsed)]
        rejected = [i for i in checked if isinstance(i, Rejected)]
        counts = IngestCounts(received=len(checked))
        if accepted:
            result = await self.store.append_prechecked_on(conn, [p.event for p in accepted])
            counts.appended = result.appended
            counts.duplicates = result.duplicates
        if rejected:
            await conn.execute(
                _DEAD_LETTER,
                [r.ref.source for r in rejected],
                [r.ref.line for r in rejected],
                [r.ref.index for r in rejected],
                [r.raw for r in rejected],
                [str(r.reason) for r in rejected],
                [r.message for r in rejected],
            )
            counts.rejected = len(rejected)
            counts.by_reason.update(str(r.reason) for r in rejected)
        names, values = counts.counter_rows()
        await conn.execute(_BUMP, names, values)
        assert counts.received == counts.appended + counts.duplicates + counts.rejected
        return counts

    async def _check(self, conn: asyncpg.Connection, items: Sequence[Item]) -> list[Item]:
        """Return the items with log-dependent failures turned into rejections."""
        events = [i.event if isinstance(i, Parsed) else None for i in items]
        problems = await self.store.problems_on(conn, events)
        out: list[Item] = []
        for item, problem in zip(items, problems, strict=True):
            if problem is None or isinstance(item, Rejected):
                out.append(item)
            else:
                out.append(Rejected(item.ref, item.raw, problem[0], problem[1]))
        return out

    async def retry_rejected(self, *, limit: int = 100_000) -> list[RetryOutcome]:
        """Re-ingest dead-lettered records whose cause may be gone; record each outcome."""
        outcomes: list[RetryOutcome] = []
        async with self.store.engine.connect() as sa_conn:
            conn = await driver_connection(sa_conn)
            rows = await conn.fetch(_PENDING, limit)
        for row_id, source, line, idx, raw, _reason in rows:
            ref = SourceRef(source=source, line=line, index=idx)
            parsed = parse_message(bytes(raw), ref)
            if idx is not None and len(parsed) > idx:
                parsed = [parsed[idx]]
            counts = IngestCounts()
            failure = ""
            async with self.store.engine.connect() as sa_conn:
                conn = await driver_connection(sa_conn)
                try:
                    async with conn.transaction():
                        checked = await self._check(conn, parsed)
                        still = [c for c in checked if isinstance(c, Rejected)]
                        if still:
                            failure = f"{still[0].reason}: {still[0].message}"
                        else:
                            result = await self.store.append_prechecked_on(
                                conn, [c.event for c in checked if isinstance(c, Parsed)]
                            )
                            counts.appended, counts.duplicates = result.appended, result.duplicates
                except IdempotencyConflict as exc:
                    failure = f"{RejectReason.IDEMPOTENCY_CONFLICT}: {exc}"
                async with conn.transaction():
                    if failure:
                        outcome = RetryOutcome(row_id, "pending", f"still rejected: {failure}")
                    else:
                        outcome = RetryOutcome(
                            row_id,
                            "resolved",
                            f"appended {counts.appended}, duplicates {counts.duplicates}",
                        )
                        await conn.execute(
                            _BUMP,
                            ["retried.appended", "retried.duplicates"],
                            [counts.appended, counts.duplicates],
                        )
                    await conn.execute(_RETRIED, row_id, outcome.status, outcome.detail)
            outcomes.append(outcome)
        return outcomes


def _as_conflict(item: Item, conflict: IdempotencyConflict) -> Item:
    if isinstance(item, Parsed) and item.event.event_id == conflict.event_id:
        return Rejected(item.ref, item.raw, RejectReason.IDEMPOTENCY_CONFLICT, str(conflict))
    return item
