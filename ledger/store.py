"""The event store: append, read a stream, read the whole log gap-free, wait for appends.

This module owns the SQL of the write side's tables (``events``, ``streams``,
``counters``, ``rejected``), built once: the append and the gap-free read, the dead
letters and counters that ingestion and the live feed write, and the few reads of the
log that the read side's services (trail, explain, reconcile, report, stats), the
integrity checks (chains and seals) and the time-travel queries need. The hot paths
(append and the gap-free read) run on the asyncpg connection under SQLAlchemy's pool,
because a batch of 1,000 events must cost a handful of round trips, not 1,000.

Appending a batch, in one transaction:

1. lock the head row of every stream in the batch (``FOR UPDATE``, in stream order so
   that two batches never deadlock; ``NOWAIT`` when the caller gave an expected version,
   so a conflict raises at once instead of waiting on a lock);
2. check expected versions, then look the batch's event ids up: an id already stored
   with the same content is a duplicate (reported with its original position), with
   other content an ``IdempotencyConflict`` that aborts the whole batch;
3. insert the new events with their stream versions and hash chain, and move the heads.

Gap-free reading: every row carries its writing transaction's id (``xid8``); a reader
takes only rows whose transaction is older than the oldest one still running and orders
by (transaction id, position), so an event that commits late is read late, never skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import struct
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple, TypeVar

import asyncpg
import orjson
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ledger.errors import ConcurrencyError, EventRejected, IdempotencyConflict
from ledger.events import Event, InstrumentDefined, encode_content, fill_event_id
from ledger.schema import NOTIFY_CHANNEL
from ledger.validation import Problem, contract_of, find_problems, wanted_executions

T = TypeVar("T")

__all__ = [
    "BUMP_COUNTERS_SQL",
    "DEAD_LETTER_SQL",
    "GENESIS_HASH",
    "INSTRUMENTS_SQL",
    "KNOWN_IDS_SQL",
    "LAST_ERROR_SQL",
    "PENDING_REJECTED_SQL",
    "READ_LIGHT_SQL",
    "RETRIED_SQL",
    "TX_AT_SQL",
    "AppendResult",
    "Checkpoint",
    "EventStore",
    "LightRow",
    "StoredEvent",
    "UncheckedEventStore",
    "broker_pnl_rows",
    "broker_report_rows",
    "chain_hash",
    "checkpoint_at",
    "count_events",
    "dead_letter_statuses",
    "encode_event",
    "ensure_log_statistics",
    "fill_streams",
    "has_fills_by",
    "last_recorded_at",
    "latest_reconciliation",
    "listen_for_appends",
    "log_lag",
    "mark_price_at",
    "read_ahead",
    "read_counters",
    "reconciled_streams",
    "reconciliation_run",
    "reconciliation_runs",
    "rejected_rows",
    "stream_fill_rows",
    "streams_with_fills",
]

GENESIS_HASH = b"\x00" * 32


class Checkpoint(NamedTuple):
    """A reader's place in the log: (transaction id, global position) of the last read."""

    tx_id: int = 0
    position: int = 0


_START = Checkpoint()


class StoredEvent(NamedTuple):
    """One row of the log: immutable, its fields in the order the log's reads select them.

    A NamedTuple rather than a frozen dataclass: a read builds one per row, and a frozen
    dataclass's ``__init__`` (an ``object.__setattr__`` per field) cost about as much as
    decoding the row (``_events_of``).
    """

    global_position: int
    stream: str
    stream_version: int
    event_id: str
    type: str
    schema_version: int
    payload: dict[str, Any]
    occurred_at: datetime
    recorded_at: datetime
    tx_id: int
    causation_id: str | None
    correlation_id: str | None
    content_digest: bytes
    hash: bytes


@dataclass(frozen=True, slots=True)
class AppendResult:
    """What an append did: one position per input event, in input order."""

    positions: tuple[int, ...]
    appended: int
    duplicates: int
    duplicate_flags: tuple[bool, ...]


class _Encoded(NamedTuple):  # (a frozen dataclass's __init__ cost ~1 us an event)
    event_id: str
    stream: str
    type: str
    schema_version: int
    payload_json: str
    occurred_at: datetime | None
    digest: bytes


def encode_event(event: Event) -> tuple[str, bytes]:
    """Return an event's payload JSON (decimals as written) and its content digest."""
    payload, canonical = encode_content(event)
    return payload, hashlib.sha256(event.stream.encode() + b"\n" + canonical).digest()


def chain_hash(previous: bytes, stream_version: int, event_id: str, digest: bytes) -> bytes:
    """Return an event's link in its stream's hash chain."""
    return hashlib.sha256(
        previous
        + struct.pack(">q", stream_version)
        + bytes.fromhex(event_id.replace("-", ""))
        + digest
    ).digest()


