"""Answers for the CLI: positions, P&L and history, now or on either clock.

Current answers read the serving generation's rows. Time travel answers from the
per-stream snapshots plus a replay of the stream's tail:

- ``as_of`` (event time): everything we now know happened up to T. The newest snapshot
  whose last fill is at or before T, plus the stream's later events with fills up to T.
- ``as_known_at`` (knowledge time): only what had been recorded by T. The newest snapshot
  built from knowledge recorded by T, plus the stream's later events recorded by T.
- both at once (``as_of`` T1 with ``recorded_by`` T2): what we believed at T2 about T1. The
  stream's events recorded by T2, its fills kept up to T1, replayed from the start (a
  snapshot holds knowledge of one clock only).

A tail that would restate fills inside the snapshot (a late fill before its last fill,
or a bust or correction of an execution it holds) falls back to a full replay of the
stream under the same filter, so the answer is exact either way; the cost grows with
one stream's tail, never with the length of the log.

A stream that holds an event the fold cannot apply is faulted (:mod:`projections.faults`):
a query naming that one stream raises :class:`ledger.errors.StreamFaulted`, which names
the event and the way out; a query over many streams answers for the others and lists
the faulted ones in its ``faults`` argument, when given.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, time
from decimal import Decimal
from typing import Any, Literal
from zoneinfo import ZoneInfo

import asyncpg
import orjson

from ledger.errors import StreamFaulted
from ledger.events import FillBusted, FillCorrected, FillRecorded, event_from_stored
from ledger.store import (
    first_fill_of,
    instrument_payload,
    latest_mark,
    stream_rows_known_at,
    stream_tail_as_known_at,
    stream_tail_as_of,
    stream_trade_payloads,
)
from ledger.values import instrument_grid_of
from projections.faults import UNFOLDABLE, StreamFault, culprit_in_events
from projections.pagefold import (
    R_EXEC_ID,
    R_OCCURRED_AT,
    R_TYPE,
    StreamRow,
    replay_rows,
    standing_fills,
    stream_row,
)
from projections.pnl import PnlRow, aggregate, trading_day
from projections.positions import (
    FillEffect,
    Method,
    PositionState,
    apply_fill,
    is_in_order,
    new_state,
    replay,
    unrealized,
)
from projections.store import (
    history_records,
    pnl_daily_records,
    pnl_fill_records,
    position_records,
    serving_generation,
    snapshot_before,
    stream_faults,
)

__all__ = [
    "Clock",
    "StreamFault",
    "StreamView",
    "faulted_streams",
    "history_rows",
    "instrument_currency",
    "instrument_display",
    "instrument_grid",
    "pnl_rows",
    "position_rows",
    "serving_generation",
    "stream_at",
]

Clock = Literal["now", "as_of", "as_known_at"]
StreamEvent = FillRecorded | FillBusted | FillCorrected

_FAR_FUTURE = datetime(9999, 1, 1, tzinfo=UTC)
_NO_POSITION = 2**63 - 1  # above every log position
_SNAPSHOT_TRIES = 3  # snapshots tried, each earlier than the fill the last one restated


@dataclass(frozen=True, slots=True)
class StreamView:
    """One position at a point in time, with the effects that made it (when asked for).

    ``replayed``: the state was folded from the stream's first fill, not from a snapshot.
    """

    state: PositionState
    effects: tuple[FillEffect, ...] | None = None
    replayed: bool = False


async def instrument_grid(
    conn: asyncpg.Connection, contract: str
) -> tuple[Decimal, Decimal] | None:
    """Return a contract's (point value, tick size) from its instrument event, if any."""
    payload = await instrument_payload(conn, contract)
    if payload is None:
        return None
    return instrument_grid_of(orjson.loads(payload))


async def instrument_currency(conn: asyncpg.Connection, contract: str) -> str:
    """Return a contract's currency from its instrument event (USD when undefined)."""
    payload = await instrument_payload(conn, contract)
    if payload is None:
        return "USD"
    currency: str = orjson.loads(payload).get("currency") or "USD"
    return currency


async def instrument_display(conn: asyncpg.Connection, contract: str) -> tuple[Decimal, str] | None:
    """Return a contract's (tick size, currency) from its instrument event, if any."""
    payload = await instrument_payload(conn, contract)
    if payload is None:
        return None
    data = orjson.loads(payload)
    return Decimal(data["tick_size"]), str(data.get("currency") or "USD")


