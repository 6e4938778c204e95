"""End-of-day reconciliation: the ledger's positions against the broker's, as breaks.

For each account and contract, the ledger's position as of the cutoff (event time, a
full replay of the stream: :func:`projections.queries.stream_at`) is compared with the
broker's: the last ``broker_position`` event at or before the cutoff, or a broker
statement file. Nothing is ever repaired: a run only reports, and is appended to the log
as one ``ReconciliationCompleted`` event.

Break types:

- ``POSITION_QTY_BREAK``: both sides open, different signed quantities.
- ``AVG_PRICE_BREAK``: same quantity, average open prices further apart than the
  tolerance (default half a tick). The ledger's side is the FIFO average of its open lots.
- ``MISSING_AT_BROKER``: the ledger is open, the broker flat or silent.
- ``MISSING_IN_LEDGER``: the broker is open, the ledger flat or without the stream.
- ``STALE_BROKER_REPORT``: the broker's last report predates fills the ledger has (fills
  after the report and at or before the cutoff). The report is then compared with the
  ledger as of the report's own time, so a stale report that was right when sent yields
  this break alone.
- ``REALIZED_PNL_BREAK``: the sum of the broker's own P&L (``FillRecorded.broker_pnl``)
  over the cutoff's trading day differs from the ledger's gross FIFO realized P&L for
  those same fills by more than the P&L tolerance.

``difference`` is always ledger minus broker. Each break lists the execution ids since
the last matching point: the fills after the last earlier broker report that matched the
ledger, or every fill of the stream up to the cutoff when no report ever matched.

Run ids and break ids are content hashes: re-running the same cutoff against the same
log (or file) yields the same ids, and appending the same run twice is a no-op.

Exceptions::

    LedgerError
    └── ReconciliationError     a broker statement or a stored run cannot be used
"""

from __future__ import annotations

import csv
import hashlib
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, time
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
import orjson

from ledger.errors import InvalidRecord, LedgerError
from ledger.events import (
    BreakRecord,
    ReconciliationCompleted,
    canonical_value,
    decimal_text,
    decode_json,
    event_from_stored,
)
from ledger.sources import convert_projectx
from ledger.store import (
    EventStore,
    broker_pnl_rows,
    broker_report_rows,
    has_fills_by,
    reconciled_streams,
    reconciliation_run,
)
from ledger.values import ID_PATTERN, to_decimal
from projections.pnl import trading_day
from projections.positions import FillEffect, FillInput, apply_fill, new_state
from projections.queries import instrument_grid, serving_generation, stream_at

__all__ = [
    "BREAK_TYPES",
    "BrokerLine",
    "BrokerStatement",
    "Comparison",
    "Proposal",
    "ReconciliationError",
    "ReconciliationResult",
    "break_id",
    "load_run",
    "parse_statement",
    "propose",
    "reconcile",
    "record_run",
    "run_as_dict",
]

POSITION_QTY_BREAK = "POSITION_QTY_BREAK"
AVG_PRICE_BREAK = "AVG_PRICE_BREAK"
MISSING_AT_BROKER = "MISSING_AT_BROKER"
MISSING_IN_LEDGER = "MISSING_IN_LEDGER"
STALE_BROKER_REPORT = "STALE_BROKER_REPORT"
REALIZED_PNL_BREAK = "REALIZED_PNL_BREAK"
BREAK_TYPES = (
    POSITION_QTY_BREAK,
    AVG_PRICE_BREAK,
    MISSING_AT_BROKER,
    MISSING_IN_LEDGER,
    STALE_BROKER_REPORT,
    REALIZED_PNL_BREAK,
)
_QTY_TYPES = frozenset({POSITION_QTY_BREAK, MISSING_AT_BROKER, MISSING_IN_LEDGER})
_ZERO = Decimal(0)
_LOG_SOURCE = "broker_position"


class ReconciliationError(LedgerError):
    """A broker statement cannot be read, or a stored run cannot be found."""


# ------------------------------------------------------------------ broker side


@dataclass(frozen=True, slots=True)
class BrokerLine:
    """What the broker says about one account and contract."""

    account: str
    contract: str
    signed_qty: Decimal
    avg_price: Decimal | None
    occurred_at: datetime | None = None
    position: int | None = None  # log position of the report, None for a file line