# Lock the batch's stream heads (in stream order) and look its event ids up, in one trip.
# The statement's snapshot is taken before it waits on a lock: a head that another
# writer moved meanwhile is returned as locked (its newest version) but that writer's
# events are not in the snapshot. The last column says so (the version the snapshot
# sees differs), and then the ids are looked up again (_FIND), after the lock.
_LOCK_AND_FIND = """
WITH heads AS (
    SELECT stream, version, last_hash FROM streams
    WHERE stream = ANY($1::text[]) ORDER BY stream FOR UPDATE{nowait}
)
SELECT true, h.stream, h.version, h.last_hash, NULL::bigint, NULL::text,
       h.version IS DISTINCT FROM (SELECT s.version FROM streams AS s WHERE s.stream = h.stream)
FROM heads AS h
UNION ALL
SELECT false, event_id::text, NULL::int, content_digest, global_position, stream, false
FROM events WHERE event_id = ANY($2::uuid[])
"""
_FIND = """
SELECT false, event_id::text, NULL::int, content_digest, global_position, stream, false
FROM events WHERE event_id = ANY($1::uuid[])
"""
_LOCK_AND_FIND_WAIT = _LOCK_AND_FIND.format(nowait="")
_LOCK_AND_FIND_NOWAIT = _LOCK_AND_FIND.format(nowait=" NOWAIT")
_LOCK_TIMEOUT = "SET LOCAL lock_timeout = '100ms'"
_CREATE_HEADS = """
INSERT INTO streams (stream, version, last_hash)
SELECT s, 0, $2::bytea FROM unnest($1::text[]) AS s
ON CONFLICT (stream) DO NOTHING
"""
# Insert the new events and move their streams' heads, in one trip.
_INSERT_AND_MOVE = """
WITH inserted AS (
    INSERT INTO events (stream, stream_version, event_id, type, schema_version, payload,
                        occurred_at, causation_id, correlation_id, content_digest, hash)
    SELECT s, v, e, t, sv, p::jsonb, coalesce(o, now()), $8::uuid, $9::uuid, d, h
    FROM unnest($1::text[], $2::int[], $3::uuid[], $4::text[], $5::int2[], $6::text[],
                $7::timestamptz[], $10::bytea[], $11::bytea[]) AS x(s, v, e, t, sv, p, o, d, h)
    RETURNING event_id::text, global_position
), moved AS (
    UPDATE streams SET version = x.v, last_hash = x.h
    FROM unnest($12::text[], $13::int[], $14::bytea[]) AS x(s, v, h)
    WHERE streams.stream = x.s AND streams.stream = ANY($12::text[])
)
SELECT event_id, global_position FROM inserted
"""
# One event, one statement, no transaction around it (a statement is atomic on its own):
# move the stream's head (created at version 1 if new; otherwise locked, as the
# batches lock it, and moved on from its newest committed version), computing the
# event's link in the hash chain from it in SQL (what chain_hash computes: SHA-256 of
# the previous link, the version as 8 big-endian bytes, the id's 16 bytes and the
# content digest), and insert the event with them. An id already in the log fails the
# whole statement on uq_events_event_id, so nothing moves; the caller then takes the
# batch path, which reports the duplicate (or refuses it: other content).
_APPEND_ONE = """
WITH head AS (
    INSERT INTO streams AS s (stream, version, last_hash)
    VALUES ($1, 1, sha256($10::bytea || int8send(1::int8) || uuid_send($2::uuid) || $9::bytea))
    ON CONFLICT (stream) DO UPDATE
    SET version = s.version + 1,
        last_hash = sha256(s.last_hash || int8send(s.version::int8 + 1) || uuid_send($2::uuid)
                           || $9::bytea)
    RETURNING version, last_hash
), inserted AS (
    INSERT INTO events (stream, stream_version, event_id, type, schema_version, payload,
                        occurred_at, causation_id, correlation_id, content_digest, hash)
    SELECT $1, h.version, $2::uuid, $3, $4::int2, $5::jsonb, coalesce($6::timestamptz, now()),
           $7::uuid, $8::uuid, $9::bytea, h.last_hash
    FROM head AS h
    RETURNING global_position
)
SELECT global_position FROM inserted
"""
# Below this many new events a batch goes through _INSERT_AND_MOVE (one round trip);
# from it on through COPY, which costs three round trips but a fraction per row.
_COPY_AT_LEAST = 32
# While PostgreSQL locks the heads, an append encodes its events this many at a time.
_ENCODE_STEP = 32
_COPY_COLUMNS = (
    "stream",
    "stream_version",
    "event_id",
    "type",
    "schema_version",
    "payload",
    "occurred_at",
    "causation_id",
    "correlation_id",
    "content_digest",
    "hash",
)
_MOVE_HEADS_AND_READ_BACK = """
WITH moved AS (
    UPDATE streams SET version = x.v, last_hash = x.h
    FROM unnest($1::text[], $2::int[], $3::bytea[]) AS x(s, v, h)
    WHERE streams.stream = x.s AND streams.stream = ANY($1::text[])
)
SELECT global_position FROM events WHERE tx_id = pg_current_xact_id()
ORDER BY tx_id DESC, global_position DESC LIMIT $4
"""
_HEADS_SEEN_MAX = 1_000_000
_COLUMNS = """global_position, stream, stream_version, event_id::text, type, schema_version,
payload::text, occurred_at, recorded_at, tx_id::text::bigint, causation_id::text,
correlation_id::text, content_digest, hash"""
_READ_STREAM = f"""
SELECT {_COLUMNS} FROM events WHERE stream = $1 AND stream_version > $2
ORDER BY stream_version LIMIT $3
"""
# Only transactions older than the oldest still running are complete: rows from a
# transaction that commits later get a position below ours but are read after it.
# ORDER BY names the table's columns: the select list casts tx_id under the same name,
# and ordering by that cast would sort the whole remaining log instead of walking the
# (tx_id, global_position) index up to the LIMIT.
_READ_ALL = f"""
SELECT {_COLUMNS} FROM events
WHERE (tx_id, global_position) > ($1::text::xid8, $2::bigint)
  AND tx_id < pg_snapshot_xmin(pg_current_snapshot())
ORDER BY events.tx_id, events.global_position LIMIT $3
"""
# Every instrument definition, found through the heads table (a few thousand rows) and
# the (stream, stream_version) index: filtering the log by type would scan all of it
# (4.9 s at 2.3M events, on every consumer start). A contract's stream also holds its
# marks; its one definition (its id is the contract's) is usually its first event.
INSTRUMENTS_SQL = """
SELECT e.payload::text FROM streams AS s
CROSS JOIN LATERAL (
    SELECT payload FROM events
    WHERE events.stream = s.stream AND events.type = 'instrument'
    ORDER BY stream_version LIMIT 1
) AS e
WHERE s.stream LIKE 'instrument/%'
"""
READ_LIGHT_SQL = """
SELECT global_position, tx_id::text::bigint, stream, type, payload::text, recorded_at
FROM events
WHERE (tx_id, global_position) > ($1::text::xid8, $2::bigint)
  AND tx_id < pg_snapshot_xmin(pg_current_snapshot())
ORDER BY events.tx_id, events.global_position LIMIT $3
"""


_new_tuple = tuple.__new__  # builds a NamedTuple from its fields without its __new__


def _events_of(rows: list[asyncpg.Record]) -> list[StoredEvent]:
    """Return the log's rows (``_COLUMNS``, in order) as StoredEvents, payloads decoded."""
    loads = orjson.loads
    return [
        _new_tuple(
            StoredEvent,
            (
                r[0],
                r[1],
                r[2],
                r[3],
                r[4],
                r[5],
                loads(r[6]),
                r[7],
                r[8],
                r[9],
                r[10],
                r[11],
                r[12],
                r[13],
            ),
        )
        for r in rows
    ]


