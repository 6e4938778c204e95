"""The runner's hot loops, on plain values: fold a page of log rows into the cached
position states, and turn what a page did into history lines and daily P&L.

No I/O: :mod:`projections.runner` reads the rows and writes what these return. Kept
apart from the runner (which is async) so that mypyc can compile this module and
:mod:`projections.positions` into C when the package is installed on a machine with a
C compiler (``setup.py``); the same source runs interpreted otherwise. Either way the
results are the same, digit for digit (``tests/unit/test_compiled.py``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any, Final

import orjson

from ledger.store import Checkpoint, LightRow
from ledger.values import SIDE_OF_TEXT, Side
from projections.positions import _ZERO as _FOLD_ZERO  # what the fold realizes on opening
from projections.positions import FillInput, FoldError, PositionState, _fold_fill

__all__ = [
    "EFFECT_FIELDS",
    "E_EXEC_ID",
    "E_FEE",
    "E_FEE_TEXT",
    "E_OCCURRED_AT",
    "E_OCCURRED_TEXT",
    "E_POSITION",
    "E_PRICE_TEXT",
    "E_QTY_AFTER",
    "E_QTY_BEFORE",
    "E_QTY_TEXT",
    "E_REALIZED_FIFO",
    "E_REALIZED_WAC",
    "E_SIDE",
    "MARK_EVERY",
    "MARK_KEEP",
    "R_EXEC_ID",
    "R_FEE",
    "R_OCCURRED_AT",
    "R_POSITION",
    "R_PRICE",
    "R_QTY",
    "R_RECORDED_AT",
    "R_SIDE",
    "R_TYPE",
    "STREAM_ROW_FIELDS",
    "Effect",
    "FoldScope",
    "Forget",
    "Mark",
    "Marks",
    "Page",
    "PositionColumns",
    "Restated",
    "Seed",
    "StreamRow",
    "collect",
    "copy_text",
    "first_positions",
    "fold_rows",
    "position_columns",
    "replay_rows",
    "restate_stream",
    "standing_fills",
    "stream_row",
    "uncached_streams",
]

_SIDE_TEXT = {Side.BUY: "BUY", Side.SELL: "SELL"}  # faster than the enum's .value
_ZERO = Decimal(0)
_NO_DAY = date.min

Effect = tuple[
    str, int, datetime, str, str, Decimal, Decimal, Decimal, Decimal, Decimal, str, str, str
]
"""What one fill did, as the runner keeps it: the fields of a ``FillEffect`` without its
per-fill object, and the text the history line needs (the payload's own timestamp text,
not a reformat). A plain tuple, not a NamedTuple (which made the fold about 5x slower):
its fields are named by the ``E_*`` indexes below; index an effect with them, never
with a bare number (mypyc folds these constants, so ``effect[E_POSITION]`` costs what
``effect[1]`` does)."""

E_EXEC_ID: Final = 0  # str: the execution id
E_POSITION: Final = 1  # int: the fill's log position
E_OCCURRED_AT: Final = 2  # datetime: the broker's time of the fill
E_OCCURRED_TEXT: Final = 3  # str: its ISO text, as the payload has it
E_SIDE: Final = 4  # str: "BUY" or "SELL"
E_FEE: Final = 5  # Decimal
E_QTY_BEFORE: Final = 6  # Decimal: signed quantity before the fill
E_QTY_AFTER: Final = 7  # Decimal: signed quantity after it
E_REALIZED_FIFO: Final = 8  # Decimal
E_REALIZED_WAC: Final = 9  # Decimal
E_QTY_TEXT: Final = 10  # str: str(qty)
E_PRICE_TEXT: Final = 11  # str: str(price)
E_FEE_TEXT: Final = 12  # str: str(fee)
EFFECT_FIELDS: Final = 13

StreamRow = tuple[int, str, str, datetime, str, Decimal, Decimal, Decimal, datetime]
"""A fill, bust or correction row of a stream, parsed once: (log position, type,
exec_id, occurred_at, side text ("" unless a fill), qty, price, fee (zeros on a bust),
recorded_at). What the runner's journal keeps and restatements replay, with no JSON
left to parse; decimals are shared through the page cache. Read it through the ``R_*``
indexes (constants mypyc folds, like ``E_*``)."""

R_POSITION: Final = 0  # int: the row's log position
R_TYPE: Final = 1  # str: "fill", "bust" or "correction"
R_EXEC_ID: Final = 2  # str: the execution id
R_OCCURRED_AT: Final = 3  # datetime: the broker's time
R_SIDE: Final = 4  # str: "BUY" / "SELL" on a fill, "" otherwise
R_QTY: Final = 5  # Decimal (zero on a bust)
R_PRICE: Final = 6  # Decimal (zero on a bust)
R_FEE: Final = 7  # Decimal (zero on a bust)
R_RECORDED_AT: Final = 8  # datetime: when the log recorded it
STREAM_ROW_FIELDS: Final = 9


Forget = tuple[date, datetime | None, int]
"""What a restatement rewrites of a stream: ``(day, at, position)``: its daily P&L from
``day`` on, and its history from ``day`` on, or (``at`` not None) only the rows of that
day and later whose fill sorts at or after ``(at, position)``."""

Seed = tuple[date, Decimal, Decimal, Decimal, int]
"""A restated stream's daily P&L bucket for the day it restates from, before its first
rewritten fill: (day, realized fifo, realized wac, fees, fills)."""

_FillKey = tuple[datetime, int]  # (occurred_at, log position): a fill's place in event order
_Totals = tuple[Decimal, Decimal, Decimal, int]  # a day's realized fifo, wac, fees, fills

MARK_EVERY = 16
"""Take a restart mark of a journaled stream every this many fills."""
MARK_KEEP = 3
"""Marks kept per stream, the latest: a bust, a correction or a late fill among a
stream's last ``MARK_EVERY * (MARK_KEEP - 1)`` fills or so replays from a mark before
it, from the journal, rather than from the stream's first fill, read back from the log;
and it rewrites only from that mark on. The journal keeps only the rows a replay from
the oldest mark needs (``trim_journal``)."""


@dataclass(slots=True)
class Mark:
    """A stream's state right after one of its fills, to restate from."""

    key: _FillKey  # the fill's place in event order
    day: date  # its trading day
    state: PositionState  # a private copy, never folded into
    day_totals: _Totals  # the P&L of ``day`` up to and with the fill (the seed's)
    page: int  # the page whose fold took it (-1: a restatement's replay)