@dataclass(frozen=True, slots=True)
class BrokerStatement:
    """A broker statement file: one line per account and contract."""

    name: str
    sha256: str
    lines: Mapping[tuple[str, str], BrokerLine]

    @property
    def source(self) -> str:
        """Return the run's source: the file's name and content hash."""
        return f"file:{self.name}:{self.sha256[:16]}"


def _ident(value: object, field: str, where: str) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not ID_PATTERN.fullmatch(value):
        raise ReconciliationError(
            f"{where}: {field} must be 1-64 characters of [A-Za-z0-9._-], got {value!r}"
        )
    return value


def _number(value: object, field: str, where: str) -> Decimal:
    try:
        return to_decimal(value)
    except ValueError as exc:
        raise ReconciliationError(f"{where}: {field}: {exc}") from None


def _add(lines: dict[tuple[str, str], BrokerLine], line: BrokerLine, where: str) -> None:
    key = (line.account, line.contract)
    if key in lines:
        raise ReconciliationError(
            f"{where}: account {line.account!r} contract {line.contract!r} appears twice "
            "in the statement"
        )
    lines[key] = line


def parse_statement(data: bytes, name: str) -> BrokerStatement:
    """Parse a broker statement: CSV or a ProjectX ``searchOpen`` JSON response.

    CSV has the header ``account,contract,signed_qty,avg_price`` (``avg_price`` may be
    empty). JSON is ``{"positions": [{"accountId", "contractId", "type": 1|2, "size",
    "averagePrice"}, ...]}``; numbers are decoded as exact decimals.

    Args:
        data: the file's bytes.
        name: the file's name, for messages and the run's source.

    Raises:
        ReconciliationError: the file is neither format, or a line has a bad field; the
            message names the line, the field and the value.
    """
    digest = hashlib.sha256(data).hexdigest()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ReconciliationError(
            f"{name}: not UTF-8 text ({exc.reason} at byte {exc.start})"
        ) from None
    lines: dict[tuple[str, str], BrokerLine] = {}
    if text.lstrip().startswith(("{", "[")):
        _parse_projectx(text, name, lines)
    else:
        _parse_csv(text, name, lines)
    return BrokerStatement(name=name, sha256=digest, lines=lines)


def _parse_projectx(text: str, name: str, lines: dict[tuple[str, str], BrokerLine]) -> None:
    try:
        document = decode_json(text)
    except ValueError as exc:
        raise ReconciliationError(f"{name}: not valid JSON: {exc}") from None
    positions = document.get("positions") if isinstance(document, dict) else document
    if not isinstance(positions, list):
        raise ReconciliationError(
            f"{name}: positions: expected a list of ProjectX positions, got "
            f"{type(positions).__name__}"
        )
    for index, item in enumerate(positions):
        where = f"{name}: positions[{index}]"
        if not isinstance(item, dict):
            raise ReconciliationError(f"{where}: expected an object, got {item!r}")
        try:
            (record,) = convert_projectx(item)
        except InvalidRecord as exc:
            raise ReconciliationError(f"{where}: {exc.message}") from None
        avg = record.get("avg_price")
        _add(
            lines,
            BrokerLine(
                account=_ident(record.get("account"), "accountId", where),
                contract=_ident(record.get("contract"), "contractId", where),
                signed_qty=_number(record.get("signed_qty"), "size", where),
                avg_price=None if avg is None else _number(avg, "averagePrice", where),
            ),
            where,
        )


_CSV_HEADER = ("account", "contract", "signed_qty", "avg_price")


def _parse_csv(text: str, name: str, lines: dict[tuple[str, str], BrokerLine]) -> None:
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if header is None:
        raise ReconciliationError(f"{name}: empty file (expected a CSV header or JSON)")
    columns = [c.strip().lower() for c in header]
    missing = [c for c in _CSV_HEADER[:3] if c not in columns]
    if missing:
        raise ReconciliationError(
            f"{name}:1: header: missing column {missing[0]!r} (expected "
            f"{','.join(_CSV_HEADER)}, got {','.join(header)!r})"
        )
    for number, row in enumerate(reader, start=2):
        if not any(cell.strip() for cell in row):
            continue
        where = f"{name}:{number}"
        if len(row) != len(columns):
            raise ReconciliationError(
                f"{where}: expected {len(columns)} cells, got {len(row)}: {','.join(row)!r}"
            )
        cells = {c: v.strip() for c, v in zip(columns, row, strict=True)}
        avg = cells.get("avg_price", "")
        _add(
            lines,
            BrokerLine(
                account=_ident(cells["account"], "account", where),
                contract=_ident(cells["contract"], "contract", where),
                signed_qty=_number(cells["signed_qty"], "signed_qty", where),
                avg_price=_number(avg, "avg_price", where) if avg else None,
            ),
            where,
        )