async def _instrument(conn: asyncpg.Connection, contract: str) -> tuple[Decimal, Decimal]:
    grid = await instrument_grid(conn, contract)
    if grid is None:
        raise LookupError(f"contract: no instrument event defines {contract!r}")
    return grid


def _decode(rows: Iterable[Any]) -> list[tuple[int, StreamEvent]]:
    out: list[tuple[int, StreamEvent]] = []
    for position, payload in rows:
        event = event_from_stored(orjson.loads(payload))
        assert isinstance(event, FillRecorded | FillBusted | FillCorrected)
        out.append((position, event))
    return out


async def stream_at(
    conn: asyncpg.Connection,
    generation: int,
    stream: str,
    clock: Clock,
    at: datetime | None,
    *,
    with_effects: bool = False,
    recorded_by: datetime | None = None,
    snapshots: bool = True,
) -> StreamView:
    """Return one stream's position on ``clock`` at ``at`` (snapshot + tail, exact).

    With ``clock="as_of"`` and ``recorded_by``: both clocks at once, the position at
    event time ``at`` from only the events recorded by ``recorded_by``. Without
    ``snapshots`` (and without effects) the state is a replay of the stream's rows
    from its start, parsed and folded as the runner does: what ``verify`` compares
    the projections with.

    Raises:
        StreamFaulted: what the clock sees of the stream holds an event the fold
            cannot apply (or its contract has no instrument); the error names it.
    """
    try:
        return await _stream_at(
            conn, generation, stream, clock, at, with_effects, recorded_by, snapshots
        )
    except UNFOLDABLE as exc:
        raise (await _fault_at(conn, stream, clock, at, recorded_by, exc)).error() from None


async def _fault_at(
    conn: asyncpg.Connection,
    stream: str,
    clock: Clock,
    at: datetime | None,
    recorded_by: datetime | None,
    error: BaseException,
) -> StreamFault:
    """Find the event that keeps ``stream`` from folding on ``clock`` at ``at``."""
    when = at or _FAR_FUTURE
    if clock == "as_known_at":
        events = _decode(await stream_trade_payloads(conn, stream, when))
    else:
        events = [
            (p, e)
            for p, e in _decode(await stream_trade_payloads(conn, stream, recorded_by))
            if not isinstance(e, FillRecorded) or e.occurred_at <= when
        ]
    grid = await instrument_grid(conn, stream.split("/", 1)[1])
    culprit, event_id = culprit_in_events(stream, events, grid, error)
    return StreamFault(stream, culprit.position, event_id, culprit.exec_id, culprit.reason)


async def faulted_streams(
    conn: asyncpg.Connection, *, account: str | None = None, contract: str | None = None
) -> list[StreamFault]:
    """Return the streams the serving projections hold as faulted (of one account
    and/or contract), with the offending event of each."""
    generation = await serving_generation(conn)
    if generation is None:
        return []
    return await stream_faults(conn, generation, account, contract)


async def _streams_in_scope(
    conn: asyncpg.Connection, generation: int, account: str | None, contract: str | None
) -> list[str]:
    """Return the streams a query over (account, contract) covers on a past clock:
    projected ones and faulted ones (which may fold at an earlier time)."""
    projected = [r[0] for r in await position_records(conn, generation, account, contract)]
    faulted = [f.stream for f in await stream_faults(conn, generation, account, contract)]
    return sorted(set(projected) | set(faulted), key=lambda s: tuple(s.split("/", 1)))


def _set_aside(exc: StreamFaulted, faults: list[StreamFault] | None, single: bool) -> None:
    """Leave a faulted stream out of a query over many streams, or raise for one."""
    if single:
        raise exc
    if faults is not None:
        faults.append(StreamFault(exc.stream, exc.position, exc.event_id, exc.exec_id, exc.reason))


async def _current_faults(
    conn: asyncpg.Connection,
    generation: int,
    account: str | None,
    contract: str | None,
    faults: list[StreamFault] | None,
) -> None:
    """Raise for a query on one faulted stream; else list the faulted streams in scope."""
    found = await stream_faults(conn, generation, account, contract)
    if found and account is not None and contract is not None:
        raise found[0].error()
    if faults is not None:
        faults.extend(found)