@dataclass(slots=True)
class Marks:
    """A journaled stream's marks, oldest first, and the day totals they need.

    Valid while nothing at or before a mark's key changes: a restatement that changes
    the stream from key K keeps only the marks before K and takes new ones as it
    replays (``restate_stream``).
    """

    every: int = MARK_EVERY  # fills between marks
    keep: int = MARK_KEEP  # marks kept, the latest
    day: date | None = None  # the trading day of the last fill folded
    # that day's P&L so far, summed fill by fill as the daily rows are (the same digits)
    day_totals: _Totals = (_ZERO, _ZERO, _ZERO, 0)
    since: int = 0  # fills folded since the last mark
    points: list[Mark] = field(default_factory=list)
    # the stream's journal lacks rows from before the oldest mark: a replay from its
    # first fill must read the stream back from the log
    trimmed: bool = False


def _marked(
    marks: Marks,
    state: PositionState,
    day: date,
    realized_fifo: Decimal,
    realized_wac: Decimal,
    fee: Decimal,
    page: int,
) -> bool:
    """Count a fill just folded into ``state`` (in event order) into its day's P&L;
    every ``marks.every``th fill leaves a mark. Return whether it did.

    A restatement cannot start from a mark taken by its own page's fold (the page's
    fills before it are rewritten too), so the newest mark from before the page is
    never crowded out by the page's own: of those, only the newest is kept.
    """
    if day != marks.day:
        marks.day = day
        fifo, wac, fees, fills = _ZERO, _ZERO, _ZERO, 0
    else:
        fifo, wac, fees, fills = marks.day_totals
    totals = (fifo + realized_fifo, wac + realized_wac, fees + fee, fills + 1)
    marks.day_totals = totals
    marks.since += 1
    if marks.since >= marks.every and state.last_key is not None:
        marks.since = 0
        points = marks.points
        points.append(Mark(state.last_key, day, state.copy(), totals, page))
        if len(points) > marks.keep:
            if len(points) >= 3 and points[-2].page == page and points[-3].page != page:
                del points[-2]
            else:
                del points[0]
        return True
    return False


