"""Tamper evidence of the log: hash chains, stream heads and seals.

- :func:`verify_log`: recomputes every stream's hash chain from the stored payloads,
  finds version gaps and stream heads that point past the log's end (deleted events),
  and checks every seal against the log.
- :func:`append_seal`: appends a ``LogSealed`` record over the log's committed prefix.

A seal's digest is chained over every event in the log's gap-free read order
(transaction id, then position) up to and including the event at ``through_position``:
formula 2 (every seal written now) over each event's position, transaction id, id,
hash, type, schema version, occurred and recorded times, causation and correlation ids
(every column the hash chain does not already cover); the first formula, kept for the
seals of older logs, over ``(global_position, event_id, hash)`` only. Read order, not
bare position order: an event of a transaction still running when the seal is taken
may hold a lower position and commit later, but never sorts before the sealed prefix in
read order, so a seal stays valid for ever on an untouched log. Deleting or editing any
sealed event, removing a whole stream, or truncating the sealed part of the log changes
the digest or the count.

The hash chain covers each event's stream, version, id and payload; ``verify`` also
checks that the ``type``, ``occurred_at`` and ``schema_version`` columns agree with the
payload, so a fill relabelled ``mark`` is found even past the last seal.

Seals live in the log they seal: someone who can cut the log's tail can cut its seals
too. :func:`seal_record` is the latest seal as a small JSON document to keep outside
the database (a file, a notary, a ticket); :func:`verify_against` checks that the log
still reaches it (``ledger verify --against FILE``).

The read side (:mod:`projections.audit`) adds the comparison of the projections with a
fresh replay to make the whole of ``ledger verify``.
"""

from __future__ import annotations

import hashlib
import struct
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from types import SimpleNamespace
from typing import Any

import asyncpg
import orjson
from pydantic import ValidationError
from sqlalchemy.ext.asyncio import AsyncEngine

from ledger.events import (
    EVENT_TYPES,
    INPUT_TYPES,
    LogSealed,
    canonical_value,
    compute_event_id,
    event_from_stored,
)
from ledger.store import (
    GENESIS_HASH,
    EventStore,
    chain_hash,
    chain_page,
    driver_connection,
    encode_event,
    read_ahead,
    recorded_at_of,
    seal_page,
    seal_payloads,
    seal_rows,
    snapshot_xmin,
    stream_heads,
    tx_at,
    tx_ids_of,
)

__all__ = [
    "SEAL_FORMULA",
    "Problem",
    "SealInfo",
    "VerifyReport",
    "append_seal",
    "compute_seal",
    "latest_seal",
    "problems_as_rows",
    "seal_from_record",
    "seal_record",
    "verify_against",
    "verify_log",
]

SEAL_FORMULA = 2
"""The formula every new seal uses (see the module's docstring)."""

_PAGE = 5000

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
    """The first formula: position, id and hash (the seals of older logs)."""
    return hashlib.sha256(
        digest + struct.pack(">q", position) + uuid.UUID(event_id).bytes + event_hash
    ).digest()


def _seal_step_2(digest: bytes, row: asyncpg.Record) -> bytes:
    """Formula 2: also every column the hash chain does not cover (a ``seal_page`` row)."""
    tx, position, event_id, event_hash, kind, schema, occurred, recorded, cause, corr = row
    columns = "\x00".join((kind, occurred, recorded, cause or "", corr or ""))
    return hashlib.sha256(
        digest
        + struct.pack(">qqh", position, tx, schema)
        + uuid.UUID(event_id).bytes
        + bytes(event_hash)
        + columns.encode()
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
    xmin = await snapshot_xmin(conn)
    last: dict[str, Any] | None = None
    for (payload,) in await seal_payloads(conn):
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
        sealed_tx = await tx_at(conn, last_seal)
        # a seal of the first formula cannot be gone on from: formula 2 starts afresh
        if sealed_tx is not None and last.get("formula") == SEAL_FORMULA:
            digest = bytes.fromhex(last["digest"])
            count = int(last["event_count"])
            tx, pos = sealed_tx, last_seal
            continued = True
    fresh = False
    while True:
        rows = await seal_page(conn, (tx, pos), xmin, _PAGE)
        if not rows:
            break
        for row in rows:
            digest = _seal_step_2(digest, row)
            count += 1
            if row[4] != "seal" and (continued or row[1] > last_seal):
                fresh = True
        tx, pos = rows[-1][0], rows[-1][1]
    if count == 0:
        return None
    recorded = await recorded_at_of(conn, pos)
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
        formula=SEAL_FORMULA,
    )
    await EventStore(engine).append([seal])
    return seal