# ------------------------------------------------------------------ results


@dataclass(frozen=True, slots=True)
class Proposal:
    """The fill that would close a quantity break (printed, never appended).

    ``price`` reproduces the broker's average open price when the fill adds to the
    position or flips it: ``(broker_qty x broker_avg - ledger_qty x ledger_avg) /
    (broker_qty - ledger_qty)`` with the ledger's FIFO average of open lots. A fill that
    only reduces the position cannot move the average of the lots that remain, so it
    has no price then (``None``) and ``note`` says why.
    """

    break_id: str
    account: str
    contract: str
    side: str
    qty: Decimal
    price: Decimal | None
    note: str = ""


@dataclass(frozen=True, slots=True)
class ReconciliationResult:
    """A run: the event to append, and the fills that would close its quantity breaks."""

    event: ReconciliationCompleted
    proposals: tuple[Proposal, ...]


@dataclass(slots=True)
class Comparison:
    """The two sides of one position at the point they were compared."""

    account: str
    contract: str
    ledger_qty: Decimal
    ledger_avg: Decimal | None
    broker_qty: Decimal
    broker_avg: Decimal | None


def break_id(
    kind: str,
    account: str,
    contract: str,
    cutoff: datetime,
    ledger_value: str | None,
    broker_value: str | None,
) -> str:
    """Return the deterministic id of a break (a hash of what it says)."""
    key = "|".join(
        (kind, account, contract, canonical_value(cutoff), ledger_value or "", broker_value or "")
    )
    return "brk-" + hashlib.sha256(key.encode()).hexdigest()[:24]


def _break(
    kind: str,
    account: str,
    contract: str,
    cutoff: datetime,
    ledger: Decimal | None,
    broker: Decimal | None,
    tolerance: Decimal | None,
    exec_ids: Sequence[str],
    detail: str,
) -> BreakRecord:
    ledger_value, broker_value = decimal_text(ledger), decimal_text(broker)
    difference = (ledger or _ZERO) - (broker or _ZERO)
    return BreakRecord(
        break_id=break_id(kind, account, contract, cutoff, ledger_value, broker_value),
        type=kind,
        account=account,
        contract=contract,
        ledger_value=ledger_value,
        broker_value=broker_value,
        difference=decimal_text(difference),
        tolerance=decimal_text(tolerance),
        exec_ids=tuple(exec_ids),
        detail=detail,
    )


def _show(qty: Decimal, avg: Decimal | None) -> str:
    return f"{decimal_text(qty)}" if avg is None else f"{decimal_text(qty)} @ {decimal_text(avg)}"


def _position_breaks(
    cmp: Comparison,
    broker_present: bool,
    cutoff: datetime,
    tolerance: Decimal,
    exec_ids: Sequence[str],
    when: str,
) -> list[BreakRecord]:
    lq, bq = cmp.ledger_qty, cmp.broker_qty
    said = f"ledger {_show(lq, cmp.ledger_avg)}, broker {_show(bq, cmp.broker_avg)} {when}"
    a, c = cmp.account, cmp.contract
    if lq == 0 and bq == 0:
        return []
    if bq == 0:
        broker = bq if broker_present else None
        detail = (
            said
            if broker_present
            else f"ledger {_show(lq, cmp.ledger_avg)}; no broker report {when}"
        )
        return [_break(MISSING_AT_BROKER, a, c, cutoff, lq, broker, _ZERO, exec_ids, detail)]
    if lq == 0:
        return [_break(MISSING_IN_LEDGER, a, c, cutoff, lq, bq, _ZERO, exec_ids, said)]
    if lq != bq:
        return [_break(POSITION_QTY_BREAK, a, c, cutoff, lq, bq, _ZERO, exec_ids, said)]
    if (
        cmp.broker_avg is not None
        and cmp.ledger_avg is not None
        and abs(cmp.ledger_avg - cmp.broker_avg) > tolerance
    ):
        return [
            _break(
                AVG_PRICE_BREAK,
                a,
                c,
                cutoff,
                cmp.ledger_avg,
                cmp.broker_avg,
                tolerance,
                exec_ids,
                said + " (ledger: FIFO average of open lots)",
            )
        ]
    return []