def trim_journal(rows: list[StreamRow], marks: Marks) -> int:
    """Drop from a stream's journal the rows a replay from its oldest mark cannot need;
    return how many.

    Such a replay folds the fills after the mark in event order; it needs their rows
    and their busts and corrections, which the log holds after them. So every row from
    the earliest log position of a fill after the mark on is kept; before it, nothing.
    """
    if not marks.points:
        return 0
    oldest_at, oldest_position = marks.points[0].key
    keep_from = -1
    for row in rows:
        # (row[R_OCCURRED_AT], row[R_POSITION]) > the mark's key, without a tuple per row
        if (
            row[R_TYPE] == "fill"
            and (
                row[R_OCCURRED_AT] > oldest_at
                or (row[R_OCCURRED_AT] == oldest_at and row[R_POSITION] > oldest_position)
            )
            and (keep_from < 0 or row[R_POSITION] < keep_from)
        ):
            keep_from = row[R_POSITION]
    before = len(rows)
    if keep_from < 0:
        rows.clear()  # every fill is at or before the mark: later rows come later
    else:
        rows[:] = [row for row in rows if row[R_POSITION] >= keep_from]
    removed = before - len(rows)
    if removed:
        marks.trimmed = True
    return removed


def _utc_day(at: datetime) -> date:
    return at.astimezone(UTC).date()


def stream_row(position: int, kind: str, payload: str, recorded_at: datetime) -> StreamRow:
    """Parse a stream's fill, bust or correction row from its payload JSON."""
    return _stream_row(position, kind, orjson.loads(payload), recorded_at)


def _stream_row(position: int, kind: str, p: dict[str, Any], recorded_at: datetime) -> StreamRow:
    occurred_at = datetime.fromisoformat(p["occurred_at"])
    if kind == "bust":
        return (position, kind, p["exec_id"], occurred_at, "", _ZERO, _ZERO, _ZERO, recorded_at)
    side: str = p.get("side", "")
    return (
        position,
        kind,
        p["exec_id"],
        occurred_at,
        side,
        _decimal(p["qty"])[0],
        _decimal(p["price"])[0],
        _decimal(p.get("fee", "0"))[0],
        recorded_at,
    )


# Payload decimal text -> (its Decimal, str() of it): quantities, prices and fees repeat,
# so a page parses and prints each distinct one once. Bounded; Decimals are immutable.
_DECIMALS: dict[Any, tuple[Decimal, str]] = {}
_DECIMALS_MAX = 100_000


def _decimal(text: Any) -> tuple[Decimal, str]:
    """Return ``(Decimal(text), str(Decimal(text)))``, cached."""
    hit = _DECIMALS.get(text)
    if hit is None:
        value = Decimal(text)
        if len(_DECIMALS) >= _DECIMALS_MAX:
            _DECIMALS.clear()
        hit = (value, str(value))
        _DECIMALS[text] = hit
    return hit


@dataclass
class Page:
    """What one page of the log changes, collected while folding it."""

    end: Checkpoint
    effects: dict[str, list[Effect]] = field(default_factory=dict)
    cum_before: dict[str, tuple[Decimal, Decimal]] = field(default_factory=dict)
    restate: dict[str, int] = field(default_factory=dict)  # stream -> last position read
    snapshots: list[tuple[str, int, int, datetime, datetime, str]] = field(default_factory=list)
    # stream -> what of its history and daily P&L is rewritten
    forget: dict[str, Forget] = field(default_factory=dict)
    # stream -> its rewritten first day's P&L before its first rewritten fill
    seed: dict[str, Seed] = field(default_factory=dict)
    history: list[str] = field(default_factory=list)  # COPY text lines
    # stream -> (log position, exec_id, reason) of the event that faults it (the runner
    # sets these when a restatement cannot fold the stream; see projections.faults)
    faults: dict[str, tuple[int, str | None, str]] = field(default_factory=dict)
    healed: set[str] = field(default_factory=set)  # faulted streams that fold again


