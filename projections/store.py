"""All of the read side's SQL, and the few functions that run it.

Statements are plain SQL for asyncpg, built once; every one names the generation it
reads or writes, so a rebuild never touches the serving generation's rows.
"""

from __future__ import annotations

from datetime import date, datetime
from decimal import Decimal
from typing import Any

import asyncpg

from ledger.pgarray import text_array, value_array
from ledger.store import Checkpoint, log_lag
from projections.faults import StreamFault
from projections.pagefold import PositionColumns

__all__ = [
    "HISTORY_COLUMNS",
    "SERVING",
    "ensure_serving",
    "history_records",
    "lock_checkpoint",
    "pnl_daily_records",
    "pnl_fill_records",
    "position_records",
    "projected_states",
    "projection_status",
    "serving_checkpoint",
    "serving_generation",
    "snapshot_before",
    "stream_faults",
]

HISTORY_COLUMNS = (
    "generation",
    "stream",
    "position",
    "kind",
    "account",
    "contract",
    "exec_id",
    "occurred_at",
    "day",
    "side",
    "qty",
    "price",
    "qty_before",
    "qty_after",
    "realized_fifo",
    "realized_wac",
    "cum_realized_fifo",
    "cum_realized_wac",
    "fees",
)

ENSURE_SERVING = """
INSERT INTO projection_checkpoint (generation, status, started_at, updated_at)
SELECT 1, 'serving', now(), now()
WHERE NOT EXISTS (SELECT FROM projection_checkpoint WHERE status = 'serving')
ON CONFLICT DO NOTHING
"""
SERVING = "SELECT generation FROM projection_checkpoint WHERE status = 'serving'"
BUILDING = """
SELECT generation FROM projection_checkpoint WHERE status = 'building'
ORDER BY generation DESC LIMIT 1
"""
NEW_BUILDING = """
INSERT INTO projection_checkpoint (generation, status, started_at, updated_at)
SELECT coalesce(max(generation), 0) + 1, 'building', now(), now() FROM projection_checkpoint
RETURNING generation
"""
CHECKPOINT = """
SELECT tx_id, position, events, status FROM projection_checkpoint WHERE generation = $1
"""
LOCK_CHECKPOINT = """
SELECT tx_id, position, events, status FROM projection_checkpoint WHERE generation = $1 FOR UPDATE
"""
ADVANCE = """
UPDATE projection_checkpoint SET tx_id = $2, position = $3, events = events + $4, updated_at = now()
WHERE generation = $1
"""
# A parallel rebuild (projections.partition). The end: the newest row of the gap-free
# read order now (every transaction at or below it is complete). ORDER BY names the
# table's columns: bare ``tx_id`` would be the output's cast, and sort the whole log.
LOG_HEAD = """
SELECT tx_id::text::bigint, global_position FROM events
WHERE tx_id < pg_snapshot_xmin(pg_current_snapshot())
ORDER BY events.tx_id DESC, events.global_position DESC LIMIT 1
"""
COUNT_UPTO = """
SELECT count(*) FROM events WHERE (tx_id, global_position) <= ($1::text::xid8, $2::bigint)
"""
PARTITIONS = """
SELECT part, parts, tx_id, position, end_tx_id, end_position FROM projection_partition
WHERE generation = $1 ORDER BY part
"""
CREATE_PARTITIONS = """
INSERT INTO projection_partition (generation, part, parts, end_tx_id, end_position)
SELECT $1, p, $2, $3, $4 FROM generate_series(0, $2 - 1) AS p
ON CONFLICT DO NOTHING
"""
# A worker's checkpoint, with its generation's status (as CHECKPOINT gives it).
PARTITION_CHECKPOINT = """
SELECT p.tx_id, p.position, p.events, c.status
FROM projection_partition AS p JOIN projection_checkpoint AS c USING (generation)
WHERE p.generation = $1 AND p.part = $2
"""
LOCK_PARTITION = PARTITION_CHECKPOINT + " FOR UPDATE OF p"
ADVANCE_PARTITION = """
UPDATE projection_partition SET tx_id = $3, position = $4, events = events + $5,
    updated_at = now()
WHERE generation = $1 AND part = $2
"""
# Done: every event of the part up to the end is in; the checkpoint says so.
FINISH_PARTITION = """
UPDATE projection_partition SET tx_id = end_tx_id, position = end_position, updated_at = now()
WHERE generation = $1 AND part = $2
"""
# A worker's share of the log up to the end: its streams, and every instrument.
# hashtext() is PostgreSQL's own, so the split is the same wherever a worker runs.
READ_PARTITION = """
SELECT global_position, tx_id::text::bigint, stream, type, payload::text, recorded_at
FROM events
WHERE (tx_id, global_position) > ($1::text::xid8, $2::bigint)
  AND (tx_id, global_position) <= ($4::text::xid8, $5::bigint)
  AND (type = 'instrument' OR (hashtext(stream) & 2147483647) % $6 = $7)
ORDER BY events.tx_id, events.global_position LIMIT $3
"""
# All workers done: the generation's checkpoint takes the end, in one transaction.
JOIN_PARTITIONS = """
UPDATE projection_checkpoint SET tx_id = $2, position = $3, events = $4, updated_at = now()
WHERE generation = $1 AND tx_id = 0 AND position = 0
"""
DROP_PARTITIONS = "DELETE FROM projection_partition WHERE generation = $1"
# Two statements, in this order, inside one transaction: the unique index that allows
# one serving generation is checked row by row, so flipping both rows in one UPDATE
# fails whenever the new row happens to be updated first.
RETIRE_SERVING = """
UPDATE projection_checkpoint SET status = 'retired' WHERE status = 'serving' AND generation <> $1
"""
SERVE = """
UPDATE projection_checkpoint SET status = 'serving', swapped_at = now() WHERE generation = $1
"""
RETIRED = "SELECT generation FROM projection_checkpoint WHERE status = 'retired'"
DROP_GENERATION_TABLES = (
    "DELETE FROM proj_positions WHERE generation = $1",
    "DELETE FROM proj_history WHERE generation = $1",
    "DELETE FROM proj_pnl_daily WHERE generation = $1",
    "DELETE FROM proj_snapshots WHERE generation = $1",
    "DELETE FROM proj_faults WHERE generation = $1",
)
FORGET_GENERATION = "DELETE FROM projection_checkpoint WHERE generation = $1"
# The gap-free read (see ledger.store): only transactions older than the oldest one
# still running, in (transaction id, position) order. The ORDER BY names the table's
# columns: an unqualified ``tx_id`` would mean the *output* column ``tx_id::text::bigint``,
# which no index has, and every page would sort the whole log.
LOAD_STATES = """
SELECT stream, state FROM proj_positions WHERE generation = $1 AND stream = ANY($2::text[])
"""
STREAM_FILLS_UPTO = """
SELECT global_position, payload::text FROM events
WHERE stream = $1 AND type IN ('fill', 'bust', 'correction')
  AND (tx_id, global_position) <= ($2::text::xid8, $3::bigint)
ORDER BY global_position
"""
# Every restated stream of a page at once, up to the page's read position.
STREAMS_FILLS_UPTO = """
SELECT stream, global_position, type, payload::text, recorded_at FROM events
WHERE stream = ANY($1::text[]) AND type IN ('fill', 'bust', 'correction')
  AND (tx_id, global_position) <= ($2::text::xid8, $3::bigint)
ORDER BY stream, global_position
"""
LATEST_RECORDED = """
SELECT stream, max(recorded_at) FROM events WHERE stream = ANY($1::text[]) GROUP BY stream
"""
UPSERT_POSITIONS = """
INSERT INTO proj_positions (generation, stream, account, contract, signed_qty,
    avg_open_price_fifo, avg_open_price_wac, realized_fifo, realized_wac, fees, opened_at,
    closed_at, last_fill_at, fill_count, last_position, state)
SELECT $1, * FROM unnest($2::text::text[], $3::text::text[], $4::text::text[],
    $5::text::numeric[], $6::text::numeric[], $7::text::numeric[], $8::text::numeric[],
    $9::text::numeric[], $10::text::numeric[], $11::text::timestamptz[],
    $12::text::timestamptz[], $13::text::timestamptz[], $14::text::int[], $15::text::bigint[],
    $16::text[])
ON CONFLICT (generation, stream) DO UPDATE SET
    signed_qty = excluded.signed_qty, avg_open_price_fifo = excluded.avg_open_price_fifo,
    avg_open_price_wac = excluded.avg_open_price_wac, realized_fifo = excluded.realized_fifo,
    realized_wac = excluded.realized_wac, fees = excluded.fees, opened_at = excluded.opened_at,
    closed_at = excluded.closed_at, last_fill_at = excluded.last_fill_at,
    fill_count = excluded.fill_count, last_position = excluded.last_position,
    state = excluded.state
"""
ADD_PNL_DAILY = """
INSERT INTO proj_pnl_daily (generation, stream, day, account, contract, realized_fifo,
    realized_wac, fees, fills)
SELECT $1, * FROM unnest($2::text::text[], $3::text::date[], $4::text::text[],
    $5::text::text[], $6::text::numeric[], $7::text::numeric[], $8::text::numeric[],
    $9::text::int[])
ON CONFLICT (generation, stream, day) DO UPDATE SET
    realized_fifo = proj_pnl_daily.realized_fifo + excluded.realized_fifo,
    realized_wac = proj_pnl_daily.realized_wac + excluded.realized_wac,
    fees = proj_pnl_daily.fees + excluded.fees,
    fills = proj_pnl_daily.fills + excluded.fills
"""
# What a restatement rewrites ($2 streams, $3 days, $4 fill times, $5 log positions; see
# projections.pagefold.Forget): history from the day on, or with a time, only the rows
# of that day from that fill on in event order; daily P&L from the day on.
FORGET_HISTORY = """
DELETE FROM proj_history t
USING unnest($2::text::text[], $3::text::date[], $4::text::timestamptz[], $5::text::bigint[])
    AS f(stream, day, at, pos)
WHERE t.generation = $1 AND t.stream = f.stream AND t.day >= f.day
  AND (f.at IS NULL OR t.day > f.day OR (t.occurred_at, t.position) >= (f.at, f.pos))
"""
FORGET_DAILY = """
DELETE FROM proj_pnl_daily t USING unnest($2::text::text[], $3::text::date[]) AS f(stream, day)
WHERE t.generation = $1 AND t.stream = f.stream AND t.day >= f.day
"""
INSERT_SNAPSHOTS = """
INSERT INTO proj_snapshots (generation, stream, known_position, key_position, key_occurred_at,
    known_recorded_at, state)
SELECT $1, * FROM unnest($2::text::text[], $3::text::bigint[], $4::text::bigint[],
    $5::text::timestamptz[], $6::text::timestamptz[], $7::text[])
ON CONFLICT DO NOTHING
"""
OLD_DETAIL_GROUPS = """
SELECT h.stream, h.position, h.kind, h.account, h.contract, h.exec_id, h.occurred_at, h.day,
       h.qty_before, h.qty_after, h.realized_fifo, h.realized_wac, h.cum_realized_fifo,
       h.cum_realized_wac, h.fees
FROM proj_history h
JOIN (SELECT DISTINCT stream, day FROM proj_history
      WHERE generation = $1 AND kind = 'detail' AND day < $2) g
  ON g.stream = h.stream AND g.day = h.day
WHERE h.generation = $1
ORDER BY h.stream, h.day, h.occurred_at, h.position
"""
DELETE_OLD_GROUPS = """
DELETE FROM proj_history h USING unnest($2::text[], $3::date[]) AS g(stream, day)
WHERE h.generation = $1 AND h.stream = g.stream AND h.day = g.day
"""

