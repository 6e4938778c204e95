"""The end-of-day report: one self-contained HTML page per trading day, plus CSV and Parquet.

The page holds the positions at the end of the trading day, realized P&L by account and
contract, every reconciliation run of the day (its cutoff, when it ran, the statement
file or log reports it compared against) each with its breaks, and a chart of cumulative
realized P&L through the day drawn as inline SVG. It loads nothing from anywhere: no
script, no stylesheet, no font, no image. The same tables are written as CSV (exact
decimal strings) and Parquet (exact ``Decimal`` columns, via polars) for analysts.

The report is built from the log by replay, on either clock: by default everything now
known to have happened during the day; with ``as_known_at`` only what had been recorded
by then, so yesterday's report stays reproducible after a bust that lands today.
"""

from __future__ import annotations

import csv
import html
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from decimal import ROUND_CEILING, ROUND_FLOOR, ROUND_HALF_EVEN, Decimal
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo

import asyncpg
import orjson

from ledger.display import (
    COLUMN_KINDS,
    Kind,
    at_least,
    exec_ids_shown,
    fixed,
    minor_units,
    show,
    tick_places,
)
from ledger.events import ReconciliationCompleted, decimal_text, event_from_stored
from ledger.store import mark_price_at, reconciliation_runs, streams_with_fills
from projections.audit import load_stream
from projections.faults import UNFOLDABLE, StreamFault, culprit_in_events
from projections.pnl import PnlRow, aggregate, trading_day
from projections.positions import FillEffect, replay, unrealized
from projections.queries import instrument_currency, instrument_grid
from projections.store import projection_status

__all__ = [
    "PARQUET_PRECISION",
    "PARQUET_SCALE",
    "ColumnKind",
    "DayReport",
    "build_report",
    "day_bounds",
    "parquet_schema",
    "render_html",
    "write_report",
]

ColumnKind = Literal["str", "dec", "int", "ts", "date"]
_ZERO = Decimal(0)
_ONE_US = timedelta(microseconds=1)

_FAR_FUTURE = datetime(9999, 1, 1, tzinfo=UTC)

POSITION_COLUMNS: tuple[tuple[str, ColumnKind], ...] = (
    ("account", "str"),
    ("contract", "str"),
    ("currency", "str"),
    ("signed_qty", "dec"),
    ("side", "str"),
    ("avg_open_price", "dec"),
    ("mark_price", "dec"),
    ("unrealized_pnl", "dec"),
    ("realized_pnl_day", "dec"),
    ("fees_day", "dec"),
    ("opened_at", "ts"),
    ("last_fill_at", "ts"),
)
PNL_COLUMNS: tuple[tuple[str, ColumnKind], ...] = (
    ("account", "str"),
    ("contract", "str"),
    ("currency", "str"),
    ("realized_pnl", "dec"),
    ("fees", "dec"),
    ("net_realized_pnl", "dec"),
    ("fills", "int"),
)
BREAK_COLUMNS: tuple[tuple[str, ColumnKind], ...] = (
    ("run_id", "str"),
    ("break_id", "str"),
    ("type", "str"),
    ("account", "str"),
    ("contract", "str"),
    ("ledger_value", "str"),
    ("broker_value", "str"),
    ("difference", "str"),
    ("tolerance", "str"),
    ("exec_ids", "str"),
    ("detail", "str"),
)
RUN_COLUMNS: tuple[tuple[str, ColumnKind], ...] = (
    ("run_id", "str"),
    ("cutoff", "ts"),
    ("recorded_at", "ts"),
    ("source", "str"),
    ("matched", "int"),
    ("breaks", "int"),
)
CURVE_COLUMNS: tuple[tuple[str, ColumnKind], ...] = (
    ("occurred_at", "ts"),
    ("account", "str"),
    ("contract", "str"),
    ("exec_id", "str"),
    ("realized_pnl", "dec"),
    ("cum_realized_pnl_account", "dec"),
    ("cum_realized_pnl_total", "dec"),
)