@dataclass
class FoldScope:
    """The runner's state that folding a page reads and updates.

    Attributes:
        cache: stream -> its folded state, least recently used first.
        known: stream -> the latest ``recorded_at`` of the events its state holds.
        journal: stream -> its fill, bust and correction rows so far, while a drain
            from the start of the log keeps them (None: not kept).
        lost: streams the journal no longer holds whole.
        snapshot_every: snapshot a stream every this many fills.
        new_state: ``(stream, account, contract)`` -> a flat state for a stream first
            seen (raises ``FoldError`` for a contract with no instrument).
        add_instrument: takes the payload of an ``instrument`` event.
        marks: stream -> its restart marks, for the journaled streams (None: no marks).
        utc_days: no session boundary is configured (a UTC fill's day is its date).
        day_of: a fill's trading day.
        mark_every: fills between the marks of a stream this fold starts marking.
    """

    cache: OrderedDict[str, PositionState]
    known: dict[str, datetime]
    journal: dict[str, list[StreamRow]] | None
    lost: set[str]
    snapshot_every: int
    new_state: Callable[[str, str, str], PositionState]
    add_instrument: Callable[[dict[str, Any]], None]
    marks: dict[str, Marks] | None = None
    utc_days: bool = True
    day_of: Callable[[datetime], date] = _utc_day
    mark_every: int = MARK_EVERY


def fold_rows(scope: FoldScope, page: Page, rows: list[LightRow], lo: int, hi: int) -> int:
    """Fold ``rows[lo:hi]`` into ``scope``'s states, recording effects in ``page``.

    A fill that sorts after its stream's last folded fill is folded here; a bust, a
    correction, a late fill, a fill the fold cannot apply (the replay faults the
    stream), and every later row of a stream already restating in this page only mark
    the stream in ``page.restate`` (the runner replays it afterwards).

    Returns:
        How many rows the journal grew by (rows added less rows trimmed).
    """
    cache = scope.cache
    known = scope.known
    journal = scope.journal
    lost = scope.lost
    every = scope.snapshot_every
    effects_of = page.effects
    cum_before = page.cum_before
    restate = page.restate
    snapshots = page.snapshots
    marks_of = scope.marks
    page_id = page.end.position
    utc_days = scope.utc_days
    day_of = scope.day_of
    journaled = 0
    for i in range(lo, hi):
        row = rows[i]
        kind = row.type
        if kind == "bust" or kind == "correction":
            stream = row.stream
            position = row.global_position
            recorded_at = row.recorded_at
            if journal is not None:
                journaled += _journal(
                    journal,
                    lost,
                    stream,
                    _stream_row(position, kind, orjson.loads(row.payload), recorded_at),
                )
            seen = known.get(stream)
            if seen is None or recorded_at > seen:
                known[stream] = recorded_at
            restate[stream] = position  # a bust or correction restates its stream
        elif kind == "fill":
            stream = row.stream
            position = row.global_position
            recorded_at = row.recorded_at
            p = orjson.loads(row.payload)
            occurred_s: str = p["occurred_at"]
            occurred_at = datetime.fromisoformat(occurred_s)
            exec_id: str = p["exec_id"]
            side_s: str = p["side"]
            qty, qty_s = _decimal(p["qty"])
            price, price_s = _decimal(p["price"])
            fee, fee_s = _decimal(p["fee"])
            kept = 0
            if journal is not None:
                kept = _journal(
                    journal,
                    lost,
                    stream,
                    (position, kind, exec_id, occurred_at, side_s, qty, price, fee, recorded_at),
                )
                journaled += kept
            seen = known.get(stream)
            if seen is None or recorded_at > seen:
                known[stream] = recorded_at
            if stream in restate:
                # every later event of a stream already restating in this page restates
                restate[stream] = position
                continue
            state = cache.get(stream)
            if state is None:
                try:
                    state = scope.new_state(stream, p["account"], p["contract"])
                except FoldError:
                    restate[stream] = position  # no instrument: the replay faults it
                    continue
            last_key = state.last_key
            if last_key is not None and (occurred_at, position) <= last_key:
                restate[stream] = position  # a late fill: replay the stream
                continue
            effects = effects_of.get(stream)
            if effects is None:
                effects = []
                effects_of[stream] = effects
                cum_before[stream] = (state.realized_fifo, state.realized_wac)
            marks: Marks | None = None
            if marks_of is not None:
                marks = marks_of.get(stream)
                if marks is None and kept and last_key is None:
                    # a new stream the journal holds from its first fill: mark it
                    marks = Marks(every=scope.mark_every)
                    marks_of[stream] = marks
            try:
                before, after, realized_fifo, realized_wac = _fold_fill(
                    state, exec_id, side_s == "BUY", qty, price, fee, occurred_at, position
                )
            except FoldError:
                # (nothing folded yet) the replay of the stream faults it, or heals it
                restate[stream] = position
                continue
            if (
                marks is not None
                and _marked(
                    marks,
                    state,
                    _day(occurred_at, utc_days, day_of),
                    realized_fifo,
                    realized_wac,
                    fee,
                    page_id,
                )
                and journal is not None
            ):
                mine = journal.get(stream)
                if mine is not None:
                    journaled -= trim_journal(mine, marks)
            effects.append(
                (  # an Effect: its fields in E_* order
                    exec_id,
                    position,
                    occurred_at,
                    occurred_s,
                    side_s,
                    fee,
                    before,
                    after,
                    realized_fifo,
                    realized_wac,
                    qty_s,
                    price_s,
                    fee_s,
                )
            )
            cache.move_to_end(stream)
            if state.fill_count % every == 0:
                snapshots.append(
                    (
                        stream,
                        position,
                        position,
                        occurred_at,
                        known[stream],
                        state.json_text(),
                    )
                )
        elif kind == "instrument":
            scope.add_instrument(orjson.loads(row.payload))
        # marks, broker reports, reconciliation runs and seals change no position
    return journaled