class LightRow(NamedTuple):
    """A log row as the projection runner needs it: payload still JSON text."""

    global_position: int
    tx_id: int
    stream: str
    type: str
    payload: str
    recorded_at: datetime


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector while a page of rows is read and decoded.

    A page allocates a few objects a row (asyncpg's record, the payload's dict, the
    event) that form no cycle and live on with the page; with the collector's default
    thresholds they set off a collection every 700 allocations, each one scanning the
    process's older objects too: a read + simple fold took 13.4 -> 10.1 us an event
    paused, in a process whose heap is not frozen (with a frozen heap, as ``bench_peer``
    has, no difference). Paused, they are counted, and the first allocation after the
    page starts one collection. Other tasks that run while the fetch awaits run with
    the collector paused too, for the page's few milliseconds. Only a collector enabled
    on entry is paused and re-enabled: a caller's own ``gc.disable()`` stands.
    """
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


@contextlib.contextmanager
def fewer_collections(*, freeze: bool = False) -> Iterator[Callable[[], None]]:
    """Run the cyclic garbage collector less often while a long-running loop allocates.

    The projection runner's drain and the live consumer allocate and free millions of
    small objects (rows, parsed records, effects, history lines) that never form
    cycles; at the default thresholds they set off a collection every 700 allocations,
    and every tenth of those rescans the middle generation (about 16% of a rebuild's
    time, 17% of the consumer's). The thresholds are restored afterwards.

    With ``freeze`` what the process holds on entry (its modules, pools and caches,
    built at start-up and kept for good) is moved out of the collector's sight
    (``gc.freeze``) and given back to it on exit, unless something was frozen before:
    the full collections that still come no longer walk it. ``ledger consume``:
    9,211-10,038 -> 10,958-11,023 events/s end to end (``bench_consume --no-project``,
    alternating runs, with the thresholds alone in between).

    Yields ``settle``: called between units of work (a page), it moves what is alive
    then out of the collector's sight as well, so that the young collections that
    follow walk only what the next unit allocates, not the states, journal and caches
    that earlier ones left behind. Objects moved are still freed when their last
    reference goes; a cycle among them waits for the exit, where they are given back.
    A 250k-event rebuild spent 0.63 s in the collector without, 0.12 s with it
    (``gc.callbacks``). Settling needs the frozen generation to itself: it does
    nothing without ``freeze`` or under a caller's own freeze.
    """
    before = gc.get_threshold()
    thaw = freeze and gc.get_freeze_count() == 0  # (a caller's own freeze stands)
    gc.set_threshold(100_000, 50, 1000)
    if freeze:
        gc.freeze()
    try:
        yield gc.freeze if thaw else _no_settle
    finally:
        if thaw:
            gc.unfreeze()
        gc.set_threshold(*before)


def _no_settle() -> None:
    """``fewer_collections``' settle where it may not freeze."""


def light_rows(rows: list[asyncpg.Record]) -> list[LightRow]:
    """Return rows of ``READ_LIGHT_SQL``'s columns as LightRows."""
    return [_new_tuple(LightRow, r) for r in rows]


async def driver_connection(conn: AsyncConnection) -> asyncpg.Connection:
    """Return the asyncpg connection under a SQLAlchemy async connection."""
    raw = await conn.get_raw_connection()
    return raw.driver_connection


async def read_ahead(
    first: Awaitable[T], following: Callable[[T], Awaitable[T] | None]
) -> AsyncGenerator[T, None]:
    """Yield pages while the next one is read: ``first`` reads the first page,
    ``following(page)`` starts the read of the page after ``page`` (None: there is none).

    The next read goes out before a page is handed over, so PostgreSQL reads while the
    caller works; a caller that stops early (``aclose``) cancels the read under way,
    and its outcome is retrieved (never an unretrieved task error).
    """
    pending: asyncio.Future[T] | None = asyncio.ensure_future(first)
    try:
        while pending is not None:
            page = await pending
            after = following(page)
            pending = None if after is None else asyncio.ensure_future(after)
            if pending is not None:
                await asyncio.sleep(0)  # the read goes out before the caller's work
            yield page
    finally:
        if pending is not None:
            pending.cancel()
            with contextlib.suppress(BaseException):
                await pending


@asynccontextmanager
async def listen_for_appends(
    engine: AsyncEngine,
) -> AsyncIterator[tuple[asyncio.Event, asyncpg.Connection]]:
    """LISTEN for appends on a connection of its own; yield the wake-up (set whenever
    an append commits) and the connection."""
    woken = asyncio.Event()

    def _on_notify(*_: object) -> None:
        woken.set()

    async with engine.connect() as sa_conn:
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


# A log never analyzed yet (reltuples < 0) past a megabyte: without statistics the
# planner guesses a third of the table beyond any checkpoint and answers every page of
# the gap-free read by sorting the whole rest of the log (measured: 326 ms a page of
# 5,000 at 40,000 events, against 26 ms by the index once analyzed). Autovacuum fixes
# that within a minute or so; a reader starting right after a bulk ingest cannot wait.
_LOG_STATISTICS = """
SELECT reltuples >= 0, pg_relation_size(oid) > 1048576 FROM pg_class
WHERE oid = 'events'::regclass
"""


async def ensure_log_statistics(conn: asyncpg.Connection) -> bool:
    """Give the log its first statistics if it has none and is big enough to need them.

    Returns whether the log has statistics now: not while it is too small to need
    them, nor when this role does not own the table (autovacuum analyzes it later).
    """
    analyzed, big = await conn.fetchrow(_LOG_STATISTICS)
    if analyzed or not big:
        return bool(analyzed)
    try:
        await conn.execute("ANALYZE events")
    except asyncpg.InsufficientPrivilegeError:
        return False
    return True


class UncheckedEventStore:
    """Append to and read from the PostgreSQL event log, *without* the log checks.

    Unchecked: :meth:`append` writes whatever well-formed events it is given, even a
    fill off its instrument's tick grid or a bust of an execution the log never had,
    which no projection can fold. Use :class:`EventStore`, which refuses those; this
    class is for the store's own mechanics and for tests that must write such events.
    """

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        # streams whose head row existed at some point (a hint: _append checks it)
        self._heads_seen: set[str] = set()

    @asynccontextmanager
    async def _driver(self) -> AsyncIterator[asyncpg.Connection]:
        async with self.engine.connect() as conn:
            yield await driver_connection(conn)

    async def append(
        self,
        events: Sequence[Event],
        *,
        expected_versions: Mapping[str, int] | None = None,
        causation_id: str | None = None,
        correlation_id: str | None = None,
    ) -> AppendResult:
        """Append a batch of events to one or many streams, all or nothing.

        Args:
            events: the events, in the order they should take in their streams.
            expected_versions: per stream, the version the caller last saw (0 for a new
                stream); a stream at another version raises before anything is written.
            causation_id: the id of the event or command that caused this batch.
            correlation_id: the id that ties this batch to a wider operation.

        Returns:
            One global position per input event; a duplicate reports the original's.

        Raises:
            ConcurrencyError: a stream was not at its expected version, or another
                writer holds it while an expected version was given.
            IdempotencyConflict: an event id is already stored with other content.
        """
        if not events:
            return AppendResult((), 0, 0, ())
        if len(events) == 1 and expected_versions is None:
            done = await self._append_one(events[0], causation_id, correlation_id)
            if done is not None:
                return done
        async with self._driver() as conn, conn.transaction():
            return await self._append(conn, events, expected_versions, causation_id, correlation_id)

    async def _append_one(
        self, event: Event, causation_id: str | None, correlation_id: str | None
    ) -> AppendResult | None:
        """Append one new event in one round trip (``_APPEND_ONE``); return None, having
        written nothing, when its id is already in the log (the batch path reports it).

        The batch path takes four: BEGIN, lock the head and look the id up, insert,
        COMMIT. The result is the same row, hash link included (tests/integration/
        test_store.py checks it against ``chain_hash``).
        """
        e = _encode(event, event.event_id)
        async with self._driver() as conn:
            try:
                position: int = await conn.fetchval(
                    _APPEND_ONE,
                    e.stream,
                    e.event_id,
                    e.type,
                    e.schema_version,
                    e.payload_json,
                    e.occurred_at,
                    causation_id,
                    correlation_id,
                    e.digest,
                    GENESIS_HASH,
                )
            except asyncpg.UniqueViolationError:
                return None
        self._saw_heads((e.stream,))
        return AppendResult((position,), 1, 0, (False,))

    def _saw_heads(self, streams: Iterable[str]) -> None:
        """Remember that these streams' head rows exist (a bounded hint: see _lock_heads)."""
        if len(self._heads_seen) > _HEADS_SEEN_MAX:
            self._heads_seen.clear()
        self._heads_seen.update(streams)

    async def append_on(self, conn: asyncpg.Connection, events: Sequence[Event]) -> AppendResult:
        """Append inside a transaction the caller already holds on ``conn``."""
        if not events:
            return AppendResult((), 0, 0, ())
        return await self._append(conn, events, None, None, None)

    async def _append(
        self,
        conn: asyncpg.Connection,
        events: Sequence[Event],
        expected_versions: Mapping[str, int] | None,
        causation_id: str | None,
        correlation_id: str | None,
    ) -> AppendResult:
        ids_of = [e.event_id for e in events]
        names = sorted({e.stream for e in events})
        ids = list(dict.fromkeys(ids_of))
        # The heads are locked and the ids looked up while this task encodes the
        # payloads: PostgreSQL's work and ours overlap (the lock task owns ``conn``
        # until it is awaited; nothing else here touches it). A step at a time, yielding
        # between steps: the lock takes up to three queries (heads first seen are
        # created first), each sent once the reply before it is read; encoding the whole
        # batch in one go held the second back until it was done, so that the lock
        # itself no longer overlapped anything.
        locking = asyncio.ensure_future(self._lock_heads(conn, names, ids, expected_versions))
        encoded: list[_Encoded] = []
        try:
            for start in range(0, len(events), _ENCODE_STEP):
                await asyncio.sleep(0)  # let the lock's queries and replies through
                end = start + _ENCODE_STEP
                encoded += map(_encode, events[start:end], ids_of[start:end])
                if locking.done():
                    break
        finally:
            rows = await locking
        encoded += map(_encode, events[len(encoded) :], ids_of[len(encoded) :])
        # One id, one outcome: within a batch the second copy is a duplicate of the first.
        first: dict[str, int] = {}
        for i, e in enumerate(encoded):
            j = first.setdefault(e.event_id, i)
            if j != i and encoded[j].digest != e.digest:
                raise IdempotencyConflict(e.event_id, e.stream, "twice in one batch")
        version = {r[1]: r[2] for r in rows if r[0]}
        last_hash = {r[1]: bytes(r[3]) for r in rows if r[0]}
        self._saw_heads(version)
        for stream, expected in (expected_versions or {}).items():
            actual = version.get(stream, 0)
            if actual != expected:
                raise ConcurrencyError(stream, expected, actual)
        existing = {r[1]: (bytes(r[3]), r[4], r[5]) for r in rows if not r[0]}
        positions: list[int | None] = [None] * len(encoded)
        flags = [False] * len(encoded)
        new: list[tuple[int, _Encoded, int, bytes]] = []
        for i, e in enumerate(encoded):
            if e.event_id in existing:
                digest, position, stream = existing[e.event_id]
                if digest != e.digest:
                    raise IdempotencyConflict(e.event_id, stream)
                positions[i] = position
                flags[i] = True
            elif first[e.event_id] != i:
                flags[i] = True
            else:
                v = version[e.stream] + 1
                h = chain_hash(last_hash[e.stream], v, e.event_id, e.digest)
                version[e.stream] = v
                last_hash[e.stream] = h
                new.append((i, e, v, h))
        if new:
            touched = sorted({e.stream for _, e, _, _ in new})
            heads = (touched, [version[s] for s in touched], [last_hash[s] for s in touched])
            if len(new) >= _COPY_AT_LEAST and all(e.occurred_at is not None for _, e, _, _ in new):
                written = await _copy_rows(conn, new, heads, causation_id, correlation_id)
            else:
                written = await _insert_rows(conn, new, heads, causation_id, correlation_id)
            for (i, _, _, _), position in zip(new, written, strict=True):
                positions[i] = position
        for i, e in enumerate(encoded):
            if positions[i] is None:  # an in-batch duplicate of a new event
                positions[i] = positions[first[e.event_id]]
        resolved = tuple(p for p in positions if p is not None)
        return AppendResult(resolved, len(new), len(encoded) - len(new), tuple(flags))

    async def _lock_heads(
        self,
        conn: asyncpg.Connection,
        names: list[str],
        ids: list[str],
        expected_versions: Mapping[str, int] | None,
    ) -> list[asyncpg.Record]:
        """Lock the heads of ``names`` (in order) and look ``ids`` up: see _LOCK_AND_FIND.

        With expected versions a busy head fails fast (NOWAIT, lock timeout), and new
        streams are created after the existing heads are locked. Without, every head
        not seen before is created first, then all are locked, each in stream order: a
        writer holds no head while it creates, so two writers cannot deadlock. Heads
        are never removed, so a stream seen before needs no create, unless its creator
        rolled back: the heads still missing are created and locked last.
        """
        lock = _LOCK_AND_FIND_NOWAIT if expected_versions else _LOCK_AND_FIND_WAIT
        try:
            if expected_versions:
                await conn.execute(_LOCK_TIMEOUT)
            else:
                unknown = [s for s in names if s not in self._heads_seen]
                if unknown:
                    await conn.execute(_CREATE_HEADS, unknown, GENESIS_HASH)
            rows: list[asyncpg.Record] = await conn.fetch(lock, names, ids)
            missing = sorted(set(names) - {r[1] for r in rows if r[0]})
            stale = any(r[6] for r in rows)
            if missing:
                await conn.execute(_CREATE_HEADS, missing, GENESIS_HASH)
                rows += await conn.fetch(lock, missing, [])
            if (stale or missing) and ids:
                # another writer committed to these streams while this one waited: look
                # the ids up again, now that every head is held (see _LOCK_AND_FIND)
                rows = [r for r in rows if r[0]] + await conn.fetch(_FIND, ids)
            return rows
        except (asyncpg.LockNotAvailableError, asyncpg.DeadlockDetectedError):
            busy = min(expected_versions or {"?": 0})
            raise ConcurrencyError(busy, (expected_versions or {}).get(busy, 0), None) from None

    async def read_stream(
        self, stream: str, *, after_version: int = 0, limit: int = 1_000_000
    ) -> list[StoredEvent]:
        """Return a stream's events in version order."""
        async with self._driver() as conn:
            with collector_paused():
                rows = await conn.fetch(_READ_STREAM, stream, after_version, limit)
                return _events_of(rows)

    async def read_all(
        self, after: Checkpoint = _START, *, limit: int = 1000
    ) -> tuple[list[StoredEvent], Checkpoint]:
        """Return up to ``limit`` committed events after ``after``, gap-free, and the checkpoint.

        An event whose transaction is still running is not returned yet, and neither is
        anything after it in read order; once it commits it is returned, so a reader that
        resumes from the checkpoint sees every event exactly once.
        """
        async with self._driver() as conn:
            if after == _START:
                await ensure_log_statistics(conn)
            with collector_paused():
                rows = await conn.fetch(_READ_ALL, str(after.tx_id), after.position, limit)
                batch = _events_of(rows)
        if batch:
            after = Checkpoint(batch[-1].tx_id, batch[-1].global_position)
        return batch, after

    async def pages(
        self, after: Checkpoint = _START, *, limit: int = 1000
    ) -> AsyncGenerator[tuple[list[StoredEvent], Checkpoint], None]:
        """Yield the log after ``after`` page by page, as :meth:`read_all` returns it,
        up to its present end; each page's checkpoint with it.

        While a full page is with the caller, the next one is read (on a connection of
        its own): PostgreSQL reads and decodes while the caller folds.
        """

        def following(
            read: tuple[list[StoredEvent], Checkpoint],
        ) -> Awaitable[tuple[list[StoredEvent], Checkpoint]] | None:
            page, end = read
            return self.read_all(end, limit=limit) if len(page) == limit else None

        async with aclosing(read_ahead(self.read_all(after, limit=limit), following)) as reads:
            async for page, end in reads:
                if page:
                    yield page, end

    @staticmethod
    async def read_light(conn: asyncpg.Connection, after: Checkpoint, limit: int) -> list[LightRow]:
        """Return the next rows in gap-free read order, payload undecoded (for the runner)."""
        rows = await conn.fetch(READ_LIGHT_SQL, str(after.tx_id), after.position, limit)
        return light_rows(rows)

    @asynccontextmanager
    async def notifications(self) -> AsyncIterator[asyncio.Event]:
        """Yield an event that is set whenever an append commits (a wake-up, nothing more)."""
        async with listen_for_appends(self.engine) as (woken, _):
            yield woken


class EventStore(UncheckedEventStore):
    """The event log, checked: nothing that would break a projection is appended.

    Every batch is checked against the log in the transaction that appends it (see
    :mod:`ledger.validation`): unknown instrument, off-tick price, a quantity that is
    not a whole number of the size increment, a bust or correction of an unknown
    execution. One bad event refuses the whole batch with :class:`EventRejected`
    (its reason, index and a message naming the field and value); nothing is written.
    """

    def __init__(self, engine: AsyncEngine) -> None:
        super().__init__(engine)
        # instruments never change (an instrument's id is its contract): cached for good
        self._instruments: dict[str, InstrumentDefined] = {}

    async def append(
        self,
        events: Sequence[Event],
        *,
        expected_versions: Mapping[str, int] | None = None,
        causation_id: str | None = None,
        correlation_id: str | None = None,
    ) -> AppendResult:
        """Check, then append a batch, all or nothing (see :meth:`UncheckedEventStore.append`).

        Raises:
            EventRejected: an event fails a check against the log; nothing is appended.
            ConcurrencyError: as :meth:`UncheckedEventStore.append`.
            IdempotencyConflict: as :meth:`UncheckedEventStore.append`.
        """
        if not events:
            return AppendResult((), 0, 0, ())
        if len(events) == 1 and expected_versions is None and self._checks_need_no_query(events):
            # checked here, against what the log holds for good (its instruments): the
            # one-statement append needs no transaction around the checks
            self._refuse_problems(events, find_problems(events, self._instruments, set()))
            done = await self._append_one(events[0], causation_id, correlation_id)
            if done is not None:
                return done
        async with self._driver() as conn, conn.transaction():
            await self._refuse(conn, events)
            return await self._append(conn, events, expected_versions, causation_id, correlation_id)

    def _checks_need_no_query(self, events: Sequence[Event]) -> bool:
        """Whether ``events`` can be checked without the log: their contracts' instruments
        are cached (an instrument never changes) and they bust or correct nothing (an
        execution they name must be looked up)."""
        contracts = {c for e in events if (c := contract_of(e)) is not None}
        return contracts.issubset(self._instruments) and not wanted_executions(events)

    async def append_on(self, conn: asyncpg.Connection, events: Sequence[Event]) -> AppendResult:
        """Check, then append inside a transaction the caller holds on ``conn``.

        Raises:
            EventRejected: an event fails a check against the log; nothing is appended.
        """
        if not events:
            return AppendResult((), 0, 0, ())
        await self._refuse(conn, events)
        return await self._append(conn, events, None, None, None)

    async def append_prechecked_on(
        self, conn: asyncpg.Connection, events: Sequence[Event]
    ) -> AppendResult:
        """Append events that :meth:`problems_on` passed in this same transaction.

        For a caller that dead-letters what the checks refuse instead of refusing the
        batch (the ingester); the checks are not run twice.
        """
        return await UncheckedEventStore.append_on(self, conn, events)

    async def problems_on(
        self, conn: asyncpg.Connection, events: Sequence[Event | None]
    ) -> list[Problem | None]:
        """Return, per event, why it may not be appended (None entries are skipped)."""
        present = [e for e in events if e is not None]
        contracts = {c for e in present if (c := contract_of(e)) is not None}
        if not contracts.issubset(self._instruments):
            await self._load_instruments(conn)
        wanted = wanted_executions(present)
        known = {r[0] for r in await conn.fetch(KNOWN_IDS_SQL, list(wanted))} if wanted else set()
        return find_problems(events, self._instruments, known)

    async def _load_instruments(self, conn: asyncpg.Connection) -> None:
        for (payload,) in await conn.fetch(INSTRUMENTS_SQL):
            instrument = InstrumentDefined.model_validate(orjson.loads(payload))
            self._instruments.setdefault(instrument.contract, instrument)

    async def _refuse(self, conn: asyncpg.Connection, events: Sequence[Event]) -> None:
        self._refuse_problems(events, await self.problems_on(conn, events))

    @staticmethod
    def _refuse_problems(events: Sequence[Event], problems: Sequence[Problem | None]) -> None:
        for index, problem in enumerate(problems):
            if problem is not None:
                raise EventRejected(problem[0], problem[1], index, events[index].event_id)


_NewRow = tuple[int, _Encoded, int, bytes]  # input index, event, stream version, hash
_Heads = tuple[list[str], list[int], list[bytes]]  # streams, new versions, new last hashes


async def _insert_rows(
    conn: asyncpg.Connection,
    new: list[_NewRow],
    heads: _Heads,
    causation_id: str | None,
    correlation_id: str | None,
) -> list[int]:
    """Insert ``new`` and move the heads in one statement; return their positions."""
    inserted = await conn.fetch(
        _INSERT_AND_MOVE,
        [e.stream for _, e, _, _ in new],
        [v for _, _, v, _ in new],
        [e.event_id for _, e, _, _ in new],
        [e.type for _, e, _, _ in new],
        [e.schema_version for _, e, _, _ in new],
        [e.payload_json for _, e, _, _ in new],
        [e.occurred_at for _, e, _, _ in new],
        causation_id,
        correlation_id,
        [e.digest for _, e, _, _ in new],
        [h for _, _, _, h in new],
        *heads,
    )
    by_id: dict[str, int] = {r[0]: r[1] for r in inserted}
    return [by_id[e.event_id] for _, e, _, _ in new]


async def _copy_rows(
    conn: asyncpg.Connection,
    new: list[_NewRow],
    heads: _Heads,
    causation_id: str | None,
    correlation_id: str | None,
) -> list[int]:
    """COPY ``new`` in (binary, no per-row SQL) and move the heads; return their positions.

    COPY returns nothing, so the positions are read back: they are this transaction's
    newest ``len(new)`` rows, numbered in the order they were copied.
    """
    await conn.copy_records_to_table(
        "events",
        columns=_COPY_COLUMNS,
        records=[
            (
                e.stream,
                v,
                e.event_id,
                e.type,
                e.schema_version,
                e.payload_json,
                e.occurred_at,
                causation_id,
                correlation_id,
                e.digest,
                h,
            )
            for _, e, v, h in new
        ],
    )
    rows = await conn.fetch(_MOVE_HEADS_AND_READ_BACK, *heads, len(new))
    return [r[0] for r in reversed(rows)]


def _encode(event: Event, event_id: str) -> _Encoded:
    payload, digest = encode_event(event)
    return _Encoded(
        event_id=event_id,
        stream=event.stream,
        type=event.type,
        schema_version=event.schema_version,
        payload_json=payload,
        occurred_at=getattr(event, "occurred_at", None),
        digest=digest,
    )


# ------------------------------------------------------- counters and dead letters
# Run by ledger.ingest (ingest and ``rejected --retry``) and ledger.consume (the feed).

BUMP_COUNTERS_SQL = """
INSERT INTO counters (name, value) SELECT * FROM unnest($1::text[], $2::bigint[])
ON CONFLICT (name) DO UPDATE SET value = counters.value + excluded.value, updated_at = now()
"""
LAST_ERROR_SQL = "UPDATE counters SET note = $1 WHERE name = 'consume.errors'"
KNOWN_IDS_SQL = "SELECT event_id::text FROM events WHERE event_id = ANY($1::uuid[])"
DEAD_LETTER_SQL = """
INSERT INTO rejected (source, line, idx, raw, reason, message, dead_key, input_format, csv_header)
SELECT * FROM unnest($1::text[], $2::bigint[], $3::int[], $4::bytea[], $5::text[], $6::text[],
                     $7::bytea[], $8::text[], $9::text[])
ON CONFLICT (dead_key) DO NOTHING
RETURNING dead_key
"""
PENDING_REJECTED_SQL = """
SELECT id, source, line, idx, raw, reason, input_format, csv_header FROM rejected
WHERE status = 'pending' ORDER BY id LIMIT $1
"""
DEAD_LETTER_STATUS_SQL = "SELECT status, count(*) FROM rejected GROUP BY status"
RETRIED_SQL = """
UPDATE rejected SET status = $2, attempts = attempts + 1, last_retry_at = now(),
       retry_outcome = $3
WHERE id = $1
"""
_REJECTED = """
SELECT id, received_at, source, line, idx, reason, message, status, attempts, retry_outcome,
       raw FROM rejected ORDER BY id
"""
_COUNTERS = "SELECT name, value, updated_at, note FROM counters ORDER BY name"


async def rejected_rows(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    """Return every dead-lettered record, oldest first."""
    rows: list[asyncpg.Record] = await conn.fetch(_REJECTED)
    return rows


async def dead_letter_statuses(conn: asyncpg.Connection) -> dict[str, int]:
    """Return how many dead letters are in each status (``pending``, ``resolved``)."""
    return {status: int(n) for status, n in await conn.fetch(DEAD_LETTER_STATUS_SQL)}


async def read_counters(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    """Return the counters (name, value, updated_at, note), by name."""
    rows: list[asyncpg.Record] = await conn.fetch(_COUNTERS)
    return rows


# ------------------------------------------------------------- positions in the log

TX_AT_SQL = "SELECT tx_id::text::bigint FROM events WHERE global_position = $1"
_COUNT_EVENTS = "SELECT count(*) FROM events"
_LAG_AFTER = """
SELECT count(*), extract(epoch FROM now() - min(recorded_at))::float8 FROM events
WHERE (tx_id, global_position) > ($1::text::xid8, $2::bigint)
"""
_LAG_ALL = "SELECT count(*), extract(epoch FROM now() - min(recorded_at))::float8 FROM events"
# the newest row by the primary key's index: no scan of the log
_LAST_RECORDED = "SELECT recorded_at FROM events ORDER BY global_position DESC LIMIT 1"


async def checkpoint_at(conn: asyncpg.Connection, position: int) -> Checkpoint:
    """Return the read-order checkpoint of the event at global ``position`` (its tx id)."""
    tx = await conn.fetchval(TX_AT_SQL, position)
    return Checkpoint(tx or 0, position)


async def count_events(conn: asyncpg.Connection) -> int:
    """Return how many events the log holds."""
    total: int = await conn.fetchval(_COUNT_EVENTS)
    return total


async def log_lag(conn: asyncpg.Connection, after: Checkpoint | None) -> tuple[int, float | None]:
    """Return how many events lie after ``after`` (all, for None) and the oldest one's age."""
    if after is None:
        row = await conn.fetchrow(_LAG_ALL)
    else:
        row = await conn.fetchrow(_LAG_AFTER, str(after.tx_id), after.position)
    return int(row[0]), row[1]


async def last_recorded_at(conn: asyncpg.Connection) -> datetime | None:
    """Return the record time of the newest event in the log (None: the log is empty)."""
    at: datetime | None = await conn.fetchval(_LAST_RECORDED)
    return at


# -------------------------------------------------- the read side's reads of the log
# Trail and explain (projections.audit), reconciliation (projections.reconcile) and the
# end-of-day report (projections.report) read the log through these.

_STREAM_FILL_EVENTS = """
SELECT global_position, recorded_at, payload::text FROM events
WHERE stream = $1 AND type IN ('fill', 'bust', 'correction')
ORDER BY global_position
"""
_FILL_STREAMS = "SELECT DISTINCT stream FROM events WHERE type = 'fill' ORDER BY stream"
_RECONCILED_STREAMS = """
SELECT DISTINCT stream FROM events
WHERE type IN ('fill', 'broker_position') AND occurred_at <= $1
ORDER BY stream
"""
_HAS_FILLS = """
SELECT EXISTS (SELECT FROM events WHERE stream = $1 AND type = 'fill' AND occurred_at <= $2)
"""
_BROKER_REPORTS = """
SELECT global_position, payload::text FROM events
WHERE stream = $1 AND type = 'broker_position' AND occurred_at <= $2
ORDER BY occurred_at, global_position
"""
_BROKER_PNL = """
SELECT payload->>'exec_id', payload->>'broker_pnl' FROM events
WHERE stream = $1 AND type = 'fill' AND payload->>'broker_pnl' IS NOT NULL
ORDER BY global_position
"""
_RUN = """
SELECT payload::text FROM events WHERE stream = 'reconciliation/' || $1 AND type = 'reconciliation'
ORDER BY stream_version LIMIT 1
"""
_STREAMS_WITH_FILLS = """
SELECT DISTINCT stream FROM events
WHERE type = 'fill' AND occurred_at < $1 AND recorded_at <= $2
ORDER BY stream
"""
_MARK_PRICE = """
SELECT payload->>'price' FROM events
WHERE stream = 'instrument/' || $1 AND type = 'mark' AND occurred_at <= $2 AND recorded_at <= $3
ORDER BY occurred_at DESC, global_position DESC LIMIT 1
"""
_RUNS = """
SELECT payload::text, recorded_at FROM events
WHERE type = 'reconciliation' AND occurred_at >= $1 AND occurred_at < $2 AND recorded_at <= $3
ORDER BY occurred_at, global_position
"""
_LATEST_RUN = """
SELECT payload::text FROM events
WHERE type = 'reconciliation' AND occurred_at >= $1 AND occurred_at < $2 AND recorded_at <= $3
ORDER BY occurred_at DESC, global_position DESC LIMIT 1
"""


async def stream_fill_rows(conn: asyncpg.Connection, stream: str) -> list[asyncpg.Record]:
    """Return a stream's fills, busts and corrections: (position, recorded_at, payload)."""
    rows: list[asyncpg.Record] = await conn.fetch(_STREAM_FILL_EVENTS, stream)
    return rows


async def fill_streams(conn: asyncpg.Connection) -> list[str]:
    """Return every stream that holds a fill, by name."""
    return [r[0] for r in await conn.fetch(_FILL_STREAMS)]


async def reconciled_streams(conn: asyncpg.Connection, cutoff: datetime) -> list[str]:
    """Return the streams with a fill or a broker report that occurred by ``cutoff``."""
    return [r[0] for r in await conn.fetch(_RECONCILED_STREAMS, cutoff)]


async def has_fills_by(conn: asyncpg.Connection, stream: str, cutoff: datetime) -> bool:
    """Return whether ``stream`` has a fill that occurred by ``cutoff``."""
    return bool(await conn.fetchval(_HAS_FILLS, stream, cutoff))


async def broker_report_rows(
    conn: asyncpg.Connection, stream: str, cutoff: datetime
) -> list[tuple[int, str]]:
    """Return a stream's broker position reports by ``cutoff``: (position, payload)."""
    return [(r[0], r[1]) for r in await conn.fetch(_BROKER_REPORTS, stream, cutoff)]


async def broker_pnl_rows(conn: asyncpg.Connection, stream: str) -> list[tuple[str, str]]:
    """Return (exec_id, broker_pnl) of a stream's fills that carry the broker's P&L."""
    return [(r[0], r[1]) for r in await conn.fetch(_BROKER_PNL, stream)]


async def reconciliation_run(conn: asyncpg.Connection, run_id: str) -> str | None:
    """Return the payload of reconciliation run ``run_id``, if it is in the log."""
    payload: str | None = await conn.fetchval(_RUN, run_id)
    return payload


async def streams_with_fills(
    conn: asyncpg.Connection, before: datetime, recorded_by: datetime
) -> list[str]:
    """Return the streams with a fill before ``before`` recorded by ``recorded_by``."""
    return [r[0] for r in await conn.fetch(_STREAMS_WITH_FILLS, before, recorded_by)]


async def mark_price_at(
    conn: asyncpg.Connection, contract: str, occurred_by: datetime, recorded_by: datetime
) -> str | None:
    """Return the newest mark price of ``contract`` by both times (text), if any."""
    price: str | None = await conn.fetchval(_MARK_PRICE, contract, occurred_by, recorded_by)
    return price


async def reconciliation_runs(
    conn: asyncpg.Connection, start: datetime, end: datetime, recorded_by: datetime
) -> list[tuple[str, datetime]]:
    """Return every reconciliation run with its cutoff in [start, end): (payload, recorded_at),
    in cutoff order (ties in log order)."""
    rows = await conn.fetch(_RUNS, start, end, recorded_by)
    return [(r[0], r[1]) for r in rows]


async def latest_reconciliation(
    conn: asyncpg.Connection, start: datetime, end: datetime, recorded_by: datetime
) -> str | None:
    """Return the payload of the newest reconciliation run in [start, end), if any."""
    payload: str | None = await conn.fetchval(_LATEST_RUN, start, end, recorded_by)
    return payload


# ------------------------------------ tamper evidence and time travel: reads of the log
# The reads that ledger.integrity needs to recompute hash chains and seals, and the
# reads of one stream that projections.queries needs to answer on either clock.

__all__ += [  # (listed with the block, to keep it in one piece)
    "chain_page",
    "first_fill_of",
    "instrument_payload",
    "latest_mark",
    "recorded_at_of",
    "seal_page",
    "seal_payloads",
    "seal_rows",
    "snapshot_xmin",
    "stream_heads",
    "stream_rows_known_at",
    "stream_tail_as_known_at",
    "stream_tail_as_of",
    "stream_trade_payloads",
    "tx_at",
    "tx_ids_of",
]

_CHAIN_PAGE = """
SELECT global_position, stream, stream_version, event_id::text, payload::text,
       content_digest, hash, type, schema_version,
       extract(epoch FROM occurred_at)::numeric::text
FROM events WHERE (stream, stream_version) > ($1, $2)
ORDER BY stream, stream_version LIMIT $3
"""
_STREAM_HEADS = "SELECT stream, version, last_hash FROM streams ORDER BY stream"
_SNAPSHOT_XMIN = "SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint"
# ORDER BY names the table's columns: bare ``tx_id`` would be the output's cast, which
# no index has, and every page would sort the rest of the log (0.8 s a page at 1M).
# Times as exact epoch text: no session setting changes it, no year is out of range.
_SEAL_PAGE = """
SELECT tx_id::text::bigint, global_position, event_id::text, hash, type, schema_version,
       extract(epoch FROM occurred_at)::numeric::text,
       extract(epoch FROM recorded_at)::numeric::text,
       causation_id::text, correlation_id::text
FROM events
WHERE (tx_id, global_position) > ($1::text::xid8, $2::bigint)
  AND tx_id < $3::text::xid8
ORDER BY events.tx_id, events.global_position LIMIT $4
"""
_SEALS = """
SELECT global_position, payload::text FROM events WHERE type = 'seal' ORDER BY global_position
"""
# The seals, through their stream's index (filtering the log by type would scan it).
_SEALS_IN_STREAM = """
SELECT payload::text FROM events WHERE stream = 'seal/log' AND type = 'seal'
ORDER BY stream_version
"""
_TX_OF = """
SELECT global_position, tx_id::text::bigint FROM events WHERE global_position = ANY($1::bigint[])
"""
_RECORDED_AT = "SELECT recorded_at FROM events WHERE global_position = $1"
_INSTRUMENT = """
SELECT payload::text FROM events WHERE stream = 'instrument/' || $1 AND type = 'instrument'
ORDER BY global_position LIMIT 1
"""
_MARK = """
SELECT payload->>'price', occurred_at FROM events
WHERE stream = 'instrument/' || $1 AND type = 'mark' AND occurred_at <= $2 AND recorded_at <= $3
ORDER BY occurred_at DESC, global_position DESC LIMIT 1
"""
# The earliest (in event order) of the fills some executions recorded: found by their
# event ids (a fill's id is derived from its account and execution id), through the
# unique index, not by the payloads of every fill of the stream.
_FIRST_FILL_OF = """
SELECT occurred_at, global_position FROM events
WHERE event_id = ANY($2::text[]::uuid[]) AND stream = $1 AND type = 'fill'
ORDER BY occurred_at, global_position LIMIT 1
"""
# After a snapshot: everything recorded after it (fills up to T are kept by the caller).
# The snapshot holds every fill logged up to its position that still stands, so nothing
# at or before that position may come back: a fill busted there must stay out.
# The fills up to T come from a range of ix_events_stream_fills (position filtered in
# the index), the busts and corrections from ix_events_stream_adjustments: no row of
# the stream is visited that the answer does not need (migration 0007).
_TAIL_AS_OF = """
SELECT global_position, type, payload::text, recorded_at, payload->>'exec_id' FROM events
WHERE stream = $1 AND type = 'fill' AND occurred_at <= $3 AND global_position > $2
UNION ALL
SELECT global_position, type, payload::text, recorded_at, payload->>'exec_id' FROM events
WHERE stream = $1 AND type IN ('bust', 'correction') AND global_position > $2
ORDER BY global_position
"""
# Of some executions' fills: those logged after a position that happened after T.
_FILLS_AFTER = """
SELECT payload->>'exec_id' FROM events
WHERE event_id = ANY($2::text[]::uuid[]) AND stream = $1 AND type = 'fill'
  AND global_position > $3 AND occurred_at > $4
"""
# The whole stream's rows, for a state only (no effects): parsed without pydantic.
_REPLAY_ROWS = """
SELECT global_position, type, payload::text, recorded_at FROM events
WHERE stream = $1 AND type IN ('fill', 'bust', 'correction')
  AND recorded_at <= $2
ORDER BY global_position
"""
_REPLAY_AS_OF = """
SELECT global_position, payload::text FROM events
WHERE stream = $1 AND type IN ('fill', 'bust', 'correction')
ORDER BY global_position
"""
_TAIL_AS_KNOWN_AT = """
SELECT global_position, type, payload::text, recorded_at FROM events
WHERE stream = $1 AND global_position > $2 AND type IN ('fill', 'bust', 'correction')
  AND recorded_at <= $3
ORDER BY global_position
"""
_REPLAY_AS_KNOWN_AT = """
SELECT global_position, payload::text FROM events
WHERE stream = $1 AND type IN ('fill', 'bust', 'correction') AND recorded_at <= $2
ORDER BY global_position
"""


async def chain_page(
    conn: asyncpg.Connection, after_stream: str, after_version: int, limit: int
) -> list[asyncpg.Record]:
    """Return up to ``limit`` events after (stream, version), in that order, with what
    the hash-chain check recomputes: (position, stream, version, event id, payload,
    content digest, hash, type, schema version, occurred_at as epoch text)."""
    rows: list[asyncpg.Record] = await conn.fetch(_CHAIN_PAGE, after_stream, after_version, limit)
    return rows


async def stream_heads(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    """Return every stream's head row: (stream, version, last hash), by stream."""
    rows: list[asyncpg.Record] = await conn.fetch(_STREAM_HEADS)
    return rows


async def snapshot_xmin(conn: asyncpg.Connection) -> int:
    """Return the oldest transaction id still running (every older one is complete)."""
    xmin: int = await conn.fetchval(_SNAPSHOT_XMIN)
    return xmin


async def seal_page(
    conn: asyncpg.Connection, after: tuple[int, int], below_tx: int, limit: int
) -> list[asyncpg.Record]:
    """Return up to ``limit`` events after ``after`` (tx id, position) in read order, of
    transactions older than ``below_tx``, with the columns a seal's digest covers."""
    rows: list[asyncpg.Record] = await conn.fetch(
        _SEAL_PAGE, str(after[0]), after[1], str(below_tx), limit
    )
    return rows


async def seal_rows(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    """Return every seal in the log: (its global position, its payload), by position."""
    rows: list[asyncpg.Record] = await conn.fetch(_SEALS)
    return rows


async def seal_payloads(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    """Return the log's seals, through their stream, in stream order: (payload,)."""
    rows: list[asyncpg.Record] = await conn.fetch(_SEALS_IN_STREAM)
    return rows


async def tx_at(conn: asyncpg.Connection, position: int) -> int | None:
    """Return the transaction id of the event at global ``position`` (None: no such)."""
    tx: int | None = await conn.fetchval(TX_AT_SQL, position)
    return tx


async def tx_ids_of(conn: asyncpg.Connection, positions: Sequence[int]) -> dict[int, int]:
    """Return global position -> transaction id of the events at ``positions``."""
    return {r[0]: r[1] for r in await conn.fetch(_TX_OF, list(positions))}


async def recorded_at_of(conn: asyncpg.Connection, position: int) -> datetime | None:
    """Return the ``recorded_at`` of the event at global ``position`` (None: no such)."""
    recorded: datetime | None = await conn.fetchval(_RECORDED_AT, position)
    return recorded


async def instrument_payload(conn: asyncpg.Connection, contract: str) -> str | None:
    """Return the payload of the first instrument event of ``contract``, if any."""
    payload: str | None = await conn.fetchval(_INSTRUMENT, contract)
    return payload


async def latest_mark(
    conn: asyncpg.Connection, contract: str, occurred_by: datetime, recorded_by: datetime
) -> tuple[str, datetime] | None:
    """Return the newest mark of ``contract`` by both times: (price text, occurred_at)."""
    row = await conn.fetchrow(_MARK, contract, occurred_by, recorded_by)
    return None if row is None else (row[0], row[1])


async def first_fill_of(
    conn: asyncpg.Connection, stream: str, exec_ids: Sequence[str]
) -> tuple[datetime, int] | None:
    """Return the (occurred_at, position) of the earliest fill, in event order, that one
    of ``exec_ids`` recorded in ``stream`` (None: none did)."""
    row = await conn.fetchrow(_FIRST_FILL_OF, stream, _fill_ids(stream, exec_ids))
    return None if row is None else (row[0], row[1])


def _fill_ids(stream: str, exec_ids: Iterable[str]) -> list[str]:
    """Return the event ids of the fills ``exec_ids`` of ``stream``'s account."""
    account = stream.split("/", 1)[0]
    return [fill_event_id(account, exec_id) for exec_id in exec_ids]


async def stream_tail_as_of(
    conn: asyncpg.Connection, stream: str, after: int, at: datetime
) -> list[tuple[int, str, str, datetime]]:
    """Return a stream's fills, busts and corrections after global position ``after``
    that matter at event time ``at``: (position, type, payload, recorded_at), in log
    order.

    That is its fills up to ``at`` and its busts and corrections, less those of a fill
    logged after ``after`` that happened after ``at``: such a fill changes nothing at
    ``at``, and its adjustment (its fill not being in the tail) would send the caller to
    replay the whole stream.
    """
    rows = await conn.fetch(_TAIL_AS_OF, stream, after, at)
    fills = {r[4] for r in rows if r[1] == "fill"}
    outside = {r[4] for r in rows if r[1] != "fill" and r[4] not in fills}
    later: set[str] = set()
    if outside:
        found = await conn.fetch(_FILLS_AFTER, stream, _fill_ids(stream, outside), after, at)
        later = {r[0] for r in found}
    return [(r[0], r[1], r[2], r[3]) for r in rows if r[1] == "fill" or r[4] not in later]


async def stream_tail_as_known_at(
    conn: asyncpg.Connection, stream: str, after: int, recorded_by: datetime
) -> list[asyncpg.Record]:
    """Return a stream's fills, busts and corrections after global position ``after``
    recorded by ``recorded_by``: (position, type, payload, recorded_at), in log order."""
    rows: list[asyncpg.Record] = await conn.fetch(_TAIL_AS_KNOWN_AT, stream, after, recorded_by)
    return rows


async def stream_trade_payloads(
    conn: asyncpg.Connection, stream: str, recorded_by: datetime | None = None
) -> list[asyncpg.Record]:
    """Return a stream's fills, busts and corrections (all, or those recorded by
    ``recorded_by``) in log order: (position, payload)."""
    rows: list[asyncpg.Record]
    if recorded_by is None:
        rows = await conn.fetch(_REPLAY_AS_OF, stream)
    else:
        rows = await conn.fetch(_REPLAY_AS_KNOWN_AT, stream, recorded_by)
    return rows


async def stream_rows_known_at(
    conn: asyncpg.Connection, stream: str, recorded_by: datetime
) -> list[asyncpg.Record]:
    """Return a stream's fills, busts and corrections recorded by ``recorded_by``, in log
    order: (position, type, payload, recorded_at)."""
    rows: list[asyncpg.Record] = await conn.fetch(_REPLAY_ROWS, stream, recorded_by)
    return rows