@dataclass(slots=True)
class DayReport:
    """Everything one trading day's report shows."""

    day: date
    start: datetime
    end: datetime
    as_known_at: datetime | None
    positions: list[dict[str, Any]] = field(default_factory=list)
    pnl: list[dict[str, Any]] = field(default_factory=list)
    # every reconciliation run with its cutoff in the day, in cutoff order, and the
    # breaks of all of them (each break names its run)
    runs: list[dict[str, Any]] = field(default_factory=list)
    # each contract's (tick size, currency): how its prices and money are shown
    instruments: dict[str, tuple[Decimal, str]] = field(default_factory=dict)
    breaks: list[dict[str, Any]] = field(default_factory=list)
    curve: list[dict[str, Any]] = field(default_factory=list)
    # streams this report leaves out: what it sees of them cannot be folded
    faults: list[StreamFault] = field(default_factory=list)
    # the serving projections: events of the log they have not folded yet, and the
    # streams they hold as faulted (the report itself replays the log)
    projections_behind: int = 0
    projections_faulted: list[StreamFault] = field(default_factory=list)

    def warnings(self) -> list[str]:
        """Return what a reader must know before trusting the figures (banner lines)."""
        lines = []
        for f in self.faults:
            lines.append(
                f"Stream {f.stream} is left out of this report: the event at log position "
                f"{f.position} (event_id {f.event_id or 'unknown'}) cannot be folded "
                f"({f.reason}); append a correction or bust of execution "
                f"{f.exec_id or 'unknown'} to heal it."
            )
        if self.projections_behind:
            lines.append(
                f"The serving projections are {self.projections_behind} event(s) behind the "
                "log (run `ledger project`); this report replays the log itself."
            )
        left_out = {f.stream for f in self.faults}
        others = [f.stream for f in self.projections_faulted if f.stream not in left_out]
        if others:
            lines.append(
                "The serving projections hold faulted stream(s) "
                f"{', '.join(others)} (see `ledger verify`)."
            )
        return lines


def day_bounds(
    day: date, session_start: time | None = None, tz: ZoneInfo | None = None
) -> tuple[datetime, datetime]:
    """Return the first instant of trading day ``day`` and the first instant after it."""
    zone = tz or UTC
    if session_start is None:
        start = datetime.combine(day, time(0), zone)
        end = datetime.combine(day + timedelta(days=1), time(0), zone)
    else:
        clock = session_start.replace(tzinfo=None)
        start = datetime.combine(day - timedelta(days=1), clock, zone)
        end = datetime.combine(day, clock, zone)
    return start.astimezone(UTC), end.astimezone(UTC)