async def latest_seal(conn: asyncpg.Connection) -> LogSealed | None:
    """Return the seal that reaches furthest into the log, or None when there is none."""
    best: LogSealed | None = None
    for (payload,) in await seal_payloads(conn):
        try:
            seal = event_from_stored(orjson.loads(payload))
        except (ValidationError, ValueError):
            continue  # reported by the chain check
        if isinstance(seal, LogSealed) and (
            best is None or seal.through_position > best.through_position
        ):
            best = seal
    return best


def seal_record(seal: LogSealed, database: str = "") -> dict[str, Any]:
    """Return a seal as the document to keep outside the database (``--export``)."""
    return {
        "kind": "position-ledger seal",
        "database": database,
        "through_position": seal.through_position,
        "event_count": seal.event_count,
        "digest": seal.digest,
        "formula": seal.formula or 1,
        "occurred_at": seal.occurred_at.isoformat(),
    }


def seal_from_record(record: object) -> LogSealed:
    """Return the seal an exported document holds.

    Raises:
        ValueError: the document is not an exported seal; the message says what is wrong.
    """
    if not isinstance(record, dict) or record.get("kind") != "position-ledger seal":
        raise ValueError("not an exported seal (`ledger verify --seal --export FILE` writes one)")
    formula = record.get("formula")
    try:
        return LogSealed(
            through_position=record["through_position"],
            event_count=record["event_count"],
            digest=record["digest"],
            occurred_at=record["occurred_at"],
            formula=None if formula == 1 else formula,
        )
    except (KeyError, ValidationError) as exc:
        raise ValueError(f"not a valid exported seal: {exc}") from None


async def verify_against(conn: asyncpg.Connection, seal: LogSealed) -> list[Problem]:
    """Check that the log still reaches an exported seal: same events, same digest.

    A log whose tail was cut (events and the seals over them deleted, the stream heads
    set back) verifies on its own; it no longer reaches a seal kept outside it.
    """
    report = VerifyReport()
    await _check_seals(conn, report, [(None, seal)])
    return report.problems


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


StreamTrades = Callable[[str, list[tuple[int, str, str]]], None]
"""Takes a stream and its fills, busts and corrections as the chain walk read them:
``(global position, type, payload JSON)``, in version order."""

_TRADES = frozenset({"fill", "bust", "correction"})


async def verify_log(
    conn: asyncpg.Connection,
    report: VerifyReport | None = None,
    progress: Callable[[int], None] | None = None,
    on_stream: StreamTrades | None = None,
) -> VerifyReport:
    """Check the log's hash chains, stream heads and seals.

    Args:
        conn: a connection on the ledger's database.
        report: a report to add to (a new one when None).
        progress: called with the number of events checked, page by page.
        on_stream: called once per stream that has fills, busts or corrections, with
            them, when the walk has read the stream's last row (the projections'
            check replays them; the log is read once for both).

    Returns:
        The report; ``report.problems`` lists the hash-chain findings stream by
        stream in version order, then stream heads and seals, each naming the stream
        and the global position (or version) involved.
    """
    report = VerifyReport() if report is None else report
    last: dict[str, tuple[int, bytes, int]] = {}  # stream -> (version, hash, position)
    await _verify_chains(conn, report, last, progress, on_stream)
    await _verify_heads(conn, report, last)
    await _verify_seals(conn, report)
    return report


async def _verify_chains(
    conn: asyncpg.Connection,
    report: VerifyReport,
    last: dict[str, tuple[int, bytes, int]],
    progress: Callable[[int], None] | None = None,
    on_stream: StreamTrades | None = None,
) -> None:
    """Walk the chains page by page, (stream, version) order. The next page's query
    goes out before a page is checked: PostgreSQL reads it while Python checks (1.5x
    the rate of one after the other; a second connection adds nothing on top)."""

    def following(rows: list[asyncpg.Record]) -> Awaitable[list[asyncpg.Record]] | None:
        return chain_page(conn, rows[-1][1], rows[-1][2], _PAGE) if rows else None

    stream = ""
    trades: list[tuple[int, str, str]] = []
    async with aclosing(read_ahead(chain_page(conn, "", 0, _PAGE), following)) as pages:
        async for rows in pages:
            _check_chain_page(rows, report, last, progress)
            if on_stream is None:
                continue
            for row in rows:
                if row[1] != stream:
                    if trades:
                        on_stream(stream, trades)
                    stream, trades = row[1], []
                if row[7] in _TRADES:
                    trades.append((row[0], row[7], row[4]))
    if trades and on_stream is not None:
        on_stream(stream, trades)