def _matches(qty: Decimal, avg: Decimal | None, line: BrokerLine, tolerance: Decimal) -> bool:
    if qty != line.signed_qty:
        return False
    if qty == 0 or avg is None or line.avg_price is None:
        return True
    return abs(avg - line.avg_price) <= tolerance


def _fill_input(effect: FillEffect) -> FillInput:
    return FillInput(
        exec_id=effect.exec_id,
        side=effect.side,
        qty=effect.qty,
        price=effect.price,
        fee=effect.fee,
        occurred_at=effect.occurred_at,
        position=effect.position,
    )


def _ledger_at_reports(
    account: str,
    contract: str,
    point_value: Decimal,
    tick_size: Decimal,
    effects: Sequence[FillEffect],
    reports: Sequence[BrokerLine],
) -> list[tuple[Decimal, Decimal | None]]:
    """Return the ledger's (qty, FIFO average) at each report's time, in one fold."""
    state = new_state(account, contract, point_value, tick_size)
    out: list[tuple[Decimal, Decimal | None]] = []
    i = 0
    for report in reports:
        assert report.occurred_at is not None
        while i < len(effects) and effects[i].occurred_at <= report.occurred_at:
            apply_fill(state, _fill_input(effects[i]))
            i += 1
        out.append((state.signed_qty, state.avg_open_price("fifo")))
    return out


def _report(position: int, payload: str) -> BrokerLine:
    data = orjson.loads(payload)
    avg = data.get("avg_price")
    return BrokerLine(
        account=data["account"],
        contract=data["contract"],
        signed_qty=Decimal(data["signed_qty"]),
        avg_price=None if avg is None else Decimal(avg),
        occurred_at=datetime.fromisoformat(data["occurred_at"]),
        position=position,
    )