def _journal(
    journal: dict[str, list[StreamRow]], lost: set[str], stream: str, row: StreamRow
) -> int:
    """Keep ``row`` in ``stream``'s journal unless the stream is lost; return 1 if kept."""
    mine = journal.get(stream)
    if mine is not None:
        mine.append(row)
        return 1
    if stream not in lost:
        journal[stream] = [row]
        return 1
    return 0


def collect(
    page: Page,
    generation: int,
    cache: OrderedDict[str, PositionState],
    daily_all: dict[str, dict[date, list[Any]]],
    dirty: set[str],
    utc_days: bool,
    day_of: Callable[[datetime], date],
) -> None:
    """Turn ``page.effects`` into history lines (``page.history``) and daily P&L
    (``daily_all``: stream -> day -> [account, contract, realized fifo, realized wac,
    fees, fills]), now, before the next page mutates the states.

    ``day_of`` gives a fill's trading day; with ``utc_days`` (no session boundary
    configured) a fill stamped in UTC takes its calendar date without the call.
    """
    history = page.history
    zero = _FOLD_ZERO
    day_text: dict[date, str] = {}
    for stream, (from_day, _, _) in page.forget.items():
        # the stream's daily rows from that day on are rewritten: the first of them from
        # its seed (what the day's fills before the rewrite made), if it has one
        daily = daily_all.get(stream)
        if daily:
            for day in [d for d in daily if d >= from_day]:
                del daily[day]
    for stream, (day, seed_fifo, seed_wac, seed_fees, seed_fills) in page.seed.items():
        state = cache[stream]
        daily_all.setdefault(stream, {})[day] = [
            state.account,
            state.contract,
            seed_fifo,
            seed_wac,
            seed_fees,
            seed_fills,
        ]
    for stream, effects in page.effects.items():
        dirty.add(stream)
        if not effects:
            continue
        state = cache[stream]
        # COPY text format: one line per row, tab-separated (ids never hold a tab, a
        # newline or a backslash; copy_text escapes them anyway)
        head = f"{generation}\t{copy_text(stream)}\t"
        middle = f"detail\t{copy_text(state.account)}\t{copy_text(state.contract)}"
        cum_fifo, cum_wac = page.cum_before[stream]
        daily = daily_all.get(stream)
        if daily is None:
            daily = {}
            daily_all[stream] = daily
        # a fill's qty_before is the previous fill's qty_after (the same object)
        last_after: Decimal | None = None
        last_after_s = ""
        for (  # an Effect's fields, in E_* order
            exec_id,
            position,
            occurred_at,
            occurred_s,
            side_s,
            fee,
            before,
            after,
            realized_fifo,
            realized_wac,
            qty_s,
            price_s,
            fee_s,
        ) in effects:
            cum_fifo += realized_fifo
            cum_wac += realized_wac
            day = _day(occurred_at, utc_days, day_of)
            day_s = day_text.get(day)
            if day_s is None:
                day_s = day.isoformat()
                day_text[day] = day_s
            before_s = last_after_s if before is last_after else str(before)
            last_after = after
            last_after_s = str(after)
            # (one join of plain str() texts: both far faster than f-string formatting
            # of Decimals and datetimes)
            history.append(
                "\t".join(
                    [
                        head + str(position),
                        middle,
                        copy_text(exec_id),
                        occurred_s,
                        day_s,
                        side_s,
                        qty_s,
                        price_s,
                        before_s,
                        last_after_s,
                        "0" if realized_fifo is zero else str(realized_fifo),
                        "0" if realized_wac is zero else str(realized_wac),
                        str(cum_fifo),
                        str(cum_wac),
                        fee_s + "\n",
                    ]
                )
            )
            bucket = daily.get(day)
            if bucket is None:
                daily[day] = [state.account, state.contract, realized_fifo, realized_wac, fee, 1]
            else:
                bucket[2] += realized_fifo
                bucket[3] += realized_wac
                bucket[4] += fee
                bucket[5] += 1
    for stream in page.forget:
        dirty.add(stream)