async def build_report(
    conn: asyncpg.Connection,
    day: date,
    *,
    session_start: time | None = None,
    session_tz: ZoneInfo | None = None,
    as_known_at: datetime | None = None,
    progress: Callable[[int], None] | None = None,
) -> DayReport:
    """Build trading day ``day``'s report from the log.

    Args:
        conn: a connection on the ledger's database.
        day: the trading day.
        session_start: the trading-day boundary (see :func:`projections.pnl.trading_day`).
        session_tz: the zone of ``session_start``.
        as_known_at: only what had been recorded by then (None: everything known now).
        progress: called with 1 for each stream replayed.

    A stream that cannot be folded on this clock (an event off its tick grid, a
    contract with no instrument) is left out and listed in ``report.faults``; the
    serving projections' lag and faults are noted too (``report.warnings()``).
    """
    start, end = day_bounds(day, session_start, session_tz)
    cutoff = end - _ONE_US
    known = as_known_at or _FAR_FUTURE
    report = DayReport(day=day, start=start, end=end, as_known_at=as_known_at)
    pnl: dict[tuple[str, str], dict[str, Any]] = {}
    day_effects: list[tuple[str, str, FillEffect]] = []
    for stream in await streams_with_fills(conn, end, known):
        if progress is not None:
            progress(1)
        account, contract = stream.split("/", 1)
        grid = await instrument_grid(conn, contract)
        rows = await load_stream(conn, stream, occurred_by=cutoff, recorded_by=as_known_at)
        events = [(r.position, r.event) for r in rows]
        try:
            if grid is None:
                raise LookupError(f"contract: no instrument event defines {contract!r}")
            state, effects = replay(account, contract, grid[0], grid[1], events)
        except UNFOLDABLE as exc:
            # one stream that cannot be folded is left out (and named), never fatal
            culprit, event_id = culprit_in_events(stream, events, grid, exc)
            report.faults.append(
                StreamFault(stream, culprit.position, event_id, culprit.exec_id, culprit.reason)
            )
            continue
        currency = await instrument_currency(conn, contract)
        report.instruments[contract] = (grid[1], currency)
        today = [e for e in effects if trading_day(e.occurred_at, session_start, session_tz) == day]
        if state.signed_qty == 0 and not today:
            continue
        realized = sum((e.realized_fifo for e in today), _ZERO)
        fees = sum((e.fee for e in today), _ZERO)
        mark_text = await mark_price_at(conn, contract, cutoff, known)
        mark = None if mark_text is None else Decimal(mark_text)
        report.positions.append(
            {
                "account": account,
                "contract": contract,
                "currency": currency,
                "signed_qty": state.signed_qty,
                "side": state.side,
                "avg_open_price": state.avg_open_price("fifo"),
                "mark_price": mark,
                "unrealized_pnl": None if mark is None else unrealized(state, mark, "fifo"),
                "realized_pnl_day": realized,
                "fees_day": fees,
                "opened_at": state.opened_at,
                "last_fill_at": state.last_fill_at,
            }
        )
        if today:
            pnl[(account, contract)] = {
                "account": account,
                "contract": contract,
                "currency": currency,
                "realized_pnl": realized,
                "fees": fees,
                "net_realized_pnl": realized - fees,
                "fills": len(today),
            }
            day_effects += [(account, contract, e) for e in today]
    report.pnl = [pnl[k] for k in sorted(pnl)]
    by_account: dict[str, Decimal] = {}
    total = _ZERO
    closing = [t for t in day_effects if t[2].closed_lots]  # only these realize P&L
    for account, contract, e in sorted(closing, key=lambda t: (t[2].occurred_at, t[2].position)):
        by_account[account] = by_account.get(account, _ZERO) + e.realized_fifo
        total += e.realized_fifo
        report.curve.append(
            {
                "occurred_at": e.occurred_at,
                "account": account,
                "contract": contract,
                "exec_id": e.exec_id,
                "realized_pnl": e.realized_fifo,
                "cum_realized_pnl_account": by_account[account],
                "cum_realized_pnl_total": total,
            }
        )
    for payload, recorded_at in await reconciliation_runs(conn, start, end, known):
        run = event_from_stored(orjson.loads(payload))
        assert isinstance(run, ReconciliationCompleted)
        report.runs.append(
            {
                "run_id": run.run_id,
                "cutoff": run.cutoff,
                "recorded_at": recorded_at,
                "source": run.source,
                "matched": run.matched,
                "breaks": len(run.breaks),
            }
        )
        report.breaks += [
            {
                "run_id": run.run_id,
                "break_id": b.break_id,
                "type": b.type,
                "account": b.account,
                "contract": b.contract,
                "ledger_value": b.ledger_value,
                "broker_value": b.broker_value,
                "difference": b.difference,
                "tolerance": b.tolerance,
                "exec_ids": " ".join(b.exec_ids),
                "detail": b.detail,
            }
            for b in run.breaks
        ]
    report.projections_behind, report.projections_faulted = await projection_status(conn)
    return report


def account_totals(report: DayReport) -> list[dict[str, Any]]:
    """Return realized P&L summed per account and currency (never across currencies)."""
    rows = [
        PnlRow(
            account=r["account"],
            contract=r["contract"],
            day=report.day,
            exec_id=None,
            realized_fifo=r["realized_pnl"],
            realized_wac=r["realized_pnl"],
            fees=r["fees"],
            fills=r["fills"],
            currency=r["currency"],
        )
        for r in report.pnl
    ]
    totals = sorted(aggregate(rows, "account"), key=lambda t: (t.account, t.currency))
    return [
        {
            "account": t.account,
            "currency": t.currency,
            "realized_pnl": t.realized_fifo,
            "fees": t.fees,
            "net_realized_pnl": t.net_realized("fifo"),
            "fills": t.fills,
        }
        for t in totals
    ]


# ------------------------------------------------------------------ files


