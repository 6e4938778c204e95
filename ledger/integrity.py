"""Tamper evidence of the log: hash chains, stream heads and seals.

- :func:`verify_log`: recomputes every stream's hash chain from the stored payloads,
  finds version gaps and stream heads that point past the log's end (deleted events),
  and checks every seal against the log.
- :func:`append_seal`: appends a ``LogSealed`` record over the log's committed prefix.

A seal's digest is chained over ``(global_position, event_id, hash)`` of every event in
the log's gap-free read order (transaction id, then position) up to and including the
event at ``through_position``. Read order, not bare position order: an event of a
transaction still running when the seal is taken may hold a lower position and commit
later, but never sorts before the sealed prefix in read order, so a seal stays valid
for ever on an untouched log. Deleting or editing any sealed event, removing a whole
stream, or truncating the sealed part of the log changes the digest or the count.

The read side (:mod:`projections.audit`) adds the comparison of the projections with a
fresh replay to make the whole of ``ledger verify``.
"""

from __future__ import annotations

import hashlib
import struct
import uuid
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg
import orjson
from pydantic import ValidationError
from sqlalchemy.ext.asyncio import AsyncEngine

from ledger.events import LogSealed, event_from_stored
from ledger.store import (
    GENESIS_HASH,
    TX_AT_SQL,
    EventStore,
    chain_hash,
    driver_connection,
    encode_event,
)

__all__ = [
    "Problem",
    "SealInfo",
    "VerifyReport",
    "append_seal",
    "compute_seal",
    "problems_as_rows",
    "verify_log",
]

_PAGE = 5000

_VERIFY_PAGE = """
SELECT global_position, stream, stream_version, event_id::text, payload::text,
       content_digest, hash
FROM events WHERE (stream, stream_version) > ($1, $2)
ORDER BY stream, stream_version LIMIT $3
"""
_HEADS = "SELECT stream, version, last_hash FROM streams ORDER BY stream"
_XMIN = "SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint"
# ORDER BY names the table's columns: bare ``tx_id`` would be the output's cast, which
# no index has, and every page would sort the rest of the log (0.8 s a page at 1M).
_SEAL_PAGE = """
SELECT tx_id::text::bigint, global_position, event_id::text, hash, type FROM events
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
_TX_AT = TX_AT_SQL  # owned by ledger.store
_TX_OF = """
SELECT global_position, tx_id::text::bigint FROM events WHERE global_position = ANY($1::bigint[])
"""


# ------------------------------------------------------------------ seals


@dataclass(frozen=True, slots=True)
class SealInfo:
    """A seal over the log's committed prefix in read order."""

    through_position: int
    through_tx: int
    event_count: int
    digest: str
    through_recorded_at: datetime | None = None


def _seal_step(digest: bytes, position: int, event_id: str, event_hash: bytes) -> bytes:
    return hashlib.sha256(
        digest + struct.pack(">q", position) + uuid.UUID(event_id).bytes + event_hash
    ).digest()


async def compute_seal(conn: asyncpg.Connection) -> tuple[SealInfo, bool] | None:
    """Return the seal of the log's committed prefix, and whether it holds new events.

    "New" means anything but seals after the latest existing seal; sealing a log that
    only grew by seals would seal seals for ever.

    The digest chains event by event, so it goes on from the seal that reaches
    furthest rather than from the first event: nothing can join the log before a
    sealed point (a seal covers only transactions older than every one running when
    it was computed). Sealing costs the events since that seal, not the whole log. A
    tampered prefix is not sealed over again: ``ledger verify`` recomputes every seal
    from the first event and reports the one it breaks.

    Returns:
        None for an empty log.
    """
    xmin = await conn.fetchval(_XMIN)
    last: dict[str, Any] | None = None
    for (payload,) in await conn.fetch(_SEALS_IN_STREAM):
        seal = orjson.loads(payload)
        if last is None or seal["through_position"] > last["through_position"]:
            last = seal
    last_seal = 0
    digest = GENESIS_HASH
    count = 0
    tx, pos = 0, 0
    continued = False  # from the last seal: every row read comes after it
    if last is not None:
        last_seal = int(last["through_position"])
        sealed_tx = await conn.fetchval(_TX_AT, last_seal)
        if sealed_tx is not None:  # (else the event it ends at is gone: from the start)
            digest = bytes.fromhex(last["digest"])
            count = int(last["event_count"])
            tx, pos = sealed_tx, last_seal
            continued = True
    fresh = False
    while True:
        rows = await conn.fetch(_SEAL_PAGE, str(tx), pos, str(xmin), _PAGE)
        if not rows:
            break
        for _tx, position, event_id, event_hash, kind in rows:
            digest = _seal_step(digest, position, event_id, bytes(event_hash))
            count += 1
            if kind != "seal" and (continued or position > last_seal):
                fresh = True
        tx, pos = rows[-1][0], rows[-1][1]
    if count == 0:
        return None
    recorded = await conn.fetchval("SELECT recorded_at FROM events WHERE global_position = $1", pos)
    return SealInfo(pos, tx, count, digest.hex(), recorded), fresh or last_seal == 0


