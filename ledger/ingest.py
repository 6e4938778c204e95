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

Dead letters are keyed (:func:`dead_letter_key`: source, line, index and raw bytes), so a
re-ingested file or a message JetStream redelivers after a crash is not dead-lettered
twice: the record found in the dead letter already counts as a duplicate (nothing new is
written), and as ``already_rejected``. A strict run (``strict=True``) appends nothing when
any record is bad: its bad records are dead-lettered, the rest counted as ``withheld``.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice

import asyncpg

from ledger.db import retry_transient
from ledger.errors import IdempotencyConflict, RejectReason
from ledger.sources import InputFormat, Parsed, Rejected, SourceRef, reparse
from ledger.store import (
    BUMP_COUNTERS_SQL,
    DEAD_LETTER_SQL,
    PENDING_REJECTED_SQL,
    RETRIED_SQL,
    EventStore,
    driver_connection,
)

__all__ = ["IngestCounts", "Ingester", "RetryOutcome", "dead_letter_key"]

Item = Parsed | Rejected

_DEAD_LETTER = DEAD_LETTER_SQL
_BUMP = BUMP_COUNTERS_SQL
_PENDING = PENDING_REJECTED_SQL
_RETRIED = RETRIED_SQL
_FORMATS: dict[str | None, InputFormat] = {
    "auto": "auto",
    "native": "native",
    "projectx": "projectx",
    "csv": "csv",
}


def dead_letter_key(ref: SourceRef, raw: bytes) -> bytes:
    """Return the key a dead letter is kept under: the SHA-256 of its source, line,
    index and raw bytes (NUL-separated; a missing line or index is empty).

    A file's record: its path as given, its physical line, its bytes; a JetStream
    message: ``nats:<subject>`` (a subject belongs to one stream), its stream sequence,
    its bytes. So the same record read again (a re-ingest, a redelivery) has the same
    key; migration 0006 computes the same bytes in SQL for older rows.
    """
    parts = (
        ref.source.encode("utf-8", "surrogateescape"),
        b"" if ref.line is None else str(ref.line).encode(),
        b"" if ref.index is None else str(ref.index).encode(),
        raw,
    )
    return hashlib.sha256(b"\x00".join(parts)).digest()