def _cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, Decimal):
        return decimal_text(value)
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat()
    return str(value)


Instruments = Mapping[str, tuple[Decimal, str]]


def _number_context(
    row: Mapping[str, Any], instruments: Instruments
) -> tuple[str | None, Decimal | None]:
    """Return the currency and tick size a row's numbers are shown with (None: unknown)."""
    contract = row.get("contract")
    inst = instruments.get(contract) if isinstance(contract, str) else None
    currency = row.get("currency") or (None if inst is None else inst[1])
    return currency, None if inst is None else inst[0]


def file_text(column: str, row: Mapping[str, Any], instruments: Instruments) -> str:
    """Return a cell of a CSV file: exact, never rounded, never losing a trailing zero;
    money written to at least its currency's minor units, prices and averages to at
    least the tick precision (``825.00``, ``4996.00``)."""
    value = row.get(column)
    if not isinstance(value, Decimal):
        return _cell(value)
    currency, tick = _number_context(row, instruments)
    kind = COLUMN_KINDS.get(column)
    if kind is Kind.MONEY and currency is not None:
        return at_least(value, minor_units(currency))
    if kind in (Kind.PRICE, Kind.AVERAGE) and tick is not None:
        return at_least(value, tick_places(tick))
    return f"{value:f}"


def shown_text(column: str, row: Mapping[str, Any], instruments: Instruments) -> str:
    """Return a cell of the page: a number as :func:`ledger.display.show` shows it."""
    value = row.get(column)
    if not isinstance(value, Decimal):
        return _cell(value)
    currency, tick = _number_context(row, instruments)
    return show(value, COLUMN_KINDS.get(column), currency=currency, tick_size=tick)


def _write_csv(
    path: Path, rows: Sequence[dict[str, Any]], columns: Sequence[str], instruments: Instruments
) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(columns)
        for row in rows:
            writer.writerow([file_text(c, row, instruments) for c in columns])


PARQUET_PRECISION = 38
"""Digits of every Parquet decimal column (a 128-bit decimal holds 38)."""
PARQUET_SCALE = 12
"""Fraction digits of every Parquet decimal column: the ledger's own bound on input
(:data:`ledger.values.MAX_SCALE`), so quantities, prices and money keep every digit."""
_PARQUET_QUANTUM = Decimal(1).scaleb(-PARQUET_SCALE)
_PARQUET_LIMIT = Decimal(10) ** (PARQUET_PRECISION - PARQUET_SCALE)


def _parquet_decimal(name: str, value: Decimal | None) -> Decimal | None:
    """Return ``value`` at the files' one fixed scale.

    Quantities, prices and money have at most 12 fraction digits and are exact; an
    average open price (cost / quantity) may have more (1/3 never ends) and is rounded
    half-even to 12 places — in the Parquet file only: the CSV beside it is exact.

    Raises:
        ValueError: the value has more integer digits than the column holds (26).
    """
    if value is None:
        return None
    if abs(value) >= _PARQUET_LIMIT:
        raise ValueError(
            f"{name}: {decimal_text(value)} has more than "
            f"{PARQUET_PRECISION - PARQUET_SCALE} integer digits (Parquet column "
            f"Decimal({PARQUET_PRECISION}, {PARQUET_SCALE}))"
        )
    return value.quantize(_PARQUET_QUANTUM, rounding=ROUND_HALF_EVEN)


def parquet_schema(columns: Sequence[tuple[str, ColumnKind]]) -> dict[str, Any]:
    """Return the one Parquet schema of a table: the same types in every day's file,
    so ``pl.scan_parquet([day1, day2])`` reads a month of them together."""
    import polars as pl

    types: dict[ColumnKind, Any] = {
        "dec": pl.Decimal(PARQUET_PRECISION, PARQUET_SCALE),
        "int": pl.Int64,
        "ts": pl.Datetime("us", "UTC"),
        "date": pl.Date,
        "str": pl.String,
    }
    return {name: types[kind] for name, kind in columns}