async def append_seal(engine: AsyncEngine) -> LogSealed | None:
    """Append a seal over the log's committed prefix; idempotent.

    The seal's ``occurred_at`` is the ``recorded_at`` of the last sealed event, so the
    same prefix always gives the same seal (and re-appending it is a no-op).

    Returns:
        The seal appended (or already there), or None when the log is empty or nothing
        but seals was appended since the last seal.
    """
    async with engine.connect() as sa_conn:
        conn = await driver_connection(sa_conn)
        computed = await compute_seal(conn)
    if computed is None or not computed[1]:
        return None
    info = computed[0]
    assert info.through_recorded_at is not None
    seal = LogSealed(
        through_position=info.through_position,
        event_count=info.event_count,
        digest=info.digest,
        occurred_at=info.through_recorded_at,
    )
    await EventStore(engine).append([seal])
    return seal


# ------------------------------------------------------------------ verify


@dataclass(frozen=True, slots=True)
class Problem:
    """One piece of tamper evidence (or a projection that disagrees with the log)."""

    kind: str
    message: str
    stream: str | None = None
    global_position: int | None = None
    stream_version: int | None = None


@dataclass(slots=True)
class VerifyReport:
    """What :func:`verify` checked and what it found."""

    events: int = 0
    streams: int = 0
    seals: int = 0
    projections_checked: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Return whether nothing was found."""
        return not self.problems


async def verify_log(conn: asyncpg.Connection, report: VerifyReport | None = None) -> VerifyReport:
    """Check the log's hash chains, stream heads and seals.

    Args:
        conn: a connection on the ledger's database.
        report: a report to add to (a new one when None).

    Returns:
        The report; ``report.problems`` lists the hash-chain findings stream by
        stream in version order, then stream heads and seals, each naming the stream
        and the global position (or version) involved.
    """
    report = VerifyReport() if report is None else report
    last: dict[str, tuple[int, bytes, int]] = {}  # stream -> (version, hash, position)
    await _verify_chains(conn, report, last)
    await _verify_heads(conn, report, last)
    await _verify_seals(conn, report)
    return report


async def _verify_chains(
    conn: asyncpg.Connection, report: VerifyReport, last: dict[str, tuple[int, bytes, int]]
) -> None:
    key: tuple[str, int] = ("", 0)
    while True:
        rows = await conn.fetch(_VERIFY_PAGE, key[0], key[1], _PAGE)
        if not rows:
            return
        for position, stream, version, event_id, payload, stored_digest, stored_hash in rows:
            report.events += 1
            stored_digest, stored_hash = bytes(stored_digest), bytes(stored_hash)
            prev = last.get(stream)
            if prev is None:
                report.streams += 1
            expected_version = 1 if prev is None else prev[0] + 1
            where = f"stream {stream!r} version {version} (global position {position})"
            linked = True
            if version != expected_version:
                linked = False
                after = "the start" if prev is None else f"global position {prev[2]}"
                missing = (
                    f"version {expected_version}"
                    if version == expected_version + 1
                    else f"versions {expected_version}..{version - 1}"
                )
                report.problems.append(
                    Problem(
                        "VERSION_GAP",
                        f"stream {stream!r}: {missing} missing between {after} and global "
                        f"position {position} (deleted events)",
                        stream,
                        position,
                        expected_version,
                    )
                )
            problem = _check_event(stream, event_id, payload, stored_digest)
            if problem is None and linked:
                previous_hash = GENESIS_HASH if prev is None else prev[1]
                if chain_hash(previous_hash, version, event_id, stored_digest) != stored_hash:
                    problem = "stored hash does not match the hash chain"
            if problem is not None:
                report.problems.append(
                    Problem("HASH_MISMATCH", f"{where}: {problem}", stream, position, version)
                )
            last[stream] = (version, stored_hash, position)
        key = (rows[-1][1], rows[-1][2])


def _check_event(stream: str, event_id: str, payload: str, stored_digest: bytes) -> str | None:
    try:
        event = event_from_stored(orjson.loads(payload))
    except (ValidationError, orjson.JSONDecodeError) as exc:
        first = str(exc).splitlines()[0]
        return f"payload is no longer a valid event ({first})"
    _, digest = encode_event(event)
    if digest != stored_digest:
        return "content digest of the stored payload does not match (payload edited)"
    if event.stream != stream:
        return f"payload belongs to stream {event.stream!r}"
    if event.event_id != event_id:
        return f"payload's event id is {event.event_id}, the row says {event_id}"
    return None


async def _verify_heads(
    conn: asyncpg.Connection, report: VerifyReport, last: dict[str, tuple[int, bytes, int]]
) -> None:
    heads = {r[0]: (r[1], bytes(r[2])) for r in await conn.fetch(_HEADS)}
    for stream in sorted(heads.keys() | last.keys()):
        head = heads.get(stream)
        seen = last.get(stream)
        if head is None:
            assert seen is not None
            report.problems.append(
                Problem(
                    "HEAD_MISMATCH",
                    f"stream {stream!r}: the log holds versions up to {seen[0]} but the stream "
                    "has no head row",
                    stream,
                    seen[2],
                )
            )
        elif seen is None:
            report.problems.append(
                Problem(
                    "HEAD_MISMATCH",
                    f"stream {stream!r}: its head is at version {head[0]} but the log holds "
                    f"none of its events (versions 1..{head[0]} deleted)",
                    stream,
                    None,
                    1,
                )
            )
        elif head[0] != seen[0] or head[1] != seen[1]:
            if head[0] > seen[0]:
                message = (
                    f"stream {stream!r}: its head is at version {head[0]} but the log ends at "
                    f"version {seen[0]} (global position {seen[2]}): versions "
                    f"{seen[0] + 1}..{head[0]} deleted from its tail"
                )
            else:
                message = (
                    f"stream {stream!r}: its head (version {head[0]}) does not match the "
                    f"log's last event (version {seen[0]}, global position {seen[2]})"
                )
            report.problems.append(Problem("HEAD_MISMATCH", message, stream, seen[2], seen[0]))


async def _verify_seals(conn: asyncpg.Connection, report: VerifyReport) -> None:
    seals: list[tuple[int, LogSealed]] = []
    for position, payload in await conn.fetch(_SEALS):
        try:
            event = event_from_stored(orjson.loads(payload))
        except ValidationError:
            continue  # reported by the chain check
        if isinstance(event, LogSealed):
            seals.append((position, event))
    report.seals = len(seals)
    if not seals:
        return
    tx_of = {r[0]: r[1] for r in await conn.fetch(_TX_OF, [s.through_position for _, s in seals])}
    pending: dict[tuple[int, int], list[tuple[int, LogSealed]]] = defaultdict(list)
    for position, seal in seals:
        tx = tx_of.get(seal.through_position)
        if tx is None:
            report.problems.append(
                Problem(
                    "SEAL_MISMATCH",
                    f"seal at global position {position}: the event it ends at (global "
                    f"position {seal.through_position}) is no longer in the log",
                    "seal/log",
                    seal.through_position,
                )
            )
            continue
        pending[(tx, seal.through_position)].append((position, seal))
    if not pending:
        return
    end = max(pending)
    digest = GENESIS_HASH
    count = 0
    tx, pos = 0, 0
    xmin = end[0] + 1
    while (tx, pos) < end:
        rows = await conn.fetch(_SEAL_PAGE, str(tx), pos, str(xmin), _PAGE)
        if not rows:
            break
        for row_tx, position, event_id, event_hash, _kind in rows:
            if (row_tx, position) > end:
                break
            digest = _seal_step(digest, position, event_id, bytes(event_hash))
            count += 1
            for seal_position, seal in pending.get((row_tx, position), ()):
                if count != seal.event_count or digest.hex() != seal.digest:
                    report.problems.append(
                        Problem(
                            "SEAL_MISMATCH",
                            f"seal at global position {seal_position} (through global "
                            f"position {seal.through_position}): it sealed "
                            f"{seal.event_count} events, the log now holds {count} up to that "
                            "point"
                            + (
                                ""
                                if count != seal.event_count
                                else " with a different digest (an event was edited, "
                                "replaced or reordered)"
                            ),
                            "seal/log",
                            seal.through_position,
                        )
                    )
        tx, pos = rows[-1][0], rows[-1][1]


def problems_as_rows(problems: Sequence[Problem]) -> list[dict[str, Any]]:
    """Return problems as output rows."""
    return [
        {
            "kind": p.kind,
            "stream": p.stream,
            "global_position": p.global_position,
            "stream_version": p.stream_version,
            "message": p.message,
        }
        for p in problems
    ]