def _check_chain_page(
    rows: list[asyncpg.Record],
    report: VerifyReport,
    last: dict[str, tuple[int, bytes, int]],
    progress: Callable[[int], None] | None,
) -> None:
    """Check one page of the chains, (stream, version) order, against ``last``."""
    report.events += len(rows)
    if progress is not None:
        progress(len(rows))
    for row in rows:
        position, stream, version, event_id, payload, stored_digest, stored_hash = row[:7]
        stored_digest, stored_hash = bytes(stored_digest), bytes(stored_hash)
        prev = last.get(stream)
        if prev is None:
            report.streams += 1
        expected_version = 1 if prev is None else prev[0] + 1
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
        problem = _check_event(stream, event_id, payload, stored_digest, row[7:])
        if problem is None and linked:
            previous_hash = GENESIS_HASH if prev is None else prev[1]
            if chain_hash(previous_hash, version, event_id, stored_digest) != stored_hash:
                problem = "stored hash does not match the hash chain"
        if problem is not None:
            where = f"stream {stream!r} version {version} (global position {position})"
            report.problems.append(
                Problem("HASH_MISMATCH", f"{where}: {problem}", stream, position, version)
            )
        last[stream] = (version, stored_hash, position)


def _fields_of(model: type[Any], kind: type) -> frozenset[str]:
    """The fields of ``model`` whose annotation holds ``kind`` (``X | None`` included)."""
    return frozenset(
        name for name, info in model.model_fields.items() if kind.__name__ in repr(info.annotation)
    )


# The event types whose payload is flat (strings, decimals as strings, UTC timestamps):
# type -> (model, decimal fields, timestamp fields). Their content digest is recomputed
# from the stored JSON without validating the event again (see _check_flat).
_FLAT: dict[str, tuple[type[Any], frozenset[str], frozenset[str]]] = {
    kind: (model, _fields_of(model, Decimal), _fields_of(model, datetime))
    for kind, model in EVENT_TYPES.items()
    if kind in INPUT_TYPES
}
_SORTED = orjson.OPT_SORT_KEYS


def _check_flat(
    stream: str, event_id: str, payload: str, stored_digest: bytes, columns: Sequence[Any]
) -> bool:
    """True when a flat event's stored row is intact, decided without pydantic.

    The canonical form is rebuilt from the stored JSON exactly as ``encode_content``
    lays it out (decimals written as ``str(Decimal)``, normalized where that spelling is
    not canonical); the content digest over it and the row's stream must equal the
    stored one, which was taken of the validated event when it was appended: equal
    content is content that validated. The id (derived from the natural key), the
    ``type``, ``schema_version`` and ``occurred_at`` columns are checked as the full
    path does. False means "not decided here": the full path (:func:`_check_event`)
    runs and names the problem, if there is one.
    """
    try:
        data = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return False
    if type(data) is not dict:
        return False
    kind, schema_version, occurred = columns
    spec = _FLAT.get(data.get("type"))  # type: ignore[arg-type]
    if spec is None or kind != data["type"] or schema_version != 1:
        return False
    model, decimals, times = spec
    # Every other value is taken as stored: a value of the wrong kind (a number, an
    # object) lays out differently from the original canonical form, so its digest
    # differs and the full path names it.
    canonical = data
    for key in decimals:
        value = data.get(key)
        if value is None:
            continue
        if type(value) is not str:
            return False
        if "E" in value or value == "-0":
            try:
                value = canonical_value(Decimal(value))
            except ArithmeticError:
                return False
        elif value[-1:] == "0" and "." in value:  # 350.50 is 350.5; 2.00 is 2
            value = value.rstrip("0").rstrip(".")
            if value == "-0":
                value = "0"
        else:
            continue
        if canonical is data:
            canonical = dict(data)
        canonical[key] = value
    digest = hashlib.sha256(stream.encode() + b"\n" + orjson.dumps(canonical, option=_SORTED))
    if digest.digest() != stored_digest:
        return False
    # the model's own stream and natural key, run on the plain fields (no validation)
    plain = SimpleNamespace(**data)
    when: datetime | None = None
    try:
        for key in times:
            text = data.get(key)
            if text is not None:
                at = datetime.fromisoformat(text)
                if at.tzinfo is not UTC:
                    return False
                setattr(plain, key, at)
                if key == "occurred_at":
                    when = at
    except (TypeError, ValueError):
        return False
    if model.stream.fget(plain) != stream:
        return False
    if compute_event_id(data["type"], model.natural_key(plain)) != event_id:
        return False
    if when is None:
        return True
    delta = when - _EPOCH  # PostgreSQL's epoch text: seconds, six decimals
    return bool(occurred == f"{delta.days * 86400 + delta.seconds}.{delta.microseconds:06d}")