async def _stream_at(
    conn: asyncpg.Connection,
    generation: int,
    stream: str,
    clock: Clock,
    at: datetime | None,
    with_effects: bool,
    recorded_by: datetime | None,
    snapshots: bool = True,
) -> StreamView:
    account, contract = stream.split("/", 1)
    point_value, tick_size = await _instrument(conn, contract)
    when = at or _FAR_FUTURE
    if clock == "as_of" and recorded_by is not None:
        events = [
            (p, e)
            for p, e in _decode(await stream_trade_payloads(conn, stream, recorded_by))
            if not isinstance(e, FillRecorded) or e.occurred_at <= when
        ]
        state, effects = replay(account, contract, point_value, tick_size, events)
        return StreamView(state, tuple(effects), replayed=True)
    known_at = clock == "as_known_at"
    if not with_effects:
        before: tuple[datetime, int] = (_FAR_FUTURE, _NO_POSITION)
        for tries in range(_SNAPSHOT_TRIES + 1 if snapshots else 0):
            snap = None
            if tries < _SNAPSHOT_TRIES:
                snap = await snapshot_before(conn, generation, stream, known_at, when, before)
            if snap is not None:
                state = PositionState.from_json(orjson.loads(snap["state"]))
                known = snap["known_position"]
            elif known_at:
                break
            else:
                # no snapshot before T, or none the later rows leave standing: the
                # stream's start, and its fills up to T (not every row of it)
                state = new_state(account, contract, point_value, tick_size)
                known = 0
            if known_at:
                tail_rows: Iterable[Any] = await stream_tail_as_known_at(conn, stream, known, when)
            else:
                tail_rows = await stream_tail_as_of(conn, stream, known, when)
            tail = [stream_row(p, kind, payload, rec) for p, kind, payload, rec in tail_rows]
            folded = _fold_tail(state, tail, known_at, when)
            if isinstance(folded, PositionState):
                return StreamView(folded)
            if snap is None:
                break  # the stream does not fold from its start: the replay names why
            # the tail changes a fill the snapshot holds: an earlier snapshot may not
            if isinstance(folded, list):
                first = await first_fill_of(conn, stream, folded)
                if first is None:
                    break
                folded = first
            before = min(before, folded)
        # the whole stream: parsed as the runner parses it, folded by the runner's fold
        rows = [
            stream_row(position, kind, payload, recorded)
            for position, kind, payload, recorded in await stream_rows_known_at(
                conn, stream, when if known_at else _FAR_FUTURE
            )
        ]
        if not known_at:
            rows = [r for r in rows if r[R_TYPE] != "fill" or r[R_OCCURRED_AT] <= when]
        flat = new_state(account, contract, point_value, tick_size)
        return StreamView(replay_rows(flat, rows), replayed=True)
    if known_at:
        events = _decode(await stream_trade_payloads(conn, stream, when))
    else:
        events = [
            (p, e)
            for p, e in _decode(await stream_trade_payloads(conn, stream))
            if not isinstance(e, FillRecorded) or e.occurred_at <= when
        ]
    state, effects = replay(account, contract, point_value, tick_size, events)
    return StreamView(state, tuple(effects), replayed=True)


def _fold_tail(
    state: PositionState, tail: list[StreamRow], known_at: bool, when: datetime
) -> PositionState | tuple[datetime, int] | list[str]:
    """Fold a snapshot's tail into it, unless the tail restates the snapshot.

    The snapshot holds everything known when it was taken; the tail holds what was
    recorded after it (and, for event time, fills later than its last fill). A fill
    that sorts before the snapshot's last fill, or a bust or correction of a fill not in
    the tail, would restate it: then the key of that fill, or the executions whose
    fills the snapshot may hold, is returned, and the caller tries an earlier snapshot
    (or replays the whole stream). The rows are parsed as the runner parses them (no
    pydantic: a tail from a stream's start may hold thousands).
    """
    if not known_at:
        tail = [r for r in tail if r[R_TYPE] != "fill" or r[R_OCCURRED_AT] <= when]
    fills = {r[R_EXEC_ID] for r in tail if r[R_TYPE] == "fill"}
    outside = sorted(
        {r[R_EXEC_ID] for r in tail if r[R_TYPE] != "fill" and r[R_EXEC_ID] not in fills}
    )
    if outside:
        return outside
    for fill in standing_fills(tail):
        if not is_in_order(state, fill.occurred_at, fill.position):
            return (fill.occurred_at, fill.position)
        apply_fill(state, fill)
    return state