# Faulted streams (projections.faults): set aside with the offending event, per generation.
FAULTED_STREAMS = "SELECT stream FROM proj_faults WHERE generation = $1"
# A rebuild worker's share of them ($2 parts, $3 its part): as READ_PARTITION splits.
FAULTED_STREAMS_OF_PART = """
SELECT stream FROM proj_faults
WHERE generation = $1 AND (hashtext(stream) & 2147483647) % $2 = $3
"""
# ($2..$7: streams, accounts, contracts, log positions, exec ids, reasons); the event id
# is the offending row's own. A stream faulted again keeps when it was first found.
RECORD_FAULTS = """
INSERT INTO proj_faults (generation, stream, account, contract, position, event_id, exec_id,
    reason)
SELECT $1, f.stream, f.account, f.contract, f.position, e.event_id, f.exec_id, f.reason
FROM unnest($2::text[], $3::text[], $4::text[], $5::bigint[], $6::text[], $7::text[])
    AS f(stream, account, contract, position, exec_id, reason)
LEFT JOIN events AS e ON e.global_position = f.position
ON CONFLICT (generation, stream) DO UPDATE SET position = excluded.position,
    event_id = excluded.event_id, exec_id = excluded.exec_id, reason = excluded.reason
"""
HEAL_FAULTS = "DELETE FROM proj_faults WHERE generation = $1 AND stream = ANY($2::text[])"
# A faulted stream shows nothing but its fault: its other rows go.
WIPE_STREAMS = (
    "DELETE FROM proj_positions WHERE generation = $1 AND stream = ANY($2::text[])",
    "DELETE FROM proj_history WHERE generation = $1 AND stream = ANY($2::text[])",
    "DELETE FROM proj_pnl_daily WHERE generation = $1 AND stream = ANY($2::text[])",
    "DELETE FROM proj_snapshots WHERE generation = $1 AND stream = ANY($2::text[])",
)
LIST_FAULTS = """
SELECT stream, position, event_id::text, exec_id, reason, faulted_at FROM proj_faults
WHERE generation = $1 AND ($2::text IS NULL OR account = $2) AND ($3::text IS NULL OR contract = $3)
ORDER BY stream
"""