def _check_event(
    stream: str, event_id: str, payload: str, stored_digest: bytes, columns: Sequence[Any]
) -> str | None:
    if _check_flat(stream, event_id, payload, stored_digest, columns):
        return None
    try:
        event = event_from_stored(orjson.loads(payload))
    except (ValidationError, orjson.JSONDecodeError, ValueError, ArithmeticError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if isinstance(exc, ValidationError):  # name the field and the value
            first = "; ".join(
                f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']} (got {e.get('input')!r:.60})"
                for e in exc.errors(include_url=False)
            )
        return f"payload is no longer a valid event ({first})"
    _, digest = encode_event(event)
    if digest != stored_digest:
        return "content digest of the stored payload does not match (payload edited)"
    if event.stream != stream:
        return f"payload belongs to stream {event.stream!r}"
    if event.event_id != event_id:
        return f"payload's event id is {event.event_id}, the row says {event_id}"
    kind, schema_version, occurred = columns
    if kind != event.type:
        return f"the type column says {kind!r}, the payload is a {event.type!r} event"
    if schema_version != event.schema_version:
        return f"the schema_version column says {schema_version}, the payload is version 1"
    at = getattr(event, "occurred_at", None)
    if at is not None and Decimal(occurred) != _epoch(at):
        return f"the occurred_at column differs from the payload's ({at.isoformat()})"
    return None


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _epoch(at: datetime) -> Decimal:
    delta = at - _EPOCH
    return Decimal(delta.days * 86400 + delta.seconds) + Decimal(delta.microseconds).scaleb(-6)


async def _verify_heads(
    conn: asyncpg.Connection, report: VerifyReport, last: dict[str, tuple[int, bytes, int]]
) -> None:
    heads = {r[0]: (r[1], bytes(r[2])) for r in await stream_heads(conn)}
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
    seals: list[tuple[int | None, LogSealed]] = []
    for position, payload in await seal_rows(conn):
        try:
            event = event_from_stored(orjson.loads(payload))
        except (ValidationError, ValueError):
            continue  # reported by the chain check
        if isinstance(event, LogSealed):
            seals.append((position, event))
    report.seals = len(seals)
    await _check_seals(conn, report, seals)


def _where(seal_position: int | None) -> str:
    return (
        "the exported seal" if seal_position is None else f"seal at global position {seal_position}"
    )


async def _check_seals(
    conn: asyncpg.Connection, report: VerifyReport, seals: list[tuple[int | None, LogSealed]]
) -> None:
    """Recompute the digest from the first event; report each seal it does not match.

    ``seals`` holds (the seal's own global position, or None for an exported seal; the
    seal). Both formulas are computed side by side, the first only when a seal uses it.
    """
    if not seals:
        return
    tx_of = await tx_ids_of(conn, [s.through_position for _, s in seals])
    pending: dict[tuple[int, int], list[tuple[int | None, LogSealed]]] = defaultdict(list)
    for position, seal in seals:
        tx = tx_of.get(seal.through_position)
        if tx is None:
            report.problems.append(
                Problem(
                    "SEAL_MISMATCH",
                    f"{_where(position)}: the event it ends at (global position "
                    f"{seal.through_position}) is no longer in the log",
                    "seal/log",
                    seal.through_position,
                )
            )
            continue
        pending[(tx, seal.through_position)].append((position, seal))
    if not pending:
        return
    first_formula = any(s.formula is None for group in pending.values() for _, s in group)
    end = max(pending)
    digest = digest_2 = GENESIS_HASH
    count = 0
    tx, pos = 0, 0
    xmin = end[0] + 1
    while (tx, pos) < end:
        rows = await seal_page(conn, (tx, pos), xmin, _PAGE)
        if not rows:
            break
        for row in rows:
            row_tx, position, event_id, event_hash = row[0], row[1], row[2], row[3]
            if (row_tx, position) > end:
                break
            if first_formula:
                digest = _seal_step(digest, position, event_id, bytes(event_hash))
            digest_2 = _seal_step_2(digest_2, row)
            count += 1
            for seal_position, seal in pending.get((row_tx, position), ()):
                got = digest if seal.formula is None else digest_2
                if count != seal.event_count or got.hex() != seal.digest:
                    report.problems.append(
                        Problem(
                            "SEAL_MISMATCH",
                            f"{_where(seal_position)} (through global position "
                            f"{seal.through_position}): it sealed "
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