async def _mark(
    conn: asyncpg.Connection,
    contract: str,
    clock: Clock,
    at: datetime | None,
    recorded_by: datetime | None = None,
) -> Decimal | None:
    now = datetime.now(UTC)
    occurred = at if clock == "as_of" and at else (at if clock == "as_known_at" and at else now)
    recorded = at if clock == "as_known_at" and at else (recorded_by or _FAR_FUTURE)
    mark = await latest_mark(conn, contract, occurred, recorded)
    return Decimal(mark[0]) if mark else None


def _position_row(state: PositionState, method: Method, mark: Decimal | None) -> dict[str, Any]:
    return {
        "account": state.account,
        "contract": state.contract,
        "signed_qty": state.signed_qty,
        "side": state.side,
        "avg_open_price": state.avg_open_price(method),
        "realized_pnl": state.realized(method),
        "fees": state.fees,
        "net_realized_pnl": state.net_realized(method),
        "unrealized_pnl": None if mark is None else unrealized(state, mark, method),
        "mark_price": mark,
        "opened_at": state.opened_at,
        "last_fill_at": state.last_fill_at,
        "method": method,
    }


async def position_rows(
    conn: asyncpg.Connection,
    *,
    account: str | None = None,
    contract: str | None = None,
    method: Method = "fifo",
    clock: Clock = "now",
    at: datetime | None = None,
    include_flat: bool = False,
    recorded_by: datetime | None = None,
    faults: list[StreamFault] | None = None,
) -> list[dict[str, Any]]:
    """Return positions (JSON-ready: decimals stay Decimal) on the given clock.

    ``recorded_by`` with ``clock="as_of"``: both clocks at once (see :func:`stream_at`).
    Faulted streams are left out and appended to ``faults`` (when given).

    Raises:
        StreamFaulted: ``account`` and ``contract`` name one stream, and it is faulted.
    """
    generation = await serving_generation(conn)
    if generation is None:
        return []
    single = account is not None and contract is not None
    out = []
    marks: dict[str, Decimal | None] = {}
    rows: list[tuple[str, str, str | None]]
    if clock == "now":
        await _current_faults(conn, generation, account, contract, faults)
        rows = [
            (r[0], r[2], r[3]) for r in await position_records(conn, generation, account, contract)
        ]
    else:
        scope = await _streams_in_scope(conn, generation, account, contract)
        rows = [(s, s.split("/", 1)[1], None) for s in scope]
    for stream, ctr, state_json in rows:
        if state_json is not None:
            state = PositionState.from_json(orjson.loads(state_json))
        else:
            try:
                view = await stream_at(conn, generation, stream, clock, at, recorded_by=recorded_by)
            except StreamFaulted as exc:
                _set_aside(exc, faults, single)
                continue
            state = view.state
            if state.fill_count == 0:
                continue  # the position did not exist yet at that time
        if state.signed_qty == 0 and not include_flat:
            continue
        if ctr not in marks:
            marks[ctr] = await _mark(conn, ctr, clock, at, recorded_by)
        out.append(_position_row(state, method, marks[ctr]))
    return out