async def stream_faults(
    conn: asyncpg.Connection,
    generation: int,
    account: str | None = None,
    contract: str | None = None,
) -> list[StreamFault]:
    """Return the faulted streams of ``generation`` (of one account and/or contract)."""
    rows = await conn.fetch(LIST_FAULTS, generation, account, contract)
    return [StreamFault(r[0], r[1], r[2], r[3], r[4], r[5]) for r in rows]


_PROJECTED = """
SELECT stream, state FROM proj_positions WHERE generation = $1 ORDER BY stream
"""
_HAS_CHECKPOINTS = "SELECT to_regclass('projection_checkpoint') IS NOT NULL"
_SERVING_CHECKPOINT = """
SELECT generation, tx_id::text, position FROM projection_checkpoint WHERE status = 'serving'
"""


async def projected_states(conn: asyncpg.Connection, generation: int) -> dict[str, str]:
    """Return every projected position of ``generation``: stream -> state JSON."""
    return {r[0]: r[1] for r in await conn.fetch(_PROJECTED, generation)}


async def serving_checkpoint(conn: asyncpg.Connection) -> tuple[int, int, int] | None:
    """Return the serving generation and its read position (generation, tx_id, position).

    None when nothing was projected yet (or the projection tables do not exist).
    """
    if not await conn.fetchval(_HAS_CHECKPOINTS):
        return None
    row = await conn.fetchrow(_SERVING_CHECKPOINT)
    if row is None:
        return None
    return int(row[0]), int(row[1]), int(row[2])