async def reconcile(
    conn: asyncpg.Connection,
    *,
    cutoff: datetime,
    statement: BrokerStatement | None = None,
    price_tolerance: Decimal | None = None,
    pnl_tolerance: Decimal = Decimal("0.01"),
    session_start: time | None = None,
    session_tz: ZoneInfo | None = None,
) -> ReconciliationResult:
    """Compare the ledger's positions as of ``cutoff`` with the broker's.

    Args:
        conn: a connection on the ledger's database.
        cutoff: the reconciliation time (event time).
        statement: a broker statement file; None compares with the last
            ``broker_position`` event of each stream at or before the cutoff.
        price_tolerance: the largest average-price difference that is not a break;
            None means half a tick of each instrument.
        pnl_tolerance: the largest daily realized P&L difference that is not a break.
        session_start: the trading-day boundary (see :func:`projections.pnl.trading_day`).
        session_tz: the zone of ``session_start``.

    Returns:
        The run (not yet appended: see :func:`record_run`) and, for each quantity break,
        the fill that would close it.

    Raises:
        ReconciliationError: a tolerance is negative (the message names it and its
            value), or a stream has fills in a contract no instrument event defines.
    """
    if price_tolerance is not None and price_tolerance < 0:
        raise ReconciliationError(f"price_tolerance must not be negative, got {price_tolerance}")
    if pnl_tolerance < 0:
        raise ReconciliationError(f"pnl_tolerance must not be negative, got {pnl_tolerance}")
    generation = await serving_generation(conn) or 0
    streams = await reconciled_streams(conn, cutoff)
    if statement is not None:
        known = set(streams)
        streams += sorted(f"{a}/{c}" for a, c in statement.lines if f"{a}/{c}" not in known)
    day = trading_day(cutoff, session_start, session_tz)
    breaks: list[BreakRecord] = []
    proposals: list[Proposal] = []
    matched = 0
    for stream in streams:
        account, contract = stream.split("/", 1)
        instrument = await instrument_grid(conn, contract)
        tick = instrument[1] if instrument else None
        tolerance = price_tolerance if price_tolerance is not None else (tick or _ZERO) / 2
        reports = [_report(p, t) for p, t in await broker_report_rows(conn, stream, cutoff)]
        effects: tuple[FillEffect, ...] = ()
        ledger_qty, ledger_avg = _ZERO, None
        has_fills = await has_fills_by(conn, stream, cutoff)
        if has_fills and instrument is None:
            raise ReconciliationError(
                f"contract: no instrument event defines {contract!r}, so the fills of "
                f"{stream!r} cannot be valued"
            )
        if instrument is not None and has_fills:
            view = await stream_at(conn, generation, stream, "as_of", cutoff, with_effects=True)
            effects = view.effects or ()
            ledger_qty, ledger_avg = view.state.signed_qty, view.state.avg_open_price("fifo")
        at_reports = (
            _ledger_at_reports(account, contract, instrument[0], instrument[1], effects, reports)
            if instrument is not None
            else [(_ZERO, None) for _ in reports]
        )
        stream_breaks: list[BreakRecord] = []

        if statement is not None:
            line = statement.lines.get((account, contract))
            current = line
            ledger_then = (ledger_qty, ledger_avg)
            compared_at = cutoff
            when = "at the cutoff (statement file)"
        else:
            line = current = reports[-1] if reports else None
            ledger_then = at_reports[-1] if reports else (ledger_qty, ledger_avg)
            compared_at = line.occurred_at if line and line.occurred_at else cutoff
            when = f"at {compared_at.isoformat()}"
        # The last matching point: the latest earlier report that agreed with the ledger.
        last_match: datetime | None = None
        earlier = reports[:-1] if statement is None else reports
        for report, (qty, avg) in zip(earlier, at_reports, strict=False):
            if _matches(qty, avg, report, tolerance):
                last_match = report.occurred_at
        explaining = [
            e.exec_id
            for e in effects
            if (last_match is None or e.occurred_at > last_match) and e.occurred_at <= compared_at
        ]

        if statement is None and current is not None and current.occurred_at is not None:
            later = [e for e in effects if e.occurred_at > current.occurred_at]
            if later:
                stream_breaks.append(
                    _break(
                        STALE_BROKER_REPORT,
                        account,
                        contract,
                        cutoff,
                        ledger_qty,
                        current.signed_qty,
                        _ZERO,
                        [e.exec_id for e in later],
                        f"the broker's last report "
                        f"({_show(current.signed_qty, current.avg_price)} at "
                        f"{current.occurred_at.isoformat()}) predates {len(later)} fill(s) of "
                        f"the ledger up to the cutoff; ledger now {_show(ledger_qty, ledger_avg)}",
                    )
                )
        cmp = Comparison(
            account,
            contract,
            ledger_then[0],
            ledger_then[1],
            current.signed_qty if current else _ZERO,
            current.avg_price if current else None,
        )
        position_breaks = _position_breaks(
            cmp, current is not None, cutoff, tolerance, explaining, when
        )
        stream_breaks += position_breaks
        for b in position_breaks:
            if b.type in _QTY_TYPES:
                proposals.append(propose(b.break_id, cmp, tick))

        pnl_break = await _pnl_break(
            conn,
            stream,
            account,
            contract,
            cutoff,
            day,
            effects,
            pnl_tolerance,
            session_start,
            session_tz,
        )
        if pnl_break is not None:
            stream_breaks.append(pnl_break)
        if stream_breaks:
            breaks += stream_breaks
        elif ledger_qty != 0 or current is not None:
            matched += 1  # a long-flat stream the broker no longer mentions is not counted
    source = statement.source if statement is not None else _LOG_SOURCE
    run_id = _run_id(cutoff, source, matched, breaks)
    event = ReconciliationCompleted(
        run_id=run_id,
        cutoff=cutoff,
        source=source,
        matched=matched,
        breaks=tuple(breaks),
        occurred_at=cutoff,
    )
    return ReconciliationResult(event, tuple(proposals))