async def pnl_rows(
    conn: asyncpg.Connection,
    *,
    by: Literal["fill", "day", "account"] = "day",
    account: str | None = None,
    date_from: date | None = None,
    date_to: date | None = None,
    clock: Clock = "now",
    at: datetime | None = None,
    session_start: time | None = None,
    session_tz: ZoneInfo | None = None,
    recorded_by: datetime | None = None,
    faults: list[StreamFault] | None = None,
) -> list[PnlRow]:
    """Return realized P&L (FIFO and WAC) per fill, per trading day or per account.

    Faulted streams are left out and appended to ``faults`` (when given).

    Every row carries its currency: amounts in different currencies are never added
    together (:func:`projections.pnl.aggregate` does the sums), so an account that
    trades in two currencies gets one row per currency. Rows come sorted by account,
    contract, day and currency.
    """
    generation = await serving_generation(conn)
    if generation is None:
        return []
    currencies: dict[str, str] = {}

    async def currency(contract: str) -> str:
        if contract not in currencies:
            currencies[contract] = await instrument_currency(conn, contract)
        return currencies[contract]

    raw: list[PnlRow] = []
    if clock == "now":
        await _current_faults(conn, generation, account, None, faults)
        if by == "fill":
            for r in await pnl_fill_records(conn, generation, account, date_from, date_to):
                raw.append(
                    PnlRow(
                        account=r["account"],
                        contract=r["contract"],
                        day=r["day"],
                        exec_id=r["exec_id"],
                        realized_fifo=r["realized_fifo"],
                        realized_wac=r["realized_wac"],
                        fees=r["fees"],
                        fills=1,
                        currency=await currency(r["contract"]),
                    )
                )
        else:
            for r in await pnl_daily_records(conn, generation, account, date_from, date_to):
                raw.append(
                    PnlRow(
                        account=r["account"],
                        contract=r["contract"],
                        day=r["day"],
                        exec_id=None,
                        realized_fifo=r["realized_fifo"],
                        realized_wac=r["realized_wac"],
                        fees=r["fees"],
                        fills=r["fills"],
                        currency=await currency(r["contract"]),
                    )
                )
    else:
        for stream in await _streams_in_scope(conn, generation, account, None):
            contract = stream.split("/", 1)[1]
            try:
                view = await stream_at(
                    conn, generation, stream, clock, at, with_effects=True, recorded_by=recorded_by
                )
            except StreamFaulted as exc:
                _set_aside(exc, faults, False)
                continue
            for e in view.effects or ():
                day = trading_day(e.occurred_at, session_start, session_tz)
                if (date_from and day < date_from) or (date_to and day > date_to):
                    continue
                raw.append(
                    PnlRow(
                        account=view.state.account,
                        contract=view.state.contract,
                        day=day,
                        exec_id=e.exec_id,
                        realized_fifo=e.realized_fifo,
                        realized_wac=e.realized_wac,
                        fees=e.fee,
                        fills=1,
                        currency=await currency(contract),
                    )
                )
    rows = aggregate(raw, by)
    rows.sort(key=lambda g: (g.account, g.contract or "", str(g.day or ""), g.currency))
    return rows


async def history_rows(
    conn: asyncpg.Connection,
    *,
    account: str,
    contract: str,
    time_from: datetime | None = None,
    time_to: datetime | None = None,
    clock: Clock = "now",
    at: datetime | None = None,
    session_start: time | None = None,
    session_tz: ZoneInfo | None = None,
    recorded_by: datetime | None = None,
) -> list[dict[str, Any]]:
    """Return every change of one position (detail and compacted end-of-day rows).

    Raises:
        StreamFaulted: the stream is faulted (on the clock asked).
    """
    generation = await serving_generation(conn)
    if generation is None:
        return []
    stream = f"{account}/{contract}"
    if clock == "now":
        await _current_faults(conn, generation, account, contract, None)
        rows = await history_records(conn, generation, stream, time_from, time_to)
        return [
            {
                "position": r["position"],
                "kind": r["kind"],
                "exec_id": r["exec_id"],
                "occurred_at": r["occurred_at"],
                "day": r["day"],
                "side": r["side"],
                "qty": r["qty"],
                "price": r["price"],
                "qty_before": r["qty_before"],
                "qty_after": r["qty_after"],
                "realized_fifo": r["realized_fifo"],
                "realized_wac": r["realized_wac"],
                "cum_realized_fifo": r["cum_realized_fifo"],
                "cum_realized_wac": r["cum_realized_wac"],
                "fees": r["fees"],
            }
            for r in rows
        ]
    view = await stream_at(
        conn, generation, stream, clock, at, with_effects=True, recorded_by=recorded_by
    )
    out = []
    cum_fifo = cum_wac = Decimal(0)
    for e in view.effects or ():
        cum_fifo += e.realized_fifo
        cum_wac += e.realized_wac
        if (time_from and e.occurred_at < time_from) or (time_to and e.occurred_at > time_to):
            continue
        out.append(
            {
                "position": e.position,
                "kind": "detail",
                "exec_id": e.exec_id,
                "occurred_at": e.occurred_at,
                "day": trading_day(e.occurred_at, session_start, session_tz),
                "side": e.side.value,
                "qty": e.qty,
                "price": e.price,
                "qty_before": e.qty_before,
                "qty_after": e.qty_after,
                "realized_fifo": e.realized_fifo,
                "realized_wac": e.realized_wac,
                "cum_realized_fifo": cum_fifo,
                "cum_realized_wac": cum_wac,
                "fees": e.fee,
            }
        )
    return out