async def ensure_serving(conn: asyncpg.Connection) -> int:
    """Return the serving generation, creating generation 1 on a fresh database."""
    await conn.execute(ENSURE_SERVING)
    generation: int = await conn.fetchval(SERVING)
    return generation


async def lock_checkpoint(conn: asyncpg.Connection, generation: int) -> asyncpg.Record | None:
    """Lock a generation's checkpoint row for this transaction and return it."""
    row: asyncpg.Record | None = await conn.fetchrow(LOCK_CHECKPOINT, generation)
    return row


# The time-travel reads of projections.queries: positions, snapshots, P&L, history.

_POSITIONS = """
SELECT stream, account, contract, state FROM proj_positions
WHERE generation = $1 AND ($2::text IS NULL OR account = $2) AND ($3::text IS NULL OR contract = $3)
ORDER BY account, contract
"""
# ($4, $5): only a snapshot whose last fill sorts before this key (a fill it must not
# hold, because a later row changes or precedes it); far future for any.
_SNAPSHOT_AS_OF = """
SELECT known_position, key_occurred_at, state FROM proj_snapshots
WHERE generation = $1 AND stream = $2 AND key_occurred_at <= $3
  AND (key_occurred_at, key_position) < ($4, $5)
ORDER BY key_occurred_at DESC, known_position DESC LIMIT 1
"""
_SNAPSHOT_AS_KNOWN_AT = """
SELECT known_position, key_occurred_at, state FROM proj_snapshots
WHERE generation = $1 AND stream = $2 AND known_recorded_at <= $3
  AND (key_occurred_at, key_position) < ($4, $5)
ORDER BY known_position DESC, key_position DESC LIMIT 1
"""
_PNL_DAILY = """
SELECT account, contract, day, realized_fifo, realized_wac, fees, fills FROM proj_pnl_daily
WHERE generation = $1 AND ($2::text IS NULL OR account = $2)
  AND ($3::date IS NULL OR day >= $3) AND ($4::date IS NULL OR day <= $4)
ORDER BY account, contract, day
"""
_PNL_FILLS = """
SELECT account, contract, day, exec_id, position, occurred_at, realized_fifo, realized_wac, fees
FROM proj_history
WHERE generation = $1 AND kind = 'detail' AND ($2::text IS NULL OR account = $2)
  AND ($3::date IS NULL OR day >= $3) AND ($4::date IS NULL OR day <= $4)
ORDER BY account, contract, occurred_at, position
"""
_HISTORY = """
SELECT position, kind, exec_id, occurred_at, day, side, qty, price, qty_before, qty_after,
       realized_fifo, realized_wac, cum_realized_fifo, cum_realized_wac, fees
FROM proj_history
WHERE generation = $1 AND stream = $2
  AND ($3::timestamptz IS NULL OR occurred_at >= $3)
  AND ($4::timestamptz IS NULL OR occurred_at <= $4)
ORDER BY occurred_at, position
"""


