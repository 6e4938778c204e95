"""Audit on the read side: the trail of a position, the lots behind it, and ``verify``.

- :func:`trail`: every event that contributed to one position, in fold order, with the
  running quantity and realized P&L after each; busted fills stay in the trail marked
  ``BUSTED``, corrections show old -> new, and a late fill, a bust or a correction shows
  how it restated the position (what was known before it, what is known after it).
- :func:`explain`: the position at T and the FIFO lots that make it up, each traced to
  the fill that opened it (execution id, log position, times).
- :func:`verify`: the log's tamper evidence (:func:`ledger.integrity.verify_log`) and
  a comparison of the serving projections with a fresh replay; a stream the
  projections hold as faulted (:mod:`projections.faults`) must fail to replay at the
  same event, and is listed apart (``ledger verify`` shows them), not as tamper.

Exceptions::

    LedgerError
    └── AuditError          the position asked about has no events
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import asyncpg
import orjson

from ledger.errors import LedgerError, StreamFaulted
from ledger.events import (
    FillBusted,
    FillCorrected,
    FillRecorded,
    decimal_text,
    event_from_stored,
)
from ledger.integrity import Problem, VerifyReport, verify_log
from ledger.store import INSTRUMENTS_SQL, fill_streams, stream_fill_rows
from ledger.values import instrument_grid_of
from projections.faults import UNFOLDABLE, culprit_in_events
from projections.pagefold import replay_rows, stream_row
from projections.positions import (
    FillInput,
    FoldError,
    PositionState,
    StreamEvent,
    apply_fill,
    is_in_order,
    new_state,
    replay,
)
from projections.queries import Clock, instrument_grid, serving_generation, stream_at
from projections.store import projected_states, stream_faults

__all__ = [
    "AuditError",
    "explain",
    "load_stream",
    "trail",
    "verify",
]

_ZERO = Decimal(0)


class AuditError(LedgerError):
    """An audit query names a position the log knows nothing about."""


# ------------------------------------------------------------------ loading


@dataclass(frozen=True, slots=True)
class StreamRow:
    """One fill, bust or correction of a stream, with where and when it was recorded."""

    position: int
    recorded_at: datetime
    event: StreamEvent


async def _instrument(conn: asyncpg.Connection, contract: str) -> tuple[Decimal, Decimal]:
    grid = await instrument_grid(conn, contract)
    if grid is None:
        raise AuditError(f"contract: no instrument event defines {contract!r}")
    return grid


async def load_stream(
    conn: asyncpg.Connection,
    stream: str,
    *,
    occurred_by: datetime | None = None,
    recorded_by: datetime | None = None,
) -> list[StreamRow]:
    """Return a stream's fills, busts and corrections in log order, filtered by time.

    Args:
        conn: a connection on the ledger's database.
        stream: ``{account}/{contract}``.
        occurred_by: keep only fills that occurred at or before this time (busts and
            corrections are kept whenever they occurred, as the ``as_of`` replay does).
        recorded_by: keep only events recorded at or before this time.
    """
    rows: list[StreamRow] = []
    for position, recorded_at, payload in await stream_fill_rows(conn, stream):
        if recorded_by is not None and recorded_at > recorded_by:
            continue
        event = event_from_stored(orjson.loads(payload))
        assert isinstance(event, FillRecorded | FillBusted | FillCorrected)
        if (
            occurred_by is not None
            and isinstance(event, FillRecorded)
            and event.occurred_at > occurred_by
        ):
            continue
        rows.append(StreamRow(position, recorded_at, event))
    return rows


def _window(
    clock: Clock, at: datetime | None, recorded_by: datetime | None = None
) -> tuple[datetime | None, datetime | None]:
    """Return (occurred_by, recorded_by) for ``clock`` at ``at``; ``recorded_by`` adds
    the knowledge clock to an ``as_of`` query (both clocks at once)."""
    if clock == "as_of":
        return at, recorded_by
    if at is None or clock == "now":
        return None, None
    return None, at


def _fill_input(position: int, fill: FillRecorded) -> FillInput:
    return FillInput(
        exec_id=fill.exec_id,
        side=fill.side,
        qty=fill.qty,
        price=fill.price,
        fee=fill.fee,
        occurred_at=fill.occurred_at,
        position=position,
        order_id=fill.order_id,
    )


# ------------------------------------------------------------------ trail


@dataclass(slots=True)
class _Walk:
    """What was known as each event arrived (knowledge order = log order)."""

    first_known: dict[str, tuple[Decimal, Decimal]] = field(default_factory=dict)
    late: set[int] = field(default_factory=set)
    duplicate: set[int] = field(default_factory=set)
    restated: dict[int, tuple[Decimal, Decimal, Decimal, Decimal]] = field(default_factory=dict)


def _walk(
    account: str, contract: str, point_value: Decimal, tick_size: Decimal, rows: list[StreamRow]
) -> _Walk:
    walk = _Walk()
    state = new_state(account, contract, point_value, tick_size)
    seen: list[tuple[int, StreamEvent]] = []
    filled: set[str] = set()
    touched: set[str] = set()
    for row in rows:
        event = row.event
        before = (state.signed_qty, state.realized_fifo)
        seen.append((row.position, event))
        if isinstance(event, FillRecorded):
            if event.exec_id in filled:
                walk.duplicate.add(row.position)  # the earlier record stands
                continue
            filled.add(event.exec_id)
            if event.exec_id not in touched and is_in_order(state, event.occurred_at, row.position):
                try:
                    effect = apply_fill(state, _fill_input(row.position, event))
                except FoldError:
                    # unfoldable then (off the tick grid, ...); a later correction or
                    # bust healed the stream, or the final replay names the fault
                    touched.add(event.exec_id)
                    continue
                walk.first_known[event.exec_id] = (effect.qty_after, effect.realized_fifo)
                continue
            walk.late.add(row.position)
        else:
            touched.add(event.exec_id)
        try:
            state, effects = replay(account, contract, point_value, tick_size, seen)
        except FoldError:
            continue  # the stream was faulted at this point of the log: nothing known
        for e in effects:
            walk.first_known.setdefault(e.exec_id, (e.qty_after, e.realized_fifo))
        walk.restated[row.position] = (before[0], state.signed_qty, before[1], state.realized_fifo)
    return walk


def _restatement(values: tuple[Decimal, Decimal, Decimal, Decimal]) -> str:
    qb, qa, rb, ra = values
    return (
        f"restated position {decimal_text(qb)} → {decimal_text(qa)}, "
        f"realized P&L {decimal_text(rb)} → {decimal_text(ra)}"
    )


async def trail(
    conn: asyncpg.Connection,
    account: str,
    contract: str,
    *,
    clock: Clock = "now",
    at: datetime | None = None,
    recorded_by: datetime | None = None,
) -> list[dict[str, Any]]:
    """Return every event that contributed to one position, in fold order.

    Each fill row carries the running signed quantity and the FIFO realized P&L (the
    fill's own and the cumulative) after it, as the log now states them; ``status`` is
    ``LATE`` (recorded after fills that sort after it), ``BUSTED``, ``CORRECTED`` or
    ``DUPLICATE`` (an execution id recorded again: the earlier record stands);
    ``restated`` tells what the fill showed when it was first known, where that changed.
    Each bust or correction follows the fill it touched, with old -> new values and the
    restatement it caused.

    Raises:
        AuditError: the position has no events on this clock, or its contract has no
            instrument.
    """
    stream = f"{account}/{contract}"
    occurred_by, recorded_by = _window(clock, at, recorded_by)
    rows = await load_stream(conn, stream, occurred_by=occurred_by, recorded_by=recorded_by)
    if not rows:
        raise AuditError(f"account {account!r} contract {contract!r}: no fills in the log")
    point_value, tick_size = await _instrument(conn, contract)
    events = [(r.position, r.event) for r in rows]
    try:
        _, effects = replay(account, contract, point_value, tick_size, events)
    except UNFOLDABLE as exc:
        culprit, event_id = culprit_in_events(stream, events, (point_value, tick_size), exc)
        raise StreamFaulted(
            stream, culprit.position, event_id, culprit.exec_id, culprit.reason
        ) from None
    walk = _walk(account, contract, point_value, tick_size, rows)
    effect_of = {e.exec_id: e for e in effects}
    cumulative: dict[str, Decimal] = {}
    running = _ZERO
    for e in effects:
        running += e.realized_fifo
        cumulative[e.exec_id] = running

    fills = sorted(
        (r for r in rows if isinstance(r.event, FillRecorded)),
        key=lambda r: (r.event.occurred_at, r.position),
    )
    amendments: dict[str, list[StreamRow]] = defaultdict(list)
    for r in rows:
        if not isinstance(r.event, FillRecorded):
            amendments[r.event.exec_id].append(r)
    filled = {r.event.exec_id for r in fills}

    out: list[dict[str, Any]] = []
    for r in fills:
        fill = r.event
        assert isinstance(fill, FillRecorded)
        effect = effect_of.get(fill.exec_id) if r.position not in walk.duplicate else None
        kinds = {type(a.event) for a in amendments.get(fill.exec_id, [])}
        status = []
        if r.position in walk.late:
            status.append("LATE")
        if r.position in walk.duplicate:
            status.append("DUPLICATE")
        elif FillBusted in kinds:
            status.append("BUSTED")
        elif FillCorrected in kinds:
            status.append("CORRECTED")
        restated = ""
        first = walk.first_known.get(fill.exec_id)
        if first is not None and r.position not in walk.duplicate:
            if effect is None:
                restated = (
                    f"was qty_after {decimal_text(first[0])}, "
                    f"realized {decimal_text(first[1])}; busted"
                )
            elif (effect.qty_after, effect.realized_fifo) != first:
                restated = (
                    f"qty_after {decimal_text(first[0])} → {decimal_text(effect.qty_after)}, "
                    f"realized {decimal_text(first[1])} → {decimal_text(effect.realized_fifo)}"
                )
        detail = ""
        if r.position in walk.late and r.position in walk.restated:
            detail = "recorded after fills that sort after it: " + _restatement(
                walk.restated[r.position]
            )
        out.append(
            {
                "position": r.position,
                "type": "fill",
                "exec_id": fill.exec_id,
                "occurred_at": fill.occurred_at,
                "recorded_at": r.recorded_at,
                "side": fill.side.value,
                "qty": effect.qty if effect else fill.qty,
                "price": effect.price if effect else fill.price,
                "fee": effect.fee if effect else fill.fee,
                "status": ",".join(status),
                "qty_after": effect.qty_after if effect else None,
                "realized_pnl": effect.realized_fifo if effect else None,
                "cum_realized_pnl": cumulative.get(fill.exec_id) if effect else None,
                "restated": restated,
                "detail": detail,
            }
        )
        if r.position in walk.duplicate:
            continue
        previous = (fill.qty, fill.price, fill.fee)
        ordered = sorted(
            amendments.get(fill.exec_id, []), key=lambda a: (a.event.occurred_at, a.position)
        )
        for a in ordered:
            out.append(_amendment_row(a, previous, walk))
            if isinstance(a.event, FillCorrected):
                previous = (a.event.qty, a.event.price, a.event.fee)
    for exec_id, orphans in sorted(amendments.items()):
        if exec_id not in filled:
            for a in orphans:
                row = _amendment_row(a, None, walk)
                row["status"] = "UNKNOWN_EXECUTION"
                out.append(row)
    for seq, row in enumerate(out, start=1):
        row["seq"] = seq
    return [{"seq": row.pop("seq"), **row} for row in out]


def _amendment_row(
    row: StreamRow, previous: tuple[Decimal, Decimal, Decimal] | None, walk: _Walk
) -> dict[str, Any]:
    event = row.event
    restatement = walk.restated.get(row.position)
    if isinstance(event, FillCorrected):
        kind = "correction"
        changes = []
        if previous is not None:
            for name, old, new in zip(
                ("qty", "price", "fee"),
                previous,
                (event.qty, event.price, event.fee),
                strict=True,
            ):
                if old != new:
                    changes.append(f"{name} {decimal_text(old)} → {decimal_text(new)}")
        detail = f"corrects {event.exec_id}: " + (", ".join(changes) or "no change")
    else:
        kind = "bust"
        detail = f"busts {event.exec_id}"
    if restatement is not None:
        detail += "; " + _restatement(restatement)
    return {
        "seq": 0,
        "position": row.position,
        "type": kind,
        "exec_id": event.exec_id,
        "occurred_at": event.occurred_at,
        "recorded_at": row.recorded_at,
        "side": None,
        "qty": event.qty if isinstance(event, FillCorrected) else None,
        "price": event.price if isinstance(event, FillCorrected) else None,
        "fee": event.fee if isinstance(event, FillCorrected) else None,
        "status": "",
        "qty_after": None,
        "realized_pnl": None,
        "cum_realized_pnl": None,
        "restated": "",
        "detail": detail,
    }


# ------------------------------------------------------------------ explain


async def explain(
    conn: asyncpg.Connection,
    account: str,
    contract: str,
    *,
    clock: Clock = "as_of",
    at: datetime | None = None,
    recorded_by: datetime | None = None,
) -> dict[str, Any]:
    """Return the position at ``at`` and the FIFO lots that make it up.

    Each lot is traced to the fill that opened it: its execution id, order id, log
    position, ``occurred_at`` and ``recorded_at``, and the fill's (effective) quantity,
    of which the lot is what is still open.

    Raises:
        AuditError: the position has no fills on this clock, or its contract has no
            instrument.
    """
    stream = f"{account}/{contract}"
    occurred_by, recorded_by = _window(clock, at, recorded_by)
    rows = await load_stream(conn, stream, occurred_by=occurred_by, recorded_by=recorded_by)
    if not any(isinstance(r.event, FillRecorded) for r in rows):
        raise AuditError(f"account {account!r} contract {contract!r}: no fills in the log")
    await _instrument(conn, contract)
    generation = await serving_generation(conn) or 0
    view = await stream_at(
        conn, generation, stream, clock, at, with_effects=True, recorded_by=recorded_by
    )
    state: PositionState = view.state
    effect_of = {e.exec_id: e for e in view.effects or ()}
    origin: dict[str, StreamRow] = {}
    for r in rows:
        if isinstance(r.event, FillRecorded):
            origin.setdefault(r.event.exec_id, r)
    lots = []
    for lot in state.lots:
        source = origin.get(lot.exec_id)
        fill = source.event if source else None
        effect = effect_of.get(lot.exec_id)
        lots.append(
            {
                "exec_id": lot.exec_id,
                "qty": lot.qty,
                "price": lot.price,
                "opened_at": lot.opened_at,
                "fill_position": source.position if source else None,
                "fill_occurred_at": fill.occurred_at if fill else None,
                "fill_recorded_at": source.recorded_at if source else None,
                "order_id": fill.order_id if isinstance(fill, FillRecorded) else None,
                "fill_side": effect.side.value if effect else None,
                "fill_qty": effect.qty if effect else None,
            }
        )
    return {
        "account": account,
        "contract": contract,
        "clock": clock,
        "at": at,
        "signed_qty": state.signed_qty,
        "side": state.side,
        "avg_open_price": state.avg_open_price("fifo"),
        "avg_open_price_wac": state.avg_open_price("wac"),
        "realized_pnl": state.realized_fifo,
        "fees": state.fees,
        "opened_at": state.opened_at,
        "last_fill_at": state.last_fill_at,
        "fill_count": state.fill_count,
        "lots": lots,
        **({} if recorded_by is None else {"as_known_at": recorded_by}),
    }


# ------------------------------------------------------------------ verify


async def verify(
    conn: asyncpg.Connection,
    *,
    check_projections: bool = True,
    progress: Callable[[int], None] | None = None,
    stream_progress: Callable[[int], None] | None = None,
) -> VerifyReport:
    """Check the log's hash chains, stream heads and seals, and the projections.

    Args:
        conn: a connection on the ledger's database.
        check_projections: also compare each serving position with a fresh replay of
            its stream (catch the projections up first, or a lagging one disagrees).
        progress: called with the number of events whose hash chain was checked.
        stream_progress: called with 1 for each stream replayed against its projection.

    Returns:
        The report; ``report.problems`` lists the log's findings
        (:func:`ledger.integrity.verify_log`), then the projections'.
    """
    if not check_projections:
        return await verify_log(conn, progress=progress)
    replayed = _Replays(await _instrument_grids(conn))
    report = await verify_log(conn, progress=progress, on_stream=replayed.take)
    await _verify_projections(conn, report, stream_progress, replayed.states)
    return report


class _Replays:
    """Each stream replayed from the rows the chain walk read (the log is read once for
    both halves of verify), parsed and folded as the runner does it. A stream that does
    not replay so is left out: the one-stream replay then names why."""

    def __init__(self, grids: dict[str, tuple[Decimal, Decimal]]) -> None:
        self.grids = grids
        self.states: dict[str, PositionState] = {}

    def take(self, stream: str, trades: list[tuple[int, str, str]]) -> None:
        account, _, contract = stream.partition("/")
        grid = self.grids.get(contract)
        if grid is None:
            return
        try:
            rows = [stream_row(p, kind, payload, _NEVER_READ) for p, kind, payload in trades]
            state = replay_rows(new_state(account, contract, *grid), rows)
        except Exception:  # a fault, a payload that does not parse: the slow path's call
            return
        self.states[stream] = state


# replay_rows never reads a row's recorded_at; the chain walk does not fetch it
_NEVER_READ = datetime.min.replace(tzinfo=UTC)


async def _instrument_grids(conn: asyncpg.Connection) -> dict[str, tuple[Decimal, Decimal]]:
    """Every contract's (point value, tick size), from its first instrument event."""
    grids: dict[str, tuple[Decimal, Decimal]] = {}
    for (payload,) in await conn.fetch(INSTRUMENTS_SQL):
        data = orjson.loads(payload)
        grids.setdefault(data["contract"], instrument_grid_of(data))
    return grids


def _comparable(state: PositionState) -> dict[str, object]:
    data = state.to_json()
    for key in ("signed_qty", "realized_fifo", "realized_wac", "fees", "wac_basis"):
        data[key] = decimal_text(Decimal(str(data[key])))
    return data


async def _verify_projections(
    conn: asyncpg.Connection,
    report: VerifyReport,
    progress: Callable[[int], None] | None = None,
    replayed: dict[str, PositionState] | None = None,
) -> None:
    generation = await serving_generation(conn)
    if generation is None:
        return
    projected = await projected_states(conn, generation)
    streams = await fill_streams(conn)
    faulted = {f.stream: f for f in await stream_faults(conn, generation)}
    for stream in sorted(set(streams) | projected.keys() | faulted.keys()):
        report.projections_checked += 1
        if progress is not None:
            progress(1)
        try:
            fresh = (replayed or {}).get(stream)
            if fresh is None:
                view = await stream_at(conn, generation, stream, "now", None, snapshots=False)
                fresh = view.state
        except StreamFaulted as exc:
            known = faulted.get(stream)
            if known is None or known.position != exc.position:
                report.problems.append(
                    Problem(
                        "PROJECTION_MISMATCH",
                        f"stream {stream!r}: does not replay, and the projections do not "
                        f"hold it as faulted there ({exc})",
                        stream,
                    )
                )
            continue  # faulted, as recorded: listed apart (faulted_streams), not tamper
        except Exception as exc:  # a tampered log may not replay at all
            report.problems.append(
                Problem("PROJECTION_MISMATCH", f"stream {stream!r}: cannot replay ({exc})", stream)
            )
            continue
        stored = projected.get(stream)
        if stream in faulted:
            report.problems.append(
                Problem(
                    "PROJECTION_MISMATCH",
                    f"stream {stream!r}: held as faulted, but it replays",
                    stream,
                )
            )
            continue
        if stored is None:
            report.problems.append(
                Problem(
                    "PROJECTION_MISMATCH",
                    f"stream {stream!r}: has fills but no projected position",
                    stream,
                )
            )
            continue
        state = PositionState.from_json(orjson.loads(stored))
        if _comparable(state) != _comparable(fresh):
            report.problems.append(
                Problem(
                    "PROJECTION_MISMATCH",
                    f"stream {stream!r}: projected position (signed_qty "
                    f"{decimal_text(state.signed_qty)}, "
                    f"realized {decimal_text(state.realized_fifo)}) differs "
                    f"from a fresh replay (signed_qty {decimal_text(fresh.signed_qty)}, realized "
                    f"{decimal_text(fresh.realized_fifo)})",
                    stream,
                )
            )