_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def copy_text(value: str) -> str:
    """Return ``value`` escaped for COPY's text format."""
    if "\\" in value or "\t" in value or "\n" in value or "\r" in value:
        return value.translate(_COPY_ESCAPES)
    return value


def uncached_streams(rows: list[LightRow], cache: Mapping[str, object]) -> list[str]:
    """Return the streams with a fill, bust or correction in ``rows`` that ``cache``
    does not hold, each once, in the order they first come (what a page must load)."""
    wanted: dict[str, None] = {}
    for row in rows:
        kind = row.type
        if kind == "fill" or kind == "bust" or kind == "correction":
            stream = row.stream
            if stream not in cache and stream not in wanted:
                wanted[stream] = None
    return list(wanted)


def first_positions(rows: list[LightRow], streams: Mapping[str, object]) -> dict[str, int]:
    """Return, for each of ``streams`` with a row in ``rows``, the log position of its
    first row there (``rows`` in log order)."""
    first: dict[str, int] = {}
    for row in rows:
        stream = row.stream
        if stream in streams and stream not in first:
            first[stream] = row.global_position
    return first


PositionColumns = tuple[
    list[str],
    list[str],
    list[str],
    list[Decimal],
    list[Decimal | None],
    list[Decimal | None],
    list[Decimal],
    list[Decimal],
    list[Decimal],
    list[datetime | None],
    list[datetime | None],
    list[datetime | None],
    list[int],
    list[int],
    list[str],
]
"""proj_positions' columns, one list each, in the upsert's order: stream, account,
contract, signed qty, average open price (FIFO, WAC), realized (FIFO, WAC), fees,
opened, closed, last fill, fills, last log position, the state's JSON."""


def position_columns(streams: list[str], cache: Mapping[str, PositionState]) -> PositionColumns:
    """Return the proj_positions columns of ``streams`` (in that order) from their
    cached states: a page's positions, taken before the next page folds into them."""
    columns: PositionColumns = ([], [], [], [], [], [], [], [], [], [], [], [], [], [], [])
    (
        stream_of,
        account,
        contract,
        signed_qty,
        avg_fifo,
        avg_wac,
        realized_fifo,
        realized_wac,
        fees,
        opened_at,
        closed_at,
        last_fill_at,
        fill_count,
        last_position,
        state_text,
    ) = columns
    for stream in streams:
        s = cache[stream]
        stream_of.append(stream)
        account.append(s.account)
        contract.append(s.contract)
        signed_qty.append(s.signed_qty)
        avg_fifo.append(s.avg_open_price("fifo"))
        avg_wac.append(s.avg_open_price("wac"))
        realized_fifo.append(s.realized_fifo)
        realized_wac.append(s.realized_wac)
        fees.append(s.fees)
        opened_at.append(s.opened_at)
        closed_at.append(s.closed_at)
        last_fill_at.append(s.last_fill_at)
        fill_count.append(s.fill_count)
        last_key = s.last_key
        last_position.append(last_key[1] if last_key is not None else 0)
        state_text.append(s.json_text())
    return columns


@dataclass(slots=True)
class Restated:
    """A replayed stream: its state, and what of it is rewritten (``restate_stream``)."""

    state: PositionState
    effects: list[Effect]  # of the rewritten fills, in event order
    forget: Forget | None  # None: the new rows change no fill
    cum_before: tuple[Decimal, Decimal]  # realized (fifo, wac) before the first effect
    seed: Seed | None  # the first rewritten day's P&L before its first effect