async def serving_generation(conn: asyncpg.Connection) -> int | None:
    """Return the serving generation, or None before anything was projected."""
    generation: int | None = await conn.fetchval(SERVING)
    return generation


async def position_records(
    conn: asyncpg.Connection, generation: int, account: str | None, contract: str | None
) -> list[asyncpg.Record]:
    """Return the projected positions of ``generation`` (of one account and/or contract),
    by account and contract: (stream, account, contract, state JSON)."""
    rows: list[asyncpg.Record] = await conn.fetch(_POSITIONS, generation, account, contract)
    return rows


async def snapshot_before(
    conn: asyncpg.Connection,
    generation: int,
    stream: str,
    known_at: bool,
    when: datetime,
    before: tuple[datetime, int],
) -> asyncpg.Record | None:
    """Return the newest snapshot of ``stream`` at ``when`` (event time, or with
    ``known_at`` knowledge time) whose last fill sorts before ``before`` (occurred_at,
    position): (known_position, key_occurred_at, state JSON), or None."""
    statement = _SNAPSHOT_AS_KNOWN_AT if known_at else _SNAPSHOT_AS_OF
    row: asyncpg.Record | None = await conn.fetchrow(statement, generation, stream, when, *before)
    return row


async def pnl_daily_records(
    conn: asyncpg.Connection,
    generation: int,
    account: str | None,
    date_from: date | None,
    date_to: date | None,
) -> list[asyncpg.Record]:
    """Return the daily P&L rows of ``generation`` (of one account, between two days)."""
    rows: list[asyncpg.Record] = await conn.fetch(
        _PNL_DAILY, generation, account, date_from, date_to
    )
    return rows


async def pnl_fill_records(
    conn: asyncpg.Connection,
    generation: int,
    account: str | None,
    date_from: date | None,
    date_to: date | None,
) -> list[asyncpg.Record]:
    """Return the P&L of every detail history row (one per fill) of ``generation``."""
    rows: list[asyncpg.Record] = await conn.fetch(
        _PNL_FILLS, generation, account, date_from, date_to
    )
    return rows


async def history_records(
    conn: asyncpg.Connection,
    generation: int,
    stream: str,
    time_from: datetime | None,
    time_to: datetime | None,
) -> list[asyncpg.Record]:
    """Return the history rows of ``stream`` in ``generation`` between two times."""
    rows: list[asyncpg.Record] = await conn.fetch(_HISTORY, generation, stream, time_from, time_to)
    return rows


def position_params(columns: PositionColumns) -> list[Any]:
    """Return position columns as the parameters of :data:`UPSERT_POSITIONS` (after the
    generation): each column as an array literal (``ledger.pgarray``), the states as a
    list."""
    return [
        *(text_array(column) for column in columns[:3]),
        *(value_array(column) for column in columns[3:-1]),
        columns[-1],
    ]


def history_record(
    generation: int,
    stream: str,
    position: int,
    kind: str,
    account: str,
    contract: str,
    exec_id: str | None,
    occurred_at: datetime,
    day: date,
    side: str | None,
    qty: Decimal | None,
    price: Decimal | None,
    qty_before: Decimal,
    qty_after: Decimal,
    realized_fifo: Decimal,
    realized_wac: Decimal,
    cum_realized_fifo: Decimal,
    cum_realized_wac: Decimal,
    fees: Decimal,
) -> tuple[Any, ...]:
    """Return one proj_history row in :data:`HISTORY_COLUMNS` order (for COPY)."""
    return (
        generation,
        stream,
        position,
        kind,
        account,
        contract,
        exec_id,
        occurred_at,
        day,
        side,
        qty,
        price,
        qty_before,
        qty_after,
        realized_fifo,
        realized_wac,
        cum_realized_fifo,
        cum_realized_wac,
        fees,
    )


async def projection_status(conn: asyncpg.Connection) -> tuple[int, list[StreamFault]]:
    """Return how many events of the log the serving projections have not folded yet,
    and the streams they hold as faulted."""
    serving = await serving_checkpoint(conn)
    if serving is None:
        return (await log_lag(conn, None))[0], []
    generation, tx_id, position = serving
    behind = (await log_lag(conn, Checkpoint(tx_id, position)))[0]
    return behind, await stream_faults(conn, generation)