def _write_parquet(
    path: Path, rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, ColumnKind]]
) -> None:
    import polars as pl  # a core dependency, imported only when a report is written

    data: dict[str, list[Any]] = {}
    for name, kind in columns:
        values = [row.get(name) for row in rows]
        if kind == "dec":
            data[name] = [_parquet_decimal(name, v) for v in values]
        elif kind == "str":
            data[name] = [None if v is None else str(v) for v in values]
        else:
            data[name] = values
    pl.DataFrame(data, schema=parquet_schema(columns)).write_parquet(path)


def write_report(report: DayReport, out_dir: Path) -> list[Path]:
    """Write the HTML page and the CSV and Parquet tables into ``out_dir``.

    Returns:
        The files written, the HTML page first.

    Raises:
        OSError: ``out_dir`` cannot be created or written.
        ValueError: a number is too wide for its Parquet column (the message names it).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"eod-{report.day.isoformat()}"
    page = out_dir / f"{stem}.html"
    page.write_text(render_html(report), encoding="utf-8")
    written = [page]
    tables: list[tuple[str, list[dict[str, Any]], tuple[tuple[str, ColumnKind], ...]]] = [
        ("positions", report.positions, POSITION_COLUMNS),
        ("pnl", report.pnl, PNL_COLUMNS),
        ("runs", report.runs, RUN_COLUMNS),
        ("breaks", report.breaks, BREAK_COLUMNS),
        ("pnl-curve", report.curve, CURVE_COLUMNS),
    ]
    for name, rows, columns in tables:
        csv_path = out_dir / f"{stem}-{name}.csv"
        _write_csv(csv_path, rows, [c for c, _ in columns], report.instruments)
        parquet_path = out_dir / f"{stem}-{name}.parquet"
        _write_parquet(parquet_path, rows, columns)
        written += [csv_path, parquet_path]
    return written


# ------------------------------------------------------------------ HTML

_CSS = """
:root { --ink: #1d2330; --muted: #667085; --line: #d9dee7; --pos: #067647; --neg: #b42318;
        --head: #f3f5f9; }
* { box-sizing: border-box; }
body { font-family: -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       color: var(--ink); margin: 0; background: #fff; }
header { padding: 24px 32px 12px; border-bottom: 1px solid var(--line); }
h1 { font-size: 22px; margin: 0 0 4px; }
h2 { font-size: 16px; margin: 28px 0 10px; }
h3 { font-size: 14px; margin: 18px 0 8px; }
main { padding: 0 32px 32px; max-width: 1240px; }
.meta { color: var(--muted); font-size: 13px; }
.cards { display: flex; gap: 14px; flex-wrap: wrap; margin-top: 18px; }
.card { border: 1px solid var(--line); border-radius: 8px; padding: 10px 16px; min-width: 170px; }
.card .label { color: var(--muted); font-size: 12px; text-transform: uppercase; }
.card .value { font-size: 20px; font-weight: 600; margin-top: 2px;
               font-variant-numeric: tabular-nums; }
table { border-collapse: collapse; width: 100%; font-size: 13px; }
th, td { border-bottom: 1px solid var(--line); padding: 6px 10px; text-align: left;
         vertical-align: top; }
th { background: var(--head); font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.pos { color: var(--pos); } .neg { color: var(--neg); }
.empty { color: var(--muted); font-style: italic; }
td.ts { white-space: nowrap; }
.break-type { font-weight: 600; color: var(--neg); white-space: nowrap; }
.banner { border: 1px solid #f79009; background: #fffaeb; color: #7a2e0e; border-radius: 8px;
          padding: 10px 16px; margin-top: 14px; font-size: 13px; }
.banner ul { margin: 4px 0 0; padding-left: 18px; }
.chart { border: 1px solid var(--line); border-radius: 8px; padding: 8px; }
.chart text { font-size: 11px; fill: var(--muted); }
.legend { font-size: 12px; color: var(--muted); margin-top: 6px; }
.legend span { display: inline-block; margin-right: 16px; }
.swatch { display: inline-block; width: 12px; height: 3px; vertical-align: middle;
          margin-right: 5px; }
"""
_PALETTE = ("#1f5fbf", "#d9480f", "#2b8a3e", "#7048e8", "#c2255c", "#0b7285", "#5c940d")
_TOTAL_COLOR = "#1d2330"


def _esc(value: object) -> str:
    return html.escape(_cell(value))


def _money_class(value: object) -> str:
    if isinstance(value, Decimal) and value != 0:
        return " pos" if value > 0 else " neg"
    return ""


def _table(
    table_id: str,
    rows: Sequence[dict[str, Any]],
    columns: Sequence[tuple[str, ColumnKind]],
    *,
    money: frozenset[str] = frozenset(),
    empty: str,
    instruments: Instruments | None = None,
) -> str:
    known = instruments or {}
    if not rows:
        return f'<p class="empty" id="{table_id}-empty">{html.escape(empty)}</p>'
    head = "".join(
        f'<th class="num">{html.escape(c)}</th>'
        if kind in ("dec", "int")
        else f"<th>{html.escape(c)}</th>"
        for c, kind in columns
    )
    body = []
    for row in rows:
        cells = []
        for c, kind in columns:
            value = row.get(c)
            if kind in ("dec", "int"):
                extra = _money_class(value) if c in money else ""
                text = html.escape(shown_text(c, row, known))
                cells.append(f'<td class="num{extra}">{text}</td>')
            elif kind == "ts":
                shown = "" if value is None else f"{value.astimezone(UTC):%Y-%m-%d %H:%M:%S}Z"
                cells.append(f'<td class="ts">{html.escape(shown)}</td>')
            elif c == "type" and table_id.startswith("breaks"):
                cells.append(f'<td class="break-type">{_esc(value)}</td>')
            else:
                cells.append(f"<td>{_esc(value)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (
        f'<table id="{table_id}"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table>"
    )


def _nice_step(span: Decimal) -> Decimal:
    raw = span / 4 if span > 0 else Decimal(1)
    magnitude = Decimal(10) ** raw.adjusted()
    for factor in (1, 2, 5, 10):
        step = magnitude * factor
        if step >= raw:
            return step
    return magnitude * 10


def render_chart(report: DayReport, *, width: int = 1100, height: int = 340) -> str:
    """Return an inline SVG step chart of cumulative realized P&L through the day."""
    left, right, top, bottom = 84, 24, 20, 44
    plot_w, plot_h = width - left - right, height - top - bottom
    points = report.curve
    accounts = sorted({p["account"] for p in points})
    series: list[tuple[str, str, list[tuple[datetime, Decimal]]]] = []
    for i, account in enumerate(accounts):
        pts = [
            (p["occurred_at"], p["cum_realized_pnl_account"])
            for p in points
            if p["account"] == account
        ]
        series.append((account, _PALETTE[i % len(_PALETTE)], pts))
    if len(accounts) > 1:
        series.append(
            (
                "total",
                _TOTAL_COLOR,
                [(p["occurred_at"], p["cum_realized_pnl_total"]) for p in points],
            )
        )
    t0: datetime
    t1: datetime
    if points:
        first: datetime = points[0]["occurred_at"]
        last: datetime = points[-1]["occurred_at"]
        pad = max((last - first) / 20, timedelta(minutes=15))
        t0, t1 = first - pad, last + pad
    else:
        t0, t1 = report.start, report.end
    values: list[Decimal] = [v for _, _, pts in series for _, v in pts] + [_ZERO]
    low, high = min(values), max(values)
    step = _nice_step(high - low)
    y_min = (low / step).to_integral_value(rounding=ROUND_FLOOR) * step
    y_max = (high / step).to_integral_value(rounding=ROUND_CEILING) * step
    if y_max == y_min:
        y_max = y_min + step
    span_s = (t1 - t0).total_seconds() or 1.0

    def x(t: datetime) -> float:
        return left + plot_w * (t - t0).total_seconds() / span_s

    def y(v: Decimal) -> float:
        return top + plot_h * float((y_max - v) / (y_max - y_min))

    parts = [
        f'<svg id="pnl-chart" xmlns="http://www.w3.org/2000/svg" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}" role="img" '
        'aria-label="Cumulative realized P&amp;L through the day">',
        "<title>Cumulative realized P&amp;L through the day</title>",
    ]
    tick = y_min
    while tick <= y_max:
        yy = y(tick)
        stroke = "#98a2b3" if tick == 0 else "#eaecf0"
        parts.append(
            f'<line x1="{left}" x2="{left + plot_w}" y1="{yy:.1f}" y2="{yy:.1f}" '
            f'stroke="{stroke}" stroke-width="1"/>'
        )
        parts.append(f'<text x="{left - 8}" y="{yy + 4:.1f}" text-anchor="end">{_esc(tick)}</text>')
        tick += step
    hours = max(1, int(span_s // 3600 // 8) or 1)
    mark = t0.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
    while mark < t1:
        xx = x(mark)
        parts.append(
            f'<line x1="{xx:.1f}" x2="{xx:.1f}" y1="{top}" y2="{top + plot_h}" '
            'stroke="#f2f4f7" stroke-width="1"/>'
        )
        parts.append(
            f'<text x="{xx:.1f}" y="{top + plot_h + 18}" text-anchor="middle">{mark:%H:%M}</text>'
        )
        mark += timedelta(hours=hours)
    parts.append(
        f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" '
        'stroke="#d0d5dd"/>'
    )
    parts.append(
        f'<text x="{left + plot_w / 2:.1f}" y="{height - 6}" text-anchor="middle">time (UTC)</text>'
    )
    for name, color, pts in series:
        if not pts:
            continue
        d = [f"M{x(t0):.1f},{y(_ZERO):.1f}"]
        for t, v in pts:
            d.append(f"H{x(t):.1f}V{y(v):.1f}")
        d.append(f"H{x(t1):.1f}")
        dash = ' stroke-dasharray="6 4"' if name == "total" else ""
        parts.append(
            f'<path class="series" data-series="{html.escape(name)}" d="{"".join(d)}" '
            f'fill="none" stroke="{color}" stroke-width="2.2"{dash}/>'
        )
        if name != "total":
            for t, v in pts:
                parts.append(
                    f'<circle cx="{x(t):.1f}" cy="{y(v):.1f}" r="3" fill="{color}">'
                    f"<title>{html.escape(name)} {t:%H:%M:%S}: {_esc(v)}</title></circle>"
                )
    if not points:
        parts.append(
            f'<text x="{left + plot_w / 2:.1f}" y="{top + plot_h / 2:.1f}" '
            'text-anchor="middle">no realized P&amp;L this day</text>'
        )
    parts.append("</svg>")
    legend = "".join(
        f'<span><i class="swatch" style="background:{color}"></i>{html.escape(name)}</span>'
        for name, color, _ in series
    )
    return "".join(parts) + f'<div class="legend">{legend}</div>'


def _source_label(source: str) -> str:
    """Say what a run compared against: a statement file (name and hash) or the log."""
    if source.startswith("file:"):
        name, _, digest = source[len("file:") :].rpartition(":")
        return f"statement file {name} (sha256 {digest}…)"
    if source == "broker_position":
        return "the broker_position reports in the log"
    return source


def render_runs(report: DayReport) -> str:
    """Return every reconciliation run of the day (time, source, breaks), oldest first.

    Each run shows its own breaks, so a run with breaks followed by a clean one shows
    both; a break lists its first :data:`ledger.display.EXEC_IDS_SHOWN` execution ids and
    how many more.
    """
    if not report.runs:
        return '<p class="empty" id="runs-empty">No reconciliation run this day.</p>'
    summary = [{**r, "source": _source_label(r["source"])} for r in report.runs]
    parts = [_table("runs", summary, RUN_COLUMNS, empty="")]
    break_columns = tuple(c for c in BREAK_COLUMNS if c[0] != "run_id")
    for i, run in enumerate(report.runs, 1):
        rows = [
            {**b, "exec_ids": exec_ids_shown(b["exec_ids"])}
            for b in report.breaks
            if b["run_id"] == run["run_id"]
        ]
        cutoff = run["cutoff"].astimezone(UTC)
        ran = run["recorded_at"].astimezone(UTC)
        parts.append(
            f'<h3 class="run" id="run-{i}">Run {i} of {len(report.runs)}: '
            f"{html.escape(run['run_id'])}, cutoff {cutoff:%Y-%m-%d %H:%M:%S}Z, recorded "
            f"{ran:%Y-%m-%d %H:%M:%S}Z, against {html.escape(_source_label(run['source']))}: "
            f"{run['matched']} matched, {run['breaks']} break(s)</h3>"
        )
        parts.append(_table(f"breaks-{i}", rows, break_columns, empty="No breaks."))
    return "\n".join(parts)


_MONEY_CARDS = frozenset({"Realized P&L (gross)", "Fees", "Net realized P&L"})


def render_html(report: DayReport) -> str:
    """Return the report as one self-contained HTML page."""
    total = sum((r["realized_pnl"] for r in report.pnl), _ZERO)
    fees = sum((r["fees"] for r in report.pnl), _ZERO)
    open_positions = sum(1 for p in report.positions if p["signed_qty"] != 0)
    knowledge = (
        f"as known at {report.as_known_at.isoformat()}"
        if report.as_known_at
        else "everything known now"
    )
    latest = report.runs[-1] if report.runs else None
    run = (
        f"{len(report.runs)} run(s); the latest, {html.escape(latest['run_id'])} at cutoff "
        f"{_esc(latest['cutoff'])}, found {latest['breaks']} break(s)"
        if latest is not None
        else "no reconciliation run this day"
    )
    cards = [
        ("Realized P&L (gross)", total, True),
        ("Fees", fees, False),
        ("Net realized P&L", total - fees, True),
        ("Open positions", open_positions, False),
        ("Breaks (latest run)", "none run" if latest is None else latest["breaks"], False),
    ]
    currencies = sorted({r["currency"] for r in report.pnl})

    def card_text(label: str, value: object) -> str:
        if label in _MONEY_CARDS and isinstance(value, Decimal):
            if len(currencies) == 1:  # money in its currency's minor units, named
                return f"{fixed(value, minor_units(currencies[0]))} {currencies[0]}"
            if currencies:  # never a sum across currencies: see the tables
                return "by currency below"
        return _cell(value)

    card_html = "".join(
        f'<div class="card"><div class="label">{html.escape(label)}</div>'
        f'<div class="value{_money_class(value) if money else ""}">'
        f"{html.escape(card_text(label, value))}</div></div>"
        for label, value, money in cards
    )
    money_cols = frozenset(
        {"realized_pnl", "net_realized_pnl", "unrealized_pnl", "realized_pnl_day"}
    )
    pnl_columns = PNL_COLUMNS
    account_columns: tuple[tuple[str, ColumnKind], ...] = tuple(
        c for c in PNL_COLUMNS if c[0] != "contract"
    )
    title = f"End-of-day report {report.day.isoformat()}"
    warnings = report.warnings()
    banner = (
        '<div class="banner" role="alert"><strong>Warning</strong><ul>'
        + "".join(f"<li>{html.escape(w)}</li>" for w in warnings)
        + "</ul></div>\n"
        if warnings
        else ""
    )
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}</title>
<style>{_CSS}</style>
</head>
<body>
<header>
<h1>{html.escape(title)}</h1>
<div class="meta">Trading day {_esc(report.start)} to {_esc(report.end)} (UTC); {knowledge};
P&amp;L is gross FIFO realized, fees separate. Reconciliation: {run}.</div>
{banner}<div class="cards">{card_html}</div>
</header>
<main>
<section id="chart-section">
<h2>Cumulative realized P&amp;L through the day</h2>
<div class="chart">{render_chart(report)}</div>
</section>
<section>
<h2>Positions at the end of the day</h2>
{
        _table(
            "positions",
            report.positions,
            POSITION_COLUMNS,
            money=money_cols,
            empty="No positions.",
            instruments=report.instruments,
        )
    }
</section>
<section>
<h2>Realized P&amp;L by account</h2>
{
        _table(
            "pnl-accounts",
            account_totals(report),
            account_columns,
            money=money_cols,
            empty="No realized P&L this day.",
            instruments=report.instruments,
        )
    }
</section>
<section>
<h2>Realized P&amp;L by account and contract</h2>
{
        _table(
            "pnl",
            report.pnl,
            pnl_columns,
            money=money_cols,
            empty="No realized P&L this day.",
            instruments=report.instruments,
        )
    }
</section>
<section>
<h2>Reconciliation runs and their breaks</h2>
{render_runs(report)}
</section>
</main>
</body>
</html>
"""