@dataclass
class IngestCounts:
    """What happened to the records of a run.

    ``received = appended + duplicates + rejected + withheld``; ``withheld`` is not 0
    only for a strict run that was refused. ``already_rejected`` of the duplicates are
    records found in the dead letter already (a re-ingest, a redelivery).
    """

    received: int = 0
    appended: int = 0
    duplicates: int = 0
    rejected: int = 0
    by_reason: Counter[str] = field(default_factory=Counter)
    already_rejected: int = 0
    withheld: int = 0

    def add(self, other: IngestCounts) -> None:
        """Add another batch's counts to these."""
        self.received += other.received
        self.appended += other.appended
        self.duplicates += other.duplicates
        self.rejected += other.rejected
        self.by_reason.update(other.by_reason)
        self.already_rejected += other.already_rejected
        self.withheld += other.withheld

    def as_dict(self) -> dict[str, int]:
        """Return the counts under their CLI/JSON names."""
        return {
            "received": self.received,
            "appended": self.appended,
            "duplicates": self.duplicates,
            "rejected": self.rejected,
            "already_rejected": self.already_rejected,
            "withheld": self.withheld,
        }

    def counter_rows(self) -> tuple[list[str], list[int]]:
        """Return (names, values) for the persistent counters table.

        Withheld records (a refused strict run) are not counted: nothing of them was
        written, and a later run receives them.
        """
        names = ["received", "appended", "duplicates", "rejected"]
        values = [
            self.received - self.withheld,
            self.appended,
            self.duplicates,
            self.rejected,
        ]
        if self.already_rejected:
            names.append("already_rejected")
            values.append(self.already_rejected)
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
        self,
        items: Iterable[Item],
        progress: Callable[[int], None] | None = None,
        *,
        strict: bool = False,
    ) -> IngestCounts:
        """Write every item, in batches; return the run's counts.

        With ``strict``, all or nothing: the whole input is checked and appended in one
        transaction, and if any record is bad (rejected now or dead-lettered before),
        that transaction is rolled back, the bad records are dead-lettered and the
        others counted as ``withheld``. A strict run is not retried when the database
        is lost (it could not read its input twice): it fails, having appended nothing.
        """
        if strict:
            return await self._ingest_strict(items, progress)
        total = IngestCounts()
        for batch in _batches(items, self.batch_size):
            total.add(await self._write_retrying(batch))
            if progress:
                progress(len(batch))
        return total

    async def _ingest_strict(
        self, items: Iterable[Item], progress: Callable[[int], None] | None
    ) -> IngestCounts:
        # A store of its own: its instrument cache learns from this transaction, which
        # may be rolled back.
        store = EventStore(self.store.engine)
        total = IngestCounts()
        bad: list[Rejected] = []
        async with self.store.engine.connect() as sa_conn:
            conn = await driver_connection(sa_conn)
            transaction = conn.transaction()
            await transaction.start()
            try:
                for batch in _batches(items, self.batch_size):
                    counts, rejected = await self._append_batch(conn, store, batch)
                    total.add(counts)
                    bad += rejected
                    if progress:
                        progress(len(batch))
                if not bad:
                    names, values = total.counter_rows()
                    await conn.execute(_BUMP, names, values)
            except BaseException:
                await transaction.rollback()
                raise
            if not bad:
                await transaction.commit()
                return total
            await transaction.rollback()
        # Refused: nothing of the input is appended; its bad records are dead-lettered.
        written = IngestCounts()
        for chunk in _batches(bad, self.batch_size):
            written.add(await self._write_retrying(chunk))
        return IngestCounts(
            received=total.received,
            duplicates=written.duplicates,
            rejected=written.rejected,
            by_reason=written.by_reason,
            already_rejected=written.already_rejected,
            withheld=total.received - written.received,
        )

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
        checked = await self._check(conn, self.store, items)
        accepted = [i for i in checked if isinstance(i, Parsed)]
        rejected = [i for i in checked if isinstance(i, Rejected)]
        counts = IngestCounts(received=len(checked))
        if accepted:
            result = await self.store.append_prechecked_on(conn, [p.event for p in accepted])
            counts.appended = result.appended
            counts.duplicates = result.duplicates
        if rejected:
            new, already = await _dead_letter(conn, rejected)
            counts.rejected = len(new)
            counts.by_reason.update(str(r.reason) for r in new)
            counts.duplicates += len(already)
            counts.already_rejected = len(already)
        names, values = counts.counter_rows()
        await conn.execute(_BUMP, names, values)
        assert counts.received == counts.appended + counts.duplicates + counts.rejected
        return counts

    async def _append_batch(
        self, conn: asyncpg.Connection, store: EventStore, items: Sequence[Item]
    ) -> tuple[IngestCounts, list[Rejected]]:
        """Check and append a batch under a savepoint; return its counts and rejects.

        The rejects are returned, not dead-lettered, and counted as ``withheld`` for now.
        """
        while True:
            try:
                async with conn.transaction():  # a savepoint in the caller's transaction
                    checked = await self._check(conn, store, items)
                    accepted = [i for i in checked if isinstance(i, Parsed)]
                    rejected = [i for i in checked if isinstance(i, Rejected)]
                    counts = IngestCounts(received=len(checked), withheld=len(rejected))
                    if accepted:
                        result = await store.append_prechecked_on(conn, [p.event for p in accepted])
                        counts.appended = result.appended
                        counts.duplicates = result.duplicates
                    return counts, rejected
            except IdempotencyConflict as conflict:
                items = [_as_conflict(i, conflict) for i in items]

    @staticmethod
    async def _check(
        conn: asyncpg.Connection, store: EventStore, items: Sequence[Item]
    ) -> list[Item]:
        """Return the items with log-dependent failures turned into rejections."""
        events = [i.event if isinstance(i, Parsed) else None for i in items]
        problems = await store.problems_on(conn, events)
        out: list[Item] = []
        for item, problem in zip(items, problems, strict=True):
            if problem is None or isinstance(item, Rejected):
                out.append(item)
            else:
                out.append(_rejected(item, problem[0], problem[1]))
        return out

    async def retry_rejected(self, *, limit: int = 100_000) -> list[RetryOutcome]:
        """Re-ingest dead-lettered records whose cause may be gone; record each outcome."""
        outcomes: list[RetryOutcome] = []
        async with self.store.engine.connect() as sa_conn:
            conn = await driver_connection(sa_conn)
            rows = await conn.fetch(_PENDING, limit)
        for row_id, source, line, idx, raw, _reason, input_format, csv_header in rows:
            ref = SourceRef(source=source, line=line, index=idx)
            # rows from before migration 0006 have no format: JSON, as they were read
            fmt = _FORMATS.get(input_format, "auto")
            header = tuple(csv_header.split(",")) if csv_header else None
            parsed = reparse(bytes(raw), ref, fmt, header)
            if idx is not None and len(parsed) > idx:
                parsed = [parsed[idx]]
            counts = IngestCounts()
            failure = ""
            async with self.store.engine.connect() as sa_conn:
                conn = await driver_connection(sa_conn)
                try:
                    async with conn.transaction():
                        checked = await self._check(conn, self.store, parsed)
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
                            ["retried.resolved", "retried.appended", "retried.duplicates"],
                            [1, counts.appended, counts.duplicates],
                        )
                    await conn.execute(_RETRIED, row_id, outcome.status, outcome.detail)
            outcomes.append(outcome)
        return outcomes


def _as_conflict(item: Item, conflict: IdempotencyConflict) -> Item:
    if isinstance(item, Parsed) and item.event.event_id == conflict.event_id:
        return _rejected(item, RejectReason.IDEMPOTENCY_CONFLICT, str(conflict))
    return item


def _rejected(item: Parsed, reason: RejectReason, message: str) -> Rejected:
    """Return a parsed record refused after all, keeping how it was read."""
    return Rejected(item.ref, item.raw, reason, message, item.input_format, item.csv_header)


def _batches(items: Iterable[Item], size: int) -> Iterator[list[Item]]:
    it = iter(items)
    while batch := list(islice(it, size)):
        yield batch


async def _dead_letter(
    conn: asyncpg.Connection, rejected: Sequence[Rejected]
) -> tuple[list[Rejected], list[Rejected]]:
    """Dead-letter records not dead-lettered before; return (new, found already)."""
    keys = [dead_letter_key(r.ref, r.raw) for r in rejected]
    rows = await conn.fetch(
        _DEAD_LETTER,
        [r.ref.source for r in rejected],
        [r.ref.line for r in rejected],
        [r.ref.index for r in rejected],
        [r.raw for r in rejected],
        [str(r.reason) for r in rejected],
        [r.message for r in rejected],
        keys,
        [r.input_format for r in rejected],
        [",".join(r.csv_header) if r.csv_header is not None else None for r in rejected],
    )
    inserted = Counter(bytes(row[0]) for row in rows)
    new: list[Rejected] = []
    already: list[Rejected] = []
    for record, key in zip(rejected, keys, strict=True):
        if inserted[key]:
            inserted[key] -= 1
            new.append(record)
        else:
            already.append(record)
    return new, already