async def _pnl_break(
    conn: asyncpg.Connection,
    stream: str,
    account: str,
    contract: str,
    cutoff: datetime,
    day: date,
    effects: Sequence[FillEffect],
    tolerance: Decimal,
    session_start: time | None,
    session_tz: ZoneInfo | None,
) -> BreakRecord | None:
    broker_pnl: dict[str, Decimal] = {}
    for exec_id, value in await broker_pnl_rows(conn, stream):
        broker_pnl.setdefault(exec_id, Decimal(value))
    if not broker_pnl:
        return None
    ids: list[str] = []
    ledger_sum = broker_sum = _ZERO
    for e in effects:
        if e.exec_id in broker_pnl and trading_day(e.occurred_at, session_start, session_tz) == day:
            ids.append(e.exec_id)
            ledger_sum += e.realized_fifo
            broker_sum += broker_pnl[e.exec_id]
    if not ids or abs(ledger_sum - broker_sum) <= tolerance:
        return None
    return _break(
        REALIZED_PNL_BREAK,
        account,
        contract,
        cutoff,
        ledger_sum,
        broker_sum,
        tolerance,
        ids,
        f"trading day {day.isoformat()}: gross FIFO realized P&L of {len(ids)} fill(s) that "
        "carry the broker's own P&L",
    )


def _run_id(cutoff: datetime, source: str, matched: int, breaks: Sequence[BreakRecord]) -> str:
    content = orjson.dumps(
        {
            "cutoff": canonical_value(cutoff),
            "source": source,
            "matched": matched,
            "breaks": [b.model_dump(mode="json") for b in breaks],
        },
        option=orjson.OPT_SORT_KEYS,
    )
    digest = hashlib.sha256(content).hexdigest()[:12]
    return f"rec-{cutoff:%Y%m%dT%H%M%S%f}Z-{digest}"


def propose(break_ref: str, cmp: Comparison, tick_size: Decimal | None = None) -> Proposal:
    """Return the fill that would close a quantity break (never appended).

    Args:
        break_ref: the break's id.
        cmp: the ledger's and the broker's quantities and average prices.
        tick_size: the instrument's tick size, to flag a price off the grid.
    """
    lq, bq = cmp.ledger_qty, cmp.broker_qty
    delta = bq - lq
    side = "BUY" if delta > 0 else "SELL"
    price: Decimal | None
    note = ""
    if bq == 0:
        price = None
        note = "closes the ledger's position: any price leaves it flat like the broker"
    elif lq == 0 or (lq > 0) != (bq > 0):
        price = cmp.broker_avg
        note = "opens the broker's position at the broker's average"
    elif abs(bq) > abs(lq):
        if cmp.broker_avg is None or cmp.ledger_avg is None:
            price = None
            note = "the broker sent no average price"
        else:
            price = (bq * cmp.broker_avg - lq * cmp.ledger_avg) / delta
            note = "reproduces the broker's average (ledger side: FIFO average of open lots)"
    else:
        price = None
        note = "only reduces the position: no price changes the average of the lots left (FIFO)"
    if price is not None and tick_size is not None and price % tick_size != 0:
        note += f"; price {decimal_text(price)} is off the tick grid ({decimal_text(tick_size)})"
    return Proposal(
        break_id=break_ref,
        account=cmp.account,
        contract=cmp.contract,
        side=side,
        qty=abs(delta),
        price=None if price is None else Decimal(decimal_text(price) or "0"),
        note=note,
    )


# ------------------------------------------------------------------ the log


async def record_run(store: EventStore, event: ReconciliationCompleted) -> int:
    """Append the run to the log (a no-op when the same run is already there).

    Returns:
        The run's global position in the log.

    Raises:
        IdempotencyConflict: a run with this id holds other content (cannot happen for a
            run built by :func:`reconcile`: its id is a hash of its content).
    """
    result = await store.append([event])
    return result.positions[0]


async def load_run(conn: asyncpg.Connection, run_id: str) -> ReconciliationCompleted:
    """Return a stored run by id.

    Raises:
        ReconciliationError: no run with this id is in the log.
    """
    payload = await reconciliation_run(conn, run_id)
    if payload is None:
        raise ReconciliationError(f"run_id: no reconciliation run {run_id!r} in the log")
    event = event_from_stored(orjson.loads(payload))
    assert isinstance(event, ReconciliationCompleted)
    return event


def run_as_dict(event: ReconciliationCompleted) -> dict[str, Any]:
    """Return a run as JSON-ready data (decimals already strings)."""
    return {
        "cutoff": event.cutoff.isoformat(),
        "run_id": event.run_id,
        "source": event.source,
        "matched": event.matched,
        "breaks": [
            {**b.model_dump(mode="json"), "exec_ids": list(b.exec_ids)} for b in event.breaks
        ],
    }