def restate_stream(
    state: PositionState,
    events: list[StreamRow],
    first_new: int,
    utc_days: bool,
    day_of: Callable[[datetime], date],
    floor: date | None = None,
    marks: Marks | None = None,
    folded: _FillKey | None = None,
) -> Restated | None:
    """Replay a stream's standing fills; return only what changed from the first fill
    the new rows can change.

    A late fill, a bust or a correction changes the stream from its own fill on (in
    event order); whatever sorts before that fill stays as it is: its history lines, and
    its share of its day's P&L (returned as ``seed``). The replay starts from the latest
    of ``marks`` before that fill, or from the stream's first fill with none, and the
    rewrite from the mark, or from the changed fill.

    Args:
        state: a flat state for the stream; with no usable mark, it is the one replayed.
        events: the stream's fill, bust and correction rows up to the page's end, in
            any order.
        first_new: the log position of the stream's first row in the page being folded:
            rows from there on are new (nothing of them is written yet).
        utc_days: no session boundary is configured (a UTC fill's day is its date).
        day_of: a fill's trading day.
        floor: the first trading day whose detail history is not compacted (None: no
            day is). A restatement from an earlier day rewrites that whole day and
            everything after (its end-of-day rows included); no mark before it is used.
        marks: the stream's marks, if it keeps them: kept up to the replay's start and
            taken anew as it replays. With ``marks.trimmed``, ``events`` are only the
            journal's rows since the oldest mark (``trim_journal``).
        folded: the key of the first fill of the stream the page folded before it had
            to restate (the page's effects for it are replaced, so the replay rewrites
            from there at the latest; a trimmed journal may no longer hold its row).

    Returns:
        The replay; or None (nothing done) when ``events`` are a trimmed journal and
        the change may reach before the oldest mark: call again with every row of
        the stream.
    """
    fills, keys, touched = _standing(events, first_new)
    partial = marks is not None and marks.trimmed
    earliest: _FillKey | None = None
    for exec_id in touched:
        key = keys.get(exec_id)
        if key is None:
            if partial:
                return None  # an execution before the journal's rows, or none
        elif earliest is None or key < earliest:
            earliest = key
    if folded is not None and (earliest is None or folded < earliest):
        earliest = folded
    # the marks a replay may start from: before the change, and on a day not compacted
    # (marks sort by key, and their days with it)
    kept: list[Mark] = []
    if marks is not None and earliest is not None:
        for m in marks.points:
            if m.key >= earliest:
                break
            kept.append(m)
        if kept and floor is not None and kept[-1].day < floor:
            kept = []
    if partial and not kept:
        return None
    mark = kept[-1] if kept else None
    if marks is not None:
        if mark is not None:
            marks.day, marks.day_totals = mark.day, mark.day_totals
        else:
            marks.day, marks.day_totals = None, (_ZERO, _ZERO, _ZERO, 0)
        marks.points = kept
        marks.since = 0
    forget: Forget | None = None
    seed: Seed | None = None
    from_day = _NO_DAY
    by_key = False  # rewrite from ``earliest`` (else from the start of ``from_day``)
    emitting = False
    after_mark: _FillKey | None = None
    if mark is not None:
        state = mark.state.copy()
        after_mark = mark.key
        forget = (mark.day, mark.key[0], mark.key[1] + 1)
        seed = (mark.day, *mark.day_totals)
        emitting = True
    elif earliest is not None:
        from_day = _day(earliest[0], utc_days, day_of)
        by_key = floor is None or from_day >= floor
        forget = (from_day, earliest[0], earliest[1]) if by_key else (from_day, None, 0)
    emit_from = earliest if by_key else None
    effects: list[Effect] = []
    before_day = (state.realized_fifo, state.realized_wac)
    seed_fifo = seed_wac = seed_fees = _ZERO
    seed_fills = 0
    for f in fills:
        key = (f.occurred_at, f.position)
        if after_mark is not None and key <= after_mark:
            continue
        day = _day(f.occurred_at, utc_days, day_of)
        if (
            not emitting
            and forget is not None
            and (key >= emit_from if emit_from is not None else day >= from_day)
        ):
            emitting = True
            before_day = (state.realized_fifo, state.realized_wac)
        before, after, realized_fifo, realized_wac = _fold_fill(
            state, f.exec_id, f.side is Side.BUY, f.qty, f.price, f.fee, f.occurred_at, f.position
        )
        if marks is not None:
            _marked(marks, state, day, realized_fifo, realized_wac, f.fee, -1)
        if emitting:
            effects.append(
                (  # an Effect: its fields in E_* order
                    f.exec_id,
                    f.position,
                    f.occurred_at,
                    _iso_text(f.occurred_at),
                    _SIDE_TEXT[f.side],
                    f.fee,
                    before,
                    after,
                    realized_fifo,
                    realized_wac,
                    str(f.qty),
                    str(f.price),
                    str(f.fee),
                )
            )
        elif by_key and day == from_day:
            seed_fifo += realized_fifo
            seed_wac += realized_wac
            seed_fees += f.fee
            seed_fills += 1
    if not emitting:
        before_day = (state.realized_fifo, state.realized_wac)
    if seed_fills:
        seed = (from_day, seed_fifo, seed_wac, seed_fees, seed_fills)
    return Restated(state, effects, forget, before_day, seed)


def replay_rows(state: PositionState, events: list[StreamRow]) -> PositionState:
    """Fold a stream's standing fills, from its parsed rows (any order), into ``state``.

    ``projections.positions.replay`` without pydantic events or per-fill effects: the
    same rules (``_standing``) and the same fold, for reads that want only the state.
    """
    fills, _, _ = _standing(events, _NO_NEW)
    for f in fills:
        _fold_fill(
            state, f.exec_id, f.side is Side.BUY, f.qty, f.price, f.fee, f.occurred_at, f.position
        )
    return state


_NO_NEW = 1 << 62  # a log position no row reaches: no row is new


def standing_fills(events: list[StreamRow]) -> list[FillInput]:
    """Return the standing fills among a stream's parsed rows (any order), in event
    order: the rules of ``projections.positions.effective_fills``, without pydantic."""
    return _standing(events, _NO_NEW)[0]


def _iso_text(at: datetime) -> str:
    """``at.isoformat()``; for a UTC datetime through orjson, which writes the same text
    without ``isoformat()``'s per-call ``utcoffset`` cost (tests/unit/test_compiled.py)."""
    if at.tzinfo is UTC:
        return orjson.dumps(at)[1:-1].decode()
    return at.isoformat()


def _day(at: datetime, utc_days: bool, day_of: Callable[[datetime], date]) -> date:
    if utc_days and at.tzinfo is UTC:
        return at.date()
    return day_of(at)


def _fill_key(f: FillInput) -> tuple[datetime, int]:
    return (f.occurred_at, f.position)


def _standing(
    events: list[StreamRow], first_new: int
) -> tuple[list[FillInput], dict[str, tuple[datetime, int]], set[str]]:
    """Return a stream's standing fills in event order; the ``(occurred_at, position)``
    key of every recorded execution, busted or not; and the execution ids that rows at
    or after log position ``first_new`` fill, bust or correct.

    The rules are those of ``projections.positions.effective_fills`` (a bust removes,
    the latest correction by (occurred_at, position) replaces, the earliest record of an
    execution stands), on parsed rows rather than pydantic events.
    """
    recorded: dict[str, StreamRow] = {}
    busted: set[str] = set()
    corrected: dict[str, StreamRow] = {}
    touched: set[str] = set()
    for row in events:
        position = row[R_POSITION]
        kind = row[R_TYPE]
        exec_id = row[R_EXEC_ID]
        if position >= first_new:
            touched.add(exec_id)
        if kind == "fill":
            earlier = recorded.get(exec_id)
            if earlier is None or position < earlier[R_POSITION]:
                recorded[exec_id] = row
        elif kind == "bust":
            busted.add(exec_id)
        else:
            latest = corrected.get(exec_id)
            if latest is None or (row[R_OCCURRED_AT], position) > (
                latest[R_OCCURRED_AT],
                latest[R_POSITION],
            ):
                corrected[exec_id] = row
    fills = []
    keys: dict[str, tuple[datetime, int]] = {}
    for exec_id, row in recorded.items():
        keys[exec_id] = (row[R_OCCURRED_AT], row[R_POSITION])
        if exec_id in busted:
            continue
        correction = corrected.get(exec_id)
        source = row if correction is None else correction
        fills.append(
            FillInput(
                exec_id=exec_id,
                side=SIDE_OF_TEXT[row[R_SIDE]],
                qty=source[R_QTY],
                price=source[R_PRICE],
                fee=source[R_FEE],
                occurred_at=row[R_OCCURRED_AT],
                position=row[R_POSITION],
            )
        )
    fills.sort(key=_fill_key)
    return fills, keys, touched
